//! Reload through `POST /admin/reload` and a change of the file on disk (SIGHUP's good and bad
//! files are in lifecycle.rs), 20 reloads through each of the three triggers under load, and what a reload
//! keeps: cached entries and open connections on a listener that moved.

mod common;

use common::*;
use http::Method;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

const TOKEN: &str = "reload-test-token";

/// A config with an admin token, the file watcher's `reload` settings, and one route.
fn config(reload: &str, upstream_extra: &str, replicas: &[String]) -> String {
    simple_config("workers = 2", upstream_extra, replicas).replace(
        "[admin]\n",
        &format!("[reload]\n{reload}\n\n[admin]\ntoken = \"{TOKEN}\"\n"),
    )
}

/// Where `text` first holds `needle`, as `file:line:col`.
fn position(p: &Palisade, text: &str, needle: &str) -> String {
    let at = text.find(needle).unwrap();
    let line = text[..at].matches('\n').count() + 1;
    let col = at - text[..at].rfind('\n').map_or(0, |n| n + 1) + 1;
    format!("{}:{line}:{col}", p.config_path.display())
}

async fn reloads_ok(p: &Palisade) -> Option<f64> {
    metric_value(
        &p.metrics_with(TOKEN).await,
        "palisade_config_reloads_total",
        &[("result", "ok")],
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_reload_applies_a_good_file_and_answers_every_error_of_a_bad_one() {
    bounded(60, async {
        let (a, b) = (Upstream::start("a"), Upstream::start("b"));
        let first = config("watch = false", "", &[a.url()]);
        let p = Palisade::start(&first).await;
        assert_eq!(
            get(&http1(), &p.url("/x"), &[]).await.json()["replica"],
            "a"
        );

        p.write_config(&config("watch = false", "", &[b.url()]));
        let r = p
            .admin_request(Method::POST, "/admin/reload", None, "")
            .await;
        assert_eq!(r.status, 401, "no token, no reload: {}", r.text());
        assert_eq!(
            get(&http1(), &p.url("/x"), &[]).await.json()["replica"],
            "a"
        );

        let r = p
            .admin_request(Method::POST, "/admin/reload", Some(TOKEN), "")
            .await;
        assert_eq!(r.status, 200, "{}", r.text());
        assert_eq!(r.json()["status"], "reloaded");
        assert_eq!(r.json()["routes"], 1);
        assert_eq!(
            get(&http1(), &p.url("/x"), &[]).await.json()["replica"],
            "b"
        );
        let line = p
            .wait_log(ms(2000), |l| l["message"] == "config reloaded")
            .await;
        assert_eq!(line["trigger"], "admin", "{line}");

        let bad = config(
            "watch = false",
            "balance = \"fastest\"\nconnect_timeout = \"0s\"",
            &[a.url()],
        );
        p.write_config(&bad);
        let r = p
            .admin_request(Method::POST, "/admin/reload", Some(TOKEN), "")
            .await;
        assert_eq!(r.status, 422, "{}", r.text());
        let body = r.json();
        assert_eq!(body["error"]["code"], 422);
        assert_eq!(
            body["error"]["message"],
            "config reload rejected; keeping the running config"
        );
        let errors: Vec<String> = body["error"]["errors"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e.as_str().unwrap().to_owned())
            .collect();
        assert_eq!(errors.len(), 2, "{errors:?}");
        let want = format!(
            "{}: upstreams.backend.balance: unknown balancer \"fastest\"",
            position(&p, &bad, "\"fastest\"")
        );
        assert!(errors[0].starts_with(&want), "{:?} vs {want:?}", errors[0]);
        assert!(
            errors[1].starts_with(&position(&p, &bad, "\"0s\"")),
            "{:?}",
            errors[1]
        );
        assert_eq!(
            get(&http1(), &p.url("/x"), &[]).await.json()["replica"],
            "b",
            "a rejected file leaves the running config"
        );

        let r = p
            .admin_request(Method::GET, "/admin/reload", Some(TOKEN), "")
            .await;
        assert_eq!(r.status, 405);
        let m = p.metrics_with(TOKEN).await;
        assert_eq!(reload_totals(&m), (Some(1.0), Some(1.0)), "{m}");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_changed_file_reloads_after_the_debounce_and_only_when_its_text_changed() {
    bounded(60, async {
        let (a, b) = (Upstream::start("a"), Upstream::start("b"));
        let watch = "watch = true\ndebounce = \"200ms\"";
        let p = Palisade::start(&config(watch, "", &[a.url()])).await;
        p.wait_log(ms(5000), |l| {
            l["message"] == "watching the config file for changes"
        })
        .await;

        // Several writes in a row make one reload.
        let next = config(watch, "", &[b.url()]);
        for _ in 0..3 {
            p.write_config(&next);
            tokio::time::sleep(ms(30)).await;
        }
        p.wait_log(ms(5000), |l| {
            l["message"] == "config reloaded" && l["trigger"] == "file"
        })
        .await;
        assert_eq!(
            get(&http1(), &p.url("/x"), &[]).await.json()["replica"],
            "b"
        );
        tokio::time::sleep(ms(600)).await;
        assert_eq!(p.reload_counts(), (1, 0), "{}", p.stdout_text());

        // The same text again, or another file in the directory: no reload.
        p.write_config(&next);
        std::fs::write(p.config_path.with_file_name("other.txt"), "x").unwrap();
        tokio::time::sleep(ms(800)).await;
        assert_eq!(p.reload_counts(), (1, 0), "{}", p.stdout_text());

        // A bad file is rejected once, with its position, and the running config stays.
        let bad = next.replace("[[routes]]", "[[routez]]");
        p.write_config(&bad);
        let line = p
            .wait_log(ms(5000), |l| {
                l["message"] == "config reload rejected; keeping the running config"
            })
            .await;
        assert_eq!(line["trigger"], "file");
        let err = line["error"].as_str().unwrap();
        assert!(
            err.starts_with(&format!("{}:", p.config_path.display())) && err.contains("routez"),
            "{err}"
        );
        assert_eq!(
            get(&http1(), &p.url("/x"), &[]).await.json()["replica"],
            "b"
        );

        // Turned off by a reload: later changes wait for SIGHUP or the admin endpoint.
        p.write_config(&config(
            "watch = false\ndebounce = \"200ms\"",
            "",
            &[a.url()],
        ));
        p.wait_log_count(ms(5000), 2, |l| l["message"] == "config reloaded")
            .await;
        p.write_config(&config(
            "watch = false\ndebounce = \"200ms\"",
            "",
            &[b.url()],
        ));
        tokio::time::sleep(ms(800)).await;
        assert_eq!(p.reload_counts().0, 2, "{}", p.stdout_text());
        assert_eq!(
            get(&http1(), &p.url("/x"), &[]).await.json()["replica"],
            "a"
        );
        assert_eq!(reloads_ok(&p).await, Some(2.0));
    })
    .await;
}

/// Runs steady load (HTTP/1.1 and h2c) while `reload` is called 20 times, and asserts that no
/// request failed and that 20 reloads were installed.
async fn twenty_reloads_under_load(trigger: &str) {
    let (a, b) = (Upstream::start("a"), Upstream::start("b"));
    let watch = if trigger == "file" {
        "watch = true\ndebounce = \"50ms\""
    } else {
        "watch = false"
    };
    let configs = [
        config(watch, "timeout = \"10s\"", &[a.url(), b.url()]),
        config(
            watch,
            "timeout = \"11s\"\nbalance = \"least_requests\"",
            &[a.url(), b.url()],
        ),
    ];
    let p = Palisade::start(&configs[0]).await;
    if trigger == "file" {
        p.wait_log(ms(5000), |l| {
            l["message"] == "watching the config file for changes"
        })
        .await;
    }
    let stop = Arc::new(AtomicBool::new(false));
    let ok = Arc::new(AtomicU64::new(0));
    let failures = Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let mut tasks = Vec::new();
    for t in 0..4 {
        let (stop, ok, failures) = (stop.clone(), ok.clone(), failures.clone());
        let url = p.url(&format!("/load/{t}?size=2000"));
        let client = if t % 2 == 0 { http1() } else { h2c() };
        tasks.push(tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                let req = http::Request::get(&url).body(empty()).unwrap();
                match try_send(&client, req).await {
                    Ok(r) if r.status == 200 && r.body.len() == 2000 => {
                        ok.fetch_add(1, Ordering::Relaxed);
                    }
                    Ok(r) => failures
                        .lock()
                        .unwrap()
                        .push(format!("{} {}", r.status, r.text())),
                    Err(e) => failures.lock().unwrap().push(e),
                }
            }
        }));
    }
    for i in 0..20 {
        let text = &configs[(i + 1) % 2];
        match trigger {
            "signal" => {
                let line = p.reload(text).await;
                assert_eq!(line["message"], "config reloaded", "reload {i}: {line}");
            }
            "admin" => {
                p.write_config(text);
                let r = p
                    .admin_request(Method::POST, "/admin/reload", Some(TOKEN), "")
                    .await;
                assert_eq!(r.status, 200, "reload {i}: {}", r.text());
            }
            _ => {
                p.write_config(text);
                p.wait_log_count(ms(5000), i + 1, |l| l["message"] == "config reloaded")
                    .await;
            }
        }
        tokio::time::sleep(ms(50)).await;
    }
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        t.await.unwrap();
    }
    let failures = std::mem::take(&mut *failures.lock().unwrap());
    assert!(
        failures.is_empty(),
        "{} failed requests, first: {:?}",
        failures.len(),
        failures.first()
    );
    let served = ok.load(Ordering::Relaxed);
    assert!(served > 100, "too little load: {served}");
    assert_eq!(reloads_ok(&p).await, Some(20.0), "{}", p.stdout_text());
    let by_trigger = p
        .logs()
        .iter()
        .filter(|l| l["message"] == "config reloaded" && l["trigger"] == trigger)
        .count();
    assert_eq!(by_trigger, 20);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_sighup_reloads_under_load_fail_no_request() {
    bounded(120, twenty_reloads_under_load("signal")).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_admin_reloads_under_load_fail_no_request() {
    bounded(120, twenty_reloads_under_load("admin")).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_file_reloads_under_load_fail_no_request() {
    bounded(120, twenty_reloads_under_load("file")).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_keeps_cached_entries_and_connections_on_a_moved_listener() {
    bounded(60, async {
        let up = Upstream::start("a");
        let free_port = || {
            std::net::TcpListener::bind("127.0.0.1:0")
                .unwrap()
                .local_addr()
                .unwrap()
        };
        let (old_addr, new_addr) = (free_port(), free_port());
        let with_listen = |addr: std::net::SocketAddr, ttl: &str| {
            config("watch = false", "", &[up.url()])
                .replace(
                    "listen = [\"127.0.0.1:0\"]",
                    &format!("listen = [\"{addr}\"]"),
                )
                .replace(
                    "upstream = \"backend\"\n",
                    &format!("upstream = \"backend\"\ncache = {{ ttl = \"{ttl}\" }}\n"),
                )
        };
        let p = Palisade::start(&with_listen(old_addr, "60s")).await;
        assert_eq!(p.public, old_addr);
        let first = get(&http1(), &p.url("/cached"), &[]).await;
        assert_eq!(first.status, 200);
        assert_eq!(up.hits(), 1);

        let mut open = Raw::connect(old_addr).await;
        let request = b"GET /open HTTP/1.1\r\nHost: t\r\n\r\n";
        open.send(request).await.unwrap();
        let (head, _) = open.read_response(ms(2000), false).await.unwrap();
        assert_eq!(head.status, 200);
        assert_eq!(up.hits(), 2);

        // Another listen address and another ttl: the route's cache policy changes, its
        // stored entry stays.
        p.write_config(&with_listen(new_addr, "120s"));
        let r = p
            .admin_request(Method::POST, "/admin/reload", Some(TOKEN), "")
            .await;
        assert_eq!(r.status, 200, "{}", r.text());

        let moved = get(&http1(), &format!("http://{new_addr}/cached"), &[]).await;
        assert_eq!(moved.status, 200);
        assert!(
            moved.header("cache-status").unwrap_or("").contains("hit"),
            "the entry outlives the reload: {:?}",
            moved.header("cache-status")
        );
        assert_eq!(moved.body, first.body);
        assert_eq!(up.hits(), 2, "served from cache, not the upstream");

        open.send(request).await.unwrap();
        let (head, _) = open.read_response(ms(2000), false).await.unwrap();
        assert_eq!(
            head.status, 200,
            "the open connection on the old address still serves"
        );

        let refused = tokio::time::timeout(ms(2000), tokio::net::TcpStream::connect(old_addr))
            .await
            .expect("connect attempt finishes");
        assert!(refused.is_err(), "the old address no longer accepts");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_config_shows_the_effective_config_with_secrets_redacted() {
    bounded(30, async {
        let up = Upstream::start("a");
        let text = config("watch = false", "", &[up.url()]).replace(
            "[[routes]]",
            "[cache]\nredis = { url = \"redis://:hunter2@127.0.0.1:1/0\", timeout = \"20ms\" }\n\n[[routes]]",
        );
        let p = Palisade::start(&text).await;
        let r = p.admin_request(Method::GET, "/admin/config", None, "").await;
        assert_eq!(r.status, 401);
        assert!(!r.text().contains("hunter2"));

        let r = p
            .admin_request(Method::GET, "/admin/config", Some(TOKEN), "")
            .await;
        assert_eq!(r.status, 200, "{}", r.text());
        let shown = r.text();
        assert!(!shown.contains(TOKEN), "{shown}");
        assert!(!shown.contains("hunter2"), "{shown}");
        let c = r.json();
        assert_eq!(c["admin"]["token"], "<redacted>");
        assert_eq!(
            c["cache"]["redis"]["url"],
            "redis://:<redacted>@127.0.0.1:1/0"
        );
        assert_eq!(c["file"], p.config_path.display().to_string());
        assert_eq!(c["server"]["listen"][0], "127.0.0.1:0");
        assert_eq!(c["server"]["idle_timeout"], "1m", "defaults are shown");
        assert_eq!(c["upstreams"][0]["replicas"][0], up.url());
        assert_eq!(c["routes"][0]["name"], "default");
        assert_eq!(c["reload"]["watch"], false);
    })
    .await;
}

/// Each replica of the first upstream, with its circuit state, from `/admin/upstreams`.
async fn circuit(p: &Palisade) -> Vec<(String, String)> {
    let r = p
        .admin_request(Method::GET, "/admin/upstreams", Some(TOKEN), "")
        .await;
    r.json()["upstreams"][0]["replicas"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            (
                r["url"].as_str().unwrap().to_owned(),
                r["circuit"].as_str().unwrap().to_owned(),
            )
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_that_changes_an_upstream_keeps_its_replicas_open_circuits() {
    bounded(60, async {
        let up = Upstream::start("a");
        let dead = format!("http://{}", dead_addr());
        let breaker = |timeout: &str| {
            format!(
                "timeout = \"{timeout}\"\n[upstreams.backend.circuit_breaker]\nconsecutive_failures = 2\nopen_for = \"30s\""
            )
        };
        let replicas = [up.url(), dead.clone()];
        let p = Palisade::start(&config("watch = false", &breaker("10s"), &replicas)).await;
        for _ in 0..6 {
            let _ = get(&http1(), &p.url("/x"), &[]).await;
        }
        let before = circuit(&p).await;
        assert!(
            before.contains(&(dead.clone(), "open".to_owned())),
            "two refused connections open the circuit: {before:?}"
        );

        p.write_config(&config("watch = false", &breaker("12s"), &replicas));
        let r = p
            .admin_request(Method::POST, "/admin/reload", Some(TOKEN), "")
            .await;
        assert_eq!(r.status, 200, "{}", r.text());
        assert_eq!(circuit(&p).await, before, "the changed upstream keeps each replica's circuit");
        for _ in 0..6 {
            let r = get(&http1(), &p.url("/x"), &[]).await;
            assert_eq!(r.status, 200, "the open circuit keeps requests off the dead replica");
        }
    })
    .await;
}
