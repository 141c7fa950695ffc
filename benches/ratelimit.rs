//! Rate-limit hot path: one memory-limiter decision, and the memory store's bound under a
//! million distinct clients.

use criterion::{Criterion, criterion_group, criterion_main};
use palisade::ratelimit::gcra::Gcra;
use palisade::ratelimit::memory::MemoryStore;
use palisade::ratelimit::{Missing, Policy, PolicySpec, RateLimiter, identity::KeyPart};
use std::hint::black_box;
use std::time::Duration;

fn decisions(c: &mut Criterion) {
    let store = MemoryStore::new(1_000_000);
    let gcra = Gcra::new(1_000_000, Duration::from_secs(1), 1_000);
    let mut key = 0u64;
    c.bench_function("memory decision, one client", |b| {
        b.iter(|| store.decide(black_box(42), &gcra))
    });
    c.bench_function("memory decision, 100k clients cycling", |b| {
        b.iter(|| {
            key = (key + 1) % 100_000;
            store.decide(black_box(key.wrapping_mul(0x9E37_79B9_7F4A_7C15)), &gcra)
        })
    });
    let limiter = RateLimiter::new(1_000_000);
    let policy = Policy::new(PolicySpec {
        name: "bench".into(),
        per: vec![KeyPart::ClientIp],
        count: 1_000_000,
        period: Duration::from_secs(1),
        burst: 1000,
        missing: Missing::ClientIp,
        headers: true,
    });
    let headers = http::HeaderMap::new();
    let uri: http::Uri = "/".parse().unwrap();
    let ip: std::net::IpAddr = "192.0.2.1".parse().unwrap();
    c.bench_function("client_ip key + memory decision", |b| {
        b.iter(|| {
            let k = limiter.key(&policy, black_box(ip), &headers, &uri).unwrap();
            limiter.decide_local(&policy, &k)
        })
    });
}

fn bound(c: &mut Criterion) {
    // A million distinct clients against a store bounded at 100,000: the store never holds more.
    let store = MemoryStore::new(100_000);
    let gcra = Gcra::new(1, Duration::from_secs(3600), 1);
    c.bench_function("1M distinct clients into a 100k-key store", |b| {
        b.iter(|| {
            for i in 0..1_000_000u64 {
                store.decide_at(i.wrapping_mul(0x9E37_79B9_7F4A_7C15), &gcra, 0);
            }
        })
    });
    let held = store.len();
    assert!(held <= store.capacity());
    println!(
        "entries held after 1M distinct clients: {held} (capacity {})",
        store.capacity()
    );
}

criterion_group! {
    name = benches;
    config = Criterion::default().measurement_time(Duration::from_secs(2)).warm_up_time(Duration::from_millis(500)).sample_size(20);
    targets = decisions, bound
}
criterion_main!(benches);
