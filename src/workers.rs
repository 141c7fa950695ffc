//! The worker runtimes that serve client connections: `[server] workers` single-threaded tokio
//! runtimes, each on its own thread, each accepting on every public listener and serving the
//! connections it accepted from first byte to last (the model of nginx's and Envoy's workers).
//! Nothing is stolen between workers, so a connection's tasks never cross threads and no
//! request pays for cross-thread queues and wake-ups.
//!
//! With one worker there are no extra threads: the main runtime (admin listener, signals,
//! reloads, health checks) is the worker.

use std::cell::Cell;
use std::io;
use std::sync::OnceLock;
use std::thread::JoinHandle;
use std::time::Duration;
use tokio::runtime::{Builder, Handle};
use tokio::sync::watch;

thread_local! {
    static INDEX: Cell<Option<usize>> = const { Cell::new(None) };
}

static COUNT: OnceLock<usize> = OnceLock::new();

/// The index of the worker this thread is; `None` on any other thread (the main runtime when
/// it is not the worker, blocking threads).
pub fn current() -> Option<usize> {
    INDEX.with(Cell::get)
}

/// How many workers this process runs (1 until [`Workers::start`]).
pub fn count() -> usize {
    COUNT.get().copied().unwrap_or(1)
}

/// The running workers.
pub struct Workers {
    handles: Vec<Handle>,
    stop: watch::Sender<bool>,
    threads: Vec<JoinHandle<()>>,
}

impl Workers {
    /// Starts `n` workers. With `n == 1` the calling runtime is the worker; call it from
    /// inside the main runtime.
    pub fn start(n: usize) -> io::Result<Workers> {
        let _ = COUNT.set(n);
        let (stop, _) = watch::channel(false);
        if n <= 1 {
            INDEX.with(|i| i.set(Some(0)));
            return Ok(Workers {
                handles: vec![Handle::current()],
                stop,
                threads: Vec::new(),
            });
        }
        let mut handles = Vec::with_capacity(n);
        let mut threads = Vec::with_capacity(n);
        for index in 0..n {
            let runtime = Builder::new_current_thread().enable_all().build()?;
            handles.push(runtime.handle().clone());
            let mut stopped = stop.subscribe();
            let thread = std::thread::Builder::new()
                .name(format!("palisade-worker-{index}"))
                .spawn(move || {
                    INDEX.with(|i| i.set(Some(index)));
                    runtime.block_on(async move {
                        let _ = stopped.wait_for(|s| *s).await;
                    });
                    runtime.shutdown_timeout(Duration::from_secs(1));
                })?;
            threads.push(thread);
        }
        Ok(Workers {
            handles,
            stop,
            threads,
        })
    }

    /// A handle on each worker's runtime, to spawn its accept loops on.
    pub fn handles(&self) -> &[Handle] {
        &self.handles
    }

    /// Stops every worker thread (after the drain) and waits for them.
    pub fn shutdown(self) {
        let _ = self.stop.send(true);
        for t in self.threads {
            let _ = t.join();
        }
    }
}
