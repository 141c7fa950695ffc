//! The request pipeline: one function that reads as the story of a request.
//!
//! check the request → route → client identity → rate limit → cache lookup → forward to a
//! replica (balancer and retries: [`crate::upstream::Upstream::forward`]) → cache store →
//! respond. Each step calls into its own module; each early return is an answer Palisade makes
//! itself ([`ProxyError`]) or one the cache makes.

mod error;
pub mod headers;
mod refresh;

pub use error::ProxyError;

use crate::body::{AccessRecord, ClientBody, RequestBody, ResponseBody};
use crate::cache::{CacheKey, CacheRequest, CacheResult, Finish, Lookup};
use crate::metrics::NO_ROUTE;
use crate::ratelimit::gcra::Decision;
use crate::ratelimit::{OnError, Policy, identity};
use crate::router::{RouteMatch, normalize_host};
use crate::server::ConnInfo;
use crate::state::{Shared, Snapshot};
use http::{HeaderValue, Request, Response, Version, header};
use std::sync::Arc;
use std::time::{Duration, Instant};

const BOTH_LENGTHS: &str = "both Content-Length and Transfer-Encoding are present; send one";

/// Handles one client request from head to response head; the body streams afterwards.
pub async fn handle(
    shared: &Shared,
    conn: &ConnInfo,
    req: Request<ClientBody>,
) -> Response<ResponseBody> {
    let started = Instant::now();
    let snap = shared.snapshot.load_full();
    let request_id = match req.headers().get(&headers::X_REQUEST_ID) {
        Some(v) if valid_request_id(v) => v.clone(),
        _ => shared.next_request_id(),
    };
    let method = req.method().clone();
    let uri = snap.config.log.access_log.then(|| req.uri().clone());
    let via = if req.version() == Version::HTTP_2 {
        headers::VIA_H2
    } else {
        headers::VIA_H1
    };

    let Answer {
        mut resp,
        route,
        replica,
        cache,
    } = match forward(shared, &snap, conn, req, &request_id, &via).await {
        Ok(answer) => answer,
        Err((e, route)) => {
            if e.status().is_server_error() {
                tracing::warn!(request_id = request_id.to_str().unwrap_or("-"), error = %e, "request failed");
            }
            Answer {
                resp: e.into_response(&request_id),
                route,
                replica: None,
                cache: None,
            }
        }
    };

    let h = resp.headers_mut();
    h.insert(&headers::X_REQUEST_ID, request_id.clone());
    h.append(header::VIA, via);
    let status = resp.status();
    let cache = cache.map_or(NO_ROUTE, |r| r.as_str());
    let counters = match route {
        Some(i) => {
            snap.routes[i]
                .duration
                .observe(started.elapsed().as_secs_f64());
            &snap.routes[i].requests
        }
        None => &shared.metrics.unrouted_requests,
    };
    counters.inc(&method, status);
    let body = resp.body_mut();
    body.track(conn.activity.clone());
    if let Some(uri) = uri {
        body.log_on_end(Box::new(AccessRecord {
            started,
            client: conn.peer,
            method,
            uri,
            route: counters.route().clone(),
            replica: replica.unwrap_or_else(|| Arc::from(NO_ROUTE)),
            status: status.as_u16(),
            request_id,
            cache,
        }));
    }
    resp
}

/// Answers a request head that could not become a request (malformed, or larger than
/// `max_header_bytes`): counted as an unrouted request, method "OTHER".
pub fn reject(shared: &Shared, error: ProxyError) -> Response<ResponseBody> {
    let request_id = shared.next_request_id();
    tracing::debug!(request_id = request_id.to_str().unwrap_or("-"), error = %error, "request head refused");
    let mut resp = error.into_response(&request_id);
    let h = resp.headers_mut();
    h.insert(&headers::X_REQUEST_ID, request_id);
    h.append(header::VIA, headers::VIA_H1);
    let other = http::Method::from_bytes(b"OTHER").unwrap_or_default();
    shared.metrics.unrouted_requests.inc(&other, resp.status());
    resp
}

/// What [`forward`] answers with, and for the metrics and the access log where it came from.
struct Answer {
    resp: Response<ResponseBody>,
    route: Option<usize>,
    replica: Option<Arc<str>>,
    cache: Option<CacheResult>,
}

async fn forward(
    shared: &Shared,
    snap: &Snapshot,
    conn: &ConnInfo,
    req: Request<ClientBody>,
    request_id: &HeaderValue,
    via: &HeaderValue,
) -> Result<Answer, (ProxyError, Option<usize>)> {
    let server = &snap.config.server;

    // 1. The request as parsed: framing, size and path checks.
    check_request(&req, server.max_header_bytes, server.max_request_body).map_err(|e| (e, None))?;

    // 2. Route.
    let host = request_host(&req);
    let host = normalize_host(&host);
    let route = match snap.router.find(&host, req.uri().path(), req.method()) {
        RouteMatch::Found(i) => i,
        RouteMatch::MethodNotAllowed(allowed) => {
            let allowed = allowed
                .iter()
                .map(|m| m.as_str())
                .collect::<Vec<_>>()
                .join(", ");
            return Err((
                ProxyError::MethodNotAllowed {
                    method: req.method().clone(),
                    allowed,
                },
                None,
            ));
        }
        RouteMatch::NotFound => {
            return Err((
                ProxyError::NoRoute {
                    method: req.method().clone(),
                    host: host.into_owned(),
                    path: req.uri().path().to_owned(),
                },
                None,
            ));
        }
    };
    let upstream = &snap.upstreams[snap.routes[route].upstream];

    // 3. Client identity and rate limit.
    let limit_headers = match &snap.routes[route].rate_limit {
        None => None,
        Some(policy) => rate_limit(shared, snap, conn, &req, route, policy)
            .await
            .map_err(|e| (e, Some(route)))?,
    };

    // 4. Cache lookup: hits, stale entries and conditional requests are answered here.
    let mut pending = None;
    if let Some(policy) = &snap.routes[route].cache {
        let lookup = CacheRequest {
            method: req.method(),
            headers: req.headers(),
            host: &host,
            path: req.uri().path(),
            query: req.uri().query(),
        };
        match shared
            .cache
            .lookup(
                policy,
                snap.cache_redis.as_ref(),
                lookup,
                upstream.spec.timeout,
            )
            .await
        {
            Ok(Lookup::Answer {
                response,
                result,
                refresh,
            }) => {
                let mut resp = *response;
                policy.count(result);
                if let Some(r) = refresh {
                    refresh::spawn(shared, snap, conn, &req, upstream.clone(), r);
                }
                add_limit_headers(resp.headers_mut(), limit_headers);
                return Ok(Answer {
                    resp,
                    route: Some(route),
                    replica: None,
                    cache: Some(result),
                });
            }
            Ok(Lookup::Forward(p)) => pending = Some(p),
            Err(e) => return Err((ProxyError::from(e), Some(route))),
        }
    }

    // 5. Forward to a replica picked by the balancer among the available ones (on failure,
    //    retried on another one when the method and the retry budget allow), streaming the body.
    //    When none can answer, a stale entry within stale_if_error answers instead.
    let client_ip = identity::client_ip(conn.peer.ip(), req.headers(), &server.trusted_proxies);
    let affinity = upstream.affinity(client_ip, req.headers());
    let trusted = headers::is_trusted(conn.peer.ip(), &server.trusted_proxies);
    let host_value = request_host(&req).into_owned();
    let (mut parts, body) = req.into_parts();
    headers::remove_hop_by_hop(&mut parts.headers);
    parts.headers.remove(header::EXPECT);
    if (parts.uri.authority().is_some() || !parts.headers.contains_key(header::HOST))
        && let Ok(v) = HeaderValue::from_str(&host_value)
    {
        parts.headers.insert(header::HOST, v);
    }
    headers::set_forwarding(
        &mut parts.headers,
        &conn.forwarded,
        trusted,
        &host_value,
        conn.proto,
        via.clone(),
    );
    parts
        .headers
        .insert(&headers::X_REQUEST_ID, request_id.clone());
    parts.version = Version::HTTP_11;
    if let Some(p) = &pending {
        p.prepare_upstream(&mut parts.headers);
    }
    let body = if body_is_empty(&parts.headers, &body) {
        RequestBody::empty()
    } else if let Some(len) = upstream.keeps_body(&parts.headers) {
        RequestBody::read_kept(body, len, upstream.spec.timeout)
            .await
            .map_err(|e| (ProxyError::from(e), Some(route)))?
    } else {
        RequestBody::new(body, server.max_request_body)
    };
    let (upstream_resp, in_flight) = match upstream
        .forward(Request::from_parts(parts, body), affinity)
        .await
    {
        Ok(answer) => answer,
        Err(e) => {
            if let Some(stale) = pending.as_ref().and_then(|p| p.on_error(None)) {
                return Ok(stale_answer(snap, route, stale, limit_headers));
            }
            return Err((ProxyError::from(e), Some(route)));
        }
    };
    let replica = in_flight.replica().clone();
    let (mut parts, body) = upstream_resp.into_parts();
    headers::remove_hop_by_hop(&mut parts.headers);

    // 6. Cache store: decide on the response head; the body is copied as it streams.
    let mut capture = None;
    let mut cache_result = None;
    if let Some(p) = pending {
        let finish = p
            .finish(&mut parts, |location| {
                location_key(snap, &host_value, location)
            })
            .await;
        let result = match finish {
            Finish::Pass(r) => r,
            Finish::Store(r, c) => {
                capture = Some(c);
                r
            }
            Finish::Replace(response, r) => {
                let mut resp = *response;
                count_cache(snap, route, r);
                add_limit_headers(resp.headers_mut(), limit_headers);
                return Ok(Answer {
                    resp,
                    route: Some(route),
                    replica: Some(replica.url.clone()),
                    cache: Some(r),
                });
            }
        };
        count_cache(snap, route, result);
        cache_result = Some(result);
    }

    // 7. Respond.
    add_limit_headers(&mut parts.headers, limit_headers);
    let mut body = ResponseBody::upstream(body, upstream.spec.timeout, in_flight);
    if let Some(c) = capture {
        body.capture(c);
    }
    Ok(Answer {
        resp: Response::from_parts(parts, body),
        route: Some(route),
        replica: Some(replica.url.clone()),
        cache: cache_result,
    })
}

fn add_limit_headers(h: &mut http::HeaderMap, limit: Option<(HeaderValue, HeaderValue)>) {
    if let Some((policy, state)) = limit {
        h.insert(headers::RATELIMIT_POLICY.clone(), policy);
        h.insert(headers::RATELIMIT.clone(), state);
    }
}

fn count_cache(snap: &Snapshot, route: usize, result: CacheResult) {
    if let Some(p) = &snap.routes[route].cache {
        p.count(result);
    }
}

/// A stale entry served instead of an upstream failure (stale-if-error).
fn stale_answer(
    snap: &Snapshot,
    route: usize,
    mut response: Response<ResponseBody>,
    limit: Option<(HeaderValue, HeaderValue)>,
) -> Answer {
    count_cache(snap, route, CacheResult::Stale);
    add_limit_headers(response.headers_mut(), limit);
    Answer {
        resp: response,
        route: Some(route),
        replica: None,
        cache: Some(CacheResult::Stale),
    }
}

/// The cache key a Location or Content-Location names, when it is on the request's own host
/// and a cached route.
fn location_key(snap: &Snapshot, host: &str, location: &str) -> Option<CacheKey> {
    let uri: http::Uri = location.parse().ok()?;
    let host = normalize_host(host);
    if let Some(a) = uri.authority()
        && normalize_host(a.as_str()) != host
    {
        return None;
    }
    let path = uri.path();
    if !path.starts_with('/') {
        return None;
    }
    match snap.router.find(&host, path, &http::Method::GET) {
        RouteMatch::Found(i) => snap.routes[i]
            .cache
            .as_ref()
            .map(|p| p.key(&host, path, uri.query())),
        _ => None,
    }
}

/// Decides the rate limit of a request; on success, the `RateLimit-Policy` and `RateLimit`
/// values for the response (unless the policy turns them off or no decision could be made).
async fn rate_limit(
    shared: &Shared,
    snap: &Snapshot,
    conn: &ConnInfo,
    req: &Request<ClientBody>,
    route: usize,
    policy: &Policy,
) -> Result<Option<(HeaderValue, HeaderValue)>, ProxyError> {
    let trusted = &snap.config.server.trusted_proxies;
    let client = identity::client_ip(conn.peer.ip(), req.headers(), trusted);
    let key = shared
        .limiter
        .key(policy, client, req.headers(), req.uri())
        .map_err(ProxyError::MissingKey)?;
    let decision = match &snap.limit_redis {
        None => Some(shared.limiter.decide_local(policy, &key)),
        Some(redis) => match shared.limiter.decide_redis(redis, policy, &key).await {
            Ok(d) => Some(d),
            Err(e) => {
                shared
                    .metrics
                    .redis_errors
                    .with_label_values(&["ratelimit"])
                    .inc();
                let on_error = snap
                    .config
                    .rate_limit
                    .redis
                    .as_ref()
                    .map_or(OnError::Allow, |r| r.on_error);
                shared.warn_throttled(|| tracing::warn!(error = %e, on_error = on_error.as_str(), "rate-limit Redis failed"));
                match on_error {
                    OnError::Allow => None,
                    OnError::Local => Some(shared.limiter.decide_local(policy, &key)),
                    OnError::Deny => Some(Decision {
                        allowed: false,
                        remaining: 0,
                        reset_after: Duration::from_secs(1),
                        retry_after: Duration::from_secs(1),
                    }),
                }
            }
        },
    };
    let r = &snap.routes[route];
    let Some(d) = decision else {
        r.limit_decisions[0].inc();
        return Ok(None);
    };
    if !d.allowed {
        r.limit_decisions[1].inc();
        return Err(ProxyError::RateLimited {
            retry_after: d.retry_after,
            policy: policy.policy_header.clone(),
            state: policy.ratelimit_header(&d),
        });
    }
    r.limit_decisions[0].inc();
    Ok(policy
        .spec
        .headers
        .then(|| (policy.policy_header.clone(), policy.ratelimit_header(&d))))
}

fn body_is_empty(h: &http::HeaderMap, body: &ClientBody) -> bool {
    use http_body::Body;
    body.is_end_stream()
        || (h.get(header::CONTENT_LENGTH).is_some_and(|v| v == "0")
            && !h.contains_key(header::TRANSFER_ENCODING))
}

/// The Host the client asked for: the Host header, else the URI's authority (HTTP/2).
///
/// The request target's authority comes first: an absolute-form target's (RFC 9112 §3.2.2:
/// the Host header is then ignored) and HTTP/2's `:authority`.
pub(super) fn request_host<B>(req: &Request<B>) -> std::borrow::Cow<'_, str> {
    if let Some(a) = req.uri().authority() {
        return std::borrow::Cow::Borrowed(a.as_str());
    }
    std::borrow::Cow::Borrowed(
        req.headers()
            .get(header::HOST)
            .and_then(|v| v.to_str().ok())
            .unwrap_or(""),
    )
}

/// Whether a client's `X-Request-Id` is kept: visible ASCII, 1 to 128 bytes.
pub fn valid_request_id(v: &HeaderValue) -> bool {
    let b = v.as_bytes();
    !b.is_empty() && b.len() <= 128 && b.iter().all(|c| c.is_ascii_graphic())
}

/// Refuses requests whose framing is ambiguous, whose head or declared body is too large, or
/// whose path could mean something else to the upstream than to the router.
fn check_request<B>(
    req: &Request<B>,
    max_header_bytes: usize,
    max_body: u64,
) -> Result<(), ProxyError> {
    let h = req.headers();
    if req.version() <= Version::HTTP_11 {
        if h.contains_key(header::TRANSFER_ENCODING) && h.contains_key(header::CONTENT_LENGTH) {
            return Err(ProxyError::BadRequest(BOTH_LENGTHS.into()));
        }
        if h.get_all(header::HOST).iter().count() > 1 {
            return Err(ProxyError::BadRequest("more than one Host header".into()));
        }
        if req.version() == Version::HTTP_11 && !h.contains_key(header::HOST) {
            return Err(ProxyError::BadRequest(
                "HTTP/1.1 request without a Host header".into(),
            ));
        }
    }
    let head: usize = req.uri().path_and_query().map_or(1, |p| p.as_str().len())
        + h.iter()
            .map(|(k, v)| k.as_str().len() + v.len() + 4)
            .sum::<usize>();
    if head > max_header_bytes {
        return Err(ProxyError::HeadersTooLarge {
            limit: max_header_bytes,
        });
    }
    if let Some(len) = h.get(header::CONTENT_LENGTH) {
        let len: u64 = len
            .to_str()
            .ok()
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| ProxyError::BadRequest("invalid Content-Length".into()))?;
        if len > max_body {
            return Err(ProxyError::BodyTooLarge { limit: max_body });
        }
    }
    check_path(req.uri())
}

/// Refuses paths that could mean something else upstream than to the router: no leading `/`,
/// backslashes, dot segments (also percent-encoded), encoded NUL, malformed escapes.
pub fn check_path(uri: &http::Uri) -> Result<(), ProxyError> {
    let path = uri.path();
    if !path.starts_with('/') && path != "*" {
        return Err(ProxyError::BadRequest(
            "the request path must start with /".into(),
        ));
    }
    let bytes = path.as_bytes();
    // Most paths hold none of the three bytes that can make a path mean something else.
    if memchr::memchr3(b'.', b'%', b'\\', bytes).is_none() {
        return Ok(());
    }
    if bytes.contains(&b'\\') {
        return Err(ProxyError::BadRequest(
            "backslash in the request path".into(),
        ));
    }
    // Decode only what could change the path's meaning upstream: dots, slashes and NUL.
    let decoded = if bytes.contains(&b'%') {
        std::borrow::Cow::Owned(decode_specials(bytes)?)
    } else {
        std::borrow::Cow::Borrowed(bytes)
    };
    for seg in decoded.split(|&b| b == b'/' || b == b'\\') {
        if seg == b"." || seg == b".." {
            return Err(ProxyError::BadRequest(
                "dot segments (. or ..) in the request path".into(),
            ));
        }
    }
    Ok(())
}

/// `bytes` with `%2e`, `%2f` and `%5c` decoded; fails on an encoded NUL or a malformed escape.
fn decode_specials(bytes: &[u8]) -> Result<Vec<u8>, ProxyError> {
    let mut decoded = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let v = bytes
                .get(i + 1..i + 3)
                .and_then(|h| std::str::from_utf8(h).ok())
                .and_then(|s| u8::from_str_radix(s, 16).ok());
            match v {
                Some(0) => {
                    return Err(ProxyError::BadRequest(
                        "encoded NUL in the request path".into(),
                    ));
                }
                Some(b'.') | Some(b'/') | Some(b'\\') => {
                    decoded.push(v.unwrap_or(b'.'));
                    i += 3;
                    continue;
                }
                Some(_) => {}
                None => {
                    return Err(ProxyError::BadRequest(
                        "malformed percent-encoding in the request path".into(),
                    ));
                }
            }
        }
        decoded.push(bytes[i]);
        i += 1;
    }
    Ok(decoded)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn path(p: &str) -> Result<(), ProxyError> {
        check_path(&p.parse().unwrap())
    }

    #[test]
    fn path_tricks_are_refused() {
        assert!(path("/products/1").is_ok());
        assert!(path("/a%20b").is_ok());
        assert!(path("/products/../admin").is_err());
        assert!(path("/products/%2e%2e/admin").is_err());
        assert!(path("/products/%2E./admin").is_err());
        assert!(path("/products/.%2fadmin").is_err());
        assert!(path("/products/..x").is_ok());
        assert!(path("/products%2f..%2fadmin").is_err());
        assert!(path("/x%00").is_err());
        assert!(path("/x%zz").is_err());
        assert!(path("/x/.").is_err());
    }
}
