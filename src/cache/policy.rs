//! RFC 9111 shared-cache rules, decided once when a response is stored: whether it may be
//! stored, how long it is fresh, and how long it may be served stale. A hit only compares
//! numbers precomputed here; no header is parsed again.

use crate::config::RouteCacheSpec;
use http::{HeaderMap, HeaderName, HeaderValue, StatusCode, header};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Most request headers a stored response may vary on (route `vary` plus the origin's `Vary`).
pub const MAX_VARY: usize = 16;
/// Longest `Vary` header accepted; a longer one is not stored.
const MAX_VARY_BYTES: usize = 1024;

/// Milliseconds since the Unix epoch (entry times are wall-clock so that instances sharing
/// Redis agree on them).
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// The Cache-Control directives of a response that matter to a shared cache.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct ResponseDirectives {
    /// `no-store`.
    pub no_store: bool,
    /// `no-cache` (without field names: stored, always revalidated).
    pub no_cache: bool,
    /// `private`.
    pub private: bool,
    /// `public`.
    pub public: bool,
    /// `max-age=N`.
    pub max_age: Option<u64>,
    /// `s-maxage=N`.
    pub s_maxage: Option<u64>,
    /// `must-revalidate` or `proxy-revalidate`: never served stale.
    pub must_revalidate: bool,
    /// `stale-while-revalidate=N` (RFC 5861).
    pub stale_while_revalidate: Option<u64>,
    /// `stale-if-error=N` (RFC 5861).
    pub stale_if_error: Option<u64>,
}

/// Splits Cache-Control values into `(name, argument)` pairs, lower-casing names.
fn directives(h: &HeaderMap) -> impl Iterator<Item = (String, Option<String>)> + '_ {
    h.get_all(header::CACHE_CONTROL)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|d| {
            let d = d.trim();
            if d.is_empty() {
                return None;
            }
            Some(match d.split_once('=') {
                Some((k, v)) => (
                    k.trim().to_ascii_lowercase(),
                    Some(v.trim().trim_matches('"').to_owned()),
                ),
                None => (d.to_ascii_lowercase(), None),
            })
        })
}

fn seconds(v: &Option<String>) -> Option<u64> {
    v.as_deref().and_then(|s| s.parse::<u64>().ok())
}

impl ResponseDirectives {
    /// Reads a response's Cache-Control.
    pub fn parse(h: &HeaderMap) -> Self {
        let mut d = ResponseDirectives::default();
        for (k, v) in directives(h) {
            match k.as_str() {
                "no-store" => d.no_store = true,
                "no-cache" => d.no_cache = true,
                "private" => d.private = true,
                "public" => d.public = true,
                "max-age" => d.max_age = seconds(&v).or(Some(0)),
                "s-maxage" => d.s_maxage = seconds(&v).or(Some(0)),
                "must-revalidate" | "proxy-revalidate" => d.must_revalidate = true,
                "stale-while-revalidate" => d.stale_while_revalidate = seconds(&v),
                "stale-if-error" => d.stale_if_error = seconds(&v),
                _ => {}
            }
        }
        d
    }
}

/// The Cache-Control directives of a request.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct RequestDirectives {
    /// `no-cache`, `max-age=0` or `Pragma: no-cache`: a stored response must be revalidated.
    pub no_cache: bool,
    /// `no-store`: the response is not stored.
    pub no_store: bool,
    /// `only-if-cached`: answer from the cache or with 504.
    pub only_if_cached: bool,
}

impl RequestDirectives {
    /// Reads a request's Cache-Control (and Pragma, when there is no Cache-Control).
    pub fn parse(h: &HeaderMap) -> Self {
        let mut d = RequestDirectives::default();
        if !h.contains_key(header::CACHE_CONTROL) {
            d.no_cache = h
                .get_all(header::PRAGMA)
                .iter()
                .any(|v| v.as_bytes().eq_ignore_ascii_case(b"no-cache"));
            return d;
        }
        for (k, v) in directives(h) {
            match k.as_str() {
                "no-cache" => d.no_cache = true,
                "max-age" if seconds(&v) == Some(0) => d.no_cache = true,
                "no-store" => d.no_store = true,
                "only-if-cached" => d.only_if_cached = true,
                _ => {}
            }
        }
        d
    }
}

/// How long a stored response is fresh and may be served stale, decided at store time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Freshness {
    /// When the response was generated (receipt minus the origin's `Age`), Unix ms.
    pub stored_at_ms: u64,
    /// Freshness lifetime.
    pub fresh_ms: u64,
    /// Stale-while-revalidate window after freshness ends.
    pub swr_ms: u64,
    /// Stale-if-error window after freshness ends.
    pub sie_ms: u64,
}

/// Why a response is not stored (logged at debug, counted nowhere: it is still a miss).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum NotStored {
    /// The status is not in the route's `statuses`.
    #[error("status not cacheable on this route")]
    Status,
    /// `Vary: *`, or a Vary too long to key on.
    #[error("Vary: * or too many Vary headers")]
    Vary,
    /// Set-Cookie without `allow_set_cookie`.
    #[error("Set-Cookie")]
    SetCookie,
    /// `no-store` or `private` (request or response).
    #[error("no-store or private")]
    NoStore,
    /// The request had Authorization and the response does not say public or s-maxage.
    #[error("request had Authorization")]
    Authorization,
    /// Nothing makes it fresh and it has no validator to revalidate with.
    #[error("no freshness and no validator")]
    NotFresh,
}

/// The request facts the store rules need.
#[derive(Debug, Clone, Copy, Default)]
pub struct RequestFacts {
    /// The request carried Authorization.
    pub authorization: bool,
    /// The request said `no-store`.
    pub no_store: bool,
}

/// The request headers named by a response's `Vary` (lower-case, deduplicated), or an error
/// for `Vary: *` and oversized lists.
pub fn vary_names(h: &HeaderMap, route_vary: &[HeaderName]) -> Result<Vec<HeaderName>, NotStored> {
    let mut names: Vec<HeaderName> = route_vary.to_vec();
    let mut total = 0;
    for v in h.get_all(header::VARY) {
        total += v.len();
        if total > MAX_VARY_BYTES {
            return Err(NotStored::Vary);
        }
        let Ok(s) = v.to_str() else {
            return Err(NotStored::Vary);
        };
        for n in s.split(',').map(str::trim).filter(|n| !n.is_empty()) {
            if n == "*" {
                return Err(NotStored::Vary);
            }
            let name = HeaderName::from_bytes(n.as_bytes()).map_err(|_| NotStored::Vary)?;
            if !names.contains(&name) {
                names.push(name);
            }
        }
    }
    if names.len() > MAX_VARY {
        return Err(NotStored::Vary);
    }
    Ok(names)
}

fn http_date(v: Option<&HeaderValue>) -> Option<SystemTime> {
    v.and_then(|v| v.to_str().ok())
        .and_then(|s| httpdate::parse_http_date(s).ok())
}

fn unix_ms(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Decides whether a response may be stored and, if so, its freshness (RFC 9111 §3, §4.2).
pub fn decide(
    spec: &RouteCacheSpec,
    req: RequestFacts,
    status: StatusCode,
    h: &HeaderMap,
    now_ms: u64,
) -> Result<Freshness, NotStored> {
    if !spec.statuses.contains(&status.as_u16()) {
        return Err(NotStored::Status);
    }
    if h.contains_key(header::SET_COOKIE) && !spec.allow_set_cookie {
        return Err(NotStored::SetCookie);
    }
    if req.no_store {
        return Err(NotStored::NoStore);
    }
    let cc = ResponseDirectives::parse(h);
    if req.authorization && !(cc.public || cc.s_maxage.is_some() || cc.must_revalidate) {
        return Err(NotStored::Authorization);
    }
    let age_ms = h
        .get(header::AGE)
        .and_then(|v| v.to_str().ok())
        .and_then(|s| s.trim().parse::<u64>().ok())
        .map_or(0, |s| s.saturating_mul(1000));
    let stored_at_ms = now_ms.saturating_sub(age_ms);
    let ttl_ms = spec.ttl.as_millis() as u64;
    let (fresh_ms, explicit) = if spec.respect_origin {
        if cc.no_store || cc.private {
            return Err(NotStored::NoStore);
        }
        let explicit = cc.s_maxage.or(cc.max_age).map(|s| s * 1000).or_else(|| {
            h.get(header::EXPIRES).map(|v| {
                let date = http_date(h.get(header::DATE)).map_or(now_ms, unix_ms);
                http_date(Some(v)).map_or(0, |e| unix_ms(e).saturating_sub(date))
            })
        });
        match explicit {
            _ if cc.no_cache => (0, true),
            Some(ms) => (ms, true),
            None => (ttl_ms, false),
        }
    } else {
        (ttl_ms, false)
    };
    let validator = h.contains_key(header::ETAG) || h.contains_key(header::LAST_MODIFIED);
    if fresh_ms == 0 && !(explicit && validator) {
        return Err(NotStored::NotFresh);
    }
    let window = |origin: Option<u64>, route: Duration| -> u64 {
        if spec.respect_origin && (cc.must_revalidate || cc.no_cache) {
            0
        } else if spec.respect_origin
            && let Some(s) = origin
        {
            s * 1000
        } else {
            route.as_millis() as u64
        }
    };
    Ok(Freshness {
        stored_at_ms,
        fresh_ms,
        swr_ms: window(cc.stale_while_revalidate, spec.stale_while_revalidate),
        sie_ms: window(cc.stale_if_error, spec.stale_if_error),
    })
}

/// Whether an `If-None-Match` value matches an entity tag (weak comparison, RFC 9110 §13.1.2).
pub fn etag_matches(if_none_match: &HeaderValue, etag: &HeaderValue) -> bool {
    let Ok(list) = if_none_match.to_str() else {
        return false;
    };
    let strip = |t: &str| t.trim().trim_start_matches("W/").to_owned();
    let Ok(e) = etag.to_str() else { return false };
    let e = strip(e);
    list.split(',').any(|t| t.trim() == "*" || strip(t) == e)
}

/// Whether a response last modified at `last_modified` is unchanged since `if_modified_since`.
pub fn not_modified_since(if_modified_since: &HeaderValue, last_modified: &HeaderValue) -> bool {
    match (
        http_date(Some(if_modified_since)),
        http_date(Some(last_modified)),
    ) {
        (Some(since), Some(lm)) => lm <= since,
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::QueryKey;

    fn spec(ttl: u64) -> RouteCacheSpec {
        RouteCacheSpec {
            ttl: Duration::from_secs(ttl),
            stale_while_revalidate: Duration::from_secs(5),
            stale_if_error: Duration::from_secs(60),
            vary: vec![],
            query: QueryKey::All,
            respect_origin: true,
            statuses: vec![200, 404],
            allow_set_cookie: false,
        }
    }

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(
                HeaderName::from_bytes(k.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        h
    }

    fn run(
        spec: &RouteCacheSpec,
        req: RequestFacts,
        pairs: &[(&str, &str)],
    ) -> Result<Freshness, NotStored> {
        decide(spec, req, StatusCode::OK, &headers(pairs), 1_000_000)
    }

    #[test]
    fn origin_freshness_wins_over_ttl() {
        let s = spec(60);
        assert_eq!(run(&s, Default::default(), &[]).unwrap().fresh_ms, 60_000);
        assert_eq!(
            run(&s, Default::default(), &[("cache-control", "max-age=5")])
                .unwrap()
                .fresh_ms,
            5_000
        );
        assert_eq!(
            run(
                &s,
                Default::default(),
                &[("cache-control", "max-age=5, s-maxage=7")]
            )
            .unwrap()
            .fresh_ms,
            7_000
        );
        let f = run(
            &s,
            Default::default(),
            &[("cache-control", "max-age=10"), ("age", "4")],
        )
        .unwrap();
        assert_eq!(f.stored_at_ms, 1_000_000 - 4_000);
        let f = run(
            &s,
            Default::default(),
            &[
                ("date", "Thu, 01 Jan 2026 00:00:00 GMT"),
                ("expires", "Thu, 01 Jan 2026 00:00:30 GMT"),
            ],
        )
        .unwrap();
        assert_eq!(f.fresh_ms, 30_000);
        assert_eq!(
            run(&s, Default::default(), &[("expires", "garbage")]),
            Err(NotStored::NotFresh)
        );
        let mut forced = spec(60);
        forced.respect_origin = false;
        assert_eq!(
            run(
                &forced,
                Default::default(),
                &[("cache-control", "private, max-age=1")]
            )
            .unwrap()
            .fresh_ms,
            60_000
        );
    }

    #[test]
    fn what_is_never_stored() {
        let s = spec(60);
        for cc in ["no-store", "private", "private, max-age=60"] {
            assert_eq!(
                run(&s, Default::default(), &[("cache-control", cc)]),
                Err(NotStored::NoStore),
                "{cc}"
            );
        }
        assert_eq!(
            run(&s, Default::default(), &[("set-cookie", "a=b")]),
            Err(NotStored::SetCookie)
        );
        let mut cookies = spec(60);
        cookies.allow_set_cookie = true;
        assert!(run(&cookies, Default::default(), &[("set-cookie", "a=b")]).is_ok());
        let auth = RequestFacts {
            authorization: true,
            no_store: false,
        };
        assert_eq!(run(&s, auth, &[]), Err(NotStored::Authorization));
        assert!(run(&s, auth, &[("cache-control", "public")]).is_ok());
        assert!(run(&s, auth, &[("cache-control", "s-maxage=9")]).is_ok());
        assert_eq!(
            decide(
                &s,
                Default::default(),
                StatusCode::CREATED,
                &HeaderMap::new(),
                0
            ),
            Err(NotStored::Status)
        );
        assert_eq!(
            run(&spec(0), Default::default(), &[]),
            Err(NotStored::NotFresh)
        );
        assert!(
            run(
                &spec(0),
                Default::default(),
                &[("cache-control", "max-age=3")]
            )
            .is_ok()
        );
        let f = run(
            &spec(0),
            Default::default(),
            &[("cache-control", "no-cache"), ("etag", "\"x\"")],
        )
        .unwrap();
        assert_eq!((f.fresh_ms, f.swr_ms, f.sie_ms), (0, 0, 0));
    }

    #[test]
    fn vary_rules() {
        assert!(vary_names(&headers(&[("vary", "*")]), &[]).is_err());
        let huge = (0..40)
            .map(|i| format!("x-h{i}"))
            .collect::<Vec<_>>()
            .join(", ");
        assert!(vary_names(&headers(&[("vary", &huge)]), &[]).is_err());
        let n = vary_names(
            &headers(&[("vary", "Accept-Encoding, accept-language")]),
            &[header::ACCEPT_LANGUAGE],
        )
        .unwrap();
        assert_eq!(n, vec![header::ACCEPT_LANGUAGE, header::ACCEPT_ENCODING]);
    }

    #[test]
    fn request_directives_and_validators() {
        let d = RequestDirectives::parse(&headers(&[("cache-control", "max-age=0")]));
        assert!(d.no_cache && !d.only_if_cached);
        assert!(RequestDirectives::parse(&headers(&[("pragma", "no-cache")])).no_cache);
        assert!(
            RequestDirectives::parse(&headers(&[("cache-control", "only-if-cached")]))
                .only_if_cached
        );
        let etag = HeaderValue::from_static("\"v1\"");
        assert!(etag_matches(
            &HeaderValue::from_static("W/\"v1\", \"v2\""),
            &etag
        ));
        assert!(etag_matches(&HeaderValue::from_static("*"), &etag));
        assert!(!etag_matches(&HeaderValue::from_static("\"v2\""), &etag));
        let lm = HeaderValue::from_static("Thu, 01 Jan 2026 00:00:00 GMT");
        assert!(not_modified_since(
            &HeaderValue::from_static("Thu, 01 Jan 2026 00:00:00 GMT"),
            &lm
        ));
        assert!(!not_modified_since(
            &HeaderValue::from_static("Wed, 31 Dec 2025 00:00:00 GMT"),
            &lm
        ));
    }
}
