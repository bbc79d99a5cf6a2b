//! Process shutdown: the signals every long-running command stops on.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

/// Resolves on SIGINT or SIGTERM received after [`signal`] was called, whenever it is first
/// awaited: a deploy's SIGTERM that arrives while a command is still starting (connecting to
/// Redis, say) is kept for it, not left to the signal's default action, which would end the
/// process at once with no graceful exit.
pub struct Shutdown {
    #[cfg(unix)]
    signals: Vec<tokio::signal::unix::Signal>,
    #[cfg(not(unix))]
    ctrl_c: Pin<Box<dyn Future<Output = std::io::Result<()>> + Send>>,
}

/// Starts listening for SIGINT and SIGTERM now. Call it first thing in a command, inside the
/// async runtime.
pub fn signal() -> Shutdown {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        let mut signals = Vec::with_capacity(2);
        for kind in [SignalKind::interrupt(), SignalKind::terminate()] {
            match signal(kind) {
                Ok(listener) => signals.push(listener),
                // Only a process with no signal support at all ends up here: it stops on
                // the signal's default action, as it would without a listener.
                Err(err) => tracing::warn!(error = %err, "cannot listen for a stop signal"),
            }
        }
        Shutdown { signals }
    }
    #[cfg(not(unix))]
    Shutdown {
        ctrl_c: Box::pin(tokio::signal::ctrl_c()),
    }
}

impl Future for Shutdown {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let this = self.get_mut();
        #[cfg(unix)]
        {
            for listener in &mut this.signals {
                if listener.poll_recv(cx).is_ready() {
                    return Poll::Ready(());
                }
            }
            Poll::Pending
        }
        #[cfg(not(unix))]
        this.ctrl_c.as_mut().poll(cx).map(|_| ())
    }
}
