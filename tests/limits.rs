//! Request limits and timeouts: header and body sizes, ambiguous framing, path tricks, slow and
//! idle clients, the connection limit, and h2c.

mod common;

use common::*;
use http::Request;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

const SECS10: Duration = Duration::from_secs(10);

fn json_error(head: &Head, body: &[u8], code: u16) -> serde_json::Value {
    assert_eq!(head.status, code, "{}", head.raw);
    let j: serde_json::Value = serde_json::from_slice(body)
        .unwrap_or_else(|_| panic!("not JSON: {}", String::from_utf8_lossy(body)));
    assert_eq!(j["error"]["code"], code, "{j}");
    assert!(head.header("x-request-id").is_some(), "{}", head.raw);
    j
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_headers_are_431() {
    bounded(30, async {
        let up = Upstream::start("u");
        let p = Palisade::start(&simple_config(
            "max_header_bytes = \"8KiB\"",
            "",
            &[up.url()],
        ))
        .await;
        let mut raw = Raw::connect(p.public).await;
        let big = "v".repeat(10 << 10);
        raw.send(format!("GET /h HTTP/1.1\r\nHost: x\r\nX-Big: {big}\r\n\r\n").as_bytes())
            .await
            .unwrap();
        let (head, body) = raw.read_response(SECS10, false).await.unwrap();
        let j = json_error(&head, &body, 431);
        assert!(
            j["error"]["message"].as_str().unwrap().contains("8192"),
            "{j}"
        );
        assert_eq!(up.hits(), 0);
        still_serves(&p, &up).await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn declared_body_over_the_limit_is_413() {
    bounded(30, async {
        let up = Upstream::start("u");
        let p = Palisade::start(&simple_config(
            "max_request_body = \"1MiB\"",
            "",
            &[up.url()],
        ))
        .await;
        let mut raw = Raw::connect(p.public).await;
        raw.send(b"POST /up HTTP/1.1\r\nHost: x\r\nContent-Length: 2000000\r\n\r\n")
            .await
            .unwrap();
        raw.send(&vec![b'a'; 64 << 10]).await.unwrap();
        let (head, body) = raw.read_response(SECS10, false).await.unwrap();
        let j = json_error(&head, &body, 413);
        assert!(
            j["error"]["message"].as_str().unwrap().contains("1048576"),
            "{j}"
        );
        assert_eq!(head.header("connection"), Some("close"));
        assert!(
            raw.closed_within(SECS10).await,
            "the connection must close after a 413 whose body was not read"
        );
        assert_eq!(up.hits(), 0);
        // Exactly at the limit passes.
        let r = send(
            &http1(),
            Request::post(p.url("/up")).body(zeros(1 << 20)).unwrap(),
        )
        .await;
        assert_eq!(r.status, 200);
        assert_eq!(r.json()["received"], 1 << 20);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chunked_body_over_the_limit_is_cut_off() {
    bounded(30, async {
        let up = Upstream::start("u");
        let p = Palisade::start(&simple_config(
            "max_request_body = \"1MiB\"",
            "",
            &[up.url()],
        ))
        .await;
        let result = try_send(
            &http1(),
            Request::post(p.url("/chunked"))
                .body(zeros_chunked(4 << 20))
                .unwrap(),
        )
        .await;
        match &result {
            Ok(r) => {
                assert_eq!(r.status, 413, "{}", r.text());
                assert_eq!(r.json()["error"]["code"], 413);
            }
            // The proxy may close the connection while the client is still sending.
            Err(e) => assert!(!e.is_empty()),
        }
        // Whatever reached the upstream, it was not a complete oversize body.
        let deadline = Instant::now() + SECS10;
        while up.seen().is_empty() && up.hits() > 0 && Instant::now() < deadline {
            tokio::time::sleep(ms(10)).await;
        }
        for s in up.seen() {
            assert!(
                !s.complete || s.received <= 1 << 20,
                "upstream got a complete oversize body: {s:?}"
            );
        }
        assert_eq!(up.state.bodies_complete.load(Ordering::SeqCst), 0);
        assert!(up.state.received.load(Ordering::SeqCst) <= (1 << 20) + (64 << 10));
        still_serves(&p, &up).await;
        // Under the limit, chunked is fine.
        let r = send(
            &http1(),
            Request::post(p.url("/chunked"))
                .body(zeros_chunked(512 << 10))
                .unwrap(),
        )
        .await;
        assert_eq!(r.status, 200);
        assert_eq!(r.json()["received"], 512 << 10);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn content_length_with_transfer_encoding_is_400_and_closes() {
    bounded(30, async {
        let up = Upstream::start("u");
        let p = Palisade::start(&simple_config("", "", &[up.url()])).await;
        for order in [
            "Content-Length: 5\r\nTransfer-Encoding: chunked\r\n",
            "Transfer-Encoding: chunked\r\nContent-Length: 5\r\n",
        ] {
            let mut raw = Raw::connect(p.public).await;
            let req = format!("POST /smuggle HTTP/1.1\r\nHost: x\r\n{order}\r\n5\r\nhello\r\n0\r\n\r\nGET /second HTTP/1.1\r\nHost: x\r\n\r\n");
            raw.send(req.as_bytes()).await.unwrap();
            let (head, body) = raw.read_response(SECS10, false).await.unwrap();
            let j = json_error(&head, &body, 400);
            assert!(j["error"]["message"].as_str().unwrap().contains("Content-Length and Transfer-Encoding"), "{j}");
            assert!(raw.closed_within(SECS10).await, "the connection must close after an ambiguous request");
            assert!(raw.pending().is_empty(), "nothing may follow: {}", String::from_utf8_lossy(raw.pending()));
        }
        assert_eq!(up.hits(), 0, "the upstream must never see an ambiguous request: {:?}", up.seen());
        still_serves(&p, &up).await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn path_tricks_are_400() {
    bounded(30, async {
        let up = Upstream::start("u");
        let p = Palisade::start(&simple_config("", "", &[up.url()])).await;
        for path in [
            "/a/%2e%2e/b",
            "/a/../b",
            "/a/.%2e/b",
            "/a%2f..%2fb",
            "/a/%00",
            "/a/%zz",
        ] {
            let mut raw = Raw::connect(p.public).await;
            raw.send(format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes())
                .await
                .unwrap();
            let (head, body) = raw.read_response(SECS10, false).await.unwrap();
            json_error(&head, &body, 400);
        }
        assert_eq!(up.hits(), 0);
        still_serves(&p, &up).await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slowloris_is_cut_off_after_header_read_timeout() {
    bounded(30, async {
        let up = Upstream::start("u");
        let p = Palisade::start(&simple_config(
            "header_read_timeout = \"1s\"\nidle_timeout = \"30s\"",
            "",
            &[up.url()],
        ))
        .await;
        let mut raw = Raw::connect(p.public).await;
        raw.send(b"GET /slow HTTP/1.1\r\nHost: x\r\n")
            .await
            .unwrap();
        let started = Instant::now();
        let mut cut = false;
        // One header byte every 100 ms, for at most 10 s.
        for i in 0..100 {
            if raw.send(format!("X-{i}: y\r\n").as_bytes()).await.is_err()
                || raw.closed_within(ms(100)).await
            {
                cut = true;
                break;
            }
        }
        assert!(cut, "a client trickling its head was never cut off");
        assert!(started.elapsed() < Duration::from_secs(10));
        assert_eq!(up.hits(), 0);
        still_serves(&p, &up).await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_keep_alive_connection_is_closed() {
    bounded(30, async {
        let up = Upstream::start("u");
        let p = Palisade::start(&simple_config("idle_timeout = \"1s\"", "", &[up.url()])).await;
        let mut raw = Raw::connect(p.public).await;
        raw.send(b"GET /one HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        let (head, _) = raw.read_response(SECS10, false).await.unwrap();
        assert_eq!(head.status, 200);
        assert!(
            raw.closed_within(SECS10).await,
            "idle keep-alive connection was not closed"
        );
        assert!(
            raw.pending().is_empty(),
            "no bytes on close: {:?}",
            String::from_utf8_lossy(raw.pending())
        );
        // A connection that is busy (a slow upstream) is not idle.
        let mut raw = Raw::connect(p.public).await;
        raw.send(b"GET /slow?delay_ms=2500 HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        let (head, _) = raw.read_response(SECS10, false).await.unwrap();
        assert_eq!(
            head.status, 200,
            "a request waiting on its upstream was cut: {}",
            head.raw
        );
        still_serves(&p, &up).await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2c_prior_knowledge_works() {
    bounded(30, async {
        let up = Upstream::start("u");
        let p = Palisade::start(&simple_config("", "", &[up.url()])).await;
        let client = h2c();
        let r = get(&client, &p.url("/h2?x=1"), &[]).await;
        assert_eq!(r.status, 200);
        let j = r.json();
        assert_eq!(j["path"], "/h2?x=1");
        let seen = up.seen().pop().unwrap();
        assert_eq!(seen.header("via"), Some("2 palisade"));
        assert!(
            seen.header("host")
                .is_some_and(|h| h.starts_with("127.0.0.1:")),
            "{:?}",
            seen.headers
        );
        // Several streams at once on one connection.
        let mut tasks = Vec::new();
        for i in 0..10 {
            let client = client.clone();
            let url = p.url(&format!("/h2/{i}?size=100000"));
            tasks.push(tokio::spawn(async move { get(&client, &url, &[]).await }));
        }
        for t in tasks {
            let r = t.await.unwrap();
            assert_eq!(r.status, 200);
            assert_eq!(r.body.len(), 100000);
        }
        let r = send(
            &client,
            Request::post(p.url("/h2/up")).body(zeros(300000)).unwrap(),
        )
        .await;
        assert_eq!(r.json()["received"], 300000);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_connections_holds_the_third_connection_until_one_closes() {
    bounded(40, async {
        let up = Upstream::start("u");
        let p = Palisade::start(&simple_config(
            "max_connections = 2\nworkers = 2",
            "",
            &[up.url()],
        ))
        .await;
        let mut first = Raw::connect(p.public).await;
        let mut second = Raw::connect(p.public).await;
        for c in [&mut first, &mut second] {
            c.send(b"GET /held HTTP/1.1\r\nHost: x\r\n\r\n")
                .await
                .unwrap();
            assert_eq!(c.read_response(SECS10, false).await.unwrap().0.status, 200);
        }
        // The third connection is made (it waits in the listen backlog) but not served.
        let mut third = Raw::connect(p.public).await;
        third
            .send(b"GET /third HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        assert_eq!(
            third.read_head(ms(1500)).await.unwrap_err(),
            ReadEnd::TimedOut,
            "served past max_connections"
        );
        assert_eq!(up.seen().iter().filter(|s| s.path == "/third").count(), 0);
        // The first two still work.
        second
            .send(b"GET /held2 HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        assert_eq!(
            second.read_response(SECS10, false).await.unwrap().0.status,
            200
        );
        // Once one closes, the third is served.
        drop(first);
        let (head, _) = third.read_response(SECS10, false).await.unwrap();
        assert_eq!(head.status, 200);
        assert_eq!(up.seen().iter().filter(|s| s.path == "/third").count(), 1);
    })
    .await;
}
