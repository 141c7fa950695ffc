//! Body types of the request path: a client's request body with its size limit, and the
//! response body that streams an upstream's bytes (or a body Palisade made) to the client.
//!
//! Nothing is buffered: frames pass through one at a time. The response body also carries what
//! must outlive the response head — the replica's in-flight count, the connection's activity
//! counters and the access-log record — and settles them when the body ends or is dropped.

use crate::cache::Capture;
use crate::server::ConnActivity;
use crate::server::h1::{BodyReader, ReadError};
use crate::upstream::InFlight;
use crate::upstream::h1::{H1Error, UpstreamBody};
use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll, ready};
use std::time::{Duration, Instant};

/// Why a body stopped early.
#[derive(Debug, thiserror::Error)]
pub enum BodyError {
    /// The client sent its body too slowly to be kept for retries.
    #[error("request body did not arrive within {0:?}")]
    ClientStalled(Duration),
    /// The client sent more than `max_request_body`.
    #[error("request body exceeds the limit of {limit} bytes")]
    TooLarge {
        /// The limit, in bytes.
        limit: u64,
    },
    /// The upstream sent nothing for its `timeout`.
    #[error("upstream sent no body data for {0:?}")]
    UpstreamStalled(Duration),
    /// The client's HTTP/2 connection failed.
    #[error(transparent)]
    Transport(#[from] hyper::Error),
    /// The client's HTTP/1.1 body could not be read.
    #[error(transparent)]
    Client(#[from] ReadError),
    /// The upstream's connection failed or broke the protocol.
    #[error(transparent)]
    Upstream(#[from] H1Error),
}

/// A client's request body as the connection delivers it.
pub enum ClientBody {
    /// Read by Palisade's HTTP/1.1 connection.
    H1(BodyReader),
    /// An HTTP/2 stream's body.
    H2(Incoming),
    /// A request without a body.
    Empty,
}

impl Body for ClientBody {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        match self.get_mut() {
            ClientBody::H1(b) => Pin::new(b).poll_frame(cx).map_err(BodyError::from),
            ClientBody::H2(b) => Pin::new(b).poll_frame(cx).map_err(BodyError::from),
            ClientBody::Empty => Poll::Ready(None),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            ClientBody::H1(b) => b.is_end_stream(),
            ClientBody::H2(b) => b.is_end_stream(),
            ClientBody::Empty => true,
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            ClientBody::H1(b) => b.size_hint(),
            ClientBody::H2(b) => b.size_hint(),
            ClientBody::Empty => SizeHint::with_exact(0),
        }
    }
}

/// A client's request body: streamed, failing once more than `limit` bytes have arrived; or
/// kept whole in memory (a small body that may be sent again on a retry).
pub struct RequestBody {
    inner: Option<ClientBody>,
    kept: Option<Bytes>,
    pending: Option<Bytes>,
    seen: u64,
    limit: u64,
    waiting: Option<Arc<AtomicBool>>,
}

impl RequestBody {
    /// Wraps a client's body with its limit.
    pub fn new(inner: ClientBody, limit: u64) -> Self {
        RequestBody {
            inner: Some(inner),
            kept: None,
            pending: None,
            seen: 0,
            limit,
            waiting: Some(Arc::new(AtomicBool::new(false))),
        }
    }

    /// A body with nothing in it.
    pub fn empty() -> Self {
        Self::kept(Bytes::new())
    }

    /// A body held in memory, which can be replayed.
    pub fn kept(bytes: Bytes) -> Self {
        RequestBody {
            inner: None,
            kept: Some(bytes.clone()),
            pending: (!bytes.is_empty()).then_some(bytes),
            seen: 0,
            limit: 0,
            waiting: None,
        }
    }

    /// The whole body, if it is held in memory; the body is empty afterwards.
    pub fn take_kept(&mut self) -> Option<Bytes> {
        if self.inner.is_some() {
            return None;
        }
        Some(self.pending.take().unwrap_or_default())
    }

    /// For a streamed body, a flag that is set while the body waits for the client's next
    /// bytes (so that a timeout then is the client's doing, not the replica's); `None` for a
    /// body in memory.
    pub fn waiting(&self) -> Option<Arc<AtomicBool>> {
        self.waiting.clone()
    }

    /// The same body again, if it is held in memory.
    pub fn replay(&self) -> Option<RequestBody> {
        self.kept.clone().map(RequestBody::kept)
    }

    /// Reads a client's body of `len` bytes (its Content-Length) into memory, waiting at most
    /// `timeout` for all of it.
    pub async fn read_kept(
        mut inner: ClientBody,
        len: u64,
        timeout: Duration,
    ) -> Result<RequestBody, BodyError> {
        use http_body_util::BodyExt;
        let read = async {
            let mut buf = bytes::BytesMut::with_capacity(len as usize);
            while let Some(frame) = inner.frame().await {
                if let Some(d) = frame?.data_ref() {
                    if (buf.len() + d.len()) as u64 > len {
                        return Err(BodyError::TooLarge { limit: len });
                    }
                    buf.extend_from_slice(d);
                }
            }
            Ok(buf.freeze())
        };
        match tokio::time::timeout(timeout, read).await {
            Ok(Ok(bytes)) => Ok(RequestBody::kept(bytes)),
            Ok(Err(e)) => Err(e),
            Err(_) => Err(BodyError::ClientStalled(timeout)),
        }
    }
}

impl Body for RequestBody {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        let this = &mut *self;
        if let Some(b) = this.pending.take() {
            return Poll::Ready(Some(Ok(Frame::data(b))));
        }
        let Some(inner) = this.inner.as_mut() else {
            return Poll::Ready(None);
        };
        let polled = Pin::new(inner).poll_frame(cx);
        if let Some(waiting) = &this.waiting {
            waiting.store(polled.is_pending(), Ordering::Relaxed);
        }
        match ready!(polled) {
            Some(Ok(frame)) => {
                if let Some(data) = frame.data_ref() {
                    this.seen += data.len() as u64;
                    if this.seen > this.limit {
                        this.inner = None;
                        return Poll::Ready(Some(Err(BodyError::TooLarge { limit: this.limit })));
                    }
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Some(Err(e)) => Poll::Ready(Some(Err(e))),
            None => Poll::Ready(None),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.pending.is_none() && self.inner.as_ref().is_none_or(|b| b.is_end_stream())
    }

    fn size_hint(&self) -> SizeHint {
        if let Some(b) = &self.pending {
            return SizeHint::with_exact(b.len() as u64);
        }
        self.inner
            .as_ref()
            .map_or_else(|| SizeHint::with_exact(0), |b| b.size_hint())
    }
}

/// The fields of one access-log line, written when the response body ends.
pub struct AccessRecord {
    /// When the request head arrived.
    pub started: Instant,
    /// Client socket address.
    pub client: std::net::SocketAddr,
    /// Request method.
    pub method: http::Method,
    /// Request path and query as sent.
    pub uri: http::Uri,
    /// Route name, or "-".
    pub route: Arc<str>,
    /// Replica URL, or "-".
    pub replica: Arc<str>,
    /// Response status.
    pub status: u16,
    /// The request's X-Request-Id.
    pub request_id: http::HeaderValue,
    /// What the cache did ([`crate::cache::CacheResult::as_str`]), or "-".
    pub cache: &'static str,
}

impl AccessRecord {
    fn write(&self, bytes: u64, complete: bool) {
        tracing::info!(
            target: "palisade::access",
            client = %self.client.ip(),
            method = %self.method,
            path = %self.uri.path_and_query().map_or("/", |p| p.as_str()),
            route = &*self.route,
            replica = &*self.replica,
            status = self.status,
            bytes,
            complete,
            duration_ms = self.started.elapsed().as_secs_f64() * 1000.0,
            request_id = self.request_id.to_str().unwrap_or("-"),
            cache = self.cache,
            "access"
        );
    }
}

enum Source {
    Upstream(UpstreamBody),
    Full(Option<Bytes>),
}

/// A response body: an upstream's streamed body or a complete body Palisade made.
pub struct ResponseBody {
    source: Source,
    stall_timeout: Duration,
    stall: Option<Pin<Box<tokio::time::Sleep>>>,
    bytes: u64,
    done: bool,
    in_flight: Option<InFlight>,
    conn: Option<Arc<ConnActivity>>,
    log: Option<Box<AccessRecord>>,
    capture: Option<Box<Capture>>,
    head: Option<Arc<HeadLines>>,
}

/// Response header lines encoded once for a response sent many times (a cached one), so that
/// each HTTP/1.1 hit writes them as they are instead of building and encoding a header map.
#[derive(Debug, Clone, Default)]
pub struct HeadLines {
    /// `name: value\r\n` lines, without Content-Length, Transfer-Encoding and Connection.
    pub lines: Bytes,
    /// The response's Content-Length.
    pub length: Option<u64>,
    /// Whether a Date line is among them.
    pub date: bool,
}

impl HeadLines {
    /// The lines as a header map (with Content-Length), for HTTP/2.
    pub fn to_map(&self) -> http::HeaderMap {
        let mut map = http::HeaderMap::new();
        for line in self.lines.split(|&b| b == b'\n') {
            let line = line.strip_suffix(b"\r").unwrap_or(line);
            let Some(colon) = line.iter().position(|&b| b == b':') else {
                continue;
            };
            let value = line[colon + 1..]
                .strip_prefix(b" ")
                .unwrap_or(&line[colon + 1..]);
            if let (Ok(name), Ok(value)) = (
                http::HeaderName::from_bytes(&line[..colon]),
                http::HeaderValue::from_maybe_shared(self.lines.slice_ref(value)),
            ) {
                map.append(name, value);
            }
        }
        if let Some(n) = self.length {
            map.insert(http::header::CONTENT_LENGTH, n.into());
        }
        map
    }
}

/// Puts a response's pre-encoded header lines ([`HeadLines`]) into its header map, ahead of
/// the headers already there: for senders that cannot write them as they are (HTTP/2).
pub fn expand_head(resp: &mut http::Response<ResponseBody>) {
    if let Some(head) = resp.body_mut().take_head() {
        let mut map = head.to_map();
        for (name, value) in resp.headers() {
            map.append(name, value.clone());
        }
        *resp.headers_mut() = map;
    }
}

impl ResponseBody {
    fn with(source: Source) -> Self {
        ResponseBody {
            source,
            stall_timeout: Duration::from_secs(60),
            stall: None,
            bytes: 0,
            done: false,
            in_flight: None,
            conn: None,
            log: None,
            capture: None,
            head: None,
        }
    }

    /// Sends `head`'s lines as part of the response head, before its header map's.
    pub fn with_head(mut self, head: Arc<HeadLines>) -> Self {
        self.head = Some(head);
        self
    }

    /// The pre-encoded header lines, if any; the sender writes them.
    pub fn take_head(&mut self) -> Option<Arc<HeadLines>> {
        self.head.take()
    }

    /// A complete body.
    pub fn full(bytes: impl Into<Bytes>) -> Self {
        Self::with(Source::Full(Some(bytes.into())))
    }

    /// No body.
    pub fn empty() -> Self {
        Self::with(Source::Full(None))
    }

    /// An upstream's body, failing if it stalls for `stall_timeout`; holds the replica's
    /// in-flight count until it ends.
    pub fn upstream(inner: UpstreamBody, stall_timeout: Duration, in_flight: InFlight) -> Self {
        let mut b = Self::with(Source::Upstream(inner));
        b.stall_timeout = stall_timeout;
        b.in_flight = Some(in_flight);
        b
    }

    /// Ties the body to its connection's activity counters (for idle and slow-reader timeouts).
    pub fn track(&mut self, conn: Arc<ConnActivity>) {
        conn.body_started();
        self.conn = Some(conn);
    }

    /// Copies the body into the cache as it streams; stored only if it ends cleanly.
    pub fn capture(&mut self, capture: Box<Capture>) {
        self.capture = Some(capture);
    }

    fn end_capture(&mut self) {
        if let Some(c) = self.capture.take() {
            c.finish();
        }
    }

    /// Writes an access-log line when the body ends.
    pub fn log_on_end(&mut self, record: Box<AccessRecord>) {
        self.log = Some(record);
    }

    /// Settles the counters (the upstream connection went back to its pool when the upstream
    /// body ended whole).
    fn finish(&mut self) {
        if !self.done {
            self.done = true;
            self.in_flight = None;
            if let Some(conn) = self.conn.take() {
                conn.body_ended();
            }
        }
    }
}

impl Drop for ResponseBody {
    fn drop(&mut self) {
        let complete = self.done || self.is_end_stream();
        if complete {
            self.end_capture();
        }
        self.finish();
        if let Some(log) = self.log.take() {
            log.write(self.bytes, complete);
        }
    }
}

impl Body for ResponseBody {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        let this = &mut *self;
        let polled = match &mut this.source {
            Source::Full(b) => Poll::Ready(b.take().map(|b| Ok(Frame::data(b)))),
            Source::Upstream(inner) => match Pin::new(inner).poll_frame(cx) {
                Poll::Pending => {
                    let timeout = this.stall_timeout;
                    let stall = this
                        .stall
                        .get_or_insert_with(|| Box::pin(tokio::time::sleep(timeout)));
                    ready!(stall.as_mut().poll(cx));
                    this.capture = None;
                    this.in_flight = None;
                    return Poll::Ready(Some(Err(BodyError::UpstreamStalled(timeout))));
                }
                Poll::Ready(r) => {
                    if let Some(stall) = this.stall.as_mut() {
                        stall
                            .as_mut()
                            .reset(tokio::time::Instant::now() + this.stall_timeout);
                    }
                    Poll::Ready(r.map(|r| r.map_err(BodyError::from)))
                }
            },
        };
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(d) = frame.data_ref() {
                    this.bytes += d.len() as u64;
                    if let Some(c) = this.capture.as_mut()
                        && !c.push(d)
                    {
                        this.capture = None;
                    }
                }
                if this.capture.is_some() && this.is_end_stream() {
                    this.end_capture();
                }
            }
            Poll::Ready(None) => {
                this.end_capture();
                this.finish();
            }
            Poll::Ready(Some(Err(_))) => {
                // The stream is broken: the log line says incomplete, and nothing is cached.
                this.capture = None;
                this.in_flight = None;
            }
            Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        match &self.source {
            Source::Full(b) => b.is_none(),
            Source::Upstream(b) => b.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.source {
            Source::Full(Some(b)) => SizeHint::with_exact(b.len() as u64),
            Source::Full(None) => SizeHint::with_exact(0),
            Source::Upstream(b) => b.size_hint(),
        }
    }
}

use std::future::Future;
