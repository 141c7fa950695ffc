//! Keep-alive HTTP/1 connections to one replica, over TCP or TLS (ALPN http/1.1 only).
//!
//! Idle connections wait on a stack per worker (most recently used first, so a few warm
//! connections do the work), and one more for the threads that are not workers (health checks
//! on the main runtime); a worker takes the connections its own runtime drives, so a request
//! never waits on another thread's. Connections idle past `idle_timeout` are closed as the
//! stack is used; a full stack closes its oldest. A request takes one, or opens a new one within
//! the upstream's `connect_timeout`, and drives the exchange itself ([`super::h1`]); its
//! response body hands the connection back when it ends whole. A connection whose response
//! was cut short is dropped, and with it the socket. Nothing runs per request but the request
//! itself: no pool task, no connection task, no boxed futures, no hashing.

use super::h1::{Connection, H1Error, SendError, Stream, UpstreamBody};
use crate::body::RequestBody;
use crate::tls::TlsConnect;
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
    Http(#[from] H1Error),
}

struct Idle {
    conn: Box<Connection>,
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

impl Pool {
    /// A pool for `host:port`, speaking TLS when `tls` is given.
    pub fn new(authority: &str, tls: Option<TlsConnect>) -> Arc<Pool> {
        Self::with_limits(authority, tls, Duration::from_secs(60), 1024)
    }

    /// A pool whose connections idle at most `idle_timeout`, at most `max_idle` per stack.
    fn with_limits(
        authority: &str,
        tls: Option<TlsConnect>,
        idle_timeout: Duration,
        max_idle: usize,
    ) -> Arc<Pool> {
        Arc::new(Pool {
            authority: authority.to_owned(),
            tls,
            idle_timeout,
            max_idle,
            idle: (0..=crate::workers::count())
                .map(|_| Mutex::new(Vec::new()))
                .collect(),
        })
    }

    /// The idle stack of the worker this thread is, or the last one off the workers.
    fn stack(&self) -> &Mutex<Vec<Idle>> {
        let last = self.idle.len() - 1;
        &self.idle[crate::workers::current().map_or(last, |i| i.min(last))]
    }

    /// Closes the connections idle for longer than `idle_timeout` (the bottom of the stack).
    fn expire(&self, idle: &mut Vec<Idle>, now: Instant) {
        let fresh = idle
            .iter()
            .position(|c| now.saturating_duration_since(c.since) < self.idle_timeout)
            .unwrap_or(idle.len());
        idle.drain(..fresh);
    }

    /// Takes back a connection whose response ended whole.
    pub(super) fn put(&self, conn: Box<Connection>) {
        let now = Instant::now();
        let mut idle = self.stack().lock().unwrap_or_else(|p| p.into_inner());
        self.expire(&mut idle, now);
        if idle.len() >= self.max_idle {
            idle.remove(0);
        }
        idle.push(Idle { conn, since: now });
    }

    fn checkout(&self) -> Option<Box<Connection>> {
        let mut idle = self.stack().lock().unwrap_or_else(|p| p.into_inner());
        if idle.is_empty() {
            return None;
        }
        self.expire(&mut idle, Instant::now());
        while let Some(mut c) = idle.pop() {
            if c.conn.is_usable() {
                return Some(c.conn);
            }
        }
        None
    }

    async fn connect(&self, timeout: Duration) -> Result<Box<Connection>, PoolError> {
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
        let stream = match &self.tls {
            None => Stream::Tcp(stream),
            Some(tls) => Stream::Tls(Box::new(
                tokio::time::timeout_at(deadline, tls.handshake(stream))
                    .await
                    .map_err(|_| elapsed())?
                    .map_err(PoolError::Connect)?,
            )),
        };
        Ok(Box::new(Connection::new(stream)))
    }

    /// Sends a request on an idle connection or a new one. An idempotent request with a kept
    /// body that a reused connection dropped before any byte of an answer goes once more, on a
    /// new connection (the replica closed an idle connection as the request reached it).
    pub async fn send(
        self: &Arc<Self>,
        mut req: http::Request<RequestBody>,
        connect_timeout: Duration,
    ) -> Result<http::Response<UpstreamBody>, PoolError> {
        let mut retried = false;
        loop {
            let (conn, reused) = match (!retried).then(|| self.checkout()).flatten() {
                Some(c) => (c, true),
                None => (self.connect(connect_timeout).await?, false),
            };
            match conn.send(req, self, reused).await {
                Ok(resp) => return Ok(resp),
                Err(SendError::Retry(again)) => {
                    retried = true;
                    req = *again;
                }
                Err(SendError::Failed(e)) => {
                    // TLS 1.3 completes the client's handshake before the server judges
                    // the client certificate; its refusal arrives with the first read.
                    if !reused && let Some(why) = crate::tls::describe(&e) {
                        return Err(PoolError::Connect(why));
                    }
                    return Err(PoolError::Http(e));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncReadExt;

    async fn closed(s: &mut tokio::net::TcpStream) -> bool {
        let mut b = [0u8; 1];
        matches!(
            tokio::time::timeout(Duration::from_secs(2), s.read(&mut b)).await,
            Ok(Ok(0) | Err(_))
        )
    }

    #[tokio::test]
    async fn idle_connections_expire_and_a_full_stack_closes_its_oldest() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let pool = Pool::with_limits(&addr, None, Duration::from_millis(200), 2);
        let mut replica_side = Vec::new();
        for _ in 0..3 {
            let conn = pool.connect(Duration::from_secs(1)).await.unwrap();
            replica_side.push(listener.accept().await.unwrap().0);
            pool.put(conn);
        }
        assert!(closed(&mut replica_side[0]).await, "the oldest is closed");
        let mut b = [0u8; 1];
        let newest = tokio::time::timeout(Duration::from_millis(50), replica_side[2].read(&mut b));
        assert!(newest.await.is_err(), "the newest stays open");

        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(pool.checkout().is_none(), "both expired");
        for s in &mut replica_side[1..] {
            assert!(closed(s).await, "an expired connection is closed");
        }
    }
}
