//! The command line: `check` (summary, every error as file:line:col: key: message), `run` with a
//! bad file, `--version`, `--help`.

mod common;

use common::*;
use std::path::PathBuf;
use std::process::{Command, Output};
use std::time::Duration;

struct Checked {
    code: i32,
    stdout: String,
    stderr: String,
    file: String,
}

fn write(dir: &tempfile::TempDir, name: &str, text: &str) -> PathBuf {
    let path = dir.path().join(name);
    std::fs::write(&path, text).unwrap();
    path
}

fn output(o: Output, file: String) -> Checked {
    Checked {
        code: o.status.code().expect("exit code"),
        stdout: String::from_utf8_lossy(&o.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&o.stderr).into_owned(),
        file,
    }
}

fn check_env(text: &str, env: &[(&str, &str)]) -> Checked {
    let dir = tempfile::tempdir().unwrap();
    let path = write(&dir, "palisade.toml", text);
    let mut cmd = Command::new(BIN);
    cmd.arg("check").arg("-c").arg(&path);
    for (k, v) in env {
        cmd.env(k, v);
    }
    output(
        cmd.output().expect("run palisade check"),
        path.display().to_string(),
    )
}

fn check(text: &str) -> Checked {
    check_env(text, &[])
}

/// `line:col` (1-based) of the first occurrence of `needle` in `text`.
fn pos(text: &str, needle: &str) -> String {
    pos_at(
        text,
        text.find(needle)
            .unwrap_or_else(|| panic!("{needle:?} not in the config")),
    )
}

/// `line:col` (1-based) of byte offset `at` in `text`.
fn pos_at(text: &str, at: usize) -> String {
    let before = &text[..at];
    let line = before.matches('\n').count() + 1;
    let col = before.len() - before.rfind('\n').map_or(0, |i| i + 1) + 1;
    format!("{line}:{col}")
}

impl Checked {
    /// Asserts an error line `file:LINE:COL: key: ...message...` where LINE:COL is where
    /// `needle` starts in `text`.
    fn has_error(&self, text: &str, needle: &str, key: &str, message: &str) {
        let prefix = format!("error: {}:{}: {key}: ", self.file, pos(text, needle));
        let line = self
            .stderr
            .lines()
            .find(|l| l.starts_with(&prefix))
            .unwrap_or_else(|| panic!("no error line starting {prefix:?} in:\n{}", self.stderr));
        assert!(line.contains(message), "{line:?} does not say {message:?}");
    }

    fn failed_with(&self, n: usize) {
        assert_eq!(
            self.code, 1,
            "stdout:\n{}\nstderr:\n{}",
            self.stdout, self.stderr
        );
        let summary = format!("{n} error{} found", if n == 1 { "" } else { "s" });
        assert!(
            self.stderr.contains(&summary),
            "expected {summary:?} in:\n{}",
            self.stderr
        );
        assert_eq!(
            self.stderr
                .lines()
                .filter(|l| l.starts_with("error: "))
                .count(),
            n,
            "{}",
            self.stderr
        );
    }
}

const GOOD: &str = r#"
[server]
listen = ["127.0.0.1:0"]
max_connections = 100

[admin]
listen = "127.0.0.1:0"

[upstreams.legacy]
replicas = ["http://127.0.0.1:18081", "http://127.0.0.1:18082"]
balance = "least_requests"

[[routes]]
name = "products"
match = { host = "api.example.com", path_prefix = "/products", methods = ["GET", "HEAD"] }
upstream = "legacy"

[[routes]]
name = "default"
upstream = "legacy"
"#;

#[test]
fn check_accepts_a_good_file_and_prints_a_summary() {
    let c = check(GOOD);
    assert_eq!(c.code, 0, "{}", c.stderr);
    for want in [
        "listeners: 127.0.0.1:0",
        "max 100 connections",
        "routes:",
        "products",
        "api.example.com/products [GET,HEAD] -> legacy",
        "default",
        "upstreams:",
        "legacy",
        "2 replicas, least_requests",
        "http://127.0.0.1:18081 http://127.0.0.1:18082",
        "the configuration is valid",
    ] {
        assert!(
            c.stdout.contains(want),
            "{want:?} missing from:\n{}",
            c.stdout
        );
    }
}

#[test]
fn check_reports_every_semantic_error_with_its_position() {
    let text = r#"[server]
listen = ["127.0.0.1:0", "nope"]
max_connections = 0
workers = -1

[upstreams.u]
replicas = ["ftp://x:1"]

[[routes]]
name = "a"
upstream = "missing"

[[routes]]
name = "a"
match = { path_prefix = "/b" }
upstream = "u"
"#;
    let c = check(text);
    c.failed_with(6);
    c.has_error(
        text,
        "\"nope\"",
        "server.listen[1]",
        "invalid address \"nope\": write IP:PORT",
    );
    c.has_error(
        text,
        "0\nworkers",
        "server.max_connections",
        "must be a whole number from 1 to 1000000, not 0",
    );
    c.has_error(
        text,
        "-1",
        "server.workers",
        "must be a whole number from 1 to 1024, not -1",
    );
    c.has_error(
        text,
        "\"ftp://x:1\"",
        "upstreams.u.replicas[0]",
        "write http://HOST:PORT",
    );
    c.has_error(
        text,
        "\"missing\"",
        "routes[0].upstream",
        "unknown upstream \"missing\": defined upstreams are [\"u\"]",
    );
    let second = format!(
        "error: {}:{}: routes[1].name: ",
        c.file,
        pos_at(text, text.rfind("\"a\"").unwrap())
    );
    assert!(
        c.stderr.contains(&second),
        "{second:?} not in:\n{}",
        c.stderr
    );
    assert!(
        c.stderr
            .contains("route name \"a\" is already used by routes[0]"),
        "{}",
        c.stderr
    );
}

#[test]
fn check_reports_duplicate_route_names_at_the_second_name() {
    let text = format!(
        "{GOOD}\n[[routes]]\nname = \"products\"\nmatch = {{ path_prefix = \"/other\" }}\nupstream = \"legacy\"\n"
    );
    let c = check(&text);
    c.failed_with(1);
    let prefix = format!(
        "error: {}:{}: routes[2].name: ",
        c.file,
        pos_at(&text, text.rfind("\"products\"").unwrap())
    );
    assert!(
        c.stderr.contains(&prefix),
        "{prefix:?} not in:\n{}",
        c.stderr
    );
    assert!(
        c.stderr
            .contains("is already used by routes[0]; names must be unique"),
        "{}",
        c.stderr
    );
}

#[test]
fn check_reports_two_routes_with_the_same_host_prefix_and_method() {
    let text = r#"[upstreams.u]
replicas = ["http://127.0.0.1:1"]

[[routes]]
name = "a"
match = { host = "x.example.com", path_prefix = "/p", methods = ["GET"] }
upstream = "u"

[[routes]]
name = "b"
match = { host = "x.example.com", path_prefix = "/p", methods = ["POST", "GET"] }
upstream = "u"

[[routes]]
name = "c"
match = { host = "x.example.com", path_prefix = "/p", methods = ["DELETE"] }
upstream = "u"
"#;
    let c = check(text);
    c.failed_with(1);
    c.has_error(
        text,
        "{ host = \"x.example.com\", path_prefix = \"/p\", methods = [\"POST\"",
        "routes[1].match",
        "routes[0] (\"a\") already matches host x.example.com, path prefix \"/p\" for the same methods",
    );
}

#[test]
fn check_reports_an_unknown_key_with_the_allowed_keys() {
    let text = "[server]\nlisten = [\"127.0.0.1:0\"]\nlisten_port = 8080\n";
    let c = check(text);
    c.failed_with(1);
    c.has_error(
        text,
        "listen_port",
        "server.listen_port",
        "unknown field `listen_port`, expected one of `listen`, `trusted_proxies`, `header_read_timeout`",
    );
    let text = "[upstreams.u]\nreplicas = [\"http://127.0.0.1:1\"]\n\n[[routes]]\nname = \"a\"\nupstream = \"u\"\nmatch = { path = \"/x\" }\n";
    let c = check(text);
    c.failed_with(1);
    assert!(
        c.stderr
            .contains("unknown field `path`, expected one of `host`, `path_prefix`, `methods`"),
        "{}",
        c.stderr
    );
    assert!(c.stderr.contains(&format!("{}:7:", c.file)), "{}", c.stderr);
}

#[test]
fn check_reports_a_bad_duration() {
    let text = "[server]\nidle_timeout = \"5 fortnights\"\n";
    let c = check(text);
    c.failed_with(1);
    c.has_error(
        text,
        "\"5 fortnights\"",
        "server.idle_timeout",
        "invalid duration \"5 fortnights\"",
    );
    assert!(c.stderr.contains("like \"250ms\", \"30s\""), "{}", c.stderr);
}

#[test]
fn check_reports_a_bad_listen_address_and_replica_url() {
    let text = "[server]\nlisten = [\"localhost\"]\n\n[admin]\nlisten = \"127.0.0.1\"\n\n[upstreams.u]\nreplicas = [\"http://127.0.0.1:1/api\", \"10.0.0.1:80\"]\n\n[[routes]]\nname = \"a\"\nupstream = \"u\"\n";
    let c = check(text);
    c.failed_with(4);
    c.has_error(
        text,
        "\"localhost\"",
        "server.listen[0]",
        "invalid address \"localhost\"",
    );
    c.has_error(
        text,
        "\"127.0.0.1\"\n",
        "admin.listen",
        "invalid address \"127.0.0.1\"",
    );
    c.has_error(
        text,
        "\"http://127.0.0.1:1/api\"",
        "upstreams.u.replicas[0]",
        "has a path or query",
    );
    c.has_error(
        text,
        "\"10.0.0.1:80\"",
        "upstreams.u.replicas[1]",
        "write http://HOST:PORT",
    );
}

#[test]
fn check_expands_environment_variables() {
    let text = "[admin]\nlisten = \"127.0.0.1:0\"\ntoken = \"${PALISADE_TEST_TOKEN_XYZ}\"\n\n[upstreams.u]\nreplicas = [\"http://${PALISADE_TEST_HOST_XYZ}:8080\"]\n\n[[routes]]\nname = \"a\"\nupstream = \"u\"\n";
    let c = check(text);
    c.failed_with(1);
    c.has_error(
        text,
        "\"${PALISADE_TEST_TOKEN_XYZ}\"",
        "admin.token",
        "environment variable PALISADE_TEST_TOKEN_XYZ is not set (used as ${PALISADE_TEST_TOKEN_XYZ})",
    );
    let c = check_env(
        text,
        &[
            ("PALISADE_TEST_TOKEN_XYZ", "s3cret"),
            ("PALISADE_TEST_HOST_XYZ", "10.1.2.3"),
        ],
    );
    assert_eq!(c.code, 0, "{}", c.stderr);
    assert!(c.stdout.contains("(token required)"), "{}", c.stdout);
    assert!(c.stdout.contains("http://10.1.2.3:8080"), "{}", c.stdout);
}

#[test]
fn check_reports_bad_cache_values() {
    let text = "[cache]\nmemory = \"1KiB\"\n\n[upstreams.u]\nreplicas = [\"http://127.0.0.1:1\"]\n\n[[routes]]\nname = \"a\"\nupstream = \"u\"\ncache = { ttl = \"60s\", statuses = [206] }\n";
    let c = check(text);
    c.failed_with(2);
    c.has_error(
        text,
        "\"1KiB\"",
        "cache.memory",
        "must be from 1MiB to 1TiB",
    );
    c.has_error(
        text,
        "206]",
        "routes[0].cache.statuses[0]",
        "allowed are 200 to 599 except 206 and 304",
    );
}

#[test]
fn check_on_a_missing_file_fails() {
    let out = Command::new(BIN)
        .args(["check", "-c", "/nonexistent/palisade.toml"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("/nonexistent/palisade.toml") && err.contains("cannot read the config file"),
        "{err}"
    );
}

#[test]
fn version_and_help() {
    let out = Command::new(BIN).arg("--version").output().unwrap();
    assert!(out.status.success());
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        format!("palisade {}", env!("CARGO_PKG_VERSION"))
    );
    let out = Command::new(BIN).arg("--help").output().unwrap();
    assert!(out.status.success());
    let help = String::from_utf8_lossy(&out.stdout);
    for want in [
        "Examples:",
        "palisade check -c",
        "palisade run -c",
        "palisade demo",
        "check",
        "run",
    ] {
        assert!(help.contains(want), "{want:?} missing from --help:\n{help}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_with_a_bad_config_exits_1_and_a_good_one_serves() {
    bounded(30, async {
        let dir = tempfile::tempdir().unwrap();
        let text = "[server]\nlisten = [\"127.0.0.1:0\"]\nworkers = 0\n\n[upstreams.u]\nreplicas = [\"http://127.0.0.1:1\"]\n\n[[routes]]\nname = \"a\"\nupstream = \"nope\"\n";
        let path = write(&dir, "bad.toml", text);
        let out = tokio::time::timeout(
            Duration::from_secs(10),
            tokio::process::Command::new(BIN).arg("run").arg("-c").arg(&path).kill_on_drop(true).output(),
        )
        .await
        .expect("run with a bad config must exit at once")
        .unwrap();
        assert_eq!(out.status.code(), Some(1));
        let err = String::from_utf8_lossy(&out.stderr);
        let file = path.display().to_string();
        assert!(err.contains(&format!("error: {file}:3:11: server.workers: must be a whole number")), "{err}");
        assert!(err.contains(&format!("error: {file}:10:12: routes[0].upstream: unknown upstream \"nope\"")), "{err}");
        assert!(err.contains("2 errors found"), "{err}");

        // The same binary with a good file serves.
        let up = Upstream::start("u");
        let p = Palisade::start(&simple_config("", "", &[up.url()])).await;
        let r = get(&http1(), &p.url("/ok"), &[]).await;
        assert_eq!(r.status, 200);
        assert_eq!(r.json()["replica"], "u");
    })
    .await;
}

#[test]
fn check_names_every_bad_replica_health_key() {
    let text = r#"[upstreams.u]
replicas = ["http://127.0.0.1:1", "http://127.0.0.1:2"]
balance = "fastest"
hash_on = "header:X-User"
panic_threshold = "50%"
retry = { attempts = 0, on = ["connect", "418x"], budget = "0%", min_per_second = -1, max_body = "1GiB" }

[upstreams.u.health]
path = "health"
interval = "0s"
healthy_after = 0
unhealthy_after = 1000
expected_statuses = [200, "300-2", 700]

[upstreams.u.circuit_breaker]
consecutive_failures = 0
failure_rate = "0%"
min_requests = -3
window = "0ms"
open_for = "0s"
half_open_requests = 101
failure_on = ["reset"]

[upstreams.v]
replicas = ["http://127.0.0.1:3"]
balance = "consistent_hash"
hash_on = "cookie:session"
retry = { on = [] }

[upstreams.v.health]
interval = "1s"
timeout = "2s"
expected_statuses = []

[[routes]]
name = "a"
upstream = "u"
"#;
    let c = check(text);
    let errors: Vec<(&str, &str, &str)> = vec![
        (
            "\"fastest\"",
            "upstreams.u.balance",
            "allowed are \"round_robin\", \"least_requests\", \"p2c_ewma\" and \"consistent_hash\"",
        ),
        (
            "\"header:X-User\"",
            "upstreams.u.hash_on",
            "applies only to balance = \"consistent_hash\"",
        ),
        (
            "0, on",
            "upstreams.u.retry.attempts",
            "must be a whole number from 1 to 10, not 0",
        ),
        (
            "\"418x\"",
            "upstreams.u.retry.on[1]",
            "unknown outcome \"418x\": allowed are \"connect\", \"timeout\", \"error\", \"5xx\"",
        ),
        (
            "\"0%\", min",
            "upstreams.u.retry.budget",
            "must be greater than 0%",
        ),
        (
            "-1,",
            "upstreams.u.retry.min_per_second",
            "from 0 to 10000, not -1",
        ),
        (
            "\"1GiB\"",
            "upstreams.u.retry.max_body",
            "must be at most 16MiB",
        ),
        ("\"health\"", "upstreams.u.health.path", "starting with /"),
        (
            "\"0s\"\nhealthy",
            "upstreams.u.health.interval",
            "must be greater than 0s",
        ),
        (
            "0\nunhealthy",
            "upstreams.u.health.healthy_after",
            "from 1 to 100, not 0",
        ),
        (
            "1000\n",
            "upstreams.u.health.unhealthy_after",
            "from 1 to 100, not 1000",
        ),
        (
            "\"300-2\"",
            "upstreams.u.health.expected_statuses[1]",
            "a range like \"200-399\"",
        ),
        (
            "700]",
            "upstreams.u.health.expected_statuses[2]",
            "from 100 to 599",
        ),
        (
            "0\nfailure_rate",
            "upstreams.u.circuit_breaker.consecutive_failures",
            "from 1 to 1000, not 0",
        ),
        (
            "\"0%\"\nmin",
            "upstreams.u.circuit_breaker.failure_rate",
            "must be greater than 0%",
        ),
        (
            "-3",
            "upstreams.u.circuit_breaker.min_requests",
            "from 1 to 1000000, not -3",
        ),
        (
            "\"0ms\"",
            "upstreams.u.circuit_breaker.window",
            "must be greater than 0s",
        ),
        (
            "\"0s\"\nhalf",
            "upstreams.u.circuit_breaker.open_for",
            "must be greater than 0s",
        ),
        (
            "101",
            "upstreams.u.circuit_breaker.half_open_requests",
            "from 1 to 100, not 101",
        ),
        (
            "\"reset\"",
            "upstreams.u.circuit_breaker.failure_on[0]",
            "unknown outcome \"reset\"",
        ),
        (
            "\"cookie:session\"",
            "upstreams.v.hash_on",
            "allowed are \"client_ip\" and \"header:NAME\"",
        ),
        (
            "[] }",
            "upstreams.v.retry.on",
            "must name at least one outcome",
        ),
        (
            "\"2s\"",
            "upstreams.v.health.timeout",
            "must not be longer than the interval (1s)",
        ),
        (
            "[]\n\n[[routes]]",
            "upstreams.v.health.expected_statuses",
            "at least one status",
        ),
    ];
    c.failed_with(errors.len());
    for (needle, key, message) in errors {
        c.has_error(text, needle, key, message);
    }

    // Values that are not even of their type are reported by the reader, one at a time.
    let base = "[upstreams.u]\nreplicas = [\"http://127.0.0.1:1\"]\n";
    let routes = "\n[[routes]]\nname = \"a\"\nupstream = \"u\"\n";
    for (extra, needle, key, message) in [
        (
            "panic_threshold = \"lots\"\n",
            "\"lots\"",
            "upstreams.u.panic_threshold",
            "invalid share \"lots\"",
        ),
        (
            "retry = { budget = \"120%\" }\n",
            "\"120%\"",
            "upstreams.u.retry.budget",
            "from 0% to 100%",
        ),
        (
            "retry = { max_body = \"big\" }\n",
            "\"big\"",
            "upstreams.u.retry.max_body",
            "invalid size \"big\"",
        ),
        (
            "[upstreams.u.health]\ninterval = \"soon\"\n",
            "\"soon\"",
            "upstreams.u.health.interval",
            "invalid duration \"soon\"",
        ),
        (
            "[upstreams.u.health]\nexpected_statuses = [true]\n",
            "[true]",
            "upstreams.u.health.expected_statuses",
            "a status like 200 or a range",
        ),
        (
            "[upstreams.u.circuit_breaker]\nwindow = 10\n",
            "10",
            "upstreams.u.circuit_breaker.window",
            "",
        ),
        (
            "[upstreams.u.circuit_breaker]\nopen_after = 3\n",
            "open_after",
            "upstreams.u.circuit_breaker.open_after",
            "unknown field `open_after`",
        ),
    ] {
        let text = format!("{base}{extra}{routes}");
        let c = check(&text);
        c.failed_with(1);
        c.has_error(&text, needle, key, message);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_refuses_a_public_admin_listener_without_a_token() {
    bounded(30, async {
        let dir = tempfile::tempdir().unwrap();
        let text = "[server]\nlisten = [\"127.0.0.1:0\"]\n\n[admin]\nlisten = \"0.0.0.0:0\"\n\n[upstreams.u]\nreplicas = [\"http://127.0.0.1:1\"]\n\n[[routes]]\nname = \"a\"\nupstream = \"u\"\n";
        let path = write(&dir, "public-admin.toml", text);
        let out = tokio::time::timeout(
            Duration::from_secs(10),
            tokio::process::Command::new(BIN).arg("run").arg("-c").arg(&path).kill_on_drop(true).output(),
        )
        .await
        .expect("run must refuse at once")
        .unwrap();
        assert_eq!(out.status.code(), Some(1));
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains(&format!(
                "error: {}:5:10: admin.listen: 0.0.0.0:0 is not a loopback address, so admin.token is required",
                path.display()
            )),
            "{err}"
        );

        // With a token it starts, and the admin listener asks for it on everything but health.
        let with_token = text.replace("[admin]\n", "[admin]\ntoken = \"t0k\"\n");
        let good = write(&dir, "with-token.toml", &with_token);
        let out = Command::new(BIN).arg("check").arg("-c").arg(&good).output().unwrap();
        assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
    })
    .await;
}
