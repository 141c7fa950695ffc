//! `palisade explain`: the route and near misses, 404 and 405, cache and rate-limit keys equal
//! to the keys a running proxy writes to Redis, client identity through trusted proxies,
//! balancer picks equal to the running proxy's, config errors (exit 1), bad arguments (exit 2),
//! and that explain connects nowhere.

mod common;

use common::*;
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

struct Explained {
    code: i32,
    stdout: String,
    stderr: String,
    file: String,
}

fn explain_in(dir: &tempfile::TempDir, config: &str, args: &[&str]) -> Explained {
    let path: PathBuf = dir.path().join("palisade.toml");
    std::fs::write(&path, config).unwrap();
    let o = Command::new(BIN)
        .arg("explain")
        .arg("-c")
        .arg(&path)
        .args(args)
        .env_remove("PALISADE_CONFIG")
        .output()
        .expect("run palisade explain");
    Explained {
        code: o.status.code().expect("exit code"),
        stdout: String::from_utf8_lossy(&o.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&o.stderr).into_owned(),
        file: path.display().to_string(),
    }
}

fn explain(config: &str, args: &[&str]) -> Explained {
    let dir = tempfile::tempdir().unwrap();
    explain_in(&dir, config, args)
}

impl Explained {
    fn ok(&self) -> &Self {
        assert_eq!(
            self.code, 0,
            "stdout:\n{}\nstderr:\n{}",
            self.stdout, self.stderr
        );
        self
    }

    fn says(&self, text: &str) -> &Self {
        assert!(
            self.stdout.contains(text),
            "{text:?} not in:\n{}",
            self.stdout
        );
        self
    }

    fn does_not_say(&self, text: &str) -> &Self {
        assert!(
            !self.stdout.contains(text),
            "{text:?} should not be in:\n{}",
            self.stdout
        );
        self
    }

    /// The value of `label` (e.g. "  key") within the section whose first line starts with
    /// `section` (e.g. "rate limit").
    fn field(&self, section: &str, label: &str) -> String {
        let mut lines = self.stdout.lines().skip_while(|l| !l.starts_with(section));
        let first = lines
            .next()
            .unwrap_or_else(|| panic!("no {section:?} section in:\n{}", self.stdout));
        std::iter::once(first)
            .chain(lines.take_while(|l| !l.is_empty()))
            .find(|l| l.len() > 12 && l[..12].trim_end() == label)
            .map(|l| l[12..].to_owned())
            .unwrap_or_else(|| panic!("no {label:?} in {section:?} of:\n{}", self.stdout))
    }
}

const ROUTES: &str = r#"
[upstreams.legacy]
replicas = ["http://127.0.0.1:18081", "http://127.0.0.1:18082"]

[[routes]]
name = "products"
match = { host = "shop.example.com", path_prefix = "/products/", methods = ["GET", "HEAD"] }
upstream = "legacy"

[[routes]]
name = "products-v1"
match = { path_prefix = "/products" }
upstream = "legacy"

[[routes]]
name = "api-host"
match = { host = "api.example.com", path_prefix = "/" }
upstream = "legacy"

[[routes]]
name = "admin"
match = { path_prefix = "/admin", methods = ["GET", "HEAD"] }
upstream = "legacy"

[[routes]]
name = "orders"
match = { path_prefix = "/orders" }
upstream = "legacy"
"#;

#[test]
fn the_matching_route_and_why_the_nearest_others_do_not_match() {
    let e = explain(ROUTES, &["GET", "http://Shop.Example.com:8080/products/1"]);
    e.ok()
        .says("route       products  (host shop.example.com, prefix /products/, methods GET, HEAD)")
        .says("products-v1: prefix /products matches but /products/ is longer")
        .says("orders: path prefix /orders does not match /products/1")
        .says("admin: path prefix /admin does not match /products/1")
        .says("api-host: host api.example.com ≠ shop.example.com");
    // Same host or a matching prefix comes before a route that shares neither.
    let near = e.stdout.find("products-v1:").unwrap();
    assert!(near < e.stdout.find("api-host:").unwrap(), "{}", e.stdout);

    // Falling through: POST on shop.example.com is not products' method, so products-v1 takes it.
    explain(ROUTES, &["POST", "http://shop.example.com/products/1"])
        .ok()
        .says("route       products-v1  (any host, prefix /products, any method)")
        .says("products: method POST not in [GET, HEAD]");

    // A more specific host wins over a longer prefix.
    explain(ROUTES, &["GET", "/orders/7", "-H", "Host: api.example.com"])
        .ok()
        .says("route       api-host")
        .says("orders: prefix /orders matches, but host api.example.com is tried before any host");
}

#[test]
fn no_route_is_a_404_a_wrong_method_a_405_with_allow_and_a_refused_path_a_400() {
    let e = explain(ROUTES, &["GET", "http://shop.example.com/nothing"]);
    e.ok()
        .says("route       none matches shop.example.com/nothing")
        .says("answer      404 Not Found")
        .says("products: path prefix /products/ does not match /nothing")
        .says("api-host: host api.example.com ≠ shop.example.com")
        .does_not_say("upstream    ");

    explain(
        ROUTES,
        &["GET", "http://shop.example.com/products/%2e%2e/admin"],
    )
    .ok()
    .says("answer      400 Bad Request: dot segments (. or ..) in the request path")
    .does_not_say("route       ");

    let e = explain(ROUTES, &["DELETE", "http://other.org/admin/users"]);
    e.ok()
        .says("answer      405 Method Not Allowed, Allow: GET, HEAD")
        .says("admin: method DELETE not in [GET, HEAD]")
        .does_not_say("rate limit  ");
}

fn redis_config(redis: &RedisServer, replica: &str) -> String {
    format!(
        r#"{}
[cache]
redis = {{ url = "{redis}", timeout = "500ms" }}

[rate_limit]
redis = {{ url = "{redis}", timeout = "500ms" }}

[upstreams.legacy]
replicas = ["{replica}"]

[[routes]]
name = "items"
upstream = "legacy"
cache = {{ ttl = "60s", vary = ["Accept-Language"], query = {{ ignore = ["utm_source"] }} }}
rate_limit = {{ per = ["client_ip", "header:X-API-Key"], limit = "1/h", burst = 10 }}
"#,
        base_config("trusted_proxies = [\"127.0.0.1/32\"]"),
        redis = redis.url(),
    )
}

/// Undoes `std::ascii::escape_default`.
fn unescape(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' {
            match b[i + 1] {
                b'x' => {
                    out.push(u8::from_str_radix(&s[i + 2..i + 4], 16).unwrap());
                    i += 4;
                }
                b'n' => {
                    out.push(b'\n');
                    i += 2;
                }
                b't' => {
                    out.push(b'\t');
                    i += 2;
                }
                b'r' => {
                    out.push(b'\r');
                    i += 2;
                }
                c => {
                    out.push(c);
                    i += 2;
                }
            }
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).expect("the test's key bytes are ASCII")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cache_and_rate_limit_keys_are_the_ones_the_running_proxy_writes() {
    bounded(60, async {
        let redis = RedisServer::start();
        let up = Upstream::start("a");
        let config = redis_config(&redis, &up.url());
        let p = Palisade::start(&config).await;
        let url = p.url("/items/7?b=2&utm_source=mail&a=1");
        let headers = [
            ("accept-language", "fr"),
            ("x-api-key", "k1"),
            ("x-forwarded-for", "10.20.30.40"),
        ];
        let r = get(&http1(), &url, &headers).await;
        assert_eq!(r.status, 200);

        let mut args = vec!["GET", url.as_str(), "--client-ip", "127.0.0.1"];
        let hs: Vec<String> = headers.iter().map(|(k, v)| format!("{k}: {v}")).collect();
        for h in &hs {
            args.extend(["-H", h.as_str()]);
        }
        let e = explain(&config, &args);
        e.ok()
            .says("variant   accept-language: \"fr\"")
            .says("client    10.20.30.40: peer 127.0.0.1 is a trusted proxy (127.0.0.1/32)")
            .says("part      client_ip = 10.20.30.40")
            .says("part      header:x-api-key = \"k1\"");
        let cache_key = e.field("cache", "  key");
        assert_eq!(cache_key, "items:127.0.0.1/items/7?a=1&b=2", "{}", e.stdout);
        let redis_key = e.field("cache", "  redis key");
        assert_eq!(redis_key, format!("palisade:cache:v1:{cache_key}"));
        redis.wait_key(&redis_key).await;
        let limit_key = unescape(&e.field("rate limit", "  key"));
        assert!(limit_key.ends_with("4\x0a\x14\x1e\x28|k1"), "{limit_key:?}");
        redis.wait_key(&limit_key).await;
    })
    .await;
}

const LIMITED: &str = r#"
[server]
trusted_proxies = ["10.0.0.0/8"]

[upstreams.legacy]
replicas = ["http://127.0.0.1:18081"]

[[routes]]
name = "by-ip"
match = { path_prefix = "/ip" }
upstream = "legacy"
rate_limit = { per = "client_ip", limit = "100/min", burst = 20 }

[[routes]]
name = "by-key"
match = { path_prefix = "/key" }
upstream = "legacy"
rate_limit = { per = "header:X-API-Key", limit = "10/s", burst = 10, missing = "deny" }

[[routes]]
name = "by-key-or-ip"
match = { path_prefix = "/either" }
upstream = "legacy"
rate_limit = { per = "header:X-API-Key", limit = "10/s", burst = 10, missing = "client_ip" }
"#;

#[test]
fn rate_limit_client_ip_through_a_trusted_proxy_and_header_keys() {
    let e = explain(
        LIMITED,
        &[
            "GET",
            "http://h/ip",
            "-H",
            "X-Forwarded-For: 6.6.6.6, 203.0.113.5, 10.1.1.1",
            "--client-ip",
            "10.0.0.5",
        ],
    );
    e.ok()
        .says("rate limit  by-ip: 100/min, burst 20, per client_ip; RateLimit headers on")
        .says("client    203.0.113.5: peer 10.0.0.5 is a trusted proxy (10.0.0.0/8)")
        .says("store     memory: this instance only")
        .says("X-Forwarded-For: 6.6.6.6, 203.0.113.5, 10.1.1.1, 10.0.0.5");
    assert_eq!(
        e.field("rate limit", "  key"),
        "palisade:rl:by-ip:100/60s:20:client_ip:4\\xcb\\x00q\\x05"
    );

    // From an untrusted peer, X-Forwarded-For is not believed, and is replaced upstream.
    let e = explain(
        LIMITED,
        &[
            "GET",
            "http://h/ip",
            "-H",
            "X-Forwarded-For: 203.0.113.5",
            "--client-ip",
            "192.0.2.9",
        ],
    );
    e.ok()
        .says("client    192.0.2.9: the peer; it is not in trusted_proxies")
        .says("headers     X-Forwarded-For: 192.0.2.9\n");

    // An https:// URL is a request on a TLS listener.
    explain(LIMITED, &["GET", "https://h/ip"])
        .ok()
        .says("X-Forwarded-Proto: https;");
    explain(LIMITED, &["GET", "http://h/ip"])
        .ok()
        .says("X-Forwarded-Proto: http;");

    let e = explain(LIMITED, &["GET", "http://h/key", "-H", "X-API-Key: k1"]);
    e.ok().says("part      header:x-api-key = \"k1\"");
    assert_eq!(
        e.field("rate limit", "  key"),
        "palisade:rl:by-key:10/1s:10:header:x-api-key:k1"
    );
    explain(LIMITED, &["GET", "http://h/key"])
        .ok()
        .says("per header:x-api-key; missing = deny (400)")
        .says(
        "answer    400 Bad Request: this route is rate limited per header:x-api-key, and the request has none",
    );
    let e = explain(LIMITED, &["GET", "http://h/either"]);
    e.ok()
        .says("header:x-api-key absent: counted by client_ip = 127.0.0.1 instead");
    assert_eq!(
        e.field("rate limit", "  key"),
        "palisade:rl:by-key-or-ip:10/1s:10:header:x-api-key:4\\x7f\\x00\\x00\\x01"
    );
}

fn two_replica_config(ups: &[Upstream], upstream_extra: &str) -> String {
    let urls: Vec<String> = ups.iter().map(|u| u.url()).collect();
    simple_config("", upstream_extra, &urls)
}

/// The replica URL an explain output picks.
fn picked(e: &Explained) -> String {
    let line = e.field("upstream", "  pick");
    let url = line.split(' ').next().unwrap_or_default();
    url.trim_end_matches(':').to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consistent_hash_pick_is_stable_and_is_the_replica_that_serves_it() {
    bounded(60, async {
        let ups = vec![Upstream::start("a"), Upstream::start("b")];
        let config = two_replica_config(
            &ups,
            "balance = \"consistent_hash\"\nhash_on = \"header:X-User\"",
        );
        let p = Palisade::start(&config).await;
        let client = http1();
        let dir = tempfile::tempdir().unwrap();
        let mut chosen = std::collections::BTreeSet::new();
        for user in 0..12 {
            let header = format!("X-User: user-{user}");
            let args = ["GET", "http://127.0.0.1/x", "-H", header.as_str()];
            let e = explain_in(&dir, &config, &args);
            e.ok()
                .says("the ring point of header x-user")
                .says("all replicas assumed healthy; no live state in explain");
            let again = explain_in(&dir, &config, &args);
            assert_eq!(e.stdout, again.stdout, "explain is deterministic");
            let pick = picked(&e);
            let r = get(
                &client,
                &p.url("/x"),
                &[("x-user", &format!("user-{user}"))],
            )
            .await;
            let served_by = r.json()["replica"].as_str().unwrap().to_owned();
            let served_url = ups.iter().find(|u| u.name == served_by).unwrap().url();
            assert_eq!(pick, served_url, "user-{user}: {}", e.stdout);
            chosen.insert(pick);
        }
        assert_eq!(chosen.len(), 2, "12 users reach both replicas: {chosen:?}");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn round_robin_first_pick_and_rotation_match_a_fresh_proxy() {
    bounded(60, async {
        let ups = vec![Upstream::start("a"), Upstream::start("b")];
        let config = two_replica_config(&ups, "");
        let e = explain(&config, &["GET", "http://127.0.0.1/x"]);
        e.ok()
            .says("the first request of a fresh process); rotation 1 → 2");
        assert_eq!(picked(&e), ups[0].url());
        let p = Palisade::start(&config).await;
        let client = http1();
        let mut served = Vec::new();
        for _ in 0..3 {
            let r = get(&client, &p.url("/x"), &[]).await;
            served.push(r.json()["replica"].as_str().unwrap().to_owned());
        }
        assert_eq!(served, ["a", "b", "a"]);
    })
    .await;
}

#[test]
fn cache_policy_and_what_the_request_does_to_it() {
    let config = r#"
[upstreams.legacy]
replicas = ["http://127.0.0.1:18081"]
retry = { attempts = 2, on = ["connect", "5xx"], budget = "20%" }

[[routes]]
name = "cached"
upstream = "legacy"
cache = { ttl = "60s", stale_while_revalidate = "30s", stale_if_error = "10m", query = "none" }
"#;
    let e = explain(
        config,
        &[
            "GET",
            "http://h/a?x=1",
            "-H",
            "Authorization: Bearer t",
            "-H",
            "Cache-Control: no-cache",
        ],
    );
    e.ok()
        .says("ttl 1m, stale_while_revalidate 30s, stale_if_error 10m, respect_origin true")
        .says("query: none")
        .says("Authorization: stored only if the response says public, s-maxage or must-revalidate")
        .says("no-cache (or max-age=0, Pragma): forwarded to revalidate")
        .says("up to 2 more attempts on other replicas after connect, 5xx")
        .says("GET is retried after any of them");
    assert_eq!(e.field("cache", "  key"), "cached:h/a");
    explain(
        config,
        &["POST", "http://h/a", "-H", "X-Original-URL: /admin"],
    )
    .ok()
    .says("POST: not looked up (bypass)")
    .says("POST is retried only after a connect failure")
    .says("removed: x-original-url");
}

#[test]
fn config_errors_exit_1_with_file_line_and_column() {
    let text = "[upstreams.u]\nreplicas = [\"http://127.0.0.1:9\"]\n[[routes]]\nname = \"r\"\nupstream = \"nope\"\n";
    let e = explain(text, &["GET", "http://h/"]);
    assert_eq!(e.code, 1, "{}", e.stderr);
    assert!(e.stdout.is_empty(), "{}", e.stdout);
    let want = format!(
        "error: {}:5:12: routes[0].upstream: unknown upstream \"nope\"",
        e.file
    );
    assert!(e.stderr.contains(&want), "{want:?} not in:\n{}", e.stderr);
    assert!(e.stderr.contains("1 error found"), "{}", e.stderr);
}

#[test]
fn bad_arguments_exit_2_with_one_clear_line() {
    for (args, message) in [
        (
            vec!["GET", "products/1"],
            "\"products/1\" is not a URL: write http://HOST/PATH, or /PATH with -H 'Host: NAME'",
        ),
        (vec!["GET", "ftp://h/x"], "\"ftp://h/x\" is not a URL"),
        (
            vec!["GET", "/x"],
            "\"/x\" has no host: give an absolute URL or -H 'Host: NAME'",
        ),
        (vec!["G(T", "http://h/"], "\"G(T\" is not an HTTP method"),
        (
            vec!["get", "http://h/"],
            "methods are case-sensitive; did you mean GET?",
        ),
        (
            vec!["GET", "http://h/", "-H", "X-No-Colon"],
            "\"X-No-Colon\" is not a header: write -H 'Name: value'",
        ),
        (
            vec!["GET", "http://h/", "-H", "Bad Name: v"],
            "\"Bad Name: v\" is not a header",
        ),
        (
            vec!["GET", "http://h/", "--client-ip", "10.0.0"],
            "invalid value '10.0.0' for '--client-ip <IP>'",
        ),
    ] {
        let e = explain(ROUTES, &args);
        assert_eq!(e.code, 2, "{args:?}: {}", e.stderr);
        assert!(e.stdout.is_empty(), "{args:?}: {}", e.stdout);
        let first = e.stderr.lines().next().unwrap_or_default();
        assert!(
            first.starts_with("error: ") && first.contains(message),
            "{args:?}: {message:?} not in the first line of:\n{}",
            e.stderr
        );
    }
    // A bare path is fine with a Host header.
    explain(
        ROUTES,
        &["GET", "/products/1", "-H", "Host: shop.example.com"],
    )
    .ok()
    .says("route       products  ");
}

#[test]
fn explain_connects_nowhere() {
    let replica = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let redis = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    replica.set_nonblocking(true).unwrap();
    redis.set_nonblocking(true).unwrap();
    let config = format!(
        r#"
[cache]
redis = {{ url = "redis://{redis}/0", timeout = "5s" }}

[rate_limit]
redis = {{ url = "redis://192.0.2.1:6379/0", timeout = "5s" }}

[upstreams.legacy]
replicas = ["http://{replica}", "http://192.0.2.1:8080"]
connect_timeout = "5s"

[upstreams.legacy.health]
path = "/health"
interval = "1s"

[[routes]]
name = "all"
upstream = "legacy"
cache = {{ ttl = "60s" }}
rate_limit = {{ limit = "10/s" }}
"#,
        redis = redis.local_addr().unwrap(),
        replica = replica.local_addr().unwrap(),
    );
    let started = Instant::now();
    let e = explain(&config, &["GET", "http://h/x"]);
    let took = started.elapsed();
    e.ok()
        .says("route       all")
        .says(&format!(
            "pick      http://{}",
            replica.local_addr().unwrap()
        ))
        .says("health    GET /health every 1s");
    assert!(took < Duration::from_secs(2), "explain took {took:?}");
    for (what, l) in [("replica", &replica), ("redis", &redis)] {
        match l.accept() {
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            other => panic!("explain connected to the {what}: {other:?}"),
        }
    }
}
