//! Stale-while-revalidate refreshes: the request that found a stale entry was answered from it
//! at once; this fetches the URL again in the background (with the entry's validators) and lets
//! the cache store the result. One refresh per key runs at a time (the cache's flight guard).

use super::headers;
use crate::body::{ClientBody, RequestBody, ResponseBody};
use crate::cache::{Finish, Pending};
use crate::server::ConnInfo;
use crate::state::{Shared, Snapshot};
use crate::upstream::Upstream;
use http::{Request, Version, header};
use http_body_util::BodyExt;
use std::sync::Arc;

/// Starts a background refresh of `pending`'s URL on `upstream`, bounded by four times the
/// upstream timeout.
pub(super) fn spawn(
    shared: &Shared,
    snap: &Snapshot,
    conn: &ConnInfo,
    req: &Request<ClientBody>,
    upstream: Arc<Upstream>,
    pending: Box<Pending>,
) {
    let host = super::request_host(req).into_owned();
    let mut h = pending.request_headers().clone();
    headers::remove_hop_by_hop(&mut h);
    h.remove(header::EXPECT);
    h.remove(header::CONTENT_LENGTH);
    let trusted = headers::is_trusted(conn.peer.ip(), &snap.config.server.trusted_proxies);
    headers::set_forwarding(
        &mut h,
        &conn.forwarded,
        trusted,
        &host,
        conn.proto,
        headers::VIA_H1,
    );
    h.insert(&headers::X_REQUEST_ID, shared.next_request_id());
    pending.prepare_upstream(&mut h);
    let path = req.uri().path_and_query().cloned();
    let limit = upstream.spec.timeout * 4;
    tokio::spawn(async move {
        let work = async move {
            let mut builder = Request::get(path.map_or_else(|| "/".to_owned(), |p| p.to_string()))
                .version(Version::HTTP_11);
            if let Some(hs) = builder.headers_mut() {
                *hs = h;
            }
            let Ok(request) = builder.body(RequestBody::empty()) else {
                return;
            };
            let Ok((resp, in_flight)) = upstream.forward(request, None).await else {
                return;
            };
            let (mut parts, body) = resp.into_parts();
            headers::remove_hop_by_hop(&mut parts.headers);
            if let Finish::Store(_, capture) = pending.finish(&mut parts, |_| None).await {
                let mut body = ResponseBody::upstream(body, upstream.spec.timeout, in_flight);
                body.capture(capture);
                while let Some(frame) = body.frame().await {
                    if frame.is_err() {
                        break;
                    }
                }
            }
        };
        if tokio::time::timeout(limit, work).await.is_err() {
            tracing::debug!("background cache refresh timed out");
        }
    });
}
