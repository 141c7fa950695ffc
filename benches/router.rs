//! `Router::find` with 10 and 1,000 routes: exact hosts, `*.suffix` wildcards, any-host routes,
//! prefixes of several lengths and method lists. The same lookups run against both tables, so
//! the two timings compare the cost of matching alone.

use criterion::{BenchmarkId, Criterion, black_box, criterion_group, criterion_main};
use http::Method;
use palisade::config::{HostPattern, RouteSpec};
use palisade::router::{RouteMatch, Router};
use std::time::Duration;

/// `n` routes in four shapes, plus `*.example.com/` and a catch-all `/`.
fn routes(n: usize) -> Vec<RouteSpec> {
    let mut out: Vec<RouteSpec> = (0..n)
        .map(|i| {
            let (host, path_prefix, methods) = match i % 4 {
                0 => (
                    Some(HostPattern::Exact(format!("h{}.api.test", i % 50))),
                    format!("/v1/r{i}/"),
                    Some(vec![Method::GET, Method::HEAD]),
                ),
                1 => (
                    Some(HostPattern::Wildcard(format!(".t{}.example.com", i % 20))),
                    format!("/r{i}"),
                    None,
                ),
                2 => (None, format!("/any/{i}/items"), Some(vec![Method::POST])),
                _ => (
                    Some(HostPattern::Exact(format!("h{}.api.test", i % 50))),
                    format!("/v2/r{i}"),
                    None,
                ),
            };
            RouteSpec {
                name: format!("route-{i}"),
                host,
                path_prefix,
                methods,
                upstream: 0,
                rate_limit: None,
                cache: None,
            }
        })
        .collect();
    out.push(RouteSpec {
        name: "wild".into(),
        host: Some(HostPattern::Wildcard(".example.com".into())),
        path_prefix: "/".into(),
        methods: None,
        upstream: 0,
        rate_limit: None,
        cache: None,
    });
    out.push(RouteSpec {
        name: "default".into(),
        host: None,
        path_prefix: "/".into(),
        methods: None,
        upstream: 0,
        rate_limit: None,
        cache: None,
    });
    out
}

/// Lookups that exist in both tables: exact host, wildcard, any host, fall-throughs.
const LOOKUPS: &[(&str, &str, Method)] = &[
    ("h0.api.test", "/v1/r0/items/42", Method::GET),
    ("a.t1.example.com", "/r1/orders?x=1", Method::GET),
    ("other.org", "/any/2/items/7", Method::POST),
    ("h3.api.test", "/v2/r3", Method::DELETE),
    ("h0.api.test", "/v1/r0/items/42", Method::POST),
    ("deep.sub.example.com", "/static/app.js", Method::GET),
    ("other.org", "/nothing/here", Method::GET),
];

fn bench(c: &mut Criterion) {
    let mut group = c.benchmark_group("router_find");
    for n in [10, 1_000] {
        let router = Router::new(&routes(n));
        for (host, path, method) in LOOKUPS {
            assert!(matches!(
                router.find(host, path, method),
                RouteMatch::Found(_)
            ));
        }
        group.bench_with_input(BenchmarkId::new("mixed_lookup", n), &router, |b, r| {
            b.iter(|| {
                for (host, path, method) in LOOKUPS {
                    black_box(r.find(black_box(host), black_box(path), method));
                }
            })
        });
    }
    group.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .warm_up_time(Duration::from_millis(300))
        .measurement_time(Duration::from_secs(1))
        .sample_size(20);
    targets = bench
}
criterion_main!(benches);
