//! Keep-alive HTTP/1 connections to one replica, over TCP or TLS (ALPN http/1.1 only).
//!
//! Idle connections wait on a stack per worker (most recently used first, so a few warm
//! connections do the work); a worker takes the connections its own runtime drives, so a
//! request never waits on another thread's. A request takes one, or opens a new one within the upstream's `connect_timeout`; its response
//! body hands the connection back when it ends whole ([`PooledConn::release`]). A connection
//! whose response was cut short is dropped, and with it the socket. Nothing runs per request
//! but the request itself: no pool task, no boxed futures, no hashing.

use crate::body::RequestBody;
use crate::tls::TlsConnect;
use hyper::body::Incoming;
use hyper::client::conn::http1;
use hyper_util::rt::TokioIo;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Why a pooled request failed.
#[derive(Debug, thiserror::Error)]
pub enum PoolError {
    /// Opening a connection failed or took longer than `connect_timeout`.
    #[error("{0}")]
    Connect(String),
    /// The exchange on an open connection failed.
    #[error(transparent)]
    Http(#[from] hyper::Error),
}

struct Idle {
    sender: http1::SendRequest<RequestBody>,
    since: Instant,
}

/// The connections of one replica.
pub struct Pool {
    authority: String,
    tls: Option<TlsConnect>,
    idle_timeout: Duration,
    max_idle: usize,
    idle: Box<[Mutex<Vec<Idle>>]>,
}

/// A connection lent to one request; give it back with [`PooledConn::release`].
pub struct PooledConn {
    sender: http1::SendRequest<RequestBody>,
    pool: Arc<Pool>,
}

impl PooledConn {
    /// Returns the connection to its pool (its response ended whole).
    pub fn release(self) {
        if self.sender.is_closed() {
            return;
        }
        let mut idle = self.pool.stack().lock().unwrap_or_else(|p| p.into_inner());
        if idle.len() < self.pool.max_idle {
            idle.push(Idle {
                sender: self.sender,
                since: Instant::now(),
            });
        }
    }
}

impl Pool {
    /// A pool for `host:port`, speaking TLS when `tls` is given.
    pub fn new(authority: &str, tls: Option<TlsConnect>) -> Arc<Pool> {
        Arc::new(Pool {
            authority: authority.to_owned(),
            tls,
            idle_timeout: Duration::from_secs(60),
            max_idle: 1024,
            idle: (0..crate::workers::count())
                .map(|_| Mutex::new(Vec::new()))
                .collect(),
        })
    }

    /// The idle stack of the worker this thread is.
    fn stack(&self) -> &Mutex<Vec<Idle>> {
        &self.idle[crate::workers::current() % self.idle.len()]
    }

    fn checkout(&self) -> Option<http1::SendRequest<RequestBody>> {
        let mut idle = self.stack().lock().unwrap_or_else(|p| p.into_inner());
        while let Some(c) = idle.pop() {
            if !c.sender.is_closed() && c.since.elapsed() < self.idle_timeout {
                return Some(c.sender);
            }
        }
        None
    }

    async fn connect(
        &self,
        timeout: Duration,
    ) -> Result<http1::SendRequest<RequestBody>, PoolError> {
        let deadline = tokio::time::Instant::now() + timeout;
        let elapsed = || {
            PoolError::Connect(format!(
                "connect timeout: deadline has elapsed after {timeout:?}"
            ))
        };
        let stream =
            tokio::time::timeout_at(deadline, tokio::net::TcpStream::connect(&self.authority))
                .await
                .map_err(|_| elapsed())?
                .map_err(|e| PoolError::Connect(format!("tcp connect error: {e}")))?;
        let _ = stream.set_nodelay(true);
        match &self.tls {
            None => Self::handshake(TokioIo::new(stream)).await,
            Some(tls) => {
                let stream = tokio::time::timeout_at(deadline, tls.handshake(stream))
                    .await
                    .map_err(|_| elapsed())?
                    .map_err(PoolError::Connect)?;
                Self::handshake(TokioIo::new(stream)).await
            }
        }
    }

    async fn handshake<T>(io: T) -> Result<http1::SendRequest<RequestBody>, PoolError>
    where
        T: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
    {
        let (sender, conn) = http1::Builder::new()
            .handshake(io)
            .await
            .map_err(|e| PoolError::Connect(format!("handshake: {e}")))?;
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, "upstream connection ended with an error");
            }
        });
        Ok(sender)
    }

    /// Sends a request on an idle connection or a new one. A request that an idle connection
    /// closed before it was sent goes once more on a fresh connection (nothing reached the
    /// replica, so this is safe for any method).
    pub async fn send(
        self: &Arc<Self>,
        mut req: http::Request<RequestBody>,
        connect_timeout: Duration,
    ) -> Result<(http::Response<Incoming>, PooledConn), PoolError> {
        loop {
            let (mut sender, reused) = match self.checkout() {
                Some(s) => (s, true),
                None => (self.connect(connect_timeout).await?, false),
            };
            if sender.ready().await.is_err() {
                if reused {
                    continue;
                }
                return Err(PoolError::Connect(
                    "the new connection closed at once".into(),
                ));
            }
            match sender.try_send_request(req).await {
                Ok(resp) => {
                    return Ok((
                        resp,
                        PooledConn {
                            sender,
                            pool: self.clone(),
                        },
                    ));
                }
                Err(mut e) => match e.take_message() {
                    Some(unsent) if reused => req = unsent,
                    _ => {
                        let e = e.into_error();
                        // TLS 1.3 completes the client's handshake before the server judges
                        // the client certificate; its refusal arrives with the first read.
                        if !reused && let Some(why) = crate::tls::describe(&e) {
                            return Err(PoolError::Connect(why));
                        }
                        return Err(PoolError::Http(e));
                    }
                },
            }
        }
    }
}
