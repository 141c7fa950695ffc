//! Routes compiled at load time: host → longest path prefix → methods.
//!
//! Hosts are looked up in hash maps (exact names, then `*.suffix` from the most specific suffix,
//! then routes for any host); within a host, only the distinct prefix lengths that exist are
//! tried, longest first, each one hash lookup. So a match costs a few lookups however many routes
//! there are. As with nginx's prefix locations, a prefix matches byte for byte: `/products`
//! also matches `/products-old`; write `/products/` to match only below it.

use crate::config::{HostPattern, RouteSpec};
use http::Method;
use std::collections::HashMap;

/// Route tables are keyed by config text and read with client input; foldhash is several
/// times faster than SipHash on short keys, and per-process seeds keep it unpredictable.
type Map<V> = HashMap<Box<str>, V, foldhash::fast::RandomState>;

/// What the router found for a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RouteMatch {
    /// Index of the matching route in the config's `routes`.
    Found(usize),
    /// Routes match the host and path, but none allows this method.
    MethodNotAllowed(Vec<Method>),
    /// No route matches.
    NotFound,
}

/// All routes, compiled for lookup.
#[derive(Debug, Default)]
pub struct Router {
    exact: Map<PathTable>,
    wildcard: Map<PathTable>,
    any: PathTable,
}

#[derive(Debug, Default)]
struct PathTable {
    by_prefix: Map<Vec<Candidate>>,
    /// Distinct prefix lengths, longest first.
    lengths: Vec<usize>,
}

#[derive(Debug)]
struct Candidate {
    methods: Option<Vec<Method>>,
    route: usize,
}

impl PathTable {
    fn insert(&mut self, prefix: &str, methods: Option<Vec<Method>>, route: usize) {
        self.by_prefix
            .entry(prefix.into())
            .or_default()
            .push(Candidate { methods, route });
        if !self.lengths.contains(&prefix.len()) {
            self.lengths.push(prefix.len());
            self.lengths.sort_unstable_by(|a, b| b.cmp(a));
        }
    }

    fn lookup(&self, path: &str, method: &Method, allowed: &mut Vec<Method>) -> Option<usize> {
        let bytes = path.as_bytes();
        for &len in &self.lengths {
            if len > bytes.len() || !path.is_char_boundary(len) {
                continue;
            }
            if let Some(cands) = self.by_prefix.get(&path[..len]) {
                for c in cands {
                    match &c.methods {
                        None => return Some(c.route),
                        Some(ms) if ms.contains(method) => return Some(c.route),
                        Some(ms) => {
                            for m in ms {
                                if !allowed.contains(m) {
                                    allowed.push(m.clone());
                                }
                            }
                        }
                    }
                }
            }
        }
        None
    }
}

impl Router {
    /// Compiles the routes of a validated config.
    pub fn new(routes: &[RouteSpec]) -> Router {
        let mut r = Router::default();
        for (i, spec) in routes.iter().enumerate() {
            let table = match &spec.host {
                None => &mut r.any,
                Some(HostPattern::Exact(h)) => r.exact.entry(h.as_str().into()).or_default(),
                Some(HostPattern::Wildcard(s)) => r.wildcard.entry(s.as_str().into()).or_default(),
            };
            table.insert(&spec.path_prefix, spec.methods.clone(), i);
        }
        r
    }

    /// Finds the route for a request. `host` is the request's host, lower-case, without port.
    pub fn find(&self, host: &str, path: &str, method: &Method) -> RouteMatch {
        let mut allowed = Vec::new();
        if !self.exact.is_empty()
            && let Some(t) = self.exact.get(host)
            && let Some(r) = t.lookup(path, method, &mut allowed)
        {
            return RouteMatch::Found(r);
        }
        if !self.wildcard.is_empty() {
            for (i, b) in host.bytes().enumerate() {
                if b == b'.'
                    && let Some(t) = self.wildcard.get(&host[i..])
                    && let Some(r) = t.lookup(path, method, &mut allowed)
                {
                    return RouteMatch::Found(r);
                }
            }
        }
        if let Some(r) = self.any.lookup(path, method, &mut allowed) {
            return RouteMatch::Found(r);
        }
        if allowed.is_empty() {
            RouteMatch::NotFound
        } else {
            RouteMatch::MethodNotAllowed(allowed)
        }
    }
}

/// Lower-cases a Host value and strips its port and trailing dot, for [`Router::find`].
pub fn normalize_host(raw: &str) -> std::borrow::Cow<'_, str> {
    let without_port = if raw.starts_with('[') {
        raw.split_once(']')
            .map_or(raw, |(h, _)| &raw[..h.len() + 1])
    } else {
        raw.rsplit_once(':').map_or(raw, |(h, _)| h)
    };
    let h = without_port.strip_suffix('.').unwrap_or(without_port);
    if h.bytes().any(|b| b.is_ascii_uppercase()) {
        std::borrow::Cow::Owned(h.to_ascii_lowercase())
    } else {
        std::borrow::Cow::Borrowed(h)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn route(
        name: &str,
        host: Option<HostPattern>,
        prefix: &str,
        methods: Option<Vec<Method>>,
    ) -> RouteSpec {
        RouteSpec {
            name: name.into(),
            host,
            path_prefix: prefix.into(),
            methods,
            upstream: 0,
            rate_limit: None,
            cache: None,
        }
    }

    #[test]
    fn longest_prefix_then_host_specificity() {
        let r = Router::new(&[
            route("root", None, "/", None),
            route("products", None, "/products", None),
            route(
                "api-products",
                Some(HostPattern::Exact("api.example.com".into())),
                "/products/",
                Some(vec![Method::GET]),
            ),
            route(
                "wild",
                Some(HostPattern::Wildcard(".example.com".into())),
                "/",
                None,
            ),
        ]);
        assert_eq!(
            r.find("other.org", "/products/1", &Method::GET),
            RouteMatch::Found(1)
        );
        assert_eq!(
            r.find("other.org", "/x", &Method::GET),
            RouteMatch::Found(0)
        );
        assert_eq!(
            r.find("api.example.com", "/products/1", &Method::GET),
            RouteMatch::Found(2)
        );
        // POST on api.example.com /products/ falls to the wildcard host's "/".
        assert_eq!(
            r.find("api.example.com", "/products/1", &Method::POST),
            RouteMatch::Found(3)
        );
        assert_eq!(
            r.find("a.b.example.com", "/z", &Method::GET),
            RouteMatch::Found(3)
        );
        // `*.example.com` does not match example.com itself.
        assert_eq!(
            r.find("example.com", "/z", &Method::GET),
            RouteMatch::Found(0)
        );
    }

    #[test]
    fn methods_and_not_found() {
        let r = Router::new(&[route(
            "get",
            None,
            "/a",
            Some(vec![Method::GET, Method::HEAD]),
        )]);
        assert_eq!(r.find("h", "/b", &Method::GET), RouteMatch::NotFound);
        assert_eq!(
            r.find("h", "/a", &Method::DELETE),
            RouteMatch::MethodNotAllowed(vec![Method::GET, Method::HEAD])
        );
    }

    #[test]
    fn host_normalization() {
        assert_eq!(normalize_host("API.Example.com:8080"), "api.example.com");
        assert_eq!(normalize_host("example.com."), "example.com");
        assert_eq!(normalize_host("[::1]:80"), "[::1]");
    }
}
