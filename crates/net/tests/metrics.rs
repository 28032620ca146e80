//! The loopback-only Prometheus endpoint.

use std::sync::Arc;

use nitrile_net::{NetError, Registry, bind_metrics, serve_metrics};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

async fn get(addr: std::net::SocketAddr, path: &str) -> String {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(
        format!("GET {path} HTTP/1.1\r\nhost: localhost\r\nconnection: close\r\n\r\n").as_bytes(),
    )
    .await
    .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    out
}

#[tokio::test]
async fn metrics_endpoint_serves_counters() {
    let registry = Arc::new(Registry::new());
    let requests = registry
        .counter("nitrile_test_requests_total", "Requests.")
        .unwrap();
    let open = registry.gauge("nitrile_test_open", "Open things.").unwrap();
    requests.add(41);
    requests.inc();
    open.set(3);
    let listener = bind_metrics("127.0.0.1:0".parse().unwrap()).await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(serve_metrics(listener, Arc::clone(&registry), async {
        let _ = stopped.await;
    }));
    let resp = get(addr, "/metrics").await;
    assert!(resp.starts_with("HTTP/1.1 200"), "{resp}");
    assert!(resp.contains("text/plain; version=0.0.4"), "{resp}");
    assert!(
        resp.contains("# TYPE nitrile_test_requests_total counter\n"),
        "{resp}"
    );
    assert!(
        resp.contains("\nnitrile_test_requests_total 42\n"),
        "{resp}"
    );
    assert!(resp.contains("\nnitrile_test_open 3\n"), "{resp}");
    requests.inc();
    assert!(
        get(addr, "/metrics")
            .await
            .contains("\nnitrile_test_requests_total 43\n")
    );
    assert!(get(addr, "/other").await.starts_with("HTTP/1.1 404"));
    stop.send(()).unwrap();
    task.await.unwrap().unwrap();
}

#[tokio::test]
async fn non_loopback_metrics_bind_is_refused() {
    let err = bind_metrics("0.0.0.0:0".parse().unwrap())
        .await
        .unwrap_err();
    assert!(
        matches!(err, NetError::MetricsNotLoopback { .. }),
        "{err:?}"
    );
    // A listener bound elsewhere is refused too.
    let listener = TcpListener::bind("0.0.0.0:0").await.unwrap();
    let err = serve_metrics(listener, Arc::new(Registry::new()), std::future::pending())
        .await
        .unwrap_err();
    assert!(
        matches!(err, NetError::MetricsNotLoopback { .. }),
        "{err:?}"
    );
}
