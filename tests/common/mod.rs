//! The integration-test harness: real upstream replicas ([`upstream`]), the real `palisade`
//! binary as a child process ([`proxy`]), clients ([`client`]), and certificates and TLS
//! clients made at test time ([`tls`]). Nothing is mocked.
#![allow(dead_code, reason = "each test binary uses a part of the harness")]

pub mod client;
pub mod proxy;
pub mod redis;
pub mod tls;
pub mod upstream;

pub use client::*;
pub use proxy::*;
#[allow(unused_imports, reason = "only the Redis tests use it")]
pub use redis::*;
pub use upstream::*;

use std::future::Future;
use std::time::Duration;

/// Runs `f`, failing the test if it takes longer than `secs` seconds.
pub async fn bounded<F: Future>(secs: u64, f: F) -> F::Output {
    match tokio::time::timeout(Duration::from_secs(secs), f).await {
        Ok(v) => v,
        Err(_) => panic!("test did not finish within {secs} s"),
    }
}

/// Shorthand for a `Duration` of `ms` milliseconds.
pub fn ms(ms: u64) -> Duration {
    Duration::from_millis(ms)
}

/// Asserts that `p` still proxies a plain GET to `up` (after a test's bad input).
pub async fn still_serves(p: &Palisade, up: &Upstream) {
    let before = up.hits();
    let r = get(&http1(), &p.url("/still-ok"), &[]).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(up.hits(), before + 1);
}
