//! 1 GiB up and down through the proxy, with Palisade's peak RSS (VmHWM) under 64 MiB: bodies
//! stream, they are never buffered (and the test code streams them too).

mod common;

use common::*;
use http::Request;
use std::sync::atomic::Ordering;
use std::time::Duration;

const GIB: u64 = 1 << 30;
const PEAK_LIMIT: u64 = 64 << 20;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_gib_upload_streams_with_bounded_memory() {
    bounded(150, async {
        let up = Upstream::start("sink");
        let p = Palisade::start(&simple_config(
            "max_request_body = \"2GiB\"",
            "timeout = \"60s\"",
            &[up.url()],
        ))
        .await;
        let client = http1();
        let resp = tokio::time::timeout(
            Duration::from_secs(120),
            client.request(Request::post(p.url("/upload")).body(zeros(GIB)).unwrap()),
        )
        .await
        .expect("upload did not finish in 120 s")
        .expect("upload failed");
        assert_eq!(resp.status(), 200);
        let (parts, body) = resp.into_parts();
        let (n, err) = count_body(body).await;
        assert!(err.is_none() && n > 0, "{parts:?}");
        assert_eq!(
            up.state.received.load(Ordering::SeqCst),
            GIB,
            "the upstream must get every byte"
        );
        assert_eq!(up.state.bodies_complete.load(Ordering::SeqCst), 1);
        let seen = up.seen().pop().unwrap();
        assert_eq!((seen.received, seen.complete), (GIB, true));
        let peak = p.peak_rss();
        assert!(
            peak < PEAK_LIMIT,
            "peak RSS {} MiB during a 1 GiB upload",
            peak >> 20
        );
        assert!(p.rss() <= peak);
        let r = get(&client, &p.url("/after"), &[]).await;
        assert_eq!(r.status, 200);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_gib_download_streams_with_bounded_memory() {
    bounded(150, async {
        let up = Upstream::start("source");
        let p = Palisade::start(&simple_config(
            "workers = 2",
            "timeout = \"60s\"",
            &[up.url()],
        ))
        .await;
        let client = http1();
        let resp = client
            .request(
                Request::get(p.url(&format!("/download?size={GIB}")))
                    .body(empty())
                    .unwrap(),
            )
            .await
            .expect("download failed");
        assert_eq!(resp.status(), 200);
        assert_eq!(resp.headers()["content-length"], GIB.to_string().as_str());
        let (n, err) = tokio::time::timeout(Duration::from_secs(120), count_body(resp.into_body()))
            .await
            .expect("download did not finish in 120 s");
        assert!(err.is_none(), "{err:?}");
        assert_eq!(n, GIB);
        let peak = p.peak_rss();
        assert!(
            peak < PEAK_LIMIT,
            "peak RSS {} MiB during a 1 GiB download",
            peak >> 20
        );
        let log = p
            .wait_log(Duration::from_secs(5), |l| {
                l["message"] == "access"
                    && l["path"]
                        .as_str()
                        .is_some_and(|p| p.starts_with("/download"))
            })
            .await;
        assert_eq!(log["bytes"], GIB);
        assert_eq!(log["complete"], true);
        assert_eq!(log["status"], 200);
    })
    .await;
}
