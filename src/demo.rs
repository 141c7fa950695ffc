//! Built-in demo replicas for `palisade demo`: small HTTP servers on the replica addresses of
//! the demo config that answer with JSON naming themselves, so balancing can be seen with curl.
//!
//! `/slow?ms=N` waits N ms (try it past the 5 s upstream timeout for a 504), `/status/N`
//! answers with status N, anything else echoes method and path.

use crate::body::ResponseBody;
use crate::config::Config;
use http::{Request, Response, StatusCode, header};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use std::time::Duration;

/// Binds every replica of every upstream in `config` and serves the demo answers there.
pub fn start(config: &Config) -> std::io::Result<()> {
    let mut n = 0;
    for u in &config.upstreams {
        for url in &u.replicas {
            n += 1;
            let addr: std::net::SocketAddr = url
                .trim_start_matches("http://")
                .parse()
                .map_err(|e| std::io::Error::other(format!("{url}: {e}")))?;
            let listener = crate::server::bind(addr)?;
            let name = format!("demo-{n}");
            tokio::spawn(serve(listener, name));
        }
    }
    let listen = config.server.listen.first().copied();
    if let Some(a) = listen {
        let base = format!("http://{a}");
        println!(
            "Palisade demo: proxy on {base}, admin on http://{}",
            config.admin.listen
        );
        println!("Try:");
        println!(
            "  curl -i {base}/products/42          # alternates demo-1 / demo-2 (round robin)"
        );
        println!("  curl -i {base}/hello -H 'X-Request-Id: try-1'   # your request id comes back");
        println!("  curl -i {base}/status/503           # the replica's own status passes through");
        println!("  curl -i {base}/slow?ms=6000         # past the 5s upstream timeout: 504 JSON");
        println!(
            "  curl -i -X POST {base}/products/1   # products is GET/HEAD only, so this takes route default"
        );
        println!(
            "  curl -i {base}/products/%2e%2e/admin # encoded path tricks are refused: 400 JSON"
        );
        println!(
            "  curl -s http://{}/metrics | grep palisade_requests_total",
            config.admin.listen
        );
        println!(
            "  curl -s http://{}/admin/upstreams   # replica health, circuits, in-flight, EWMA",
            config.admin.listen
        );
        println!("Stop with Ctrl-C.");
    }
    Ok(())
}

async fn serve(listener: tokio::net::TcpListener, name: String) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        let name = name.clone();
        tokio::spawn(async move {
            let svc = service_fn(move |req| {
                let name = name.clone();
                async move { Ok::<_, std::convert::Infallible>(answer(&name, req).await) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        });
    }
}

async fn answer(name: &str, req: Request<Incoming>) -> Response<ResponseBody> {
    let path = req.uri().path().to_owned();
    let mut status = StatusCode::OK;
    if let Some(code) = path.strip_prefix("/status/") {
        status = code
            .parse()
            .ok()
            .and_then(|c| StatusCode::from_u16(c).ok())
            .unwrap_or(StatusCode::BAD_REQUEST);
    }
    if path == "/slow" {
        let ms = req
            .uri()
            .query()
            .and_then(|q| q.strip_prefix("ms="))
            .and_then(|v| v.parse().ok())
            .unwrap_or(1000u64)
            .min(60_000);
        tokio::time::sleep(Duration::from_millis(ms)).await;
    }
    let body = serde_json::json!({
        "replica": name,
        "method": req.method().as_str(),
        "path": path,
        "x_forwarded_for": req.headers().get("x-forwarded-for").and_then(|v| v.to_str().ok()),
        "request_id": req.headers().get("x-request-id").and_then(|v| v.to_str().ok()),
    });
    let mut r = Response::new(ResponseBody::full(format!("{body}\n")));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("application/json"),
    );
    r
}
