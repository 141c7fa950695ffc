//! Per-client rate limits: who the client is ([`identity`]), the GCRA rule ([`gcra`]), and
//! where its state lives: this instance's memory ([`memory`]), or Redis for limits that hold
//! across every instance (one atomic Lua script per decision, pipelined on one connection).
//!
//! When Redis fails or is slow, `on_error` decides: allow, deny, or decide locally with the same
//! policy in memory.

pub mod gcra;
pub mod identity;
pub mod memory;

use crate::redis::{Redis, RedisError};
use gcra::{Decision, Gcra};
use http::{HeaderMap, HeaderValue, Uri};
use identity::KeyPart;
use memory::MemoryStore;
use std::borrow::Cow;
use std::hash::{BuildHasher, Hasher};
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

/// What a request without a keyed header or parameter gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Missing {
    /// 400.
    Deny,
    /// Limit it by client address instead.
    ClientIp,
}

/// What happens when the Redis store cannot answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnError {
    /// Let the request pass.
    Allow,
    /// Refuse it with 429.
    Deny,
    /// Decide with this instance's memory store.
    Local,
}

impl OnError {
    /// The config spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            OnError::Allow => "allow",
            OnError::Deny => "deny",
            OnError::Local => "local",
        }
    }
}

/// A rate-limit policy as validated from the config.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct PolicySpec {
    /// `[rate_limits.NAME]`, or the route's name for an inline policy.
    pub name: String,
    /// What identifies a client; several parts are combined.
    pub per: Vec<KeyPart>,
    /// Requests per period.
    pub count: u64,
    /// The period.
    pub period: Duration,
    /// Requests allowed at once.
    pub burst: u64,
    /// Requests without the keyed value.
    pub missing: Missing,
    /// Whether allowed responses carry `RateLimit` headers.
    pub headers: bool,
}

/// A compiled policy.
pub struct Policy {
    /// The spec it was built from.
    pub spec: PolicySpec,
    /// Its name, for headers and logs.
    pub name: Arc<str>,
    gcra_ns: Gcra,
    gcra_us: Gcra,
    /// Prefix of its Redis keys: name and rule, so a changed rule starts afresh.
    redis_prefix: Vec<u8>,
    /// Memory keys: a keyed hash of the same.
    seed: u64,
    /// `RateLimit-Policy` value, made once.
    pub policy_header: HeaderValue,
    /// The name as a quoted string for the `RateLimit` header, made once.
    quoted_name: String,
}

impl Policy {
    /// Compiles a validated policy.
    pub fn new(spec: PolicySpec) -> Policy {
        let rule = format!("{}/{}s:{}", spec.count, spec.period.as_secs(), spec.burst);
        let per: Vec<String> = spec.per.iter().map(|p| p.to_string()).collect();
        let redis_prefix =
            format!("palisade:rl:{}:{rule}:{}:", spec.name, per.join("+")).into_bytes();
        let mut h = foldhash::fast::FixedState::with_seed(0x5a1f).build_hasher();
        h.write(&redis_prefix);
        let policy_header = HeaderValue::from_str(&format!(
            "\"{}\";q={};w={}",
            spec.name.replace(['"', '\\'], "_"),
            spec.count,
            spec.period.as_secs()
        ))
        .unwrap_or(HeaderValue::from_static("\"limit\""));
        Policy {
            name: spec.name.as_str().into(),
            gcra_ns: Gcra::new(spec.count, spec.period, spec.burst),
            gcra_us: {
                let g = Gcra::new(spec.count, spec.period, spec.burst);
                Gcra {
                    interval: (g.interval / 1000).max(1),
                    burst: g.burst,
                }
            },
            redis_prefix,
            quoted_name: format!("\"{}\"", spec.name.replace(['"', '\\'], "_")),
            seed: h.finish(),
            policy_header,
            spec,
        }
    }

    /// The Redis key of a client key from [`RateLimiter::key`]: the key itself, or the prefix
    /// and a SHA-1 digest of the rest when it is over 200 bytes past the prefix.
    pub fn redis_key<'a>(&self, key: &'a [u8]) -> Cow<'a, [u8]> {
        if key.len() <= self.redis_prefix.len() + 200 {
            return Cow::Borrowed(key);
        }
        let mut sha = sha1_smol::Sha1::new();
        sha.update(&key[self.redis_prefix.len()..]);
        Cow::Owned([&self.redis_prefix[..], sha.digest().to_string().as_bytes()].concat())
    }

    /// The `RateLimit` header value for a decision.
    pub fn ratelimit_header(&self, d: &Decision) -> HeaderValue {
        let t = d.reset_after.as_secs() + u64::from(d.reset_after.subsec_nanos() > 0);
        let (mut r_buf, mut t_buf) = (itoa::Buffer::new(), itoa::Buffer::new());
        let (r, t) = (r_buf.format(d.remaining), t_buf.format(t));
        crate::proxy::headers::value_of(&[
            self.quoted_name.as_bytes(),
            b";r=",
            r.as_bytes(),
            b";t=",
            t.as_bytes(),
        ])
        .unwrap_or(HeaderValue::from_static("\"limit\""))
    }
}

/// The stores decisions are made in.
pub struct RateLimiter {
    /// This instance's state; it outlives config reloads.
    pub memory: Arc<MemoryStore>,
    hasher: foldhash::quality::RandomState,
    script: redis::Script,
}

/// GCRA in Lua, with Redis's own clock so that instances need not agree on time.
/// KEYS[1]: the client key; ARGV: interval (µs), burst. Returns {allowed, remaining,
/// retry_after_us, reset_after_us}.
const GCRA_LUA: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local interval = tonumber(ARGV[1])
local burst = tonumber(ARGV[2])
local tat = tonumber(redis.call('GET', KEYS[1]) or now)
if tat < now then tat = now end
local new_tat = tat + interval
local allow_at = new_tat - burst * interval
if now < allow_at then
  return {0, 0, allow_at - now, tat - now}
end
local ttl = new_tat - now
redis.call('SET', KEYS[1], new_tat, 'PX', math.max(1, math.ceil(ttl / 1000)))
return {1, math.floor((now - allow_at) / interval), 0, ttl}
";

impl RateLimiter {
    /// A limiter whose memory store holds at most `max_keys` clients.
    pub fn new(max_keys: usize) -> RateLimiter {
        RateLimiter {
            memory: Arc::new(MemoryStore::new(max_keys)),
            hasher: foldhash::quality::RandomState::default(),
            script: redis::Script::new(GCRA_LUA),
        }
    }

    /// Builds the client key of `policy` for a request; an error (the 400 message) if a keyed
    /// value is missing and the policy denies such requests.
    pub fn key(
        &self,
        policy: &Policy,
        client: IpAddr,
        headers: &HeaderMap,
        uri: &Uri,
    ) -> Result<Vec<u8>, String> {
        let mut key = Vec::with_capacity(policy.redis_prefix.len() + 48);
        key.extend_from_slice(&policy.redis_prefix);
        for (i, part) in policy.spec.per.iter().enumerate() {
            if i > 0 {
                key.push(b'|');
            }
            if !identity::append_part(part, client, headers, uri, &mut key) {
                match policy.spec.missing {
                    Missing::Deny => {
                        return Err(format!(
                            "this route is rate limited per {part}, and the request has none"
                        ));
                    }
                    Missing::ClientIp => {
                        identity::append_part(&KeyPart::ClientIp, client, headers, uri, &mut key)
                    }
                };
            }
        }
        Ok(key)
    }

    /// Decides in memory.
    pub fn decide_local(&self, policy: &Policy, key: &[u8]) -> Decision {
        let mut h = self.hasher.build_hasher();
        h.write_u64(policy.seed);
        h.write(key);
        self.memory.decide(h.finish(), &policy.gcra_ns)
    }

    /// Decides in Redis (one round trip). Long keys are shortened to a digest.
    pub async fn decide_redis(
        &self,
        redis: &Redis,
        policy: &Policy,
        key: &[u8],
    ) -> Result<Decision, RedisError> {
        let key = policy.redis_key(key);
        let (allowed, remaining, retry_us, reset_us): (i64, i64, i64, i64) = redis
            .run_script(
                &self.script,
                &[&*key],
                &[policy.gcra_us.interval, policy.gcra_us.burst],
            )
            .await?;
        let us = |v: i64| Duration::from_micros(v.max(0) as u64);
        Ok(Decision {
            allowed: allowed == 1,
            remaining: remaining.max(0) as u64,
            retry_after: us(retry_us),
            reset_after: us(reset_us),
        })
    }
}
