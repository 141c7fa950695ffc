//! The real `palisade` binary as a child process: config in a temp file, JSON log lines read
//! from stdout in a background thread, signals sent with `libc::kill`, killed on drop.

use serde_json::Value;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The path of the binary under test.
pub const BIN: &str = env!("CARGO_BIN_EXE_palisade");

/// A config with the public and admin listeners on ephemeral loopback ports, JSON logs, and
/// `server_extra` lines inside `[server]`; append upstreams and routes after it. It runs one
/// worker (the single-threaded runtime the load bench measures) unless `server_extra` sets
/// `workers` (the suites that load the proxy hardest run two, on the work-stealing runtime).
pub fn base_config(server_extra: &str) -> String {
    let workers = if server_extra.contains("workers") {
        ""
    } else {
        "workers = 1\n"
    };
    format!(
        "[server]\nlisten = [\"127.0.0.1:0\"]\n{workers}{server_extra}\n\n[admin]\nlisten = \"127.0.0.1:0\"\n\n[log]\nformat = \"json\"\nlevel = \"info\"\n\n"
    )
}

/// One upstream named `name` over `replicas` and one catch-all route `default` to it.
pub fn simple_config(server_extra: &str, upstream_extra: &str, replicas: &[String]) -> String {
    let list: Vec<String> = replicas.iter().map(|r| format!("{r:?}")).collect();
    format!(
        "{}[upstreams.backend]\nreplicas = [{}]\n{upstream_extra}\n\n[[routes]]\nname = \"default\"\nupstream = \"backend\"\n",
        base_config(server_extra),
        list.join(", ")
    )
}

/// A running Palisade.
pub struct Palisade {
    child: Child,
    _dir: tempfile::TempDir,
    /// The config file it runs with.
    pub config_path: PathBuf,
    lines: Arc<Mutex<Vec<String>>>,
    stderr: Arc<Mutex<Vec<String>>>,
    /// The public listener.
    pub public: SocketAddr,
    /// The admin listener.
    pub admin: SocketAddr,
}

fn collect(r: impl std::io::Read + Send + 'static, into: Arc<Mutex<Vec<String>>>) {
    std::thread::spawn(move || {
        for line in BufReader::new(r).lines() {
            let Ok(line) = line else { break };
            into.lock().unwrap().push(line);
        }
    });
}

fn parse(line: &str) -> Option<Value> {
    serde_json::from_str(line).ok()
}

impl Palisade {
    /// Writes `config` to a temp file, runs `palisade run -c FILE` and waits (up to 20 s) for
    /// both listeners and "palisade started".
    pub async fn start(config: &str) -> Palisade {
        Self::start_with_env(config, &[]).await
    }

    /// [`Palisade::start`] with extra environment variables.
    pub async fn start_with_env(config: &str, env: &[(&str, &str)]) -> Palisade {
        let dir = tempfile::tempdir().expect("temp dir");
        let config_path = dir.path().join("palisade.toml");
        std::fs::write(&config_path, config).expect("write config");
        let mut cmd = Command::new(BIN);
        cmd.arg("run")
            .arg("-c")
            .arg(&config_path)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .env_remove("RUST_LOG");
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().expect("spawn palisade");
        let lines = Arc::new(Mutex::new(Vec::new()));
        let stderr = Arc::new(Mutex::new(Vec::new()));
        collect(child.stdout.take().unwrap(), lines.clone());
        collect(child.stderr.take().unwrap(), stderr.clone());
        let mut p = Palisade {
            child,
            _dir: dir,
            config_path,
            lines,
            stderr,
            public: SocketAddr::from(([0, 0, 0, 0], 0)),
            admin: SocketAddr::from(([0, 0, 0, 0], 0)),
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok(Some(status)) = p.child.try_wait() {
                panic!(
                    "palisade exited with {status} before starting\nstdout:\n{}\nstderr:\n{}",
                    p.stdout_text(),
                    p.stderr_text()
                );
            }
            let logs = p.logs();
            if logs.iter().any(|l| l["message"] == "palisade started") {
                let addr = |name: &str| -> SocketAddr {
                    let l = logs
                        .iter()
                        .find(|l| l["message"] == "listening" && l["listener"] == name)
                        .unwrap_or_else(|| panic!("no listening line for {name}"));
                    l["addr"].as_str().unwrap().parse().unwrap()
                };
                p.public = addr("public");
                p.admin = addr("admin");
                return p;
            }
            assert!(
                Instant::now() < deadline,
                "palisade did not start in 20 s\nstdout:\n{}\nstderr:\n{}",
                p.stdout_text(),
                p.stderr_text()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// The process id.
    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    /// `http://127.0.0.1:PORT` of the public listener, followed by `path`.
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.public)
    }

    /// Every stdout line so far.
    pub fn stdout_text(&self) -> String {
        self.lines.lock().unwrap().join("\n")
    }

    /// Every stderr line so far.
    pub fn stderr_text(&self) -> String {
        self.stderr.lock().unwrap().join("\n")
    }

    /// Every stdout line that is JSON, parsed.
    pub fn logs(&self) -> Vec<Value> {
        self.lines
            .lock()
            .unwrap()
            .iter()
            .filter_map(|l| parse(l))
            .collect()
    }

    /// The access-log lines so far.
    pub fn access_logs(&self) -> Vec<Value> {
        self.logs()
            .into_iter()
            .filter(|l| l["message"] == "access")
            .collect()
    }

    /// Waits up to `timeout` for a log line matching `pred`, and returns it.
    pub async fn wait_log(&self, timeout: Duration, pred: impl Fn(&Value) -> bool) -> Value {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(l) = self.logs().into_iter().find(|l| pred(l)) {
                return l;
            }
            assert!(
                Instant::now() < deadline,
                "no matching log line within {timeout:?}; stdout:\n{}",
                self.stdout_text()
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Waits up to `timeout` until at least `n` log lines match `pred`.
    pub async fn wait_log_count(&self, timeout: Duration, n: usize, pred: impl Fn(&Value) -> bool) {
        let deadline = Instant::now() + timeout;
        loop {
            let count = self.logs().iter().filter(|l| pred(l)).count();
            if count >= n {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "only {count} of {n} matching log lines within {timeout:?}; stdout:\n{}",
                self.stdout_text()
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Sends a signal.
    pub fn signal(&self, sig: i32) {
        let rc = unsafe { libc::kill(self.pid(), sig) };
        assert_eq!(rc, 0, "kill({}, {sig}) failed", self.pid());
    }

    /// Replaces the config file atomically (write + rename), as deploy tools do.
    pub fn write_config(&self, config: &str) {
        let tmp = self.config_path.with_extension("toml.new");
        std::fs::write(&tmp, config).expect("write config");
        std::fs::rename(&tmp, &self.config_path).expect("rename config");
    }

    /// How many reloads the log shows so far: (installed, rejected lines).
    pub fn reload_counts(&self) -> (usize, usize) {
        (
            self.count_logs(|l| l["message"] == "config reloaded"),
            self.count_logs(is_rejection),
        )
    }

    /// Replaces the config file atomically (write + rename), sends SIGHUP and waits for the
    /// reload's outcome line. Returns it ("config reloaded" or the first rejection line).
    pub async fn reload(&self, config: &str) -> Value {
        let before_ok = self.count_logs(|l| l["message"] == "config reloaded");
        let before_err = self.count_logs(is_rejection);
        self.write_config(config);
        self.signal(libc::SIGHUP);
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let logs = self.logs();
            let ok: Vec<&Value> = logs
                .iter()
                .filter(|l| l["message"] == "config reloaded")
                .collect();
            if ok.len() > before_ok {
                return ok[before_ok].clone();
            }
            let err: Vec<&Value> = logs.iter().filter(|l| is_rejection(l)).collect();
            if err.len() > before_err {
                return err[before_err].clone();
            }
            assert!(
                Instant::now() < deadline,
                "no reload outcome within 10 s; stdout:\n{}",
                self.stdout_text()
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    fn count_logs(&self, pred: impl Fn(&Value) -> bool) -> usize {
        self.logs().iter().filter(|l| pred(l)).count()
    }

    /// Sends SIGTERM and waits up to `timeout` for the exit status.
    pub async fn terminate(&mut self, timeout: Duration) -> ExitStatus {
        self.signal(libc::SIGTERM);
        self.wait_exit(timeout).await
    }

    /// Waits up to `timeout` for the process to exit.
    pub async fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "palisade did not exit within {timeout:?}; stdout:\n{}",
                self.stdout_text()
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Whether the process is still running.
    pub fn running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    fn proc_status_kib(&self, field: &str) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid()))
            .expect("read /proc status");
        status
            .lines()
            .find_map(|l| l.strip_prefix(field))
            .and_then(|v| {
                v.trim_start_matches(':')
                    .trim()
                    .trim_end_matches("kB")
                    .trim()
                    .parse()
                    .ok()
            })
            .unwrap_or_else(|| panic!("{field} not in /proc/PID/status"))
    }

    /// Resident memory now, in bytes (VmRSS).
    pub fn rss(&self) -> u64 {
        self.proc_status_kib("VmRSS") * 1024
    }

    /// Peak resident memory so far, in bytes (VmHWM).
    pub fn peak_rss(&self) -> u64 {
        self.proc_status_kib("VmHWM") * 1024
    }

    /// GET `path` on the admin listener: status and body text.
    pub async fn admin_get(&self, path: &str) -> (u16, String) {
        let r = super::client::get(
            &super::client::http1(),
            &format!("http://{}{path}", self.admin),
            &[],
        )
        .await;
        (r.status.as_u16(), r.text())
    }

    /// `method path` on the admin listener with an optional Bearer token and body.
    pub async fn admin_request(
        &self,
        method: http::Method,
        path: &str,
        token: Option<&str>,
        body: &str,
    ) -> super::client::Reply {
        let mut req = http::Request::builder()
            .method(method)
            .uri(format!("http://{}{path}", self.admin));
        if let Some(t) = token {
            req = req.header("authorization", format!("Bearer {t}"));
        }
        let req = req
            .body(super::client::full(body.to_owned()))
            .expect("admin request");
        super::client::send(&super::client::http1(), req).await
    }

    /// The /metrics text when the admin listener needs `token`.
    pub async fn metrics_with(&self, token: &str) -> String {
        let r = self
            .admin_request(http::Method::GET, "/metrics", Some(token), "")
            .await;
        assert_eq!(r.status, 200, "/metrics: {}", r.text());
        r.text()
    }

    /// The /metrics text.
    pub async fn metrics(&self) -> String {
        let (status, body) = self.admin_get("/metrics").await;
        assert_eq!(status, 200, "/metrics: {body}");
        body
    }
}

fn is_rejection(l: &Value) -> bool {
    l["message"] == "config reload rejected; keeping the running config"
}

impl Drop for Palisade {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `palisade_config_reloads_total` in a scrape: (result="ok", result="error").
pub fn reload_totals(text: &str) -> (Option<f64>, Option<f64>) {
    let total = |result| metric_value(text, "palisade_config_reloads_total", &[("result", result)]);
    (total("ok"), total("error"))
}

/// The value of one sample in a Prometheus text page: the line starting with `name{` whose
/// labels include every `k="v"` of `labels`.
pub fn metric_value(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    text.lines().filter(|l| !l.starts_with('#')).find_map(|l| {
        let (series, value) = l.rsplit_once(' ')?;
        let (n, rest) = match series.split_once('{') {
            Some((n, rest)) => (n, rest),
            None => (series, ""),
        };
        if n != name {
            return None;
        }
        if labels
            .iter()
            .all(|(k, v)| rest.contains(&format!("{k}=\"{v}\"")))
        {
            value.parse().ok()
        } else {
            None
        }
    })
}
