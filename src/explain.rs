//! `palisade explain`: what the proxy would do with one request, without sending it.
//!
//! Routes, cache rules, rate limits and balancers each make sense alone, but which of them a
//! given request meets, and why, is hard to see from the file. `explain` loads the config with
//! the same [`crate::config::load`] as `run` and asks the proxy's own pieces: the compiled
//! [`Router`], [`CachePolicy::key`], [`RateLimiter::key`] and [`identity::client_ip`], a real
//! [`Upstream`] (its balancer and consistent-hash ring) and the forwarding-header rules. Only the
//! reasons a route did not match are worked out here, for the message. Nothing is sent: no
//! listener is bound, no replica or Redis is connected, and no health state exists, so every
//! replica counts as healthy.

use crate::cache::{CachePolicy, key::UNKEYED_OVERRIDES, policy::RequestDirectives, redis_tier};
use crate::config::{Balance, Config, HashOn, HostPattern, QueryKey, RouteSpec};
use crate::metrics::Metrics;
use crate::proxy::{check_path, headers, valid_request_id};
use crate::ratelimit::identity::{self, KeyPart};
use crate::ratelimit::{Missing, Policy, RateLimiter};
use crate::redis::RedisTarget;
use crate::router::{RouteMatch, Router, normalize_host};
use crate::upstream::{Outcome, Upstream, retry};
use http::{HeaderMap, HeaderName, HeaderValue, Method, header};
use std::fmt::Write as _;
use std::net::IpAddr;
use std::time::Duration;

/// Why a command-line argument of `explain` is not usable.
#[derive(Debug, thiserror::Error)]
pub enum ExplainError {
    /// The method is not an HTTP token.
    #[error("{0:?} is not an HTTP method (write it as sent, e.g. GET)")]
    Method(String),
    /// A lower-case spelling of a standard method: methods are case-sensitive.
    #[error("{0:?}: methods are case-sensitive; did you mean {1}?")]
    MethodCase(String, String),
    /// The URL is neither absolute nor a path.
    #[error("{0:?} is not a URL: write http://HOST/PATH, or /PATH with -H 'Host: NAME'")]
    Url(String),
    /// `-H` without a colon, or with an invalid name or value.
    #[error("{0:?} is not a header: write -H 'Name: value'")]
    Header(String),
    /// A bare path and no Host header.
    #[error("{0:?} has no host: give an absolute URL or -H 'Host: NAME'")]
    NoHost(String),
}

/// The URL argument: an absolute `http://host/path?query`, or a bare `/path?query`.
#[derive(Debug, Clone)]
pub struct Target {
    /// As written.
    pub text: String,
    /// The authority of an absolute URL.
    pub authority: Option<String>,
    /// Path (starts with `/`) and query.
    pub uri: http::Uri,
    /// `https` for an `https://` URL (a request on a TLS listener), else `http`.
    pub proto: &'static str,
}

/// Parses the method argument.
pub fn parse_method(s: &str) -> Result<Method, ExplainError> {
    let m = Method::from_bytes(s.as_bytes()).map_err(|_| ExplainError::Method(s.into()))?;
    let upper = s.to_ascii_uppercase();
    let standard = [
        "GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "TRACE", "CONNECT",
    ];
    if upper != s && standard.contains(&upper.as_str()) {
        return Err(ExplainError::MethodCase(s.into(), upper));
    }
    Ok(m)
}

/// Parses the URL argument.
pub fn parse_target(s: &str) -> Result<Target, ExplainError> {
    let bad = || ExplainError::Url(s.into());
    if s.starts_with('/') {
        let pq: http::uri::PathAndQuery = s.parse().map_err(|_| bad())?;
        return Ok(Target {
            text: s.into(),
            authority: None,
            uri: http::Uri::from(pq),
            proto: "http",
        });
    }
    let uri: http::Uri = s.parse().map_err(|_| bad())?;
    let (Some(scheme), Some(authority)) = (uri.scheme_str(), uri.authority()) else {
        return Err(bad());
    };
    if !matches!(scheme, "http" | "https") || authority.host().is_empty() {
        return Err(bad());
    }
    let pq = uri.path_and_query().map_or("/", |p| p.as_str()).to_owned();
    let pq = if pq.starts_with('/') {
        pq
    } else {
        format!("/{pq}")
    };
    Ok(Target {
        text: s.into(),
        authority: Some(authority.as_str().into()),
        uri: pq.parse().map_err(|_| bad())?,
        proto: if scheme == "https" { "https" } else { "http" },
    })
}

/// Parses one `-H 'Name: value'`.
pub fn parse_header(s: &str) -> Result<(HeaderName, HeaderValue), ExplainError> {
    let bad = || ExplainError::Header(s.into());
    let (name, value) = s.split_once(':').ok_or_else(bad)?;
    let name = HeaderName::from_bytes(name.trim().as_bytes()).map_err(|_| bad())?;
    let value = HeaderValue::from_str(value.trim()).map_err(|_| bad())?;
    Ok((name, value))
}

/// One request to explain.
#[derive(Debug, Clone)]
pub struct Request {
    /// Method.
    pub method: Method,
    /// Path and query.
    pub uri: http::Uri,
    /// Headers as the client would send them (Host included).
    pub headers: HeaderMap,
    /// The socket peer.
    pub peer: IpAddr,
    /// `http` or `https`: what X-Forwarded-Proto says.
    pub proto: &'static str,
}

impl Request {
    /// Assembles a request; the Host header is taken from the URL unless `-H Host:` gives one.
    pub fn new(
        method: Method,
        target: Target,
        given: Vec<(HeaderName, HeaderValue)>,
        peer: IpAddr,
    ) -> Result<Request, ExplainError> {
        let mut headers = HeaderMap::new();
        for (k, v) in given {
            headers.append(k, v);
        }
        if !headers.contains_key(header::HOST) {
            let authority = target
                .authority
                .as_deref()
                .ok_or_else(|| ExplainError::NoHost(target.text.clone()))?;
            let v = HeaderValue::from_str(authority)
                .map_err(|_| ExplainError::Url(target.text.clone()))?;
            headers.insert(header::HOST, v);
        }
        Ok(Request {
            method,
            uri: target.uri,
            headers,
            peer,
            proto: target.proto,
        })
    }

    fn host_value(&self) -> &str {
        self.headers
            .get(header::HOST)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
    }
}

const LABEL: usize = 11;

struct Out(String);

impl Out {
    fn line(&mut self, label: &str, text: impl std::fmt::Display) {
        let _ = writeln!(self.0, "{label:<LABEL$} {text}");
    }
    fn more(&mut self, text: impl std::fmt::Display) {
        self.line("", text);
    }
    fn gap(&mut self) {
        self.0.push('\n');
    }
}

/// Explains what the proxy would do with `req` under `config`, as plain text.
pub fn explain(config: &Config, req: &Request) -> String {
    let mut out = Out(String::new());
    let host = normalize_host(req.host_value()).into_owned();
    let path = req.uri.path();
    out.line(
        "request",
        format!(
            "{} {}  (Host: {}, from {})",
            req.method,
            req.uri,
            req.host_value(),
            req.peer
        ),
    );
    if req.headers.get_all(header::HOST).iter().count() > 1 {
        out.line("answer", "400 Bad Request: more than one Host header");
        return out.0;
    }
    if let Err(e) = check_path(&req.uri) {
        out.line("answer", format!("400 Bad Request: {e}"));
        return out.0;
    }
    out.gap();

    let router = Router::new(&config.routes);
    let found = router.find(&host, path, &req.method);
    let route = match &found {
        RouteMatch::Found(i) => {
            let r = &config.routes[*i];
            out.line("route", format!("{}  ({})", r.name, describe_route(r)));
            Some(*i)
        }
        RouteMatch::MethodNotAllowed(allowed) => {
            let allowed: Vec<&str> = allowed.iter().map(Method::as_str).collect();
            out.line(
                "route",
                format!(
                    "none for {}: routes match {host}{path}, but not this method",
                    req.method
                ),
            );
            out.line(
                "answer",
                format!(
                    "405 Method Not Allowed, Allow: {} (no rate limit, cache or upstream)",
                    allowed.join(", ")
                ),
            );
            None
        }
        RouteMatch::NotFound => {
            out.line("route", format!("none matches {host}{path}"));
            out.line("answer", "404 Not Found (no rate limit, cache or upstream)");
            None
        }
    };
    near_misses(&mut out, &config.routes, route, &host, path, &req.method);
    let Some(route) = route else {
        return out.0;
    };
    let spec = &config.routes[route];
    let metrics = Metrics::new();
    let client = identity::client_ip(req.peer, &req.headers, &config.server.trusted_proxies);

    out.gap();
    explain_cache(&mut out, config, spec, req, &host, &metrics);
    out.gap();
    explain_rate_limit(&mut out, config, spec, req, client);
    out.gap();
    explain_upstream(&mut out, config, spec, req, client, &metrics);
    out.gap();
    explain_headers(&mut out, config, spec, req);
    out.0
}

fn methods_list(ms: &[Method]) -> String {
    ms.iter().map(Method::as_str).collect::<Vec<_>>().join(", ")
}

fn describe_route(r: &RouteSpec) -> String {
    let host = r
        .host
        .as_ref()
        .map_or("any host".to_owned(), |h| format!("host {h}"));
    let methods = r.methods.as_ref().map_or("any method".to_owned(), |m| {
        format!("methods {}", methods_list(m))
    });
    format!("{host}, prefix {}, {methods}", r.path_prefix)
}

fn host_matches(p: &Option<HostPattern>, host: &str) -> bool {
    match p {
        None => true,
        Some(HostPattern::Exact(h)) => h == host,
        Some(HostPattern::Wildcard(suffix)) => host.ends_with(suffix.as_str()),
    }
}

/// The order the router tries hosts in: exact, then `*.suffix` longest first, then any host.
fn host_rank(p: &Option<HostPattern>) -> (u8, usize) {
    match p {
        Some(HostPattern::Exact(_)) => (0, 0),
        Some(HostPattern::Wildcard(s)) => (1, usize::MAX - s.len()),
        None => (2, 0),
    }
}

/// Why the routes nearest to the request did not take it: those sharing its host or a prefix
/// of its path (all of them when nothing matched), most similar first, at most a handful.
fn near_misses(
    out: &mut Out,
    routes: &[RouteSpec],
    chosen: Option<usize>,
    host: &str,
    path: &str,
    method: &Method,
) {
    let limit = if chosen.is_some() { 5 } else { 10 };
    let mut near: Vec<(usize, bool, bool, bool)> = routes
        .iter()
        .enumerate()
        .filter(|&(i, _)| Some(i) != chosen)
        .map(|(i, r)| {
            let host_ok = host_matches(&r.host, host);
            let prefix_ok = path.starts_with(r.path_prefix.as_str());
            let method_ok = r.methods.as_ref().is_none_or(|m| m.contains(method));
            (i, host_ok, prefix_ok, method_ok)
        })
        .filter(|&(_, h, p, _)| chosen.is_none() || h || p)
        .collect();
    near.sort_by_key(|&(i, h, p, m)| {
        let fails = [h, p, m].iter().filter(|ok| !**ok).count();
        (fails, !h, !p, usize::MAX - routes[i].path_prefix.len(), i)
    });
    let hidden = near.len().saturating_sub(limit);
    for (n, &(i, host_ok, prefix_ok, method_ok)) in near.iter().take(limit).enumerate() {
        let r = &routes[i];
        let mut why = Vec::new();
        if !host_ok {
            why.push(match &r.host {
                Some(HostPattern::Exact(h)) => format!("host {h} ≠ {host}"),
                Some(p) => format!("host {p} does not match {host}"),
                None => unreachable!("a route for any host matches every host"),
            });
        }
        if !prefix_ok {
            why.push(format!(
                "path prefix {} does not match {path}",
                r.path_prefix
            ));
        }
        if !method_ok {
            let ms = r.methods.as_deref().unwrap_or_default();
            why.push(format!("method {method} not in [{}]", methods_list(ms)));
        }
        if why.is_empty()
            && let Some(w) = chosen.map(|c| &routes[c])
        {
            let host_of = |r: &RouteSpec| {
                r.host
                    .as_ref()
                    .map_or("any host".to_owned(), |h| format!("host {h}"))
            };
            let longer = w.path_prefix.len() > r.path_prefix.len();
            why.push(match (host_rank(&w.host) < host_rank(&r.host), longer) {
                (false, _) => format!(
                    "prefix {} matches but {} is longer",
                    r.path_prefix, w.path_prefix
                ),
                (true, true) => format!(
                    "prefix {} matches but {} is longer (and on {})",
                    r.path_prefix,
                    w.path_prefix,
                    host_of(w)
                ),
                (true, false) => format!(
                    "prefix {} matches, but {} is tried before {}",
                    r.path_prefix,
                    host_of(w),
                    host_of(r)
                ),
            });
        }
        let label = if n == 0 { "not" } else { "" };
        out.line(label, format!("{}: {}", r.name, why.join("; ")));
    }
    if hidden > 0 {
        out.more(format!("({hidden} more routes do not match)"));
    }
}

fn dur(d: Duration) -> String {
    crate::config::values::Duration(d)
        .to_string()
        .replace(' ', "")
}

fn explain_cache(
    out: &mut Out,
    config: &Config,
    spec: &RouteSpec,
    req: &Request,
    host: &str,
    metrics: &Metrics,
) {
    let Some(c) = &spec.cache else {
        out.line("cache", "off on this route: every request goes upstream");
        return;
    };
    out.line(
        "cache",
        format!(
            "ttl {}, stale_while_revalidate {}, stale_if_error {}, respect_origin {}",
            dur(c.ttl),
            dur(c.stale_while_revalidate),
            dur(c.stale_if_error),
            c.respect_origin
        ),
    );
    let statuses: Vec<String> = c.statuses.iter().map(u16::to_string).collect();
    let query = match &c.query {
        QueryKey::All => "all parameters, sorted".to_owned(),
        QueryKey::None => "none".to_owned(),
        QueryKey::Ignore(l) => format!("all but {}, sorted", l.join(", ")),
        QueryKey::Allow(l) => format!("only {}, sorted", l.join(", ")),
    };
    let vary: Vec<&str> = c.vary.iter().map(HeaderName::as_str).collect();
    out.more(format!(
        "statuses {}; allow_set_cookie {}",
        statuses.join(" "),
        c.allow_set_cookie
    ));
    out.more(format!(
        "query: {query}; vary: {}",
        if vary.is_empty() {
            "the origin's Vary".to_owned()
        } else {
            format!("{} and the origin's Vary", vary.join(", "))
        }
    ));
    let policy = CachePolicy::new(&spec.name, c.clone(), metrics);
    let key = policy.key(host, req.uri.path(), req.uri.query());
    let cacheable = matches!(req.method, Method::GET | Method::HEAD);
    let mut facts = Vec::new();
    if !cacheable {
        facts.push(format!(
            "{}: not looked up (bypass); a 2xx or 3xx answer removes this URL from the cache",
            req.method
        ));
    } else {
        let d = RequestDirectives::parse(&req.headers);
        if req.method == Method::HEAD {
            facts.push("HEAD: answered from a stored GET; a HEAD response is not stored".into());
        } else {
            facts
                .push("GET: looked up; on a miss the response is stored if the rules allow".into());
        }
        if req.headers.contains_key(header::AUTHORIZATION) {
            facts.push(
                "Authorization: stored only if the response says public, s-maxage or must-revalidate"
                    .into(),
            );
        }
        if d.no_cache {
            facts.push("no-cache (or max-age=0, Pragma): forwarded to revalidate; a stored entry is not served as is".into());
        }
        if d.no_store {
            facts.push("no-store: the response is not stored".into());
        }
        if d.only_if_cached {
            facts.push(
                "only-if-cached: answered from the cache, or 504 when nothing usable is stored"
                    .into(),
            );
        }
    }
    for (n, f) in facts.iter().enumerate() {
        out.line(if n == 0 { "  request" } else { "" }, f);
    }
    out.line("  key", key.as_str());
    if config.cache.redis.is_some() {
        out.line("  redis key", redis_tier::redis_key(&key));
    }
    if cacheable && !c.vary.is_empty() {
        let values: Vec<String> = c
            .vary
            .iter()
            .map(|name| {
                let vs: Vec<&str> = req
                    .headers
                    .get_all(name)
                    .iter()
                    .filter_map(|v| v.to_str().ok())
                    .collect();
                if vs.is_empty() {
                    format!("{name} absent")
                } else {
                    format!("{name}: {:?}", vs.join(", "))
                }
            })
            .collect();
        out.line(
            "  variant",
            format!("{} (plus what the origin's Vary names)", values.join(", ")),
        );
    }
}

fn escape_key(key: &[u8]) -> String {
    key.iter()
        .flat_map(|&b| std::ascii::escape_default(b))
        .map(char::from)
        .collect()
}

fn period(d: Duration) -> String {
    match d.as_secs() {
        1 => "s".into(),
        60 => "min".into(),
        3600 => "h".into(),
        _ => dur(d),
    }
}

fn explain_rate_limit(
    out: &mut Out,
    config: &Config,
    spec: &RouteSpec,
    req: &Request,
    client: IpAddr,
) {
    let Some(i) = spec.rate_limit else {
        out.line("rate limit", "none on this route");
        return;
    };
    let policy = Policy::new(config.rate_limit_policies[i].clone());
    let p = &policy.spec;
    let per: Vec<String> = p.per.iter().map(KeyPart::to_string).collect();
    out.line(
        "rate limit",
        format!(
            "{}: {}/{}, burst {}, per {}{}; RateLimit headers {}",
            p.name,
            p.count,
            period(p.period),
            p.burst,
            per.join(" + "),
            match p.missing {
                _ if p.per.iter().all(|k| *k == KeyPart::ClientIp) => "",
                Missing::Deny => "; missing = deny (400)",
                Missing::ClientIp => "; missing = client_ip",
            },
            if p.headers { "on" } else { "off" }
        ),
    );
    out.line("  client", client_story(config, req, client));
    for part in &p.per {
        let mut scratch = Vec::new();
        let present = identity::append_part(part, client, &req.headers, &req.uri, &mut scratch);
        let text = match part {
            KeyPart::ClientIp => format!("client_ip = {client}"),
            _ if present => format!("{part} = {:?}", String::from_utf8_lossy(&scratch)),
            _ => match p.missing {
                Missing::Deny => format!("{part} absent: the request is refused"),
                Missing::ClientIp => {
                    format!("{part} absent: counted by client_ip = {client} instead")
                }
            },
        };
        out.line("  part", text);
    }
    let limiter = RateLimiter::new(1);
    match limiter.key(&policy, client, &req.headers, &req.uri) {
        Ok(key) => {
            match &config.rate_limit.redis {
                None => out.line("  key", escape_key(&key)),
                Some(_) => out.line("  key", escape_key(&policy.redis_key(&key))),
            }
            out.more("(an address is keyed by its raw octets, shown escaped)");
        }
        Err(message) => out.line("  answer", format!("400 Bad Request: {message}")),
    }
    let store = match &config.rate_limit.redis {
        Some(r) => format!(
            "Redis {}: global, every instance counts together; on_error = {}",
            match &r.target {
                RedisTarget::Single(url) => url.clone(),
                RedisTarget::Cluster(nodes) => format!("cluster {}", nodes.join(",")),
            },
            r.on_error.as_str()
        ),
        None => format!(
            "memory: this instance only, at most {} clients",
            config.rate_limit.max_keys
        ),
    };
    out.line("  store", store);
}

/// How the client address was found: the peer, or X-Forwarded-For / Forwarded from a trusted
/// proxy.
fn client_story(config: &Config, req: &Request, client: IpAddr) -> String {
    let nets = &config.server.trusted_proxies;
    let trusted_by = nets.iter().find(|n| headers::is_trusted(req.peer, &[**n]));
    let xff: Vec<&str> = req
        .headers
        .get_all("x-forwarded-for")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .collect();
    let forwarded = req.headers.contains_key(header::FORWARDED);
    match trusted_by {
        None if xff.is_empty() && !forwarded => {
            format!("{client}: the peer itself (no forwarding headers)")
        }
        None => format!(
            "{client}: the peer; it is not in trusted_proxies, so X-Forwarded-For / Forwarded are ignored"
        ),
        Some(net) if !xff.is_empty() => format!(
            "{client}: peer {} is a trusted proxy ({net}): X-Forwarded-For {:?}, right-most untrusted",
            req.peer,
            xff.join(", ")
        ),
        Some(net) if forwarded => format!(
            "{client}: peer {} is a trusted proxy ({net}): Forwarded for=, right-most untrusted",
            req.peer
        ),
        Some(net) => format!(
            "{client}: peer {} is a trusted proxy ({net}) but sent no X-Forwarded-For or Forwarded",
            req.peer
        ),
    }
}

fn explain_upstream(
    out: &mut Out,
    config: &Config,
    spec: &RouteSpec,
    req: &Request,
    client: IpAddr,
    metrics: &Metrics,
) {
    let u = &config.upstreams[spec.upstream];
    let upstream = Upstream::start(u, None, metrics);
    out.line(
        "upstream",
        format!(
            "{}: {} over {} replica{}",
            u.name,
            u.balance.as_str(),
            u.replicas.len(),
            if u.replicas.len() == 1 { "" } else { "s" }
        ),
    );
    for (n, r) in u.replicas.iter().enumerate() {
        out.line(
            if n == 0 { "  replicas" } else { "" },
            format!("{} {r}", n + 1),
        );
    }
    let position = |url: &str| u.replicas.iter().position(|r| r == url).unwrap_or(0) + 1;
    let affinity = upstream.affinity(client, &req.headers);
    let first = upstream
        .pick(affinity, &[])
        .map(|f| f.replica().url.to_string());
    let first = first.unwrap_or_default();
    let pick = match u.balance {
        Balance::RoundRobin => {
            let mut order = vec![position(&first)];
            for _ in 1..u.replicas.len() {
                if let Some(f) = upstream.pick(affinity, &[]) {
                    order.push(position(&f.replica().url));
                }
            }
            let order: Vec<String> = order.iter().map(usize::to_string).collect();
            format!(
                "{first} (the first request of a fresh process); rotation {}, then again",
                order.join(" → ")
            )
        }
        Balance::ConsistentHash => {
            let on = match &u.hash_on {
                HashOn::Header(name) => match req.headers.get(name) {
                    Some(v) => format!(
                        "header {name} = {:?}",
                        String::from_utf8_lossy(v.as_bytes())
                    ),
                    None => format!("header {name} absent, so the client address {client}"),
                },
                HashOn::ClientIp => format!("client address {client}"),
            };
            format!(
                "{first}: the ring point of {on} (hash {:016x})",
                affinity.unwrap_or(0)
            )
        }
        Balance::LeastRequests => format!(
            "{first} when idle: the fewest requests in flight wins, so it depends on live load"
        ),
        Balance::P2cEwma => format!(
            "{first} in this run: of two random replicas the lower latency EWMA × (in flight + 1) wins; idle, either one"
        ),
    };
    out.line("  pick", pick);
    out.more("all replicas assumed healthy; no live state in explain");
    out.line(
        "  timeouts",
        format!(
            "connect_timeout {}, timeout {} (response head, and between body chunks)",
            dur(u.connect_timeout),
            dur(u.timeout)
        ),
    );
    match &u.retry {
        None => out.line("  retry", "off: one attempt"),
        Some(r) => {
            out.line(
                "  retry",
                format!(
                    "up to {} more attempt{} on other replicas after {}; budget {}% + {}/s",
                    r.attempts,
                    if r.attempts == 1 { "" } else { "s" },
                    r.on.names().join(", "),
                    r.budget * 100.0,
                    r.min_per_second
                ),
            );
            let after_send = retry::method_allows(&req.method, Outcome::Error);
            out.more(if after_send {
                format!("{} is retried after any of them", req.method)
            } else {
                format!(
                    "{} is retried only after a connect failure (nothing was sent)",
                    req.method
                )
            });
            out.more(format!(
                "a body is retried only with a Content-Length up to {} bytes",
                r.max_body
            ));
        }
    }
    let mut extras = Vec::new();
    if let Some(h) = &u.health {
        extras.push(format!("GET {} every {}", h.path, dur(h.interval)));
    }
    if let Some(b) = &u.circuit_breaker {
        extras.push(format!(
            "circuit breaker after {} failures in a row or {}% of {}",
            b.consecutive_failures,
            b.failure_rate * 100.0,
            b.min_requests
        ));
    }
    if !extras.is_empty() {
        out.line("  health", extras.join("; "));
    }
}

fn explain_headers(out: &mut Out, config: &Config, spec: &RouteSpec, req: &Request) {
    let mut h = req.headers.clone();
    headers::remove_hop_by_hop(&mut h);
    h.remove(header::EXPECT);
    if spec.cache.is_some() {
        for name in &UNKEYED_OVERRIDES {
            h.remove(name);
        }
    }
    let stripped: Vec<&str> = req
        .headers
        .keys()
        .filter(|k| !h.contains_key(*k))
        .map(HeaderName::as_str)
        .collect();
    let trusted = headers::is_trusted(req.peer, &config.server.trusted_proxies);
    headers::set_forwarding(
        &mut h,
        &headers::Peer::new(req.peer),
        trusted,
        req.host_value(),
        req.proto,
        headers::VIA_H1,
    );
    let show = |name: &str| -> String {
        let vs: Vec<&str> = h
            .get_all(name)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .collect();
        vs.join(", ")
    };
    out.line(
        "headers",
        format!("X-Forwarded-For: {}", show("x-forwarded-for")),
    );
    out.more(format!(
        "X-Forwarded-Proto: {}; X-Forwarded-Host: {}",
        show("x-forwarded-proto"),
        show("x-forwarded-host")
    ));
    out.more(format!("Forwarded: {}", show("forwarded")));
    out.more("Via: 1.1 palisade (added to the request and the response)");
    out.more(match req.headers.get(&headers::X_REQUEST_ID) {
        Some(v) if valid_request_id(v) => format!(
            "X-Request-Id: {:?} kept, sent upstream and returned",
            String::from_utf8_lossy(v.as_bytes())
        ),
        _ => "X-Request-Id: generated (32 hex digits), sent upstream and returned".into(),
    });
    if !stripped.is_empty() {
        out.more(format!("removed: {}", stripped.join(", ")));
    }
}
