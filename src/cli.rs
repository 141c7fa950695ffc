//! The command line: `run` (the default), `check`, `explain`, `demo`.

use crate::config::{self, Config, LogFormat};
use crate::explain::{self, Target};
use crate::reload::{Reloader, Trigger};
use crate::state::Shared;
use crate::workers::Workers;
use crate::{admin, demo, server::Server};
use clap::{Args, CommandFactory, Parser, Subcommand};
use http::{HeaderName, HeaderValue, Method};
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::Ordering;

const EXAMPLES: &str = "\
Examples:
  palisade demo                              run built-in demo replicas and the proxy, print curl lines
  palisade check -c /etc/palisade/palisade.toml   validate a config (exit 0 if valid, 1 with every error)
  palisade run -c palisade.toml              run the proxy (SIGHUP reloads, SIGTERM drains and exits)
  palisade -c palisade.toml                  the same: run is the default
  palisade explain -c palisade.toml GET http://api.example.com/products/1
                                             what the proxy would do with a request; sends nothing";

const EXPLAIN_EXAMPLES: &str = "\
Examples:
  palisade explain -c palisade.toml GET 'http://api.example.com/products/1?b=2&a=1'
  palisade explain -c palisade.toml GET /orders/7 -H 'Host: api.example.com' -H 'X-API-Key: k1'
  palisade explain -c palisade.toml GET http://api.example.com/ -H 'X-Forwarded-For: 203.0.113.5' --client-ip 10.0.0.5";

/// Palisade: a caching reverse proxy for HTTP APIs you cannot change.
#[derive(Parser, Debug)]
#[command(name = "palisade", version, about, after_help = EXAMPLES, args_conflicts_with_subcommands = true)]
pub struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    run: ConfigArg,
}

#[derive(Args, Debug, Clone)]
struct ConfigArg {
    /// The config file.
    #[arg(
        short,
        long,
        env = "PALISADE_CONFIG",
        default_value = "/etc/palisade/palisade.toml"
    )]
    config: PathBuf,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run the proxy (the default).
    Run(ConfigArg),
    /// Validate a config file and print a summary, like `nginx -t`.
    Check(ConfigArg),
    /// Show what the proxy would do with one request: route, cache, rate limit, replica,
    /// headers. Sends nothing, connects nowhere; exits 0 (also for a 404 or 405), 1 on config
    /// errors, 2 on bad arguments.
    #[command(after_help = EXPLAIN_EXAMPLES)]
    Explain(Box<ExplainArgs>),
    /// Start two demo replicas on loopback and the proxy with config/demo.toml.
    Demo,
}

#[derive(Args, Debug)]
struct ExplainArgs {
    #[command(flatten)]
    config: ConfigArg,
    /// The request method, as sent (GET, POST, ...).
    #[arg(value_parser = explain::parse_method)]
    method: Method,
    /// `http://HOST/PATH?QUERY`, or `/PATH?QUERY` with `-H 'Host: NAME'`.
    #[arg(value_parser = explain::parse_target)]
    url: Target,
    /// A request header, `'Name: value'`; repeat for more. A Host header overrides the URL's.
    #[arg(short = 'H', long = "header", value_name = "NAME: VALUE", value_parser = explain::parse_header)]
    headers: Vec<(HeaderName, HeaderValue)>,
    /// The address the request arrives from (the socket peer; X-Forwarded-For is believed only
    /// when it is in `trusted_proxies`).
    #[arg(long, value_name = "IP", default_value = "127.0.0.1")]
    client_ip: IpAddr,
}

/// Parses the command line and runs the chosen command.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        None => run(&cli.run.config),
        Some(Command::Run(a)) => run(&a.config),
        Some(Command::Check(a)) => check(&a.config),
        Some(Command::Explain(a)) => run_explain(*a),
        Some(Command::Demo) => run_demo(),
    }
}

fn print_errors(e: &config::ConfigErrors) {
    for err in &e.0 {
        eprintln!("error: {err}");
    }
    eprintln!(
        "{} error{} found",
        e.0.len(),
        if e.0.len() == 1 { "" } else { "s" }
    );
}

fn check(path: &Path) -> ExitCode {
    match config::load(path) {
        Ok(c) => {
            print!("{}", summary(&c));
            println!("{}: the configuration is valid", path.display());
            ExitCode::SUCCESS
        }
        Err(e) => {
            print_errors(&e);
            ExitCode::FAILURE
        }
    }
}

fn run_explain(a: ExplainArgs) -> ExitCode {
    let req = match explain::Request::new(a.method, a.url, a.headers, a.client_ip) {
        Ok(r) => r,
        Err(e) => {
            let mut cmd = Cli::command();
            cmd.build();
            let explain = cmd
                .find_subcommand_mut("explain")
                .expect("explain is a subcommand");
            explain
                .error(clap::error::ErrorKind::ValueValidation, e)
                .exit()
        }
    };
    match config::load(&a.config.config) {
        Ok(c) => {
            print!("{}", explain::explain(&c, &req));
            ExitCode::SUCCESS
        }
        Err(e) => {
            print_errors(&e);
            ExitCode::FAILURE
        }
    }
}

/// A one-screen summary of listeners, routes and upstreams.
pub fn summary(c: &Config) -> String {
    use std::fmt::Write;
    let mut s = String::new();
    let s_ = &c.server;
    let listen: Vec<String> = s_.listen.iter().map(|a| a.to_string()).collect();
    let _ = writeln!(
        s,
        "listeners: {} (HTTP/1.1 and h2c), {} workers, max {} connections",
        listen.join(", "),
        s_.workers,
        s_.max_connections
    );
    if let Some(t) = &s_.tls {
        let listen: Vec<String> = t.listen.iter().map(|a| a.to_string()).collect();
        let _ = writeln!(
            s,
            "tls:       {} (TLS 1.2/1.3, h2 and HTTP/1.1 by ALPN)",
            listen.join(", ")
        );
        for (i, cert) in t.certificates.iter().enumerate() {
            let _ = writeln!(
                s,
                "  {}{} [{}]",
                cert.cert_path.display(),
                if i == t.default { " (default)" } else { "" },
                cert.names.join(", ")
            );
        }
    }
    let _ = writeln!(
        s,
        "admin:     {}{}",
        c.admin.listen,
        if c.admin.token.is_some() {
            " (token required)"
        } else {
            ""
        }
    );
    let _ = writeln!(s, "routes:");
    for r in &c.routes {
        let host = r.host.as_ref().map_or("*".to_owned(), |h| h.to_string());
        let methods = r.methods.as_ref().map_or("any".to_owned(), |m| {
            m.iter().map(|m| m.as_str()).collect::<Vec<_>>().join(",")
        });
        let _ = writeln!(
            s,
            "  {:<16} {host}{} [{methods}] -> {}",
            r.name, r.path_prefix, c.upstreams[r.upstream].name
        );
    }
    if !c.rate_limit_policies.is_empty() {
        let store = match &c.rate_limit.redis {
            Some(r) => format!(
                "global in Redis ({:?}, on_error = {})",
                r.target,
                r.on_error.as_str()
            ),
            None => format!("in memory, at most {} clients", c.rate_limit.max_keys),
        };
        let _ = writeln!(s, "rate limits ({store}):");
        for p in &c.rate_limit_policies {
            let per: Vec<String> = p.per.iter().map(|k| k.to_string()).collect();
            let users: Vec<&str> = c
                .routes
                .iter()
                .filter(|r| {
                    r.rate_limit
                        .is_some_and(|i| c.rate_limit_policies[i].name == p.name)
                })
                .map(|r| r.name.as_str())
                .collect();
            let _ = writeln!(
                s,
                "  {:<16} {}/{}s burst {} per {} -> routes {}",
                p.name,
                p.count,
                p.period.as_secs(),
                p.burst,
                per.join("+"),
                users.join(", ")
            );
        }
    }
    let _ = writeln!(s, "upstreams:");
    for u in &c.upstreams {
        let _ = writeln!(
            s,
            "  {:<16} {} replicas, {}, connect_timeout {:?}, timeout {:?}: {}",
            u.name,
            u.replicas.len(),
            u.balance.as_str(),
            u.connect_timeout,
            u.timeout,
            u.replicas.join(" ")
        );
        let mut extras = Vec::new();
        if let Some(h) = &u.health {
            extras.push(format!("health {} every {:?}", h.path, h.interval));
        }
        if let Some(b) = &u.circuit_breaker {
            extras.push(format!(
                "circuit breaker after {} failures or {}% (open {:?})",
                b.consecutive_failures,
                b.failure_rate * 100.0,
                b.open_for
            ));
        }
        if let Some(r) = &u.retry {
            extras.push(format!(
                "{} retries within {}%",
                r.attempts,
                r.budget * 100.0
            ));
        }
        if let Some(t) = &u.tls {
            let mut tls = match &t.ca {
                Some(ca) => format!("TLS with CA {}", ca.display()),
                None => "TLS with the system roots".to_owned(),
            };
            if let Some(c) = &t.client_cert {
                tls.push_str(&format!(", client certificate {}", c.display()));
            }
            if let Some(n) = &t.server_name {
                tls.push_str(&format!(", server name {}", n.to_str()));
            }
            extras.push(tls);
        }
        if let Some(t) = u.panic_threshold {
            extras.push(format!("panic over {}% unavailable", t * 100.0));
        }
        if !extras.is_empty() {
            let _ = writeln!(s, "  {:<16} {}", "", extras.join("; "));
        }
    }
    s
}

fn init_logging(c: &Config) -> tracing_appender::non_blocking::WorkerGuard {
    let (writer, guard) = tracing_appender::non_blocking::NonBlockingBuilder::default()
        .buffered_lines_limit(64 * 1024)
        .finish(std::io::stdout());
    let filter =
        tracing_subscriber::EnvFilter::try_new(&c.log.level).unwrap_or_else(|_| "info".into());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(writer);
    match c.log.format {
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .init(),
        LogFormat::Pretty => builder.init(),
    }
    guard
}

fn run(path: &Path) -> ExitCode {
    let loaded = config::read(path).and_then(|text| Ok((config::parse(&text, path)?, text)));
    match loaded {
        Ok((c, text)) => serve(c, Start::File(text)),
        Err(e) => {
            print_errors(&e);
            ExitCode::FAILURE
        }
    }
}

fn run_demo() -> ExitCode {
    let path = PathBuf::from("config/demo.toml (embedded)");
    match config::parse(config::DEMO_CONFIG, &path) {
        Ok(c) => serve(c, Start::Demo),
        Err(e) => {
            print_errors(&e);
            ExitCode::FAILURE
        }
    }
}

/// Where a served config came from.
enum Start {
    /// A file, with the text it held; reloads and the file watcher read it again.
    File(String),
    /// The embedded demo config, with demo replicas started first; there is no file to watch.
    Demo,
}

/// Runs the proxy with a validated config until SIGTERM or SIGINT.
fn serve(config: Config, start: Start) -> ExitCode {
    let _log_guard = init_logging(&config);
    // The main runtime serves the admin listener, signals and reloads; with one worker it
    // also serves the clients (see `workers`).
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let (code, workers) = runtime.block_on(async move {
        if matches!(start, Start::Demo)
            && let Err(e) = demo::start(&config)
        {
            tracing::error!(error = %e, "demo replicas failed to start");
            return (ExitCode::FAILURE, None);
        }
        // Before the first snapshot: upstream pools keep an idle stack per worker.
        let workers = match Workers::start(config.server.workers) {
            Ok(w) => w,
            Err(e) => {
                tracing::error!(error = %e, "cannot start the worker threads");
                return (ExitCode::FAILURE, None);
            }
        };
        let admin_addr = config.admin.listen;
        let shared = Shared::new(config);
        let admin_listener = match crate::server::bind(admin_addr) {
            Ok(l) => l,
            Err(e) => {
                tracing::error!(addr = %admin_addr, error = %e, "cannot bind the admin listener");
                return (ExitCode::FAILURE, None);
            }
        };
        if let Ok(local) = admin_listener.local_addr() {
            tracing::info!(listener = "admin", addr = %local, "listening");
        }
        let server = Server::new(shared.clone(), workers.handles());
        let (loaded_text, watch) = match start {
            Start::File(text) => (Some(text), true),
            Start::Demo => (None, false),
        };
        let reloader = Arc::new(Reloader::new(shared.clone(), server.clone(), loaded_text));
        let _watcher = if watch {
            reloader
                .watch()
                .inspect_err(|e| tracing::warn!(error = %e, "cannot watch the config file; reload with SIGHUP or POST /admin/reload"))
                .ok()
        } else {
            None
        };
        tokio::spawn(admin::serve(shared.clone(), reloader.clone(), admin_listener));
        let sweeper = shared.clone();
        tokio::spawn(async move {
            let mut every = tokio::time::interval(std::time::Duration::from_secs(10));
            loop {
                every.tick().await;
                sweeper.limiter.memory.sweep();
            }
        });
        if let Err(e) = server.sync_listeners() {
            tracing::error!(error = %e, "cannot bind a public listener");
            return (ExitCode::FAILURE, None);
        }
        shared.ready.store(true, Ordering::Release);
        tracing::info!(version = env!("CARGO_PKG_VERSION"), "palisade started");
        let code = wait_for_signals(&shared, &server, &reloader).await;
        (code, Some(workers))
    });
    if let Some(w) = workers {
        w.shutdown();
    }
    runtime.shutdown_timeout(std::time::Duration::from_secs(1));
    code
}

async fn wait_for_signals(
    shared: &Arc<Shared>,
    server: &Arc<Server>,
    reloader: &Reloader,
) -> ExitCode {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut hup), Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::hangup()),
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        tracing::error!("cannot install signal handlers");
        return ExitCode::FAILURE;
    };
    loop {
        tokio::select! {
            _ = hup.recv() => { let _ = reloader.reload(Trigger::Signal); }
            _ = term.recv() => break,
            _ = int.recv() => break,
        }
    }
    shared.ready.store(false, Ordering::Release);
    tracing::info!("shutting down: draining connections");
    if server.drain().await {
        tracing::info!("drained; exiting");
    } else {
        tracing::warn!("drain timeout passed with connections still open; exiting");
    }
    ExitCode::SUCCESS
}
