//! Configuration: the TOML file's types, its validation into runtime settings, and loading.
//!
//! One function, [`load`], reads and validates a file; `run`, `check`, reload and the tests all
//! call it. Validation collects every error it can find, each naming file, line, column and key.

mod error;
#[allow(
    dead_code,
    reason = "keys of later features are parsed now, so that typos in them are caught; their features read them"
)]
mod schema;
pub mod show;
mod validate;
pub mod values;

pub use error::{ConfigError, ConfigErrors};

use crate::ratelimit::{OnError, PolicySpec};
use crate::redis::RedisTarget;
use crate::upstream::{BreakerSpec, HealthSpec, RetrySpec};
use http::Method;
use ipnet::IpNet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// The config `palisade demo` runs, embedded in the binary.
pub const DEMO_CONFIG: &str = include_str!("../../config/demo.toml");

/// A validated config, compiled into the values the runtime needs.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    /// Where it was read from (for reloads and messages).
    pub file: PathBuf,
    /// `[server]`.
    pub server: ServerSettings,
    /// `[admin]`.
    pub admin: AdminSettings,
    /// `[log]`.
    pub log: LogSettings,
    /// `[reload]`.
    pub reload: ReloadSettings,
    /// `[upstreams.*]`, sorted by name.
    pub upstreams: Vec<UpstreamSpec>,
    /// `[[routes]]`, in file order.
    pub routes: Vec<RouteSpec>,
    /// `[rate_limit]`.
    pub rate_limit: RateLimitSettings,
    /// Every rate-limit policy: `[rate_limits.*]` first (sorted by name), then inline ones.
    pub rate_limit_policies: Vec<PolicySpec>,
    /// `[cache]`.
    pub cache: CacheSettings,
}

/// `[cache]`: where cached responses live and how large they may be.
#[derive(Debug, Clone, PartialEq)]
pub struct CacheSettings {
    /// Byte budget of the memory tier (bodies, headers and keys).
    pub memory: u64,
    /// Larger responses stream through unstored.
    pub max_object_size: u64,
    /// The shared tier, if configured.
    pub redis: Option<RedisSettings>,
}

/// Which query parameters are part of a cache key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum QueryKey {
    /// Every parameter, sorted.
    All,
    /// No parameter.
    None,
    /// Every parameter but these, sorted.
    Ignore(Vec<String>),
    /// Only these, sorted.
    Allow(Vec<String>),
}

/// A route's `cache = {...}`.
#[derive(Debug, Clone, PartialEq)]
pub struct RouteCacheSpec {
    /// Freshness for responses whose origin gives none (or for all, without `respect_origin`).
    pub ttl: Duration,
    /// How long past freshness a stale entry is served while it is refreshed in the background.
    pub stale_while_revalidate: Duration,
    /// How long past freshness a stale entry is served when the upstream fails.
    pub stale_if_error: Duration,
    /// Request headers that are always part of the key (besides the origin's `Vary`).
    pub vary: Vec<http::HeaderName>,
    /// Query parameters in the key.
    pub query: QueryKey,
    /// Whether the origin's Cache-Control and Expires win over `ttl`.
    pub respect_origin: bool,
    /// Response statuses that may be stored.
    pub statuses: Vec<u16>,
    /// Whether responses with Set-Cookie may be stored (the cookie is replayed to everyone).
    pub allow_set_cookie: bool,
}

/// `[rate_limit]`: where rate-limit state lives.
#[derive(Debug, Clone, PartialEq)]
pub struct RateLimitSettings {
    /// With Redis, every policy is global: decided in Redis for all instances.
    pub redis: Option<RedisSettings>,
    /// Clients this instance's memory store holds at most.
    pub max_keys: usize,
}

/// A Redis connection's settings.
#[derive(Debug, Clone, PartialEq)]
pub struct RedisSettings {
    /// Server or cluster.
    pub target: RedisTarget,
    /// Time allowed per command.
    pub timeout: Duration,
    /// What a rate limit does when Redis cannot answer.
    pub on_error: OnError,
}

/// Public listener settings.
#[derive(Debug, Clone, PartialEq)]
pub struct ServerSettings {
    /// Plain HTTP listen addresses (HTTP/1.1 and h2c).
    pub listen: Vec<SocketAddr>,
    /// Peers whose X-Forwarded-For / Forwarded headers are believed.
    pub trusted_proxies: Vec<IpNet>,
    /// Time a client has to send a request's headers.
    pub header_read_timeout: Duration,
    /// A connection that moves no bytes for this long is closed.
    pub idle_timeout: Duration,
    /// Largest request head (request line and headers).
    pub max_header_bytes: usize,
    /// Largest request body, counted while streaming.
    pub max_request_body: u64,
    /// Open client connections at most; past it, new ones wait in the listen backlog.
    pub max_connections: usize,
    /// Runtime worker threads.
    pub workers: usize,
    /// How long shutdown waits for in-flight requests.
    pub drain_timeout: Duration,
    /// `[server.tls]`: TLS listeners and their certificates.
    pub tls: Option<crate::tls::ServerTls>,
}

/// Admin listener settings.
#[derive(Debug, Clone, PartialEq)]
pub struct AdminSettings {
    /// Where /metrics, /healthz, /readyz and /admin/* are served.
    pub listen: SocketAddr,
    /// Bearer token required on /admin/* (and on everything when not loopback).
    pub token: Option<String>,
}

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    /// One JSON object per line.
    Json,
    /// Human-readable lines.
    Pretty,
}

/// Logging settings.
#[derive(Debug, Clone, PartialEq)]
pub struct LogSettings {
    /// Output format.
    pub format: LogFormat,
    /// A tracing filter directive such as "info" or "palisade=debug".
    pub level: String,
    /// Whether one line is written per request.
    pub access_log: bool,
}

/// `[reload]`: when the config file is re-read besides SIGHUP and `POST /admin/reload`.
#[derive(Debug, Clone, PartialEq)]
pub struct ReloadSettings {
    /// Whether a change to the file on disk reloads it.
    pub watch: bool,
    /// Quiet time after the last change before the file is read, so that an editor's or a
    /// deploy tool's several writes make one reload.
    pub debounce: Duration,
}

/// How an upstream spreads requests over its replicas.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Balance {
    /// Each replica in turn.
    RoundRobin,
    /// The replica with the fewest requests in flight.
    LeastRequests,
    /// Of two random replicas, the one with the lower latency EWMA × (in flight + 1).
    P2cEwma,
    /// A hash ring with virtual nodes, keyed by [`UpstreamSpec::hash_on`].
    ConsistentHash,
}

impl Balance {
    /// The config spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Balance::RoundRobin => "round_robin",
            Balance::LeastRequests => "least_requests",
            Balance::P2cEwma => "p2c_ewma",
            Balance::ConsistentHash => "consistent_hash",
        }
    }
}

/// What `consistent_hash` keys a request by.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HashOn {
    /// The client's address (X-Forwarded-For believed only from trusted proxies).
    ClientIp,
    /// A request header's value; without it, the client's address.
    Header(http::HeaderName),
}

impl std::fmt::Display for HashOn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            HashOn::ClientIp => f.write_str("client_ip"),
            HashOn::Header(h) => write!(f, "header:{h}"),
        }
    }
}

/// One `[upstreams.NAME]`.
#[derive(Debug, Clone, PartialEq)]
pub struct UpstreamSpec {
    /// Its name in the file.
    pub name: String,
    /// Replica base URLs, normalized to `http://host:port` or `https://host:port`.
    pub replicas: Vec<String>,
    /// Balancing rule.
    pub balance: Balance,
    /// Time allowed to open a connection (502 past it).
    pub connect_timeout: Duration,
    /// Time allowed for the response headers, and between body chunks (504 past it).
    pub timeout: Duration,
    /// The key of `consistent_hash`.
    pub hash_on: HashOn,
    /// Share of replicas (0 to 1) that may be unavailable before balancing ignores health and
    /// circuits and spreads over all replicas; `None`: never.
    pub panic_threshold: Option<f64>,
    /// `[upstreams.NAME.health]`: active checks; `None`: every replica counts as healthy.
    pub health: Option<HealthSpec>,
    /// `[upstreams.NAME.circuit_breaker]`: per-replica breaker fed by live traffic.
    pub circuit_breaker: Option<BreakerSpec>,
    /// `retry = {...}`: retries on another replica.
    pub retry: Option<RetrySpec>,
    /// How `https://` replicas are reached (`[upstreams.NAME.tls]`, or system roots without
    /// it); `None` when every replica is `http://`.
    pub tls: Option<crate::tls::UpstreamTls>,
}

/// A host a route matches.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum HostPattern {
    /// `api.example.com` (lower-case, no port).
    Exact(String),
    /// `*.example.com`, stored as the suffix `.example.com`: any name ending in it.
    Wildcard(String),
}

impl std::fmt::Display for HostPattern {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            HostPattern::Exact(h) => f.write_str(h),
            HostPattern::Wildcard(s) => write!(f, "*{s}"),
        }
    }
}

/// One `[[routes]]` entry.
#[derive(Debug, Clone, PartialEq)]
pub struct RouteSpec {
    /// Unique name (metric label, access log).
    pub name: String,
    /// Host it applies to; `None` is any host.
    pub host: Option<HostPattern>,
    /// Path prefix, matched byte for byte as nginx's prefix locations are.
    pub path_prefix: String,
    /// Methods it applies to; `None` is all.
    pub methods: Option<Vec<Method>>,
    /// Index into [`Config::upstreams`].
    pub upstream: usize,
    /// Index into [`Config::rate_limit_policies`].
    pub rate_limit: Option<usize>,
    /// Response caching, if on for this route.
    pub cache: Option<RouteCacheSpec>,
}

/// Reads and validates a config file.
pub fn load(path: &Path) -> Result<Config, ConfigErrors> {
    parse(&read(path)?, path)
}

/// Reads a config file's text, or says why it cannot.
pub fn read(path: &Path) -> Result<String, ConfigErrors> {
    std::fs::read_to_string(path).map_err(|e| {
        ConfigErrors(vec![ConfigError {
            file: path.display().to_string(),
            line: 0,
            column: 0,
            key: String::new(),
            message: format!("cannot read the config file: {e}"),
        }])
    })
}

/// Validates config text; `path` names it in errors and is kept for reloads.
pub fn parse(text: &str, path: &Path) -> Result<Config, ConfigErrors> {
    validate::validate(text, path)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn errors(text: &str) -> Vec<String> {
        parse(text, Path::new("t.toml"))
            .expect_err("config should be rejected")
            .0
            .iter()
            .map(|e| e.to_string())
            .collect()
    }

    const MINIMAL: &str = "[upstreams.u]\nreplicas = [\"http://127.0.0.1:9\"]\n[[routes]]\nname = \"r\"\nupstream = \"u\"\n";

    #[test]
    fn shipped_configs_are_valid() {
        let full = include_str!("../../config/palisade.toml");
        parse(full, Path::new("config/palisade.toml")).expect("palisade.toml is valid");
        parse(DEMO_CONFIG, Path::new("config/demo.toml")).expect("demo.toml is valid");
    }

    #[test]
    fn defaults() {
        let c = parse(MINIMAL, Path::new("t.toml")).unwrap();
        assert_eq!(c.server.listen, vec!["0.0.0.0:8080".parse().unwrap()]);
        assert_eq!(c.admin.listen, "127.0.0.1:9901".parse().unwrap());
        assert_eq!(c.routes[0].path_prefix, "/");
        assert_eq!(c.upstreams[0].timeout, Duration::from_secs(15));
    }

    #[test]
    fn errors_name_file_line_column_and_key() {
        let e = errors(&format!("{MINIMAL}[server]\nmax_connections = -5\n"));
        assert_eq!(
            e,
            vec![
                "t.toml:7:19: server.max_connections: must be a whole number from 1 to 1000000, not -5"
            ]
        );
        let e = errors(&format!("{MINIMAL}[log]\nformat = \"xml\"\n"));
        assert_eq!(
            e,
            vec![
                "t.toml:7:10: log.format: unknown format \"xml\": allowed are \"json\" and \"pretty\""
            ]
        );
    }

    #[test]
    fn unknown_keys_list_what_is_allowed() {
        let e = errors(&format!(
            "{MINIMAL}[admin]\nlisten = \"127.0.0.1:1\"\ntokn = \"x\"\n"
        ));
        assert_eq!(e.len(), 1);
        assert!(
            e[0].starts_with("t.toml:8:1: admin.tokn: unknown field `tokn`"),
            "{}",
            e[0]
        );
        assert!(e[0].contains("expected `listen` or `token`"), "{}", e[0]);
    }

    #[test]
    fn tls_settings_are_checked() {
        let e = errors(&format!(
            "[server.tls]\nlisten = [\"127.0.0.1:8443\"]\ncertificates = []\n{MINIMAL}"
        ));
        assert_eq!(
            e,
            vec![
                "t.toml:3:16: server.tls.certificates: must list at least one certificate, like [{ cert = \"certs/api.pem\", key = \"certs/api.key\" }]"
            ]
        );
        let e = errors(&format!(
            "[server]\nlisten = [\"127.0.0.1:8080\"]\n[server.tls]\nlisten = [\"127.0.0.1:8080\"]\ncertificates = [{{ cert = \"/nonexistent/a.pem\", key = \"a.key\" }}]\n{MINIMAL}"
        ));
        assert_eq!(e.len(), 2, "{e:?}");
        assert!(
            e[0].starts_with(
                "t.toml:4:11: server.tls.listen[0]: 127.0.0.1:8080 is also in server.listen"
            ),
            "{e:?}"
        );
        assert!(
            e[1].starts_with(
                "t.toml:5:26: server.tls.certificates[0].cert: cannot read /nonexistent/a.pem: "
            ),
            "{e:?}"
        );
        let e = errors(&format!(
            "{MINIMAL}[upstreams.u.tls]\nserver_name = \"x\"\n"
        ));
        assert!(
            e[0].starts_with("t.toml:6:1: upstreams.u.tls: applies only to https:// replicas"),
            "{e:?}"
        );
        let https = MINIMAL.replace("http://127.0.0.1:9", "https://127.0.0.1:9");
        let e = errors(&format!(
            "{https}[upstreams.u.tls]\nclient_cert = \"c.pem\"\n"
        ));
        assert!(
            e[0].starts_with("t.toml:7:15: upstreams.u.tls.client_cert: needs client_key too"),
            "{e:?}"
        );
        let e = errors(&format!(
            "{https}[upstreams.u.tls]\nserver_name = \"a b\"\n"
        ));
        assert!(
            e[0].starts_with(
                "t.toml:7:15: upstreams.u.tls.server_name: invalid server name \"a b\""
            ),
            "{e:?}"
        );
        let c = parse(&https.replace(":9\"", "\""), Path::new("t.toml")).unwrap();
        assert_eq!(c.upstreams[0].replicas, vec!["https://127.0.0.1:443"]);
        assert!(c.upstreams[0].tls.is_some());
    }

    #[test]
    fn cache_settings_and_defaults() {
        let text = MINIMAL.replace(
            "upstream = \"u\"",
            "upstream = \"u\"\ncache = { ttl = \"60s\", stale_while_revalidate = \"30s\", vary = [\"Accept-Language\"], query = { ignore = [\"utm_source\"] } }",
        ) + "[cache]\nmemory = \"64MiB\"\nmax_object_size = \"1MiB\"\n";
        let c = parse(&text, Path::new("t.toml")).unwrap();
        assert_eq!(c.cache.memory, 64 << 20);
        assert_eq!(c.cache.max_object_size, 1 << 20);
        let rc = c.routes[0].cache.as_ref().unwrap();
        assert_eq!(rc.ttl, Duration::from_secs(60));
        assert_eq!(rc.stale_while_revalidate, Duration::from_secs(30));
        assert_eq!(rc.stale_if_error, Duration::ZERO);
        assert_eq!(rc.vary, vec![http::header::ACCEPT_LANGUAGE]);
        assert_eq!(rc.query, QueryKey::Ignore(vec!["utm_source".into()]));
        assert!(rc.respect_origin && !rc.allow_set_cookie);
        assert_eq!(rc.statuses, vec![200, 203, 204, 300, 301, 404, 410]);
        let d = parse(MINIMAL, Path::new("t.toml")).unwrap();
        assert_eq!(
            (d.cache.memory, d.cache.max_object_size),
            (256 << 20, 8 << 20)
        );
        assert!(d.routes[0].cache.is_none());
    }

    #[test]
    fn bad_cache_settings_name_their_key() {
        let route = |c: &str| {
            errors(&MINIMAL.replace(
                "upstream = \"u\"",
                &format!("upstream = \"u\"\ncache = {c}"),
            ))
        };
        let e = route("{ statuses = [200, 206, 99] }");
        assert_eq!(e.len(), 2, "{e:?}");
        assert!(
            e[0].starts_with("t.toml:6:28: routes[0].cache.statuses[1]: 206"),
            "{e:?}"
        );
        let e = route("{ vary = [\"Bad Header\"] }");
        assert!(
            e[0].contains("routes[0].cache.vary[0]: invalid header name"),
            "{e:?}"
        );
        let e = route("{ query = \"some\" }");
        assert!(
            e[0].contains("routes[0].cache.query: unknown value \"some\""),
            "{e:?}"
        );
        let e = route("{ query = { ignore = [\"a\"], allow = [\"b\"] } }");
        assert!(
            e[0].contains("routes[0].cache.query: give either ignore or allow"),
            "{e:?}"
        );
        let e = route("{ ttl = \"soon\" }");
        assert!(e[0].contains("invalid duration"), "{e:?}");
        let e = errors(&format!(
            "{MINIMAL}[cache]\nmemory = \"1KiB\"\nmax_object_size = \"2GiB\"\n"
        ));
        assert_eq!(e.len(), 2, "{e:?}");
        assert!(
            e[0].starts_with("t.toml:7:10: cache.memory: must be from 1MiB"),
            "{e:?}"
        );
        assert!(
            e[1].starts_with("t.toml:8:19: cache.max_object_size: must be from 1B"),
            "{e:?}"
        );
        let e = errors(&format!(
            "{MINIMAL}[cache]\nredis = {{ url = \"redis://127.0.0.1:1\", on_error = \"deny\" }}\n"
        ));
        assert!(
            e[0].contains("cache.redis.on_error: only rate_limit.redis takes on_error"),
            "{e:?}"
        );
    }

    #[test]
    fn rate_limit_policies() {
        let text = format!(
            "{MINIMAL}rate_limit = \"shared\"\n[[routes]]\nname = \"r2\"\nupstream = \"u\"\nmatch = {{ path_prefix = \"/b\" }}\nrate_limit = {{ per = [\"client_ip\", \"header:X-API-Key\"], limit = \"10/s\", burst = 5, missing = \"deny\" }}\n[rate_limits.shared]\nlimit = \"100/min\"\n"
        );
        let c = parse(&text, Path::new("t.toml")).unwrap();
        assert_eq!(c.rate_limit_policies.len(), 2);
        let shared = &c.rate_limit_policies[c.routes[0].rate_limit.unwrap()];
        assert_eq!(
            (shared.name.as_str(), shared.count, shared.burst),
            ("shared", 100, 100)
        );
        let inline = &c.rate_limit_policies[c.routes[1].rate_limit.unwrap()];
        assert_eq!(
            (inline.name.as_str(), inline.count, inline.burst),
            ("r2", 10, 5)
        );
        assert_eq!(inline.per.len(), 2);
    }

    #[test]
    fn absurd_limits_are_refused() {
        for (limit, why) in [
            ("0/s", "at least 1"),
            ("-1/min", "at least 1"),
            ("10/fortnight", "s, min or h"),
        ] {
            let e = errors(&MINIMAL.replace(
                "upstream = \"u\"",
                &format!("upstream = \"u\"\nrate_limit = {{ limit = \"{limit}\" }}"),
            ));
            assert!(
                e[0].contains("routes[0].rate_limit") && e[0].contains(why),
                "{limit}: {e:?}"
            );
        }
        let e = errors(&MINIMAL.replace(
            "upstream = \"u\"",
            "upstream = \"u\"\nrate_limit = { limit = \"1/s\", burst = 0, per = \"cookie:x\" }",
        ));
        assert_eq!(e.len(), 2, "{e:?}");
        assert!(
            e.iter()
                .any(|e| e.contains("burst: must be a whole number from 1")),
            "{e:?}"
        );
        assert!(
            e.iter()
                .any(|e| e.contains("per: unknown key \"cookie:x\"")),
            "{e:?}"
        );
        let e = errors(&MINIMAL.replace(
            "upstream = \"u\"",
            "upstream = \"u\"\nrate_limit = \"nope\"",
        ));
        assert!(e[0].contains("unknown rate-limit policy \"nope\""), "{e:?}");
        let e = errors(&format!(
            "{MINIMAL}[rate_limit]\nredis = {{ url = \"http://x\", on_error = \"maybe\" }}\n"
        ));
        assert_eq!(e.len(), 2, "{e:?}");
    }

    #[test]
    fn environment_variables() {
        // SAFETY: test-only variables that no other test reads.
        unsafe { std::env::set_var("PALISADE_TEST_REPLICA", "http://127.0.0.1:7") };
        let c = parse(
            &MINIMAL.replace("http://127.0.0.1:9", "${PALISADE_TEST_REPLICA}"),
            Path::new("t.toml"),
        )
        .unwrap();
        assert_eq!(c.upstreams[0].replicas, vec!["http://127.0.0.1:7"]);
        let e = errors(&MINIMAL.replace("http://127.0.0.1:9", "${PALISADE_TEST_UNSET_X}"));
        assert!(e[0].starts_with("t.toml:2:12: upstreams.u.replicas: environment variable PALISADE_TEST_UNSET_X is not set"), "{e:?}");
    }

    #[test]
    fn non_loopback_admin_needs_a_token() {
        let e = errors(&format!("{MINIMAL}[admin]\nlisten = \"0.0.0.0:9901\"\n"));
        assert!(e[0].contains("admin.token is required"), "{e:?}");
        parse(
            &format!("{MINIMAL}[admin]\nlisten = \"0.0.0.0:9901\"\ntoken = \"s3cret\"\n"),
            Path::new("t.toml"),
        )
        .unwrap();
    }

    #[test]
    fn overlapping_routes_are_an_error() {
        let text = format!(
            "{MINIMAL}[[routes]]\nname = \"r2\"\nupstream = \"u\"\nmatch = {{ path_prefix = \"/\", methods = [\"GET\"] }}\n"
        );
        let e = errors(&text);
        assert!(
            e[0].contains("routes[1].match: routes[0] (\"r\") already matches path prefix \"/\""),
            "{e:?}"
        );
    }
}
