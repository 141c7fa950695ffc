//! An upstream replica for tests: a hyper 1 HTTP/1.1 server (plain, or over TLS with
//! [`Upstream::start_tls`]) on 127.0.0.1:0, on its own runtime,
//! whose behaviour is chosen per request by query parameters (or per server by [`Settings`]):
//!
//! - `delay_ms=N`: wait before the response head.
//! - `status=N`: the response status.
//! - `size=N`: a body of N bytes streamed in `chunk=N` byte chunks (default 64 KiB), with a
//!   Content-Length unless `chunked=1`; `drip_ms=N` waits between chunks.
//! - `fail_after=N`: send N body bytes, then break the connection (no clean end).
//! - `hang=1`: never answer.
//! - `hop=1`: add hop-by-hop response headers (Connection and the header it names, Keep-Alive,
//!   Proxy-*, Trailer, Upgrade).
//! - Caching: `cc=V` sets Cache-Control (percent-encoded), `vary=V` Vary, `etag=T` an ETag `"T"`
//!   (a request whose If-None-Match names it gets 304), `lm=1` a fixed Last-Modified (an
//!   If-Modified-Since at or after it gets 304), `cookie=1` a Set-Cookie, `loc=PATH` Location,
//!   `cl=N` a Content-Length of N whatever the body (a lying upstream).
//!
//! Without `size`, the body is JSON: `{"replica", "method", "path", "headers": [[k, v], ..],
//! "received"}`: the request as this replica saw it. Every request body is read as a stream and
//! counted (never buffered); the counts are in [`State`].

use bytes::Bytes;
use http::{HeaderValue, Request, Response, StatusCode};
use http_body::{Body, Frame, SizeHint};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

/// Per-server defaults, changeable while the server runs.
#[derive(Default)]
pub struct Settings {
    /// Delay before every response head, in ms (a query `delay_ms` overrides it).
    pub delay_ms: AtomicU64,
    /// Status of every response when not 0 (a query `status` overrides it).
    pub status: AtomicU64,
}

/// What one request looked like to the replica.
#[derive(Clone, Debug)]
pub struct Seen {
    /// Method.
    pub method: String,
    /// Path and query.
    pub path: String,
    /// Headers in arrival order, names lower-case.
    pub headers: Vec<(String, String)>,
    /// Body bytes received.
    pub received: u64,
    /// Whether the body ended cleanly.
    pub complete: bool,
}

impl Seen {
    /// The first value of a header.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
}

/// Counters of one replica.
#[derive(Default)]
pub struct State {
    /// Connections accepted.
    pub connections: AtomicU64,
    /// Requests whose head arrived.
    pub hits: AtomicU64,
    /// Requests being handled now.
    pub in_flight: AtomicI64,
    /// Request body bytes received, over all requests (counted as they arrive).
    pub received: AtomicU64,
    /// Request bodies that ended cleanly.
    pub bodies_complete: AtomicU64,
    /// Every request, once its body has been read (or failed).
    pub seen: Mutex<Vec<Seen>>,
}

/// A running replica; stops when dropped.
pub struct Upstream {
    /// Its address.
    pub addr: SocketAddr,
    /// Its name (in the JSON it answers).
    pub name: String,
    /// Its counters.
    pub state: Arc<State>,
    /// Its defaults.
    pub settings: Arc<Settings>,
    runtime: Option<tokio::runtime::Runtime>,
}

impl Drop for Upstream {
    fn drop(&mut self) {
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_background();
        }
    }
}

fn bind(rt: &tokio::runtime::Runtime) -> tokio::net::TcpListener {
    bind_on(rt, SocketAddr::from(([127, 0, 0, 1], 0)))
}

fn bind_on(rt: &tokio::runtime::Runtime, addr: SocketAddr) -> tokio::net::TcpListener {
    // A stopped replica's sockets close as its runtime winds down: retry briefly (≤ 2 s).
    let mut tries = 0;
    let l = loop {
        match std::net::TcpListener::bind(addr) {
            Ok(l) => break l,
            Err(e) if tries < 100 && addr.port() != 0 => {
                tries += 1;
                let _ = e;
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(e) => panic!("bind upstream on {addr}: {e}"),
        }
    };
    l.set_nonblocking(true).expect("nonblocking");
    let _enter = rt.enter();
    tokio::net::TcpListener::from_std(l).expect("tokio listener")
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("upstream runtime")
}

impl Upstream {
    /// Starts a replica named `name`.
    pub fn start(name: &str) -> Upstream {
        Self::start_on(name, SocketAddr::from(([127, 0, 0, 1], 0)))
    }

    /// Starts a replica named `name` on `addr` (a stopped replica's address, to restart it:
    /// the listener reuses the address as std does on Unix, SO_REUSEADDR).
    pub fn start_on(name: &str, addr: SocketAddr) -> Upstream {
        Self::start_with(name, addr, None)
    }

    /// Starts a replica named `name` that speaks HTTP/1.1 over TLS with `config` (see
    /// [`super::tls`]); its [`Upstream::url`] is still `http://`, use [`Upstream::https_url`].
    pub fn start_tls(name: &str, config: Arc<rustls::ServerConfig>) -> Upstream {
        Self::start_with(
            name,
            SocketAddr::from(([127, 0, 0, 1], 0)),
            Some(tokio_rustls::TlsAcceptor::from(config)),
        )
    }

    fn start_with(
        name: &str,
        addr: SocketAddr,
        tls: Option<tokio_rustls::TlsAcceptor>,
    ) -> Upstream {
        let rt = runtime();
        let listener = bind_on(&rt, addr);
        let addr = listener.local_addr().expect("upstream addr");
        let state = Arc::new(State::default());
        let settings = Arc::new(Settings::default());
        let ctx = Arc::new(Ctx {
            name: name.to_owned(),
            state: state.clone(),
            settings: settings.clone(),
        });
        rt.spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                ctx.state.connections.fetch_add(1, Ordering::SeqCst);
                let _ = stream.set_nodelay(true);
                let ctx = ctx.clone();
                let tls = tls.clone();
                tokio::spawn(async move {
                    match tls {
                        None => serve_http1(ctx, stream).await,
                        Some(acceptor) => {
                            if let Ok(stream) = acceptor.accept(stream).await {
                                serve_http1(ctx, stream).await;
                            }
                        }
                    }
                });
            }
        });
        Upstream {
            addr,
            name: name.to_owned(),
            state,
            settings,
            runtime: Some(rt),
        }
    }

    /// A server that accepts connections and never reads or answers.
    pub fn hanging() -> Upstream {
        let rt = runtime();
        let listener = bind(&rt);
        let addr = listener.local_addr().expect("addr");
        let state = Arc::new(State::default());
        let st = state.clone();
        rt.spawn(async move {
            let mut held = Vec::new();
            while let Ok((s, _)) = listener.accept().await {
                st.hits.fetch_add(1, Ordering::SeqCst);
                held.push(s);
            }
        });
        Upstream {
            addr,
            name: "hanging".into(),
            state,
            settings: Arc::new(Settings::default()),
            runtime: Some(rt),
        }
    }

    /// `http://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// `https://127.0.0.1:PORT`.
    pub fn https_url(&self) -> String {
        format!("https://{}", self.addr)
    }

    /// Requests whose head arrived.
    pub fn hits(&self) -> u64 {
        self.state.hits.load(Ordering::SeqCst)
    }

    /// Every request seen so far (after its body was read).
    pub fn seen(&self) -> Vec<Seen> {
        self.state.seen.lock().unwrap().clone()
    }
}

/// An address where nothing listens: a port bound and released.
pub fn dead_addr() -> SocketAddr {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    l.local_addr().expect("addr")
}

/// A listener whose accept queue is full and never drained, so that new connections hang in
/// SYN-SENT (Linux drops SYNs to a full queue): a way to get a connect timeout on loopback.
/// Returns the listener and the connections that fill its queue; keep both alive.
pub fn full_backlog() -> (socket2::Socket, Vec<std::net::TcpStream>) {
    use socket2::{Domain, Socket, Type};
    let s = Socket::new(Domain::IPV4, Type::STREAM, None).expect("socket");
    s.bind(&SocketAddr::from(([127, 0, 0, 1], 0)).into())
        .expect("bind");
    s.listen(0).expect("listen");
    let addr = s.local_addr().expect("addr").as_socket().expect("inet");
    let mut fillers = Vec::new();
    for _ in 0..8 {
        match std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(200)) {
            Ok(c) => fillers.push(c),
            Err(_) => break,
        }
    }
    (s, fillers)
}

async fn serve_http1<S>(ctx: Arc<Ctx>, stream: S)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let svc = service_fn(move |req| {
        let ctx = ctx.clone();
        async move { Ok::<_, std::convert::Infallible>(ctx.handle(req).await) }
    });
    let _ = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .serve_connection(TokioIo::new(stream), svc)
        .await;
}

struct Ctx {
    name: String,
    state: Arc<State>,
    settings: Arc<Settings>,
}

fn query(req: &Request<Incoming>) -> HashMap<String, String> {
    req.uri()
        .query()
        .unwrap_or("")
        .split('&')
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (k.to_owned(), percent_decode(v)))
        .collect()
}

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%'
            && let Some(v) = s
                .get(i + 1..i + 3)
                .and_then(|h| u8::from_str_radix(h, 16).ok())
        {
            out.push(v);
            i += 3;
            continue;
        }
        out.push(if b[i] == b'+' { b' ' } else { b[i] });
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The Last-Modified that `lm=1` sets.
pub const LAST_MODIFIED: &str = "Thu, 01 Jan 2026 00:00:00 GMT";

struct InFlightGuard(Arc<State>);
impl Drop for InFlightGuard {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::SeqCst);
    }
}

impl Ctx {
    async fn handle(&self, req: Request<Incoming>) -> Response<GenBody> {
        self.state.hits.fetch_add(1, Ordering::SeqCst);
        self.state.in_flight.fetch_add(1, Ordering::SeqCst);
        let _guard = InFlightGuard(self.state.clone());
        let q = query(&req);
        let num = |k: &str| q.get(k).and_then(|v| v.parse::<u64>().ok());
        let method = req.method().to_string();
        let path = req
            .uri()
            .path_and_query()
            .map_or("/".into(), |p| p.to_string());
        let headers: Vec<(String, String)> = req
            .headers()
            .iter()
            .map(|(k, v)| {
                (
                    k.as_str().to_owned(),
                    String::from_utf8_lossy(v.as_bytes()).into_owned(),
                )
            })
            .collect();

        let mut body = req.into_body();
        let mut received = 0u64;
        let mut complete = true;
        while let Some(frame) = body.frame().await {
            match frame {
                Ok(f) => {
                    if let Some(d) = f.data_ref() {
                        received += d.len() as u64;
                        self.state
                            .received
                            .fetch_add(d.len() as u64, Ordering::SeqCst);
                    }
                }
                Err(_) => {
                    complete = false;
                    break;
                }
            }
        }
        if complete {
            self.state.bodies_complete.fetch_add(1, Ordering::SeqCst);
        }
        self.state.seen.lock().unwrap().push(Seen {
            method: method.clone(),
            path: path.clone(),
            headers: headers.clone(),
            received,
            complete,
        });

        if q.contains_key("hang") {
            std::future::pending::<()>().await;
        }
        let delay =
            num("delay_ms").unwrap_or_else(|| self.settings.delay_ms.load(Ordering::SeqCst));
        if delay > 0 {
            tokio::time::sleep(Duration::from_millis(delay)).await;
        }
        let status = num("status")
            .or_else(|| Some(self.settings.status.load(Ordering::SeqCst)).filter(|&s| s != 0))
            .and_then(|s| StatusCode::from_u16(s as u16).ok())
            .unwrap_or(StatusCode::OK);
        let etag = q.get("etag").map(|t| format!("\"{t}\""));
        let header_of = |name: &str| {
            headers
                .iter()
                .find(|(k, _)| k == name)
                .map(|(_, v)| v.as_str())
        };
        let not_modified = match (&etag, header_of("if-none-match")) {
            (Some(t), Some(inm)) => inm.split(',').any(|x| x.trim() == t),
            _ => {
                q.contains_key("lm")
                    && header_of("if-modified-since").is_some_and(|ims| {
                        httpdate::parse_http_date(ims).ok()
                            >= httpdate::parse_http_date(LAST_MODIFIED).ok()
                    })
            }
        };

        let mut resp = match num("size") {
            Some(size) => {
                let chunk = num("chunk").unwrap_or(64 << 10).max(1) as usize;
                let mut r =
                    Response::new(GenBody::new(size, chunk, num("fail_after"), num("drip_ms")));
                if !q.contains_key("chunked") {
                    r.headers_mut()
                        .insert(http::header::CONTENT_LENGTH, HeaderValue::from(size));
                }
                r
            }
            None => {
                let json = serde_json::json!({
                    "replica": self.name,
                    "method": method,
                    "path": path,
                    "headers": headers,
                    "received": received,
                    "complete": complete,
                });
                let text = json.to_string();
                let mut r = Response::new(GenBody::full(Bytes::from(text)));
                r.headers_mut().insert(
                    http::header::CONTENT_TYPE,
                    HeaderValue::from_static("application/json"),
                );
                r
            }
        };
        *resp.status_mut() = status;
        if not_modified {
            resp = Response::new(GenBody::full(Bytes::new()));
            *resp.status_mut() = StatusCode::NOT_MODIFIED;
        }
        {
            let h = resp.headers_mut();
            let set = |h: &mut http::HeaderMap, k: &'static str, v: &str| {
                h.insert(k, HeaderValue::from_str(v).expect("header value"));
            };
            if let Some(v) = q.get("cc") {
                set(h, "cache-control", v);
            }
            if let Some(v) = q.get("vary") {
                set(h, "vary", v);
            }
            if let Some(t) = &etag {
                set(h, "etag", t);
            }
            if q.contains_key("lm") {
                set(h, "last-modified", LAST_MODIFIED);
            }
            if q.contains_key("cookie") {
                set(h, "set-cookie", "session=secret; Path=/");
            }
            if let Some(v) = q.get("loc") {
                set(h, "location", v);
            }
            if let Some(v) = q.get("cloc") {
                set(h, "content-location", v);
            }
            if let Some(v) = q.get("cl") {
                set(h, "content-length", v);
            }
        }
        resp.headers_mut()
            .insert("x-replica", HeaderValue::from_str(&self.name).unwrap());
        if q.contains_key("hop") {
            let h = resp.headers_mut();
            h.insert("connection", HeaderValue::from_static("x-up-secret"));
            h.insert("x-up-secret", HeaderValue::from_static("1"));
            h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
            h.insert("proxy-up", HeaderValue::from_static("1"));
            h.insert("trailer", HeaderValue::from_static("x-trailer"));
            h.insert("upgrade", HeaderValue::from_static("foo/1"));
            h.insert("x-up-keep", HeaderValue::from_static("1"));
        }
        resp
    }
}

/// A generated response body: `size` zero bytes in `chunk`-sized frames, optionally failing
/// after `fail_after` bytes or waiting `drip` between frames.
pub struct GenBody {
    full: Option<Bytes>,
    remaining: u64,
    sent: u64,
    chunk: Bytes,
    fail_after: Option<u64>,
    drip: Option<Duration>,
    sleep: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl GenBody {
    fn new(size: u64, chunk: usize, fail_after: Option<u64>, drip_ms: Option<u64>) -> Self {
        GenBody {
            full: None,
            remaining: size,
            sent: 0,
            chunk: Bytes::from(vec![b'x'; chunk]),
            fail_after,
            drip: drip_ms.map(Duration::from_millis),
            sleep: None,
        }
    }

    fn full(b: Bytes) -> Self {
        let mut g = GenBody::new(0, 1, None, None);
        g.full = Some(b);
        g
    }
}

impl Body for GenBody {
    type Data = Bytes;
    type Error = std::io::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = &mut *self;
        if let Some(b) = this.full.take() {
            return Poll::Ready(Some(Ok(Frame::data(b))));
        }
        if let Some(limit) = this.fail_after
            && this.sent >= limit
        {
            return Poll::Ready(Some(Err(std::io::Error::other(
                "replica breaks the body on purpose",
            ))));
        }
        if this.remaining == 0 {
            return Poll::Ready(None);
        }
        if let Some(d) = this.drip
            && this.sent > 0
        {
            let sleep = this
                .sleep
                .get_or_insert_with(|| Box::pin(tokio::time::sleep(d)));
            if sleep.as_mut().poll(cx).is_pending() {
                return Poll::Pending;
            }
            this.sleep = None;
        }
        let mut n = (this.chunk.len() as u64).min(this.remaining);
        if let Some(limit) = this.fail_after {
            n = n.min(limit - this.sent);
        }
        this.remaining -= n;
        this.sent += n;
        Poll::Ready(Some(Ok(Frame::data(this.chunk.slice(..n as usize)))))
    }

    fn is_end_stream(&self) -> bool {
        self.full.is_none() && self.remaining == 0 && self.fail_after.is_none()
    }

    fn size_hint(&self) -> SizeHint {
        match &self.full {
            Some(b) => SizeHint::with_exact(b.len() as u64),
            None => SizeHint::default(),
        }
    }
}

use std::future::Future;

/// What a [`ScriptedUpstream`] does with one request.
pub enum Script {
    /// Write these bytes and keep the connection for the next request.
    Answer(Vec<u8>),
    /// Write these bytes, then close the connection.
    AnswerAndClose(Vec<u8>),
    /// Wait this many milliseconds, then write these bytes and keep the connection.
    Delayed(u64, Vec<u8>),
    /// Close the connection without answering.
    Close,
}

/// A replica that answers with raw bytes the test chooses, for framings and faults a hyper
/// server never produces (read-until-close bodies, HTTP/1.0, 1xx heads, malformed heads).
/// `script(connection, request)` (both counted from 0) picks the answer; the request head is
/// read up to its blank line, and a Content-Length body after it.
pub struct ScriptedUpstream {
    addr: SocketAddr,
    connections: Arc<AtomicU64>,
    requests: Arc<AtomicU64>,
    runtime: Option<tokio::runtime::Runtime>,
}

impl Drop for ScriptedUpstream {
    fn drop(&mut self) {
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_background();
        }
    }
}

impl ScriptedUpstream {
    /// Starts the replica on 127.0.0.1:0.
    pub fn start(script: impl Fn(u64, u64) -> Script + Send + Sync + 'static) -> ScriptedUpstream {
        use tokio::io::AsyncWriteExt;
        let rt = runtime();
        let listener = bind(&rt);
        let addr = listener.local_addr().expect("addr");
        let connections = Arc::new(AtomicU64::new(0));
        let requests = Arc::new(AtomicU64::new(0));
        let script = Arc::new(script);
        let (c, r) = (connections.clone(), requests.clone());
        rt.spawn(async move {
            while let Ok((mut s, _)) = listener.accept().await {
                let conn = c.fetch_add(1, Ordering::SeqCst);
                let (script, r) = (script.clone(), r.clone());
                tokio::spawn(async move {
                    let mut buf = Vec::new();
                    for req in 0.. {
                        let end = loop {
                            if let Some(p) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                                break p + 4;
                            }
                            if !read_more(&mut s, &mut buf).await {
                                return;
                            }
                        };
                        let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
                        let body: usize = head
                            .lines()
                            .find_map(|l| l.strip_prefix("content-length:"))
                            .and_then(|v| v.trim().parse().ok())
                            .unwrap_or(0);
                        while buf.len() < end + body {
                            if !read_more(&mut s, &mut buf).await {
                                return;
                            }
                        }
                        buf.drain(..end + body);
                        r.fetch_add(1, Ordering::SeqCst);
                        match script(conn, req) {
                            Script::Answer(b) => {
                                if s.write_all(&b).await.is_err() {
                                    return;
                                }
                            }
                            Script::Delayed(ms, b) => {
                                tokio::time::sleep(Duration::from_millis(ms)).await;
                                if s.write_all(&b).await.is_err() {
                                    return;
                                }
                            }
                            Script::AnswerAndClose(b) => {
                                let _ = s.write_all(&b).await;
                                return;
                            }
                            Script::Close => return,
                        }
                    }
                });
            }
        });
        ScriptedUpstream {
            addr,
            connections,
            requests,
            runtime: Some(rt),
        }
    }

    /// `http://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Connections accepted so far.
    pub fn connections(&self) -> u64 {
        self.connections.load(Ordering::SeqCst)
    }

    /// Request heads read so far.
    pub fn requests(&self) -> u64 {
        self.requests.load(Ordering::SeqCst)
    }
}

/// Reads what the peer sent next onto `buf`; false once the connection closed or failed.
async fn read_more(s: &mut tokio::net::TcpStream, buf: &mut Vec<u8>) -> bool {
    use tokio::io::AsyncReadExt;
    let mut tmp = [0u8; 4096];
    match s.read(&mut tmp).await {
        Ok(0) | Err(_) => false,
        Ok(n) => {
            buf.extend_from_slice(&tmp[..n]);
            true
        }
    }
}
