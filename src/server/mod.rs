//! Public listeners: bind, accept, serve each connection (HTTP/1.1 and h2c on one port; on
//! `[server.tls]` ports the same after a TLS handshake, h2 or http/1.1 by ALPN), bound the
//! number of open connections, cut off idle and slow clients, and drain on shutdown.
//!
//! The first bytes of a connection pick its protocol: HTTP/2's connection preface goes to
//! hyper's HTTP/2 server, anything else to Palisade's own HTTP/1.1 side ([`h1`]).
//!
//! A TLS handshake must finish within `header_read_timeout`, and holds a connection slot while
//! it runs; each handshake uses the certificates of the snapshot current when it starts, so a
//! reload's new certificates apply to the next connection.
//!
//! Every worker ([`crate::workers`]) runs an accept loop on every listener and serves what it
//! accepts. Past `max_connections`, Palisade stops accepting (as HAProxy's `maxconn` does):
//! each worker's loop on each listener holds the one connection it accepted last, unserved,
//! until a slot frees; the others wait in the kernel's listen backlog. None is reset. Timeouts are watched per connection by one timer that sleeps until the next
//! deadline: `header_read_timeout` from the first byte of a request head while no request is
//! in progress, and `idle_timeout` while no bytes move and no handler is waiting on an upstream
//! (which covers both keep-alive idling and clients that stop reading a response).

pub mod h1;

use crate::body::{self, ClientBody};
use crate::proxy;
use crate::state::Shared;
use bytes::{Bytes, BytesMut};
use http::Request;
use hyper::body::Incoming;
use hyper::server::conn::http2;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::{Pin, pin};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, watch};

const NONE: u64 = u64::MAX;

/// What the request path knows about the connection a request came on.
pub struct ConnInfo {
    /// The client's socket address.
    pub peer: SocketAddr,
    /// The client's address as X-Forwarded-For and Forwarded write it.
    pub forwarded: proxy::headers::Peer,
    /// `"https"` on a TLS listener, else `"http"` (X-Forwarded-Proto, Forwarded).
    pub proto: &'static str,
    /// Activity counters for this connection's timeouts.
    pub activity: Arc<ConnActivity>,
}

/// The monotonic clock in milliseconds at the kernel tick's resolution (a few ms): what the
/// connection timeouts need, read three times a request, at a fraction of a precise read's cost.
fn coarse_ms() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec; CLOCK_MONOTONIC_COARSE exists on Linux.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC_COARSE, &mut ts) };
    ts.tv_sec as u64 * 1000 + ts.tv_nsec as u64 / 1_000_000
}

/// Per-connection activity, read by the connection's timeout watcher.
pub struct ConnActivity {
    epoch: u64,
    last_io: AtomicU64,
    head_since: AtomicU64,
    handlers: AtomicUsize,
    bodies: AtomicUsize,
    h2: AtomicBool,
    draining: AtomicBool,
    awaiting_body: AtomicBool,
}

impl ConnActivity {
    fn new() -> Self {
        ConnActivity {
            epoch: coarse_ms(),
            last_io: AtomicU64::new(0),
            head_since: AtomicU64::new(NONE),
            handlers: AtomicUsize::new(0),
            bodies: AtomicUsize::new(0),
            h2: AtomicBool::new(false),
            draining: AtomicBool::new(false),
            awaiting_body: AtomicBool::new(false),
        }
    }

    /// Milliseconds since the connection opened, from the coarse clock.
    fn now(&self) -> u64 {
        coarse_ms().saturating_sub(self.epoch)
    }

    /// Records a read.
    fn on_read(&self) {
        let now = self.now();
        self.last_io.store(now, Ordering::Relaxed);
        if self.handlers.load(Ordering::Relaxed) == 0
            && self.bodies.load(Ordering::Relaxed) == 0
            && self.head_since.load(Ordering::Relaxed) == NONE
        {
            self.head_since.store(now, Ordering::Relaxed);
        }
    }

    /// Whether the connection is draining: it closes after the response in progress.
    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Relaxed)
    }

    /// Whether a handler is waiting for bytes of the client's request body.
    pub fn reading_body(&self, waiting: bool) {
        self.awaiting_body.store(waiting, Ordering::Relaxed);
    }

    /// Whether no request is in progress: no head begun, no handler running, no body
    /// streaming.
    fn is_idle(&self) -> bool {
        self.handlers.load(Ordering::Relaxed) == 0
            && self.bodies.load(Ordering::Relaxed) == 0
            && self.head_since.load(Ordering::Relaxed) == NONE
    }

    fn on_write(&self) {
        self.last_io.store(self.now(), Ordering::Relaxed);
    }

    fn handler_started(&self) {
        self.handlers.fetch_add(1, Ordering::Relaxed);
        self.head_since.store(NONE, Ordering::Relaxed);
    }

    fn handler_ended(&self) {
        self.handlers.fetch_sub(1, Ordering::Relaxed);
        self.on_write();
    }

    /// A response body started streaming on this connection.
    pub fn body_started(&self) {
        self.bodies.fetch_add(1, Ordering::Relaxed);
    }

    /// A response body ended (or was dropped).
    pub fn body_ended(&self) {
        self.bodies.fetch_sub(1, Ordering::Relaxed);
        self.last_io.store(self.now(), Ordering::Relaxed);
    }

    /// `Err(reason)` if the connection must be closed now, else how long until the next check.
    fn check(
        &self,
        header_timeout: Duration,
        idle_timeout: Duration,
    ) -> Result<Duration, &'static str> {
        let now = self.now();
        let idle_ms = idle_timeout.as_millis() as u64;
        let last = self.last_io.load(Ordering::Relaxed);
        if self.handlers.load(Ordering::Relaxed) > 0 {
            if self.awaiting_body.load(Ordering::Relaxed) && now.saturating_sub(last) >= idle_ms {
                return Err("request body stalled for idle_timeout");
            }
            return Ok(idle_timeout.min(header_timeout));
        }
        if now.saturating_sub(last) >= idle_ms {
            return Err(if self.bodies.load(Ordering::Relaxed) > 0 {
                "client stopped reading"
            } else {
                "idle"
            });
        }
        let mut next = last + idle_ms;
        let head = self.head_since.load(Ordering::Relaxed);
        if head != NONE
            && self.bodies.load(Ordering::Relaxed) == 0
            && !self.h2.load(Ordering::Relaxed)
        {
            let deadline = head + header_timeout.as_millis() as u64;
            if now >= deadline {
                return Err("request head not received within header_read_timeout");
            }
            next = next.min(deadline);
        } else if !self.h2.load(Ordering::Relaxed) {
            // A head may start before the next wake-up; look again within its timeout.
            next = next.min(now + header_timeout.as_millis() as u64);
        }
        Ok(Duration::from_millis(next - now + 1))
    }
}

/// A client stream (TCP, or TLS over TCP) that reports reads and writes to its
/// [`ConnActivity`].
struct ActivityIo<S> {
    inner: S,
    activity: Arc<ConnActivity>,
    /// Bytes already read that a reader must get again before the socket's.
    replay: Bytes,
}

impl<S: AsyncRead + Unpin> AsyncRead for ActivityIo<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if !this.replay.is_empty() {
            let n = this.replay.len().min(buf.remaining());
            buf.put_slice(&this.replay.split_to(n));
            return Poll::Ready(Ok(()));
        }
        let before = buf.filled().len();
        let r = Pin::new(&mut this.inner).poll_read(cx, buf);
        if let Poll::Ready(Ok(())) = r
            && buf.filled().len() > before
        {
            this.activity.on_read();
        }
        r
    }
}

impl<S: h1::Reset> h1::Reset for ActivityIo<S> {
    fn reset(&self) {
        self.inner.reset();
    }
}

impl h1::Reset for TcpStream {
    fn reset(&self) {
        let _ = self.set_zero_linger();
    }
}

impl h1::Reset for tokio_rustls::server::TlsStream<TcpStream> {
    fn reset(&self) {
        let _ = self.get_ref().0.set_zero_linger();
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for ActivityIo<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = r
            && n > 0
        {
            self.activity.on_write();
        }
        r
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        if let Poll::Ready(Ok(n)) = r
            && n > 0
        {
            self.activity.on_write();
        }
        r
    }
    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

struct ListenerHandle {
    stop: watch::Sender<bool>,
}

/// What a listener speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Transport {
    /// HTTP/1.1 and h2c.
    Plain,
    /// TLS, then HTTP/1.1 or h2.
    Tls,
}

impl Transport {
    /// The `listener` label and log field.
    fn as_str(self) -> &'static str {
        match self {
            Transport::Plain => "public",
            Transport::Tls => "tls",
        }
    }
}

/// The public side: listeners, the connection limit and the shutdown signal.
pub struct Server {
    shared: Arc<Shared>,
    slots: Arc<Semaphore>,
    max_connections: usize,
    shutdown: watch::Sender<bool>,
    listeners: Mutex<HashMap<(Transport, SocketAddr), ListenerHandle>>,
    workers: Vec<tokio::runtime::Handle>,
}

/// Binds a TCP listener with address reuse and a deep backlog.
pub fn bind(addr: SocketAddr) -> io::Result<TcpListener> {
    TcpListener::from_std(bind_std(addr)?)
}

/// [`bind`], before registering with a runtime (each worker registers its own clone).
fn bind_std(addr: SocketAddr) -> io::Result<std::net::TcpListener> {
    let socket = socket2::Socket::new(
        socket2::Domain::for_address(addr),
        socket2::Type::STREAM,
        Some(socket2::Protocol::TCP),
    )?;
    socket.set_reuse_address(true)?;
    if addr.is_ipv6() {
        socket.set_only_v6(true)?;
    }
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(4096)?;
    Ok(socket.into())
}

impl Server {
    /// A server for the current snapshot's settings whose listeners are served by `workers`
    /// (one accept loop per listener on each); nothing is bound yet.
    pub fn new(shared: Arc<Shared>, workers: &[tokio::runtime::Handle]) -> Arc<Server> {
        let max = shared.snapshot.load().config.server.max_connections;
        Arc::new(Server {
            shared,
            slots: Arc::new(Semaphore::new(max)),
            max_connections: max,
            shutdown: watch::channel(false).0,
            listeners: Mutex::new(HashMap::new()),
            workers: workers.to_vec(),
        })
    }

    /// Binds every address of the current config (plain and TLS) that is not bound yet, and
    /// stops accepting on those no longer listed (their open connections go on). Returns the
    /// bound addresses.
    pub fn sync_listeners(self: &Arc<Self>) -> io::Result<Vec<SocketAddr>> {
        let snapshot = self.shared.snapshot.load();
        let server = &snapshot.config.server;
        let wanted: Vec<(Transport, SocketAddr)> = server
            .listen
            .iter()
            .map(|a| (Transport::Plain, *a))
            .chain(
                server
                    .tls
                    .iter()
                    .flat_map(|t| t.listen.iter().map(|a| (Transport::Tls, *a))),
            )
            .collect();
        let mut listeners = self.listeners.lock().expect("listener map");
        let mut bound = Vec::new();
        for &(transport, addr) in &wanted {
            if listeners.contains_key(&(transport, addr)) {
                continue;
            }
            let listener = bind_std(addr)
                .map_err(|e| io::Error::new(e.kind(), format!("cannot listen on {addr}: {e}")))?;
            let local = listener.local_addr()?;
            let clones = self
                .workers
                .iter()
                .map(|_| listener.try_clone())
                .collect::<io::Result<Vec<_>>>()?;
            tracing::info!(listener = transport.as_str(), addr = %local, "listening");
            bound.push(local);
            let (stop, stop_rx) = watch::channel(false);
            listeners.insert((transport, addr), ListenerHandle { stop });
            for (worker, listener) in self.workers.iter().zip(clones) {
                let (this, stop_rx) = (self.clone(), stop_rx.clone());
                worker.spawn(async move {
                    match TcpListener::from_std(listener) {
                        Ok(l) => this.accept_loop(l, transport, stop_rx).await,
                        Err(e) => {
                            tracing::error!(addr = %local, error = %e, "a worker cannot accept")
                        }
                    }
                });
            }
        }
        listeners.retain(|key, h| {
            let keep = wanted.contains(key);
            if !keep {
                tracing::info!(listener = key.0.as_str(), addr = %key.1, "no longer listening");
                let _ = h.stop.send(true);
            }
            keep
        });
        Ok(bound)
    }

    async fn accept_loop(
        self: Arc<Self>,
        listener: TcpListener,
        transport: Transport,
        mut stop: watch::Receiver<bool>,
    ) {
        let mut shutdown = self.shutdown.subscribe();
        let mut backoff = Duration::from_millis(5);
        loop {
            let accepted = tokio::select! {
                r = listener.accept() => r,
                _ = stop.changed() => return,
                _ = shutdown.changed() => return,
            };
            match accepted {
                Ok((stream, peer)) => {
                    // Every listener shares the slots, so none holds one while it waits for a
                    // connection: the one accepted waits here, unserved, for a free slot.
                    let permit = tokio::select! {
                        p = self.slots.clone().acquire_owned() => match p { Ok(p) => p, Err(_) => return },
                        _ = stop.changed() => return,
                        _ = shutdown.changed() => return,
                    };
                    backoff = Duration::from_millis(5);
                    let this = self.clone();
                    tokio::spawn(async move {
                        this.serve_connection(stream, peer, transport).await;
                        drop(permit);
                    });
                }
                Err(e) => {
                    // Out of file descriptors or a transient error: wait, then accept again.
                    tracing::warn!(error = %e, "accept failed; backing off");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(1));
                }
            }
        }
    }

    async fn serve_connection(&self, stream: TcpStream, peer: SocketAddr, transport: Transport) {
        let _ = stream.set_nodelay(true);
        let gauge = self
            .shared
            .metrics
            .connections_active
            .with_label_values(&[transport.as_str()]);
        gauge.inc();
        match transport {
            Transport::Plain => self.serve_http(stream, peer, "http").await,
            Transport::Tls => {
                let (acceptor, timeout) = {
                    let snapshot = self.shared.snapshot.load();
                    let server = &snapshot.config.server;
                    (
                        server.tls.as_ref().map(|t| t.acceptor()),
                        server.header_read_timeout,
                    )
                };
                let Some(acceptor) = acceptor else {
                    gauge.dec();
                    return;
                };
                match tokio::time::timeout(timeout, acceptor.accept(stream)).await {
                    Ok(Ok(tls)) => self.serve_http(tls, peer, "https").await,
                    Ok(Err(e)) => {
                        tracing::debug!(client = %peer, error = %e, "TLS handshake failed");
                    }
                    Err(_) => {
                        tracing::debug!(client = %peer, "TLS handshake not done within header_read_timeout");
                    }
                }
            }
        }
        gauge.dec();
    }

    async fn serve_http<S>(&self, stream: S, peer: SocketAddr, proto: &'static str)
    where
        S: AsyncRead + AsyncWrite + h1::Reset + Unpin + Send + 'static,
    {
        let settings = self.shared.snapshot.load().config.server.clone();
        let activity = Arc::new(ConnActivity::new());
        let mut io = ActivityIo {
            inner: stream,
            activity: activity.clone(),
            replay: Bytes::new(),
        };
        let info = Arc::new(ConnInfo {
            peer,
            forwarded: proxy::headers::Peer::new(peer.ip()),
            proto,
            activity: activity.clone(),
        });
        let mut shutdown = self.shutdown.subscribe();

        // The first bytes tell HTTP/2's connection preface from an HTTP/1.1 request.
        let mut buf = BytesMut::with_capacity(8 * 1024);
        let h2 = {
            let sniff = pin!(async {
                loop {
                    if tokio_util::io::read_buf(&mut io, &mut buf).await.ok()? == 0 {
                        return None;
                    }
                    let n = buf.len().min(H2_PREFACE.len());
                    if buf[..n] != H2_PREFACE[..n] {
                        return Some(false);
                    }
                    if n == H2_PREFACE.len() {
                        return Some(true);
                    }
                }
            });
            match supervise(&activity, &settings, &mut shutdown, sniff, |_| true).await {
                Some(Some(h2)) => h2,
                _ => return,
            }
        };

        if h2 {
            activity.h2.store(true, Ordering::Relaxed);
            let shared = self.shared.clone();
            let service = service_fn(move |req: Request<Incoming>| {
                let shared = shared.clone();
                let info = info.clone();
                async move {
                    info.activity.handler_started();
                    let mut resp = proxy::handle(&shared, &info, req.map(ClientBody::H2)).await;
                    body::expand_head(&mut resp);
                    info.activity.handler_ended();
                    Ok::<_, std::convert::Infallible>(resp)
                }
            });
            // hyper reads the preface itself: the bytes the sniff took are read again first.
            io.replay = buf.freeze();
            let io = TokioIo::new(io);
            let conn = pin!(
                http2::Builder::new(TokioExecutor::new())
                    .timer(TokioTimer::new())
                    .max_concurrent_streams(256)
                    .max_header_list_size((settings.max_header_bytes * 2) as u32)
                    .keep_alive_interval(Some(Duration::from_secs(30)))
                    .keep_alive_timeout(Duration::from_secs(20))
                    .serve_connection(io, service)
            );
            let ended = supervise(&activity, &settings, &mut shutdown, conn, |c| {
                c.graceful_shutdown();
                false
            })
            .await;
            if let Some(Err(e)) = ended {
                tracing::debug!(client = %peer, error = %e, "connection ended with an error");
            }
        } else {
            let limits = h1::Limits {
                max_head: settings.max_header_bytes,
            };
            let shared = &self.shared;
            let call = |req| {
                let info = &info;
                async move {
                    info.activity.handler_started();
                    let resp = proxy::handle(shared, info, req).await;
                    info.activity.handler_ended();
                    resp
                }
            };
            let reject = |e| proxy::reject(shared, e);
            let conn = pin!(h1::serve(io, buf, limits, &activity, call, reject));
            supervise(&activity, &settings, &mut shutdown, conn, |_| {
                activity.draining.store(true, Ordering::Relaxed);
                activity.is_idle()
            })
            .await;
        }
    }

    /// Stops accepting, asks every connection to finish its in-flight requests, and waits up to
    /// `drain_timeout` for them. Returns whether every connection closed in time.
    pub async fn drain(&self) -> bool {
        let timeout = self.shared.snapshot.load().config.server.drain_timeout;
        let _ = self.shutdown.send(true);
        self.listeners.lock().expect("listener map").clear();
        let all = u32::try_from(self.max_connections).unwrap_or(u32::MAX);
        tokio::time::timeout(timeout, self.slots.acquire_many(all))
            .await
            .is_ok()
    }
}

/// The first bytes an HTTP/2 client sends (RFC 9113 §3.4).
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// Runs a connection's future while watching its timeouts and the shutdown signal: `None` if
/// a timeout closed it or `on_drain` (called once, when draining starts) says to close now.
async fn supervise<F: Future>(
    activity: &ConnActivity,
    settings: &crate::config::ServerSettings,
    shutdown: &mut watch::Receiver<bool>,
    mut conn: Pin<&mut F>,
    mut on_drain: impl FnMut(Pin<&mut F>) -> bool,
) -> Option<F::Output> {
    let mut draining = *shutdown.borrow();
    if draining && on_drain(conn.as_mut()) {
        return None;
    }
    loop {
        let wait = match activity.check(settings.header_read_timeout, settings.idle_timeout) {
            Ok(wait) => wait,
            Err(reason) => {
                tracing::debug!(reason, "closing connection");
                return None;
            }
        };
        tokio::select! {
            r = conn.as_mut() => return Some(r),
            _ = shutdown.changed(), if !draining => {
                draining = true;
                if on_drain(conn.as_mut()) {
                    return None;
                }
            }
            _ = tokio::time::sleep(wait) => {}
        }
    }
}
