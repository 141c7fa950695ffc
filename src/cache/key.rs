//! Cache keys: route, host, path and the route's chosen query parameters in sorted order.
//!
//! Only these go into the primary key; request headers take part only through `Vary` (the
//! secondary key, matched per stored variant). Headers that could change what an origin sends
//! without being keyed are removed before forwarding ([`UNKEYED_OVERRIDES`]).

use crate::config::QueryKey;
use http::HeaderName;

/// Request headers some origins and frameworks obey to rewrite the URL, host or method. They
/// are not part of the key, so a cached route never forwards them: one client's header must not
/// change what every other client is served (cache poisoning).
pub static UNKEYED_OVERRIDES: [HeaderName; 9] = [
    HeaderName::from_static("x-original-url"),
    HeaderName::from_static("x-rewrite-url"),
    HeaderName::from_static("x-http-method-override"),
    HeaderName::from_static("x-http-method"),
    HeaderName::from_static("x-method-override"),
    HeaderName::from_static("x-forwarded-scheme"),
    HeaderName::from_static("x-forwarded-server"),
    HeaderName::from_static("x-forwarded-prefix"),
    HeaderName::from_static("x-host"),
];

/// The primary key of a cached URL: `ROUTE:HOST/PATH?SORTED_QUERY`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct CacheKey {
    text: String,
    path_start: usize,
}

impl CacheKey {
    /// Builds the key of `host` (normalized), `path` and `query` on `route`.
    pub fn new(route: &str, host: &str, path: &str, query: Option<&str>, rule: &QueryKey) -> Self {
        let mut text = String::with_capacity(
            route.len() + host.len() + path.len() + 2 + query.map_or(0, str::len),
        );
        text.push_str(route);
        text.push(':');
        text.push_str(host);
        let path_start = text.len();
        text.push_str(if path.is_empty() { "/" } else { path });
        if let Some(q) = query.filter(|q| !q.is_empty()) {
            let keep = |name: &str| match rule {
                QueryKey::All => true,
                QueryKey::None => false,
                QueryKey::Ignore(list) => !list.iter().any(|n| n == name),
                QueryKey::Allow(list) => list.iter().any(|n| n == name),
            };
            let mut pairs: Vec<&str> = q
                .split('&')
                .filter(|p| !p.is_empty() && keep(p.split_once('=').map_or(*p, |(k, _)| k)))
                .collect();
            if !pairs.is_empty() {
                pairs.sort_unstable();
                text.push('?');
                for (i, p) in pairs.iter().enumerate() {
                    if i > 0 {
                        text.push('&');
                    }
                    text.push_str(p);
                }
            }
        }
        CacheKey { text, path_start }
    }

    /// Rebuilds a key from its text and where its path starts (as stored in a tier).
    pub fn from_parts(text: String, path_start: usize) -> Self {
        CacheKey { text, path_start }
    }

    /// The whole key.
    pub fn as_str(&self) -> &str {
        &self.text
    }

    /// Where the path begins in [`CacheKey::as_str`].
    pub fn path_start(&self) -> usize {
        self.path_start
    }

    /// The path and query part.
    pub fn path(&self) -> &str {
        &self.text[self.path_start..]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_is_sorted_and_filtered() {
        let k = CacheKey::new(
            "r",
            "api.example.com",
            "/p",
            Some("b=2&a=1&utm_source=x"),
            &QueryKey::All,
        );
        assert_eq!(k.as_str(), "r:api.example.com/p?a=1&b=2&utm_source=x");
        assert_eq!(k.path(), "/p?a=1&b=2&utm_source=x");
        let k = CacheKey::new(
            "r",
            "h",
            "/p",
            Some("b=2&a=1&utm_source=x"),
            &QueryKey::Ignore(vec!["utm_source".into()]),
        );
        assert_eq!(k.as_str(), "r:h/p?a=1&b=2");
        let k = CacheKey::new(
            "r",
            "h",
            "/p",
            Some("id=7&x=1"),
            &QueryKey::Allow(vec!["id".into()]),
        );
        assert_eq!(k.as_str(), "r:h/p?id=7");
        let k = CacheKey::new("r", "h", "/p", Some("id=7"), &QueryKey::None);
        assert_eq!(k.as_str(), "r:h/p");
        let k = CacheKey::new(
            "r",
            "h",
            "/p",
            Some("utm_source=1"),
            &QueryKey::Ignore(vec!["utm_source".into()]),
        );
        assert_eq!(k.as_str(), "r:h/p");
    }
}
