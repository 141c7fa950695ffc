//! Turns the file as written into a [`Config`], collecting every error with its position.

use super::error::{ConfigError, ConfigErrors, Locator};
use super::schema::*;
use super::values::Text;
use super::*;
use crate::ratelimit::{Missing, OnError, PolicySpec, identity::KeyPart};
use crate::tls::{CertFile, ServerCert, ServerTls, UpstreamTls, UpstreamTlsFile};
use crate::upstream::{BreakerSpec, HealthSpec, OutcomeSet, RetrySpec};
use rustls_pki_types::ServerName;
use std::collections::{BTreeMap, HashMap};
use toml::Spanned;

struct Checker<'a> {
    loc: Locator<'a>,
    errors: Vec<ConfigError>,
    /// The config file's directory: relative certificate paths are read from there.
    base: PathBuf,
}

impl Checker<'_> {
    fn err<T>(&mut self, at: &Spanned<T>, key: impl Into<String>, message: impl Into<String>) {
        let e = self.loc.error(at.span().start, key, message);
        self.errors.push(e);
    }

    fn positive_duration(
        &mut self,
        v: &Option<Spanned<values::Duration>>,
        key: &str,
        default: Duration,
    ) -> Duration {
        match v {
            Some(d) if d.get_ref().0.is_zero() => {
                self.err(d, key, "must be greater than 0s, like \"10s\"");
                default
            }
            Some(d) => d.get_ref().0,
            None => default,
        }
    }

    fn count(&mut self, v: &Option<Spanned<i64>>, key: &str, default: usize, max: usize) -> usize {
        match v {
            Some(n) if *n.get_ref() < 1 || *n.get_ref() as u64 > max as u64 => {
                self.err(
                    n,
                    key,
                    format!(
                        "must be a whole number from 1 to {max}, not {}",
                        n.get_ref()
                    ),
                );
                default
            }
            Some(n) => *n.get_ref() as usize,
            None => default,
        }
    }

    /// A file path from the config: absolute, or relative to the config file's directory.
    fn file_path(&self, raw: &Text) -> PathBuf {
        let p = Path::new(raw.trim());
        if p.is_absolute() {
            p.to_path_buf()
        } else {
            self.base.join(p)
        }
    }
}

pub(super) fn validate(text: &str, path: &Path) -> Result<Config, ConfigErrors> {
    let file = path.display().to_string();
    let loc = Locator { file: &file, text };
    let raw: RawConfig = match toml::from_str(text) {
        Ok(raw) => raw,
        Err(e) => {
            let offset = e.span().map_or(0, |s| s.start);
            let key = loc.key_at(offset).unwrap_or_default();
            let message = e.message().trim().replace('\n', " ");
            return Err(ConfigErrors(vec![loc.error(offset, key, message)]));
        }
    };
    let mut c = Checker {
        loc,
        errors: Vec::new(),
        base: path.parent().map(Path::to_path_buf).unwrap_or_default(),
    };

    let server = server(&mut c, &raw.server);
    let admin = admin(&mut c, &raw.admin);
    let log = log(&mut c, &raw.log);
    let reload = ReloadSettings {
        watch: raw.reload.watch.unwrap_or(true),
        debounce: match &raw.reload.debounce {
            Some(d) if d.get_ref().0 > Duration::from_secs(60) => {
                c.err(d, "reload.debounce", "must be at most 60s, like \"500ms\"");
                Duration::from_millis(500)
            }
            Some(d) => d.get_ref().0,
            None => Duration::from_millis(500),
        },
    };
    let cache = cache_settings(&mut c, raw.cache.as_ref());
    let rate_limit = rate_limit_settings(&mut c, raw.rate_limit.as_ref());
    let mut policies = Vec::new();
    for (name, p) in raw.rate_limits.iter().flatten() {
        if !upstream_name_ok(name.get_ref()) {
            c.err(
                name,
                format!("rate_limits.{}", name.get_ref()),
                "a policy name may hold only letters, digits, _ and -",
            );
        }
        policies.push(policy(
            &mut c,
            name.get_ref(),
            p.get_ref(),
            &format!("rate_limits.{}", name.get_ref()),
            p.span().start,
        ));
    }
    let upstreams = upstreams(&mut c, &raw.upstreams);
    let routes = routes(&mut c, &raw.routes, &upstreams, &mut policies);

    if c.errors.is_empty() {
        Ok(Config {
            file: path.to_path_buf(),
            server,
            admin,
            log,
            reload,
            upstreams,
            routes,
            rate_limit,
            rate_limit_policies: policies,
            cache,
        })
    } else {
        c.errors.sort_by_key(|e| (e.line, e.column));
        Err(ConfigErrors(c.errors))
    }
}

fn socket_addr(c: &mut Checker, v: &Spanned<Text>, key: &str) -> Option<SocketAddr> {
    match v.get_ref().parse::<SocketAddr>() {
        Ok(a) => Some(a),
        Err(_) => {
            c.err(
                v,
                key,
                format!(
                    "invalid address {:?}: write IP:PORT, like \"0.0.0.0:8080\" or \"[::1]:8080\"",
                    v.get_ref().0
                ),
            );
            None
        }
    }
}

fn server(c: &mut Checker, s: &RawServer) -> ServerSettings {
    let mut listen = Vec::new();
    match &s.listen {
        Some(list) if list.get_ref().is_empty() => c.err(
            list,
            "server.listen",
            "must name at least one address, like [\"0.0.0.0:8080\"]",
        ),
        Some(list) => {
            for (i, a) in list.get_ref().iter().enumerate() {
                let key = format!("server.listen[{i}]");
                if let Some(addr) = socket_addr(c, a, &key) {
                    if listen.contains(&addr) {
                        c.err(a, key, format!("{addr} is listed twice"));
                    } else {
                        listen.push(addr);
                    }
                }
            }
        }
        None => listen.push(SocketAddr::from(([0, 0, 0, 0], 8080))),
    }
    let mut trusted_proxies = Vec::new();
    for (i, p) in s.trusted_proxies.iter().flatten().enumerate() {
        let t = p.get_ref().trim();
        match t.parse::<IpNet>().or_else(|_| t.parse::<std::net::IpAddr>().map(IpNet::from)) {
            Ok(net) => trusted_proxies.push(net.trunc()),
            Err(_) => c.err(
                p,
                format!("server.trusted_proxies[{i}]"),
                format!("invalid network {t:?}: write an address or CIDR, like \"10.0.0.0/8\" or \"192.0.2.7\""),
            ),
        }
    }
    let header_read_timeout = c.positive_duration(
        &s.header_read_timeout,
        "server.header_read_timeout",
        Duration::from_secs(10),
    );
    let idle_timeout = c.positive_duration(
        &s.idle_timeout,
        "server.idle_timeout",
        Duration::from_secs(60),
    );
    let drain_timeout = c.positive_duration(
        &s.drain_timeout,
        "server.drain_timeout",
        Duration::from_secs(30),
    );
    let max_header_bytes = match &s.max_header_bytes {
        Some(v) if !(8192..=1 << 20).contains(&v.get_ref().0) => {
            c.err(
                v,
                "server.max_header_bytes",
                format!("must be from 8KiB to 1MiB, not {}", v.get_ref()),
            );
            32 << 10
        }
        Some(v) => v.get_ref().0 as usize,
        None => 32 << 10,
    };
    let max_request_body = match &s.max_request_body {
        Some(v) if v.get_ref().0 == 0 => {
            c.err(
                v,
                "server.max_request_body",
                "must be greater than 0, like \"10MiB\"",
            );
            10 << 20
        }
        Some(v) => v.get_ref().0,
        None => 10 << 20,
    };
    let max_connections = c.count(
        &s.max_connections,
        "server.max_connections",
        10_000,
        1_000_000,
    );
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let workers = c.count(&s.workers, "server.workers", cores, 1024);
    let tls = s.tls.as_ref().and_then(|t| server_tls(c, t, &listen));
    ServerSettings {
        listen,
        trusted_proxies,
        header_read_timeout,
        idle_timeout,
        max_header_bytes,
        max_request_body,
        max_connections,
        workers,
        drain_timeout,
        tls,
    }
}

fn server_tls(c: &mut Checker, t: &Spanned<RawTls>, plain: &[SocketAddr]) -> Option<ServerTls> {
    let raw = t.get_ref();
    let mut listen = Vec::new();
    if raw.listen.get_ref().is_empty() {
        c.err(
            &raw.listen,
            "server.tls.listen",
            "must name at least one address, like [\"0.0.0.0:8443\"]",
        );
    }
    for (i, a) in raw.listen.get_ref().iter().enumerate() {
        let key = format!("server.tls.listen[{i}]");
        if let Some(addr) = socket_addr(c, a, &key) {
            if listen.contains(&addr) {
                c.err(a, key, format!("{addr} is listed twice"));
            } else if addr.port() != 0 && plain.contains(&addr) {
                c.err(
                    a,
                    key,
                    format!("{addr} is also in server.listen; an address serves either plain HTTP or TLS"),
                );
            } else {
                listen.push(addr);
            }
        }
    }
    let list = raw.certificates.get_ref();
    if list.is_empty() {
        c.err(
            &raw.certificates,
            "server.tls.certificates",
            "must list at least one certificate, like [{ cert = \"certs/api.pem\", key = \"certs/api.key\" }]",
        );
        return None;
    }
    let mut certs = Vec::new();
    let mut default: Option<usize> = None;
    for (i, entry) in list.iter().enumerate() {
        let e = entry.get_ref();
        let key = format!("server.tls.certificates[{i}]");
        if let Some(d) = &e.default
            && *d.get_ref()
        {
            match default {
                Some(first) => c.err(
                    d,
                    format!("{key}.default"),
                    format!("certificates[{first}] is already the default; mark one only"),
                ),
                None => default = Some(i),
            }
        }
        match ServerCert::load(
            &c.file_path(e.cert.get_ref()),
            &c.file_path(e.key.get_ref()),
        ) {
            Ok(cert) => certs.push(cert),
            Err((CertFile::Cert, err)) => c.err(&e.cert, format!("{key}.cert"), err.to_string()),
            Err((CertFile::Key, err)) => c.err(&e.key, format!("{key}.key"), err.to_string()),
        }
    }
    if certs.len() != list.len() {
        return None;
    }
    match ServerTls::new(listen, certs, default.unwrap_or(0)) {
        Ok(tls) => Some(tls),
        Err(e) => {
            c.err(t, "server.tls", e.to_string());
            None
        }
    }
}

fn upstream_tls(
    c: &mut Checker,
    raw: Option<&Spanned<RawUpstreamTls>>,
    replicas: &Spanned<Vec<Spanned<Text>>>,
    any_https: bool,
    key: &str,
) -> Option<UpstreamTls> {
    if !any_https {
        if let Some(t) = raw {
            c.err(
                t,
                format!("{key}.tls"),
                "applies only to https:// replicas, and this upstream has none",
            );
        }
        return None;
    }
    let t = raw.map(|t| t.get_ref());
    let field = |f: fn(&RawUpstreamTls) -> &Option<Spanned<Text>>| t.and_then(|t| f(t).as_ref());
    let ca = field(|t| &t.ca);
    let client_cert = field(|t| &t.client_cert);
    let client_key = field(|t| &t.client_key);
    let server_name = match field(|t| &t.server_name) {
        None => None,
        Some(n) => match ServerName::try_from(n.get_ref().trim().to_owned()) {
            Ok(name) => Some(name),
            Err(_) => {
                c.err(
                    n,
                    format!("{key}.tls.server_name"),
                    format!(
                        "invalid server name {:?}: write a DNS name like \"api.internal\" or an IP address",
                        n.get_ref().0
                    ),
                );
                return None;
            }
        },
    };
    let client = match (client_cert, client_key) {
        (Some(cert), Some(k)) => Some((c.file_path(cert.get_ref()), c.file_path(k.get_ref()))),
        (Some(cert), None) => {
            c.err(
                cert,
                format!("{key}.tls.client_cert"),
                "needs client_key too: the private key of the client certificate",
            );
            return None;
        }
        (None, Some(k)) => {
            c.err(
                k,
                format!("{key}.tls.client_key"),
                "needs client_cert too: the client certificate of this key",
            );
            return None;
        }
        (None, None) => None,
    };
    let ca_path = ca.map(|p| c.file_path(p.get_ref()));
    let loaded = UpstreamTls::load(
        ca_path.as_deref(),
        client.as_ref().map(|(a, b)| (a.as_path(), b.as_path())),
        server_name,
    );
    match loaded {
        Ok(tls) => Some(tls),
        Err((which, e)) => {
            let (at, name) = match which {
                UpstreamTlsFile::Ca => (ca, "ca"),
                UpstreamTlsFile::ClientCert => (client_cert, "client_cert"),
                UpstreamTlsFile::ClientKey => (client_key, "client_key"),
            };
            match at {
                Some(at) => c.err(at, format!("{key}.tls.{name}"), e.to_string()),
                None => c.err(replicas, format!("{key}.replicas"), e.to_string()),
            }
            None
        }
    }
}

fn admin(c: &mut Checker, a: &RawAdmin) -> AdminSettings {
    let default = SocketAddr::from(([127, 0, 0, 1], 9901));
    let listen = a
        .listen
        .as_ref()
        .and_then(|l| socket_addr(c, l, "admin.listen"))
        .unwrap_or(default);
    let token = match &a.token {
        Some(t) if t.get_ref().trim().is_empty() => {
            c.err(t, "admin.token", "must not be empty");
            None
        }
        Some(t) => Some(t.get_ref().0.clone()),
        None => None,
    };
    if token.is_none()
        && !listen.ip().is_loopback()
        && let Some(l) = &a.listen
    {
        c.err(
            l,
            "admin.listen",
            format!("{listen} is not a loopback address, so admin.token is required (for example token = \"${{PALISADE_ADMIN_TOKEN}}\")"),
        );
    }
    AdminSettings { listen, token }
}

fn log(c: &mut Checker, l: &RawLog) -> LogSettings {
    let format = match &l.format {
        None => LogFormat::Json,
        Some(f) => match f.get_ref().as_ref() {
            "json" => LogFormat::Json,
            "pretty" => LogFormat::Pretty,
            other => {
                c.err(
                    f,
                    "log.format",
                    format!("unknown format {other:?}: allowed are \"json\" and \"pretty\""),
                );
                LogFormat::Json
            }
        },
    };
    let level = match &l.level {
        None => "info".to_owned(),
        Some(v) => {
            if tracing_subscriber::EnvFilter::try_new(v.get_ref().0.as_str()).is_err()
                || v.get_ref().trim().is_empty()
            {
                c.err(
                    v,
                    "log.level",
                    format!(
                        "invalid level {:?}: allowed are trace, debug, info, warn, error, or a filter like \"palisade=debug,info\"",
                        v.get_ref().0
                    ),
                );
            }
            v.get_ref().0.clone()
        }
    };
    LogSettings {
        format,
        level,
        access_log: l.access_log.unwrap_or(true),
    }
}

fn upstream_name_ok(name: &str) -> bool {
    !name.is_empty()
        && name
            .chars()
            .all(|ch| ch.is_ascii_alphanumeric() || ch == '_' || ch == '-')
}

fn upstreams(
    c: &mut Checker,
    raw: &BTreeMap<Spanned<String>, Spanned<RawUpstream>>,
) -> Vec<UpstreamSpec> {
    let mut out = Vec::new();
    for (name, u) in raw {
        let key = format!("upstreams.{}", name.get_ref());
        if !upstream_name_ok(name.get_ref()) {
            c.err(
                name,
                &key,
                "an upstream name may hold only letters, digits, _ and -",
            );
        }
        let u = u.get_ref();
        let mut replicas = Vec::new();
        if u.replicas.get_ref().is_empty() {
            c.err(
                &u.replicas,
                format!("{key}.replicas"),
                "must list at least one replica, like [\"http://10.0.0.11:8080\"]",
            );
        }
        for (i, r) in u.replicas.get_ref().iter().enumerate() {
            let rkey = format!("{key}.replicas[{i}]");
            match replica_url(r.get_ref()) {
                Ok(url) if replicas.contains(&url) => {
                    c.err(r, rkey, format!("{url} is listed twice"))
                }
                Ok(url) => replicas.push(url),
                Err(msg) => c.err(r, rkey, msg),
            }
        }
        let balance = match &u.balance {
            None => Balance::RoundRobin,
            Some(b) => match b.get_ref().as_ref() {
                "round_robin" => Balance::RoundRobin,
                "least_requests" => Balance::LeastRequests,
                "p2c_ewma" => Balance::P2cEwma,
                "consistent_hash" => Balance::ConsistentHash,
                other => {
                    c.err(b, format!("{key}.balance"), format!("unknown balancer {other:?}: allowed are \"round_robin\", \"least_requests\", \"p2c_ewma\" and \"consistent_hash\""));
                    Balance::RoundRobin
                }
            },
        };
        let connect_timeout = c.positive_duration(
            &u.connect_timeout,
            &format!("{key}.connect_timeout"),
            Duration::from_secs(1),
        );
        let timeout = c.positive_duration(
            &u.timeout,
            &format!("{key}.timeout"),
            Duration::from_secs(15),
        );
        let hash_on = match &u.hash_on {
            None => HashOn::ClientIp,
            Some(h) if balance != Balance::ConsistentHash => {
                c.err(
                    h,
                    format!("{key}.hash_on"),
                    "applies only to balance = \"consistent_hash\"; remove it or set that balancer",
                );
                HashOn::ClientIp
            }
            Some(h) => match hash_on(h.get_ref()) {
                Ok(v) => v,
                Err(msg) => {
                    c.err(h, format!("{key}.hash_on"), msg);
                    HashOn::ClientIp
                }
            },
        };
        let panic_threshold = u.panic_threshold.as_ref().map(|p| p.get_ref().0);
        let health = u
            .health
            .as_ref()
            .map(|h| health(c, h.get_ref(), h.span().start, &format!("{key}.health")));
        let circuit_breaker = u
            .circuit_breaker
            .as_ref()
            .map(|b| breaker(c, b.get_ref(), &format!("{key}.circuit_breaker")));
        let retry = u
            .retry
            .as_ref()
            .map(|r| retry(c, r.get_ref(), &format!("{key}.retry")));
        let any_https = replicas.iter().any(|r: &String| r.starts_with("https://"));
        let tls = upstream_tls(c, u.tls.as_ref(), &u.replicas, any_https, &key);
        out.push(UpstreamSpec {
            name: name.get_ref().clone(),
            replicas,
            balance,
            connect_timeout,
            timeout,
            hash_on,
            panic_threshold,
            health,
            circuit_breaker,
            retry,
            tls,
        });
    }
    out
}

fn hash_on(raw: &str) -> Result<HashOn, String> {
    let allowed = "allowed are \"client_ip\" and \"header:NAME\"";
    match raw.trim() {
        "client_ip" => Ok(HashOn::ClientIp),
        h => match h.strip_prefix("header:") {
            Some(name) => http::HeaderName::from_bytes(name.trim().as_bytes())
                .map(HashOn::Header)
                .map_err(|_| format!("invalid header name {name:?}: {allowed}")),
            None => Err(format!("unknown key {h:?}: {allowed}")),
        },
    }
}

fn outcomes(
    c: &mut Checker,
    list: &Option<Spanned<Vec<Spanned<Text>>>>,
    key: &str,
    default: &[&str],
) -> OutcomeSet {
    let Some(list) = list else {
        return OutcomeSet::from_names(default.iter().copied()).expect("valid defaults");
    };
    if list.get_ref().is_empty() {
        c.err(
            list,
            key,
            format!("must name at least one outcome: {}", OutcomeSet::ALLOWED),
        );
    }
    let mut set = OutcomeSet::default();
    for (i, name) in list.get_ref().iter().enumerate() {
        if let Err(msg) = set.add(name.get_ref()) {
            c.err(name, format!("{key}[{i}]"), msg);
        }
    }
    set
}

fn health(c: &mut Checker, h: &RawHealth, at: usize, key: &str) -> HealthSpec {
    let path = match &h.path {
        None => http::uri::PathAndQuery::from_static("/health"),
        Some(p) => match p.get_ref().parse::<http::uri::PathAndQuery>() {
            Ok(pq) if p.get_ref().starts_with('/') => pq,
            _ => {
                c.err(
                    p,
                    format!("{key}.path"),
                    format!(
                        "invalid path {:?}: write a path starting with /, like \"/health\"",
                        p.get_ref().0
                    ),
                );
                http::uri::PathAndQuery::from_static("/health")
            }
        },
    };
    let interval = c.positive_duration(
        &h.interval,
        &format!("{key}.interval"),
        Duration::from_secs(5),
    );
    let timeout = c.positive_duration(
        &h.timeout,
        &format!("{key}.timeout"),
        Duration::from_secs(1),
    );
    if timeout > interval {
        let e = match (&h.timeout, &h.interval) {
            (Some(t), _) => c.loc.error(
                t.span().start,
                format!("{key}.timeout"),
                format!(
                    "must not be longer than the interval ({})",
                    values::Duration(interval)
                ),
            ),
            (None, Some(i)) => c.loc.error(
                i.span().start,
                format!("{key}.interval"),
                format!(
                    "must not be shorter than the timeout ({})",
                    values::Duration(timeout)
                ),
            ),
            (None, None) => c.loc.error(at, key, "timeout is longer than interval"),
        };
        c.errors.push(e);
    }
    let healthy_after = c.count(&h.healthy_after, &format!("{key}.healthy_after"), 2, 100) as u32;
    let unhealthy_after = c.count(
        &h.unhealthy_after,
        &format!("{key}.unhealthy_after"),
        3,
        100,
    ) as u32;
    let mut expected_statuses = Vec::new();
    match &h.expected_statuses {
        None => expected_statuses.push((200, 399)),
        Some(list) if list.get_ref().is_empty() => c.err(
            list,
            format!("{key}.expected_statuses"),
            "must list at least one status or range, like [200, \"300-399\"]",
        ),
        Some(list) => {
            for (i, v) in list.get_ref().iter().enumerate() {
                let range = match v.get_ref() {
                    RawStatuses::One(n) => u16::try_from(*n).ok().map(|n| (n, n)),
                    RawStatuses::Range(t) => t.split_once('-').and_then(|(lo, hi)| {
                        Some((
                            lo.trim().parse::<u16>().ok()?,
                            hi.trim().parse::<u16>().ok()?,
                        ))
                    }),
                };
                match range {
                    Some((lo, hi)) if (100..=599).contains(&lo) && (lo..=599).contains(&hi) => {
                        expected_statuses.push((lo, hi))
                    }
                    _ => c.err(
                        v,
                        format!("{key}.expected_statuses[{i}]"),
                        "must be a status from 100 to 599 like 200, or a range like \"200-399\"",
                    ),
                }
            }
        }
    }
    HealthSpec {
        path,
        interval,
        timeout,
        expected_statuses,
        healthy_after,
        unhealthy_after,
    }
}

fn share(c: &mut Checker, v: &Option<Spanned<values::Percent>>, key: &str, default: f64) -> f64 {
    match v {
        Some(p) if p.get_ref().0 <= 0.0 => {
            c.err(p, key, "must be greater than 0%, like \"50%\"");
            default
        }
        Some(p) => p.get_ref().0,
        None => default,
    }
}

fn breaker(c: &mut Checker, b: &RawCircuitBreaker, key: &str) -> BreakerSpec {
    BreakerSpec {
        consecutive_failures: c.count(
            &b.consecutive_failures,
            &format!("{key}.consecutive_failures"),
            5,
            1000,
        ) as u32,
        failure_rate: share(c, &b.failure_rate, &format!("{key}.failure_rate"), 0.5),
        min_requests: c.count(
            &b.min_requests,
            &format!("{key}.min_requests"),
            20,
            1_000_000,
        ) as u32,
        window: c.positive_duration(&b.window, &format!("{key}.window"), Duration::from_secs(10)),
        open_for: c.positive_duration(
            &b.open_for,
            &format!("{key}.open_for"),
            Duration::from_secs(30),
        ),
        half_open_requests: c.count(
            &b.half_open_requests,
            &format!("{key}.half_open_requests"),
            3,
            100,
        ) as u32,
        failure_on: outcomes(
            c,
            &b.failure_on,
            &format!("{key}.failure_on"),
            &["connect", "timeout", "error", "5xx"],
        ),
    }
}

fn retry(c: &mut Checker, r: &RawRetry, key: &str) -> RetrySpec {
    let min_per_second = match &r.min_per_second {
        Some(n) if !(0..=10_000).contains(n.get_ref()) => {
            c.err(
                n,
                format!("{key}.min_per_second"),
                format!(
                    "must be a whole number from 0 to 10000, not {}",
                    n.get_ref()
                ),
            );
            3
        }
        Some(n) => *n.get_ref() as u32,
        None => 3,
    };
    let max_body = match &r.max_body {
        Some(v) if v.get_ref().0 > 16 << 20 => {
            c.err(
                v,
                format!("{key}.max_body"),
                format!(
                    "must be at most 16MiB (it is held in memory per request), not {}",
                    v.get_ref()
                ),
            );
            64 << 10
        }
        Some(v) => v.get_ref().0,
        None => 64 << 10,
    };
    RetrySpec {
        attempts: c.count(&r.attempts, &format!("{key}.attempts"), 2, 10) as u32,
        on: outcomes(
            c,
            &r.on,
            &format!("{key}.on"),
            &["connect", "error", "502", "503", "504"],
        ),
        budget: share(c, &r.budget, &format!("{key}.budget"), 0.2),
        min_per_second,
        max_body,
    }
}

/// Normalizes a replica URL to `http://host:port`, or says what is wrong with it.
fn replica_url(raw: &str) -> Result<String, String> {
    let allowed = "write http://HOST:PORT or https://HOST:PORT, like \"http://10.0.0.11:8080\"";
    let uri: http::Uri = raw
        .parse()
        .map_err(|e| format!("invalid replica URL {raw:?} ({e}): {allowed}"))?;
    let scheme = match uri.scheme_str() {
        Some("http") => "http",
        Some("https") => "https",
        Some(s) => return Err(format!("unsupported scheme {s:?} in {raw:?}: {allowed}")),
        None => return Err(format!("{raw:?} has no scheme: {allowed}")),
    };
    let authority = uri
        .authority()
        .ok_or_else(|| format!("{raw:?} has no host: {allowed}"))?;
    if authority.as_str().contains('@') {
        return Err(format!(
            "{raw:?} holds credentials, which are not allowed: {allowed}"
        ));
    }
    if !matches!(uri.path(), "" | "/") || uri.query().is_some() {
        return Err(format!(
            "{raw:?} has a path or query; a replica is only scheme, host and port: {allowed}"
        ));
    }
    let host = authority.host();
    if host.is_empty() {
        return Err(format!("{raw:?} has no host: {allowed}"));
    }
    let port = authority
        .port_u16()
        .unwrap_or(if scheme == "https" { 443 } else { 80 });
    if port == 0 {
        return Err(format!("{raw:?} has port 0: {allowed}"));
    }
    Ok(format!("{scheme}://{}:{port}", host.to_ascii_lowercase()))
}

fn host_pattern(raw: &str) -> Result<HostPattern, String> {
    let h = raw.trim().trim_end_matches('.').to_ascii_lowercase();
    let label_ok = |l: &str| {
        !l.is_empty()
            && l.len() <= 63
            && l.chars().all(|ch| ch.is_ascii_alphanumeric() || ch == '-')
    };
    let allowed =
        "write a host name like \"api.example.com\" or \"*.example.com\" (no port, no scheme)";
    if let Some(suffix) = h.strip_prefix("*.") {
        if suffix.split('.').all(label_ok) {
            return Ok(HostPattern::Wildcard(format!(".{suffix}")));
        }
    } else if h.split('.').all(label_ok) {
        return Ok(HostPattern::Exact(h));
    }
    Err(format!("invalid host {raw:?}: {allowed}"))
}

/// A route's index and its methods (`None`: all), per host and prefix.
type RouteMethods = (usize, Option<Vec<Method>>);

fn routes(
    c: &mut Checker,
    raw: &[Spanned<RawRoute>],
    upstreams: &[UpstreamSpec],
    policies: &mut Vec<PolicySpec>,
) -> Vec<RouteSpec> {
    let named = policies.len();
    let raw_policy_names = |p: &[PolicySpec]| {
        p[..named]
            .iter()
            .map(|p| p.name.clone())
            .collect::<Vec<_>>()
    };
    let mut out = Vec::new();
    if raw.is_empty() {
        c.errors.push(c.loc.error(0, "routes", "no [[routes]]: add at least one, like [[routes]] name = \"default\" upstream = \"NAME\""));
    }
    let mut names: HashMap<String, usize> = HashMap::new();
    // (host, prefix) -> (route index, methods or None for all)
    let mut seen: HashMap<(Option<HostPattern>, String), Vec<RouteMethods>> = HashMap::new();
    for (i, r) in raw.iter().enumerate() {
        let key = format!("routes[{i}]");
        let r = r.get_ref();
        let name = r.name.get_ref().trim().to_owned();
        if name.is_empty() {
            c.err(&r.name, format!("{key}.name"), "must not be empty");
        } else if let Some(first) = names.get(&name) {
            c.err(
                &r.name,
                format!("{key}.name"),
                format!(
                    "route name {name:?} is already used by routes[{first}]; names must be unique"
                ),
            );
        } else {
            names.insert(name.clone(), i);
        }
        let upstream = match upstreams
            .iter()
            .position(|u| u.name == r.upstream.get_ref().as_ref())
        {
            Some(u) => u,
            None => {
                let known: Vec<&str> = upstreams.iter().map(|u| u.name.as_str()).collect();
                c.err(
                    &r.upstream,
                    format!("{key}.upstream"),
                    format!(
                        "unknown upstream {:?}: defined upstreams are {known:?}",
                        r.upstream.get_ref().0
                    ),
                );
                0
            }
        };
        let m = r.matcher.as_ref().map(|m| m.get_ref());
        let host = match m.and_then(|m| m.host.as_ref()) {
            None => None,
            Some(h) => match host_pattern(h.get_ref()) {
                Ok(p) => Some(p),
                Err(msg) => {
                    c.err(h, format!("{key}.match.host"), msg);
                    None
                }
            },
        };
        let path_prefix = match m.and_then(|m| m.path_prefix.as_ref()) {
            None => "/".to_owned(),
            Some(p) if !p.get_ref().starts_with('/') => {
                c.err(
                    p,
                    format!("{key}.match.path_prefix"),
                    format!("{:?} must start with /, like \"/products\"", p.get_ref().0),
                );
                "/".to_owned()
            }
            Some(p)
                if p.get_ref()
                    .chars()
                    .any(|ch| ch.is_ascii_control() || ch == ' ' || ch == '?' || ch == '#') =>
            {
                c.err(
                    p,
                    format!("{key}.match.path_prefix"),
                    "may not hold spaces, control characters, ? or #",
                );
                "/".to_owned()
            }
            Some(p) => p.get_ref().0.clone(),
        };
        let methods = match m.and_then(|m| m.methods.as_ref()) {
            None => None,
            Some(list) if list.get_ref().is_empty() => {
                c.err(
                    list,
                    format!("{key}.match.methods"),
                    "must list at least one method, or be left out to match all",
                );
                None
            }
            Some(list) => {
                let mut ms: Vec<Method> = Vec::new();
                for (j, v) in list.get_ref().iter().enumerate() {
                    let upper = v.get_ref().trim().to_ascii_uppercase();
                    match Method::from_bytes(upper.as_bytes()) {
                        Ok(meth) if ms.contains(&meth) => c.err(
                            v,
                            format!("{key}.match.methods[{j}]"),
                            format!("{upper} is listed twice"),
                        ),
                        Ok(meth) if !upper.is_empty() => ms.push(meth),
                        _ => c.err(
                            v,
                            format!("{key}.match.methods[{j}]"),
                            format!(
                                "invalid method {:?}: write a method such as \"GET\"",
                                v.get_ref().0
                            ),
                        ),
                    }
                }
                Some(ms)
            }
        };
        let cache = r
            .cache
            .as_ref()
            .map(|rc| route_cache(c, rc.get_ref(), &format!("{key}.cache")));
        let rate_limit = match &r.rate_limit {
            None => None,
            Some(rl) => match rl.get_ref() {
                RawRouteRateLimit::Named(n) => {
                    let found = raw_policy_names(policies).iter().position(|p| p == &n.0);
                    if found.is_none() {
                        let known = raw_policy_names(policies);
                        c.err(rl, format!("{key}.rate_limit"), format!("unknown rate-limit policy {:?}: defined [rate_limits.*] are {known:?}", n.0));
                    }
                    found
                }
                RawRouteRateLimit::Inline(p) => {
                    let spec = policy(c, &name, p, &format!("{key}.rate_limit"), rl.span().start);
                    policies.push(spec);
                    Some(policies.len() - 1)
                }
            },
        };

        let slot = seen.entry((host.clone(), path_prefix.clone())).or_default();
        for (other, other_methods) in slot.iter() {
            let overlap = match (&methods, other_methods) {
                (None, _) | (_, None) => true,
                (Some(a), Some(b)) => a.iter().any(|x| b.contains(x)),
            };
            if overlap {
                let where_ = match &host {
                    Some(h) => format!("host {h}, "),
                    None => String::new(),
                };
                let at = r
                    .matcher
                    .as_ref()
                    .map_or(r.name.span().start, |m| m.span().start);
                let e = c.loc.error(
                    at,
                    format!("{key}.match"),
                    format!(
                        "routes[{other}] ({:?}) already matches {where_}path prefix {path_prefix:?} for the same methods; give one a different host, prefix or methods",
                        raw[*other].get_ref().name.get_ref().0
                    ),
                );
                c.errors.push(e);
                break;
            }
        }
        slot.push((i, methods.clone()));
        out.push(RouteSpec {
            name,
            host,
            path_prefix,
            methods,
            upstream,
            rate_limit,
            cache,
        });
    }
    out
}

/// Statuses stored when a route's `cache.statuses` is not given (RFC 9110's heuristically
/// cacheable ones that a proxy sees without range requests).
const DEFAULT_CACHE_STATUSES: [u16; 7] = [200, 203, 204, 300, 301, 404, 410];

fn cache_settings(c: &mut Checker, raw: Option<&Spanned<RawCache>>) -> CacheSettings {
    let mut out = CacheSettings {
        memory: 256 << 20,
        max_object_size: 8 << 20,
        redis: None,
    };
    let Some(raw) = raw else { return out };
    let raw = raw.get_ref();
    if let Some(m) = &raw.memory {
        let v = m.get_ref().0;
        if !(1 << 20..=1 << 40).contains(&v) {
            c.err(
                m,
                "cache.memory",
                format!("must be from 1MiB to 1TiB, not {}", m.get_ref()),
            );
        } else {
            out.memory = v;
        }
    }
    if let Some(m) = &raw.max_object_size {
        let v = m.get_ref().0;
        let max = out.memory.min(512 << 20);
        if v == 0 || v > max {
            c.err(
                m,
                "cache.max_object_size",
                format!(
                    "must be from 1B to the smaller of cache.memory and 512MiB ({max} bytes), not {}",
                    m.get_ref()
                ),
            );
        } else {
            out.max_object_size = v;
        }
    }
    if let Some(r) = &raw.redis {
        if let Some(o) = &r.get_ref().on_error {
            c.err(
                o,
                "cache.redis.on_error",
                "only rate_limit.redis takes on_error; a cache whose Redis fails always falls back to memory and the origin, so remove it",
            );
        }
        out.redis = redis_settings(
            c,
            r.get_ref(),
            "cache.redis",
            Duration::from_millis(50),
            OnError::Allow,
        );
    }
    out
}

fn route_cache(c: &mut Checker, raw: &RawRouteCache, key: &str) -> RouteCacheSpec {
    let window = |v: &Option<Spanned<values::Duration>>| {
        v.as_ref().map_or(Duration::ZERO, |d| d.get_ref().0)
    };
    let mut vary = Vec::new();
    if let Some(list) = &raw.vary {
        if list.get_ref().len() > crate::cache::MAX_VARY {
            c.err(
                list,
                format!("{key}.vary"),
                format!(
                    "names {} headers; at most {} are allowed",
                    list.get_ref().len(),
                    crate::cache::MAX_VARY
                ),
            );
        }
        for (i, h) in list.get_ref().iter().enumerate() {
            match http::HeaderName::from_bytes(h.get_ref().trim().as_bytes()) {
                Ok(name) if vary.contains(&name) => {
                    c.err(h, format!("{key}.vary[{i}]"), format!("{name} is listed twice"))
                }
                Ok(name) => vary.push(name),
                Err(_) => c.err(
                    h,
                    format!("{key}.vary[{i}]"),
                    format!("invalid header name {:?}: write a request header such as \"Accept-Language\"", h.get_ref().0),
                ),
            }
        }
    }
    let mut statuses = Vec::new();
    match &raw.statuses {
        None => statuses.extend(DEFAULT_CACHE_STATUSES),
        Some(list) if list.get_ref().is_empty() => c.err(
            list,
            format!("{key}.statuses"),
            "must list at least one status, like [200, 404], or be left out for the default",
        ),
        Some(list) => {
            for (i, s) in list.get_ref().iter().enumerate() {
                let n = *s.get_ref();
                let k = format!("{key}.statuses[{i}]");
                if !(200..=599).contains(&n) || n == 206 || n == 304 {
                    c.err(
                        s,
                        k,
                        format!("{n} cannot be stored: allowed are 200 to 599 except 206 and 304"),
                    );
                } else if statuses.contains(&(n as u16)) {
                    c.err(s, k, format!("{n} is listed twice"));
                } else {
                    statuses.push(n as u16);
                }
            }
        }
    }
    let query = match &raw.query {
        None => QueryKey::All,
        Some(q) => match q.get_ref() {
            RawQueryKey::Word(w) => match w.as_ref() {
                "all" => QueryKey::All,
                "none" => QueryKey::None,
                other => {
                    c.err(q, format!("{key}.query"), format!("unknown value {other:?}: allowed are \"all\", \"none\", {{ ignore = [...] }} and {{ allow = [...] }}"));
                    QueryKey::All
                }
            },
            RawQueryKey::Lists(l) => {
                let names = |list: &[Text]| {
                    let mut v: Vec<String> = list.iter().map(|t| t.trim().to_owned()).collect();
                    v.sort();
                    v.dedup();
                    v
                };
                let bad = |list: &[Text]| {
                    list.iter()
                        .any(|t| t.trim().is_empty() || t.contains(['&', '=', '#', ' ']))
                };
                match (&l.ignore, &l.allow) {
                    (Some(i), None) if !bad(i) => QueryKey::Ignore(names(i)),
                    (None, Some(a)) if !bad(a) => QueryKey::Allow(names(a)),
                    (Some(_), None) | (None, Some(_)) => {
                        c.err(
                            q,
                            format!("{key}.query"),
                            "parameter names may not be empty or hold &, =, # or spaces",
                        );
                        QueryKey::All
                    }
                    _ => {
                        c.err(
                            q,
                            format!("{key}.query"),
                            "give either ignore or allow, like { ignore = [\"utm_source\"] }",
                        );
                        QueryKey::All
                    }
                }
            }
        },
    };
    RouteCacheSpec {
        ttl: window(&raw.ttl),
        stale_while_revalidate: window(&raw.stale_while_revalidate),
        stale_if_error: window(&raw.stale_if_error),
        vary,
        query,
        respect_origin: raw.respect_origin.unwrap_or(true),
        statuses,
        allow_set_cookie: raw.allow_set_cookie.unwrap_or(false),
    }
}

fn rate_limit_settings(
    c: &mut Checker,
    raw: Option<&Spanned<RawGlobalRateLimit>>,
) -> RateLimitSettings {
    let Some(raw) = raw else {
        return RateLimitSettings {
            redis: None,
            max_keys: 1_000_000,
        };
    };
    let raw = raw.get_ref();
    let max_keys = c.count(&raw.max_keys, "rate_limit.max_keys", 1_000_000, 100_000_000);
    let redis = raw.redis.as_ref().and_then(|r| {
        let on_error = match r.get_ref().on_error.as_ref() {
            None => OnError::Allow,
            Some(v) => match v.get_ref().as_ref() {
                "allow" => OnError::Allow,
                "deny" => OnError::Deny,
                "local" => OnError::Local,
                other => {
                    c.err(v, "rate_limit.redis.on_error", format!("unknown value {other:?}: allowed are \"allow\", \"deny\" and \"local\""));
                    OnError::Allow
                }
            },
        };
        redis_settings(c, r.get_ref(), "rate_limit.redis", Duration::from_millis(20), on_error)
    });
    RateLimitSettings { redis, max_keys }
}

fn redis_settings(
    c: &mut Checker,
    r: &RawRedis,
    key: &str,
    default_timeout: Duration,
    on_error: OnError,
) -> Option<RedisSettings> {
    let timeout = c.positive_duration(&r.timeout, &format!("{key}.timeout"), default_timeout);
    match crate::redis::RedisTarget::parse(&r.url.get_ref().0) {
        Ok(target) => Some(RedisSettings {
            target,
            timeout,
            on_error,
        }),
        Err(msg) => {
            c.err(&r.url, format!("{key}.url"), msg);
            None
        }
    }
}

fn key_part(raw: &str) -> Result<KeyPart, String> {
    let allowed = "allowed are \"client_ip\", \"header:NAME\" and \"query:NAME\"";
    let raw = raw.trim();
    if raw == "client_ip" {
        return Ok(KeyPart::ClientIp);
    }
    if let Some(h) = raw.strip_prefix("header:") {
        return http::HeaderName::from_bytes(h.trim().as_bytes())
            .map(KeyPart::Header)
            .map_err(|_| format!("invalid header name {h:?}: {allowed}"));
    }
    if let Some(q) = raw.strip_prefix("query:") {
        let q = q.trim();
        if q.is_empty() || q.contains(['&', '=', '#', ' ']) {
            return Err(format!("invalid query parameter name {q:?}: {allowed}"));
        }
        return Ok(KeyPart::Query(q.to_owned()));
    }
    Err(format!("unknown key {raw:?}: {allowed}"))
}

fn policy(c: &mut Checker, name: &str, p: &RawRateLimit, key: &str, at: usize) -> PolicySpec {
    let mut per = Vec::new();
    match p.per.as_ref() {
        None => per.push(KeyPart::ClientIp),
        Some(v) => {
            let list: Vec<&Text> = match v.get_ref() {
                OneOrMany::One(t) => vec![t],
                OneOrMany::Many(ts) => ts.iter().collect(),
            };
            if list.is_empty() {
                c.err(
                    v,
                    format!("{key}.per"),
                    "must name at least one key, like \"client_ip\"",
                );
            }
            for t in list {
                match key_part(t) {
                    Ok(part) if per.contains(&part) => {
                        c.err(v, format!("{key}.per"), format!("{part} is listed twice"))
                    }
                    Ok(part) => per.push(part),
                    Err(msg) => c.err(v, format!("{key}.per"), msg),
                }
            }
        }
    }
    let (count, period) = match p.limit.as_ref() {
        Some(l) => (l.get_ref().count, l.get_ref().per),
        None => {
            c.errors.push(c.loc.error(
                at,
                format!("{key}.limit"),
                "is required: write N/s, N/min or N/h, like \"100/min\"",
            ));
            (1, std::time::Duration::from_secs(1))
        }
    };
    let burst = match p.burst.as_ref() {
        None => count,
        Some(b) if *b.get_ref() < 1 || *b.get_ref() > 1_000_000_000 => {
            c.err(
                b,
                format!("{key}.burst"),
                format!(
                    "must be a whole number from 1 to 1000000000, not {}",
                    b.get_ref()
                ),
            );
            1
        }
        Some(b) => *b.get_ref() as u64,
    };
    let missing = match p.missing.as_ref() {
        None => Missing::ClientIp,
        Some(m) => match m.get_ref().as_ref() {
            "deny" => Missing::Deny,
            "client_ip" => Missing::ClientIp,
            other => {
                c.err(m, format!("{key}.missing"), format!("unknown value {other:?}: allowed are \"deny\" (400) and \"client_ip\" (limit by address)"));
                Missing::ClientIp
            }
        },
    };
    PolicySpec {
        name: name.to_owned(),
        per,
        count,
        period,
        burst,
        missing,
        headers: p.headers.unwrap_or(true),
    }
}
