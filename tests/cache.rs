//! The response cache through the real binary: RFC 9111 rules, Cache-Status, stale serving,
//! coalescing, purge, the memory bound, and a shared tier in a real redis-server.

mod common;

use common::*;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

fn cache_config(top: &str, replica: &str, route_cache: &str) -> String {
    format!(
        "{}{top}\n[upstreams.backend]\nreplicas = [\"{replica}\"]\ntimeout = \"5s\"\n\n[[routes]]\nname = \"api\"\nupstream = \"backend\"\ncache = {route_cache}\n",
        base_config("")
    )
}

fn lookups(m: &str, result: &str) -> f64 {
    metric_value(
        m,
        "palisade_cache_lookups_total",
        &[("route", "api"), ("result", result)],
    )
    .unwrap_or(0.0)
}

async fn head(c: &TestClient, url: &str) -> Reply {
    send(c, http::Request::head(url).body(empty()).unwrap()).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn miss_then_hit_with_age_cache_status_head_and_sorted_query() {
    bounded(60, async {
        let up = Upstream::start("a");
        let p = Palisade::start(&cache_config(
            "",
            &up.url(),
            r#"{ ttl = "60s", query = { ignore = ["utm_source"] } }"#,
        ))
        .await;
        let c = http1();
        let first = get(&c, &p.url("/p?b=2&a=1"), &[]).await;
        assert_eq!(first.status, 200);
        assert_eq!(
            first.header("cache-status"),
            Some("palisade; fwd=miss; stored")
        );
        let second = get(&c, &p.url("/p?a=1&b=2&utm_source=mail"), &[]).await;
        assert_eq!(
            second.body, first.body,
            "same key: parameters sorted, utm_source ignored"
        );
        assert!(
            second
                .header("cache-status")
                .unwrap()
                .starts_with("palisade; hit; ttl="),
            "{:?}",
            second.headers
        );
        let ttl: i64 = second
            .header("cache-status")
            .unwrap()
            .rsplit('=')
            .next()
            .unwrap()
            .parse()
            .unwrap();
        assert!((58..=60).contains(&ttl), "ttl {ttl}");
        assert!(
            second.header("age").is_some(),
            "Age on every cached response"
        );
        assert_eq!(
            second.header("x-request-id").map(str::len),
            Some(32),
            "own request id on a hit"
        );
        let h = head(&c, &p.url("/p?a=1&b=2")).await;
        assert_eq!(h.status, 200);
        assert!(h.body.is_empty());
        assert!(
            h.header("cache-status").unwrap().contains("hit"),
            "HEAD is served from the GET entry"
        );
        assert_eq!(
            h.header("content-length"),
            Some(first.body.len().to_string().as_str())
        );
        assert_eq!(up.hits(), 1, "one upstream request for all three");
        let other = get(&c, &p.url("/p?a=2"), &[]).await;
        assert!(other.header("cache-status").unwrap().contains("fwd=miss"));
        assert_eq!(up.hits(), 2);
        let m = p.metrics().await;
        assert_eq!((lookups(&m, "hit"), lookups(&m, "miss")), (2.0, 2.0));
        assert!(metric_value(&m, "palisade_cache_entries", &[("tier", "memory")]).unwrap() >= 2.0);
        assert!(metric_value(&m, "palisade_cache_bytes", &[("tier", "memory")]).unwrap() > 0.0);
        p.wait_log_count(Duration::from_secs(5), 4, |l| l["message"] == "access")
            .await;
        let caches: Vec<String> = p
            .access_logs()
            .iter()
            .map(|l| l["cache"].as_str().unwrap_or("").to_owned())
            .collect();
        assert_eq!(caches, ["miss", "hit", "hit", "miss"]);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hit_carries_the_stored_headers_once_over_http1_and_h2() {
    bounded(60, async {
        let up = Upstream::start("a");
        let p = Palisade::start(&cache_config("", &up.url(), r#"{ ttl = "60s" }"#)).await;
        let url = p.url("/h?hop=1&lm=1");
        let first = get(&http1(), &url, &[]).await;
        assert!(first.header("cache-status").unwrap().contains("stored"));
        let stored = [
            "content-type",
            "content-length",
            "x-replica",
            "x-up-keep",
            "last-modified",
        ];
        for (client, via) in [(http1(), "1.1 palisade"), (h2c(), "2 palisade")] {
            let hit = get(&client, &url, &[]).await;
            assert_eq!(hit.body, first.body);
            assert!(
                hit.header("cache-status").unwrap().contains("hit"),
                "{:?}",
                hit.headers
            );
            for name in stored {
                assert_eq!(
                    hit.headers.get_all(name).iter().collect::<Vec<_>>(),
                    first.headers.get_all(name).iter().collect::<Vec<_>>(),
                    "{name} over {via}"
                );
            }
            for name in ["age", "cache-status", "x-request-id", "date", "via"] {
                assert_eq!(
                    hit.headers.get_all(name).iter().count(),
                    1,
                    "one {name}: {:?}",
                    hit.headers
                );
            }
            assert_eq!(hit.header("via"), Some(via));
            assert_ne!(hit.header("x-request-id"), first.header("x-request-id"));
            assert_eq!(hit.header("date"), first.header("date"), "the stored Date");
            for hop in [
                "x-up-secret",
                "keep-alive",
                "proxy-up",
                "trailer",
                "upgrade",
                "connection",
            ] {
                assert!(
                    hit.header(hop).is_none(),
                    "{hop} over {via}: {:?}",
                    hit.headers
                );
            }
        }
        assert_eq!(up.hits(), 1);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn what_must_not_be_stored_is_fetched_every_time() {
    bounded(60, async {
        let up = Upstream::start("a");
        let p = Palisade::start(&cache_config("", &up.url(), r#"{ ttl = "60s" }"#)).await;
        let c = http1();
        let huge_vary = (0..40)
            .map(|i| format!("x-h{i}"))
            .collect::<Vec<_>>()
            .join(",");
        let cases: Vec<(String, Vec<(&str, &str)>)> = vec![
            ("/private?cc=private".into(), vec![]),
            ("/nostore?cc=no-store".into(), vec![]),
            ("/cookie?cookie=1".into(), vec![]),
            ("/auth".into(), vec![("authorization", "Bearer a")]),
            ("/varystar?vary=*".into(), vec![]),
            (format!("/hugevary?vary={huge_vary}"), vec![]),
            ("/error?status=500".into(), vec![]),
            ("/created?status=201".into(), vec![]),
            ("/reqnostore".into(), vec![("cache-control", "no-store")]),
            ("/nofresh?cc=max-age%3D0".into(), vec![]),
        ];
        for (path, headers) in &cases {
            let before = up.hits();
            for _ in 0..2 {
                let r = get(&c, &p.url(path), headers).await;
                assert!(
                    !r.header("cache-status").unwrap_or("").contains("stored"),
                    "{path}: {:?}",
                    r.headers
                );
            }
            assert_eq!(
                up.hits() - before,
                2,
                "{path} must reach the upstream each time"
            );
        }
        let before = up.hits();
        for _ in 0..2 {
            get(
                &c,
                &p.url("/authpublic?cc=public"),
                &[("authorization", "Bearer a")],
            )
            .await;
        }
        assert_eq!(
            up.hits() - before,
            1,
            "Authorization with a public response is stored"
        );
        let r = get(&c, &p.url("/nostore?cc=no-store"), &[]).await;
        assert_eq!(r.header("cache-status"), Some("palisade; fwd=miss"));
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_lying_about_content_length_is_never_stored() {
    bounded(60, async {
        let up = Upstream::start("a");
        let p = Palisade::start(&cache_config("", &up.url(), r#"{ ttl = "60s" }"#)).await;
        let c = http1();
        for _ in 0..2 {
            let r = try_send(
                &c,
                http::Request::get(p.url("/lie?size=1000&cl=5000"))
                    .body(empty())
                    .unwrap(),
            )
            .await;
            assert!(
                r.is_err(),
                "the client sees a cut-off body, not a short one that looks whole: {r:?}"
            );
        }
        assert_eq!(up.hits(), 2, "an incomplete body was not stored");
        for _ in 0..2 {
            let r = get(
                &c,
                &p.url("/broken?size=100000&fail_after=5000&chunked=1"),
                &[],
            )
            .await;
            let _ = r;
        }
        assert_eq!(up.hits(), 4, "a body broken mid-way was not stored");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vary_selects_variants_and_unkeyed_headers_cannot_poison() {
    bounded(60, async {
        let up = Upstream::start("a");
        let p = Palisade::start(&cache_config("", &up.url(), r#"{ ttl = "60s" }"#)).await;
        let c = http1();
        let de = get(
            &c,
            &p.url("/v?vary=Accept-Language"),
            &[("accept-language", "de")],
        )
        .await;
        let en = get(
            &c,
            &p.url("/v?vary=Accept-Language"),
            &[("accept-language", "en")],
        )
        .await;
        assert_eq!(
            en.header("cache-status"),
            Some("palisade; fwd=vary-miss; stored")
        );
        let de2 = get(
            &c,
            &p.url("/v?vary=Accept-Language"),
            &[("accept-language", "de")],
        )
        .await;
        let en2 = get(
            &c,
            &p.url("/v?vary=Accept-Language"),
            &[("accept-language", "en")],
        )
        .await;
        assert_eq!((de2.body.clone(), en2.body.clone()), (de.body, en.body));
        assert_ne!(de2.body, en2.body);
        assert_eq!(up.hits(), 2);

        let evil = get(
            &c,
            &p.url("/poison"),
            &[
                ("x-forwarded-host", "evil.example"),
                ("x-original-url", "/admin"),
                ("x-rewrite-url", "/admin"),
            ],
        )
        .await;
        let seen = up.seen().into_iter().last().unwrap();
        assert_eq!(
            seen.header("x-original-url"),
            None,
            "override headers are not forwarded on cached routes"
        );
        assert_eq!(seen.header("x-rewrite-url"), None);
        assert_eq!(
            seen.header("x-forwarded-host"),
            Some(p.public.to_string().as_str()),
            "X-Forwarded-Host is ours, not the client's"
        );
        let victim = get(&c, &p.url("/poison"), &[]).await;
        assert_eq!(victim.body, evil.body);
        assert!(
            !victim.text().contains("evil.example") && !victim.text().contains("/admin"),
            "{}",
            victim.text()
        );
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revalidation_conditional_requests_and_only_if_cached() {
    bounded(60, async {
        let up = Upstream::start("a");
        let p = Palisade::start(&cache_config("", &up.url(), r#"{ ttl = "0s" }"#)).await;
        let c = http1();
        let url = p.url("/e?etag=v1&cc=max-age%3D1");
        let first = get(&c, &url, &[]).await;
        assert_eq!(first.header("etag"), Some("\"v1\""));
        let cond = get(&c, &url, &[("if-none-match", "\"v1\"")]).await;
        assert_eq!(
            cond.status, 304,
            "a conditional client request gets 304 from the cache"
        );
        assert_eq!(cond.header("etag"), Some("\"v1\""));
        assert!(cond.header("cache-status").unwrap().contains("hit"));
        let other = get(&c, &url, &[("if-none-match", "\"v0\"")]).await;
        assert_eq!(
            (other.status.as_u16(), other.body.clone()),
            (200, first.body.clone())
        );
        assert_eq!(up.hits(), 1);

        tokio::time::sleep(ms(1100)).await;
        let revalidated = get(&c, &url, &[]).await;
        assert_eq!(revalidated.status, 200);
        assert_eq!(
            revalidated.body, first.body,
            "the 304 refreshed the stored body"
        );
        assert!(
            revalidated
                .header("cache-status")
                .unwrap()
                .starts_with("palisade; fwd=stale; fwd-status=304; ttl="),
            "{:?}",
            revalidated.headers
        );
        assert_eq!(
            up.seen().last().unwrap().header("if-none-match"),
            Some("\"v1\"")
        );
        let fresh_again = get(&c, &url, &[]).await;
        assert!(fresh_again.header("cache-status").unwrap().contains("hit"));
        assert_eq!(up.hits(), 2);

        let forced = get(&c, &url, &[("cache-control", "no-cache")]).await;
        assert!(
            forced
                .header("cache-status")
                .unwrap()
                .starts_with("palisade; fwd=request; fwd-status=304"),
            "{:?}",
            forced.headers
        );
        assert_eq!(up.hits(), 3, "request no-cache revalidates upstream");

        let lm = p.url("/lm?lm=1&cc=max-age%3D60");
        get(&c, &lm, &[]).await;
        let r = get(&c, &lm, &[("if-modified-since", LAST_MODIFIED)]).await;
        assert_eq!(r.status, 304);
        let r = get(
            &c,
            &lm,
            &[("if-modified-since", "Wed, 31 Dec 2025 00:00:00 GMT")],
        )
        .await;
        assert_eq!(r.status, 200);

        let absent = get(
            &c,
            &p.url("/absent"),
            &[("cache-control", "only-if-cached")],
        )
        .await;
        assert_eq!(absent.status, 504);
        assert_eq!(absent.json()["error"]["code"], 504);
        let present = get(&c, &lm, &[("cache-control", "only-if-cached")]).await;
        assert_eq!(present.status, 200);
        assert_eq!(up.hits(), 4, "only-if-cached never goes upstream");
        let m = p.metrics().await;
        assert_eq!(lookups(&m, "revalidated"), 2.0);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unsafe_methods_invalidate_their_url_and_location() {
    bounded(60, async {
        let up = Upstream::start("a");
        let p = Palisade::start(&cache_config("", &up.url(), r#"{ ttl = "60s" }"#)).await;
        let c = http1();
        for path in ["/items/1", "/items/2", "/items/3", "/items/4"] {
            get(&c, &p.url(path), &[]).await;
            get(&c, &p.url(path), &[]).await;
        }
        assert_eq!(up.hits(), 4);
        let post = send(
            &c,
            http::Request::post(p.url("/items/1"))
                .body(full("x"))
                .unwrap(),
        )
        .await;
        assert_eq!(post.header("cache-status"), Some("palisade; fwd=method"));
        let r = get(&c, &p.url("/items/1"), &[]).await;
        assert!(
            r.header("cache-status").unwrap().contains("fwd=miss"),
            "POST invalidated its URL"
        );
        let put = send(
            &c,
            http::Request::put(p.url("/items?loc=/items/2"))
                .body(full("x"))
                .unwrap(),
        )
        .await;
        assert_eq!(put.status, 200);
        let r = get(&c, &p.url("/items/2"), &[]).await;
        assert!(
            r.header("cache-status").unwrap().contains("fwd=miss"),
            "Location invalidated"
        );
        let patch = send(
            &c,
            http::Request::patch(p.url("/items?cloc=/items/4"))
                .body(full("x"))
                .unwrap(),
        )
        .await;
        assert_eq!(patch.status, 200);
        let r = get(&c, &p.url("/items/4"), &[]).await;
        assert!(
            r.header("cache-status").unwrap().contains("fwd=miss"),
            "Content-Location invalidated"
        );
        let failed = send(
            &c,
            http::Request::delete(p.url("/items/3?status=500"))
                .body(empty())
                .unwrap(),
        )
        .await;
        assert_eq!(failed.status, 500);
        let r = get(&c, &p.url("/items/3"), &[]).await;
        assert!(
            r.header("cache-status").unwrap().contains("hit"),
            "a failed DELETE invalidates nothing"
        );
        let m = p.metrics().await;
        assert_eq!(lookups(&m, "bypass"), 4.0);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stale_while_revalidate_refreshes_once_per_key() {
    bounded(60, async {
        let up = Upstream::start("a");
        let p = Palisade::start(&cache_config(
            "",
            &up.url(),
            r#"{ ttl = "1s", stale_while_revalidate = "30s" }"#,
        ))
        .await;
        let c = http1();
        let first = get(&c, &p.url("/s"), &[]).await;
        tokio::time::sleep(ms(1100)).await;
        up.settings.delay_ms.store(400, Ordering::SeqCst);
        let started = Instant::now();
        let mut tasks = Vec::new();
        for _ in 0..10 {
            let (c, url) = (c.clone(), p.url("/s"));
            tasks.push(tokio::spawn(async move { get(&c, &url, &[]).await }));
        }
        for t in tasks {
            let r = t.await.unwrap();
            assert_eq!(r.body, first.body, "served stale at once");
            assert!(
                r.header("cache-status")
                    .unwrap()
                    .ends_with("detail=stale-while-revalidate"),
                "{:?}",
                r.headers
            );
        }
        assert!(
            started.elapsed() < ms(400),
            "no stale request waited for the upstream: {:?}",
            started.elapsed()
        );
        let deadline = Instant::now() + Duration::from_secs(5);
        let refreshed = loop {
            let r = get(&c, &p.url("/s"), &[]).await;
            if r.body != first.body {
                break r;
            }
            assert!(
                Instant::now() < deadline,
                "the background refresh never landed"
            );
            tokio::time::sleep(ms(50)).await;
        };
        assert!(refreshed.header("cache-status").unwrap().contains("hit"));
        assert_eq!(up.hits(), 2, "one background refresh for ten stale hits");
        assert!(lookups(&p.metrics().await, "stale") >= 10.0);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stale_if_error_serves_the_stale_entry_when_the_upstream_fails() {
    bounded(60, async {
        let up = Upstream::start("a");
        let p = Palisade::start(&cache_config(
            "",
            &up.url(),
            r#"{ ttl = "1s", stale_if_error = "60s", query = { ignore = ["status"] } }"#,
        ))
        .await;
        let c = http1();
        let first = get(&c, &p.url("/x"), &[]).await;
        get(&c, &p.url("/y?cc=must-revalidate"), &[]).await;
        tokio::time::sleep(ms(1100)).await;
        let r = get(&c, &p.url("/x?status=503"), &[]).await;
        assert_eq!(
            (r.status.as_u16(), r.body.clone()),
            (200, first.body.clone()),
            "5xx: stale served"
        );
        assert!(
            r.header("cache-status")
                .unwrap()
                .starts_with("palisade; fwd=stale; fwd-status=503"),
            "{:?}",
            r.headers
        );
        let r = get(&c, &p.url("/y?status=503"), &[]).await;
        assert_eq!(r.status, 503, "must-revalidate: never served stale");
        drop(up);
        let r = get(&c, &p.url("/x"), &[]).await;
        assert_eq!(
            (r.status.as_u16(), r.body.clone()),
            (200, first.body.clone()),
            "connect error: stale served"
        );
        assert!(
            r.header("cache-status")
                .unwrap()
                .contains("detail=stale-if-error")
        );
        let r = get(&c, &p.url("/never-stored"), &[]).await;
        assert_eq!(r.status, 502, "nothing stale to serve: the error");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hundred_concurrent_misses_reach_the_upstream_once() {
    bounded(60, async {
        let up = Upstream::start("a");
        up.settings.delay_ms.store(300, Ordering::SeqCst);
        let p = Palisade::start(&cache_config("", &up.url(), r#"{ ttl = "60s" }"#)).await;
        let c = http1();
        let mut tasks = Vec::new();
        for _ in 0..100 {
            let (c, url) = (c.clone(), p.url("/cold"));
            tasks.push(tokio::spawn(async move { get(&c, &url, &[]).await }));
        }
        let mut bodies = Vec::new();
        let mut collapsed = 0;
        for t in tasks {
            let r = t.await.unwrap();
            assert_eq!(r.status, 200);
            collapsed += usize::from(r.header("cache-status").unwrap().contains("collapsed"));
            bodies.push(r.body);
        }
        assert_eq!(collapsed, 99, "the waiters' Cache-Status says collapsed");
        assert_eq!(
            up.hits(),
            1,
            "one upstream request for 100 concurrent misses"
        );
        assert!(bodies.iter().all(|b| *b == bodies[0]));
        let m = p.metrics().await;
        assert_eq!((lookups(&m, "miss"), lookups(&m, "coalesced")), (1.0, 99.0));
    })
    .await;
}

/// Small entries are where per-entry overhead and stray references show: each stored header
/// value must not keep the connection read buffer it was parsed from (8 KiB or more) alive.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_small_entries_stay_within_the_budget() {
    bounded(90, async {
        let up = Upstream::start("a");
        let p = Palisade::start(&cache_config(
            "[cache]\nmemory = \"16MiB\"\n",
            &up.url(),
            r#"{ ttl = "60s" }"#,
        ))
        .await;
        let c = http1();
        get(&c, &p.url("/warm?size=1000"), &[]).await;
        let start = p.rss() >> 20;
        let mut rss_at = Vec::new();
        for round in 0..4 {
            let mut tasks = Vec::new();
            for t in 0..16 {
                let (c, base) = (c.clone(), p.url(""));
                tasks.push(tokio::spawn(async move {
                    for i in 0..1000 {
                        let url = format!("{base}/small/{round}/{t}/{i}?size=1000");
                        let r = get(&c, &url, &[]).await;
                        assert_eq!((r.status.as_u16(), r.body.len()), (200, 1000));
                    }
                }));
            }
            for t in tasks {
                t.await.unwrap();
            }
            rss_at.push(p.rss() >> 20);
        }
        let m = p.metrics().await;
        let entries = metric_value(&m, "palisade_cache_entries", &[("tier", "memory")]).unwrap();
        let bytes = metric_value(&m, "palisade_cache_bytes", &[("tier", "memory")]).unwrap();
        println!(
            "RSS in MiB at start {start}, after each 16k small responses {rss_at:?}; {entries} entries, {bytes} bytes"
        );
        assert!(bytes <= (16 << 20) as f64, "cache bytes {bytes}");
        assert!(entries < 16000.0, "64k URLs do not fit in 16 MiB: {entries}");
        assert!(
            rss_at[3] <= rss_at[1] + 4,
            "RSS must stop growing once the cache is full: {rss_at:?}"
        );
        assert!(
            rss_at[3] < start + 16 + 12,
            "RSS {rss_at:?} MiB from {start} MiB with a 16 MiB cache"
        );
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_stays_within_its_budget() {
    bounded(60, async {
        let up = Upstream::start("a");
        let p = Palisade::start(&cache_config(
            "[cache]\nmemory = \"64MiB\"\nmax_object_size = \"1MiB\"\n",
            &up.url(),
            r#"{ ttl = "60s" }"#,
        ))
        .await;
        let c = http1();
        let mut rss_at = Vec::new();
        for i in 0..300 {
            let r = get(&c, &p.url(&format!("/big/{i}?size=1000000")), &[]).await;
            assert_eq!(r.body.len(), 1_000_000);
            if i % 100 == 99 {
                rss_at.push(p.rss() >> 20);
            }
        }
        println!("RSS in MiB after 100, 200, 300 MB through a 64 MiB cache: {rss_at:?}");
        assert!(
            rss_at[2] <= rss_at[1] + 16,
            "RSS must stop growing once the cache is full: {rss_at:?}"
        );
        assert!(rss_at[2] < 64 + 40, "RSS {rss_at:?} MiB");
        let big = get(&c, &p.url("/huge?size=3000000"), &[]).await;
        assert_eq!(big.body.len(), 3_000_000);
        assert_eq!(
            big.header("cache-status"),
            Some("palisade; fwd=miss"),
            "over max_object_size: streamed, not stored"
        );
        let chunked = get(&c, &p.url("/huge-chunked?size=3000000&chunked=1"), &[]).await;
        assert_eq!(chunked.body.len(), 3_000_000);
        let before = up.hits();
        get(&c, &p.url("/huge-chunked?size=3000000&chunked=1"), &[]).await;
        assert_eq!(
            up.hits(),
            before + 1,
            "a chunked body over max_object_size was not stored"
        );
        let m = p.metrics().await;
        let bytes = metric_value(&m, "palisade_cache_bytes", &[("tier", "memory")]).unwrap();
        assert!(
            bytes <= (64 << 20) as f64 && bytes >= (32 << 20) as f64,
            "cache bytes {bytes}"
        );
        assert!(
            metric_value(&m, "palisade_cache_evictions_total", &[("tier", "memory")]).unwrap()
                > 0.0
        );
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expired_entries_leave_memory_without_any_request() {
    bounded(30, async {
        let up = Upstream::start("a");
        let p = Palisade::start(&cache_config("", &up.url(), r#"{ ttl = "1s" }"#)).await;
        let c = http1();
        for i in 0..200 {
            let r = get(&c, &p.url(&format!("/e/{i}")), &[]).await;
            assert_eq!(r.status, 200);
        }
        let entries = |m: &str| metric_value(m, "palisade_cache_entries", &[("tier", "memory")]);
        assert_eq!(entries(&p.metrics().await), Some(200.0));
        // No request after the fill: the housekeeping thread alone removes what expired.
        tokio::time::sleep(ms(2500)).await;
        let m = p.metrics().await;
        assert_eq!(entries(&m), Some(0.0), "{m}");
        assert_eq!(
            metric_value(&m, "palisade_cache_bytes", &[("tier", "memory")]),
            Some(0.0)
        );
    })
    .await;
}

fn redis_config(redis: &RedisServer, replica: &str) -> String {
    cache_config(
        &format!(
            "[cache]\nredis = {{ url = \"{}\", timeout = \"50ms\" }}\n",
            redis.url()
        ),
        replica,
        r#"{ ttl = "60s" }"#,
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_instances_share_the_redis_tier_corrupt_entries_are_misses_and_purge_reaches_both_tiers()
 {
    bounded(60, async {
        let redis = RedisServer::start();
        let up = Upstream::start("a");
        let a = Palisade::start(&redis_config(&redis, &up.url())).await;
        let b = Palisade::start(&redis_config(&redis, &up.url())).await;
        let c = http1();
        let first = get(&c, &a.url("/shared"), &[]).await;
        redis
            .wait_key("palisade:cache:v1:api:127.0.0.1/shared")
            .await;
        let other = get(&c, &b.url("/shared"), &[]).await;
        assert_eq!(other.body, first.body);
        assert!(
            other.header("cache-status").unwrap().contains("hit"),
            "{:?}",
            other.headers
        );
        assert_eq!(up.hits(), 1, "cached through A, a hit on B");

        for garbage in ["garbage", "PLSC\u{1}\0\0\0\u{9}\u{1}\u{ff}"] {
            redis
                .command(&["SET", "palisade:cache:v1:api:127.0.0.1/corrupt", garbage])
                .unwrap();
            let r = get(&c, &b.url("/corrupt"), &[]).await;
            assert_eq!(r.status, 200);
            assert_eq!(
                r.json()["path"],
                "/corrupt",
                "a corrupt entry is a miss, answered by the origin"
            );
            b.admin_get("/healthz").await;
            let purge = purge(&b, r#"{"url": "http://127.0.0.1/corrupt"}"#).await;
            assert_eq!(purge.status, 200, "{}", purge.text());
        }

        let r = purge(&a, r#"{"route": "api"}"#).await;
        assert_eq!(r.status, 200, "{}", r.text());
        assert_eq!(r.json()["memory"], 1);
        assert!(r.json()["redis"].as_u64().unwrap() >= 1, "{}", r.text());
        assert_eq!(
            redis
                .command(&["EXISTS", "palisade:cache:v1:api:127.0.0.1/shared"])
                .unwrap(),
            ":0\r\n"
        );
        get(&c, &a.url("/products/1"), &[]).await;
        get(&c, &a.url("/products/2"), &[]).await;
        get(&c, &a.url("/other"), &[]).await;
        redis
            .wait_key("palisade:cache:v1:api:127.0.0.1/other")
            .await;
        let r = purge(&a, r#"{"prefix": "/products/"}"#).await;
        assert_eq!(
            (r.json()["memory"].as_u64(), r.json()["redis"].as_u64()),
            (Some(2), Some(2)),
            "{}",
            r.text()
        );
        assert!(
            get(&c, &a.url("/other"), &[])
                .await
                .header("cache-status")
                .unwrap()
                .contains("hit")
        );
        assert_eq!(purge(&a, r#"{"route": "nope"}"#).await.status, 404);
        assert_eq!(purge(&a, r#"{"colour": "red"}"#).await.status, 400);
        assert_eq!(purge(&a, "not json").await.status, 400);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_instances_share_a_redis_cluster_tier() {
    bounded(60, async {
        let cluster = RedisCluster::start();
        let up = Upstream::start("a");
        let config = cache_config(
            &format!(
                "[cache]\nredis = {{ url = \"{}\", timeout = \"500ms\" }}\n",
                cluster.url()
            ),
            &up.url(),
            r#"{ ttl = "60s" }"#,
        );
        let a = Palisade::start(&config).await;
        let b = Palisade::start(&config).await;
        let c = http1();
        // Keys on several slots, so on more than one node.
        for i in 0..6 {
            let path = format!("/clustered/{i}");
            let first = get(&c, &a.url(&path), &[]).await;
            cluster
                .wait_key(&format!("palisade:cache:v1:api:127.0.0.1{path}"))
                .await;
            let other = get(&c, &b.url(&path), &[]).await;
            assert_eq!(other.body, first.body);
            assert!(
                other.header("cache-status").unwrap().contains("hit"),
                "{path}: {:?}",
                other.headers
            );
        }
        assert_eq!(up.hits(), 6, "each URL cached through A, a hit on B");
    })
    .await;
}

async fn purge(p: &Palisade, body: &str) -> Reply {
    send(
        &http1(),
        http::Request::post(format!("http://{}/admin/purge", p.admin))
            .body(full(body.to_owned()))
            .unwrap(),
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_killed_under_load_fails_no_request_and_is_used_again_after_restart() {
    bounded(60, async {
        let mut redis = RedisServer::start();
        let up = Upstream::start("a");
        let p = Arc::new(Palisade::start(&redis_config(&redis, &up.url())).await);
        let c = http1();
        let load = |p: Arc<Palisade>, c: TestClient, tag: &'static str| async move {
            let mut failed = 0;
            for i in 0..150 {
                match try_send(
                    &c,
                    http::Request::get(p.url(&format!("/load/{tag}/{}", i % 30)))
                        .body(empty())
                        .unwrap(),
                )
                .await
                {
                    Ok(r) if r.status == 200 => {}
                    _ => failed += 1,
                }
            }
            failed
        };
        let during = tokio::spawn(load(p.clone(), c.clone(), "a"));
        tokio::time::sleep(ms(30)).await;
        redis.kill();
        assert_eq!(
            during.await.unwrap(),
            0,
            "zero failed requests while Redis died"
        );
        assert_eq!(
            load(p.clone(), c.clone(), "b").await,
            0,
            "zero failed requests with Redis down"
        );
        let errors = metric_value(
            &p.metrics().await,
            "palisade_redis_errors_total",
            &[("use", "cache")],
        )
        .unwrap();
        assert!(errors >= 1.0, "Redis failures are counted: {errors}");
        redis.restart();
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut i = 0;
        loop {
            i += 1;
            let key = format!("/after/{i}");
            get(&c, &p.url(&key), &[]).await;
            tokio::time::sleep(ms(100)).await;
            if redis
                .command(&["EXISTS", &format!("palisade:cache:v1:api:127.0.0.1{key}")])
                .unwrap_or_default()
                .starts_with(":1")
            {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "the Redis tier was not used again within 10 s"
            );
        }
    })
    .await;
}
