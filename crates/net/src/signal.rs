//! Waiting for the operator (or the init system) to ask for a stop.

use std::future::Future;

use tokio::signal::unix::{Signal, SignalKind, signal};

/// Resolves on the first SIGINT or SIGTERM.
///
/// The handlers are installed when this is called, not when the future is
/// first polled: call it before announcing readiness, so that a signal sent
/// right after the announcement stops the service cleanly instead of killing
/// it. Must be called inside a tokio runtime. If a handler cannot be
/// installed, that signal is logged and ignored; the other still works.
pub fn shutdown_signal() -> impl Future<Output = ()> + Send + 'static {
    let install = |kind: SignalKind, name: &'static str| match signal(kind) {
        Ok(s) => Some(s),
        Err(e) => {
            tracing::warn!(error = %e, "cannot listen for {name}");
            None
        }
    };
    let term = install(SignalKind::terminate(), "SIGTERM");
    let int = install(SignalKind::interrupt(), "SIGINT");
    async move {
        tokio::select! {
            () = recv(term) => tracing::info!("SIGTERM received; shutting down"),
            () = recv(int) => tracing::info!("SIGINT received; shutting down"),
        }
    }
}

async fn recv(signal: Option<Signal>) {
    match signal {
        Some(mut s) => {
            s.recv().await;
        }
        None => std::future::pending::<()>().await,
    }
}
