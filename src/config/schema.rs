//! The config file as written: serde types that mirror the TOML of DESIGN.md one to one.
//!
//! Unknown keys are rejected here (`deny_unknown_fields`); meaning is checked in `validate`.
//! Values whose meaning is checked later keep their position (`Spanned`) so that errors can point
//! at them.

use super::values::{ByteSize, Duration, Percent, Rate, Text};
use serde::Deserialize;
use std::collections::BTreeMap;
use toml::Spanned;

/// The whole file.
#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct RawConfig {
    #[serde(default)]
    pub server: RawServer,
    #[serde(default)]
    pub admin: RawAdmin,
    #[serde(default)]
    pub log: RawLog,
    #[serde(default)]
    pub reload: RawReload,
    pub cache: Option<Spanned<RawCache>>,
    pub rate_limit: Option<Spanned<RawGlobalRateLimit>>,
    pub rate_limits: Option<BTreeMap<Spanned<String>, Spanned<RawRateLimit>>>,
    #[serde(default)]
    pub upstreams: BTreeMap<Spanned<String>, Spanned<RawUpstream>>,
    #[serde(default)]
    pub routes: Vec<Spanned<RawRoute>>,
}

/// `[server]`.
#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct RawServer {
    pub listen: Option<Spanned<Vec<Spanned<Text>>>>,
    pub trusted_proxies: Option<Vec<Spanned<Text>>>,
    pub header_read_timeout: Option<Spanned<Duration>>,
    pub idle_timeout: Option<Spanned<Duration>>,
    pub max_header_bytes: Option<Spanned<ByteSize>>,
    pub max_request_body: Option<Spanned<ByteSize>>,
    pub max_connections: Option<Spanned<i64>>,
    pub workers: Option<Spanned<i64>>,
    pub drain_timeout: Option<Spanned<Duration>>,
    pub tls: Option<Spanned<RawTls>>,
}

/// `[server.tls]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawTls {
    pub listen: Spanned<Vec<Spanned<Text>>>,
    pub certificates: Spanned<Vec<Spanned<RawCertificate>>>,
}

/// One certificate pair of `[server.tls]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawCertificate {
    pub cert: Spanned<Text>,
    pub key: Spanned<Text>,
    pub default: Option<Spanned<bool>>,
}

/// `[upstreams.NAME.tls]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawUpstreamTls {
    pub ca: Option<Spanned<Text>>,
    pub client_cert: Option<Spanned<Text>>,
    pub client_key: Option<Spanned<Text>>,
    pub server_name: Option<Spanned<Text>>,
}

/// `[admin]`.
#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct RawAdmin {
    pub listen: Option<Spanned<Text>>,
    pub token: Option<Spanned<Text>>,
}

/// `[log]`.
#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct RawLog {
    pub format: Option<Spanned<Text>>,
    pub level: Option<Spanned<Text>>,
    pub access_log: Option<bool>,
}

/// `[reload]`.
#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct RawReload {
    pub watch: Option<bool>,
    pub debounce: Option<Spanned<Duration>>,
}

/// `[cache]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawCache {
    pub memory: Option<Spanned<ByteSize>>,
    pub max_object_size: Option<Spanned<ByteSize>>,
    pub redis: Option<Spanned<RawRedis>>,
}

/// A Redis connection (`cache.redis`, `rate_limit.redis`).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRedis {
    pub url: Spanned<Text>,
    pub timeout: Option<Spanned<Duration>>,
    pub on_error: Option<Spanned<Text>>,
}

/// `[rate_limit]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawGlobalRateLimit {
    pub redis: Option<Spanned<RawRedis>>,
    pub max_keys: Option<Spanned<i64>>,
}

/// A rate-limit policy: a route's `rate_limit = {...}` or `[rate_limits.NAME]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRateLimit {
    pub per: Option<Spanned<OneOrMany>>,
    pub limit: Option<Spanned<Rate>>,
    pub burst: Option<Spanned<i64>>,
    pub missing: Option<Spanned<Text>>,
    pub headers: Option<bool>,
}

/// A string or a list of strings.
#[derive(Debug, Deserialize)]
#[serde(
    untagged,
    expecting = "a string like \"client_ip\", \"header:NAME\" or \"query:NAME\", or a list of them"
)]
pub enum OneOrMany {
    /// `"client_ip"`.
    One(Text),
    /// `["client_ip", "header:X-API-Key"]`.
    Many(Vec<Text>),
}

/// A route's `rate_limit`: a policy inline, or the name of a `[rate_limits.NAME]`.
#[derive(Debug)]
pub enum RawRouteRateLimit {
    /// `rate_limit = "name"`.
    Named(Text),
    /// `rate_limit = { per = ..., limit = ... }`.
    Inline(RawRateLimit),
}

impl<'de> Deserialize<'de> for RawRouteRateLimit {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = RawRouteRateLimit;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("the name of a [rate_limits.NAME] table, or { per = ..., limit = ..., burst = ... }")
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Self::Value, E> {
                super::values::expand_env(v)
                    .map(|s| RawRouteRateLimit::Named(Text(s)))
                    .map_err(E::custom)
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                map: A,
            ) -> Result<Self::Value, A::Error> {
                RawRateLimit::deserialize(serde::de::value::MapAccessDeserializer::new(map))
                    .map(RawRouteRateLimit::Inline)
            }
        }
        d.deserialize_any(V)
    }
}

/// `[upstreams.NAME]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawUpstream {
    pub replicas: Spanned<Vec<Spanned<Text>>>,
    pub balance: Option<Spanned<Text>>,
    pub connect_timeout: Option<Spanned<Duration>>,
    pub timeout: Option<Spanned<Duration>>,
    pub hash_on: Option<Spanned<Text>>,
    pub panic_threshold: Option<Spanned<Percent>>,
    pub retry: Option<Spanned<RawRetry>>,
    pub health: Option<Spanned<RawHealth>>,
    pub circuit_breaker: Option<Spanned<RawCircuitBreaker>>,
    pub tls: Option<Spanned<RawUpstreamTls>>,
}

/// `retry = {...}` of an upstream.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRetry {
    pub attempts: Option<Spanned<i64>>,
    pub on: Option<Spanned<Vec<Spanned<Text>>>>,
    pub budget: Option<Spanned<Percent>>,
    pub min_per_second: Option<Spanned<i64>>,
    pub max_body: Option<Spanned<ByteSize>>,
}

/// `[upstreams.NAME.health]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawHealth {
    pub path: Option<Spanned<Text>>,
    pub interval: Option<Spanned<Duration>>,
    pub timeout: Option<Spanned<Duration>>,
    pub healthy_after: Option<Spanned<i64>>,
    pub unhealthy_after: Option<Spanned<i64>>,
    pub expected_statuses: Option<Spanned<Vec<Spanned<RawStatuses>>>>,
}

/// One entry of `expected_statuses`: a status (`204`) or a range (`"200-399"`).
#[derive(Debug, Deserialize)]
#[serde(untagged, expecting = "a status like 200 or a range like \"200-399\"")]
pub enum RawStatuses {
    /// `200`.
    One(i64),
    /// `"200-399"`.
    Range(Text),
}

/// `[upstreams.NAME.circuit_breaker]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawCircuitBreaker {
    pub consecutive_failures: Option<Spanned<i64>>,
    pub failure_rate: Option<Spanned<Percent>>,
    pub min_requests: Option<Spanned<i64>>,
    pub window: Option<Spanned<Duration>>,
    pub open_for: Option<Spanned<Duration>>,
    pub half_open_requests: Option<Spanned<i64>>,
    pub failure_on: Option<Spanned<Vec<Spanned<Text>>>>,
}

/// One `[[routes]]` entry.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRoute {
    pub name: Spanned<Text>,
    #[serde(rename = "match")]
    pub matcher: Option<Spanned<RawMatch>>,
    pub upstream: Spanned<Text>,
    pub cache: Option<Spanned<RawRouteCache>>,
    pub rate_limit: Option<Spanned<RawRouteRateLimit>>,
}

/// A route's `match = {...}`.
#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct RawMatch {
    pub host: Option<Spanned<Text>>,
    pub path_prefix: Option<Spanned<Text>>,
    pub methods: Option<Spanned<Vec<Spanned<Text>>>>,
}

/// A route's `cache = {...}`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRouteCache {
    pub ttl: Option<Spanned<Duration>>,
    pub stale_while_revalidate: Option<Spanned<Duration>>,
    pub stale_if_error: Option<Spanned<Duration>>,
    pub vary: Option<Spanned<Vec<Spanned<Text>>>>,
    pub respect_origin: Option<bool>,
    pub statuses: Option<Spanned<Vec<Spanned<i64>>>>,
    pub query: Option<Spanned<RawQueryKey>>,
    pub allow_set_cookie: Option<bool>,
}

/// A route's `cache.query`: `"all"`, `"none"`, `{ ignore = [...] }` or `{ allow = [...] }`.
#[derive(Debug, Deserialize)]
#[serde(
    untagged,
    expecting = "\"all\", \"none\", { ignore = [\"NAME\", ...] } or { allow = [\"NAME\", ...] }"
)]
pub enum RawQueryKey {
    /// `"all"` or `"none"`.
    Word(Text),
    /// `{ ignore = [...] }` or `{ allow = [...] }`.
    Lists(RawQueryLists),
}

/// The table form of `cache.query`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawQueryLists {
    pub ignore: Option<Vec<Text>>,
    pub allow: Option<Vec<Text>>,
}
