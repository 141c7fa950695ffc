//! The load test's origin: a bare hyper HTTP/1.1 server on one thread that answers every
//! request with the same 1 KiB body. `origin ADDR...` serves each address given.

use bytes::Bytes;
use http_body_util::Full;
use hyper::service::service_fn;
use hyper::{Response, header};
use hyper_util::rt::TokioIo;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::time::Duration;

const BODY: &[u8] = &[b'x'; 1024];

fn main() -> std::io::Result<()> {
    let addrs: Vec<SocketAddr> = std::env::args()
        .skip(1)
        .map(|a| {
            a.parse()
                .map_err(|e| std::io::Error::other(format!("{a}: {e}")))
        })
        .collect::<Result<_, _>>()?;
    if addrs.is_empty() {
        return Err(std::io::Error::other("usage: origin ADDR..."));
    }
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?
        .block_on(async move {
            let mut tasks = Vec::new();
            for addr in addrs {
                let listener = tokio::net::TcpListener::bind(addr).await?;
                tasks.push(tokio::spawn(serve(listener)));
            }
            for t in tasks {
                let _ = t.await;
            }
            Ok(())
        })
}

async fn serve(listener: tokio::net::TcpListener) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(10)).await;
            continue;
        };
        let _ = stream.set_nodelay(true);
        tokio::spawn(async move {
            let svc = service_fn(|_req| async {
                let mut resp = Response::new(Full::new(Bytes::from_static(BODY)));
                resp.headers_mut().insert(
                    header::CONTENT_TYPE,
                    header::HeaderValue::from_static("text/plain"),
                );
                Ok::<_, Infallible>(resp)
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        });
    }
}
