//! Per-client rate limits through the real binary: identity, GCRA, headers, named policies,
//! and global limits in a real redis-server that the tests kill and restart.

mod common;

use common::*;
use std::sync::Arc;
use std::time::{Duration, Instant};

fn limited_config(server_extra: &str, top: &str, replica: &str, route_limit: &str) -> String {
    format!(
        "{}{top}\n[upstreams.backend]\nreplicas = [\"{replica}\"]\n\n[[routes]]\nname = \"api\"\nupstream = \"backend\"\nrate_limit = {route_limit}\n",
        base_config(server_extra)
    )
}

fn status_counts(replies: &[u16]) -> (usize, usize, usize) {
    let ok = replies.iter().filter(|s| **s == 200).count();
    let limited = replies.iter().filter(|s| **s == 429).count();
    (ok, limited, replies.len() - ok - limited)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn burst_then_429_with_standard_headers() {
    bounded(60, async {
        let up = Upstream::start("a");
        let p = Palisade::start(&limited_config(
            "",
            "",
            &up.url(),
            r#"{ limit = "1/min", burst = 3 }"#,
        ))
        .await;
        let c = http1();
        for i in 0..3 {
            let r = get(&c, &p.url("/x"), &[]).await;
            assert_eq!(r.status, 200, "request {i}");
            assert_eq!(r.header("ratelimit-policy"), Some("\"api\";q=1;w=60"));
            assert_eq!(
                r.header("ratelimit")
                    .map(|v| v.split(";t=").next().unwrap().to_owned()),
                Some(format!("\"api\";r={}", 2 - i))
            );
        }
        let r = get(&c, &p.url("/x"), &[]).await;
        assert_eq!(r.status, 429, "{}", r.text());
        assert_eq!(r.json()["error"]["code"], 429);
        let retry: u64 = r
            .header("retry-after")
            .expect("Retry-After")
            .parse()
            .unwrap();
        assert!(
            (59..=60).contains(&retry),
            "Retry-After {retry}: burst of 3 spent, then one a minute"
        );
        assert!(r.header("ratelimit").unwrap().starts_with("\"api\";r=0;t="));
        assert_eq!(r.header("ratelimit-policy"), Some("\"api\";q=1;w=60"));
        assert!(r.header("x-request-id").is_some());
        assert_eq!(
            up.hits(),
            3,
            "the refused request never reached the upstream"
        );
        let m = p.metrics().await;
        assert_eq!(
            metric_value(
                &m,
                "palisade_ratelimit_decisions_total",
                &[("route", "api"), ("decision", "allowed")]
            ),
            Some(3.0)
        );
        assert_eq!(
            metric_value(
                &m,
                "palisade_ratelimit_decisions_total",
                &[("route", "api"), ("decision", "limited")]
            ),
            Some(1.0)
        );
        assert_eq!(
            metric_value(
                &m,
                "palisade_requests_total",
                &[("route", "api"), ("code", "429")]
            ),
            Some(1.0)
        );
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn headers_can_be_turned_off_and_steady_rate_refills() {
    bounded(60, async {
        let up = Upstream::start("a");
        let p = Palisade::start(&limited_config(
            "",
            "",
            &up.url(),
            r#"{ limit = "20/s", burst = 1, headers = false }"#,
        ))
        .await;
        let c = http1();
        let r = get(&c, &p.url("/x"), &[]).await;
        assert_eq!(r.status, 200);
        assert_eq!(r.header("ratelimit"), None);
        assert_eq!(get(&c, &p.url("/x"), &[]).await.status, 429);
        tokio::time::sleep(ms(60)).await;
        assert_eq!(
            get(&c, &p.url("/x"), &[]).await.status,
            200,
            "one interval (50 ms) later one more passes"
        );
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_forwarding_headers_do_not_dodge_the_limit() {
    bounded(60, async {
        let up = Upstream::start("a");
        let p = Palisade::start(&limited_config(
            "",
            "",
            &up.url(),
            r#"{ per = "client_ip", limit = "1/min", burst = 2 }"#,
        ))
        .await;
        let c = http1();
        let mut statuses = Vec::new();
        for i in 0..6 {
            let xff = format!("203.0.113.{i}");
            let fwd = format!("for=198.51.100.{i}");
            statuses.push(
                get(
                    &c,
                    &p.url("/x"),
                    &[("x-forwarded-for", &xff), ("forwarded", &fwd)],
                )
                .await
                .status
                .as_u16(),
            );
        }
        assert_eq!(
            statuses,
            [200, 200, 429, 429, 429, 429],
            "an untrusted peer's X-Forwarded-For is ignored"
        );
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trusted_proxy_clients_are_limited_apart_and_malformed_forwarded_falls_back() {
    bounded(60, async {
        let up = Upstream::start("a");
        let server = r#"trusted_proxies = ["127.0.0.1/32"]"#;
        let p = Palisade::start(&limited_config(
            server,
            "",
            &up.url(),
            r#"{ limit = "1/min", burst = 1 }"#,
        ))
        .await;
        let c = http1();
        // Behind the trusted proxy: the right-most untrusted address is the client.
        for client in ["203.0.113.1", "203.0.113.2"] {
            let xff = format!("6.6.6.6, {client}");
            assert_eq!(
                get(&c, &p.url("/x"), &[("x-forwarded-for", &xff)])
                    .await
                    .status,
                200,
                "{client}"
            );
        }
        assert_eq!(
            get(
                &c,
                &p.url("/x"),
                &[("x-forwarded-for", "9.9.9.9, 203.0.113.1")]
            )
            .await
            .status,
            429,
            "the left part cannot change who you are"
        );
        // Forwarded is used when X-Forwarded-For is absent.
        assert_eq!(
            get(
                &c,
                &p.url("/x"),
                &[("forwarded", "for=\"[2001:db8::7]:443\"")]
            )
            .await
            .status,
            200
        );
        assert_eq!(
            get(&c, &p.url("/x"), &[("forwarded", "for=2001:db8::7")])
                .await
                .status,
            429
        );
        // Malformed values cannot pick a fresh identity: they fall back to the proxy's address.
        assert_eq!(
            get(&c, &p.url("/x"), &[("forwarded", "for=garbage;;==")])
                .await
                .status,
            200
        );
        for bad in ["for=also-garbage", "for=\"[zz]\"", "for=;"] {
            assert_eq!(
                get(&c, &p.url("/x"), &[("forwarded", bad)]).await.status,
                429,
                "{bad}"
            );
        }
        assert_eq!(
            get(&c, &p.url("/x"), &[("x-forwarded-for", "not-an-ip")])
                .await
                .status,
            429
        );
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn header_and_query_keys_missing_and_huge() {
    bounded(60, async {
        let up = Upstream::start("a");
        let config = format!(
            "{}[upstreams.backend]\nreplicas = [\"{}\"]\n\n[[routes]]\nname = \"keyed\"\nmatch = {{ path_prefix = \"/keyed\" }}\nupstream = \"backend\"\nrate_limit = {{ per = \"header:X-API-Key\", limit = \"1/min\", burst = 1, missing = \"deny\" }}\n\n[[routes]]\nname = \"fallback\"\nmatch = {{ path_prefix = \"/fallback\" }}\nupstream = \"backend\"\nrate_limit = {{ per = [\"query:key\"], limit = \"1/min\", burst = 1, missing = \"client_ip\" }}\n",
            base_config("max_header_bytes = \"1MiB\""),
            up.url()
        );
        let p = Palisade::start(&config).await;
        let c = http1();
        let r = get(&c, &p.url("/keyed"), &[]).await;
        assert_eq!(r.status, 400);
        assert!(r.json()["error"]["message"].as_str().unwrap().contains("header:x-api-key"), "{}", r.text());
        assert_eq!(get(&c, &p.url("/keyed"), &[("x-api-key", "k1")]).await.status, 200);
        assert_eq!(get(&c, &p.url("/keyed"), &[("x-api-key", "k1")]).await.status, 429);
        assert_eq!(get(&c, &p.url("/keyed"), &[("x-api-key", "k2")]).await.status, 200);
        let huge = "k".repeat(100 << 10);
        assert_eq!(get(&c, &p.url("/keyed"), &[("x-api-key", &huge)]).await.status, 200, "a 100 KiB key is a key like any other");
        assert_eq!(get(&c, &p.url("/keyed"), &[("x-api-key", &huge)]).await.status, 429);
        assert_eq!(get(&c, &p.url("/fallback?key=a"), &[]).await.status, 200);
        assert_eq!(get(&c, &p.url("/fallback?key=a"), &[]).await.status, 429);
        assert_eq!(get(&c, &p.url("/fallback?other=1"), &[]).await.status, 200, "no key: limited by address");
        assert_eq!(get(&c, &p.url("/fallback"), &[]).await.status, 429);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn named_policy_is_one_budget_across_routes_and_survives_reload() {
    bounded(60, async {
        let up = Upstream::start("a");
        let config = |extra_route: &str| {
            format!(
                "{}[rate_limits.shared]\nlimit = \"1/min\"\nburst = 2\n\n[upstreams.backend]\nreplicas = [\"{}\"]\n\n[[routes]]\nname = \"a\"\nmatch = {{ path_prefix = \"/a\" }}\nupstream = \"backend\"\nrate_limit = \"shared\"\n\n[[routes]]\nname = \"b\"\nmatch = {{ path_prefix = \"/b\" }}\nupstream = \"backend\"\nrate_limit = \"shared\"\n{extra_route}",
                base_config(""),
                up.url()
            )
        };
        let p = Palisade::start(&config("")).await;
        let c = http1();
        assert_eq!(get(&c, &p.url("/a"), &[]).await.status, 200);
        assert_eq!(get(&c, &p.url("/b"), &[]).await.status, 200);
        assert_eq!(get(&c, &p.url("/a"), &[]).await.status, 429);
        assert_eq!(get(&c, &p.url("/b"), &[]).await.status, 429);
        // A reload that leaves the policy unchanged keeps its state.
        let outcome = p.reload(&config("\n[[routes]]\nname = \"c\"\nmatch = { path_prefix = \"/c\" }\nupstream = \"backend\"\n")).await;
        assert_eq!(outcome["message"], "config reloaded");
        assert_eq!(get(&c, &p.url("/a"), &[]).await.status, 429, "state kept across the reload");
        assert_eq!(get(&c, &p.url("/c"), &[]).await.status, 200);
    })
    .await;
}

/// Sends GETs from `tasks` tasks, each at `per_task_rps`, for `duration`; returns the statuses.
async fn load(urls: Vec<String>, tasks: usize, per_task_rps: u64, duration: Duration) -> Vec<u16> {
    let statuses = Arc::new(std::sync::Mutex::new(Vec::new()));
    let mut handles = Vec::new();
    for t in 0..tasks {
        let url = urls[t % urls.len()].clone();
        let statuses = statuses.clone();
        handles.push(tokio::spawn(async move {
            let c = http1();
            let mut tick = tokio::time::interval(Duration::from_micros(1_000_000 / per_task_rps));
            let end = Instant::now() + duration;
            while Instant::now() < end {
                tick.tick().await;
                let s = match try_send(&c, http::Request::get(&url).body(empty()).unwrap()).await {
                    Ok(r) => r.status.as_u16(),
                    Err(_) => 0,
                };
                statuses.lock().unwrap().push(s);
            }
        }));
    }
    for h in handles {
        h.await.unwrap();
    }
    Arc::try_unwrap(statuses).unwrap().into_inner().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn global_limit_across_two_instances_is_exact() {
    bounded(90, async {
        let redis = RedisServer::start();
        let up = Upstream::start("a");
        let top = format!("[rate_limit]\nredis = {{ url = \"{}\", timeout = \"200ms\" }}\n", redis.url());
        let config = limited_config("", &top, &up.url(), r#"{ limit = "40/s", burst = 10 }"#);
        let (a, b) = (Palisade::start(&config).await, Palisade::start(&config).await);
        // 5x the limit, split over both instances, for 10 s.
        let started = Instant::now();
        let statuses = load(vec![a.url("/x"), b.url("/x")], 8, 25, Duration::from_secs(10)).await;
        let elapsed = started.elapsed().as_secs_f64();
        let (ok, limited, other) = status_counts(&statuses);
        let expected = 40.0 * elapsed + 10.0;
        println!("global limit: {ok} admitted, {limited} limited over {elapsed:.2} s; expected {expected:.0}");
        assert_eq!(other, 0, "no errors");
        assert!((ok as f64 - expected).abs() <= expected * 0.05, "admitted {ok}, expected {expected:.0} ± 5%");
        assert!(limited as f64 > 3.0 * expected, "clients sent about 5x the limit");
        let m = a.metrics().await;
        assert_eq!(metric_value(&m, "palisade_redis_errors_total", &[("use", "ratelimit")]), Some(0.0));
    })
    .await;
}

async fn redis_killed_mid_load(on_error: &str) -> (Vec<u16>, Vec<u16>, Vec<u16>, f64) {
    let mut redis = RedisServer::start();
    let up = Upstream::start("a");
    let top = format!(
        "[rate_limit]\nredis = {{ url = \"{}\", timeout = \"50ms\", on_error = \"{on_error}\" }}\n",
        redis.url()
    );
    let p = Palisade::start(&limited_config(
        "",
        &top,
        &up.url(),
        r#"{ limit = "20/s", burst = 5 }"#,
    ))
    .await;
    let before = load(vec![p.url("/x")], 2, 40, Duration::from_secs(1)).await;
    redis.kill();
    let during = load(vec![p.url("/x")], 2, 40, Duration::from_secs(2)).await;
    let errors = metric_value(
        &p.metrics().await,
        "palisade_redis_errors_total",
        &[("use", "ratelimit")],
    )
    .unwrap();
    redis.restart();
    // Give the connection a moment to come back, then Redis decides again.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let e0 = metric_value(
            &p.metrics().await,
            "palisade_redis_errors_total",
            &[("use", "ratelimit")],
        )
        .unwrap();
        let _ = load(vec![p.url("/x")], 1, 20, Duration::from_millis(300)).await;
        let e1 = metric_value(
            &p.metrics().await,
            "palisade_redis_errors_total",
            &[("use", "ratelimit")],
        )
        .unwrap();
        if e1 == e0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "Redis was not used again within 10 s of its restart"
        );
    }
    let after = load(vec![p.url("/x")], 2, 40, Duration::from_secs(1)).await;
    assert!(
        redis.command(&["DBSIZE"]).unwrap().starts_with(":1"),
        "the limiter key is back in Redis"
    );
    (before, during, after, errors)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_down_allow_lets_requests_pass_without_5xx() {
    bounded(90, async {
        let (before, during, after, errors) = redis_killed_mid_load("allow").await;
        let (_, l0, e0) = status_counts(&before);
        let (ok, limited, other) = status_counts(&during);
        assert_eq!(e0, 0);
        assert!(l0 > 0, "the limit applied while Redis was up");
        assert_eq!(other, 0, "no 5xx or failed requests while Redis was down");
        assert!(
            limited <= 2 && ok > 100,
            "allow: requests pass while Redis is down ({ok} ok, {limited} limited)"
        );
        assert!(errors > 0.0, "Redis errors are counted");
        let (_, l2, e2) = status_counts(&after);
        assert_eq!(e2, 0);
        assert!(l2 > 0, "the limit applies again after Redis returned");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_down_deny_refuses_with_429_not_5xx() {
    bounded(90, async {
        let (_, during, after, _) = redis_killed_mid_load("deny").await;
        let (ok, limited, other) = status_counts(&during);
        assert_eq!(other, 0, "429, never 5xx");
        assert!(
            limited > 100 && ok <= 2,
            "deny: refused while Redis is down ({ok} ok, {limited} limited)"
        );
        let (ok2, _, e2) = status_counts(&after);
        assert_eq!(e2, 0);
        assert!(ok2 >= 20, "admitted again after Redis returned");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_down_local_limits_in_memory() {
    bounded(90, async {
        let (_, during, _, _) = redis_killed_mid_load("local").await;
        let (ok, limited, other) = status_counts(&during);
        assert_eq!(other, 0);
        // 2 s at 20/s with burst 5 in this instance's memory: about 45 admitted of ~160.
        assert!(
            (35..=60).contains(&ok),
            "local: limited in memory ({ok} ok, {limited} limited)"
        );
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_redis_at_start_does_not_stop_the_proxy() {
    bounded(60, async {
        let up = Upstream::start("a");
        let top = format!("[rate_limit]\nredis = {{ url = \"redis://{}/0\", timeout = \"20ms\", on_error = \"allow\" }}\n", dead_addr());
        let p = Palisade::start(&limited_config("", &top, &up.url(), r#"{ limit = "1/s" }"#)).await;
        let c = http1();
        for _ in 0..5 {
            assert_eq!(get(&c, &p.url("/x"), &[]).await.status, 200);
        }
        assert!(metric_value(&p.metrics().await, "palisade_redis_errors_total", &[("use", "ratelimit")]).unwrap() >= 5.0);
    })
    .await;
}
