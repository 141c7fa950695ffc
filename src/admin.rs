//! The admin listener (default 127.0.0.1:9901): `/metrics`, `/healthz`, `/readyz`,
//! `/admin/upstreams` (replica health, circuits, load).
//!
//! It is a separate socket from the public listeners, so no public request can reach it. When
//! `admin.token` is set, every path but the health checks needs `Authorization: Bearer TOKEN`.
//!
//! `POST /admin/reload` reloads the config file as SIGHUP does and answers with the outcome;
//! `GET /admin/config` shows the effective config with secrets redacted.
//!
//! `POST /admin/purge` with `{"url": "http://host/path?q"}`, `{"prefix": "/products/"}` or
//! `{"route": "products"}` removes cached responses from both tiers.

use crate::body::ResponseBody;
use crate::cache::PurgeTarget;
use crate::reload::{Reloader, Trigger};
use crate::router::{RouteMatch, normalize_host};
use crate::state::Shared;
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;
use tokio::net::TcpListener;

/// Serves the admin endpoints on `listener` until the process exits.
pub async fn serve(shared: Arc<Shared>, reloader: Arc<Reloader>, listener: TcpListener) {
    loop {
        let (stream, _) = match listener.accept().await {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(error = %e, "admin accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let (shared, reloader) = (shared.clone(), reloader.clone());
        tokio::spawn(async move {
            let svc = service_fn(move |req| {
                let (shared, reloader) = (shared.clone(), reloader.clone());
                async move { Ok::<_, std::convert::Infallible>(respond(&shared, &reloader, req).await) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(Duration::from_secs(10))
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        });
    }
}

fn json(status: StatusCode, body: serde_json::Value) -> Response<ResponseBody> {
    let mut r = Response::new(ResponseBody::full(body.to_string()));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("application/json"),
    );
    r
}

fn error(status: StatusCode, message: &str) -> Response<ResponseBody> {
    json(
        status,
        serde_json::json!({"error": {"code": status.as_u16(), "message": message}}),
    )
}

async fn respond(
    shared: &Shared,
    reloader: &Reloader,
    req: Request<Incoming>,
) -> Response<ResponseBody> {
    let path = req.uri().path();
    if path == "/healthz" {
        return json(StatusCode::OK, serde_json::json!({"status": "ok"}));
    }
    if path == "/readyz" {
        return if shared.ready.load(Ordering::Acquire) {
            json(StatusCode::OK, serde_json::json!({"status": "ready"}))
        } else {
            json(
                StatusCode::SERVICE_UNAVAILABLE,
                serde_json::json!({"status": "starting"}),
            )
        };
    }
    let snap = shared.snapshot.load();
    if let Some(token) = &snap.config.admin.token {
        let given = req
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "));
        if !given.is_some_and(|g| constant_time_eq(g.as_bytes(), token.as_bytes())) {
            let mut r = error(
                StatusCode::UNAUTHORIZED,
                "this admin endpoint needs Authorization: Bearer TOKEN",
            );
            r.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                header::HeaderValue::from_static("Bearer"),
            );
            return r;
        }
    }
    match (req.method(), path) {
        (&Method::GET, "/metrics") => {
            shared.cache.update_gauges();
            let mut r = Response::new(ResponseBody::full(shared.metrics.render()));
            r.headers_mut().insert(
                header::CONTENT_TYPE,
                header::HeaderValue::from_static("text/plain; version=0.0.4"),
            );
            r
        }
        (&Method::GET, "/admin/upstreams") => {
            json(StatusCode::OK, upstreams(&shared.snapshot.load()))
        }
        (&Method::GET, "/admin/config") => json(
            StatusCode::OK,
            crate::config::show::effective_json(&shared.snapshot.load().config),
        ),
        (_, "/metrics" | "/admin/upstreams" | "/admin/config") => {
            error(StatusCode::METHOD_NOT_ALLOWED, "use GET")
        }
        (&Method::POST, "/admin/reload") => reload(reloader),
        (_, "/admin/reload") => error(StatusCode::METHOD_NOT_ALLOWED, "use POST"),
        (&Method::POST, "/admin/purge") => purge(shared, req).await,
        (_, "/admin/purge") => error(StatusCode::METHOD_NOT_ALLOWED, "use POST"),
        _ => error(
            StatusCode::NOT_FOUND,
            "unknown admin path; try /metrics, /healthz, /readyz, /admin/upstreams, /admin/config, POST /admin/reload or POST /admin/purge",
        ),
    }
}

/// `POST /admin/reload`: 200 with what is now running, or 422 with every error (file:line:col)
/// while the running config stays.
fn reload(reloader: &Reloader) -> Response<ResponseBody> {
    match reloader.reload(Trigger::Admin) {
        Ok(c) => json(
            StatusCode::OK,
            serde_json::json!({
                "status": "reloaded",
                "file": c.file.display().to_string(),
                "routes": c.routes.len(),
                "upstreams": c.upstreams.len(),
            }),
        ),
        Err(errors) => json(
            StatusCode::UNPROCESSABLE_ENTITY,
            serde_json::json!({"error": {
                "code": 422,
                "message": "config reload rejected; keeping the running config",
                "errors": errors.0.iter().map(|e| e.to_string()).collect::<Vec<_>>(),
            }}),
        ),
    }
}

/// `/admin/upstreams`: every upstream and, per replica, its health, circuit, in-flight
/// requests and latency EWMA.
fn upstreams(snap: &crate::state::Snapshot) -> serde_json::Value {
    let now = std::time::Instant::now();
    let list: Vec<serde_json::Value> = snap
        .upstreams
        .iter()
        .map(|u| {
            let replicas: Vec<serde_json::Value> = u
                .replicas
                .iter()
                .map(|r| {
                    serde_json::json!({
                        "url": &*r.url,
                        "healthy": r.health.is_healthy(),
                        "circuit": r.breaker.state().as_str(),
                        "available": r.is_available(&u.spec, now),
                        "in_flight": r.in_flight(),
                        "ewma_ms": (r.ewma_ms() * 1000.0).round() / 1000.0,
                    })
                })
                .collect();
            serde_json::json!({
                "name": u.spec.name,
                "balance": u.spec.balance.as_str(),
                "health_checks": u.spec.health.is_some(),
                "circuit_breaker": u.spec.circuit_breaker.is_some(),
                "panic": u.in_panic(now),
                "replicas": replicas,
            })
        })
        .collect();
    serde_json::json!({ "upstreams": list })
}

/// Largest purge request body.
const MAX_PURGE_BODY: usize = 64 << 10;
const PURGE_USAGE: &str =
    r#"send JSON: {"url": "http://host/path?q"}, {"prefix": "/path/"} or {"route": "NAME"}"#;

/// A purge request's body.
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct PurgeRequest {
    url: Option<String>,
    prefix: Option<String>,
    route: Option<String>,
}

async fn purge(shared: &Shared, req: Request<Incoming>) -> Response<ResponseBody> {
    let body = http_body_util::Limited::new(req.into_body(), MAX_PURGE_BODY);
    let bytes = match tokio::time::timeout(Duration::from_secs(10), body.collect()).await {
        Ok(Ok(b)) => b.to_bytes(),
        Ok(Err(_)) => return error(StatusCode::PAYLOAD_TOO_LARGE, "purge body over 64 KiB"),
        Err(_) => return error(StatusCode::REQUEST_TIMEOUT, "purge body not sent in time"),
    };
    let parsed: PurgeRequest = match serde_json::from_slice(&bytes) {
        Ok(p) => p,
        Err(e) => return error(StatusCode::BAD_REQUEST, &format!("{e}: {PURGE_USAGE}")),
    };
    let snap = shared.snapshot.load_full();
    let target = match (parsed.url, parsed.prefix, parsed.route) {
        (Some(url), None, None) => {
            let Some(uri) = url
                .parse::<http::Uri>()
                .ok()
                .filter(|u| u.authority().is_some())
            else {
                return error(
                    StatusCode::BAD_REQUEST,
                    &format!("url {url:?} is not absolute: {PURGE_USAGE}"),
                );
            };
            let host = normalize_host(uri.authority().map_or("", |a| a.as_str())).into_owned();
            let path = uri.path();
            let key = match snap.router.find(&host, path, &Method::GET) {
                RouteMatch::Found(i) => snap.routes[i]
                    .cache
                    .as_ref()
                    .map(|p| p.key(&host, path, uri.query())),
                _ => None,
            };
            match key {
                Some(k) => PurgeTarget::Key(k),
                None => {
                    return json(
                        StatusCode::OK,
                        serde_json::json!({"purged": 0, "memory": 0, "redis": 0, "note": "no cached route serves this URL"}),
                    );
                }
            }
        }
        (None, Some(prefix), None) if prefix.starts_with('/') => PurgeTarget::PathPrefix(prefix),
        (None, None, Some(route)) if snap.routes.iter().any(|r| *r.name == *route) => {
            PurgeTarget::Route(route)
        }
        (None, None, Some(route)) => {
            return error(StatusCode::NOT_FOUND, &format!("no route named {route:?}"));
        }
        _ => return error(StatusCode::BAD_REQUEST, PURGE_USAGE),
    };
    let n = shared.cache.purge(snap.cache_redis.as_ref(), &target).await;
    let mut body =
        serde_json::json!({"purged": n.memory + n.redis, "memory": n.memory, "redis": n.redis});
    if let Some(e) = n.redis_error {
        body["redis_error"] = serde_json::Value::String(e);
    }
    json(StatusCode::OK, body)
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}
