//! The process over time: hot reload on SIGHUP (good and bad files; 20 reloads under load are
//! in reload.rs), the metrics and health endpoints, and graceful shutdown on SIGTERM.

mod common;

use common::*;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

fn two_route_config(a: &Upstream, b: &Upstream, b_prefix: &str) -> String {
    format!(
        "{}[upstreams.a]\nreplicas = [\"{}\"]\n\n[upstreams.b]\nreplicas = [\"{}\"]\n\n[[routes]]\nname = \"b\"\nmatch = {{ path_prefix = \"{b_prefix}\" }}\nupstream = \"b\"\n\n[[routes]]\nname = \"default\"\nupstream = \"a\"\n",
        base_config(""),
        a.url(),
        b.url()
    )
}

async fn replica_of(p: &Palisade, path: &str) -> String {
    let r = get(&http1(), &p.url(path), &[]).await;
    assert_eq!(r.status, 200, "{}", r.text());
    r.json()["replica"].as_str().unwrap().to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_applies_a_changed_route_and_rejects_a_bad_file() {
    bounded(60, async {
        let (a, b) = (Upstream::start("a"), Upstream::start("b"));
        let mut p = Palisade::start(&two_route_config(&a, &b, "/old")).await;
        assert_eq!(replica_of(&p, "/old/1").await, "b");
        assert_eq!(replica_of(&p, "/new/1").await, "a");

        let line = p.reload(&two_route_config(&a, &b, "/new")).await;
        assert_eq!(line["message"], "config reloaded", "{line}");
        assert_eq!(replica_of(&p, "/new/1").await, "b");
        assert_eq!(replica_of(&p, "/old/1").await, "a");

        // An invalid file: the running config stays, and the log says what and where.
        let bad =
            two_route_config(&a, &b, "/other").replace("upstream = \"b\"", "upstream = \"nope\"");
        let line = p.reload(&bad).await;
        assert_eq!(
            line["message"], "config reload rejected; keeping the running config",
            "{line}"
        );
        let path = p.config_path.display().to_string();
        let at = bad.find("\"nope\"").unwrap();
        let lineno = bad[..at].matches('\n').count() + 1;
        let col = at - bad[..at].rfind('\n').unwrap();
        let want = format!("{path}:{lineno}:{col}: routes[0].upstream: unknown upstream \"nope\"");
        let err = line["error"].as_str().unwrap_or_default();
        assert!(
            err.starts_with(&want),
            "{err:?} does not start with {want:?}"
        );
        assert_eq!(
            replica_of(&p, "/new/1").await,
            "b",
            "the running config must stay after a bad reload"
        );

        // A file that is not TOML at all.
        let line = p.reload("[server\nlisten = ").await;
        assert_eq!(
            line["message"], "config reload rejected; keeping the running config",
            "{line}"
        );
        assert!(
            line["error"]
                .as_str()
                .unwrap()
                .starts_with(&format!("{path}:1:")),
            "{line}"
        );
        assert_eq!(replica_of(&p, "/new/2").await, "b");

        let m = p.metrics().await;
        assert_eq!(reload_totals(&m), (Some(1.0), Some(2.0)), "{m}");
        assert!(p.running());
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_and_health_endpoints() {
    bounded(30, async {
        let up = Upstream::start("m");
        let p = Palisade::start(&simple_config("", "", &[up.url()])).await;
        let client = http1();
        for i in 0..3 {
            assert_eq!(
                get(&client, &p.url(&format!("/m/{i}")), &[]).await.status,
                200
            );
        }
        assert_eq!(
            get(&client, &p.url("/m/x?status=503"), &[]).await.status,
            503
        );
        let m = p.metrics().await;
        let r = [("route", "default"), ("method", "GET")];
        assert_eq!(
            metric_value(
                &m,
                "palisade_requests_total",
                &[r[0], r[1], ("code", "200")]
            ),
            Some(3.0),
            "{m}"
        );
        assert_eq!(
            metric_value(
                &m,
                "palisade_requests_total",
                &[r[0], r[1], ("code", "503")]
            ),
            Some(1.0),
            "{m}"
        );
        assert_eq!(
            metric_value(&m, "palisade_request_duration_seconds_count", &[r[0]]),
            Some(4.0),
            "{m}"
        );
        let replica = up.url();
        let u = [("upstream", "backend"), ("replica", replica.as_str())];
        assert_eq!(
            metric_value(
                &m,
                "palisade_upstream_requests_total",
                &[u[0], u[1], ("outcome", "ok")]
            ),
            Some(4.0),
            "{m}"
        );
        assert_eq!(
            metric_value(&m, "palisade_upstream_duration_seconds_count", &u),
            Some(4.0),
            "{m}"
        );
        assert!(
            metric_value(&m, "palisade_connections_active", &[("listener", "public")]).is_some(),
            "{m}"
        );
        assert_eq!(
            metric_value(
                &m,
                "palisade_build_info",
                &[("version", env!("CARGO_PKG_VERSION"))]
            ),
            Some(1.0),
            "{m}"
        );
        assert!(
            m.contains("# TYPE palisade_request_duration_seconds histogram"),
            "{m}"
        );
        assert_eq!(p.admin_get("/healthz").await.0, 200);
        assert_eq!(p.admin_get("/readyz").await.0, 200);
        assert_eq!(p.admin_get("/nope").await.0, 404);

        // The admin paths are not on the public listener: /metrics there is routed upstream.
        let before = up.hits();
        let r = get(&client, &p.url("/metrics"), &[]).await;
        assert_eq!(r.status, 200);
        assert_eq!(
            r.json()["path"],
            "/metrics",
            "public /metrics must reach the upstream"
        );
        assert_eq!(up.hits(), before + 1);
        assert_eq!(
            get(&client, &p.url("/healthz"), &[]).await.json()["replica"],
            "m"
        );
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_paths_are_not_routed_when_no_route_matches() {
    bounded(30, async {
        let up = Upstream::start("m");
        let config = format!(
            "{}[upstreams.u]\nreplicas = [\"{}\"]\n\n[[routes]]\nname = \"api\"\nmatch = {{ path_prefix = \"/api\" }}\nupstream = \"u\"\n",
            base_config(""),
            up.url()
        );
        let p = Palisade::start(&config).await;
        let r = get(&http1(), &p.url("/metrics"), &[]).await;
        assert_eq!(r.status, 404, "{}", r.text());
        assert_eq!(r.json()["error"]["code"], 404);
        assert!(!r.text().contains("palisade_requests_total"));
        // No admin path, however spelled, does anything on the public listener.
        for (method, path) in [
            (http::Method::GET, "/admin/config"),
            (http::Method::GET, "/admin/upstreams"),
            (http::Method::POST, "/admin/reload"),
            (http::Method::POST, "/admin/purge"),
            (http::Method::GET, "/%61dmin/config"),
            (http::Method::GET, "/readyz"),
        ] {
            let req = http::Request::builder()
                .method(method.clone())
                .uri(p.url(path))
                .body(full("{\"prefix\": \"/\"}"))
                .unwrap();
            let r = send(&http1(), req).await;
            assert_eq!(r.status, 404, "{method} {path}: {}", r.text());
            assert_eq!(r.json()["error"]["code"], 404, "{method} {path}");
            for admin_word in ["\"replicas\":", "\"status\":", "\"purged\":", "\"routes\":", "\"server\":"] {
                assert!(!r.text().contains(admin_word), "{method} {path}: {}", r.text());
            }
        }
        assert!(
            !p.logs().iter().any(|l| l["message"] == "config reloaded"),
            "a public POST /admin/reload must not reload"
        );
        let (status, body) = p.admin_get("/metrics").await;
        assert_eq!(status, 200);
        assert!(metric_value(&body, "palisade_requests_total", &[("route", "-"), ("code", "404")]).is_some(), "{body}");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_in_flight_requests_then_exits_0() {
    bounded(60, async {
        let up = Upstream::start("slow");
        let mut p = Palisade::start(&simple_config(
            "drain_timeout = \"10s\"\nworkers = 2",
            "",
            &[up.url()],
        ))
        .await;
        let public = p.public;
        let slow = tokio::spawn({
            let url = p.url("/slow?delay_ms=3000&size=100000");
            async move { get(&http1(), &url, &[]).await }
        });
        while up.state.in_flight.load(Ordering::SeqCst) == 0 {
            tokio::time::sleep(ms(5)).await;
        }
        let sent = Instant::now();
        p.signal(libc::SIGTERM);
        p.wait_log(Duration::from_secs(5), |l| {
            l["message"] == "shutting down: draining connections"
        })
        .await;
        // New connections are refused while the slow request is still in flight.
        let deadline = Instant::now() + Duration::from_secs(2);
        loop {
            match tokio::net::TcpStream::connect(public).await {
                Err(e) => {
                    assert_eq!(e.kind(), std::io::ErrorKind::ConnectionRefused, "{e}");
                    break;
                }
                Ok(_) => assert!(
                    Instant::now() < deadline,
                    "still accepting connections 2 s after SIGTERM"
                ),
            }
            tokio::time::sleep(ms(20)).await;
        }
        assert!(
            !slow.is_finished(),
            "the slow request should still be in flight"
        );
        let r = slow.await.unwrap();
        assert_eq!(r.status, 200);
        assert_eq!(r.body.len(), 100000);
        let status = p.wait_exit(Duration::from_secs(12)).await;
        assert_eq!(status.code(), Some(0), "{}", p.stdout_text());
        assert!(
            sent.elapsed() < Duration::from_secs(10),
            "exit took longer than drain_timeout"
        );
        assert!(
            p.logs().iter().any(|l| l["message"] == "drained; exiting"),
            "{}",
            p.stdout_text()
        );
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_with_a_stuck_request_exits_after_drain_timeout() {
    bounded(30, async {
        let up = Upstream::start("stuck");
        let mut p = Palisade::start(&simple_config(
            "drain_timeout = \"1s\"",
            "timeout = \"60s\"",
            &[up.url()],
        ))
        .await;
        let stuck = tokio::spawn({
            let url = p.url("/stuck?hang=1");
            async move { try_send(&http1(), http::Request::get(url).body(empty()).unwrap()).await }
        });
        while up.hits() == 0 {
            tokio::time::sleep(ms(5)).await;
        }
        let status = p.terminate(Duration::from_secs(10)).await;
        assert_eq!(status.code(), Some(0));
        assert!(
            p.logs().iter().any(
                |l| l["message"] == "drain timeout passed with connections still open; exiting"
            ),
            "{}",
            p.stdout_text()
        );
        assert!(
            stuck.await.unwrap().is_err(),
            "the stuck request cannot have succeeded"
        );
    })
    .await;
}

/// `workers = 3` starts three worker threads, each accepting on the listener; many
/// connections at once are all served, and SIGTERM stops the workers and exits 0.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workers_are_threads_that_each_accept() {
    bounded(60, async {
        let up = Upstream::start("u");
        let mut p = Palisade::start(&simple_config("workers = 3", "", &[up.url()])).await;
        let threads: Vec<String> = std::fs::read_dir(format!("/proc/{}/task", p.pid()))
            .unwrap()
            .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("comm")).ok())
            .map(|c| c.trim().to_owned())
            .collect();
        assert_eq!(
            threads
                .iter()
                .filter(|c| c.starts_with("palisade-worke"))
                .count(),
            3,
            "{threads:?}"
        );
        let c = http1();
        let mut tasks = Vec::new();
        for i in 0..24 {
            let (c, url) = (c.clone(), p.url(&format!("/w/{i}")));
            tasks.push(tokio::spawn(async move {
                for _ in 0..5 {
                    assert_eq!(get(&c, &url, &[]).await.status, 200);
                }
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
        assert_eq!(up.hits(), 120);
        p.signal(libc::SIGTERM);
        assert_eq!(p.wait_exit(Duration::from_secs(10)).await.code(), Some(0));
    })
    .await;
}
