//! Shutdown in two phases: drain (stop accepting, `/readyz` 503, live connections carry on),
//! then close (every relay sends 1001 on both legs and ends within the close bound).
//!
//! `Drain` is one handle shared by the accept loop, the relays, the admin server (`/drain`) and
//! the signal handler. Relay tasks are spawned on its `TaskTracker`, because hyper's connection
//! future ends at the upgrade and would not otherwise be waited for.
//!
//! `Signals` says what each Unix signal means to wskeep (README, "Signals").

use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
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
    /// In milliseconds; a configuration reload may change it before a drain starts.
    drain_timeout_ms: AtomicU64,
}

impl Drain {
    pub fn new(drain_timeout: Duration) -> Drain {
        Drain {
            inner: Arc::new(Inner {
                draining: CancellationToken::new(),
                closing: CancellationToken::new(),
                exit: CancellationToken::new(),
                tasks: TaskTracker::new(),
                drain_timeout_ms: AtomicU64::new(millis(drain_timeout)),
            }),
        }
    }

    /// The drain timeout of a drain that starts later (one already running keeps its own).
    pub fn set_timeout(&self, drain_timeout: Duration) {
        self.inner.drain_timeout_ms.store(millis(drain_timeout), Relaxed);
    }

    /// Starts draining (idempotent): connections get until the drain timeout, then close.
    pub fn start(&self) {
        if self.inner.draining.is_cancelled() {
            return;
        }
        let timeout = Duration::from_millis(self.inner.drain_timeout_ms.load(Relaxed));
        tracing::info!(drain_timeout = ?timeout, "draining: no new connections");
        self.inner.draining.cancel();
        self.inner.tasks.close();
        let closing = self.inner.closing.clone();
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

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// What a signal asks of wskeep.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Signal {
    /// TERM (Kubernetes, systemd), INT (Ctrl-C), QUIT (Ctrl-\, the stop signal of some
    /// images): drain, then exit 0; a second one closes every connection at once.
    Stop(&'static str),
    /// HUP: reload the configuration file (a closing terminal sends it too: it must not kill).
    Reload,
    /// USR1, USR2: logged and ignored, never fatal (their default action ends the process).
    Ignore(&'static str),
}

/// The handlers of every signal wskeep answers. Installing them replaces the default actions
/// (termination, and a core dump for QUIT) for the life of the process.
pub struct Signals {
    streams: Vec<(tokio::signal::unix::Signal, Signal)>,
}

impl Signals {
    /// Installs the handlers; must run inside the runtime.
    pub fn install() -> std::io::Result<Signals> {
        use tokio::signal::unix::{signal, SignalKind};
        let table = [
            (SignalKind::terminate(), Signal::Stop("SIGTERM")),
            (SignalKind::interrupt(), Signal::Stop("SIGINT")),
            (SignalKind::quit(), Signal::Stop("SIGQUIT")),
            (SignalKind::hangup(), Signal::Reload),
            (SignalKind::user_defined1(), Signal::Ignore("SIGUSR1")),
            (SignalKind::user_defined2(), Signal::Ignore("SIGUSR2")),
        ];
        let mut streams = Vec::with_capacity(table.len());
        for (kind, meaning) in table {
            streams.push((signal(kind)?, meaning));
        }
        Ok(Signals { streams })
    }

    /// The next signal received.
    pub async fn recv(&mut self) -> Signal {
        std::future::poll_fn(|cx| {
            for (stream, meaning) in &mut self.streams {
                if let std::task::Poll::Ready(Some(())) = stream.poll_recv(cx) {
                    return std::task::Poll::Ready(*meaning);
                }
            }
            std::task::Poll::Pending
        })
        .await
    }
}
