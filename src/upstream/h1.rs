//! An HTTP/1.1 client for one upstream connection, driven by the request that uses it.
//!
//! hyper's client runs every connection as a task of its own, reached over a channel, so each
//! exchange pays for a channel hop and two task wake-ups on top of the socket work. Here the
//! request's task writes the head and body and reads the response head itself, and the
//! response body reads the socket when the client side asks for bytes; a body that ends whole
//! hands the connection back to its pool. Header values and body chunks are slices of the
//! read buffer, never copies.
//!
//! Framing follows RFC 9112 §6: `Transfer-Encoding: chunked` (which wins over
//! `Content-Length`), `Content-Length` (repeated values must agree), or read-until-close;
//! HEAD, 204 and 304 responses have no body; 1xx responses are skipped. A connection is kept
//! only when the response allows it (`Connection: close`, HTTP/1.0 without `keep-alive`,
//! read-until-close bodies and bytes past the end all close it).

use super::pool::Pool;
use crate::body::{BodyError, RequestBody};
use crate::framing::{Chunk, ChunkError, FramingHeaders, Step, chunk_step};
use bytes::{Bytes, BytesMut};
use http::{HeaderMap, HeaderName, HeaderValue, Method, Request, Response, StatusCode, Version};
use http_body::{Body, Frame, SizeHint};
use http_body_util::BodyExt;
use std::io;
use std::mem::MaybeUninit;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, Waker, ready};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;

/// The longest response head accepted (status line and headers).
pub const MAX_HEAD: usize = 64 * 1024;
/// The most response headers accepted.
pub const MAX_HEADERS: usize = 128;
const MIN_READ: usize = 8 * 1024;
const MAX_READ: usize = 256 * 1024;
/// The most 1xx heads skipped before the final one.
const MAX_INFORMATIONAL: usize = 16;
/// A request body up to this size goes out in the same write as its head.
const COALESCE_BODY: usize = 16 * 1024;

/// Why an exchange with an upstream failed.
#[derive(Debug, thiserror::Error)]
pub enum H1Error {
    /// The socket failed.
    #[error("connection error")]
    Io(#[from] io::Error),
    /// The connection closed before any byte of a response arrived.
    #[error("connection closed before the response head")]
    ClosedBeforeHead,
    /// The response head broke the protocol.
    #[error("invalid response head: {0}")]
    InvalidHead(String),
    /// The response head was longer than [`MAX_HEAD`].
    #[error("response head exceeds {MAX_HEAD} bytes")]
    HeadTooLarge,
    /// The upstream switched protocols, which a proxied request never asks for.
    #[error("upstream answered 101 Switching Protocols, which is not supported")]
    Upgrade,
    /// The connection closed before the end of the body its framing announced.
    #[error("connection closed before the end of the response body")]
    BodyCut,
    /// The chunked body broke the protocol.
    #[error("invalid chunked body: {0}")]
    InvalidChunk(#[from] ChunkError),
    /// Reading the client's request body failed (too large, or the client's connection).
    #[error("request body")]
    RequestBody(#[source] Box<BodyError>),
}

/// The socket of one upstream connection: TCP, or TLS over TCP.
pub enum Stream {
    /// Plain TCP.
    Tcp(TcpStream),
    /// TLS (ALPN http/1.1).
    Tls(Box<tokio_rustls::client::TlsStream<TcpStream>>),
}

impl AsyncRead for Stream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Tcp(s) => Pin::new(s).poll_read(cx, buf),
            Stream::Tls(s) => Pin::new(s).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Stream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Stream::Tcp(s) => Pin::new(s).poll_write(cx, buf),
            Stream::Tls(s) => Pin::new(s).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Tcp(s) => Pin::new(s).poll_flush(cx),
            Stream::Tls(s) => Pin::new(s).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Tcp(s) => Pin::new(s).poll_shutdown(cx),
            Stream::Tls(s) => Pin::new(s).poll_shutdown(cx),
        }
    }
}

/// What [`Connection::send`] could not do, and whether the request may go again.
pub enum SendError {
    /// A reused connection closed before answering: the request (idempotent, with its body
    /// kept) may go again on another connection.
    Retry(Box<Request<RequestBody>>),
    /// The exchange failed.
    Failed(H1Error),
}

/// One open connection to a replica, idle or carrying one exchange.
pub struct Connection {
    stream: Stream,
    buf: BytesMut,
    read_size: usize,
    head: Vec<u8>,
    /// Whether any byte of an answer arrived during the current exchange.
    received: bool,
}

/// How a request body is framed on the wire.
#[derive(Clone, Copy, PartialEq, Debug)]
enum RequestFraming {
    /// The head carries a Content-Length already (or needs none: no body).
    AsIs,
    /// The head gets `content-length: N`.
    Length(u64),
    /// The head gets `transfer-encoding: chunked`.
    Chunked,
}

/// How a response body is framed on the wire.
#[derive(Clone, Copy, PartialEq, Debug)]
enum Framing {
    Empty,
    Length(u64),
    Chunked,
    Close,
}

impl Connection {
    /// A connection over an open socket.
    pub fn new(stream: Stream) -> Self {
        Connection {
            stream,
            buf: BytesMut::new(),
            read_size: MIN_READ,
            head: Vec::new(),
            received: false,
        }
    }

    /// Drops a read buffer that grew for a large body, so that an idle connection holds at
    /// most a small one.
    fn shrink(&mut self) {
        // After splits, `capacity` shows only the tail of an allocation that may be much
        // larger: a buffer that ever grew is replaced.
        if self.read_size > MIN_READ || self.buf.capacity() > 2 * MIN_READ {
            self.buf = BytesMut::new();
        }
        self.read_size = MIN_READ;
        if self.head.capacity() > 2 * COALESCE_BODY {
            self.head = Vec::new();
        }
    }

    /// Whether an idle connection can carry another request: nothing arrived on it while it
    /// waited, neither bytes nor the replica's close. Costs no system call unless the socket
    /// became readable.
    pub fn is_usable(&mut self) -> bool {
        if !self.buf.is_empty() {
            return false;
        }
        let mut probe = [0u8; 1];
        let mut probe = ReadBuf::new(&mut probe);
        let mut cx = Context::from_waker(Waker::noop());
        matches!(
            Pin::new(&mut self.stream).poll_read(&mut cx, &mut probe),
            Poll::Pending
        )
    }

    /// Sends `req` (origin-form URI, hop-by-hop headers already removed) and reads the
    /// response head. The returned body owns the connection and gives it back to `pool` when
    /// it ends whole and the connection may be kept.
    pub async fn send(
        mut self: Box<Self>,
        req: Request<RequestBody>,
        pool: &Arc<Pool>,
        reused: bool,
    ) -> Result<Response<UpstreamBody>, SendError> {
        let (parts, mut body) = req.into_parts();
        self.received = false;
        let framing = request_framing(&parts, &body);
        let mut head = std::mem::take(&mut self.head);
        write_head(&mut head, &parts, framing);
        let kept = body.take_kept();
        let wrote = match &kept {
            Some(b) if b.len() <= COALESCE_BODY => {
                head.extend_from_slice(b);
                self.stream.write_all(&head).await
            }
            Some(b) => match self.stream.write_all(&head).await {
                Ok(()) => self.stream.write_all(b).await,
                Err(e) => Err(e),
            },
            None => self.stream.write_all(&head).await,
        };
        head.clear();
        self.head = head;
        let sent = match wrote {
            Ok(()) if kept.is_some() || body.is_end_stream() => {
                if framing == RequestFraming::Chunked {
                    self.stream
                        .write_all(b"0\r\n\r\n")
                        .await
                        .map_err(H1Error::Io)
                } else {
                    Ok(())
                }
            }
            Ok(()) => self.write_body(&mut body, framing).await,
            Err(e) => Err(H1Error::Io(e)),
        };
        let sent = match sent {
            Ok(()) => self.stream.flush().await.map_err(H1Error::Io),
            e => e,
        };
        if let Err(e) = sent {
            // A replica that refuses a body may answer before it closes: read that answer.
            if matches!(e, H1Error::Io(_))
                && let Ok((resp, framing, _)) = self.read_head(&parts.method).await
            {
                return Ok(self.into_response(resp, framing, false, pool));
            }
            return Err(retry_or_fail(e, reused && !self.received, parts, kept));
        }
        match self.read_head(&parts.method).await {
            Ok((resp, framing, keep_alive)) => {
                Ok(self.into_response(resp, framing, keep_alive, pool))
            }
            Err(e) => Err(retry_or_fail(e, reused && !self.received, parts, kept)),
        }
    }

    fn into_response(
        self: Box<Self>,
        resp: Response<()>,
        framing: Framing,
        keep_alive: bool,
        pool: &Arc<Pool>,
    ) -> Response<UpstreamBody> {
        let state = match framing {
            Framing::Empty | Framing::Length(0) => State::Done,
            Framing::Length(n) => State::Length(n),
            Framing::Chunked => State::Chunked(Chunk::Size),
            Framing::Close => State::Close,
        };
        let mut body = UpstreamBody {
            conn: Some(self),
            state,
            keep_alive: keep_alive && framing != Framing::Close,
            pool: pool.clone(),
        };
        if body.state == State::Done {
            body.end();
        }
        resp.map(|()| body)
    }

    async fn write_body(
        &mut self,
        body: &mut RequestBody,
        framing: RequestFraming,
    ) -> Result<(), H1Error> {
        let chunked = framing == RequestFraming::Chunked;
        while let Some(frame) = body.frame().await {
            let frame = frame.map_err(|e| H1Error::RequestBody(Box::new(e)))?;
            let Ok(data) = frame.into_data() else {
                continue;
            };
            if data.is_empty() {
                continue;
            }
            if chunked {
                let mut line = itoa_hex(data.len());
                line.extend_from_slice(b"\r\n");
                self.stream.write_all(&line).await?;
                self.stream.write_all(&data).await?;
                self.stream.write_all(b"\r\n").await?;
            } else {
                self.stream.write_all(&data).await?;
            }
        }
        if chunked {
            self.stream.write_all(b"0\r\n\r\n").await?;
        }
        Ok(())
    }

    /// Reads more bytes into the buffer; `Ok(0)` is the end of the stream.
    fn poll_fill(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<usize>> {
        // Reserving whenever less than a whole read is free moves what is left to the front of
        // the buffer once the earlier chunks are gone, so reads keep landing on the same few
        // cache lines instead of walking through the buffer.
        if self.buf.capacity() - self.buf.len() < self.read_size {
            self.buf.reserve(self.read_size);
        }
        let room = self.buf.capacity() - self.buf.len();
        let n = ready!(tokio_util::io::poll_read_buf(
            Pin::new(&mut self.stream),
            cx,
            &mut self.buf
        ))?;
        if n == room && self.read_size < MAX_READ {
            self.read_size *= 2;
        }
        self.received |= n > 0;
        Poll::Ready(Ok(n))
    }

    async fn fill(&mut self) -> io::Result<usize> {
        std::future::poll_fn(|cx| self.poll_fill(cx)).await
    }

    /// Reads the final response head (skipping 1xx ones): the head, the body's framing, and
    /// whether the connection may be kept.
    async fn read_head(
        &mut self,
        method: &Method,
    ) -> Result<(Response<()>, Framing, bool), H1Error> {
        let mut informational = 0;
        loop {
            if !self.buf.is_empty() {
                match parse_head(&mut self.buf, method)? {
                    Some(Parsed::Informational) if informational == MAX_INFORMATIONAL => {
                        return Err(H1Error::InvalidHead(format!(
                            "more than {MAX_INFORMATIONAL} informational (1xx) responses"
                        )));
                    }
                    Some(Parsed::Informational) => {
                        informational += 1;
                        continue;
                    }
                    Some(Parsed::Final(resp, framing, keep_alive)) => {
                        return Ok((resp, framing, keep_alive));
                    }
                    None if self.buf.len() >= MAX_HEAD => return Err(H1Error::HeadTooLarge),
                    None => {}
                }
            }
            if self.fill().await? == 0 {
                return Err(if self.buf.is_empty() {
                    H1Error::ClosedBeforeHead
                } else {
                    H1Error::InvalidHead("connection closed within the head".into())
                });
            }
        }
    }
}

/// A request may go again only when a kept connection closed or reset before any byte of an
/// answer arrived (the replica dropped an idle connection as the request reached it), the
/// method is idempotent and the body is in memory.
fn retry_or_fail(
    e: H1Error,
    reused_and_unanswered: bool,
    parts: http::request::Parts,
    kept: Option<Bytes>,
) -> SendError {
    let dropped = match &e {
        H1Error::ClosedBeforeHead => true,
        H1Error::Io(io) => matches!(
            io.kind(),
            io::ErrorKind::ConnectionReset
                | io::ErrorKind::ConnectionAborted
                | io::ErrorKind::BrokenPipe
                | io::ErrorKind::UnexpectedEof
        ),
        _ => false,
    };
    match kept {
        Some(b) if reused_and_unanswered && dropped && parts.method.is_idempotent() => {
            SendError::Retry(Box::new(Request::from_parts(parts, RequestBody::kept(b))))
        }
        _ => SendError::Failed(e),
    }
}

fn itoa_hex(n: usize) -> Vec<u8> {
    format!("{n:x}").into_bytes()
}

fn request_framing(parts: &http::request::Parts, body: &RequestBody) -> RequestFraming {
    if parts.headers.contains_key(http::header::CONTENT_LENGTH) {
        return RequestFraming::AsIs;
    }
    match body.size_hint().exact() {
        Some(0) if body.is_end_stream() => {
            if matches!(parts.method, Method::POST | Method::PUT | Method::PATCH) {
                RequestFraming::Length(0)
            } else {
                RequestFraming::AsIs
            }
        }
        Some(n) => RequestFraming::Length(n),
        None => RequestFraming::Chunked,
    }
}

fn write_head(out: &mut Vec<u8>, parts: &http::request::Parts, framing: RequestFraming) {
    out.extend_from_slice(parts.method.as_str().as_bytes());
    out.push(b' ');
    out.extend_from_slice(
        parts
            .uri
            .path_and_query()
            .map_or("/", |p| p.as_str())
            .as_bytes(),
    );
    out.extend_from_slice(b" HTTP/1.1\r\n");
    for (name, value) in &parts.headers {
        out.extend_from_slice(name.as_str().as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    match framing {
        RequestFraming::AsIs => {}
        RequestFraming::Length(n) => {
            out.extend_from_slice(b"content-length: ");
            out.extend_from_slice(itoa::Buffer::new().format(n).as_bytes());
            out.extend_from_slice(b"\r\n");
        }
        RequestFraming::Chunked => out.extend_from_slice(b"transfer-encoding: chunked\r\n"),
    }
    out.extend_from_slice(b"\r\n");
}

enum Parsed {
    Informational,
    Final(Response<()>, Framing, bool),
}

/// Parses one response head at the start of `buf` and takes it out of the buffer; `None`
/// while the head is incomplete.
fn parse_head(buf: &mut BytesMut, method: &Method) -> Result<Option<Parsed>, H1Error> {
    let mut slots = [MaybeUninit::<httparse::Header<'_>>::uninit(); MAX_HEADERS];
    let mut ranges = [(0u32, 0u32, 0u32, 0u32); MAX_HEADERS];
    let mut parsed = httparse::Response::new(&mut []);
    let (len, code, minor, count) = match httparse::ParserConfig::default()
        .parse_response_with_uninit_headers(&mut parsed, buf, &mut slots)
    {
        Ok(httparse::Status::Complete(len)) if len > MAX_HEAD => return Err(H1Error::HeadTooLarge),
        Ok(httparse::Status::Complete(len)) => {
            let base = buf.as_ptr() as usize;
            for (r, h) in ranges.iter_mut().zip(parsed.headers.iter()) {
                let name = h.name.as_ptr() as usize - base;
                let value = h.value.as_ptr() as usize - base;
                *r = (
                    name as u32,
                    h.name.len() as u32,
                    value as u32,
                    h.value.len() as u32,
                );
            }
            (
                len,
                parsed.code.unwrap_or(0),
                parsed.version.unwrap_or(1),
                parsed.headers.len(),
            )
        }
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(httparse::Error::TooManyHeaders) => {
            return Err(H1Error::InvalidHead(format!(
                "more than {MAX_HEADERS} headers"
            )));
        }
        Err(e) => return Err(H1Error::InvalidHead(e.to_string())),
    };
    let head = buf.split_to(len).freeze();
    if (100..200).contains(&code) {
        if code == 101 {
            return Err(H1Error::Upgrade);
        }
        return Ok(Some(Parsed::Informational));
    }
    let status =
        StatusCode::from_u16(code).map_err(|_| H1Error::InvalidHead(format!("status {code}")))?;
    // Room for what the proxy adds on the way out (X-Request-Id, Via, the RateLimit pair).
    let mut headers = HeaderMap::with_capacity(count + 4);
    let mut f = FramingHeaders::default();
    for &(name, name_len, value, value_len) in &ranges[..count] {
        let name = &head[name as usize..(name + name_len) as usize];
        let value = head.slice(value as usize..(value + value_len) as usize);
        let header_name = HeaderName::from_bytes(name)
            .map_err(|_| H1Error::InvalidHead("invalid header name".into()))?;
        let header_value = HeaderValue::from_maybe_shared(value)
            .map_err(|_| H1Error::InvalidHead(format!("invalid value of {header_name}")))?;
        f.observe(name, header_value.as_bytes());
        if f.length_invalid {
            return Err(H1Error::InvalidHead("invalid Content-Length".into()));
        }
        if f.length_conflict {
            return Err(H1Error::InvalidHead(
                "Content-Length values disagree".into(),
            ));
        }
        headers.append(header_name, header_value);
    }
    if f.chunked > 1 {
        return Err(H1Error::InvalidHead(
            "chunked applied more than once".into(),
        ));
    }
    let length = f.length;
    let chunked = f.te.then_some(f.last_chunked);
    let (saw_close, keep_alive) = (f.close, f.keep_alive);
    // HTTP/1.0 keeps a connection only when asked, and never after a Transfer-Encoding
    // (RFC 9112 §6.1: such framing is faulty); `close` always wins.
    let mut close = saw_close || (minor == 0 && (!keep_alive || chunked.is_some()));
    let framing = if *method == Method::HEAD
        || status == StatusCode::NO_CONTENT
        || status == StatusCode::NOT_MODIFIED
    {
        Framing::Empty
    } else if let Some(chunked) = chunked {
        // Transfer-Encoding wins over Content-Length, and such a connection is not kept.
        if length.is_some() {
            headers.remove(http::header::CONTENT_LENGTH);
            close = true;
        }
        if chunked {
            Framing::Chunked
        } else {
            Framing::Close
        }
    } else if let Some(n) = length {
        Framing::Length(n)
    } else {
        Framing::Close
    };
    let mut resp = Response::new(());
    *resp.status_mut() = status;
    *resp.version_mut() = if minor == 0 {
        Version::HTTP_10
    } else {
        Version::HTTP_11
    };
    *resp.headers_mut() = headers;
    Ok(Some(Parsed::Final(resp, framing, !close)))
}

#[derive(Clone, Copy, PartialEq, Debug)]
enum State {
    Length(u64),
    Chunked(Chunk),
    Close,
    Done,
    /// Ended by an error: not the end of the stream, so nothing takes it for a whole body.
    Broken,
}

/// A response body read from the upstream connection as the client side asks for it.
pub struct UpstreamBody {
    /// Boxed, so that the response (moved several times on its way out) stays small.
    conn: Option<Box<Connection>>,
    state: State,
    keep_alive: bool,
    pool: Arc<Pool>,
}

impl UpstreamBody {
    /// The body ended whole: the connection goes back to its pool if it may be kept.
    fn end(&mut self) {
        self.state = State::Done;
        if let Some(mut conn) = self.conn.take()
            && self.keep_alive
            && conn.buf.is_empty()
        {
            conn.shrink();
            self.pool.put(conn);
        }
    }

    fn fail(&mut self, e: H1Error) -> Poll<Option<Result<Frame<Bytes>, H1Error>>> {
        self.state = State::Broken;
        self.conn = None;
        Poll::Ready(Some(Err(e)))
    }
}

impl Body for UpstreamBody {
    type Data = Bytes;
    type Error = H1Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, H1Error>>> {
        let this = self.get_mut();
        loop {
            if this.state == State::Broken {
                return Poll::Ready(Some(Err(H1Error::BodyCut)));
            }
            let Some(conn) = this.conn.as_mut() else {
                return Poll::Ready(None);
            };
            match &mut this.state {
                State::Done | State::Broken => return Poll::Ready(None),
                State::Length(rem) => {
                    if !conn.buf.is_empty() {
                        let n = (*rem).min(conn.buf.len() as u64);
                        let data = conn.buf.split_to(n as usize).freeze();
                        *rem -= n;
                        if *rem == 0 {
                            this.end();
                        }
                        return Poll::Ready(Some(Ok(Frame::data(data))));
                    }
                }
                State::Close => {
                    if !conn.buf.is_empty() {
                        let data = conn.buf.split().freeze();
                        return Poll::Ready(Some(Ok(Frame::data(data))));
                    }
                }
                State::Chunked(chunk) => match chunk_step(&mut conn.buf, chunk) {
                    Ok(Step::Data(d)) => return Poll::Ready(Some(Ok(Frame::data(d)))),
                    Ok(Step::Again) => continue,
                    Ok(Step::End) => {
                        this.end();
                        return Poll::Ready(None);
                    }
                    Ok(Step::More) => {}
                    Err(e) => return this.fail(e.into()),
                },
            }
            match conn.poll_fill(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Err(e)) => return this.fail(H1Error::Io(e)),
                Poll::Ready(Ok(0)) if this.state == State::Close => {
                    this.state = State::Done;
                    this.conn = None;
                    return Poll::Ready(None);
                }
                Poll::Ready(Ok(0)) => return this.fail(H1Error::BodyCut),
                Poll::Ready(Ok(_)) => {}
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.state == State::Done
    }

    fn size_hint(&self) -> SizeHint {
        match self.state {
            State::Done => SizeHint::with_exact(0),
            State::Length(n) => SizeHint::with_exact(n),
            _ => SizeHint::default(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn head(raw: &str, method: Method) -> Result<Option<Parsed>, H1Error> {
        parse_head(&mut BytesMut::from(raw), &method)
    }

    fn final_head(raw: &str, method: Method) -> (Response<()>, Framing, bool) {
        match head(raw, method) {
            Ok(Some(Parsed::Final(r, f, k))) => (r, f, k),
            Ok(Some(Parsed::Informational)) => panic!("informational"),
            Ok(None) => panic!("partial"),
            Err(e) => panic!("{e}"),
        }
    }

    #[test]
    fn framing_follows_rfc_9112() {
        let (r, f, keep) = final_head(
            "HTTP/1.1 200 OK\r\nContent-Length: 5\r\nX-A: b\r\n\r\n",
            Method::GET,
        );
        assert_eq!(
            (r.status(), f, keep),
            (StatusCode::OK, Framing::Length(5), true)
        );
        assert_eq!(r.headers()["x-a"], "b");
        let (_, f, _) = final_head(
            "HTTP/1.1 200 OK\r\nContent-Length: 5, 5\r\n\r\n",
            Method::GET,
        );
        assert_eq!(f, Framing::Length(5));
        let (r, f, keep) = final_head(
            "HTTP/1.1 200 OK\r\nContent-Length: 5\r\nTransfer-Encoding: gzip, chunked\r\n\r\n",
            Method::GET,
        );
        assert_eq!((f, keep), (Framing::Chunked, false));
        assert!(!r.headers().contains_key("content-length"));
        let (_, f, keep) = final_head("HTTP/1.1 200 OK\r\n\r\n", Method::GET);
        assert_eq!((f, keep), (Framing::Close, true));
        let (_, f, _) = final_head("HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\n", Method::HEAD);
        assert_eq!(f, Framing::Empty);
        let (_, f, _) = final_head(
            "HTTP/1.1 304 Not Modified\r\nContent-Length: 9\r\n\r\n",
            Method::GET,
        );
        assert_eq!(f, Framing::Empty);
        let (_, _, keep) = final_head(
            "HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 0\r\n\r\n",
            Method::GET,
        );
        assert!(!keep);
        let (r, _, keep) = final_head("HTTP/1.0 200 OK\r\nContent-Length: 0\r\n\r\n", Method::GET);
        assert_eq!((r.version(), keep), (Version::HTTP_10, false));
        let (_, _, keep) = final_head(
            "HTTP/1.0 200 OK\r\nConnection: Keep-Alive\r\nContent-Length: 0\r\n\r\n",
            Method::GET,
        );
        assert!(keep);
        for closing in [
            "HTTP/1.0 200 OK\r\nConnection: close, keep-alive\r\nContent-Length: 0\r\n\r\n",
            "HTTP/1.1 200 OK\r\nConnection: keep-alive, close\r\nContent-Length: 0\r\n\r\n",
            "HTTP/1.0 200 OK\r\nConnection: keep-alive\r\nTransfer-Encoding: chunked\r\n\r\n",
        ] {
            let (_, _, keep) = final_head(closing, Method::GET);
            assert!(!keep, "{closing:?}");
        }
    }

    #[test]
    fn bad_heads_are_errors() {
        for raw in [
            "HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\n",
            "HTTP/1.1 200 OK\r\nContent-Length: -5\r\n\r\n",
            "HTTP/1.1 200 OK\r\nContent-Length: 5 5\r\n\r\n",
            "HTTP/1.1 200 OK\r\nContent-Length: 99999999999999999999\r\n\r\n",
            "HTTP/1.1 2000 OK\r\n\r\n",
            "HTTP/1.1 200 OK\r\nBad Name: x\r\n\r\n",
            "NOTHTTP 200 OK\r\n\r\n",
            "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked, chunked\r\n\r\n",
            "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n",
        ] {
            assert!(head(raw, Method::GET).is_err(), "{raw:?}");
        }
        assert!(matches!(
            head("HTTP/1.1 101 Switching Protocols\r\n\r\n", Method::GET),
            Err(H1Error::Upgrade)
        ));
        let many: String = (0..MAX_HEADERS + 1)
            .map(|i| format!("x-{i}: v\r\n"))
            .collect();
        assert!(head(&format!("HTTP/1.1 200 OK\r\n{many}\r\n"), Method::GET).is_err());
        assert!(matches!(
            head("HTTP/1.1 200 OK\r\nContent-Le", Method::GET),
            Ok(None)
        ));
        assert!(matches!(
            head(
                "HTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\n",
                Method::GET
            ),
            Ok(Some(Parsed::Informational))
        ));
    }
}
