//! The mTLS server and client over real sockets with real certificates.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use nitrile_api::wire::RefusalStep;
use nitrile_api::{Name, PrincipalId};
use nitrile_net::{Client, Handler, NetError, Registry, Server, json_response};
use nitrile_pki::tls::danger::{
    danger_client_config_tls12_only, danger_client_config_without_certificate,
};
use nitrile_pki::tls::{CaRoots, TlsIdentity, client_config, server_config};
use nitrile_pki::{CellCa, PeerIdentity, PkiError};
use tokio::net::TcpListener;
use tokio::sync::{Notify, oneshot};
use tokio::task::JoinHandle;

struct Cell {
    _dir: tempfile::TempDir,
    ca: CellCa,
    roots: CaRoots,
}

fn now() -> time::OffsetDateTime {
    time::OffsetDateTime::now_utc()
}

fn cell(name: &str) -> Cell {
    let dir = tempfile::tempdir().unwrap();
    let ca = CellCa::init_or_load(dir.path(), &Name::new(name).unwrap(), now()).unwrap();
    let roots = CaRoots::from_pem(ca.cert_pem().as_bytes()).unwrap();
    Cell {
        _dir: dir,
        ca,
        roots,
    }
}

fn identity(cell: &Cell, principal: &str) -> TlsIdentity {
    let issued = cell
        .ca
        .issue(&PrincipalId::parse(principal).unwrap(), None, now())
        .unwrap();
    TlsIdentity::from_issued(&issued).unwrap()
}

fn alice_id() -> PrincipalId {
    PrincipalId::parse("nitrile://c1/operator/alice").unwrap()
}

fn tokend() -> PrincipalId {
    PrincipalId::parse("nitrile://c1/service/tokend").unwrap()
}

#[derive(Debug, Clone)]
struct Seen {
    principal: PrincipalId,
    cert_sha256: [u8; 32],
    path: String,
    authorization: Option<String>,
    body: Bytes,
}

#[derive(Default)]
struct State {
    seen: Mutex<Vec<Seen>>,
    refusals: Mutex<Vec<(String, Option<[u8; 32]>)>>,
    unreadable: Mutex<Vec<(PrincipalId, String, u16)>>,
    slow_started: Notify,
    slow_release: Notify,
}

#[derive(Clone, Default)]
struct Recorder(Arc<State>);

impl Handler for Recorder {
    async fn handle(&self, peer: PeerIdentity, req: Request<Bytes>) -> Response<Bytes> {
        let path = req.uri().path().to_owned();
        self.0.seen.lock().unwrap().push(Seen {
            principal: peer.principal.clone(),
            cert_sha256: peer.cert_sha256,
            path: path.clone(),
            authorization: req
                .headers()
                .get(http::header::AUTHORIZATION)
                .map(|v| v.to_str().unwrap().to_owned()),
            body: req.body().clone(),
        });
        if path == "/slow" {
            self.0.slow_started.notify_one();
            self.0.slow_release.notified().await;
        }
        json_response(
            StatusCode::OK,
            &serde_json::json!({ "principal": peer.principal, "len": req.body().len() }),
        )
    }

    async fn request_unreadable(
        &self,
        peer: PeerIdentity,
        _method: String,
        path: String,
        status: u16,
        _reason: String,
    ) {
        self.0
            .unreadable
            .lock()
            .unwrap()
            .push((peer.principal, path, status));
    }

    async fn refused_at_tls(&self, reason: &PkiError, cert_sha256: Option<[u8; 32]>) {
        self.0
            .refusals
            .lock()
            .unwrap()
            .push((reason.to_string(), cert_sha256));
    }
}

struct Running {
    addr: SocketAddr,
    registry: Arc<Registry>,
    recorder: Recorder,
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<Result<(), NetError>>,
}

impl Running {
    fn counter(&self, name: &str) -> u64 {
        self.registry
            .counter(&format!("test_{name}"), "")
            .unwrap()
            .get()
    }

    /// Waits until the server has counted `n` of `name` (the server counts
    /// after the client may already have seen the outcome).
    async fn wait_counter(&self, name: &str, n: u64) {
        for _ in 0..500 {
            if self.counter(name) >= n {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(self.counter(name), n, "{name}");
    }

    async fn stop(mut self) {
        self.stop.take().unwrap().send(()).unwrap();
        self.task.await.unwrap().unwrap();
    }
}

async fn start(c1: &Cell, server_cell: &str) -> Running {
    let server_id = identity(c1, "nitrile://c1/service/tokend");
    let tls = server_config(&c1.roots, &server_id).unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let registry = Arc::new(Registry::new());
    let recorder = Recorder::default();
    let (stop, stopped) = oneshot::channel::<()>();
    let server = Server::new(tls, Name::new(server_cell).unwrap())
        .with_metrics(Arc::clone(&registry), "test")
        .with_shutdown_grace(Duration::from_secs(30));
    let handler = recorder.clone();
    let task = tokio::spawn(async move {
        server
            .serve(listener, handler, async {
                let _ = stopped.await;
            })
            .await
    });
    Running {
        addr,
        registry,
        recorder,
        stop: Some(stop),
        task,
    }
}

#[tokio::test]
async fn mtls_round_trip_handler_sees_principal_and_cert_hash() {
    let c1 = cell("c1");
    let server = start(&c1, "c1").await;
    let alice = identity(&c1, "nitrile://c1/operator/alice");
    let mut client = Client::connect(
        &server.addr.to_string(),
        &tokend(),
        client_config(&c1.roots, &alice).unwrap(),
    )
    .await
    .unwrap();
    let resp = client
        .post_json("/v1/echo", &serde_json::json!({"hello": "world"}))
        .await
        .unwrap();
    assert_eq!(resp.status, StatusCode::OK);
    let body: serde_json::Value = resp.json().unwrap();
    assert_eq!(body["principal"], "nitrile://c1/operator/alice");
    let resp = client
        .post_json_with_bearer("/v1/with-token", "tok.en-1", &serde_json::json!({}))
        .await
        .unwrap();
    assert_eq!(resp.status, StatusCode::OK);
    let seen = server.recorder.0.seen.lock().unwrap().clone();
    assert_eq!(seen.len(), 2);
    assert_eq!(seen[0].principal.uri(), "nitrile://c1/operator/alice");
    assert_eq!(seen[0].cert_sha256, alice.leaf_sha256());
    assert_eq!(seen[0].path, "/v1/echo");
    assert_eq!(&seen[0].body[..], br#"{"hello":"world"}"#);
    assert_eq!(seen[0].authorization, None);
    assert_eq!(seen[1].authorization.as_deref(), Some("Bearer tok.en-1"));
    server.stop().await;
}

/// Asserts that connecting and calling fails at TLS, and that the server
/// counted a handshake failure and never ran the handler.
async fn assert_refused_at_handshake(server: &Running, tls: Arc<rustls::ClientConfig>) {
    let outcome = match Client::connect(&server.addr.to_string(), &tokend(), tls).await {
        // TLS 1.3: the client finishes its side before the server has
        // judged the client certificate; the refusal arrives as an alert.
        Ok(mut client) => client.get_json("/v1/echo").await.map(|r| r.status),
        Err(e) => Err(e),
    };
    let err = outcome.expect_err("got an HTTP answer");
    assert!(err.is_tls(), "{err:?}");
    server.wait_counter("tls_handshake_failures_total", 1).await;
    assert_eq!(server.counter("tls_sessions_total"), 0);
    assert_eq!(server.counter("requests_total"), 0);
    assert!(server.recorder.0.seen.lock().unwrap().is_empty());
}

#[tokio::test]
async fn client_with_cert_from_another_ca_gets_no_http_answer() {
    let c1 = cell("c1");
    let impostor = cell("c1");
    let server = start(&c1, "c1").await;
    // Trusts the real CA (so the server is accepted) but presents a
    // certificate for the same principal from another CA.
    let forged = identity(&impostor, "nitrile://c1/operator/alice");
    assert_refused_at_handshake(&server, client_config(&c1.roots, &forged).unwrap()).await;
    server.stop().await;
}

#[tokio::test]
async fn client_without_certificate_gets_no_http_answer() {
    let c1 = cell("c1");
    let server = start(&c1, "c1").await;
    assert_refused_at_handshake(
        &server,
        danger_client_config_without_certificate(&c1.roots).unwrap(),
    )
    .await;
    server.stop().await;
}

#[tokio::test]
async fn tls12_only_client_is_refused() {
    let c1 = cell("c1");
    let server = start(&c1, "c1").await;
    let alice = identity(&c1, "nitrile://c1/operator/alice");
    let err = Client::connect(
        &server.addr.to_string(),
        &tokend(),
        danger_client_config_tls12_only(&c1.roots, &alice).unwrap(),
    )
    .await
    .unwrap_err();
    assert!(matches!(err, NetError::Tls(_)), "{err:?}");
    server.wait_counter("tls_handshake_failures_total", 1).await;
    assert!(server.recorder.0.seen.lock().unwrap().is_empty());
    server.stop().await;
}

#[tokio::test]
async fn certificate_of_another_cell_gets_401_at_tls_and_is_reported() {
    let c1 = cell("c1");
    // The server belongs to cell c2 but (misconfigured) trusts c1's CA: a
    // verified certificate naming a c1 principal must still be refused.
    let server = start(&c1, "c2").await;
    let alice = identity(&c1, "nitrile://c1/operator/alice");
    let mut client = Client::connect(
        &server.addr.to_string(),
        &tokend(),
        client_config(&c1.roots, &alice).unwrap(),
    )
    .await
    .unwrap();
    let resp = client.get_json("/v1/echo").await.unwrap();
    assert_eq!(resp.status, StatusCode::UNAUTHORIZED);
    let refusal = resp.refusal().unwrap();
    assert_eq!(refusal.step, RefusalStep::Tls);
    assert!(
        refusal.reason.contains("not of cell c2"),
        "{}",
        refusal.reason
    );
    let refusals = server.recorder.0.refusals.lock().unwrap().clone();
    assert_eq!(refusals.len(), 1);
    assert_eq!(refusals[0].1, Some(alice.leaf_sha256()));
    assert!(server.recorder.0.seen.lock().unwrap().is_empty());
    assert_eq!(server.counter("tls_identity_refusals_total"), 1);
    server.stop().await;
}

#[tokio::test]
async fn oversize_body_gets_413() {
    let c1 = cell("c1");
    let server = start(&c1, "c1").await;
    let alice = identity(&c1, "nitrile://c1/operator/alice");
    let mut client = Client::connect(
        &server.addr.to_string(),
        &tokend(),
        client_config(&c1.roots, &alice).unwrap(),
    )
    .await
    .unwrap();
    let big = "x".repeat(nitrile_net::MAX_BODY + 1);
    let resp = client.post_json("/v1/echo", &big).await.unwrap();
    assert_eq!(resp.status, StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(resp.refusal().unwrap().step, RefusalStep::Request);
    assert!(server.recorder.0.seen.lock().unwrap().is_empty());
    // The handler is told, so that the service can journal the refusal.
    assert_eq!(
        *server.recorder.0.unreadable.lock().unwrap(),
        [(alice_id(), "/v1/echo".to_owned(), 413)]
    );
    // Just under the limit is served (the JSON string adds two quotes).
    let fits = "x".repeat(nitrile_net::MAX_BODY - 2);
    let resp = client.post_json("/v1/echo", &fits).await.unwrap();
    assert_eq!(resp.status, StatusCode::OK);
    assert_eq!(
        server.recorder.0.seen.lock().unwrap()[0].body.len(),
        nitrile_net::MAX_BODY
    );
    assert_eq!(server.counter("request_body_too_large_total"), 1);
    server.stop().await;
}

#[tokio::test]
async fn keep_alive_reuses_one_connection() {
    let c1 = cell("c1");
    let server = start(&c1, "c1").await;
    let alice = identity(&c1, "nitrile://c1/operator/alice");
    let mut client = Client::connect(
        &server.addr.to_string(),
        &tokend(),
        client_config(&c1.roots, &alice).unwrap(),
    )
    .await
    .unwrap();
    for i in 0..5 {
        let resp = client.get_json(&format!("/v1/n/{i}")).await.unwrap();
        assert_eq!(resp.status, StatusCode::OK);
    }
    assert_eq!(client.connections_made(), 1);
    assert_eq!(server.counter("connections_accepted_total"), 1);
    assert_eq!(server.counter("tls_sessions_total"), 1);
    assert_eq!(server.counter("requests_total"), 5);
    assert_eq!(server.recorder.0.seen.lock().unwrap().len(), 5);
    server.stop().await;
}

#[tokio::test]
async fn shutdown_lets_in_flight_requests_finish() {
    let c1 = cell("c1");
    let server = start(&c1, "c1").await;
    let alice = identity(&c1, "nitrile://c1/operator/alice");
    let mut client = Client::connect(
        &server.addr.to_string(),
        &tokend(),
        client_config(&c1.roots, &alice).unwrap(),
    )
    .await
    .unwrap();
    let state = Arc::clone(&server.recorder.0);
    let started = state.slow_started.notified();
    let call = tokio::spawn(async move { client.get_json("/slow").await });
    started.await;
    let addr = server.addr;
    let stopping = tokio::spawn(server.stop());
    // Give the server every chance to (wrongly) drop the request: wait
    // until it no longer accepts connections.
    for _ in 0..500 {
        if tokio::net::TcpStream::connect(addr).await.is_err() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(tokio::net::TcpStream::connect(addr).await.is_err());
    state.slow_release.notify_one();
    let resp = call.await.unwrap().unwrap();
    assert_eq!(resp.status, StatusCode::OK);
    stopping.await.unwrap();
}
