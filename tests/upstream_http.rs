//! How Palisade reads replicas' responses (its own HTTP/1.1 client): every framing RFC 9112
//! allows, which connections it keeps, and the broken responses it refuses. The replica here
//! writes raw bytes ([`ScriptedUpstream`]), so each case is exactly what goes on the wire.

mod common;

use common::*;
use http::Request;
use std::time::Duration;

const OK: &[u8] = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok";

fn answer(bytes: &[u8]) -> Script {
    Script::Answer(bytes.to_vec())
}

async fn proxy_for(up: &ScriptedUpstream) -> Palisade {
    Palisade::start(&simple_config("", "", &[up.url()])).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chunked_bodies_with_trailers_arrive_whole_on_one_connection() {
    bounded(30, async {
        let up = ScriptedUpstream::start(|_, _| {
            answer(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n6;ext=1\r\n world\r\n0\r\nX-Trailer: t\r\n\r\n")
        });
        let p = proxy_for(&up).await;
        let client = http1();
        for _ in 0..3 {
            let r = get(&client, &p.url("/c"), &[]).await;
            assert_eq!((r.status.as_u16(), r.text().as_str()), (200, "hello world"));
        }
        assert_eq!((up.requests(), up.connections()), (3, 1), "the connection is kept");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_until_close_is_read_to_its_end_and_the_connection_is_not_kept() {
    bounded(30, async {
        let up = ScriptedUpstream::start(|_, _| {
            Script::AnswerAndClose(
                b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\nall of it, however long"
                    .to_vec(),
            )
        });
        let p = proxy_for(&up).await;
        let client = http1();
        for _ in 0..2 {
            let r = get(&client, &p.url("/close"), &[]).await;
            assert_eq!(r.status, 200);
            assert_eq!(r.text(), "all of it, however long");
        }
        assert_eq!(up.connections(), 2);
        let l = p
            .wait_log(Duration::from_secs(5), |l| l["message"] == "access")
            .await;
        assert_eq!(l["complete"], true, "{l}");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_the_response_does_not_keep_are_not_reused() {
    bounded(30, async {
        // The replica keeps every socket open; Palisade must still not send on these again.
        let up = ScriptedUpstream::start(|_, req| match req {
            0 => answer(b"HTTP/1.0 200 OK\r\nContent-Length: 4\r\n\r\nv1.0"),
            _ => panic!("a connection was reused after a response that closes it"),
        });
        let p = proxy_for(&up).await;
        let client = http1();
        for _ in 0..2 {
            assert_eq!(get(&client, &p.url("/a"), &[]).await.text(), "v1.0");
        }
        assert_eq!(up.connections(), 2);

        let up = ScriptedUpstream::start(|_, req| match req {
            0 => answer(b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 5\r\n\r\nclose"),
            _ => panic!("a connection was reused after Connection: close"),
        });
        let p = proxy_for(&up).await;
        for _ in 0..2 {
            assert_eq!(get(&client, &p.url("/b"), &[]).await.text(), "close");
        }
        assert_eq!(up.connections(), 2);

        // HTTP/1.0 with keep-alive, and a HEAD answer with a Content-Length but no body, keep it.
        let up = ScriptedUpstream::start(|_, req| match req % 2 {
            0 => {
                answer(b"HTTP/1.0 200 OK\r\nConnection: keep-alive\r\nContent-Length: 2\r\n\r\nka")
            }
            _ => answer(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n"),
        });
        let p = proxy_for(&up).await;
        assert_eq!(get(&client, &p.url("/k"), &[]).await.text(), "ka");
        let r = send(&client, Request::head(p.url("/k")).body(empty()).unwrap()).await;
        assert_eq!((r.status.as_u16(), r.body.len()), (200, 0));
        assert_eq!(r.header("content-length"), Some("1000"));
        assert_eq!(get(&client, &p.url("/k"), &[]).await.text(), "ka");
        assert_eq!((up.requests(), up.connections()), (3, 1));
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bytes_past_the_end_of_a_body_never_reach_the_next_request() {
    bounded(30, async {
        let up = ScriptedUpstream::start(|conn, _| match conn {
            0 => answer(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nokHTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\nsmuggl"),
            _ => answer(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nclean"),
        });
        let p = proxy_for(&up).await;
        let client = http1();
        assert_eq!(get(&client, &p.url("/x"), &[]).await.text(), "ok");
        assert_eq!(get(&client, &p.url("/x"), &[]).await.text(), "clean");
        assert_eq!(up.connections(), 2);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transfer_encoding_wins_over_content_length() {
    bounded(30, async {
        let up = ScriptedUpstream::start(|conn, _| match conn {
            0 => answer(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n"),
            _ => answer(OK),
        });
        let p = proxy_for(&up).await;
        let client = http1();
        let r = get(&client, &p.url("/te"), &[]).await;
        assert_eq!(r.text(), "abc");
        assert_ne!(r.header("content-length"), Some("100"));
        assert_eq!(get(&client, &p.url("/te"), &[]).await.text(), "ok");
        assert_eq!(up.connections(), 2, "a response with both framings closes its connection");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn informational_responses_are_skipped() {
    bounded(30, async {
        let up = ScriptedUpstream::start(|_, _| {
            answer(b"HTTP/1.1 103 Early Hints\r\nLink: </s.css>; rel=preload\r\n\r\nHTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 201 Created\r\nContent-Length: 4\r\n\r\nmade")
        });
        let p = proxy_for(&up).await;
        let client = http1();
        for _ in 0..2 {
            let r = get(&client, &p.url("/hints"), &[]).await;
            assert_eq!((r.status.as_u16(), r.text().as_str()), (201, "made"));
            assert!(r.header("link").is_none());
        }
        assert_eq!(up.connections(), 1);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_closing_a_kept_connection_costs_no_idempotent_request() {
    bounded(30, async {
        // Each connection answers once, then takes the next request and closes without a word
        // (a replica whose keep-alive timeout fired as the request arrived).
        let up = ScriptedUpstream::start(|_, req| match req {
            0 => answer(OK),
            _ => Script::Close,
        });
        let p = proxy_for(&up).await;
        let client = http1();
        for _ in 0..4 {
            let r = get(&client, &p.url("/again"), &[]).await;
            assert_eq!((r.status.as_u16(), r.text().as_str()), (200, "ok"));
        }
        assert!(up.connections() >= 4, "{}", up.connections());

        // A POST is not sent twice: the client gets the 502.
        let before = up.requests();
        let r = send(
            &client,
            Request::post(p.url("/once")).body(full("x")).unwrap(),
        )
        .await;
        assert_eq!(r.status, 502, "{}", r.text());
        assert_eq!(r.json()["error"]["code"], 502);
        assert_eq!(
            up.requests() - before,
            1,
            "the POST reached the replica once"
        );
        let r = get(&client, &p.url("/after"), &[]).await;
        assert_eq!(r.status, 200);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broken_response_heads_are_502_and_the_next_request_is_served() {
    bounded(60, async {
        let broken: Vec<&[u8]> = vec![
            b"NOT HTTP AT ALL\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\nok",
            b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n",
            b"HTTP/1.1 2000 OK\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nBad Header\r\n\r\n",
            b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nX-Cut: the connection closes within the head",
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked, chunked\r\n\r\n0\r\n\r\n",
        ];
        let mut broken: Vec<Vec<u8>> = broken.into_iter().map(<[u8]>::to_vec).collect();
        let mut hints = b"HTTP/1.1 100 Continue\r\n\r\n".repeat(17);
        hints.extend_from_slice(OK);
        broken.push(hints);
        let n = broken.len() as u64;
        let up = ScriptedUpstream::start(move |conn, _| match conn {
            c if c < n => Script::AnswerAndClose(broken[c as usize].clone()),
            _ => answer(OK),
        });
        let p = proxy_for(&up).await;
        let client = http1();
        for i in 0..n {
            let r = get(&client, &p.url("/broken"), &[]).await;
            assert_eq!(r.status, 502, "case {i}: {}", r.text());
            let message = r.json()["error"]["message"].as_str().unwrap().to_owned();
            assert!(message.contains(&up.url()), "case {i}: {message}");
        }
        let r = get(&client, &p.url("/fine"), &[]).await;
        assert_eq!((r.status.as_u16(), r.text().as_str()), (200, "ok"));
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_head_over_64_kib_is_refused() {
    bounded(30, async {
        let huge = format!(
            "HTTP/1.1 200 OK\r\nX-Big: {}\r\nContent-Length: 0\r\n\r\n",
            "a".repeat(70_000)
        );
        let up = ScriptedUpstream::start(move |conn, _| match conn {
            0 => Script::AnswerAndClose(huge.clone().into_bytes()),
            _ => answer(OK),
        });
        let p = proxy_for(&up).await;
        let client = http1();
        let r = get(&client, &p.url("/big"), &[]).await;
        assert_eq!(r.status, 502);
        assert!(r.text().contains("exceeds 65536 bytes"), "{}", r.text());
        assert_eq!(get(&client, &p.url("/small"), &[]).await.text(), "ok");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broken_chunked_body_is_cut_off_for_the_client() {
    bounded(30, async {
        let cases: Vec<&[u8]> = vec![
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhel",
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\nzz\r\n",
        ];
        let n = cases.len() as u64;
        let up = ScriptedUpstream::start(move |conn, _| match conn {
            c if c < n => Script::AnswerAndClose(cases[c as usize].to_vec()),
            _ => answer(OK),
        });
        let p = proxy_for(&up).await;
        for _ in 0..n {
            let mut raw = Raw::connect(p.public).await;
            raw.send(b"GET /cut HTTP/1.1\r\nHost: x\r\n\r\n")
                .await
                .unwrap();
            // The head goes out with the first bytes of the body, or not at all when the
            // body breaks before the first write; either way the connection closes unfinished.
            let (rest, end) = raw.read_to_end(Duration::from_secs(10)).await;
            assert_eq!(end, ReadEnd::Closed);
            let text = String::from_utf8_lossy(&rest);
            assert!(
                rest.is_empty() || text.starts_with("HTTP/1.1 200"),
                "{text}"
            );
            assert!(!rest.ends_with(b"0\r\n\r\n"), "{text}");
        }
        p.wait_log_count(Duration::from_secs(5), 2, |l| {
            l["message"] == "access" && l["complete"] == false
        })
        .await;
        assert_eq!(get(&http1(), &p.url("/fine"), &[]).await.text(), "ok");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_bodies_are_framed_for_the_replica() {
    bounded(30, async {
        let up = Upstream::start("framing");
        let p = Palisade::start(&simple_config("", "", &[up.url()])).await;
        let client = http1();
        // A chunked upload goes on chunked; a sized one with its Content-Length; an empty POST
        // with Content-Length: 0.
        let r = send(
            &client,
            Request::post(p.url("/up"))
                .body(zeros_chunked(300_000))
                .unwrap(),
        )
        .await;
        assert_eq!(r.status, 200);
        let r = send(
            &client,
            Request::put(p.url("/up"))
                .body(full(vec![7u8; 100_000]))
                .unwrap(),
        )
        .await;
        assert_eq!(r.status, 200);
        let r = send(&client, Request::post(p.url("/up")).body(empty()).unwrap()).await;
        assert_eq!(r.status, 200);
        let seen = up.seen();
        assert_eq!(seen.len(), 3);
        assert_eq!(seen[0].header("transfer-encoding"), Some("chunked"));
        assert_eq!(seen[0].received, 300_000);
        assert_eq!(seen[1].header("content-length"), Some("100000"));
        assert_eq!(seen[1].received, 100_000);
        assert_eq!(seen[2].header("content-length"), Some("0"));
        assert_eq!(seen[2].received, 0);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chunked_body_cut_short_is_never_cached() {
    bounded(30, async {
        let up = ScriptedUpstream::start(|conn, _| match conn {
            0 => Script::AnswerAndClose(
                b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n".to_vec(),
            ),
            _ => answer(
                b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nwhole\r\n0\r\n\r\n",
            ),
        });
        let config = format!(
            "{}cache = {{ ttl = \"60s\" }}\n\n[cache]\nmemory = \"16MiB\"\n",
            simple_config("", "", &[up.url()])
        );
        let p = Palisade::start(&config).await;
        let client = http1();
        let cut = try_send(&client, Request::get(p.url("/c")).body(empty()).unwrap()).await;
        assert!(
            cut.is_err(),
            "a cut body must not arrive as a whole one: {cut:?}"
        );
        let r = get(&client, &p.url("/c"), &[]).await;
        assert_eq!(r.text(), "whole");
        assert!(
            r.header("cache-status").unwrap().contains("fwd=miss"),
            "{:?}",
            r.header("cache-status")
        );
        let r = get(&client, &p.url("/c"), &[]).await;
        assert_eq!(r.text(), "whole");
        assert!(
            r.header("cache-status").unwrap().contains("hit"),
            "{:?}",
            r.header("cache-status")
        );
        assert_eq!(up.requests(), 2);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_that_kills_the_replica_s_connections_is_sent_at_most_twice() {
    bounded(30, async {
        // Five connections answer once (slowly, so that all five open), then every connection
        // closes on the next request without answering, as a worker crashing on it would.
        let up = ScriptedUpstream::start(|conn, req| match (conn, req) {
            (c, 0) if c < 5 => Script::Delayed(300, OK.to_vec()),
            _ => Script::Close,
        });
        let p = proxy_for(&up).await;
        let client = http1();
        let primed = {
            let url = p.url("/prime");
            futures_util::future::join_all((0..5).map(|_| get(&client, &url, &[]))).await
        };
        assert!(primed.iter().all(|r| r.status == 200));
        assert_eq!(up.connections(), 5);
        let before = up.requests();
        let r = get(&client, &p.url("/death"), &[]).await;
        assert_eq!(r.status, 502, "{}", r.text());
        assert_eq!(
            up.requests() - before,
            2,
            "once on a kept connection, once more on a new one; never once per idle connection"
        );
    })
    .await;
}
