//! The sockets every service binds at start, and its metrics endpoint while
//! it serves.

use std::net::SocketAddr;
use std::sync::Arc;

use nitrile_net::{NetError, Registry, bind_metrics, serve_metrics};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// A service's sockets, bound before it serves: its one mTLS port and, when
/// configured, a loopback-only metrics port.
#[derive(Debug)]
pub struct Listeners {
    /// The mTLS port.
    pub mtls: TcpListener,
    /// The plain-HTTP metrics port (loopback only), if any.
    pub metrics: Option<TcpListener>,
}

impl Listeners {
    /// Binds `listen` and, if given, `metrics`; a metrics address that is
    /// not loopback is refused ([`NetError::MetricsNotLoopback`]).
    pub async fn bind(listen: SocketAddr, metrics: Option<SocketAddr>) -> Result<Self, NetError> {
        let mtls = TcpListener::bind(listen)
            .await
            .map_err(|source| NetError::Listener {
                addr: Some(listen),
                source,
            })?;
        let metrics = match metrics {
            Some(addr) => Some(bind_metrics(addr).await?),
            None => None,
        };
        Ok(Self { mtls, metrics })
    }

    /// The bound mTLS address.
    pub fn local_addr(&self) -> Option<SocketAddr> {
        self.mtls.local_addr().ok()
    }

    /// The bound metrics address, if any.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics.as_ref().and_then(|l| l.local_addr().ok())
    }
}

/// The metrics endpoint of a serving service: `GET /metrics` on the
/// metrics listener until told to stop.
#[derive(Debug)]
pub struct MetricsTask(Option<JoinHandle<Result<(), NetError>>>);

impl MetricsTask {
    /// Serves `registry` on `listener` (nothing when `None`) until `stop`
    /// turns true.
    pub fn spawn(
        listener: Option<TcpListener>,
        registry: Arc<Registry>,
        mut stop: watch::Receiver<bool>,
    ) -> Self {
        Self(listener.map(|l| {
            tokio::spawn(serve_metrics(l, registry, async move {
                let _ = stop.wait_for(|s| *s).await;
            }))
        }))
    }

    /// Waits for the endpoint to stop (after its `stop` turned true); a
    /// failure is logged.
    pub async fn join(self) {
        if let Some(task) = self.0
            && let Ok(Err(e)) = task.await
        {
            tracing::warn!(error = %e, "metrics server failed");
        }
    }
}
