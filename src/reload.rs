//! Config reload: one path for SIGHUP, `POST /admin/reload` and a change of the file on disk.
//!
//! Every trigger reads the file, validates it whole and installs it only when it is valid, so a
//! bad file never replaces a good one; reloads run one at a time. What outlives a config (the
//! cache, limiter state of unchanged policies, health and circuits of unchanged replicas, open
//! connections) is carried over by [`Shared::install`] and [`Server::sync_listeners`].
//!
//! The watcher watches the file's directory rather than the file, because editors, deploy tools
//! and Kubernetes ConfigMaps replace a file instead of writing it. It waits until the directory
//! has been quiet for `reload.debounce`, then reloads only if the file's text differs from the
//! text last read, so the write that precedes a SIGHUP does not reload twice.

use crate::config::{self, Config, ConfigErrors};
use crate::server::Server;
use crate::state::Shared;
use notify::{EventKind, RecursiveMode, Watcher};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use tokio::sync::Notify;

/// What asked for a reload, for the log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Trigger {
    /// SIGHUP.
    Signal,
    /// `POST /admin/reload`.
    Admin,
    /// The file changed on disk.
    FileChange,
}

impl Trigger {
    /// The log spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Trigger::Signal => "signal",
            Trigger::Admin => "admin",
            Trigger::FileChange => "file",
        }
    }
}

/// Reloads the running config from its file.
pub struct Reloader {
    shared: Arc<Shared>,
    server: Arc<Server>,
    /// The text last read from the file (`None`: it could not be read), guarding one reload
    /// at a time.
    last_text: Mutex<Option<String>>,
}

impl Reloader {
    /// A reloader for the running config, whose file held `loaded_text` at start.
    pub fn new(shared: Arc<Shared>, server: Arc<Server>, loaded_text: Option<String>) -> Self {
        Reloader {
            shared,
            server,
            last_text: Mutex::new(loaded_text),
        }
    }

    /// Reads, validates and installs the config file; an invalid file keeps the running config.
    pub fn reload(&self, trigger: Trigger) -> Result<Arc<Config>, ConfigErrors> {
        self.read_and_apply(trigger, false)
            .expect("a reload that need not see a change always runs")
    }

    /// Reloads when the file's text differs from what was last read.
    fn reload_if_changed(&self) {
        let _ = self.read_and_apply(Trigger::FileChange, true);
    }

    /// Reads the file under the reload lock and applies it, unless `only_if_changed` and its
    /// text is the text last read (`None` then).
    fn read_and_apply(
        &self,
        trigger: Trigger,
        only_if_changed: bool,
    ) -> Option<Result<Arc<Config>, ConfigErrors>> {
        let mut last = self.last_text.lock().expect("reload lock");
        let path = self.shared.snapshot.load().config.file.clone();
        let text = config::read(&path);
        let now = text.as_ref().ok().cloned();
        if only_if_changed && now == *last {
            return None;
        }
        *last = now;
        Some(self.apply(&path, text, trigger))
    }

    fn apply(
        &self,
        path: &Path,
        text: Result<String, ConfigErrors>,
        trigger: Trigger,
    ) -> Result<Arc<Config>, ConfigErrors> {
        let before = self.shared.snapshot.load().config.clone();
        let outcome = text.and_then(|t| config::parse(&t, path));
        let result = if outcome.is_ok() { "ok" } else { "error" };
        self.shared
            .metrics
            .config_reloads
            .with_label_values(&[result])
            .inc();
        let config = match outcome {
            Ok(c) => c,
            Err(errors) => {
                for e in &errors.0 {
                    tracing::error!(trigger = trigger.as_str(), error = %e, "config reload rejected; keeping the running config");
                }
                return Err(errors);
            }
        };
        self.shared.install(config);
        let now = self.shared.snapshot.load().config.clone();
        if now.admin != before.admin {
            tracing::warn!("admin listener changes take effect at restart");
        }
        if now.log != before.log {
            tracing::warn!("log settings take effect at restart");
        }
        if now.server.workers != before.server.workers
            || now.server.max_connections != before.server.max_connections
        {
            tracing::warn!("server.workers and server.max_connections take effect at restart");
        }
        if let Err(e) = self.server.sync_listeners() {
            tracing::error!(error = %e, "reloaded, but a new listener could not be bound");
        }
        tracing::info!(trigger = trigger.as_str(), file = %now.file.display(), routes = now.routes.len(), "config reloaded");
        Ok(now)
    }

    /// Watches the config file's directory and reloads on a change once it has been quiet for
    /// `reload.debounce` (while `reload.watch` is on). The returned watcher must be kept alive.
    pub fn watch(self: &Arc<Self>) -> notify::Result<notify::RecommendedWatcher> {
        let path = self.shared.snapshot.load().config.file.clone();
        let dir = watched_dir(&path);
        let changed = Arc::new(Notify::new());
        let wake = changed.clone();
        let mut watcher = notify::recommended_watcher(move |e: notify::Result<notify::Event>| {
            if e.is_ok_and(|e| !matches!(e.kind, EventKind::Access(_))) {
                wake.notify_one();
            }
        })?;
        watcher.watch(&dir, RecursiveMode::NonRecursive)?;
        tracing::info!(dir = %dir.display(), "watching the config file for changes");
        let this = self.clone();
        tokio::spawn(async move {
            loop {
                changed.notified().await;
                loop {
                    let quiet = this.shared.snapshot.load().config.reload.debounce;
                    tokio::select! {
                        _ = changed.notified() => continue,
                        _ = tokio::time::sleep(quiet) => break,
                    }
                }
                if this.shared.snapshot.load().config.reload.watch {
                    this.reload_if_changed();
                }
            }
        });
        Ok(watcher)
    }
}

fn watched_dir(file: &Path) -> PathBuf {
    match file.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    }
}
