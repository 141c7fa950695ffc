//! TLS both ways, with certificates made at test time and real handshakes: listeners (SNI,
//! default certificate, ALPN h2 and http/1.1, TLS 1.2 and 1.3 only, handshake timeout,
//! connection limit, X-Forwarded-Proto, reload of certificates and addresses), config errors,
//! and https:// replicas (CA file, server_name, IP names, mTLS, bad certificates as 502s).

mod common;

use common::tls::*;
use common::*;
use rustls::ProtocolVersion;
use std::path::Path;
use std::time::{Duration, Instant};

/// A `[server.tls]` table on an ephemeral port over `certs` (cert path, key path, extra keys).
fn tls_table(certs: &[(&Path, &Path, &str)]) -> String {
    let list: Vec<String> = certs
        .iter()
        .map(|(c, k, extra)| format!("{{ cert = {c:?}, key = {k:?}{extra} }}"))
        .collect();
    format!(
        "[server.tls]\nlisten = [\"127.0.0.1:0\"]\ncertificates = [{}]\n",
        list.join(", ")
    )
}

/// ALPN protocols a client offers.
type Alpn<'a> = &'a [&'a [u8]];

/// `line:col` (1-based) of the first `needle` in `text`.
fn pos(text: &str, needle: &str) -> String {
    let at = text
        .find(needle)
        .unwrap_or_else(|| panic!("{needle:?} not in the config"));
    let before = &text[..at];
    let line = before.matches('\n').count() + 1;
    let col = before.len() - before.rfind('\n').map_or(0, |i| i + 1) + 1;
    format!("{line}:{col}")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sni_picks_the_certificate_and_others_get_the_default() {
    bounded(60, async {
        let ca = Ca::new("listener CA");
        let dir = tempfile::tempdir().unwrap();
        let a = ca.issue(&["a.test"]);
        let b = ca.issue(&["*.b.test"]);
        let c = ca.issue(&["c.test"]);
        let (ac, ak) = write_pair(dir.path(), "a", &a);
        let (bc, bk) = write_pair(dir.path(), "b", &b);
        let (cc, ck) = write_pair(dir.path(), "c", &c);
        let up = Upstream::start("r1");
        let server = tls_table(&[
            (&ac, &ak, ""),
            (&bc, &bk, ""),
            (&cc, &ck, ", default = true"),
        ]);
        let p = Palisade::start(&simple_config(&server, "", &[up.url()])).await;
        let addr = tls_addr(&p);
        for (sni, want, why) in [
            (Some("a.test"), &a, "exact name"),
            (Some("A.TEST"), &a, "names are case-insensitive"),
            (Some("x.b.test"), &b, "wildcard"),
            (
                Some("b.test"),
                &c,
                "a wildcard does not cover its parent: default",
            ),
            (
                Some("y.x.b.test"),
                &c,
                "a wildcard covers one label: default",
            ),
            (Some("unknown.test"), &c, "unknown name: default"),
            (None, &c, "no SNI: default"),
        ] {
            let conn = connect(
                addr,
                &ClientOpts {
                    sni,
                    ..Default::default()
                },
            )
            .await;
            assert!(conn.peer_cert == want.der, "SNI {sni:?}: {why}");
        }
        // Verified as a real client would: the CA, the name and the key all check out.
        let conn = connect(
            addr,
            &ClientOpts {
                sni: Some("x.b.test"),
                verify_with: Some(&ca),
                ..Default::default()
            },
        )
        .await;
        let r = conn.get("/verified", "x.b.test").await;
        assert_eq!(r.status, 200, "{}", r.text());
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn alpn_h2_and_http1_work_and_upstreams_see_https() {
    bounded(60, async {
        let ca = Ca::new("listener CA");
        let dir = tempfile::tempdir().unwrap();
        let (c, k) = write_pair(dir.path(), "a", &ca.issue(&["a.test"]));
        let up = Upstream::start("r1");
        let p = Palisade::start(&simple_config(&tls_table(&[(&c, &k, "")]), "", &[up.url()])).await;
        let addr = tls_addr(&p);
        let cases: [(Alpn, Option<&[u8]>, &str); 3] = [
            (&[b"h2", b"http/1.1"], Some(b"h2"), "HTTP/2.0"),
            (&[b"http/1.1"], Some(b"http/1.1"), "HTTP/1.1"),
            (&[], None, "HTTP/1.1"),
        ];
        for (i, (offer, chosen, version)) in cases.into_iter().enumerate() {
            let conn = connect(
                addr,
                &ClientOpts {
                    alpn: offer,
                    ..Default::default()
                },
            )
            .await;
            assert_eq!(conn.alpn.as_deref(), chosen, "offered {offer:?}");
            let r = conn.get(&format!("/alpn/{i}"), "a.test").await;
            assert_eq!(r.status, 200, "{}", r.text());
            assert_eq!(r.header("x-test-http-version"), Some(version));
            assert_eq!(r.header("x-replica"), Some("r1"));
            let seen = up.seen().into_iter().last().unwrap();
            assert_eq!(seen.path, format!("/alpn/{i}"));
            assert_eq!(seen.header("x-forwarded-proto"), Some("https"));
            assert!(
                seen.header("forwarded")
                    .is_some_and(|f| f.ends_with("proto=https")),
                "{:?}",
                seen.header("forwarded")
            );
        }
        let r = get(&http1(), &p.url("/plain"), &[]).await;
        assert_eq!(r.status, 200);
        let seen = up.seen().into_iter().last().unwrap();
        assert_eq!(seen.header("x-forwarded-proto"), Some("http"));
        // A client claiming https on a plain listener is not believed (it is not trusted).
        let r = get(
            &http1(),
            &p.url("/plain2"),
            &[("x-forwarded-proto", "https")],
        )
        .await;
        assert_eq!(r.status, 200);
        let seen = up.seen().into_iter().last().unwrap();
        assert_eq!(seen.header("x-forwarded-proto"), Some("http"));
    })
    .await;
}

/// A ClientHello of an old TLS version (1.0 or 1.1) without extensions, as such a client sends.
fn legacy_client_hello(version: [u8; 2]) -> Vec<u8> {
    let mut body = Vec::new();
    body.extend(version);
    body.extend([7u8; 32]);
    body.push(0);
    // ECDHE-ECDSA and ECDHE-RSA with AES-128-GCM: suites rustls has, so that only the
    // version is wrong.
    body.extend([0x00, 0x04, 0xc0, 0x2b, 0xc0, 0x2f]);
    body.extend([0x01, 0x00]);
    // Extensions that rustls needs to get as far as the version: supported_groups (x25519,
    // P-256), ec_point_formats (uncompressed), signature_algorithms (ECDSA P-256 SHA-256).
    let extensions: [u8; 24] = [
        0x00, 0x0a, 0x00, 0x06, 0x00, 0x04, 0x00, 0x1d, 0x00, 0x17, //
        0x00, 0x0b, 0x00, 0x02, 0x01, 0x00, //
        0x00, 0x0d, 0x00, 0x04, 0x00, 0x02, 0x04, 0x03,
    ];
    body.extend((extensions.len() as u16).to_be_bytes());
    body.extend(extensions);
    let mut hs = vec![0x01];
    hs.extend(&(body.len() as u32).to_be_bytes()[1..]);
    hs.extend(body);
    let mut record = vec![0x16, 0x03, 0x01];
    record.extend((hs.len() as u16).to_be_bytes());
    record.extend(hs);
    record
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_tls_1_2_and_1_3_are_accepted() {
    bounded(60, async {
        assert_eq!(
            palisade::tls::PROTOCOL_VERSIONS
                .iter()
                .map(|v| v.version)
                .collect::<Vec<_>>(),
            vec![ProtocolVersion::TLSv1_3, ProtocolVersion::TLSv1_2]
        );
        let ca = Ca::new("listener CA");
        let dir = tempfile::tempdir().unwrap();
        let (c, k) = write_pair(dir.path(), "a", &ca.issue(&["a.test"]));
        let up = Upstream::start("r1");
        let p = Palisade::start(&simple_config(&tls_table(&[(&c, &k, "")]), "", &[up.url()])).await;
        let addr = tls_addr(&p);
        for (versions, want) in [
            (&[&rustls::version::TLS12][..], ProtocolVersion::TLSv1_2),
            (&[&rustls::version::TLS13][..], ProtocolVersion::TLSv1_3),
        ] {
            let conn = connect(
                addr,
                &ClientOpts {
                    versions,
                    verify_with: Some(&ca),
                    ..Default::default()
                },
            )
            .await;
            assert_eq!(conn.version, want);
            let r = conn.get("/v", "a.test").await;
            assert_eq!(r.status, 200, "{}", r.text());
        }
        // TLS 1.1 and 1.0 ClientHellos are answered with a fatal protocol_version alert.
        for version in [[3, 2], [3, 1]] {
            let mut raw = Raw::connect(addr).await;
            raw.send(&legacy_client_hello(version)).await.unwrap();
            let (bytes, _) = raw.read_to_end(Duration::from_secs(3)).await;
            assert!(bytes.len() >= 7, "{version:?}: got {bytes:?}");
            assert_eq!(
                bytes[0], 0x15,
                "{version:?}: not an alert record: {bytes:?}"
            );
            assert_eq!((bytes[5], bytes[6]), (2, 70), "{version:?}: {bytes:?}");
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_connections_count_and_slow_handshakes_are_cut() {
    bounded(60, async {
        let ca = Ca::new("listener CA");
        let dir = tempfile::tempdir().unwrap();
        let (c, k) = write_pair(dir.path(), "a", &ca.issue(&["a.test"]));
        let up = Upstream::start("r1");
        let server = format!(
            "max_connections = 1\nheader_read_timeout = \"500ms\"\n{}",
            tls_table(&[(&c, &k, "")])
        );
        let p = Palisade::start(&simple_config(&server, "", &[up.url()])).await;
        let addr = tls_addr(&p);
        let conn = connect(addr, &ClientOpts::default()).await;
        let active = |m: &str, l: &str| {
            metric_value(m, "palisade_connections_active", &[("listener", l)]).unwrap_or(0.0)
        };
        let m = p.metrics().await;
        assert_eq!(active(&m, "tls"), 1.0, "{m}");
        // The TLS connection holds the only slot: a plain request waits in the backlog.
        let mut plain = Raw::connect(p.public).await;
        plain
            .send(b"GET /waiting HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        assert_eq!(
            plain
                .read_head(Duration::from_millis(700))
                .await
                .unwrap_err(),
            ReadEnd::TimedOut
        );
        drop(conn);
        let head = plain.read_head(Duration::from_secs(5)).await.unwrap();
        assert_eq!(head.status, 200);
        drop(plain);
        // A client that opens TCP and never says hello is cut after header_read_timeout.
        let started = Instant::now();
        let mut silent = Raw::connect(addr).await;
        assert!(silent.closed_within(Duration::from_secs(5)).await);
        let took = started.elapsed();
        assert!(took >= ms(400), "closed after {took:?}");
        let m = p.metrics().await;
        assert_eq!(active(&m, "tls"), 0.0, "{m}");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_rereads_certificates_and_keeps_the_old_ones_when_broken() {
    bounded(60, async {
        let ca = Ca::new("listener CA");
        let dir = tempfile::tempdir().unwrap();
        let v1 = ca.issue(&["a.test"]);
        let (c, k) = write_pair(dir.path(), "site", &v1);
        let up = Upstream::start("r1");
        let config = simple_config(&tls_table(&[(&c, &k, "")]), "", &[up.url()]);
        let p = Palisade::start(&config).await;
        let addr = tls_addr(&p);
        let served = || async { connect(addr, &ClientOpts::default()).await.peer_cert };
        assert!(served().await == v1.der);

        let v2 = ca.issue(&["a.test"]);
        write_pair(dir.path(), "site", &v2);
        let out = p.reload(&config).await;
        assert_eq!(out["message"], "config reloaded", "{out}");
        assert!(served().await == v2.der, "the new certificate after SIGHUP");

        replace_file(&c, "this is not a certificate\n");
        let out = p.reload(&config).await;
        assert_eq!(
            out["message"], "config reload rejected; keeping the running config",
            "{out}"
        );
        let error = out["error"].as_str().unwrap();
        let at = format!(
            "{}:{}: server.tls.certificates[0].cert: {} holds no PEM certificate",
            p.config_path.display(),
            pos(&config, &format!("{c:?}")),
            c.display()
        );
        assert!(error.starts_with(&at), "{error}\nwanted {at}");
        assert!(
            served().await == v2.der,
            "a broken file keeps the running certificate"
        );
        let m = p.metrics().await;
        assert_eq!(
            metric_value(&m, "palisade_config_reloads_total", &[("result", "error")]),
            Some(1.0)
        );

        // A changed TLS address is bound, the old one stops accepting.
        write_pair(dir.path(), "site", &v2);
        let free = dead_addr();
        let moved = config.replace(
            "[server.tls]\nlisten = [\"127.0.0.1:0\"]",
            &format!("[server.tls]\nlisten = [\"{free}\"]"),
        );
        let out = p.reload(&moved).await;
        assert_eq!(out["message"], "config reloaded", "{out}");
        assert_eq!(tls_addr(&p), free);
        let conn = connect(free, &ClientOpts::default()).await;
        assert!(conn.peer_cert == v2.der);
        assert_eq!(conn.get("/moved", "a.test").await.status, 200);
        p.wait_log(Duration::from_secs(5), |l| {
            l["message"] == "no longer listening" && l["listener"] == "tls"
        })
        .await;
        assert!(
            tokio::net::TcpStream::connect(addr).await.is_err(),
            "the old TLS address still accepts"
        );
    })
    .await;
}

#[test]
fn check_names_file_line_column_and_key_of_bad_certificate_files() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new("check CA");
    let good = ca.issue(&["good.test", "*.good.test"]);
    let other = ca.issue(&["other.test"]);
    write_pair(dir.path(), "good", &good);
    write_pair(dir.path(), "other", &other);
    std::fs::write(dir.path().join("garbage.pem"), "hello, I am not PEM\n").unwrap();
    let ok = "[server]\nlisten = [\"127.0.0.1:0\"]\n\n[server.tls]\nlisten = [\"127.0.0.1:0\"]\ncertificates = [{ cert = \"good.pem\", key = \"good.key\" }, { cert = \"other.pem\", key = \"other.key\", default = true }]\n\n[upstreams.u]\nreplicas = [\"https://127.0.0.1:1\"]\n\n[upstreams.u.tls]\nca = \"good.pem\"\nserver_name = \"u.internal\"\n\n[[routes]]\nname = \"a\"\nupstream = \"u\"\n";
    let check = |text: &str| {
        let path = dir.path().join("palisade.toml");
        std::fs::write(&path, text).unwrap();
        let out = std::process::Command::new(BIN)
            .arg("check")
            .arg("-c")
            .arg(&path)
            .output()
            .unwrap();
        (
            out.status.code().unwrap(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
            path.display().to_string(),
        )
    };
    // Relative paths are read from the config file's directory.
    let (code, stdout, stderr, _) = check(ok);
    assert_eq!(code, 0, "{stdout}\n{stderr}");
    assert!(
        stdout.contains("tls:       127.0.0.1:0 (TLS 1.2/1.3, h2 and HTTP/1.1 by ALPN)"),
        "{stdout}"
    );
    assert!(
        stdout.contains("good.pem [good.test, *.good.test]"),
        "{stdout}"
    );
    assert!(
        stdout.contains("other.pem (default) [other.test]"),
        "{stdout}"
    );
    assert!(
        stdout.contains(&format!(
            "TLS with CA {}/good.pem, server name u.internal",
            dir.path().display()
        )),
        "{stdout}"
    );

    let bad = "[server]\nlisten = [\"127.0.0.1:0\"]\n\n[server.tls]\nlisten = [\"127.0.0.1:0\"]\ncertificates = [\n  { cert = \"missing.pem\", key = \"good.key\" },\n  { cert = \"garbage.pem\", key = \"good.key\" },\n  { cert = \"good.pem\", key = \"other.key\" },\n  { cert = \"good.pem\", key = \"good.pem\", default = true },\n]\n\n[upstreams.u]\nreplicas = [\"https://127.0.0.1:1\"]\n\n[upstreams.u.tls]\nca = \"garbage.pem\"\n\n[upstreams.v]\nreplicas = [\"https://127.0.0.1:2\"]\n\n[upstreams.v.tls]\nclient_cert = \"good.pem\"\nclient_key = \"other.key\"\n\n[[routes]]\nname = \"a\"\nupstream = \"u\"\n\n[[routes]]\nname = \"b\"\nupstream = \"v\"\nmatch = { path_prefix = \"/b\" }\n";
    let (code, _, stderr, file) = check(bad);
    assert_eq!(code, 1, "{stderr}");
    let d = dir.path().display();
    let expect = [
        (
            "\"missing.pem\"",
            "server.tls.certificates[0].cert",
            format!("cannot read {d}/missing.pem: No such file or directory"),
        ),
        (
            "\"garbage.pem\", key = \"good.key\"",
            "server.tls.certificates[1].cert",
            format!("{d}/garbage.pem holds no PEM certificate"),
        ),
        (
            "\"other.key\" },",
            "server.tls.certificates[2].key",
            format!(
                "the private key in {d}/other.key does not match the certificate in {d}/good.pem"
            ),
        ),
        (
            "\"good.pem\", default",
            "server.tls.certificates[3].key",
            format!("{d}/good.pem holds no PEM private key"),
        ),
        (
            "\"garbage.pem\"\n",
            "upstreams.u.tls.ca",
            format!("{d}/garbage.pem holds no PEM certificate"),
        ),
        (
            "\"other.key\"\n",
            "upstreams.v.tls.client_key",
            format!(
                "the private key in {d}/other.key does not match the certificate in {d}/good.pem"
            ),
        ),
    ];
    for (needle, key, message) in &expect {
        let prefix = format!("error: {file}:{}: {key}: ", pos(bad, needle));
        let line = stderr
            .lines()
            .find(|l| l.starts_with(&prefix))
            .unwrap_or_else(|| panic!("no line starting {prefix:?} in:\n{stderr}"));
        assert!(
            line.contains(message.as_str()),
            "{line:?} does not say {message:?}"
        );
    }
    assert!(
        stderr.contains(&format!("{} errors found", expect.len())),
        "{stderr}"
    );
}

/// A config with one upstream per entry `(name, replicas, [upstreams.NAME.tls] lines)` and a
/// route `/NAME/` to each.
fn upstreams_config(server_extra: &str, upstreams: &[(&str, Vec<String>, String)]) -> String {
    let mut text = base_config(server_extra);
    for (name, replicas, tls) in upstreams {
        let list: Vec<String> = replicas.iter().map(|r| format!("{r:?}")).collect();
        text.push_str(&format!(
            "[upstreams.{name}]\nreplicas = [{}]\nconnect_timeout = \"2s\"\n",
            list.join(", ")
        ));
        if !tls.is_empty() {
            text.push_str(&format!("[upstreams.{name}.tls]\n{tls}\n"));
        }
        text.push('\n');
    }
    for (name, ..) in upstreams {
        text.push_str(&format!(
            "[[routes]]\nname = \"{name}\"\nupstream = \"{name}\"\nmatch = {{ path_prefix = \"/{name}/\" }}\n\n"
        ));
    }
    text
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_replicas_with_a_ca_file_a_server_name_or_an_ip_name() {
    bounded(60, async {
        let ca = Ca::new("replica CA");
        let dir = tempfile::tempdir().unwrap();
        let ca_path = ca.write_pem(dir.path());
        let named =
            Upstream::start_tls("named", replica_config(&ca.issue(&["replica.test"]), None));
        let by_ip = Upstream::start_tls("by-ip", replica_config(&ca.issue(&["127.0.0.1"]), None));
        let config = upstreams_config(
            "",
            &[
                (
                    "named",
                    vec![named.https_url()],
                    format!("ca = {ca_path:?}\nserver_name = \"replica.test\""),
                ),
                ("byip", vec![by_ip.https_url()], format!("ca = {ca_path:?}")),
            ],
        );
        let p = Palisade::start(&config).await;
        let client = http1();
        for (path, replica) in [("/named/x", "named"), ("/byip/y", "by-ip")] {
            for _ in 0..3 {
                let r = get(&client, &p.url(path), &[]).await;
                assert_eq!(r.status, 200, "{path}: {}", r.text());
                assert_eq!(r.header("x-replica"), Some(replica));
            }
        }
        // Connections are kept alive over TLS as over TCP.
        assert_eq!(
            named
                .state
                .connections
                .load(std::sync::atomic::Ordering::SeqCst),
            1
        );
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mtls_replica_needs_the_client_certificate() {
    bounded(60, async {
        let ca = Ca::new("replica CA");
        let client_ca = Ca::new("client CA");
        let dir = tempfile::tempdir().unwrap();
        let ca_path = ca.write_pem(dir.path());
        let (cc, ck) = write_pair(dir.path(), "client", &client_ca.issue(&["palisade.test"]));
        let (sc, sk) = write_pair(dir.path(), "stranger", &ca.issue(&["stranger.test"]));
        let replica = Upstream::start_tls(
            "mtls",
            replica_config(&ca.issue(&["replica.test"]), Some(&client_ca)),
        );
        let base = format!("ca = {ca_path:?}\nserver_name = \"replica.test\"");
        let config = upstreams_config(
            "",
            &[
                (
                    "withcert",
                    vec![replica.https_url()],
                    format!("{base}\nclient_cert = {cc:?}\nclient_key = {ck:?}"),
                ),
                ("nocert", vec![replica.https_url()], base.clone()),
                (
                    "wrongcert",
                    vec![replica.https_url()],
                    format!("{base}\nclient_cert = {sc:?}\nclient_key = {sk:?}"),
                ),
            ],
        );
        let p = Palisade::start(&config).await;
        let client = http1();
        let r = get(&client, &p.url("/withcert/a"), &[]).await;
        assert_eq!(r.status, 200, "{}", r.text());
        assert_eq!(r.header("x-replica"), Some("mtls"));
        for (path, says) in [
            ("/nocert/a", "the replica requires a client certificate"),
            ("/wrongcert/a", "the replica refused the client certificate"),
        ] {
            let r = get(&client, &p.url(path), &[]).await;
            assert_eq!(r.status, 502, "{path}: {}", r.text());
            let message = r.json()["error"]["message"].as_str().unwrap().to_owned();
            assert!(
                message.contains("TLS handshake failed") && message.contains(says),
                "{path}: {message}"
            );
        }
        let m = p.metrics().await;
        for upstream in ["nocert", "wrongcert"] {
            assert_eq!(
                metric_value(
                    &m,
                    "palisade_upstream_requests_total",
                    &[("upstream", upstream), ("outcome", "connect_error")]
                ),
                Some(1.0),
                "{upstream}: {m}"
            );
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_replica_certificates_are_502s_that_say_why() {
    bounded(60, async {
        let ca = Ca::new("replica CA");
        let stranger_ca = Ca::new("someone else's CA");
        let dir = tempfile::tempdir().unwrap();
        let ca_path = ca.write_pem(dir.path());
        let now = time_now();
        let wrong_name =
            Upstream::start_tls("wrong-name", replica_config(&ca.issue(&["other.test"]), None));
        let expired = Upstream::start_tls(
            "expired",
            replica_config(
                &ca.issue_valid(&["replica.test"], now - 400 * 86_400, now - 30 * 86_400),
                None,
            ),
        );
        let unknown_ca = Upstream::start_tls(
            "unknown-ca",
            replica_config(&stranger_ca.issue(&["replica.test"]), None),
        );
        let plain = Upstream::start("plain");
        let good = Upstream::start_tls("good", replica_config(&ca.issue(&["replica.test"]), None));
        let tls = format!("ca = {ca_path:?}\nserver_name = \"replica.test\"");
        let mut config = upstreams_config(
            "",
            &[
                ("wrongname", vec![wrong_name.https_url()], tls.clone()),
                ("expired", vec![expired.https_url()], tls.clone()),
                ("unknownca", vec![unknown_ca.https_url()], tls.clone()),
                ("plain", vec![format!("https://{}", plain.addr)], tls.clone()),
                (
                    "retried",
                    vec![expired.https_url(), good.https_url()],
                    tls.clone(),
                ),
            ],
        );
        config = config.replace(
            "[upstreams.retried.tls]",
            "retry = { attempts = 1, on = [\"connect\"] }\n[upstreams.retried.tls]",
        );
        let p = Palisade::start(&config).await;
        let client = http1();
        for (path, says) in [
            (
                "/wrongname/a",
                "certificate not valid for name \"replica.test\"; certificate is only valid for other.test",
            ),
            ("/expired/a", "certificate expired"),
            ("/unknownca/a", "certificate signed by an unknown CA"),
            ("/plain/a", "the replica does not speak TLS"),
        ] {
            let r = get(&client, &p.url(path), &[]).await;
            assert_eq!(r.status, 502, "{path}: {}", r.text());
            let message = r.json()["error"]["message"].as_str().unwrap().to_owned();
            assert!(
                message.starts_with("upstream request failed: cannot connect to https://127.0.0.1:")
                    && message.contains(&format!("TLS handshake failed: {says}")),
                "{path}: {message}"
            );
            p.wait_log(Duration::from_secs(5), |l| {
                l["message"] == "request failed"
                    && l["error"].as_str().is_some_and(|e| e.contains(says))
            })
            .await;
        }
        assert_eq!(wrong_name.hits() + expired.hits() + unknown_ca.hits(), 0);
        // A handshake failure is a connect failure: retried for any method, on another replica.
        for i in 0..4 {
            let r = send(
                &client,
                http::Request::post(p.url(&format!("/retried/{i}")))
                    .body(full("x"))
                    .unwrap(),
            )
            .await;
            assert_eq!(r.status, 200, "{}", r.text());
            assert_eq!(r.header("x-replica"), Some("good"));
        }
        let m = p.metrics().await;
        let failed = metric_value(
            &m,
            "palisade_upstream_requests_total",
            &[
                ("upstream", "retried"),
                ("replica", &expired.https_url()),
                ("outcome", "connect_error"),
            ],
        )
        .unwrap_or(0.0);
        assert!(failed >= 1.0, "{m}");
        assert_eq!(
            metric_value(&m, "palisade_retries_total", &[("upstream", "retried")]),
            Some(failed)
        );
    })
    .await;
}
