//! Token issuance throughput and latency with 1,000 Cedar policies loaded:
//! end to end over keep-alive mTLS on loopback with 1, 16 and 64 concurrent
//! clients, and `TokenService::issue` called in-process (no TLS, no HTTP)
//! from 1 and 2 threads. The baseline, measured in the same run, is the
//! in-process ceiling: 2 threads, same bundle and mix, journal opened with
//! `danger_no_sync` (SQLite quota charges still `synchronous=FULL`).
//!
//! Every issued token has passed the entitlement check (Cedar, the group's
//! slice), the quota check (SQLite, `synchronous=FULL`, for `host.drain`)
//! and has its grant record fdatasync'ed in the journal before the answer.
//! Two request mixes: read only (`host.describe`, no quota) and half
//! `host.drain` (quota'd: each drain charges SQLite).
//!
//! Run: `cargo bench -p nitrile-tokend --bench issue`. Target: >= 2,000
//! tokens/s on a 2-core machine.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use nitrile_api::wire::TokenRequest;
use nitrile_api::{Audience, Name, Operation, PrincipalId, ResourceId};
use nitrile_audit::{JournalMetrics, JournalOptions};
use nitrile_cell::{CellLayout, bootstrap};
use nitrile_net::{Client, Registry};
use nitrile_pki::tls::{CaRoots, TlsIdentity, client_config};
use nitrile_pki::{CellCa, PeerIdentity};
use nitrile_policy::{Entitlements, ReviewerKey, ReviewerSet};
use nitrile_token::SystemClock;
use nitrile_tokend::{KeyRing, ServiceMetrics, TokenService, Tokend, TokendConfig};
use time::OffsetDateTime;

const GROUPS: usize = 50;
const POLICIES: usize = 1000;
/// Synthetic operators given certificates; clients take them in turn.
const PRINCIPALS: usize = 8;
/// Length of each measured run.
const RUN: Duration = Duration::from_secs(5);
/// Requests each client or thread sends before the clock starts.
const WARMUP: usize = 4;
/// A discarded run before the measured ones on each store, so that the
/// SQLite WAL and the journal have grown to their working size.
const WARMUP_RUN: Duration = Duration::from_secs(2);
/// Target rate of the issue.
const TARGET_PER_SEC: f64 = 2000.0;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mix {
    /// Only `host.describe` (no quota).
    Read,
    /// Alternately `host.describe` and `host.drain` (quota'd).
    HalfDrain,
}

impl Mix {
    fn label(self) -> &'static str {
        match self {
            Mix::Read => "read only",
            Mix::HalfDrain => "50% host.drain",
        }
    }
}

/// A synthetic operator with a certificate and the hosts it may ask for.
struct Principal {
    tls: TlsIdentity,
    peer: PeerIdentity,
    /// Hosts the bundle allows `host.describe` on.
    describe: Vec<ResourceId>,
    /// Hosts the bundle allows `host.drain` on, at most the group's quota,
    /// so that cycling through them stays within it.
    drain: Vec<ResourceId>,
}

impl Principal {
    /// The `i`-th request of this principal in `mix`; consecutive requests
    /// name distinct resources.
    fn request(&self, mix: Mix, i: usize) -> TokenRequest {
        let (op, host) = match mix {
            Mix::Read => (
                Operation::HostDescribe,
                &self.describe[i % self.describe.len()],
            ),
            Mix::HalfDrain if i.is_multiple_of(2) => (
                Operation::HostDescribe,
                &self.describe[(i / 2) % self.describe.len()],
            ),
            Mix::HalfDrain => (
                Operation::HostDrain,
                &self.drain[(i / 2) % self.drain.len()],
            ),
        };
        TokenRequest {
            operations: vec![op],
            resources: vec![host.clone()],
            audience: audience(host),
            group: None,
            lifetime_secs: None,
        }
    }
}

fn audience(host: &ResourceId) -> Audience {
    Audience::new(host.name.as_str()).expect("a host name is an audience")
}

struct Row {
    rate: f64,
    p50: Duration,
    p99: Duration,
    tokens: usize,
}

impl Row {
    fn from(mut latencies: Vec<Duration>, elapsed: Duration) -> Self {
        latencies.sort_unstable();
        let at = |q: f64| latencies[((latencies.len() - 1) as f64 * q).round() as usize];
        Self {
            rate: latencies.len() as f64 / elapsed.as_secs_f64(),
            p50: at(0.50),
            p99: at(0.99),
            tokens: latencies.len(),
        }
    }
}

struct Cell {
    _dir: tempfile::TempDir,
    layout: CellLayout,
    cell: Name,
    tokend: PrincipalId,
    entitlements: Arc<Entitlements>,
    principals: Vec<Principal>,
}

/// Bootstraps a cell, replaces its bundle by a synthetic one signed by both
/// local reviewers, and issues certificates for a few synthetic operators.
fn cell() -> Cell {
    let dir = tempfile::tempdir().expect("temporary directory");
    let layout = CellLayout::new(&dir.path().join("state"));
    let cell = Name::new("bench").expect("cell name");
    let now = OffsetDateTime::now_utc();
    let boot = bootstrap(&layout, &cell, "127.0.0.1:0", now).expect("bootstrap");

    let bundle = layout.entitlements_dir();
    std::fs::remove_dir_all(&bundle).expect("remove the sample bundle");
    std::fs::create_dir_all(&bundle).expect("bundle directory");
    nitrile_policy::synth::write_bundle(&bundle, GROUPS, POLICIES).expect("synthetic bundle");
    for name in ["reviewer-1", "reviewer-2"] {
        let key = ReviewerKey::load(
            &layout.reviewer_keys_dir().join(format!("{name}.key")),
            Name::new(name).expect("reviewer name"),
        )
        .expect("reviewer key");
        key.sign_dir(&bundle).expect("sign the bundle");
    }
    let reviewers = ReviewerSet::load(&layout.reviewers_file()).expect("reviewer set");
    let t = Instant::now();
    let entitlements = Entitlements::load_reviewed(&bundle, &reviewers).expect("reviewed bundle");
    println!(
        "bundle: {GROUPS} groups, {} policies, loaded and verified in {:.1?}",
        entitlements.policy_count(),
        t.elapsed()
    );

    let ca = CellCa::load(&layout.pki_dir(), &cell, now).expect("cell CA");
    let hosts: Vec<ResourceId> = (0..100)
        .map(|h| ResourceId::parse(&format!("host/h{h}")).expect("host id"))
        .collect();
    let allowed = |p: &PrincipalId, op: Operation| -> Vec<ResourceId> {
        hosts
            .iter()
            .filter(|h| {
                entitlements
                    .authorize(p, None, &[op], std::slice::from_ref(h), &audience(h))
                    .is_ok()
            })
            .cloned()
            .collect()
    };
    let mut principals = Vec::new();
    for g in 0..GROUPS {
        if principals.len() == PRINCIPALS {
            break;
        }
        let id = PrincipalId::parse(&format!("nitrile://{cell}/operator/op{g}")).expect("id");
        let group = Name::new(&format!("g{g}")).expect("group");
        let Some(quota) = entitlements.quotas().get(&group, Operation::HostDrain) else {
            continue;
        };
        let describe = allowed(&id, Operation::HostDescribe);
        let mut drain = allowed(&id, Operation::HostDrain);
        drain.truncate(quota.max_resources as usize);
        if describe.is_empty() || drain.is_empty() {
            continue;
        }
        let issued = ca.issue(&id, None, now).expect("certificate");
        let (cert, key) = layout.cert_and_key(&id);
        issued.write_files(&cert, &key).expect("write certificate");
        principals.push(Principal {
            tls: TlsIdentity::from_issued(&issued).expect("TLS identity"),
            peer: PeerIdentity::from_der(&issued.cert_der, &cell).expect("peer identity"),
            describe,
            drain,
        });
    }
    assert!(
        !principals.is_empty(),
        "no synthetic operator may both describe and drain"
    );
    println!(
        "principals: {} operators (hosts per operator: describe {}..{}, drain {}..{})",
        principals.len(),
        principals
            .iter()
            .map(|p| p.describe.len())
            .min()
            .unwrap_or(0),
        principals
            .iter()
            .map(|p| p.describe.len())
            .max()
            .unwrap_or(0),
        principals.iter().map(|p| p.drain.len()).min().unwrap_or(0),
        principals.iter().map(|p| p.drain.len()).max().unwrap_or(0),
    );
    Cell {
        _dir: dir,
        layout,
        cell,
        tokend: boot.tokend,
        entitlements: Arc::new(entitlements),
        principals,
    }
}

impl Cell {
    fn config(&self) -> TokendConfig {
        let (cert, key) = self.layout.cert_and_key(&self.tokend);
        TokendConfig {
            cell: self.cell.clone(),
            state_dir: self.layout.tokend_dir(),
            ca: self.layout.ca_cert(),
            cert,
            key,
            entitlements: self.layout.entitlements_dir(),
            reviewers: self.layout.reviewers_file(),
            listen: "127.0.0.1:0".parse().expect("address"),
            metrics: None,
            max_token_lifetime_secs: None,
            logd: None,
        }
    }

    /// A token service of its own (key ring, quota store, journal) under
    /// `name`, for in-process calls.
    fn in_process_service(&self, name: &str, no_sync: bool) -> TokenService {
        let state = self.layout.root().join(name);
        let ring = KeyRing::init_or_load(&state, self.tokend.clone(), &mut rand_core::OsRng)
            .expect("key ring");
        let quotas =
            nitrile_policy::QuotaStore::open(&state.join("quotas.sqlite")).expect("quota store");
        let journal = JournalOptions::new()
            .danger_no_sync(no_sync)
            .open(state.join("journal"), &self.tokend.uri())
            .expect("journal");
        let metrics = ServiceMetrics::register(&Registry::new()).expect("metrics");
        TokenService::new(
            ring.issuer().expect("issuer"),
            Arc::clone(&self.entitlements),
            quotas,
            Arc::new(journal),
            Arc::new(SystemClock),
            metrics,
        )
    }
}

/// `clients` keep-alive mTLS clients, one tokio task each, asking for tokens
/// for `run`.
async fn end_to_end(cell: &Cell, addr: &str, clients: usize, mix: Mix, run: Duration) -> Row {
    let roots = CaRoots::load(&cell.layout.ca_cert()).expect("CA roots");
    let mut connected = Vec::with_capacity(clients);
    for k in 0..clients {
        let p = &cell.principals[k % cell.principals.len()];
        let tls = client_config(&roots, &p.tls).expect("client TLS config");
        let mut client = Client::connect(addr, &cell.tokend, tls)
            .await
            .expect("connect");
        for i in 0..WARMUP {
            let resp = client
                .post_json("/v1/tokens", &p.request(mix, k + i))
                .await
                .expect("warm-up request");
            assert_eq!(resp.status.as_u16(), 200, "{:?}", resp.body);
        }
        connected.push(client);
    }
    let barrier = Arc::new(tokio::sync::Barrier::new(clients + 1));
    let stop = Arc::new(AtomicBool::new(false));
    let mut tasks = Vec::with_capacity(clients);
    for (k, mut client) in connected.into_iter().enumerate() {
        let p = &cell.principals[k % cell.principals.len()];
        // Requests are prepared before the clock starts; serializing them
        // is part of what is measured, as for a real client.
        let requests: Vec<TokenRequest> = (0..64).map(|i| p.request(mix, k + i)).collect();
        let (barrier, stop) = (Arc::clone(&barrier), Arc::clone(&stop));
        tasks.push(tokio::spawn(async move {
            let mut latencies = Vec::with_capacity(4096);
            barrier.wait().await;
            let mut i = 0;
            while !stop.load(Ordering::Relaxed) {
                let start = Instant::now();
                let resp = client
                    .post_json("/v1/tokens", &requests[i % requests.len()])
                    .await
                    .expect("token request");
                let took = start.elapsed();
                assert_eq!(resp.status.as_u16(), 200, "{:?}", resp.body);
                latencies.push(took);
                i += 1;
            }
            latencies
        }));
    }
    barrier.wait().await;
    let start = Instant::now();
    tokio::time::sleep(run).await;
    stop.store(true, Ordering::Relaxed);
    let mut latencies = Vec::new();
    for t in tasks {
        latencies.extend(t.await.expect("client task"));
    }
    Row::from(latencies, start.elapsed())
}

/// `TokenService::issue` from `threads` threads for `run`.
fn in_process(cell: &Cell, service: &TokenService, threads: usize, mix: Mix, run: Duration) -> Row {
    let stop = AtomicBool::new(false);
    let barrier = std::sync::Barrier::new(threads + 1);
    let (latencies, elapsed) = std::thread::scope(|s| {
        let handles: Vec<_> = (0..threads)
            .map(|k| {
                let p = &cell.principals[k % cell.principals.len()];
                let bodies: Vec<Vec<u8>> = (0..64)
                    .map(|i| serde_json::to_vec(&p.request(mix, k + i)).expect("request JSON"))
                    .collect();
                let (stop, barrier) = (&stop, &barrier);
                s.spawn(move || {
                    for body in bodies.iter().take(WARMUP) {
                        assert_eq!(service.issue(&p.peer, body).status, 200);
                    }
                    let mut latencies = Vec::with_capacity(8192);
                    barrier.wait();
                    let mut i = 0;
                    while !stop.load(Ordering::Relaxed) {
                        let start = Instant::now();
                        let reply = service.issue(&p.peer, &bodies[i % bodies.len()]);
                        let took = start.elapsed();
                        assert_eq!(
                            reply.status,
                            200,
                            "{}",
                            String::from_utf8_lossy(&reply.body)
                        );
                        latencies.push(took);
                        i += 1;
                    }
                    latencies
                })
            })
            .collect();
        barrier.wait();
        let start = Instant::now();
        std::thread::sleep(run);
        stop.store(true, Ordering::Relaxed);
        let latencies: Vec<Duration> = handles
            .into_iter()
            .flat_map(|h| h.join().expect("issuing thread"))
            .collect();
        (latencies, start.elapsed())
    });
    Row::from(latencies, elapsed)
}

/// Journal records made durable per fdatasync between two readings.
fn records_per_fsync(before: JournalMetrics, after: JournalMetrics) -> f64 {
    (after.appends - before.appends) as f64 / (after.fsyncs - before.fsyncs).max(1) as f64
}

fn met(rate: f64) -> &'static str {
    if rate >= TARGET_PER_SEC {
        "met"
    } else {
        "NOT met"
    }
}

fn main() {
    let cell = cell();
    let mixes = [Mix::Read, Mix::HalfDrain];

    // Baseline and in-process rows first, on services of their own.
    let mut inproc = Vec::new();
    for (i, mix) in mixes.into_iter().enumerate() {
        for no_sync in [false, true] {
            let name = format!("inproc-{i}-{}", if no_sync { "nosync" } else { "sync" });
            let service = cell.in_process_service(&name, no_sync);
            in_process(&cell, &service, 2, mix, WARMUP_RUN);
            for threads in [1, 2] {
                let before = service.journal().metrics();
                let row = in_process(&cell, &service, threads, mix, RUN);
                let per_fsync = records_per_fsync(before, service.journal().metrics());
                inproc.push((mix, no_sync, threads, row, per_fsync));
            }
        }
    }
    let baseline = |mix: Mix| {
        inproc
            .iter()
            .find(|(m, no_sync, threads, _, _)| *m == mix && *no_sync && *threads == 2)
            .map(|(_, _, _, row, _)| row.rate)
            .expect("baseline row")
    };

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime");
    let e2e = runtime.block_on(async {
        let tokend = Tokend::open(&cell.config()).await.expect("open tokend");
        let addr = tokend.local_addr().expect("bound address").to_string();
        let service = Arc::clone(tokend.service());
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(tokend.serve(async move {
            let _ = stopped.await;
        }));
        let mut rows = Vec::new();
        for mix in mixes {
            end_to_end(&cell, &addr, 16, mix, WARMUP_RUN).await;
            for clients in [1, 16, 64] {
                let before = service.journal().metrics();
                let row = end_to_end(&cell, &addr, clients, mix, RUN).await;
                let after = service.journal().metrics();
                let per_fsync = records_per_fsync(before, after);
                rows.push((mix, clients, row, per_fsync));
            }
        }
        let _ = stop.send(());
        server.await.expect("server task").expect("server");
        rows
    });

    println!();
    println!("end to end: keep-alive mTLS clients on loopback, journal fsync on, {RUN:?} per run");
    println!(
        "{:<16} {:>7} {:>9} {:>9} {:>9} {:>10} {:>9} {:>8}  target {TARGET_PER_SEC:.0}/s",
        "mix", "clients", "tokens/s", "p50", "p99", "recs/fsync", "baseline", "ratio"
    );
    for (mix, clients, row, per_fsync) in &e2e {
        let base = baseline(*mix);
        println!(
            "{:<16} {:>7} {:>9.0} {:>9.2?} {:>9.2?} {:>10.1} {:>9.0} {:>8.2}  {}",
            mix.label(),
            clients,
            row.rate,
            row.p50,
            row.p99,
            per_fsync,
            base,
            row.rate / base,
            met(row.rate)
        );
    }
    println!(
        "(baseline: in-process TokenService::issue, 2 threads, same mix, journal danger_no_sync; \
         ratio = tokens/s / baseline)"
    );
    println!(
        "(journal danger_no_sync end to end: not measured; Tokend::open has no way to open its \
         journal so; see the in-process rows)"
    );

    println!();
    println!("in-process: TokenService::issue called directly (no TLS, no HTTP), {RUN:?} per run");
    println!(
        "{:<16} {:>7} {:>13} {:>9} {:>9} {:>9} {:>8} {:>10}  target {TARGET_PER_SEC:.0}/s",
        "mix", "threads", "journal", "tokens/s", "p50", "p99", "tokens", "recs/fsync"
    );
    for (mix, no_sync, threads, row, per_fsync) in &inproc {
        let per_fsync = if *no_sync {
            "-".to_owned()
        } else {
            format!("{per_fsync:.1}")
        };
        println!(
            "{:<16} {:>7} {:>13} {:>9.0} {:>9.2?} {:>9.2?} {:>8} {:>10}  {}",
            mix.label(),
            threads,
            if *no_sync { "danger_nosync" } else { "fsync" },
            row.rate,
            row.p50,
            row.p99,
            row.tokens,
            per_fsync,
            met(row.rate)
        );
    }
    println!("(SQLite quota charges stay synchronous=FULL in every row)");
}
