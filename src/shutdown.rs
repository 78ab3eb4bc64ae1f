//! Shutdown in two phases: drain (stop accepting, `/readyz` 503, live connections carry on),
//! then close (every relay sends 1001 on both legs and ends within the close bound).
//!
//! `Drain` is one handle shared by the accept loop, the relays, the admin server (`/drain`) and
//! the signal handler. Relay tasks are spawned on its `TaskTracker`, because hyper's connection
//! future ends at the upgrade and would not otherwise be waited for.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// Bound on every close frame wskeep writes and every closing handshake it waits for.
pub const CLOSE_BOUND: Duration = Duration::from_secs(2);

#[derive(Clone)]
pub struct Drain {
    inner: Arc<Inner>,
}

struct Inner {
    /// Draining: refuse new connections, report not ready.
    draining: CancellationToken,
    /// The drain timeout passed (or a second signal came): close every connection now.
    closing: CancellationToken,
    /// A signal asked the process to exit once the connections are closed.
    exit: CancellationToken,
    tasks: TaskTracker,
    drain_timeout: Duration,
}

impl Drain {
    pub fn new(drain_timeout: Duration) -> Drain {
        Drain {
            inner: Arc::new(Inner {
                draining: CancellationToken::new(),
                closing: CancellationToken::new(),
                exit: CancellationToken::new(),
                tasks: TaskTracker::new(),
                drain_timeout,
            }),
        }
    }

    /// Starts draining (idempotent): connections get until the drain timeout, then close.
    pub fn start(&self) {
        if self.inner.draining.is_cancelled() {
            return;
        }
        tracing::info!(drain_timeout = ?self.inner.drain_timeout, "draining: no new connections");
        self.inner.draining.cancel();
        self.inner.tasks.close();
        let closing = self.inner.closing.clone();
        let timeout = self.inner.drain_timeout;
        tokio::spawn(async move {
            tokio::select! {
                _ = tokio::time::sleep(timeout) => closing.cancel(),
                _ = closing.cancelled() => {}
            }
        });
    }

    /// Skips the rest of the drain: every connection is sent its close frames now.
    pub fn close_now(&self) {
        self.start();
        self.inner.closing.cancel();
    }

    /// Drains, and lets `Server::run` return once the connections are closed.
    pub fn shutdown(&self) {
        self.start();
        self.inner.exit.cancel();
    }

    pub fn is_draining(&self) -> bool {
        self.inner.draining.is_cancelled()
    }

    pub fn draining(&self) -> impl Future<Output = ()> + Send + 'static {
        self.inner.draining.clone().cancelled_owned()
    }

    pub fn closing(&self) -> tokio_util::sync::WaitForCancellationFutureOwned {
        self.inner.closing.clone().cancelled_owned()
    }

    /// The close phase as a token, for loops that check it cheaply on every turn.
    pub fn closing_token(&self) -> CancellationToken {
        self.inner.closing.clone()
    }

    pub fn exit_requested(&self) -> impl Future<Output = ()> + Send + 'static {
        self.inner.exit.clone().cancelled_owned()
    }

    /// Spawns a task that the drain waits for.
    pub fn spawn<F>(&self, task: F)
    where
        F: Future<Output = ()> + Send + 'static,
    {
        self.inner.tasks.spawn(task);
    }

    /// Resolves when every tracked task has ended after the drain started, or when the close
    /// phase has had its bound (a stuck peer cannot hold the process).
    pub async fn finished(&self) {
        self.draining().await;
        let closing = self.closing();
        tokio::select! {
            _ = self.inner.tasks.wait() => {}
            _ = async { closing.await; tokio::time::sleep(CLOSE_BOUND + Duration::from_millis(500)).await } => {
                tracing::warn!(left = self.inner.tasks.len(), "close bound passed with tasks still running");
            }
        }
    }
}

/// Resolves on SIGTERM (Kubernetes, systemd) or SIGINT (a terminal's Ctrl-C).
pub async fn signal() {
    use tokio::signal::unix::{signal, SignalKind};
    // Installing a handler only fails if the signal number is invalid; these two are not.
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    let mut int = signal(SignalKind::interrupt()).expect("SIGINT handler");
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM received"),
        _ = int.recv() => tracing::info!("SIGINT received"),
    }
}
