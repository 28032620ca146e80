//! Attacks before authentication, on loopback: idle connections that never
//! send a ClientHello, handshake floods of garbage and certificate-less
//! hellos, one source holding every slot. The attacker connects from
//! 127.0.0.2 (and 127.0.0.3), bound before connect, so the per-source
//! limits tell it apart from the legitimate client on 127.0.0.1. Every load
//! is bounded in count and time.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;
use nitrile_api::{Name, PrincipalId};
use nitrile_net::{
    Client, Handler, Limits, PreauthReason, PreauthReport, Registry, Server, Source, json_response,
};
use nitrile_pki::tls::danger::danger_client_config_without_certificate;
use nitrile_pki::tls::{CaRoots, TlsIdentity, client_config, server_config, server_name};
use nitrile_pki::{CellCa, PeerIdentity};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::oneshot;
use tokio::task::JoinSet;

const LEGIT: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 1);
const ATTACKER: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 2);
const ATTACKER_2: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 3);
/// Longest any bounded wait of these tests lasts.
const WAIT: Duration = Duration::from_secs(60);

struct Cell {
    _dir: tempfile::TempDir,
    ca: CellCa,
    roots: CaRoots,
}

fn now() -> time::OffsetDateTime {
    time::OffsetDateTime::now_utc()
}

fn cell() -> Cell {
    let dir = tempfile::tempdir().unwrap();
    let ca = CellCa::init_or_load(dir.path(), &Name::new("c1").unwrap(), now()).unwrap();
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

fn server_principal() -> PrincipalId {
    PrincipalId::parse("nitrile://c1/service/tokend").unwrap()
}

/// Answers every request; `/slow` after a while.
#[derive(Clone, Default)]
struct Recorder {
    reports: Arc<Mutex<Vec<PreauthReport>>>,
}

impl Handler for Recorder {
    async fn handle(&self, peer: PeerIdentity, req: Request<Bytes>) -> Response<Bytes> {
        if req.uri().path() == "/slow" {
            tokio::time::sleep(Duration::from_millis(1500)).await;
        }
        json_response(
            StatusCode::OK,
            &serde_json::json!({ "principal": peer.principal }),
        )
    }

    async fn preauth_report(&self, report: PreauthReport) {
        self.reports.lock().unwrap().push(report);
    }
}

/// A server on a runtime of its own thread, as a service process would
/// have; the test's clients and attackers run on the test's runtime.
struct Running {
    addr: SocketAddr,
    registry: Arc<Registry>,
    reports: Arc<Mutex<Vec<PreauthReport>>>,
    stop: Option<oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Running {
    fn counter(&self, name: &str) -> u64 {
        self.registry
            .counter(&format!("test_{name}_total"), "")
            .unwrap()
            .get()
    }

    fn gauge(&self, name: &str) -> u64 {
        self.registry
            .gauge(&format!("test_{name}"), "")
            .unwrap()
            .get()
    }

    fn reports(&self) -> Vec<PreauthReport> {
        self.reports.lock().unwrap().clone()
    }

    /// Waits (bounded) until `done` holds.
    async fn wait_until(&self, what: &str, done: impl Fn(&Self) -> bool) {
        let deadline = Instant::now() + WAIT;
        while !done(self) {
            assert!(
                Instant::now() < deadline,
                "{what} did not happen:\n{}",
                self.registry.render()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Stops the server (which reports the pending summary) and returns
    /// every report it made.
    fn stop(mut self) -> Vec<PreauthReport> {
        self.stop.take().unwrap().send(()).unwrap();
        self.thread.take().unwrap().join().unwrap();
        self.reports()
    }
}

fn start(cell: &Cell, limits: Limits) -> Running {
    let tls = server_config(&cell.roots, &identity(cell, "nitrile://c1/service/tokend")).unwrap();
    let registry = Arc::new(Registry::new());
    let recorder = Recorder::default();
    let reports = Arc::clone(&recorder.reports);
    let (stop, stopped) = oneshot::channel::<()>();
    let (addr_tx, addr_rx) = std::sync::mpsc::channel();
    let server = Server::new(tls, Name::new("c1").unwrap())
        .with_metrics(Arc::clone(&registry), "test")
        .with_limits(limits)
        .with_shutdown_grace(Duration::from_secs(5));
    let thread = std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
            addr_tx.send(listener.local_addr().unwrap()).unwrap();
            server
                .serve(listener, recorder, async {
                    let _ = stopped.await;
                })
                .await
                .unwrap();
        });
    });
    Running {
        addr: addr_rx.recv().unwrap(),
        registry,
        reports,
        stop: Some(stop),
        thread: Some(thread),
    }
}

/// Raises this process's open files limit for a few thousand sockets.
fn raise_nofile(want: u64) {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE).unwrap();
    assert!(
        hard >= want,
        "the open files hard limit {hard} is below the {want} this test needs"
    );
    if soft < want {
        setrlimit(Resource::RLIMIT_NOFILE, want, hard).unwrap();
    }
}

/// A TCP connection from `from` (bound before connect).
async fn connect_from(from: Ipv4Addr, to: SocketAddr) -> std::io::Result<TcpStream> {
    let socket = TcpSocket::new_v4()?;
    socket.bind(SocketAddr::new(IpAddr::V4(from), 0))?;
    socket.connect(to).await
}

/// Reads until the server closes the connection (or resets it).
async fn until_closed(tcp: &mut TcpStream) {
    let mut buf = [0u8; 256];
    loop {
        match tcp.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
    }
}

/// One failing connection attempt from `from`: plaintext garbage, or a TLS
/// 1.3 hello without a client certificate. Returns once the server has
/// ended it.
async fn failing_attempt(from: Ipv4Addr, to: SocketAddr, roots: &CaRoots, garbage: bool) {
    let mut tcp = match connect_from(from, to).await {
        Ok(tcp) => tcp,
        // Refused so fast that the reset came with the connect.
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return,
        Err(e) => panic!("the attacker could not connect: {e}"),
    };
    if garbage {
        let _ = tcp
            .write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n\x16\x03\x01garbage")
            .await;
        until_closed(&mut tcp).await;
        return;
    }
    let tls = danger_client_config_without_certificate(roots).unwrap();
    let connector = tokio_rustls::TlsConnector::from(tls);
    if let Ok(mut stream) = connector
        .connect(server_name(&server_principal()), tcp)
        .await
    {
        // TLS 1.3: the server judges the missing certificate after the
        // client's side is done; its alert (or close) ends the read.
        let _ = stream.write_all(b"GET / HTTP/1.1\r\n\r\n").await;
        let mut buf = [0u8; 256];
        if let Ok(n) = stream.read(&mut buf).await {
            assert_eq!(n, 0, "a client without a certificate got an answer");
        }
    }
}

/// `total` failing attempts from `from`, `concurrency` at a time, garbage
/// and hellos alternating (or only one kind).
async fn flood(
    from: Ipv4Addr,
    to: SocketAddr,
    roots: &CaRoots,
    total: u64,
    concurrency: u64,
    kind: Option<bool>,
) {
    let next = Arc::new(AtomicU64::new(0));
    let mut tasks = JoinSet::new();
    for _ in 0..concurrency {
        let (next, roots) = (Arc::clone(&next), roots.clone());
        tasks.spawn(async move {
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= total {
                    return;
                }
                let garbage = kind.unwrap_or(i % 2 == 0);
                failing_attempt(from, to, &roots, garbage).await;
            }
        });
    }
    while let Some(r) = tasks.join_next().await {
        r.unwrap();
    }
}

/// A call over a fresh mTLS connection from `from`, with `identity`.
async fn call_from(
    from: Ipv4Addr,
    to: SocketAddr,
    roots: &CaRoots,
    identity: &TlsIdentity,
) -> Result<StatusCode, String> {
    let tcp = connect_from(from, to).await.map_err(|e| e.to_string())?;
    let connector = tokio_rustls::TlsConnector::from(client_config(roots, identity).unwrap());
    let tls = connector
        .connect(server_name(&server_principal()), tcp)
        .await
        .map_err(|e| e.to_string())?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
        .await
        .map_err(|e| e.to_string())?;
    tokio::spawn(conn);
    let req = Request::get("/v1/ping")
        .header(http::header::HOST, "x")
        .body(Empty::<Bytes>::new())
        .unwrap();
    let resp = sender.send_request(req).await.map_err(|e| e.to_string())?;
    Ok(resp.status())
}

/// A legitimate call from 127.0.0.1 on a connection of its own.
async fn legit_call(server: &Running, tls: &Arc<rustls::ClientConfig>) -> StatusCode {
    let mut client = Client::connect(
        &server.addr.to_string(),
        &server_principal(),
        Arc::clone(tls),
    )
    .await
    .expect("legitimate connect");
    client
        .get_json("/v1/ping")
        .await
        .expect("legitimate call")
        .status
}

/// Idle attackers: `n` connections from `from` that send nothing; each one
/// the server closes is opened again after `pause`, up to `budget`
/// connections in all, until `stop`. Returns when the first `n` are open,
/// with the instant the first of them was.
async fn idle_attack(
    from: Ipv4Addr,
    to: SocketAddr,
    n: usize,
    pause: Duration,
    budget: u64,
    stop: &Arc<AtomicBool>,
    tasks: &mut JoinSet<()>,
) -> Instant {
    let made = Arc::new(AtomicU64::new(0));
    let mut first = None;
    for _ in 0..n {
        // A connection refused at once may fail its connect with a reset;
        // it was made all the same.
        let opened = connect_from(from, to).await;
        first.get_or_insert_with(Instant::now);
        made.fetch_add(1, Ordering::Relaxed);
        let (stop, made) = (Arc::clone(stop), Arc::clone(&made));
        tasks.spawn(async move {
            let mut tcp = opened.ok();
            loop {
                if let Some(tcp) = tcp.as_mut() {
                    until_closed(tcp).await;
                }
                tokio::time::sleep(pause).await;
                if stop.load(Ordering::Relaxed) || made.fetch_add(1, Ordering::Relaxed) >= budget {
                    // Idle until the test ends.
                    while !stop.load(Ordering::Relaxed) {
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                    return;
                }
                tcp = connect_from(from, to).await.ok();
            }
        });
    }
    first.unwrap()
}

fn failures(reports: &[PreauthReport]) -> Vec<&nitrile_net::PreauthFailure> {
    reports
        .iter()
        .filter_map(|r| match r {
            PreauthReport::Failure(f) => Some(f),
            _ => None,
        })
        .collect()
}

fn summaries(reports: &[PreauthReport]) -> Vec<&nitrile_net::PreauthSummary> {
    reports
        .iter()
        .filter_map(|r| match r {
            PreauthReport::Summary(s) => Some(s),
            _ => None,
        })
        .collect()
}

/// The old server took a permit of a global semaphore (1,024) before
/// `accept` and gave a handshake 10 s: 2,000 idle connections kept every
/// later connection in the listen queue until the first idle ones timed
/// out, 10 s after the first of them connected. Now the accept loop never
/// waits, the idle source holds only its own handshake slots, and the
/// legitimate client's 20 calls on fresh connections all complete long
/// before that (9 s is generous: each call takes milliseconds).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_connections_from_one_address_do_not_keep_a_legitimate_client_out() {
    raise_nofile(8192);
    let cell = cell();
    let server = start(&cell, Limits::default());
    let stop = Arc::new(AtomicBool::new(false));
    let mut attackers = JoinSet::new();
    let first = idle_attack(
        ATTACKER,
        server.addr,
        2000,
        Duration::from_millis(200),
        10_000,
        &stop,
        &mut attackers,
    )
    .await;

    let tls = client_config(&cell.roots, &identity(&cell, "nitrile://c1/operator/alice")).unwrap();
    let deadline = tokio::time::Instant::from_std(first + Duration::from_secs(9));
    let calls = tokio::time::timeout_at(deadline, async {
        for _ in 0..20 {
            assert_eq!(legit_call(&server, &tls).await, StatusCode::OK);
        }
    })
    .await;
    // Still idle connections held while the calls were made.
    let held = server.gauge("handshakes_in_progress");
    stop.store(true, Ordering::Relaxed);
    assert!(
        calls.is_ok(),
        "the legitimate calls did not complete while idle connections were held:\n{}",
        server.registry.render()
    );
    assert!(held >= 1, "the idle connections were not held");
    assert!(server.counter("preauth_refused_source_handshakes") >= 1);
    assert_eq!(server.counter("tls_sessions"), 20);
    attackers.abort_all();
    while attackers.join_next().await.is_some() {}
    server.stop();
}

/// A flood of garbage and certificate-less hellos from one address while a
/// legitimate client works: its calls succeed, and the flood's handshakes
/// are cut to the source's rate (the old server did every one of them).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_handshake_flood_is_held_to_its_rate_and_legitimate_calls_succeed() {
    raise_nofile(4096);
    let cell = cell();
    let mut limits = Limits::default();
    limits.handshake_rate_per_source = 20;
    limits.handshake_burst_per_source = 40;
    limits.report_interval = Duration::from_secs(3600);
    let server = start(&cell, limits);
    let tls = client_config(&cell.roots, &identity(&cell, "nitrile://c1/operator/alice")).unwrap();
    let mut keep_alive = Client::connect(
        &server.addr.to_string(),
        &server_principal(),
        Arc::clone(&tls),
    )
    .await
    .unwrap();

    const ATTEMPTS: u64 = 1500;
    let started = Instant::now();
    let roots = cell.roots.clone();
    let addr = server.addr;
    let flooding =
        tokio::spawn(async move { flood(ATTACKER, addr, &roots, ATTEMPTS, 8, None).await });
    let mut calls = 0;
    while !flooding.is_finished() || calls < 20 {
        assert_eq!(legit_call(&server, &tls).await, StatusCode::OK);
        let resp = keep_alive.get_json("/v1/ping").await.unwrap();
        assert_eq!(resp.status, StatusCode::OK);
        calls += 1;
        // The legitimate client's own bucket (40, 20/s) is not the test.
        tokio::time::sleep(Duration::from_millis(60)).await;
    }
    flooding.await.unwrap();
    let elapsed = started.elapsed();
    let legit_handshakes = calls + 1;
    server
        .wait_until("every connection accounted for", |s| {
            s.counter("connections_accepted") == ATTEMPTS + legit_handshakes
                && s.gauge("handshakes_in_progress") == 0
        })
        .await;
    // The attacker's handshakes started: at most its burst plus its rate
    // over the time it flooded.
    let attacker_handshakes = server.counter("tls_handshake_failures");
    let bound = 40 + (20.0 * elapsed.as_secs_f64()).ceil() as u64;
    assert!(
        attacker_handshakes <= bound,
        "{attacker_handshakes} handshakes from the flooding address in {elapsed:?} (at most {bound})"
    );
    assert_eq!(
        attacker_handshakes
            + server.counter("preauth_refused_source_rate")
            + server.counter("preauth_refused_source_handshakes"),
        ATTEMPTS
    );
    assert_eq!(server.counter("tls_sessions"), legit_handshakes);
    let reports = server.stop();
    let total: u64 = reports.iter().map(PreauthReport::count).sum();
    assert_eq!(total, ATTEMPTS);
}

/// Checks the reports of a run: at most `max_individual` failures one by
/// one per interval (at most `per_source` of one source), at most one
/// summary per interval, every summary consistent, and the counts adding
/// up to exactly `made`.
fn assert_bounded_and_complete(
    reports: &[PreauthReport],
    limits: &Limits,
    made: u64,
) -> BTreeMap<Source, u64> {
    let mut per_interval: BTreeMap<SystemTime, (usize, BTreeMap<Source, usize>)> = BTreeMap::new();
    for f in failures(reports) {
        let (n, by_source) = per_interval.entry(f.interval_start).or_default();
        *n += 1;
        *by_source.entry(f.source).or_default() += 1;
        assert!(f.reason.is_handshake_failure(), "{f:?}");
        assert_eq!(Source::from(f.remote.ip()), f.source);
    }
    for (start, (n, by_source)) in &per_interval {
        assert!(
            *n <= limits.max_individual_reports,
            "{n} individual reports in the interval from {start:?}"
        );
        for (source, k) in by_source {
            assert!(
                *k <= limits.max_individual_reports_per_source,
                "{k} individual reports of {source}"
            );
        }
    }
    let mut starts = BTreeSet::new();
    let mut per_source = BTreeMap::new();
    for s in summaries(reports) {
        assert!(
            starts.insert(s.interval_start),
            "two summaries of one interval"
        );
        assert!(s.interval_end >= s.interval_start);
        assert!(s.total > 0, "an empty summary");
        assert!(s.sources.len() <= limits.max_summary_sources);
        let named: u64 = s.sources.iter().map(|c| c.total).sum();
        assert_eq!(named + s.other_sources.total, s.total);
        assert_eq!(s.reasons.values().sum::<u64>(), s.total);
        for c in &s.sources {
            assert_eq!(c.reasons.values().sum::<u64>(), c.total);
            *per_source.entry(c.source).or_insert(0) += c.total;
        }
    }
    for f in failures(reports) {
        *per_source.entry(f.source).or_insert(0) += 1;
    }
    let total: u64 = reports.iter().map(PreauthReport::count).sum();
    assert_eq!(total, made, "reports do not add up to the connections made");
    per_source
}

/// 1,200 failed or refused connections from two sources in one report
/// interval: at most 8 reports one by one and one summary, adding up to
/// exactly 1,200 (the old server made one report per failure).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_handshakes_are_reported_bounded_and_complete() {
    raise_nofile(4096);
    let cell = cell();
    let mut limits = Limits::default();
    limits.report_interval = Duration::from_secs(3600);
    limits.max_handshakes_per_source = 4;
    limits.handshake_burst_per_source = 300;
    let server = start(&cell, limits);
    let (garbage, hellos) = (1000, 200);
    tokio::join!(
        flood(ATTACKER, server.addr, &cell.roots, garbage, 16, Some(true)),
        flood(ATTACKER_2, server.addr, &cell.roots, hellos, 8, Some(false)),
    );
    let made = garbage + hellos;
    server
        .wait_until("every connection accounted for", |s| {
            s.counter("connections_accepted") == made && s.gauge("handshakes_in_progress") == 0
        })
        .await;
    // Nothing summarized before the interval ends: only individual reports.
    server
        .wait_until("failures reported one by one", |s| !s.reports().is_empty())
        .await;
    assert!(summaries(&server.reports()).is_empty());
    let reports = server.stop();
    assert!(
        reports.len() <= limits.max_individual_reports + 1,
        "{} reports",
        reports.len()
    );
    assert_eq!(summaries(&reports).len(), 1);
    let per_source = assert_bounded_and_complete(&reports, &limits, made);
    let attacker = Source::from(IpAddr::V4(ATTACKER));
    let attacker_2 = Source::from(IpAddr::V4(ATTACKER_2));
    assert_eq!(per_source[&attacker], garbage);
    assert_eq!(per_source[&attacker_2], hellos);
    let summary = summaries(&reports)[0];
    let reasons = &summary.reasons;
    assert!(
        reasons.contains_key(&PreauthReason::TlsMalformed),
        "{reasons:?}"
    );
    assert!(
        reasons.contains_key(&PreauthReason::TlsCertificate),
        "{reasons:?}"
    );
    // The journal's view of it: one record's reason and detail.
    let detail = summary.record_detail();
    assert_eq!(detail["total"], summary.total);
    assert_eq!(detail["sources"][0]["source"], "127.0.0.2");
}

/// The same across many short intervals: per interval at most 8 one by one
/// and one summary; the counts add up over the run.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reports_stay_bounded_in_every_interval() {
    raise_nofile(4096);
    let cell = cell();
    let mut limits = Limits::default();
    limits.report_interval = Duration::from_millis(25);
    limits.max_handshakes_per_source = 4;
    let server = start(&cell, limits);
    let made = 1200;
    flood(ATTACKER, server.addr, &cell.roots, made, 8, None).await;
    server
        .wait_until("every connection accounted for", |s| {
            s.counter("connections_accepted") == made && s.gauge("handshakes_in_progress") == 0
        })
        .await;
    let reports = server.stop();
    assert!(summaries(&reports).len() >= 2, "one interval only");
    assert_bounded_and_complete(&reports, &limits, made);
}

/// One failed handshake is reported at once, with its remote address, not
/// at the end of the interval; nothing else is reported.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_single_failed_handshake_is_reported_at_once() {
    let cell = cell();
    let mut limits = Limits::default();
    limits.report_interval = Duration::from_secs(3600);
    let server = start(&cell, limits);
    let mut tcp = connect_from(LEGIT, server.addr).await.unwrap();
    let local = tcp.local_addr().unwrap();
    tcp.write_all(b"GET / HTTP/1.1\r\n\r\n").await.unwrap();
    until_closed(&mut tcp).await;
    server
        .wait_until("the failure reported", |s| !s.reports().is_empty())
        .await;
    let reports = server.stop();
    assert_eq!(reports.len(), 1, "{reports:?}");
    let PreauthReport::Failure(f) = &reports[0] else {
        panic!("{reports:?}");
    };
    assert_eq!(f.remote, local);
    assert_eq!(f.reason, PreauthReason::TlsMalformed);
    assert!(f.record_reason().starts_with("TLS handshake failed: "));
    assert_eq!(f.record_detail()["remote"], local.to_string());
}

/// An authenticated keep-alive connection that carries no request is
/// closed after the idle timeout (hyper's header read timeout, which runs
/// on idle keep-alive connections too); a request that takes longer than
/// the idle timeout to answer is not cut. The old server kept an idle
/// connection for 30 s.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_authenticated_connection_is_closed_after_the_idle_timeout() {
    let cell = cell();
    let mut limits = Limits::default();
    limits.idle_timeout = Duration::from_millis(500);
    let server = start(&cell, limits);
    let alice = identity(&cell, "nitrile://c1/operator/alice");
    let tcp = connect_from(LEGIT, server.addr).await.unwrap();
    let connector = tokio_rustls::TlsConnector::from(client_config(&cell.roots, &alice).unwrap());
    let tls = connector
        .connect(server_name(&server_principal()), tcp)
        .await
        .unwrap();
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
        .await
        .unwrap();
    let conn = tokio::spawn(conn);
    for path in ["/v1/ping", "/slow", "/v1/ping"] {
        let req = Request::get(path)
            .header(http::header::HOST, "x")
            .body(Empty::<Bytes>::new())
            .unwrap();
        // The connection takes the next request once the last is done.
        sender.ready().await.unwrap();
        let resp = sender.send_request(req).await.unwrap();
        assert_eq!(resp.status(), StatusCode::OK, "{path}");
        resp.into_body().collect().await.unwrap();
    }
    // Now idle: the server closes the connection.
    let closed = tokio::time::timeout(Duration::from_secs(10), conn).await;
    assert!(closed.is_ok(), "the idle connection was not closed");
    server
        .wait_until("the idle close counted", |s| {
            s.counter("idle_timeouts") == 1
        })
        .await;
    assert_eq!(server.counter("tls_sessions"), 1);
    assert_eq!(server.counter("requests"), 3);
    assert!(server.stop().is_empty());
}

/// Unauthenticated peers cannot take authenticated slots, and when every
/// handshake slot is held by idle connections a source with none in
/// progress still gets one (the oldest of the busiest source is cut); the
/// cut connection is counted in the summary.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_peers_cannot_take_authenticated_slots_or_every_handshake_slot() {
    let cell = cell();
    let mut limits = Limits::default();
    limits.max_handshakes = 8;
    limits.max_handshakes_per_source = 8;
    limits.max_connections = 3;
    limits.report_interval = Duration::from_secs(3600);
    // The idle connections stay for the whole test.
    limits.handshake_timeout = Duration::from_secs(600);
    let server = start(&cell, limits);
    let alice = identity(&cell, "nitrile://c1/operator/alice");
    let tls = client_config(&cell.roots, &alice).unwrap();

    // Three authenticated keep-alive connections: every authenticated slot.
    let mut clients = Vec::new();
    for _ in 0..3 {
        let mut c = Client::connect(
            &server.addr.to_string(),
            &server_principal(),
            Arc::clone(&tls),
        )
        .await
        .unwrap();
        assert_eq!(c.get_json("/v1/ping").await.unwrap().status, StatusCode::OK);
        clients.push(c);
    }
    // Idle connections from one address take every handshake slot; the
    // authenticated ones are untouched.
    let mut idle = Vec::new();
    for _ in 0..8 {
        idle.push(connect_from(ATTACKER, server.addr).await.unwrap());
    }
    server
        .wait_until("every handshake slot held", |s| {
            s.gauge("handshakes_in_progress") == 8
        })
        .await;
    for c in &mut clients {
        assert_eq!(c.get_json("/v1/ping").await.unwrap().status, StatusCode::OK);
    }
    assert_eq!(clients.iter().map(Client::connections_made).sum::<u64>(), 3);
    // A fourth authenticated connection finds no authenticated slot: it is
    // closed after its handshake, though a handshake slot was made for it.
    let fourth = call_from(ATTACKER_2, server.addr, &cell.roots, &alice).await;
    assert!(fourth.is_err(), "{fourth:?}");
    assert_eq!(server.counter("preauth_refused_evicted"), 1);
    assert_eq!(server.counter("preauth_refused_connections"), 1);
    // With one authenticated slot free, and the idle source back at every
    // handshake slot, a source with no handshake in progress still gets a
    // handshake slot from the idle source.
    drop(clients.pop());
    idle.push(connect_from(ATTACKER, server.addr).await.unwrap());
    server
        .wait_until("the slots given back and taken again", |s| {
            s.gauge("connections_open") == 2 && s.gauge("handshakes_in_progress") == 8
        })
        .await;
    let status = call_from(ATTACKER_2, server.addr, &cell.roots, &alice).await;
    assert_eq!(status, Ok(StatusCode::OK));
    assert_eq!(server.counter("preauth_refused_evicted"), 2);
    drop(idle);
    server
        .wait_until("the idle connections gone", |s| {
            s.gauge("handshakes_in_progress") == 0
        })
        .await;
    let reports = server.stop();
    let s = summaries(&reports);
    assert_eq!(s.len(), 1, "{reports:?}");
    let attacker = s[0]
        .sources
        .iter()
        .find(|c| c.source == Source::from(IpAddr::V4(ATTACKER)))
        .unwrap();
    assert_eq!(attacker.reasons.get(&PreauthReason::Evicted), Some(&2));
    let other = s[0]
        .sources
        .iter()
        .find(|c| c.source == Source::from(IpAddr::V4(ATTACKER_2)))
        .unwrap();
    assert_eq!(other.reasons.get(&PreauthReason::Connections), Some(&1));
}

/// One source cannot hold more than its share of connections; another
/// source is served meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_source_holds_at_most_its_connections() {
    let cell = cell();
    let mut limits = Limits::default();
    limits.max_connections_per_source = 3;
    let server = start(&cell, limits);
    let alice = identity(&cell, "nitrile://c1/operator/alice");
    let tls = client_config(&cell.roots, &alice).unwrap();
    let mut clients = Vec::new();
    for _ in 0..3 {
        let mut c = Client::connect(
            &server.addr.to_string(),
            &server_principal(),
            Arc::clone(&tls),
        )
        .await
        .unwrap();
        assert_eq!(c.get_json("/v1/ping").await.unwrap().status, StatusCode::OK);
        clients.push(c);
    }
    let fourth = Client::connect(
        &server.addr.to_string(),
        &server_principal(),
        Arc::clone(&tls),
    )
    .await;
    assert!(
        fourth.is_err(),
        "a fourth connection from one source was served"
    );
    assert_eq!(server.counter("preauth_refused_source_connections"), 1);
    assert_eq!(
        call_from(ATTACKER_2, server.addr, &cell.roots, &alice).await,
        Ok(StatusCode::OK)
    );
    drop(clients);
    server.stop();
}
