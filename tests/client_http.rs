//! How Palisade reads clients' HTTP/1.1 requests and writes its responses (its own server
//! side): pipelining, HTTP/1.0 keep-alive, response framing, and the request heads and bodies
//! it refuses, each sent as exact bytes on a raw connection.

mod common;

use common::*;
use std::time::Duration;

const SECS10: Duration = Duration::from_secs(10);

fn json_code(body: &[u8]) -> u64 {
    let j: serde_json::Value = serde_json::from_slice(body)
        .unwrap_or_else(|_| panic!("not JSON: {}", String::from_utf8_lossy(body)));
    j["error"]["code"].as_u64().unwrap_or(0)
}

/// A replica's chunked answer: `chunks` chunks of `size` bytes each.
fn chunked_answer(chunks: usize, size: usize) -> Script {
    let mut wire = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n".to_vec();
    for _ in 0..chunks {
        wire.extend_from_slice(format!("{size:x}\r\n").as_bytes());
        wire.extend(std::iter::repeat_n(b'c', size));
        wire.extend_from_slice(b"\r\n");
    }
    wire.extend_from_slice(b"0\r\n\r\n");
    Script::Answer(wire)
}

fn echoed_path(body: &[u8]) -> String {
    let j: serde_json::Value = serde_json::from_slice(body)
        .unwrap_or_else(|_| panic!("not JSON: {}", String::from_utf8_lossy(body)));
    j["path"].as_str().unwrap_or("").to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipelined_requests_are_answered_in_order_on_one_connection() {
    bounded(30, async {
        let up = Upstream::start("u");
        let p = Palisade::start(&simple_config("", "", &[up.url()])).await;
        let mut raw = Raw::connect(p.public).await;
        raw.send(b"\r\nGET /a?x=1 HTTP/1.1\r\nHost: x\r\n\r\nGET /b HTTP/1.1\r\nHost: x\r\n\r\nHEAD /c HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        for path in ["/a?x=1", "/b"] {
            let (head, body) = raw.read_response(SECS10, false).await.unwrap();
            assert_eq!(head.status, 200, "{}", head.raw);
            assert_eq!(echoed_path(&body), path);
            assert!(head.header("date").is_some(), "{}", head.raw);
            assert!(head.header("connection").is_none(), "{}", head.raw);
        }
        let (head, _) = raw.read_response(SECS10, true).await.unwrap();
        assert_eq!(head.status, 200, "{}", head.raw);
        raw.send(b"GET /d HTTP/1.1\r\nHost: x\r\n\r\n").await.unwrap();
        let (_, body) = raw.read_response(SECS10, false).await.unwrap();
        assert_eq!(echoed_path(&body), "/d");
        assert!(raw.pending().is_empty(), "a HEAD answer has no body");
        assert_eq!(up.hits(), 4);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_10_clients_keep_the_connection_only_when_they_ask() {
    bounded(30, async {
        let up = Upstream::start("u");
        let p = Palisade::start(&simple_config("", "", &[up.url()])).await;

        let mut raw = Raw::connect(p.public).await;
        raw.send(b"GET /once HTTP/1.0\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        let (head, body) = raw.read_response(SECS10, false).await.unwrap();
        assert_eq!((head.status, echoed_path(&body).as_str()), (200, "/once"));
        assert_eq!(head.header("connection"), Some("close"), "{}", head.raw);
        assert!(raw.closed_within(SECS10).await);

        let mut raw = Raw::connect(p.public).await;
        for path in ["/kept1", "/kept2"] {
            raw.send(
                format!("GET {path} HTTP/1.0\r\nHost: x\r\nConnection: keep-alive\r\n\r\n")
                    .as_bytes(),
            )
            .await
            .unwrap();
            let (head, body) = raw.read_response(SECS10, false).await.unwrap();
            assert_eq!(echoed_path(&body), path);
            assert_eq!(
                head.header("connection"),
                Some("keep-alive"),
                "{}",
                head.raw
            );
        }

        // A body of unknown length cannot be chunked for HTTP/1.0: it ends with the connection.
        let up = ScriptedUpstream::start(|_, _| chunked_answer(30, 1000));
        let p = Palisade::start(&simple_config("", "", &[up.url()])).await;
        let mut raw = Raw::connect(p.public).await;
        raw.send(b"GET /u HTTP/1.0\r\nHost: x\r\nConnection: keep-alive\r\n\r\n")
            .await
            .unwrap();
        let (head, body) = raw.read_response(SECS10, false).await.unwrap();
        assert_eq!(head.status, 200, "{}", head.raw);
        assert!(head.header("transfer-encoding").is_none(), "{}", head.raw);
        assert!(head.header("content-length").is_none(), "{}", head.raw);
        assert_eq!(head.header("connection"), Some("close"), "{}", head.raw);
        assert_eq!(body.len(), 30000);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bodies_of_unknown_length_are_chunked_and_the_connection_is_kept() {
    bounded(30, async {
        // Chunked from the replica: 100 chunks of 7000 bytes, then none; then a sized body.
        let up = ScriptedUpstream::start(|_, req| match req {
            0 => chunked_answer(100, 7000),
            1 => chunked_answer(0, 0),
            _ => Script::Answer(
                format!(
                    "HTTP/1.1 200 OK\r\nContent-Length: 5000\r\n\r\n{}",
                    "b".repeat(5000)
                )
                .into_bytes(),
            ),
        });
        let p = Palisade::start(&simple_config("", "", &[up.url()])).await;
        let mut raw = Raw::connect(p.public).await;
        for size in [700_000, 0] {
            raw.send(b"GET /u HTTP/1.1\r\nHost: x\r\n\r\n")
                .await
                .unwrap();
            let (head, body) = raw.read_response(SECS10, false).await.unwrap();
            assert_eq!(head.status, 200, "{}", head.raw);
            assert_eq!(
                head.header("transfer-encoding"),
                Some("chunked"),
                "{}",
                head.raw
            );
            assert_eq!(body.len(), size);
        }
        raw.send(b"GET /u HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        let (head, body) = raw.read_response(SECS10, false).await.unwrap();
        assert_eq!(head.header("content-length"), Some("5000"), "{}", head.raw);
        assert_eq!(body.len(), 5000);
        assert!(raw.pending().is_empty());
        assert_eq!(up.requests(), 3);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_framing_and_malformed_heads_are_400_and_close() {
    bounded(60, async {
        let up = Upstream::start("u");
        let p = Palisade::start(&simple_config("", "", &[up.url()])).await;
        let cases: [(&str, &str); 8] = [
            ("POST /te HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip\r\n\r\n", "end with chunked"),
            ("POST /te HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked, chunked\r\n\r\n", "named once"),
            ("POST /te HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n", "named once"),
            ("POST /te HTTP/1.0\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n", "HTTP/1.0"),
            ("POST /cl HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\n\r\n", "Content-Length"),
            ("POST /cl HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\n", "Content-Length"),
            ("GET /h HTTP/1.1\r\nHost: x\r\nNo colon here\r\n\r\n", "malformed"),
            ("GET /h HTTP/1.1\r\nHost: x\r\nX-Ctl: a\x01b\r\n\r\n", "malformed"),
        ];
        for (req, message) in cases {
            let mut raw = Raw::connect(p.public).await;
            raw.send(format!("{req}5\r\nhello\r\n0\r\n\r\nGET /second HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes())
                .await
                .unwrap();
            let (head, body) = raw.read_response(SECS10, false).await.unwrap();
            assert_eq!((head.status, json_code(&body)), (400, 400), "{req:?}: {}", head.raw);
            let text = String::from_utf8_lossy(&body);
            assert!(text.contains(message), "{req:?}: {text}");
            assert!(head.header("x-request-id").is_some(), "{}", head.raw);
            assert!(raw.closed_within(SECS10).await, "{req:?}: the connection must close");
            assert!(raw.pending().is_empty(), "{req:?}: nothing may follow");
        }
        assert_eq!(up.hits(), 0, "the upstream must see none of these: {:?}", up.seen());
        still_serves(&p, &up).await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn too_many_headers_is_431() {
    bounded(30, async {
        let up = Upstream::start("u");
        let p = Palisade::start(&simple_config("", "", &[up.url()])).await;
        let mut raw = Raw::connect(p.public).await;
        let many: String = (0..200).map(|i| format!("X-H{i}: v\r\n")).collect();
        raw.send(format!("GET /many HTTP/1.1\r\nHost: x\r\n{many}\r\n").as_bytes())
            .await
            .unwrap();
        let (head, body) = raw.read_response(SECS10, false).await.unwrap();
        assert_eq!((head.status, json_code(&body)), (431, 431), "{}", head.raw);
        assert!(raw.closed_within(SECS10).await);
        // 60 headers are fine (the test replica takes at most 100, forwarding headers included).
        let some: String = (0..60).map(|i| format!("X-H{i}: v\r\n")).collect();
        let mut raw = Raw::connect(p.public).await;
        raw.send(format!("GET /some HTTP/1.1\r\nHost: x\r\n{some}\r\n").as_bytes())
            .await
            .unwrap();
        let (head, _) = raw.read_response(SECS10, false).await.unwrap();
        assert_eq!(head.status, 200, "{}", head.raw);
        assert_eq!(up.hits(), 1);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_left_unread_closes_the_connection_and_is_never_a_request() {
    bounded(30, async {
        let up = Upstream::start("u");
        let config = format!(
            "{}[upstreams.backend]\nreplicas = [{:?}]\n\n[[routes]]\nname = \"api\"\nmatch = {{ path_prefix = \"/api\" }}\nupstream = \"backend\"\n",
            base_config(""),
            up.url()
        );
        let p = Palisade::start(&config).await;
        let hidden = "GET /api/smuggled HTTP/1.1\r\nHost: x\r\n\r\n";
        let mut raw = Raw::connect(p.public).await;
        raw.send(
            format!(
                "POST /nowhere HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\n\r\n{hidden}",
                hidden.len()
            )
            .as_bytes(),
        )
        .await
        .unwrap();
        let (head, body) = raw.read_response(SECS10, false).await.unwrap();
        assert_eq!((head.status, json_code(&body)), (404, 404), "{}", head.raw);
        assert!(head.header("date").is_some(), "{}", head.raw);
        assert!(raw.closed_within(SECS10).await, "the unread body must close the connection");
        assert!(raw.pending().is_empty(), "{}", String::from_utf8_lossy(raw.pending()));
        assert_eq!(up.hits(), 0, "{:?}", up.seen());

        // A body the pipeline reads keeps the connection.
        let mut raw = Raw::connect(p.public).await;
        for _ in 0..2 {
            raw.send(b"POST /api/read HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello")
                .await
                .unwrap();
            let (head, _) = raw.read_response(SECS10, false).await.unwrap();
            assert_eq!(head.status, 200, "{}", head.raw);
        }
        assert_eq!(up.hits(), 2);
        assert!(up.seen().iter().all(|s| s.received == 5 && s.complete));
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_gone_mid_body_never_reaches_the_upstream_as_complete() {
    bounded(30, async {
        let up = Upstream::start("u");
        let p = Palisade::start(&simple_config("", "", &[up.url()])).await;
        for framing in ["Content-Length: 100000", "Transfer-Encoding: chunked"] {
            let mut raw = Raw::connect(p.public).await;
            let part = if framing.starts_with("Content") {
                "a".repeat(5000)
            } else {
                format!("1388\r\n{}\r\n", "a".repeat(5000))
            };
            raw.send(
                format!("POST /cut HTTP/1.1\r\nHost: x\r\n{framing}\r\n\r\n{part}").as_bytes(),
            )
            .await
            .unwrap();
            tokio::time::sleep(ms(200)).await;
            drop(raw);
        }
        let deadline = tokio::time::Instant::now() + SECS10;
        while up.seen().len() < up.hits() as usize && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(ms(20)).await;
        }
        for s in up.seen() {
            assert!(
                !s.complete,
                "a cut body reached the upstream as complete: {s:?}"
            );
        }
        assert_eq!(
            up.state
                .bodies_complete
                .load(std::sync::atomic::Ordering::SeqCst),
            0
        );
        still_serves(&p, &up).await;
    })
    .await;
}

/// One upstream with a circuit breaker that opens after `failures` consecutive failures.
fn breaker_config(
    up: &Upstream,
    server_extra: &str,
    upstream_extra: &str,
    failures: u32,
) -> String {
    simple_config(
        server_extra,
        &format!(
            "{upstream_extra}\n[upstreams.backend.circuit_breaker]\nconsecutive_failures = {failures}\nopen_for = \"30s\""
        ),
        &[up.url()],
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broken_chunked_body_closes_the_connection_and_never_opens_the_breaker() {
    bounded(30, async {
        let up = Upstream::start("u");
        let p = Palisade::start(&breaker_config(&up, "", "", 2)).await;
        for _ in 0..3 {
            let mut raw = Raw::connect(p.public).await;
            raw.send(b"POST /first HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhelloGET /smuggled HTTP/1.1\r\nHost: x\r\n\r\n")
                .await
                .unwrap();
            let (head, body) = raw.read_response(SECS10, false).await.unwrap();
            assert_eq!((head.status, json_code(&body)), (400, 400), "{}", head.raw);
            assert_eq!(head.header("connection"), Some("close"), "{}", head.raw);
            assert!(raw.closed_within(SECS10).await);
            assert!(raw.pending().is_empty(), "{}", String::from_utf8_lossy(raw.pending()));
        }
        assert!(up.seen().iter().all(|s| s.path != "/smuggled" && !s.complete), "{:?}", up.seen());
        // The client's broken bodies are not the replica's failures.
        let r = get(&http1(), &p.url("/after"), &[]).await;
        assert_eq!(r.status, 200, "{}", r.text());
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_request_body_is_cut_off_and_not_blamed_on_the_replica() {
    bounded(30, async {
        // idle_timeout shorter than the upstream's timeout: the connection closes.
        let up = Upstream::start("u");
        let p = Palisade::start(&breaker_config(
            &up,
            "idle_timeout = \"1s\"",
            "timeout = \"5s\"",
            1,
        ))
        .await;
        let mut raw = Raw::connect(p.public).await;
        let started = std::time::Instant::now();
        raw.send(b"POST /slow HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n\r\nabc")
            .await
            .unwrap();
        let (got, end) = raw.read_to_end(SECS10).await;
        assert_eq!(end, ReadEnd::Closed);
        assert!(
            started.elapsed() < Duration::from_secs(4),
            "closed after {:?}",
            started.elapsed()
        );
        assert!(
            !String::from_utf8_lossy(&got).contains(" 504 "),
            "{}",
            String::from_utf8_lossy(&got)
        );
        let r = get(&http1(), &p.url("/after"), &[]).await;
        assert_eq!(r.status, 200, "{}", r.text());

        // The upstream's timeout shorter: a 400 for the client, and the breaker stays closed.
        let up = Upstream::start("u");
        let p = Palisade::start(&breaker_config(
            &up,
            "idle_timeout = \"10s\"",
            "timeout = \"1s\"",
            1,
        ))
        .await;
        let mut raw = Raw::connect(p.public).await;
        raw.send(b"POST /slow HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n\r\nabc")
            .await
            .unwrap();
        let (head, body) = raw.read_response(SECS10, false).await.unwrap();
        assert_eq!((head.status, json_code(&body)), (400, 400), "{}", head.raw);
        assert!(
            String::from_utf8_lossy(&body).contains("not sent within"),
            "{}",
            String::from_utf8_lossy(&body)
        );
        let r = get(&http1(), &p.url("/after"), &[]).await;
        assert_eq!(r.status, 200, "{}", r.text());
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn loose_chunk_syntax_is_refused_and_unknown_codings_are_501() {
    bounded(30, async {
        let up = Upstream::start("u");
        let p = Palisade::start(&simple_config("", "", &[up.url()])).await;
        let cases: [(&[u8], u16); 4] = [
            // A bare LF ends the trailers for some servers, not for others: refused.
            (b"POST /t HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\nGET /hidden HTTP/1.1\r\nHost: x\r\n\r\n", 400),
            (b"POST /t HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n5 zz\r\nhello\r\n0\r\n\r\n", 400),
            (b"POST /t HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n0\r\nnot a field\r\n\r\n", 400),
            (b"POST /t HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip, chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n", 501),
        ];
        for (req, code) in cases {
            let mut raw = Raw::connect(p.public).await;
            raw.send(req).await.unwrap();
            let (head, body) = raw.read_response(SECS10, false).await.unwrap();
            assert_eq!(head.status, code, "{}: {}", String::from_utf8_lossy(req), head.raw);
            assert_eq!(json_code(&body), u64::from(code));
            assert!(raw.closed_within(SECS10).await);
        }
        assert!(up.seen().iter().all(|s| s.path != "/hidden" && !s.complete), "{:?}", up.seen());
        still_serves(&p, &up).await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_repeated_content_length_reaches_the_client_once() {
    bounded(30, async {
        let up = ScriptedUpstream::start(|_, req| {
            Script::Answer(if req % 2 == 0 {
                b"HTTP/1.1 200 OK\r\nContent-Length: 5, 5\r\n\r\nhello".to_vec()
            } else {
                b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 5\r\n\r\nhello".to_vec()
            })
        });
        let p = Palisade::start(&simple_config("", "", &[up.url()])).await;
        let mut raw = Raw::connect(p.public).await;
        for _ in 0..2 {
            raw.send(b"GET /cl HTTP/1.1\r\nHost: x\r\n\r\n")
                .await
                .unwrap();
            let (head, body) = raw.read_response(SECS10, false).await.unwrap();
            let lengths: Vec<_> = head
                .headers
                .iter()
                .filter(|(k, _)| k == "content-length")
                .collect();
            assert_eq!(lengths.len(), 1, "{}", head.raw);
            assert_eq!(lengths[0].1, "5", "{}", head.raw);
            assert_eq!(body, b"hello");
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_absolute_form_target_is_routed_by_its_authority() {
    bounded(30, async {
        let up = Upstream::start("u");
        let config = format!(
            "{}[upstreams.backend]\nreplicas = [{:?}]\n\n[[routes]]\nname = \"a\"\nmatch = {{ host = \"a.example\" }}\nupstream = \"backend\"\n",
            base_config(""),
            up.url()
        );
        let p = Palisade::start(&config).await;
        let mut raw = Raw::connect(p.public).await;
        raw.send(b"GET http://a.example/abs HTTP/1.1\r\nHost: other.example\r\n\r\n")
            .await
            .unwrap();
        let (head, body) = raw.read_response(SECS10, false).await.unwrap();
        assert_eq!(head.status, 200, "{}", head.raw);
        assert_eq!(echoed_path(&body), "/abs");
        assert_eq!(up.seen()[0].header("host"), Some("a.example"), "{:?}", up.seen());
        raw.send(b"GET /abs HTTP/1.1\r\nHost: other.example\r\n\r\n").await.unwrap();
        let (head, _) = raw.read_response(SECS10, false).await.unwrap();
        assert_eq!(head.status, 404, "{}", head.raw);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cut_body_ended_by_the_connection_ends_with_a_reset() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    bounded(30, async {
        // A chunked body of unknown length that the replica cuts after one chunk.
        let up = ScriptedUpstream::start(|_, _| {
            Script::AnswerAndClose(
                b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n".to_vec(),
            )
        });
        let p = Palisade::start(&simple_config("", "", &[up.url()])).await;
        // HTTP/1.0 has no chunked coding: the body ends with the connection, so only a reset
        // tells the client that it was cut.
        let mut s = tokio::net::TcpStream::connect(p.public).await.unwrap();
        s.write_all(b"GET /cut HTTP/1.0\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        let mut got = Vec::new();
        let mut buf = [0u8; 4096];
        let end = loop {
            match tokio::time::timeout(SECS10, s.read(&mut buf)).await {
                Err(_) => panic!("no end within 10 s: {}", String::from_utf8_lossy(&got)),
                Ok(Ok(0)) => break Ok(()),
                Ok(Ok(n)) => got.extend_from_slice(&buf[..n]),
                Ok(Err(e)) => break Err(e.kind()),
            }
        };
        let text = String::from_utf8_lossy(&got);
        assert!(text.starts_with("HTTP/1.1 200"), "{text}");
        assert_eq!(end, Err(std::io::ErrorKind::ConnectionReset), "{text}");

        // HTTP/1.1: the body is chunked, and the missing last chunk says it was cut.
        let mut raw = Raw::connect(p.public).await;
        raw.send(b"GET /cut HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        let head = raw.read_head(SECS10).await.unwrap();
        assert_eq!(
            head.header("transfer-encoding"),
            Some("chunked"),
            "{}",
            head.raw
        );
        let (rest, end) = raw.read_to_end(SECS10).await;
        assert_eq!(end, ReadEnd::Closed);
        assert!(
            !String::from_utf8_lossy(&rest).contains("0\r\n\r\n"),
            "{}",
            String::from_utf8_lossy(&rest)
        );
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_that_stops_reading_a_body_is_the_one_blamed() {
    bounded(30, async {
        // Accepts and never reads: the upload stops at full socket buffers, on the replica's side.
        let up = Upstream::hanging();
        let p = Palisade::start(&simple_config(
            "max_request_body = \"64MiB\"",
            "timeout = \"1s\"",
            &[up.url()],
        ))
        .await;
        let mut raw = Raw::connect(p.public).await;
        let size = 48u64 << 20;
        raw.send(
            format!("POST /up HTTP/1.1\r\nHost: x\r\nContent-Length: {size}\r\n\r\n").as_bytes(),
        )
        .await
        .unwrap();
        let chunk = vec![b'a'; 1 << 20];
        let send = async {
            for _ in 0..(size >> 20) {
                if raw.send(&chunk).await.is_err() {
                    break;
                }
            }
        };
        let _ = tokio::time::timeout(Duration::from_secs(3), send).await;
        let (head, body) = raw.read_response(SECS10, false).await.unwrap();
        assert_eq!((head.status, json_code(&body)), (504, 504), "{}", head.raw);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_repeated_request_content_length_goes_upstream_once() {
    bounded(30, async {
        let up = Upstream::start("u");
        let p = Palisade::start(&simple_config("", "", &[up.url()])).await;
        for lengths in [
            "Content-Length: 5\r\nContent-Length: 5\r\n",
            "Content-Length: 5, 5\r\n",
        ] {
            let mut raw = Raw::connect(p.public).await;
            raw.send(format!("POST /cl HTTP/1.1\r\nHost: x\r\n{lengths}\r\nhello").as_bytes())
                .await
                .unwrap();
            let (head, _) = raw.read_response(SECS10, false).await.unwrap();
            assert_eq!(head.status, 200, "{}", head.raw);
        }
        for seen in up.seen() {
            let cl: Vec<_> = seen
                .headers
                .iter()
                .filter(|(k, _)| k == "content-length")
                .collect();
            assert_eq!(cl.len(), 1, "{:?}", seen.headers);
            assert_eq!(cl[0].1, "5");
            assert_eq!((seen.received, seen.complete), (5, true));
        }
        assert_eq!(up.seen().len(), 2);
    })
    .await;
}
