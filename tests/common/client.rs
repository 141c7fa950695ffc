//! Clients for tests: hyper-util's legacy client (HTTP/1.1, and h2c with prior knowledge) and a
//! raw TCP connection that sends exact bytes and reads a response by hand.

use bytes::Bytes;
use http::{HeaderMap, Request, StatusCode};
use http_body::{Body, Frame, SizeHint};
use http_body_util::BodyExt;
use http_body_util::combinators::BoxBody;
use hyper::body::Incoming;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use std::net::SocketAddr;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Boxed error of request bodies.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
/// The request body type of the test clients.
pub type ReqBody = BoxBody<Bytes, BoxError>;
/// A test client.
pub type TestClient = Client<HttpConnector, ReqBody>;

/// An HTTP/1.1 client.
pub fn http1() -> TestClient {
    Client::builder(TokioExecutor::new()).build(HttpConnector::new())
}

/// An HTTP/2 client with prior knowledge (h2c).
pub fn h2c() -> TestClient {
    Client::builder(TokioExecutor::new())
        .http2_only(true)
        .build(HttpConnector::new())
}

/// An empty body.
pub fn empty() -> ReqBody {
    http_body_util::Empty::new().map_err(|e| match e {}).boxed()
}

/// A complete body.
pub fn full(b: impl Into<Bytes>) -> ReqBody {
    http_body_util::Full::new(b.into())
        .map_err(|e| match e {})
        .boxed()
}

/// A streamed body of `size` bytes in 64 KiB frames, generated as it is sent.
pub fn zeros(size: u64) -> ReqBody {
    Zeros {
        remaining: size,
        chunk: Bytes::from(vec![b'z'; 64 << 10]),
        exact: true,
    }
    .boxed()
}

/// Like [`zeros`] but without a known length, so HTTP/1.1 sends it chunked.
pub fn zeros_chunked(size: u64) -> ReqBody {
    Zeros {
        remaining: size,
        chunk: Bytes::from(vec![b'z'; 64 << 10]),
        exact: false,
    }
    .boxed()
}

struct Zeros {
    remaining: u64,
    chunk: Bytes,
    exact: bool,
}

impl Body for Zeros {
    type Data = Bytes;
    type Error = BoxError;
    fn poll_frame(
        mut self: Pin<&mut Self>,
        _: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        if self.remaining == 0 {
            return Poll::Ready(None);
        }
        let n = (self.chunk.len() as u64).min(self.remaining);
        self.remaining -= n;
        Poll::Ready(Some(Ok(Frame::data(self.chunk.slice(..n as usize)))))
    }
    fn is_end_stream(&self) -> bool {
        self.remaining == 0
    }
    fn size_hint(&self) -> SizeHint {
        if self.exact {
            SizeHint::with_exact(self.remaining)
        } else {
            SizeHint::default()
        }
    }
}

/// A response read to its end.
#[derive(Debug)]
pub struct Reply {
    /// Status.
    pub status: StatusCode,
    /// Headers.
    pub headers: HeaderMap,
    /// The whole body.
    pub body: Bytes,
}

impl Reply {
    /// The body as text.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
    /// The body as JSON (panics with the body if it is not).
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.text()))
    }
    /// A header as text.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }
}

/// Sends `req` and reads the whole response; panics if either fails.
pub async fn send(client: &TestClient, req: Request<ReqBody>) -> Reply {
    try_send(client, req)
        .await
        .unwrap_or_else(|e| panic!("request failed: {e}"))
}

/// Sends `req` and reads the whole response.
pub async fn try_send(client: &TestClient, req: Request<ReqBody>) -> Result<Reply, String> {
    let resp = client.request(req).await.map_err(|e| format!("{e:?}"))?;
    let (parts, body) = resp.into_parts();
    let body = body
        .collect()
        .await
        .map_err(|e| format!("body: {e:?}"))?
        .to_bytes();
    Ok(Reply {
        status: parts.status,
        headers: parts.headers,
        body,
    })
}

/// GET `url` with extra headers.
pub async fn get(client: &TestClient, url: &str, headers: &[(&str, &str)]) -> Reply {
    let mut b = Request::get(url);
    for (k, v) in headers {
        b = b.header(*k, *v);
    }
    send(client, b.body(empty()).unwrap()).await
}

/// Reads a body as a stream, counting bytes without keeping them. Returns the count and the
/// error that ended it early, if any.
pub async fn count_body(mut body: Incoming) -> (u64, Option<hyper::Error>) {
    let mut n = 0;
    while let Some(frame) = body.frame().await {
        match frame {
            Ok(f) => {
                if let Some(d) = f.data_ref() {
                    n += d.len() as u64;
                }
            }
            Err(e) => return (n, Some(e)),
        }
    }
    (n, None)
}

/// A response head read from a raw connection.
#[derive(Debug, Clone)]
pub struct Head {
    /// Status code.
    pub status: u16,
    /// Headers in order, names lower-case.
    pub headers: Vec<(String, String)>,
    /// The head as received.
    pub raw: String,
}

impl Head {
    /// The first value of a header.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
}

/// A raw TCP connection for sending exact bytes.
pub struct Raw {
    stream: TcpStream,
    buf: Vec<u8>,
}

/// What a read on a raw connection ended with.
#[derive(Debug, PartialEq, Eq)]
pub enum ReadEnd {
    /// The peer closed (EOF or reset).
    Closed,
    /// Nothing more within the timeout.
    TimedOut,
}

impl Raw {
    /// Connects to `addr`.
    pub async fn connect(addr: SocketAddr) -> Raw {
        let stream = tokio::time::timeout(Duration::from_secs(5), TcpStream::connect(addr))
            .await
            .expect("connect timed out")
            .expect("connect");
        stream.set_nodelay(true).unwrap();
        Raw {
            stream,
            buf: Vec::new(),
        }
    }

    /// Writes `bytes`; an error (the peer closed) is returned, not a panic.
    pub async fn send(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.stream.write_all(bytes).await
    }

    async fn fill(&mut self, timeout: Duration) -> Result<(), ReadEnd> {
        let mut tmp = [0u8; 16 << 10];
        match tokio::time::timeout(timeout, self.stream.read(&mut tmp)).await {
            Err(_) => Err(ReadEnd::TimedOut),
            Ok(Ok(0)) | Ok(Err(_)) => Err(ReadEnd::Closed),
            Ok(Ok(n)) => {
                self.buf.extend_from_slice(&tmp[..n]);
                Ok(())
            }
        }
    }

    /// Reads one response head (up to the blank line).
    pub async fn read_head(&mut self, timeout: Duration) -> Result<Head, ReadEnd> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            if let Some(end) = self.buf.windows(4).position(|w| w == b"\r\n\r\n") {
                let raw: Vec<u8> = self.buf.drain(..end + 4).collect();
                let raw = String::from_utf8_lossy(&raw).into_owned();
                let mut lines = raw.split("\r\n");
                let status_line = lines.next().unwrap_or("");
                let status = status_line
                    .split(' ')
                    .nth(1)
                    .and_then(|s| s.parse().ok())
                    .unwrap_or(0);
                let headers = lines
                    .filter(|l| !l.is_empty())
                    .filter_map(|l| l.split_once(':'))
                    .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_owned()))
                    .collect();
                return Ok(Head {
                    status,
                    headers,
                    raw,
                });
            }
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            if left.is_zero() {
                return Err(ReadEnd::TimedOut);
            }
            self.fill(left).await?;
        }
    }

    /// Reads one whole response: its head, then a body framed by Content-Length or chunked
    /// coding (no body for `head_request` or 1xx/204/304).
    pub async fn read_response(
        &mut self,
        timeout: Duration,
        head_request: bool,
    ) -> Result<(Head, Vec<u8>), ReadEnd> {
        let deadline = tokio::time::Instant::now() + timeout;
        let head = self.read_head(timeout).await?;
        if head_request || head.status < 200 || head.status == 204 || head.status == 304 {
            return Ok((head, Vec::new()));
        }
        let left = || deadline.saturating_duration_since(tokio::time::Instant::now());
        if let Some(len) = head
            .header("content-length")
            .and_then(|v| v.parse::<usize>().ok())
        {
            while self.buf.len() < len {
                self.fill(left()).await?;
            }
            let body = self.buf.drain(..len).collect();
            return Ok((head, body));
        }
        if head
            .header("transfer-encoding")
            .is_some_and(|v| v.contains("chunked"))
        {
            let mut body = Vec::new();
            loop {
                let line_end = loop {
                    if let Some(p) = self.buf.windows(2).position(|w| w == b"\r\n") {
                        break p;
                    }
                    self.fill(left()).await?;
                };
                let size_line = String::from_utf8_lossy(&self.buf[..line_end]).into_owned();
                let size = usize::from_str_radix(size_line.split(';').next().unwrap().trim(), 16)
                    .expect("chunk size");
                self.buf.drain(..line_end + 2);
                while self.buf.len() < size + 2 {
                    self.fill(left()).await?;
                }
                body.extend(self.buf.drain(..size));
                self.buf.drain(..2);
                if size == 0 {
                    return Ok((head, body));
                }
            }
        }
        // Close-delimited.
        loop {
            match self.fill(left()).await {
                Ok(()) => {}
                Err(ReadEnd::Closed) => return Ok((head, std::mem::take(&mut self.buf))),
                Err(e) => return Err(e),
            }
        }
    }

    /// Reads everything until the peer closes or `timeout` passes; returns the bytes and how
    /// the read ended.
    pub async fn read_to_end(&mut self, timeout: Duration) -> (Vec<u8>, ReadEnd) {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            if left.is_zero() {
                return (std::mem::take(&mut self.buf), ReadEnd::TimedOut);
            }
            if let Err(end) = self.fill(left).await {
                return (std::mem::take(&mut self.buf), end);
            }
        }
    }

    /// Whether the peer closes the connection within `timeout` (bytes read meanwhile are kept).
    pub async fn closed_within(&mut self, timeout: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            if left.is_zero() {
                return false;
            }
            match self.fill(left).await {
                Ok(()) => {}
                Err(ReadEnd::Closed) => return true,
                Err(ReadEnd::TimedOut) => return false,
            }
        }
    }

    /// Bytes read but not consumed yet.
    pub fn pending(&self) -> &[u8] {
        &self.buf
    }
}
