//! The client side of HTTP/1.1 on one connection: read a request head, hand the request to the
//! pipeline, stream its body to the pipeline as it asks for bytes, write the response, and
//! read the next head — all in the connection's own task.
//!
//! hyper's server runs the same loop behind a dispatcher and a body channel, and re-encodes
//! every header through its own checks; here the head is parsed once (httparse), header values
//! are slices of the read buffer, and a response whose body is ready goes out in one write with
//! its head.
//!
//! Framing follows RFC 9112 §6 and is strict, because a proxy that reads a request differently
//! from the server behind it can be used to smuggle a second request past it:
//! - `Content-Length` must be digits (repeated values must agree); `Transfer-Encoding` must end
//!   with `chunked`, name it once, and is refused on HTTP/1.0;
//! - a request with both is passed to the pipeline without a body (which answers 400) and the
//!   connection closes after the answer;
//! - a head that does not parse, or is larger than `max_header_bytes`, is answered 400 or 431
//!   and the connection closes.
//!
//! A request body that the pipeline did not read to its end closes the connection after the
//! response, so its remaining bytes are never taken for the next request. Closing shuts down
//! the sending side first and reads what the client still sends for a moment (as nginx's
//! lingering close does), so a client still sending gets the answer rather than a reset.
//! `Expect: 100-continue` is answered when the pipeline first asks for the body.

use super::ConnActivity;
use crate::body::{ClientBody, ResponseBody};
use crate::framing::{self, Chunk, ChunkError, FramingHeader, FramingHeaders, Step};
use crate::proxy::ProxyError;
use bytes::{Bytes, BytesMut};
use http::{HeaderMap, HeaderName, HeaderValue, Method, Request, Response, StatusCode, Version};
use http_body::{Body, Frame, SizeHint};
use std::cell::RefCell;
use std::future::{Future, poll_fn};
use std::io::{self, IoSlice};
use std::mem::MaybeUninit;
use std::pin::{Pin, pin};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};

/// The most header lines a request head may have; more is answered 431.
pub const MAX_HEADERS: usize = 128;
/// How much is read from the socket at a time while a head or a body is incomplete.
const READ_SIZE: usize = 8 * 1024;
/// The least free room a read of a request head gets; with less, the buffer grows by
/// [`READ_SIZE`] (heads are split off the front, so the room left shrinks by each one).
const MIN_ROOM: usize = 1024;
/// A response body chunk up to this size is copied next to its head and both go out in one
/// plain write; a larger one goes out in the same vectored write as the head.
const COALESCE: usize = 4 * 1024;
/// How long a closing connection reads (and drops) what the client still sends.
const LINGER: Duration = Duration::from_secs(1);
/// How much a closing connection reads (and drops) at most.
const LINGER_BYTES: usize = 256 * 1024;
/// Room left in a request's header map for the headers the pipeline adds before forwarding.
const ADDED_HEADERS: usize = 8;

/// Why a client's request body could not be read.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    /// The client's socket failed.
    #[error("client connection failed: {0}")]
    Io(#[from] io::Error),
    /// The client closed the connection before the end its framing announced.
    #[error("client closed the connection before the end of the request body")]
    Cut,
    /// The chunked body broke the protocol.
    #[error("invalid chunked request body: {0}")]
    Chunk(#[from] ChunkError),
    /// The response was sent and the connection closed before the body was read to its end.
    #[error("the connection no longer reads this request body")]
    Abandoned,
}

/// The settings one connection works with.
#[derive(Clone, Copy)]
pub struct Limits {
    /// `max_header_bytes`: the largest request head (request line and headers).
    pub max_head: usize,
}

/// Serves HTTP/1.1 requests on `io` until the client closes, an error ends the connection, or
/// the connection is draining (checked after each response). `buf` holds bytes already read;
/// `activity` learns when the connection waits for a request body's bytes. `call`
/// handles a request; `reject` answers a head that could not be parsed or was too large.
pub async fn serve<S, C, F, R>(
    io: S,
    buf: BytesMut,
    limits: Limits,
    activity: &ConnActivity,
    call: C,
    reject: R,
) where
    S: AsyncRead + AsyncWrite + Reset + Unpin,
    C: Fn(Request<ClientBody>) -> F,
    F: Future<Output = Response<ResponseBody>>,
    R: Fn(ProxyError) -> Response<ResponseBody>,
{
    let mut conn = Conn {
        io,
        buf,
        out: Vec::with_capacity(1024),
        limits,
    };
    match conn.run(activity, &call, &reject).await {
        Ok(Ending::Closed) => {}
        Ok(Ending::Reset) => conn.io.reset(),
        Err(e) => tracing::debug!(error = %e, "client connection ended with an error"),
    }
}

/// How a connection ended.
enum Ending {
    /// Closed cleanly (or by the client).
    Closed,
    /// To be reset: the last response was cut where a clean close would make it look whole.
    Reset,
}

/// What becomes of the connection after a response.
enum After {
    Keep,
    Close,
    Reset,
}

impl From<bool> for After {
    fn from(close: bool) -> Self {
        if close { After::Close } else { After::Keep }
    }
}

/// A client stream that can end with a reset (TCP RST) instead of a clean close.
pub trait Reset {
    /// Makes dropping the stream reset the connection.
    fn reset(&self);
}

struct Conn<S> {
    io: S,
    buf: BytesMut,
    out: Vec<u8>,
    limits: Limits,
}

/// What the connection learned from a request head, beyond the request itself.
#[derive(Default)]
struct HeadInfo {
    method_head: bool,
    version: Version,
    /// The connection must close after this request (the client asked, or its framing).
    close: bool,
    /// An HTTP/1.0 client asked for keep-alive.
    keep_alive_10: bool,
    expect_continue: bool,
    body: Option<Decoder>,
}

#[derive(Clone, Copy)]
enum Decoder {
    Length(u64),
    Chunked(Chunk),
}

/// A parsed head, or the answer to one that is not a request.
enum Parsed {
    Request(Request<ClientBody>, HeadInfo, Option<Arc<Channel>>),
    Reject(ProxyError),
}

impl<S: AsyncRead + AsyncWrite + Unpin> Conn<S> {
    async fn run<C, F, R>(
        &mut self,
        activity: &ConnActivity,
        call: &C,
        reject: &R,
    ) -> io::Result<Ending>
    where
        C: Fn(Request<ClientBody>) -> F,
        F: Future<Output = Response<ResponseBody>>,
        R: Fn(ProxyError) -> Response<ResponseBody>,
    {
        loop {
            let parsed = match self.read_head().await? {
                Some(p) => p,
                None => return Ok(Ending::Closed),
            };
            let (req, info, channel) = match parsed {
                Parsed::Request(req, info, channel) => (req, info, channel),
                Parsed::Reject(e) => {
                    let resp = reject(e);
                    let info = HeadInfo {
                        close: true,
                        ..HeadInfo::default()
                    };
                    self.write_response(resp, &info, true).await?;
                    self.linger().await?;
                    return Ok(Ending::Closed);
                }
            };
            let mut feed = channel.map(|channel| Feed {
                channel,
                decoder: info.body.unwrap_or(Decoder::Length(0)),
                continue_sent: !info.expect_continue,
                continue_at: 0,
                ended: false,
                failed: false,
                activity,
            });
            let resp = {
                let mut handler = pin!(call(req));
                poll_fn(|cx| {
                    if let Poll::Ready(resp) = handler.as_mut().poll(cx) {
                        return Poll::Ready(resp);
                    }
                    if let Some(f) = feed.as_mut()
                        && !f.ended
                    {
                        f.poll(cx, &mut self.io, &mut self.buf);
                    }
                    Poll::Pending
                })
                .await
            };
            let unread = match &feed {
                Some(f) if !f.ended => {
                    f.channel.abandon();
                    true
                }
                Some(f) => f.failed,
                None => false,
            };
            let close = info.close
                || unread
                || activity.is_draining()
                || (info.version == Version::HTTP_10 && !info.keep_alive_10);
            match self.write_response(resp, &info, close).await? {
                After::Keep if !close => {}
                After::Reset => return Ok(Ending::Reset),
                _ => {
                    self.linger().await?;
                    return Ok(Ending::Closed);
                }
            }
        }
    }

    /// Reads and parses the next request head. `None` when the client closed between requests.
    async fn read_head(&mut self) -> io::Result<Option<Parsed>> {
        loop {
            if !self.buf.is_empty() {
                match self.parse_head() {
                    Ok(Some(p)) => return Ok(Some(p)),
                    Ok(None) => {}
                    Err(e) => return Ok(Some(Parsed::Reject(e))),
                }
                if self.buf.len() > self.limits.max_head {
                    return Ok(Some(Parsed::Reject(ProxyError::HeadersTooLarge {
                        limit: self.limits.max_head,
                    })));
                }
            }
            if self.buf.capacity() - self.buf.len() < MIN_ROOM {
                self.buf.reserve(READ_SIZE);
            }
            let n = tokio_util::io::read_buf(&mut self.io, &mut self.buf).await?;
            if n == 0 {
                // Closed between requests, or in the middle of a head nobody can answer.
                return Ok(None);
            }
        }
    }

    /// Parses the head at the front of the buffer, if it is all there.
    fn parse_head(&mut self) -> Result<Option<Parsed>, ProxyError> {
        // Blank lines before a request line are allowed (RFC 9112 §2.2).
        let skip = self
            .buf
            .iter()
            .take_while(|&&b| b == b'\r' || b == b'\n')
            .count();
        if skip > 0 {
            bytes::Buf::advance(&mut self.buf, skip);
            if self.buf.is_empty() {
                return Ok(None);
            }
        }
        let mut slots = [const { MaybeUninit::<httparse::Header<'_>>::uninit() }; MAX_HEADERS];
        let mut parsed = httparse::Request::new(&mut []);
        let len = match parsed.parse_with_uninit_headers(&self.buf, &mut slots) {
            Ok(httparse::Status::Complete(len)) => len,
            Ok(httparse::Status::Partial) => return Ok(None),
            Err(httparse::Error::TooManyHeaders) => {
                return Err(ProxyError::HeadersTooLarge {
                    limit: self.limits.max_head,
                });
            }
            Err(e) => {
                return Err(ProxyError::BadRequest(format!(
                    "malformed request head: {e}"
                )));
            }
        };
        if len > self.limits.max_head {
            return Err(ProxyError::HeadersTooLarge {
                limit: self.limits.max_head,
            });
        }
        let base = self.buf.as_ptr() as usize;
        let offset = |s: &[u8]| (s.as_ptr() as usize - base) as u32;
        let version = if parsed.version == Some(0) {
            Version::HTTP_10
        } else {
            Version::HTTP_11
        };
        let method = Method::from_bytes(parsed.method.unwrap_or("GET").as_bytes())
            .map_err(|_| ProxyError::BadRequest("invalid request method".into()))?;
        let path = parsed.path.unwrap_or("/");
        let path_at =
            offset(path.as_bytes()) as usize..offset(path.as_bytes()) as usize + path.len();
        // Where each header's name and value lie in the head: (name, name length, value,
        // value length).
        let mut spans = [(0u32, 0u32, 0u32, 0u32); MAX_HEADERS];
        let count = parsed.headers.len();
        for (span, h) in spans.iter_mut().zip(parsed.headers.iter()) {
            *span = (
                offset(h.name.as_bytes()),
                h.name.len() as u32,
                offset(h.value),
                h.value.len() as u32,
            );
        }
        let method_head = method == Method::HEAD;

        let mut info = HeadInfo {
            method_head,
            version,
            ..HeadInfo::default()
        };
        let mut f = FramingHeaders::default();
        let head = self.buf.split_to(len).freeze();
        let mut headers = HeaderMap::with_capacity(count + ADDED_HEADERS);
        for &(name_at, name_len, at, n) in &spans[..count] {
            let name = &head[name_at as usize..(name_at + name_len) as usize];
            let value = &head[at as usize..(at + n) as usize];
            let repeated = f.length.is_some();
            match f.observe(name, value) {
                Some(FramingHeader::ContentLength) => {
                    if repeated {
                        // The same length again: forwarded once.
                        continue;
                    }
                    if let Some(v) = f.length.filter(|_| !value.iter().all(u8::is_ascii_digit)) {
                        // A list of equal lengths ("5, 5") goes on as one number.
                        headers.append(http::header::CONTENT_LENGTH, HeaderValue::from(v));
                        continue;
                    }
                }
                None if name.len() == 6 && name.eq_ignore_ascii_case(b"expect") => {
                    info.expect_continue = value.trim_ascii().eq_ignore_ascii_case(b"100-continue")
                        && version == Version::HTTP_11;
                }
                _ => {}
            }
            let name = HeaderName::from_bytes(name)
                .map_err(|_| ProxyError::BadRequest("invalid header name".into()))?;
            let value = HeaderValue::from_maybe_shared(head.slice(at as usize..(at + n) as usize))
                .map_err(|_| ProxyError::BadRequest("invalid header value".into()))?;
            headers.append(name, value);
        }
        info.close = f.close;
        info.keep_alive_10 = f.keep_alive;
        let (te, length, bad_length) = (f.te, f.length, f.bad_length());
        let uri = http::Uri::from_maybe_shared(head.slice(path_at))
            .map_err(|_| ProxyError::BadRequest("invalid request target".into()))?;

        if te {
            if version == Version::HTTP_10 {
                return Err(ProxyError::BadRequest(
                    "Transfer-Encoding is not allowed in an HTTP/1.0 request".into(),
                ));
            }
            if !f.last_chunked || f.chunked > 1 {
                return Err(ProxyError::BadRequest(
                    "Transfer-Encoding must end with chunked, named once".into(),
                ));
            }
            if f.codings > 1 {
                return Err(ProxyError::NotImplemented(
                    "transfer codings other than chunked are not supported".into(),
                ));
            }
        }
        if te && (length.is_some() || bad_length) {
            // Passed on without a body: the pipeline answers 400 and the connection closes.
            info.close = true;
        } else if bad_length {
            return Err(ProxyError::BadRequest("invalid Content-Length".into()));
        } else if te {
            info.body = Some(Decoder::Chunked(Chunk::Size));
        } else if let Some(n) = length.filter(|&n| n > 0) {
            info.body = Some(Decoder::Length(n));
        }
        if info.body.is_none() {
            info.expect_continue = false;
        }

        let channel = info.body.map(|d| Arc::new(Channel::new(d)));
        let body = match &channel {
            Some(c) => ClientBody::H1(BodyReader { channel: c.clone() }),
            None => ClientBody::Empty,
        };
        let mut req = Request::new(body);
        *req.method_mut() = method;
        *req.uri_mut() = uri;
        *req.version_mut() = version;
        *req.headers_mut() = headers;
        Ok(Some(Parsed::Request(req, info, channel)))
    }

    /// Writes a response. Returns what becomes of the connection: kept, closed (its body had
    /// no length the client could rely on, or failed where the client sees the cut), or reset
    /// (its body failed where only a reset tells the client it was cut).
    async fn write_response(
        &mut self,
        resp: Response<ResponseBody>,
        info: &HeadInfo,
        close: bool,
    ) -> io::Result<After> {
        let (parts, mut body) = resp.into_parts();
        let pre = body.take_head();
        let mut body = pin!(body);
        let status = parts.status;
        let no_body = info.method_head
            || status.is_informational()
            || status == StatusCode::NO_CONTENT
            || status == StatusCode::NOT_MODIFIED;
        let mut close = close
            || parts
                .headers
                .get(http::header::CONNECTION)
                .is_some_and(|v| framing::last_token_is(v.as_bytes(), b"close"));
        let declared = parts
            .headers
            .get(http::header::CONTENT_LENGTH)
            .and_then(|v| framing::parse_length(v.as_bytes()))
            .or(pre.as_ref().and_then(|p| p.length));
        let framing = if no_body {
            match declared {
                // A HEAD or 304 answer says the length the body would have.
                Some(n) if status != StatusCode::NO_CONTENT => Framing::Declared(n),
                _ => Framing::None,
            }
        } else if let Some(n) = declared {
            Framing::Length(n)
        } else if let Some(n) = body.size_hint().exact() {
            Framing::AddLength(n)
        } else if info.version == Version::HTTP_11 {
            Framing::Chunked
        } else {
            close = true;
            Framing::Close
        };

        let out = &mut self.out;
        out.clear();
        write_status(out, status);
        let mut has_date = false;
        if let Some(pre) = &pre {
            out.extend_from_slice(&pre.lines);
            has_date = pre.date;
        }
        for (name, value) in &parts.headers {
            if name == http::header::TRANSFER_ENCODING
                || name == http::header::CONNECTION
                || name == http::header::CONTENT_LENGTH
            {
                continue;
            }
            has_date |= name == http::header::DATE;
            out.extend_from_slice(name.as_str().as_bytes());
            out.extend_from_slice(b": ");
            out.extend_from_slice(value.as_bytes());
            out.extend_from_slice(b"\r\n");
        }
        if !has_date {
            out.extend_from_slice(b"date: ");
            with_date(|d| out.extend_from_slice(d));
            out.extend_from_slice(b"\r\n");
        }
        match framing {
            Framing::AddLength(n) | Framing::Length(n) | Framing::Declared(n) => {
                out.extend_from_slice(b"content-length: ");
                out.extend_from_slice(itoa::Buffer::new().format(n).as_bytes());
                out.extend_from_slice(b"\r\n");
            }
            Framing::Chunked => out.extend_from_slice(b"transfer-encoding: chunked\r\n"),
            _ => {}
        }
        if close {
            out.extend_from_slice(b"connection: close\r\n");
        } else if info.version == Version::HTTP_10 {
            out.extend_from_slice(b"connection: keep-alive\r\n");
        }
        out.extend_from_slice(b"\r\n");
        drop((parts, pre));

        if matches!(framing, Framing::None | Framing::Declared(_)) {
            self.finish(false, b"").await?;
            return Ok(After::from(close));
        }
        let mut left = match framing {
            Framing::Length(n) | Framing::AddLength(n) => Some(n),
            _ => None,
        };
        let chunked = matches!(framing, Framing::Chunked);
        let mut head_sent = false;
        loop {
            // The head waits for the first frame if that is ready now, so both go in one write.
            let frame = if head_sent {
                poll_fn(|cx| body.as_mut().poll_frame(cx)).await
            } else {
                match poll_fn(|cx| Poll::Ready(body.as_mut().poll_frame(cx))).await {
                    Poll::Ready(f) => f,
                    Poll::Pending => {
                        self.finish(false, b"").await?;
                        head_sent = true;
                        continue;
                    }
                }
            };
            let mut data = match frame {
                None => break,
                Some(Err(e)) => {
                    tracing::debug!(error = %e, "response body failed; closing the connection");
                    self.finish(head_sent, b"").await?;
                    // Ended by the connection, a cut body would look whole: reset instead.
                    return Ok(if matches!(framing, Framing::Close) {
                        After::Reset
                    } else {
                        After::Close
                    });
                }
                Some(Ok(frame)) => match frame.into_data() {
                    Ok(d) => d,
                    Err(_) => continue,
                },
            };
            if let Some(l) = left.as_mut() {
                if data.len() as u64 > *l {
                    // More than its Content-Length: never past it, and the connection closes.
                    data.truncate(*l as usize);
                    close = true;
                }
                *l -= data.len() as u64;
            }
            if data.is_empty() {
                if left == Some(0) {
                    break;
                }
                continue;
            }
            let last = left == Some(0) || body.is_end_stream();
            self.write_data(data, chunked, last && chunked, head_sent)
                .await?;
            head_sent = true;
            if last {
                if chunked {
                    return Ok(After::from(close));
                }
                break;
            }
        }
        if left.is_some_and(|l| l > 0) {
            // The body ended before its Content-Length: the client sees a cut response.
            self.finish(head_sent, b"").await?;
            return Ok(After::Close);
        }
        let last_chunk: &[u8] = if chunked { b"0\r\n\r\n" } else { b"" };
        self.finish(head_sent, last_chunk).await?;
        Ok(After::from(close))
    }

    /// Writes the head (unless it went already) and `tail` after it, in one write, and
    /// flushes.
    async fn finish(&mut self, head_sent: bool, tail: &[u8]) -> io::Result<()> {
        if head_sent {
            self.out.clear();
        }
        self.out.extend_from_slice(tail);
        if !self.out.is_empty() {
            self.io.write_all(&self.out).await?;
        }
        self.io.flush().await
    }

    /// Writes one body chunk (and the head before it, unless it went already), framed as the
    /// response is; `end` adds the last chunk of a chunked body.
    async fn write_data(
        &mut self,
        data: Bytes,
        chunked: bool,
        end: bool,
        head_sent: bool,
    ) -> io::Result<()> {
        if head_sent {
            self.out.clear();
        }
        let mut size_line = [0u8; 20];
        let mut size_len = 0;
        if chunked {
            size_len = hex_line(data.len(), &mut size_line);
        }
        let tail: &[u8] = match (chunked, end) {
            (true, true) => b"\r\n0\r\n\r\n",
            (true, false) => b"\r\n",
            _ => b"",
        };
        if data.len() <= COALESCE {
            self.out.extend_from_slice(&size_line[..size_len]);
            self.out.extend_from_slice(&data);
            self.out.extend_from_slice(tail);
            self.io.write_all(&self.out).await?;
        } else {
            let mut slices = [
                IoSlice::new(&self.out),
                IoSlice::new(&size_line[..size_len]),
                IoSlice::new(&data),
                IoSlice::new(tail),
            ];
            write_all_vectored(&mut self.io, &mut slices).await?;
        }
        self.io.flush().await
    }

    /// Closes the connection: shuts down the sending side, then reads and drops what the
    /// client still sends, for a moment.
    async fn linger(&mut self) -> io::Result<()> {
        self.io.shutdown().await?;
        let drain = async {
            let mut dropped = 0;
            while dropped < LINGER_BYTES {
                self.buf.clear();
                self.buf.reserve(READ_SIZE);
                match tokio_util::io::read_buf(&mut self.io, &mut self.buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => dropped += n,
                }
            }
        };
        let _ = tokio::time::timeout(LINGER, drain).await;
        Ok(())
    }
}

/// How a response body is delimited on the wire.
#[derive(Clone, Copy)]
enum Framing {
    /// No body (HEAD, 1xx, 204, 304).
    None,
    /// No body, and the Content-Length the body would have (HEAD, 304).
    Declared(u64),
    /// The response's own Content-Length.
    Length(u64),
    /// A Content-Length Palisade adds (the body's exact size is known).
    AddLength(u64),
    /// `Transfer-Encoding: chunked` (HTTP/1.1 clients, size unknown).
    Chunked,
    /// Until the connection closes (HTTP/1.0 clients, size unknown).
    Close,
}

fn write_status(out: &mut Vec<u8>, status: StatusCode) {
    out.extend_from_slice(b"HTTP/1.1 ");
    out.extend_from_slice(status.as_str().as_bytes());
    out.push(b' ');
    out.extend_from_slice(status.canonical_reason().unwrap_or("Unknown").as_bytes());
    out.extend_from_slice(b"\r\n");
}

/// Writes `n` as a chunk-size line; returns its length.
fn hex_line(mut n: usize, out: &mut [u8; 20]) -> usize {
    let mut digits = [0u8; 16];
    let mut len = 0;
    loop {
        digits[len] = b"0123456789abcdef"[n & 15];
        len += 1;
        n >>= 4;
        if n == 0 {
            break;
        }
    }
    for i in 0..len {
        out[i] = digits[len - 1 - i];
    }
    out[len] = b'\r';
    out[len + 1] = b'\n';
    len + 2
}

async fn write_all_vectored<S: AsyncWrite + Unpin>(
    io: &mut S,
    mut slices: &mut [IoSlice<'_>],
) -> io::Result<()> {
    while !slices.is_empty() {
        let n = io.write_vectored(slices).await?;
        if n == 0 {
            return Err(io::ErrorKind::WriteZero.into());
        }
        IoSlice::advance_slices(&mut slices, n);
    }
    Ok(())
}

thread_local! {
    /// The `Date` value for the current second, formatted once per second per thread.
    static DATE: RefCell<(u64, [u8; 29])> = const { RefCell::new((u64::MAX, [0; 29])) };
}

/// Calls `f` with the current `Date` header value (IMF-fixdate).
fn with_date(f: impl FnOnce(&[u8])) {
    DATE.with(|d| {
        let mut d = d.borrow_mut();
        let now = SystemTime::now();
        let secs = now.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
        if d.0 != secs {
            let text = httpdate::fmt_http_date(now);
            if text.len() == 29 {
                d.1.copy_from_slice(text.as_bytes());
                d.0 = secs;
            }
        }
        f(&d.1);
    });
}

/// `ready!` for a function that returns `()` when pending.
macro_rules! ready_or_return {
    ($e:expr) => {
        match $e {
            Poll::Ready(v) => v,
            Poll::Pending => return,
        }
    };
}

/// The connection's side of a request body: decodes the body from the socket while the
/// pipeline wants bytes, one chunk at a time.
struct Feed<'a> {
    channel: Arc<Channel>,
    decoder: Decoder,
    continue_sent: bool,
    continue_at: usize,
    ended: bool,
    /// The body broke its framing or the client's connection failed: nothing after it on
    /// this connection can be trusted.
    failed: bool,
    activity: &'a ConnActivity,
}

const CONTINUE: &[u8] = b"HTTP/1.1 100 Continue\r\n\r\n";

impl Feed<'_> {
    /// Moves the body along while its reader wants a chunk; sets `ended` at the body's end or
    /// on an error (which the reader gets).
    fn poll<S: AsyncRead + AsyncWrite + Unpin>(
        &mut self,
        cx: &mut Context<'_>,
        io: &mut S,
        buf: &mut BytesMut,
    ) {
        loop {
            if !self.channel.wants(cx.waker()) {
                return;
            }
            if !self.continue_sent {
                while self.continue_at < CONTINUE.len() {
                    match Pin::new(&mut *io).poll_write(cx, &CONTINUE[self.continue_at..]) {
                        Poll::Ready(Ok(n)) if n > 0 => self.continue_at += n,
                        Poll::Ready(Ok(_)) => return self.fail(ReadError::Cut),
                        Poll::Ready(Err(e)) => return self.fail(e.into()),
                        Poll::Pending => return,
                    }
                }
                if Pin::new(&mut *io).poll_flush(cx).is_pending() {
                    return;
                }
                self.continue_sent = true;
            }
            match step(&mut self.decoder, buf) {
                Ok(Some(Delivery::Data(d))) => {
                    self.activity.reading_body(false);
                    let end = matches!(self.decoder, Decoder::Length(0));
                    self.channel.deliver(Some(Ok(d)), end);
                    if end {
                        self.ended = true;
                        return;
                    }
                }
                Ok(Some(Delivery::End)) => {
                    self.activity.reading_body(false);
                    self.channel.deliver(None, true);
                    self.ended = true;
                    return;
                }
                Ok(None) => {
                    buf.reserve(READ_SIZE);
                    let read = tokio_util::io::poll_read_buf(Pin::new(&mut *io), cx, buf);
                    // Waiting on the client: its idle_timeout applies (ConnActivity::check).
                    self.activity.reading_body(read.is_pending());
                    match ready_or_return!(read) {
                        Ok(0) => return self.fail(ReadError::Cut),
                        Ok(_) => {}
                        Err(e) => return self.fail(e.into()),
                    }
                }
                Err(e) => return self.fail(e.into()),
            }
        }
    }

    fn fail(&mut self, e: ReadError) {
        self.activity.reading_body(false);
        self.channel.deliver(Some(Err(e)), true);
        self.ended = true;
        self.failed = true;
    }
}

enum Delivery {
    Data(Bytes),
    End,
}

/// One decoding step over the buffered bytes: a chunk, the end, or `None` for "read more".
fn step(decoder: &mut Decoder, buf: &mut BytesMut) -> Result<Option<Delivery>, ChunkError> {
    match decoder {
        Decoder::Length(0) => Ok(Some(Delivery::End)),
        Decoder::Length(left) => {
            if buf.is_empty() {
                return Ok(None);
            }
            let n = (*left).min(buf.len() as u64);
            *left -= n;
            Ok(Some(Delivery::Data(buf.split_to(n as usize).freeze())))
        }
        Decoder::Chunked(chunk) => loop {
            match framing::chunk_step(buf, chunk)? {
                Step::Data(d) => return Ok(Some(Delivery::Data(d))),
                Step::Again => continue,
                Step::End => return Ok(Some(Delivery::End)),
                Step::More => return Ok(None),
            }
        },
    }
}

/// Keeps `waker` in `slot`, cloning it only when it is not the one kept already.
fn park(slot: &mut Option<Waker>, waker: &Waker) {
    if !slot.as_ref().is_some_and(|w| w.will_wake(waker)) {
        *slot = Some(waker.clone());
    }
}

/// Hands body chunks from the connection to the request's [`BodyReader`], one at a time.
struct Channel {
    state: Mutex<ChannelState>,
}

struct ChannelState {
    chunk: Option<Result<Bytes, ReadError>>,
    ended: bool,
    want: bool,
    gone: bool,
    left: Option<u64>,
    reader: Option<Waker>,
    feeder: Option<Waker>,
}

impl Channel {
    fn new(decoder: Decoder) -> Self {
        Channel {
            state: Mutex::new(ChannelState {
                chunk: None,
                ended: false,
                want: false,
                gone: false,
                left: match decoder {
                    Decoder::Length(n) => Some(n),
                    Decoder::Chunked(_) => None,
                },
                reader: None,
                feeder: None,
            }),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, ChannelState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Whether the reader waits for a chunk; if not, the feeder is woken when it does.
    fn wants(&self, feeder: &Waker) -> bool {
        let mut s = self.lock();
        if s.want && s.chunk.is_none() && !s.gone {
            return true;
        }
        park(&mut s.feeder, feeder);
        false
    }

    fn deliver(&self, chunk: Option<Result<Bytes, ReadError>>, ended: bool) {
        let mut s = self.lock();
        if let (Some(Ok(d)), Some(left)) = (&chunk, s.left.as_mut()) {
            *left = left.saturating_sub(d.len() as u64);
        }
        s.chunk = chunk;
        s.ended = ended;
        s.want = false;
        if let Some(w) = s.reader.take() {
            w.wake();
        }
    }

    /// The connection stopped feeding before the end: the reader gets an error.
    fn abandon(&self) {
        let mut s = self.lock();
        if !s.ended {
            s.chunk = Some(Err(ReadError::Abandoned));
            s.ended = true;
            if let Some(w) = s.reader.take() {
                w.wake();
            }
        }
    }
}

/// A request body as the pipeline reads it: chunks decoded by the connection on demand.
pub struct BodyReader {
    channel: Arc<Channel>,
}

impl Drop for BodyReader {
    fn drop(&mut self) {
        let mut s = self.channel.lock();
        s.gone = true;
        if let Some(w) = s.feeder.take() {
            w.wake();
        }
    }
}

impl Body for BodyReader {
    type Data = Bytes;
    type Error = ReadError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, ReadError>>> {
        let mut s = self.channel.lock();
        if let Some(chunk) = s.chunk.take() {
            return Poll::Ready(Some(chunk.map(Frame::data)));
        }
        if s.ended {
            return Poll::Ready(None);
        }
        s.want = true;
        park(&mut s.reader, cx.waker());
        if let Some(w) = s.feeder.take() {
            w.wake();
        }
        Poll::Pending
    }

    fn is_end_stream(&self) -> bool {
        let s = self.channel.lock();
        s.ended && s.chunk.is_none()
    }

    fn size_hint(&self) -> SizeHint {
        let s = self.channel.lock();
        let pending = match &s.chunk {
            Some(Ok(d)) => d.len() as u64,
            _ => 0,
        };
        match s.left {
            Some(n) => SizeHint::with_exact(n + pending),
            None => SizeHint::default(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunk_size_lines_are_hex() {
        let mut line = [0u8; 20];
        for (n, text) in [
            (0, "0\r\n"),
            (10, "a\r\n"),
            (4096, "1000\r\n"),
            (usize::MAX, "ffffffffffffffff\r\n"),
        ] {
            let len = hex_line(n, &mut line);
            assert_eq!(&line[..len], text.as_bytes());
        }
    }

    #[test]
    fn the_date_is_an_imf_fixdate() {
        with_date(|d| {
            let text = std::str::from_utf8(d).unwrap();
            assert!(httpdate::parse_http_date(text).is_ok(), "{text}");
        });
    }
}
