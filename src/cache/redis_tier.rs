//! The shared tier: every variant of a URL as one Redis value, so that instances sharing a
//! Redis (or Redis Cluster) serve what any of them stored.
//!
//! Values are a versioned binary encoding ([`encode`], [`decode`]); anything that does not
//! decode exactly (corrupt, truncated, another version) is a miss, never an error or a garbage
//! response. Keys are `palisade:cache:v1:ROUTE:HOST/PATH?QUERY`; each expires when its last
//! stale window ends.

use super::key::CacheKey;
use super::memory::{CachedResponse, MAX_VARIANTS, Variants};
use super::policy::Freshness;
use crate::redis::{Redis, RedisError};
use bytes::{BufMut, Bytes, BytesMut};
use http::{HeaderMap, HeaderName, HeaderValue, StatusCode};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Prefix of every cache key in Redis.
pub const KEY_PREFIX: &str = "palisade:cache:v1:";
const MAGIC: &[u8; 4] = b"PLSC";
const VERSION: u8 = 1;
const MAX_HEADERS: usize = 512;
/// Keys one purge may look at, at most (SCAN is bounded in work and time).
const MAX_SCAN_STEPS: usize = 2_000;
const MAX_SCAN_TIME: Duration = Duration::from_secs(10);

/// The Redis tier of the cache.
#[derive(Clone)]
pub struct RedisTier {
    redis: Redis,
    max_body: u64,
}

/// The Redis key of a URL.
pub fn redis_key(key: &CacheKey) -> String {
    format!("{KEY_PREFIX}{}", key.as_str())
}

impl RedisTier {
    /// Wraps a shared connection; entries with bodies over `max_body` are refused on read.
    pub fn new(redis: Redis, max_body: u64) -> Self {
        RedisTier { redis, max_body }
    }

    /// The connection (compared on reload).
    pub fn redis(&self) -> &Redis {
        &self.redis
    }

    /// Every variant stored for `key`; `Ok(None)` when absent or undecodable.
    pub async fn get(&self, key: &CacheKey) -> Result<Option<Variants>, RedisError> {
        let raw: Option<Vec<u8>> = self
            .redis
            .query(redis::cmd("GET").arg(redis_key(key)))
            .await?;
        Ok(raw.and_then(|r| decode(Bytes::from(r), key, self.max_body)))
    }

    /// Writes every variant of a URL, expiring when the last can no longer be used.
    pub async fn put(&self, v: &Variants, now_ms: u64) -> Result<(), RedisError> {
        let ttl = v.useless_after_ms().saturating_sub(now_ms);
        if ttl == 0 {
            return Ok(());
        }
        let blob = encode(v);
        self.redis
            .query::<()>(
                redis::cmd("SET")
                    .arg(redis_key(&v.key))
                    .arg(&blob[..])
                    .arg("PX")
                    .arg(ttl),
            )
            .await
    }

    /// Deletes URLs; how many existed.
    pub async fn delete(&self, keys: &[String]) -> Result<u64, RedisError> {
        if keys.is_empty() {
            return Ok(0);
        }
        let mut total = 0;
        for k in keys {
            total += self.redis.query::<u64>(redis::cmd("DEL").arg(k)).await?;
        }
        Ok(total)
    }

    /// Deletes every key matching the glob `pattern` whose text satisfies `pred`; how many.
    /// Bounded: at most [`MAX_SCAN_STEPS`] SCAN calls and [`MAX_SCAN_TIME`].
    pub async fn purge_matching(
        &self,
        pattern: &str,
        pred: impl Fn(&str) -> bool,
    ) -> Result<u64, RedisError> {
        let started = Instant::now();
        let mut cursor: u64 = 0;
        let mut purged = 0;
        for _ in 0..MAX_SCAN_STEPS {
            let (next, keys): (u64, Vec<String>) = self
                .redis
                .query(
                    redis::cmd("SCAN")
                        .arg(cursor)
                        .arg("MATCH")
                        .arg(pattern)
                        .arg("COUNT")
                        .arg(1000),
                )
                .await?;
            let doomed: Vec<String> = keys.into_iter().filter(|k| pred(k)).collect();
            purged += self.delete(&doomed).await?;
            cursor = next;
            if cursor == 0 || started.elapsed() > MAX_SCAN_TIME {
                break;
            }
        }
        Ok(purged)
    }
}

/// Escapes glob characters for SCAN MATCH.
pub fn glob_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        if matches!(c, '*' | '?' | '[' | ']' | '\\') {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

fn put_bytes(b: &mut BytesMut, v: &[u8]) {
    b.put_u32(v.len() as u32);
    b.put_slice(v);
}

/// Encodes a URL's variants: magic, version, then each entry's status, times, selecting
/// header values, headers and body, each length-prefixed.
pub fn encode(v: &Variants) -> Bytes {
    let mut b = BytesMut::with_capacity(encoded_len(v));
    b.put_slice(MAGIC);
    b.put_u8(VERSION);
    b.put_u32(v.key.path_start() as u32);
    b.put_u8(v.entries.len() as u8);
    for e in &v.entries {
        let f = &e.freshness;
        b.put_u16(e.status.as_u16());
        for n in [f.stored_at_ms, f.fresh_ms, f.swr_ms, f.sie_ms] {
            b.put_u64(n);
        }
        b.put_u16(e.vary.len() as u16);
        for (name, value) in &e.vary {
            put_bytes(&mut b, name.as_str().as_bytes());
            match value {
                Some(val) => {
                    b.put_u8(1);
                    put_bytes(&mut b, val.as_bytes());
                }
                None => b.put_u8(0),
            }
        }
        b.put_u16(e.headers.len() as u16);
        for (name, value) in &e.headers {
            put_bytes(&mut b, name.as_str().as_bytes());
            put_bytes(&mut b, value.as_bytes());
        }
        put_bytes(&mut b, &e.body);
    }
    let sum = checksum(&b);
    b.put_u64(sum);
    debug_assert_eq!(b.len(), encoded_len(v));
    b.freeze()
}

/// The exact length of [`encode`]'s output.
fn encoded_len(v: &Variants) -> usize {
    let entry = |e: &CachedResponse| {
        let vary: usize = e
            .vary
            .iter()
            .map(|(n, v)| 4 + n.as_str().len() + 1 + v.as_ref().map_or(0, |v| 4 + v.len()))
            .sum();
        let headers: usize = e
            .headers
            .iter()
            .map(|(n, v)| 8 + n.as_str().len() + v.len())
            .sum();
        2 + 4 * 8 + 2 + vary + 2 + headers + 4 + e.body.len()
    };
    MAGIC.len() + 1 + 4 + 1 + v.entries.iter().map(|e| entry(e)).sum::<usize>() + 8
}

/// A fast 64-bit checksum of the encoding (stable across builds), so that a flipped byte
/// anywhere, body included, makes the entry a miss.
fn checksum(data: &[u8]) -> u64 {
    const K: u64 = 0x9E37_79B9_7F4A_7C15;
    let mut h: u64 = data.len() as u64 ^ K;
    let mut chunks = data.chunks_exact(8);
    for c in &mut chunks {
        let w = u64::from_le_bytes(c.try_into().unwrap_or([0; 8]));
        h = (h ^ w).wrapping_mul(K).rotate_left(29);
    }
    for &b in chunks.remainder() {
        h = (h ^ u64::from(b)).wrapping_mul(K).rotate_left(29);
    }
    h ^ (h >> 32)
}

struct Reader {
    buf: Bytes,
    at: usize,
}

impl Reader {
    fn take(&mut self, n: usize) -> Option<Bytes> {
        let end = self.at.checked_add(n)?;
        if end > self.buf.len() {
            return None;
        }
        let s = self.buf.slice(self.at..end);
        self.at = end;
        Some(s)
    }
    fn u8(&mut self) -> Option<u8> {
        self.take(1).map(|b| b[0])
    }
    fn u16(&mut self) -> Option<u16> {
        self.take(2).map(|b| u16::from_be_bytes([b[0], b[1]]))
    }
    fn u32(&mut self) -> Option<u32> {
        self.take(4)
            .map(|b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }
    fn u64(&mut self) -> Option<u64> {
        self.take(8)
            .map(|b| u64::from_be_bytes(b[..8].try_into().unwrap_or([0; 8])))
    }
    fn bytes(&mut self) -> Option<Bytes> {
        let n = self.u32()? as usize;
        self.take(n)
    }
}

/// Decodes what [`encode`] wrote for `key`; `None` for anything else.
pub fn decode(buf: Bytes, key: &CacheKey, max_body: u64) -> Option<Variants> {
    let split = buf.len().checked_sub(8)?;
    let sum = u64::from_be_bytes(buf[split..].try_into().ok()?);
    if checksum(&buf[..split]) != sum {
        return None;
    }
    let mut r = Reader {
        buf: buf.slice(..split),
        at: 0,
    };
    if &r.take(4)?[..] != MAGIC || r.u8()? != VERSION {
        return None;
    }
    if r.u32()? as usize != key.path_start() {
        return None;
    }
    let n = r.u8()? as usize;
    if n == 0 || n > MAX_VARIANTS {
        return None;
    }
    let mut entries = Vec::with_capacity(n);
    for _ in 0..n {
        let status = StatusCode::from_u16(r.u16()?).ok()?;
        let freshness = Freshness {
            stored_at_ms: r.u64()?,
            fresh_ms: r.u64()?,
            swr_ms: r.u64()?,
            sie_ms: r.u64()?,
        };
        let nv = r.u16()? as usize;
        if nv > super::policy::MAX_VARY {
            return None;
        }
        let mut vary = Vec::with_capacity(nv);
        for _ in 0..nv {
            let name = HeaderName::from_bytes(&r.bytes()?).ok()?;
            let value = match r.u8()? {
                0 => None,
                1 => Some(HeaderValue::from_maybe_shared(r.bytes()?).ok()?),
                _ => return None,
            };
            vary.push((name, value));
        }
        let nh = r.u16()? as usize;
        if nh > MAX_HEADERS {
            return None;
        }
        let mut headers = HeaderMap::with_capacity(nh);
        for _ in 0..nh {
            let name = HeaderName::from_bytes(&r.bytes()?).ok()?;
            let value = HeaderValue::from_maybe_shared(r.bytes()?).ok()?;
            headers.append(name, value);
        }
        let body = r.bytes()?;
        if body.len() as u64 > max_body {
            return None;
        }
        if let Some(cl) = headers.get(http::header::CONTENT_LENGTH)
            && cl.to_str().ok()?.parse::<usize>().ok()? != body.len()
        {
            return None;
        }
        entries.push(Arc::new(CachedResponse::new(
            status, &headers, body, freshness, vary,
        )));
    }
    if r.at != r.buf.len() {
        return None;
    }
    Some(Variants {
        key: key.clone(),
        entries,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::QueryKey;

    fn sample() -> Variants {
        let mut headers = HeaderMap::new();
        headers.insert("content-type", HeaderValue::from_static("text/plain"));
        headers.insert("content-length", HeaderValue::from_static("5"));
        headers.insert("etag", HeaderValue::from_static("\"v1\""));
        let e = CachedResponse::new(
            StatusCode::OK,
            &headers,
            Bytes::from_static(b"hello"),
            Freshness {
                stored_at_ms: 1,
                fresh_ms: 2,
                swr_ms: 3,
                sie_ms: 4,
            },
            vec![
                (
                    http::header::ACCEPT_LANGUAGE,
                    Some(HeaderValue::from_static("de")),
                ),
                (http::header::ACCEPT_ENCODING, None),
            ],
        );
        Variants {
            key: CacheKey::new("r", "h", "/p", Some("a=1"), &QueryKey::All),
            entries: vec![Arc::new(e)],
        }
    }

    #[test]
    fn round_trip() {
        let v = sample();
        let d = decode(encode(&v), &v.key, 1 << 20).expect("decodes");
        let (a, b) = (&v.entries[0], &d.entries[0]);
        assert_eq!(
            (a.status, &a.headers, &a.body, a.freshness, &a.vary),
            (b.status, &b.headers, &b.body, b.freshness, &b.vary)
        );
        assert_eq!(
            (&a.head.lines, a.head.length, a.head.date),
            (&b.head.lines, b.head.length, b.head.date)
        );
    }

    #[test]
    fn corrupt_input_is_a_miss() {
        let v = sample();
        let good = encode(&v);
        assert!(decode(Bytes::new(), &v.key, 1 << 20).is_none());
        assert!(
            decode(
                Bytes::from_static(b"garbage that is not an entry"),
                &v.key,
                1 << 20
            )
            .is_none()
        );
        for cut in 0..good.len() {
            assert!(
                decode(good.slice(..cut), &v.key, 1 << 20).is_none(),
                "truncated at {cut}"
            );
        }
        let mut longer = good.to_vec();
        longer.push(0);
        assert!(decode(Bytes::from(longer), &v.key, 1 << 20).is_none());
        let mut other_version = good.to_vec();
        other_version[4] = 9;
        assert!(decode(Bytes::from(other_version), &v.key, 1 << 20).is_none());
        let mut rng = fastrand::Rng::with_seed(7);
        for _ in 0..2000 {
            let mut b = good.to_vec();
            let i = rng.usize(..b.len());
            b[i] ^= rng.u8(1..);
            assert!(
                decode(Bytes::from(b), &v.key, 1 << 20).is_none(),
                "byte {i} flipped"
            );
        }
        assert!(
            decode(good, &v.key, 2).is_none(),
            "bodies over max_object_size are refused"
        );
    }
}
