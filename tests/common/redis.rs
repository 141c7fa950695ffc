//! A real `redis-server` started by the test on its own loopback port, killed on drop, and
//! restartable on the same port (to test Redis vanishing and coming back).

use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A running (or stopped) redis-server owned by one test.
pub struct RedisServer {
    child: Option<Child>,
    /// Its address.
    pub addr: SocketAddr,
    dir: tempfile::TempDir,
    /// Arguments after the common ones (cluster mode).
    extra: Vec<&'static str>,
}

impl RedisServer {
    /// Starts redis-server on a free port and waits until it answers PING.
    pub fn start() -> RedisServer {
        RedisServer::start_with(Vec::new())
    }

    fn start_with(extra: Vec<&'static str>) -> RedisServer {
        let port = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").expect("pick a port");
            l.local_addr().expect("addr").port()
        };
        let mut r = RedisServer {
            child: None,
            addr: SocketAddr::from(([127, 0, 0, 1], port)),
            dir: tempfile::tempdir().expect("temp dir"),
            extra,
        };
        r.restart();
        r
    }

    /// `redis://127.0.0.1:PORT/0`.
    pub fn url(&self) -> String {
        format!("redis://{}/0", self.addr)
    }

    /// Kills the server at once (SIGKILL), as a crash would.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts the server again on the same port (after [`RedisServer::kill`]).
    pub fn restart(&mut self) {
        self.kill();
        let child = Command::new("redis-server")
            .args([
                "--bind",
                "127.0.0.1",
                "--port",
                &self.addr.port().to_string(),
            ])
            .args(["--save", "", "--appendonly", "no", "--protected-mode", "no"])
            .args(&self.extra)
            .arg("--dir")
            .arg(self.dir.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server must be installed (apt-get install -y redis-server)");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.ping().is_err() {
            assert!(
                Instant::now() < deadline,
                "redis-server did not answer PING within 10 s"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits up to 5 s for `key` to exist, failing the test with the keys there if it does not.
    pub async fn wait_key(&self, key: &str) {
        let deadline = Instant::now() + Duration::from_secs(5);
        while !self
            .command(&["EXISTS", key])
            .unwrap_or_default()
            .starts_with(":1")
        {
            assert!(
                Instant::now() < deadline,
                "{key:?} is not in Redis; keys there: {:?}",
                self.command(&["KEYS", "*"])
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Sends one command in RESP and returns the raw reply.
    pub fn command(&self, args: &[&str]) -> std::io::Result<String> {
        use std::io::{Read, Write};
        let mut s = std::net::TcpStream::connect_timeout(&self.addr, Duration::from_millis(500))?;
        s.set_read_timeout(Some(Duration::from_secs(2)))?;
        let mut req = format!("*{}\r\n", args.len());
        for a in args {
            req.push_str(&format!("${}\r\n{a}\r\n", a.len()));
        }
        s.write_all(req.as_bytes())?;
        let mut buf = [0u8; 4096];
        let n = s.read(&mut buf)?;
        Ok(String::from_utf8_lossy(&buf[..n]).into_owned())
    }

    fn ping(&self) -> std::io::Result<()> {
        let reply = self.command(&["PING"])?;
        if reply.starts_with("+PONG") {
            Ok(())
        } else {
            Err(std::io::Error::other(reply))
        }
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A Redis Cluster of three masters (no replicas), each a redis-server of its own on a free port.
pub struct RedisCluster {
    /// The nodes.
    pub nodes: Vec<RedisServer>,
}

impl RedisCluster {
    /// Starts three cluster-mode nodes, joins them with `redis-cli --cluster create` and waits
    /// until every node reports `cluster_state:ok`.
    pub fn start() -> RedisCluster {
        let nodes: Vec<RedisServer> = (0..3)
            .map(|_| RedisServer::start_with(vec!["--cluster-enabled", "yes"]))
            .collect();
        let status = Command::new("redis-cli")
            .arg("--cluster")
            .arg("create")
            .args(nodes.iter().map(|n| n.addr.to_string()))
            .args(["--cluster-replicas", "0", "--cluster-yes"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .expect("redis-cli must be installed (it comes with redis-server)");
        assert!(status.success(), "redis-cli --cluster create failed");
        let deadline = Instant::now() + Duration::from_secs(10);
        while !nodes.iter().all(|n| {
            n.command(&["CLUSTER", "INFO"])
                .is_ok_and(|r| r.contains("cluster_state:ok"))
        }) {
            assert!(
                Instant::now() < deadline,
                "the cluster did not reach cluster_state:ok within 10 s"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        RedisCluster { nodes }
    }

    /// Waits up to 5 s for `key` to exist on the node that owns it (the others answer MOVED).
    pub async fn wait_key(&self, key: &str) {
        let deadline = Instant::now() + Duration::from_secs(5);
        while !self.nodes.iter().any(|n| {
            n.command(&["EXISTS", key])
                .is_ok_and(|r| r.starts_with(":1"))
        }) {
            assert!(Instant::now() < deadline, "{key:?} is in no cluster node");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// `redis+cluster://HOST:PORT,HOST:PORT` naming two of the three nodes as seeds.
    pub fn url(&self) -> String {
        format!(
            "redis+cluster://{},{}",
            self.nodes[0].addr, self.nodes[1].addr
        )
    }
}
