//! The Redis connection shared by every request: one multiplexed connection to a server (or a
//! Redis Cluster), so concurrent commands are pipelined on it. It reconnects by itself; until it
//! has, commands fail at once and the caller falls back.
//!
//! `redis://HOST:PORT/DB` names one server; `redis+cluster://HOST:PORT,HOST:PORT` names cluster
//! seed nodes.

use arc_swap::ArcSwapOption;
use redis::aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig};
use redis::cluster::ClusterClient;
use redis::cluster_async::ClusterConnection;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Why a Redis command could not be answered.
#[derive(Debug, thiserror::Error)]
pub enum RedisError {
    /// No connection yet (Redis down or still connecting).
    #[error("not connected to Redis")]
    NotConnected,
    /// A recent command failed; Redis is given a moment before it is tried again.
    #[error("Redis failed moments ago; not retried yet")]
    Down,
    /// No answer within the configured timeout.
    #[error("Redis did not answer within {0:?}")]
    Timeout(Duration),
    /// Redis or the connection reported an error.
    #[error(transparent)]
    Command(#[from] redis::RedisError),
}

/// How to reach Redis.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RedisTarget {
    /// One server.
    Single(String),
    /// Cluster seed nodes, each `redis://HOST:PORT`.
    Cluster(Vec<String>),
}

impl RedisTarget {
    /// Parses a config URL, or says what is allowed.
    pub fn parse(url: &str) -> Result<RedisTarget, String> {
        let allowed = "write redis://HOST:PORT/DB or redis+cluster://HOST:PORT,HOST:PORT";
        if let Some(nodes) = url.strip_prefix("redis+cluster://") {
            let nodes: Vec<String> = nodes
                .trim_end_matches('/')
                .split(',')
                .map(|n| format!("redis://{}", n.trim()))
                .collect();
            for n in &nodes {
                redis::Client::open(n.as_str())
                    .map_err(|e| format!("invalid cluster node {n:?} ({e}): {allowed}"))?;
            }
            return Ok(RedisTarget::Cluster(nodes));
        }
        if !url.starts_with("redis://") && !url.starts_with("unix://") {
            return Err(format!("invalid Redis URL {url:?}: {allowed}"));
        }
        redis::Client::open(url)
            .map_err(|e| format!("invalid Redis URL {url:?} ({e}): {allowed}"))?;
        Ok(RedisTarget::Single(url.to_owned()))
    }
}

/// How long Redis counts as down after a failed command.
pub const BACKOFF: Duration = Duration::from_millis(250);

struct Health {
    epoch: std::time::Instant,
    down_until_ms: AtomicU64,
}

impl Health {
    fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    /// Whether a command may go to Redis now; past a backoff, one caller wins the probe.
    fn may_try(&self) -> bool {
        let until = self.down_until_ms.load(Ordering::Relaxed);
        if until == 0 {
            return true;
        }
        let now = self.now_ms();
        now >= until
            && self
                .down_until_ms
                .compare_exchange(
                    until,
                    now + BACKOFF.as_millis() as u64,
                    Ordering::Relaxed,
                    Ordering::Relaxed,
                )
                .is_ok()
    }

    fn down(&self) {
        self.down_until_ms.store(
            self.now_ms() + BACKOFF.as_millis() as u64,
            Ordering::Relaxed,
        );
    }

    fn up(&self) {
        if self.down_until_ms.load(Ordering::Relaxed) != 0 {
            self.down_until_ms.store(0, Ordering::Relaxed);
        }
    }
}

#[derive(Clone)]
enum Conn {
    Single(ConnectionManager),
    Cluster(Arc<ArcSwapOption<ClusterConnection>>),
}

/// A shared, self-reconnecting Redis connection with a per-command timeout.
///
/// After a command fails or times out, Redis counts as down for [`BACKOFF`]: commands fail at
/// once instead of each waiting out the timeout, and then a single command probes it again.
#[derive(Clone)]
pub struct Redis {
    conn: Conn,
    timeout: Duration,
    health: Arc<Health>,
    /// Where it points (compared on reload to keep the connection).
    pub target: RedisTarget,
}

impl Redis {
    /// Starts connecting in the background; never fails for an unreachable server.
    pub fn connect(target: &RedisTarget, timeout: Duration) -> Result<Redis, RedisError> {
        let conn = match target {
            RedisTarget::Single(url) => {
                let client = redis::Client::open(url.as_str())?;
                let config = ConnectionManagerConfig::new()
                    .set_connection_timeout(Some(Duration::from_secs(1)))
                    .set_response_timeout(Some(timeout.max(Duration::from_millis(1))))
                    .set_number_of_retries(2)
                    .set_max_delay(Duration::from_millis(500));
                Conn::Single(ConnectionManager::new_lazy_with_config(client, config)?)
            }
            RedisTarget::Cluster(nodes) => {
                let client = ClusterClient::builder(nodes.clone())
                    .connection_timeout(Duration::from_secs(1))
                    .response_timeout(timeout.max(Duration::from_millis(1)))
                    .build()?;
                let slot = Arc::new(ArcSwapOption::empty());
                let fill = slot.clone();
                tokio::spawn(async move {
                    loop {
                        match client.get_async_connection().await {
                            Ok(c) => {
                                fill.store(Some(Arc::new(c)));
                                return;
                            }
                            Err(e) => {
                                tracing::warn!(error = %e, "cannot connect to Redis Cluster; retrying");
                                tokio::time::sleep(Duration::from_secs(1)).await;
                            }
                        }
                    }
                });
                Conn::Cluster(slot)
            }
        };
        Ok(Redis {
            conn,
            timeout,
            health: Arc::new(Health {
                epoch: std::time::Instant::now(),
                down_until_ms: AtomicU64::new(0),
            }),
            target: target.clone(),
        })
    }

    /// The per-command timeout.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// Runs a script with its keys and arguments, within the timeout.
    pub async fn run_script<T: redis::FromRedisValue>(
        &self,
        script: &redis::Script,
        keys: &[&[u8]],
        args: &[u64],
    ) -> Result<T, RedisError> {
        let mut inv = script.prepare_invoke();
        for k in keys {
            inv.key(*k);
        }
        for a in args {
            inv.arg(*a);
        }
        let mut conn = self.handle()?;
        self.timed(inv.invoke_async(&mut conn)).await
    }

    async fn timed<T>(
        &self,
        f: impl Future<Output = redis::RedisResult<T>>,
    ) -> Result<T, RedisError> {
        if !self.health.may_try() {
            return Err(RedisError::Down);
        }
        let r = match tokio::time::timeout(self.timeout, f).await {
            Ok(r) => r.map_err(RedisError::from),
            Err(_) => Err(RedisError::Timeout(self.timeout)),
        };
        match &r {
            Ok(_) => self.health.up(),
            Err(RedisError::Command(e))
                if e.kind() == redis::ErrorKind::Server(redis::ServerErrorKind::ResponseError) => {}
            Err(_) => self.health.down(),
        }
        r
    }

    /// Runs any command, within the timeout.
    pub async fn query<T: redis::FromRedisValue>(&self, cmd: &redis::Cmd) -> Result<T, RedisError> {
        let mut conn = self.handle()?;
        self.timed(cmd.query_async(&mut conn)).await
    }

    /// A handle on the connection for one command (cheap: both kinds are shared handles).
    fn handle(&self) -> Result<Handle, RedisError> {
        match &self.conn {
            Conn::Single(m) => Ok(Handle::Single(m.clone())),
            Conn::Cluster(slot) => slot
                .load_full()
                .map(|c| Handle::Cluster((*c).clone()))
                .ok_or(RedisError::NotConnected),
        }
    }
}

/// One command's connection: a server's or a cluster's, behind one `ConnectionLike`.
enum Handle {
    Single(ConnectionManager),
    Cluster(ClusterConnection),
}

impl ConnectionLike for Handle {
    fn req_packed_command<'a>(
        &'a mut self,
        cmd: &'a redis::Cmd,
    ) -> redis::RedisFuture<'a, redis::Value> {
        match self {
            Handle::Single(c) => c.req_packed_command(cmd),
            Handle::Cluster(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a redis::Pipeline,
        offset: usize,
        count: usize,
    ) -> redis::RedisFuture<'a, Vec<redis::Value>> {
        match self {
            Handle::Single(c) => c.req_packed_commands(pipeline, offset, count),
            Handle::Cluster(c) => c.req_packed_commands(pipeline, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Handle::Single(c) => c.get_db(),
            Handle::Cluster(c) => c.get_db(),
        }
    }
}
