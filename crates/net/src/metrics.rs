//! A tiny registry of counters and gauges, served in the Prometheus text
//! format on a loopback-only plain HTTP port.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::fmt::Write as _;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::task::JoinSet;

use crate::NetError;

/// Longest metric name accepted.
const MAX_METRIC_NAME: usize = 128;

/// Why a metric could not be registered.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum MetricsError {
    /// The name is not `[a-zA-Z_:][a-zA-Z0-9_:]*` of at most 128 bytes.
    #[error("{0:?} is not a valid metric name")]
    BadName(String),
    /// The name is already registered as another kind of metric.
    #[error("metric {0:?} is already registered as another kind")]
    KindMismatch(String),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Counter,
    Gauge,
}

#[derive(Debug)]
struct Entry {
    help: String,
    kind: Kind,
    value: Arc<AtomicU64>,
}

/// A monotonically increasing count.
#[derive(Debug, Clone)]
pub struct Counter(Arc<AtomicU64>);

impl Counter {
    /// Adds one.
    pub fn inc(&self) {
        self.add(1);
    }

    /// Adds `n`.
    pub fn add(&self, n: u64) {
        self.0.fetch_add(n, Ordering::Relaxed);
    }

    /// The current value.
    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// A value that goes up and down (never below zero).
#[derive(Debug, Clone)]
pub struct Gauge(Arc<AtomicU64>);

impl Gauge {
    /// Sets the value.
    pub fn set(&self, v: u64) {
        self.0.store(v, Ordering::Relaxed);
    }

    /// Adds one.
    pub fn inc(&self) {
        self.0.fetch_add(1, Ordering::Relaxed);
    }

    /// Subtracts one, stopping at zero.
    pub fn dec(&self) {
        let _ = self
            .0
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |v| v.checked_sub(1));
    }

    /// The current value.
    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// Named counters and gauges of one process.
#[derive(Debug, Default)]
pub struct Registry {
    entries: Mutex<BTreeMap<String, Entry>>,
}

fn valid_name(name: &str) -> bool {
    let ok_first = |c: u8| c.is_ascii_alphabetic() || c == b'_' || c == b':';
    let ok_rest = |c: u8| ok_first(c) || c.is_ascii_digit();
    let b = name.as_bytes();
    !b.is_empty()
        && b.len() <= MAX_METRIC_NAME
        && ok_first(b[0])
        && b[1..].iter().all(|&c| ok_rest(c))
}

impl Registry {
    /// An empty registry.
    pub fn new() -> Self {
        Self::default()
    }

    fn register(&self, name: &str, help: &str, kind: Kind) -> Result<Arc<AtomicU64>, MetricsError> {
        if !valid_name(name) {
            return Err(MetricsError::BadName(name.chars().take(80).collect()));
        }
        let mut entries = self.entries.lock().unwrap_or_else(PoisonError::into_inner);
        let entry = entries.entry(name.to_owned()).or_insert_with(|| Entry {
            help: help.to_owned(),
            kind,
            value: Arc::new(AtomicU64::new(0)),
        });
        if entry.kind != kind {
            return Err(MetricsError::KindMismatch(name.to_owned()));
        }
        Ok(Arc::clone(&entry.value))
    }

    /// Registers a counter, or returns the one already registered under
    /// `name`.
    pub fn counter(&self, name: &str, help: &str) -> Result<Counter, MetricsError> {
        self.register(name, help, Kind::Counter).map(Counter)
    }

    /// Registers a gauge, or returns the one already registered under
    /// `name`.
    pub fn gauge(&self, name: &str, help: &str) -> Result<Gauge, MetricsError> {
        self.register(name, help, Kind::Gauge).map(Gauge)
    }

    /// The Prometheus text exposition (format 0.0.4) of every metric, in name
    /// order.
    pub fn render(&self) -> String {
        let entries = self.entries.lock().unwrap_or_else(PoisonError::into_inner);
        let mut out = String::new();
        for (name, e) in entries.iter() {
            let help = e.help.replace('\\', "\\\\").replace('\n', "\\n");
            let kind = match e.kind {
                Kind::Counter => "counter",
                Kind::Gauge => "gauge",
            };
            let _ = writeln!(out, "# HELP {name} {help}");
            let _ = writeln!(out, "# TYPE {name} {kind}");
            let _ = writeln!(out, "{name} {}", e.value.load(Ordering::Relaxed));
        }
        out
    }
}

/// Binds a metrics listener, refusing any address that is not loopback.
pub async fn bind_metrics(addr: SocketAddr) -> Result<TcpListener, NetError> {
    if !addr.ip().is_loopback() {
        return Err(NetError::MetricsNotLoopback { addr });
    }
    TcpListener::bind(addr)
        .await
        .map_err(|source| NetError::Listener {
            addr: Some(addr),
            source,
        })
}

/// Answers `GET /metrics` with the registry in Prometheus text format, over
/// plain HTTP, until `shutdown` resolves. Refuses a listener that is not
/// bound to a loopback address: metrics are for the local scraper only.
pub async fn serve_metrics(
    listener: TcpListener,
    registry: Arc<Registry>,
    shutdown: impl Future<Output = ()>,
) -> Result<(), NetError> {
    let addr = listener
        .local_addr()
        .map_err(|source| NetError::Listener { addr: None, source })?;
    if !addr.ip().is_loopback() {
        return Err(NetError::MetricsNotLoopback { addr });
    }
    let mut tasks = JoinSet::new();
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            () = &mut shutdown => break,
            accepted = listener.accept() => {
                let (tcp, _) = match accepted {
                    Ok(a) => a,
                    Err(e) => {
                        tracing::warn!(error = %e, "metrics accept failed");
                        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                        continue;
                    }
                };
                let registry = Arc::clone(&registry);
                tasks.spawn(async move {
                    let svc = service_fn(move |req: Request<Incoming>| {
                        let registry = Arc::clone(&registry);
                        async move { Ok::<_, Infallible>(metrics_response(&req, &registry)) }
                    });
                    let _ = http1::Builder::new()
                        .timer(TokioTimer::new())
                        .header_read_timeout(std::time::Duration::from_secs(10))
                        .serve_connection(TokioIo::new(tcp), svc)
                        .await;
                });
            }
            Some(_) = tasks.join_next(), if !tasks.is_empty() => {}
        }
    }
    tasks.abort_all();
    Ok(())
}

fn metrics_response(req: &Request<Incoming>, registry: &Registry) -> Response<Full<Bytes>> {
    let (status, content_type, body) = if req.uri().path() != "/metrics" {
        (
            StatusCode::NOT_FOUND,
            "text/plain",
            "not found\n".to_owned(),
        )
    } else if req.method() != Method::GET {
        (
            StatusCode::METHOD_NOT_ALLOWED,
            "text/plain",
            "use GET\n".to_owned(),
        )
    } else {
        (
            StatusCode::OK,
            "text/plain; version=0.0.4; charset=utf-8",
            registry.render(),
        )
    };
    let mut resp = Response::new(Full::new(Bytes::from(body)));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static(content_type),
    );
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn render_is_prometheus_text() {
        let r = Registry::new();
        let c = r
            .counter("nitrile_requests_total", "Requests served.")
            .unwrap();
        let g = r.gauge("nitrile_open", "Open\nconnections.").unwrap();
        c.inc();
        c.add(2);
        g.inc();
        g.inc();
        g.dec();
        g.dec();
        g.dec();
        assert_eq!(
            r.render(),
            "# HELP nitrile_open Open\\nconnections.\n# TYPE nitrile_open gauge\nnitrile_open 0\n\
             # HELP nitrile_requests_total Requests served.\n# TYPE nitrile_requests_total counter\nnitrile_requests_total 3\n"
        );
        // Registering again shares the value; another kind is refused.
        assert_eq!(r.counter("nitrile_requests_total", "x").unwrap().get(), 3);
        assert!(matches!(
            r.gauge("nitrile_requests_total", "x"),
            Err(MetricsError::KindMismatch(_))
        ));
        for bad in ["", "1x", "a-b", "a b", "é"] {
            assert!(
                matches!(r.counter(bad, "x"), Err(MetricsError::BadName(_))),
                "{bad:?}"
            );
        }
    }
}
