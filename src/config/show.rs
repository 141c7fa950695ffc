//! The effective config as JSON for `GET /admin/config`: every value after defaults and
//! `${VAR}` substitution, so an operator sees what is running rather than what the file says,
//! with secrets (the admin token, Redis passwords) redacted.

use super::*;
use serde_json::{Value, json};

/// What replaces a secret.
pub const REDACTED: &str = "<redacted>";

/// The effective config, secrets redacted.
pub fn effective_json(c: &Config) -> Value {
    let s = &c.server;
    json!({
        "file": c.file.display().to_string(),
        "server": {
            "listen": s.listen.iter().map(|a| a.to_string()).collect::<Vec<_>>(),
            "trusted_proxies": s.trusted_proxies.iter().map(|n| n.to_string()).collect::<Vec<_>>(),
            "header_read_timeout": duration(s.header_read_timeout),
            "idle_timeout": duration(s.idle_timeout),
            "max_header_bytes": s.max_header_bytes,
            "max_request_body": s.max_request_body,
            "max_connections": s.max_connections,
            "workers": s.workers,
            "drain_timeout": duration(s.drain_timeout),
        },
        "admin": {
            "listen": c.admin.listen.to_string(),
            "token": c.admin.token.as_ref().map(|_| REDACTED),
        },
        "log": {
            "format": match c.log.format { LogFormat::Json => "json", LogFormat::Pretty => "pretty" },
            "level": c.log.level,
            "access_log": c.log.access_log,
        },
        "reload": { "watch": c.reload.watch, "debounce": duration(c.reload.debounce) },
        "cache": {
            "memory": c.cache.memory,
            "max_object_size": c.cache.max_object_size,
            "redis": c.cache.redis.as_ref().map(|r| redis(r, false)),
        },
        "rate_limit": {
            "redis": c.rate_limit.redis.as_ref().map(|r| redis(r, true)),
            "max_keys": c.rate_limit.max_keys,
        },
        "rate_limits": c.rate_limit_policies.iter().map(|p| json!({
            "name": p.name,
            "per": p.per.iter().map(|k| k.to_string()).collect::<Vec<_>>(),
            "limit": format!("{}/{}", p.count, duration(p.period)),
            "burst": p.burst,
            "missing": match p.missing {
                crate::ratelimit::Missing::Deny => "deny",
                crate::ratelimit::Missing::ClientIp => "client_ip",
            },
            "headers": p.headers,
        })).collect::<Vec<_>>(),
        "upstreams": c.upstreams.iter().map(upstream).collect::<Vec<_>>(),
        "routes": c.routes.iter().map(|r| route(c, r)).collect::<Vec<_>>(),
    })
}

fn duration(d: Duration) -> String {
    values::Duration(d).to_string()
}

fn redis(r: &RedisSettings, with_on_error: bool) -> Value {
    let url = match &r.target {
        RedisTarget::Single(u) => redact_url(u),
        RedisTarget::Cluster(nodes) => {
            let hosts: Vec<String> = nodes
                .iter()
                .map(|n| redact_url(n).trim_start_matches("redis://").to_owned())
                .collect();
            format!("redis+cluster://{}", hosts.join(","))
        }
    };
    let mut v = json!({ "url": url, "timeout": duration(r.timeout) });
    if with_on_error {
        v["on_error"] = r.on_error.as_str().into();
    }
    v
}

/// `scheme://user:password@host/...` with the password replaced; other URLs unchanged.
pub fn redact_url(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    let authority_end = rest.find('/').unwrap_or(rest.len());
    let Some(at) = rest[..authority_end].rfind('@') else {
        return url.to_owned();
    };
    let userinfo = &rest[..at];
    let user = match userinfo.split_once(':') {
        Some((user, _)) => format!("{user}:{REDACTED}"),
        None => REDACTED.to_owned(),
    };
    format!("{scheme}://{user}{}", &rest[at..])
}

fn upstream(u: &UpstreamSpec) -> Value {
    json!({
        "name": u.name,
        "replicas": u.replicas,
        "balance": u.balance.as_str(),
        "hash_on": u.hash_on.to_string(),
        "connect_timeout": duration(u.connect_timeout),
        "timeout": duration(u.timeout),
        "panic_threshold": u.panic_threshold,
        "health": u.health.as_ref().map(|h| json!({
            "path": h.path.as_str(),
            "interval": duration(h.interval),
            "timeout": duration(h.timeout),
            "expected_statuses": h.expected_statuses.iter().map(|&(lo, hi)| {
                if lo == hi { lo.to_string() } else { format!("{lo}-{hi}") }
            }).collect::<Vec<_>>(),
            "healthy_after": h.healthy_after,
            "unhealthy_after": h.unhealthy_after,
        })),
        "circuit_breaker": u.circuit_breaker.as_ref().map(|b| json!({
            "consecutive_failures": b.consecutive_failures,
            "failure_rate": b.failure_rate,
            "min_requests": b.min_requests,
            "window": duration(b.window),
            "open_for": duration(b.open_for),
            "half_open_requests": b.half_open_requests,
            "failure_on": b.failure_on.names(),
        })),
        "retry": u.retry.as_ref().map(|r| json!({
            "attempts": r.attempts,
            "on": r.on.names(),
            "budget": r.budget,
            "min_per_second": r.min_per_second,
            "max_body": r.max_body,
        })),
    })
}

fn route(c: &Config, r: &RouteSpec) -> Value {
    json!({
        "name": r.name,
        "match": {
            "host": r.host.as_ref().map(|h| h.to_string()),
            "path_prefix": r.path_prefix,
            "methods": r.methods.as_ref().map(|m| m.iter().map(|m| m.as_str()).collect::<Vec<_>>()),
        },
        "upstream": c.upstreams[r.upstream].name,
        "rate_limit": r.rate_limit.map(|i| &c.rate_limit_policies[i].name),
        "cache": r.cache.as_ref().map(|k| json!({
            "ttl": duration(k.ttl),
            "stale_while_revalidate": duration(k.stale_while_revalidate),
            "stale_if_error": duration(k.stale_if_error),
            "vary": k.vary.iter().map(|h| h.as_str()).collect::<Vec<_>>(),
            "query": match &k.query {
                QueryKey::All => json!("all"),
                QueryKey::None => json!("none"),
                QueryKey::Ignore(v) => json!({ "ignore": v }),
                QueryKey::Allow(v) => json!({ "allow": v }),
            },
            "respect_origin": k.respect_origin,
            "statuses": k.statuses,
            "allow_set_cookie": k.allow_set_cookie,
        })),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_in_redis_urls_are_redacted() {
        assert_eq!(
            redact_url("redis://:s3cret@10.0.0.5:6379/0"),
            "redis://:<redacted>@10.0.0.5:6379/0"
        );
        assert_eq!(
            redact_url("rediss://app:s3cret@cache:6380"),
            "rediss://app:<redacted>@cache:6380"
        );
        assert_eq!(
            redact_url("redis://s3cret@cache/1"),
            "redis://<redacted>@cache/1"
        );
        assert_eq!(redact_url("redis://cache:6379/0"), "redis://cache:6379/0");
        assert_eq!(redact_url("redis://cache/a@b"), "redis://cache/a@b");
    }

    #[test]
    fn effective_config_shows_defaults_and_hides_secrets() {
        let text = "[admin]\nlisten = \"127.0.0.1:9901\"\ntoken = \"tok-123\"\n\n[cache]\nredis = { url = \"redis://:pw-456@127.0.0.1:6379/0\" }\n\n[rate_limit]\nredis = { url = \"redis+cluster://:pw-789@10.0.0.1:7000,10.0.0.2:7000\" }\n\n[upstreams.u]\nreplicas = [\"http://127.0.0.1:8080\"]\nretry = { attempts = 2, on = [\"connect\", \"5xx\"] }\n\n[[routes]]\nname = \"a\"\nupstream = \"u\"\nrate_limit = { per = \"client_ip\", limit = \"10/s\" }\ncache = { ttl = \"60s\" }\n";
        let c = parse(text, Path::new("t.toml")).expect("valid");
        let v = effective_json(&c);
        let shown = v.to_string();
        for secret in ["tok-123", "pw-456", "pw-789"] {
            assert!(!shown.contains(secret), "{secret} leaked: {shown}");
        }
        assert_eq!(v["admin"]["token"], REDACTED);
        assert_eq!(
            v["cache"]["redis"]["url"],
            "redis://:<redacted>@127.0.0.1:6379/0"
        );
        assert_eq!(
            v["rate_limit"]["redis"]["url"],
            "redis+cluster://:<redacted>@10.0.0.1:7000,10.0.0.2:7000"
        );
        assert_eq!(v["server"]["header_read_timeout"], "10s");
        assert_eq!(v["upstreams"][0]["retry"]["on"], json!(["connect", "5xx"]));
        assert_eq!(v["routes"][0]["cache"]["ttl"], "1m");
        assert_eq!(v["routes"][0]["rate_limit"], "a");
        assert_eq!(v["rate_limits"][0]["limit"], "10/1s");
        assert_eq!(v["reload"]["watch"], true);
    }
}
