//! Routing, balancing, upstream failures and header rules, through the real binary.

mod common;

use common::*;
use http::Request;
use std::sync::atomic::Ordering;
use std::time::Duration;

fn error_body(r: &Reply, code: u16) -> serde_json::Value {
    assert_eq!(r.status.as_u16(), code, "{}", r.text());
    assert_eq!(r.header("content-type"), Some("application/json"));
    let j = r.json();
    assert_eq!(j["error"]["code"], code, "{j}");
    assert!(
        j["error"]["message"]
            .as_str()
            .is_some_and(|m| !m.is_empty()),
        "{j}"
    );
    let id = r.header("x-request-id").expect("X-Request-Id on an error");
    assert_eq!(j["error"]["request_id"], id);
    j
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn routes_by_host_prefix_and_method() {
    bounded(60, async {
        let (a, b, c, d) = (
            Upstream::start("a"),
            Upstream::start("b"),
            Upstream::start("c"),
            Upstream::start("d"),
        );
        let config = format!(
            r#"{}
[upstreams.a]
replicas = ["{}"]
[upstreams.b]
replicas = ["{}"]
[upstreams.c]
replicas = ["{}"]
[upstreams.d]
replicas = ["{}"]

[[routes]]
name = "exact-host"
match = {{ host = "api.example.com", path_prefix = "/" }}
upstream = "a"

[[routes]]
name = "wildcard-host"
match = {{ host = "*.example.com", path_prefix = "/" }}
upstream = "b"

[[routes]]
name = "products"
match = {{ path_prefix = "/products" }}
upstream = "c"

[[routes]]
name = "products-special"
match = {{ path_prefix = "/products/special", methods = ["GET", "HEAD"] }}
upstream = "d"
"#,
            base_config(""),
            a.url(),
            b.url(),
            c.url(),
            d.url()
        );
        let p = Palisade::start(&config).await;
        let client = http1();
        let replica_for = |host: &'static str, path: &'static str| {
            let client = client.clone();
            let url = p.url(path);
            async move {
                let r = get(&client, &url, &[("host", host)]).await;
                assert_eq!(r.status, 200, "{host}{path}: {}", r.text());
                r.json()["replica"].as_str().unwrap().to_owned()
            }
        };
        assert_eq!(replica_for("api.example.com", "/x").await, "a");
        assert_eq!(replica_for("API.Example.com:8080", "/x").await, "a");
        assert_eq!(replica_for("shop.example.com", "/x").await, "b");
        assert_eq!(replica_for("a.b.example.com", "/x").await, "b");
        assert_eq!(replica_for("other.org", "/products/1").await, "c");
        // The longest prefix wins.
        assert_eq!(replica_for("other.org", "/products/special/1").await, "d");

        // Only the method fails: 405 with Allow.
        let r = send(
            &client,
            Request::delete(p.url("/products/special/1"))
                .header("host", "other.org")
                .body(empty())
                .unwrap(),
        )
        .await;
        // DELETE falls back to the shorter prefix "/products", which allows every method.
        assert_eq!(r.json()["replica"], "c");

        // Nothing matches at all: 404 JSON with a request id.
        let r = get(&client, &p.url("/nothing"), &[("host", "other.org")]).await;
        let j = error_body(&r, 404);
        assert!(
            j["error"]["message"].as_str().unwrap().contains("/nothing"),
            "{j}"
        );

        // The proxy still serves afterwards.
        assert_eq!(replica_for("api.example.com", "/again").await, "a");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn method_not_allowed_is_405_json_with_allow() {
    bounded(30, async {
        let up = Upstream::start("only");
        let config = format!(
            "{}[upstreams.u]\nreplicas = [\"{}\"]\n\n[[routes]]\nname = \"read\"\nmatch = {{ path_prefix = \"/r\", methods = [\"GET\", \"HEAD\"] }}\nupstream = \"u\"\n",
            base_config(""),
            up.url()
        );
        let p = Palisade::start(&config).await;
        let client = http1();
        let r = send(&client, Request::post(p.url("/r/1")).body(full("x")).unwrap()).await;
        error_body(&r, 405);
        assert_eq!(r.header("allow"), Some("GET, HEAD"));
        assert_eq!(up.hits(), 0, "the upstream must not see a refused request");
        let r = get(&client, &p.url("/other"), &[]).await;
        error_body(&r, 404);
        let r = get(&client, &p.url("/r/1"), &[]).await;
        assert_eq!(r.status, 200);
        assert_eq!(up.hits(), 1);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn round_robin_spreads_evenly() {
    bounded(30, async {
        let (a, b) = (Upstream::start("a"), Upstream::start("b"));
        let p = Palisade::start(&simple_config(
            "",
            "balance = \"round_robin\"",
            &[a.url(), b.url()],
        ))
        .await;
        let client = http1();
        for i in 0..20 {
            let r = get(&client, &p.url(&format!("/rr/{i}")), &[]).await;
            assert_eq!(r.status, 200);
        }
        assert_eq!((a.hits(), b.hits()), (10, 10));
        let replicas: std::collections::HashSet<String> = p
            .access_logs()
            .iter()
            .map(|l| l["replica"].as_str().unwrap().to_owned())
            .collect();
        assert_eq!(replicas, [a.url(), b.url()].into_iter().collect());
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn least_requests_prefers_the_idle_replica() {
    bounded(30, async {
        let (a, b) = (Upstream::start("a"), Upstream::start("b"));
        let p = Palisade::start(&simple_config(
            "",
            "balance = \"least_requests\"",
            &[a.url(), b.url()],
        ))
        .await;
        let client = http1();
        let slow = {
            let client = client.clone();
            let url = p.url("/slow?delay_ms=3000");
            tokio::spawn(async move { get(&client, &url, &[]).await })
        };
        // Wait until the slow request is in flight at one replica.
        let busy = loop {
            if a.state.in_flight.load(Ordering::SeqCst) == 1 {
                break "a";
            }
            if b.state.in_flight.load(Ordering::SeqCst) == 1 {
                break "b";
            }
            tokio::time::sleep(ms(5)).await;
        };
        for i in 0..6 {
            let r = get(&client, &p.url(&format!("/fast/{i}")), &[]).await;
            assert_ne!(
                r.json()["replica"],
                busy,
                "request {i} went to the busy replica"
            );
        }
        let r = slow.await.unwrap();
        assert_eq!(r.status, 200);
        assert_eq!(r.json()["replica"], busy);
        let (busy_up, idle_up) = if busy == "a" { (&a, &b) } else { (&b, &a) };
        assert_eq!((busy_up.hits(), idle_up.hits()), (1, 6));
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_replica_is_502_json() {
    bounded(30, async {
        let dead = dead_addr();
        let p = Palisade::start(&simple_config(
            "",
            "connect_timeout = \"1s\"",
            &[format!("http://{dead}")],
        ))
        .await;
        let client = http1();
        let r = get(&client, &p.url("/x"), &[]).await;
        let j = error_body(&r, 502);
        assert!(
            j["error"]["message"]
                .as_str()
                .unwrap()
                .contains("cannot connect"),
            "{j}"
        );
        let m = p.metrics().await;
        assert_eq!(
            metric_value(
                &m,
                "palisade_upstream_requests_total",
                &[("outcome", "connect_error")]
            ),
            Some(1.0),
            "{m}"
        );
        // And again: the proxy keeps answering.
        error_body(&get(&client, &p.url("/y"), &[]).await, 502);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_timeout_is_502() {
    bounded(30, async {
        // A listener whose accept queue is full: SYNs are dropped, so connecting hangs.
        let (listener, _fillers) = full_backlog();
        let addr = listener.local_addr().unwrap().as_socket().unwrap();
        let good = Upstream::start("good");
        let config = format!(
            "{}[upstreams.stuck]\nreplicas = [\"http://{addr}\"]\nconnect_timeout = \"300ms\"\ntimeout = \"20s\"\n\n[upstreams.good]\nreplicas = [\"{}\"]\n\n[[routes]]\nname = \"stuck\"\nmatch = {{ path_prefix = \"/stuck\" }}\nupstream = \"stuck\"\n\n[[routes]]\nname = \"good\"\nupstream = \"good\"\n",
            base_config(""),
            good.url()
        );
        let p = Palisade::start(&config).await;
        let client = http1();
        // Bounded well under `timeout` (20 s): the connect timeout must be what answers.
        let r = tokio::time::timeout(Duration::from_secs(10), get(&client, &p.url("/stuck/1"), &[]))
            .await
            .expect("connect_timeout did not fire");
        let j = error_body(&r, 502);
        assert!(j["error"]["message"].as_str().unwrap().contains("cannot connect"), "{j}");
        // The connector's own timeout, not a refusal.
        assert!(j["error"]["message"].as_str().unwrap().contains("deadline has elapsed"), "{j}");
        assert_eq!(get(&client, &p.url("/fine"), &[]).await.status, 200);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_upstream_is_504_json() {
    bounded(30, async {
        let up = Upstream::start("slow");
        let p = Palisade::start(&simple_config("", "timeout = \"500ms\"", &[up.url()])).await;
        let client = http1();
        let r = get(&client, &p.url("/x?delay_ms=5000"), &[]).await;
        let j = error_body(&r, 504);
        assert!(
            j["error"]["message"]
                .as_str()
                .unwrap()
                .contains("did not answer"),
            "{j}"
        );
        // A hanging server (accepts, never answers) is a timeout too.
        let r = get(&client, &p.url("/x?hang=1"), &[]).await;
        error_body(&r, 504);
        assert_eq!(get(&client, &p.url("/ok"), &[]).await.status, 200);
        let m = p.metrics().await;
        assert_eq!(
            metric_value(
                &m,
                "palisade_upstream_requests_total",
                &[("outcome", "timeout")]
            ),
            Some(2.0),
            "{m}"
        );
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hanging_server_is_504() {
    bounded(30, async {
        let up = Upstream::hanging();
        let p = Palisade::start(&simple_config("", "timeout = \"500ms\"", &[up.url()])).await;
        let r = get(&http1(), &p.url("/x"), &[]).await;
        error_body(&r, 504);
        assert!(up.hits() >= 1);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_connections_are_reused_and_broken_ones_dropped() {
    bounded(30, async {
        let up = Upstream::start("a");
        let p = Palisade::start(&simple_config("", "", &[up.url()])).await;
        let client = http1();
        for i in 0..10 {
            assert_eq!(
                get(&client, &p.url(&format!("/k/{i}?size=5000")), &[])
                    .await
                    .status,
                200
            );
            let head = send(&client, Request::head(p.url("/h")).body(empty()).unwrap()).await;
            assert_eq!(head.status, 200);
            let empty_body = get(&client, &p.url("/e?status=204"), &[]).await;
            assert_eq!(empty_body.status, 204);
            let post = send(
                &client,
                Request::post(p.url("/p")).body(full("hello")).unwrap(),
            )
            .await;
            assert_eq!(post.status, 200);
        }
        assert_eq!(up.hits(), 40);
        assert_eq!(
            up.state.connections.load(Ordering::SeqCst),
            1,
            "40 sequential requests share one upstream connection"
        );
        // A response cut mid-body takes its connection with it; the next request opens another.
        let resp = client
            .request(
                Request::get(p.url("/cut?size=200000&chunk=1000&fail_after=50000&drip_ms=1"))
                    .body(empty())
                    .unwrap(),
            )
            .await
            .unwrap();
        if resp.status() != 200 {
            let b = http_body_util::BodyExt::collect(resp.into_body())
                .await
                .unwrap()
                .to_bytes();
            panic!("{}", String::from_utf8_lossy(&b));
        }
        let (_, err) = count_body(resp.into_body()).await;
        assert!(err.is_some(), "a cut body ends in an error");
        let client = http1();
        assert_eq!(get(&client, &p.url("/after"), &[]).await.status, 200);
        assert_eq!(up.state.connections.load(Ordering::SeqCst), 2);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_closing_mid_body_is_never_a_complete_response() {
    bounded(30, async {
        let up = Upstream::start("flaky");
        let p = Palisade::start(&simple_config("", "", &[up.url()])).await;
        let client = http1();

        // Content-Length: fewer bytes than announced, then an error.
        let resp = client
            .request(Request::get(p.url("/cl?size=1000000&fail_after=100000&drip_ms=20")).body(empty()).unwrap())
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
        assert_eq!(resp.headers()["content-length"], "1000000");
        let (n, err) = count_body(resp.into_body()).await;
        assert!(n < 1_000_000, "got all {n} bytes");
        assert!(err.is_some(), "a short body must end in an error, got {n} bytes and a clean end");

        // Chunked: the terminating chunk must be missing.
        let mut raw = Raw::connect(p.public).await;
        raw.send(b"GET /chunked?size=300000&chunked=1&fail_after=100000&drip_ms=20 HTTP/1.1\r\nHost: x\r\n\r\n").await.unwrap();
        let head = raw.read_head(Duration::from_secs(10)).await.unwrap();
        assert_eq!(head.status, 200);
        assert_eq!(head.header("transfer-encoding"), Some("chunked"), "{}", head.raw);
        let (rest, end) = raw.read_to_end(Duration::from_secs(10)).await;
        assert_eq!(end, ReadEnd::Closed);
        assert!(!rest.ends_with(b"0\r\n\r\n"), "a broken chunked body must not end with the last chunk");

        p.wait_log_count(Duration::from_secs(5), 2, |l| l["message"] == "access" && l["complete"] == false).await;
        let logs = p.access_logs();
        for path in ["/cl", "/chunked"] {
            let l = logs.iter().find(|l| l["path"].as_str().unwrap().starts_with(path)).unwrap();
            assert_eq!(l["complete"], false, "{l}");
            assert_eq!(l["status"], 200, "{l}");
        }
        // A whole body is complete, and the proxy still serves.
        let r = get(&client, &p.url("/whole?size=100000"), &[]).await;
        assert_eq!(r.body.len(), 100000);
        p.wait_log(Duration::from_secs(5), |l| l["message"] == "access" && l["path"] == "/whole?size=100000" && l["complete"] == true).await;
    })
    .await;
}

fn seen_header<'a>(seen: &'a Seen, name: &str) -> Option<&'a str> {
    seen.header(name)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hop_by_hop_headers_are_removed_both_ways() {
    bounded(30, async {
        let up = Upstream::start("h");
        let p = Palisade::start(&simple_config("", "", &[up.url()])).await;
        let mut raw = Raw::connect(p.public).await;
        raw.send(
            b"GET /hop?hop=1 HTTP/1.1\r\nHost: api.example.com\r\nConnection: keep-alive, X-Secret\r\nX-Secret: 1\r\n\
Keep-Alive: timeout=5\r\nTE: trailers\r\nTrailer: X-T\r\nUpgrade: websocket\r\nProxy-Authorization: Basic eDp5\r\n\
Proxy-Connection: keep-alive\r\nX-Keep: yes\r\n\r\n",
        )
        .await
        .unwrap();
        let (head, _) = raw.read_response(Duration::from_secs(10), false).await.unwrap();
        assert_eq!(head.status, 200, "{}", head.raw);
        let seen = up.seen().pop().unwrap();
        for h in ["x-secret", "keep-alive", "te", "trailer", "upgrade", "proxy-authorization", "proxy-connection"] {
            assert!(seen_header(&seen, h).is_none(), "{h} reached the upstream: {:?}", seen.headers);
        }
        assert_ne!(seen_header(&seen, "connection").map(|v| v.to_ascii_lowercase().contains("x-secret")), Some(true));
        assert_eq!(seen_header(&seen, "x-keep"), Some("yes"));
        // Response direction.
        for h in ["x-up-secret", "keep-alive", "proxy-up", "trailer", "upgrade"] {
            assert!(head.header(h).is_none(), "{h} reached the client:\n{}", head.raw);
        }
        assert!(head.header("connection").is_none_or(|v| !v.contains("x-up-secret")), "{}", head.raw);
        assert_eq!(head.header("x-up-keep"), Some("1"));
        // Same connection still works.
        raw.send(b"GET /again HTTP/1.1\r\nHost: api.example.com\r\n\r\n").await.unwrap();
        let (head, _) = raw.read_response(Duration::from_secs(10), false).await.unwrap();
        assert_eq!(head.status, 200);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forwarding_headers_from_an_untrusted_peer_are_replaced() {
    bounded(30, async {
        let up = Upstream::start("f");
        let p = Palisade::start(&simple_config("", "", &[up.url()])).await;
        let client = http1();
        let r = get(
            &client,
            &p.url("/fwd"),
            &[
                ("host", "api.example.com:8443"),
                ("x-forwarded-for", "6.6.6.6"),
                ("x-forwarded-proto", "https"),
                ("x-forwarded-host", "evil.example"),
                ("forwarded", "for=6.6.6.6;proto=https"),
            ],
        )
        .await;
        assert_eq!(r.status, 200);
        let seen = up.seen().pop().unwrap();
        assert_eq!(
            seen.header("host"),
            Some("api.example.com:8443"),
            "Host is passed as sent"
        );
        assert_eq!(seen.header("x-forwarded-for"), Some("127.0.0.1"));
        assert_eq!(seen.header("x-forwarded-proto"), Some("http"));
        assert_eq!(
            seen.header("x-forwarded-host"),
            Some("api.example.com:8443")
        );
        assert_eq!(
            seen.header("forwarded"),
            Some("for=127.0.0.1;host=\"api.example.com:8443\";proto=http")
        );
        assert_eq!(seen.header("via"), Some("1.1 palisade"));
        assert_eq!(r.header("via"), Some("1.1 palisade"));
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forwarding_headers_from_a_trusted_peer_are_extended() {
    bounded(30, async {
        let up = Upstream::start("f");
        let p = Palisade::start(&simple_config(
            "trusted_proxies = [\"127.0.0.1/32\"]",
            "",
            &[up.url()],
        ))
        .await;
        let r = get(
            &http1(),
            &p.url("/fwd"),
            &[
                ("host", "api.example.com"),
                ("x-forwarded-for", "203.0.113.9"),
                ("x-forwarded-proto", "https"),
                ("x-forwarded-host", "public.example.com"),
                ("forwarded", "for=203.0.113.9;proto=https"),
            ],
        )
        .await;
        assert_eq!(r.status, 200);
        let seen = up.seen().pop().unwrap();
        assert_eq!(
            seen.header("x-forwarded-for"),
            Some("203.0.113.9, 127.0.0.1")
        );
        assert_eq!(seen.header("x-forwarded-proto"), Some("https"));
        assert_eq!(seen.header("x-forwarded-host"), Some("public.example.com"));
        assert_eq!(
            seen.header("forwarded"),
            Some("for=203.0.113.9;proto=https, for=127.0.0.1;host=api.example.com;proto=http")
        );
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_ids_are_generated_or_kept() {
    bounded(30, async {
        let up = Upstream::start("id");
        let p = Palisade::start(&simple_config("", "", &[up.url()])).await;
        let client = http1();
        let r = get(&client, &p.url("/gen"), &[]).await;
        let id = r.header("x-request-id").expect("generated id").to_owned();
        assert!(!id.is_empty());
        assert_eq!(
            up.seen().pop().unwrap().header("x-request-id"),
            Some(id.as_str())
        );
        let r2 = get(&client, &p.url("/gen2"), &[]).await;
        assert_ne!(
            r2.header("x-request-id"),
            Some(id.as_str()),
            "ids must differ per request"
        );

        let r = get(&client, &p.url("/kept"), &[("x-request-id", "abc-123")]).await;
        assert_eq!(r.header("x-request-id"), Some("abc-123"));
        assert_eq!(
            up.seen().pop().unwrap().header("x-request-id"),
            Some("abc-123")
        );
        p.wait_log(Duration::from_secs(5), |l| {
            l["message"] == "access" && l["request_id"] == "abc-123" && l["path"] == "/kept"
        })
        .await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn head_has_no_body() {
    bounded(30, async {
        let up = Upstream::start("head");
        let p = Palisade::start(&simple_config("", "", &[up.url()])).await;
        let mut raw = Raw::connect(p.public).await;
        raw.send(b"HEAD /h?size=5000 HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        let head = raw.read_head(Duration::from_secs(10)).await.unwrap();
        assert_eq!(head.status, 200);
        assert_eq!(head.header("content-length"), Some("5000"));
        // A second request on the same connection parses right after the head: no body bytes.
        raw.send(b"GET /next HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        let (head2, body) = raw
            .read_response(Duration::from_secs(10), false)
            .await
            .unwrap();
        assert_eq!(head2.status, 200, "bytes after HEAD: {}", head2.raw);
        assert!(String::from_utf8_lossy(&body).contains("\"/next\""));
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expect_100_continue() {
    bounded(30, async {
        let up = Upstream::start("up");
        let p = Palisade::start(&simple_config("max_request_body = \"1MiB\"", "", &[up.url()])).await;
        let mut raw = Raw::connect(p.public).await;
        raw.send(b"POST /upload HTTP/1.1\r\nHost: x\r\nContent-Length: 11\r\nExpect: 100-continue\r\n\r\n").await.unwrap();
        let cont = raw.read_head(Duration::from_secs(10)).await.unwrap();
        assert_eq!(cont.status, 100, "{}", cont.raw);
        raw.send(b"hello world").await.unwrap();
        let (head, body) = raw.read_response(Duration::from_secs(10), false).await.unwrap();
        assert_eq!(head.status, 200, "{}", head.raw);
        let j: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(j["received"], 11);
        assert!(up.seen()[0].header("expect").is_none());

        // Over the limit: 413 at once, without 100 Continue, and the upstream sees nothing.
        let mut raw = Raw::connect(p.public).await;
        raw.send(b"POST /upload HTTP/1.1\r\nHost: x\r\nContent-Length: 5000000\r\nExpect: 100-continue\r\n\r\n").await.unwrap();
        let (head, body) = raw.read_response(Duration::from_secs(10), false).await.unwrap();
        assert_eq!(head.status, 413, "{}", head.raw);
        let j: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(j["error"]["code"], 413);
        assert_eq!(up.hits(), 1);
        assert_eq!(get(&http1(), &p.url("/after"), &[]).await.status, 200);
    })
    .await;
}
