//! Legitimate `host.describe` latency while the host agent's port is under a
//! pre-authentication attack, against the same calls with no attack, in the
//! same run.
//!
//! The host agent runs in-process as in `describe.rs` (journal fsync on,
//! its own multi-thread runtime and thread, default `nitrile_net` limits).
//! Three phases, one after the other: quiet, attacked, quiet again. In each,
//! two kinds of legitimate calls from 127.0.0.1, measured one after the
//! other for [`RUN`]:
//!
//! - keep-alive: [`KEEP_ALIVE_CLIENTS`] clients, each on its own keep-alive
//!   connection, calling back to back (what `describe.rs` measures);
//! - fresh connection: one call every [`FRESH_EVERY`], each on a new
//!   connection (TCP connect, TLS 1.3 handshake with alice's certificate,
//!   the call), the way the CLI calls: this is what idle connections
//!   used to starve.
//!
//! The attack, on a runtime of its own thread (one worker), during the
//! whole of an attacked phase: [`IDLE`] TCP connections from 127.0.0.2 that
//! never send a byte, each opened again [`IDLE_PAUSE`] after the server
//! closes it; and [`FLOOD_TASKS`] tasks from 127.0.0.3 opening connections,
//! alternately sending plaintext garbage and a TLS 1.3 hello without a
//! client certificate: paced to [`PACED_FLOOD_PER_SEC`] in all in one
//! attacked phase, back to back (as fast as the attack's thread goes) in
//! the other. The attack shares the machine's cores with the host and the
//! clients; the CPU each runtime used is printed per phase.
//!
//! At the end the host journal is read back: it must verify, hold one
//! request and one outcome record per answered call, and its `tls` refusal
//! records (one per failed handshake reported at once, one per interval's
//! summary) must stay few and add up to the connections the host counted
//! as failed or refused.
//!
//! Run: `cargo bench -p nitrile-hostd --bench preauth`; with
//! `NITRILE_BENCH_QUICK=1` a short smoke run. Goal: the attacked p99 of
//! both kinds of call within 2x of the quiet p99.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use nitrile_api::{Name, PrincipalId, PrincipalKind};
use nitrile_audit::{JournalReader, Outcome, RecordKind, verify_journal};
use nitrile_hostd::HostdOptions;
use nitrile_net::Client;
use nitrile_pki::tls::{CaRoots, client_config, server_name};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

mod common;
use common::{cell, mint, start_hostd};

/// Length of each measured run.
const RUN: Duration = Duration::from_secs(5);
/// Keep-alive clients calling back to back.
const KEEP_ALIVE_CLIENTS: usize = 16;
/// Pace of the fresh-connection calls (40 a second: below the default
/// per-source handshake rate of 64 a second).
const FRESH_EVERY: Duration = Duration::from_millis(25);
/// Idle connections of the attack.
const IDLE: usize = 2000;
/// How long an idle attacker waits before opening a closed connection again.
const IDLE_PAUSE: Duration = Duration::from_secs(1);
/// Tasks of the handshake flood.
const FLOOD_TASKS: usize = 4;
/// The paced flood's rate, over all its tasks.
const PACED_FLOOD_PER_SEC: u32 = 1000;
/// The goal: attacked p99 at most this many times the quiet p99.
const GOAL_RATIO: f64 = 2.0;

const ATTACKER_IDLE: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 2);
const ATTACKER_FLOOD: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 3);

fn run_length() -> Duration {
    if std::env::var_os("NITRILE_BENCH_QUICK").is_some_and(|v| v == "1") {
        Duration::from_millis(800)
    } else {
        RUN
    }
}

struct Lat {
    calls: usize,
    rate: f64,
    p50: Duration,
    p99: Duration,
}

impl Lat {
    fn from(mut latencies: Vec<Duration>, elapsed: Duration) -> Self {
        latencies.sort_unstable();
        let at = |q: f64| latencies[((latencies.len() - 1) as f64 * q).round() as usize];
        Self {
            calls: latencies.len(),
            rate: latencies.len() as f64 / elapsed.as_secs_f64(),
            p50: at(0.50),
            p99: at(0.99),
        }
    }
}

struct Target {
    addr: String,
    host: PrincipalId,
    token: Arc<str>,
    tls: Arc<rustls::ClientConfig>,
}

async fn describe(client: &mut Client, token: &str) {
    let resp = client
        .get_json_with_bearer("/v1/host", token)
        .await
        .expect("describe call");
    assert_eq!(resp.status.as_u16(), 200, "{:?}", resp.body);
}

/// Keep-alive clients calling back to back for `run`.
async fn keep_alive(t: &Target, run: Duration) -> Lat {
    let mut connected = Vec::new();
    for _ in 0..KEEP_ALIVE_CLIENTS {
        let mut c = Client::connect(&t.addr, &t.host, Arc::clone(&t.tls))
            .await
            .expect("connect");
        describe(&mut c, &t.token).await;
        connected.push(c);
    }
    let stop = Arc::new(AtomicBool::new(false));
    let barrier = Arc::new(tokio::sync::Barrier::new(KEEP_ALIVE_CLIENTS + 1));
    let mut tasks = Vec::new();
    for mut c in connected {
        let (stop, barrier, token) = (
            Arc::clone(&stop),
            Arc::clone(&barrier),
            Arc::clone(&t.token),
        );
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::with_capacity(8192);
            barrier.wait().await;
            while !stop.load(Ordering::Relaxed) {
                let start = Instant::now();
                describe(&mut c, &token).await;
                lat.push(start.elapsed());
            }
            assert_eq!(c.connections_made(), 1, "a connection was not kept alive");
            lat
        }));
    }
    barrier.wait().await;
    let start = Instant::now();
    tokio::time::sleep(run).await;
    stop.store(true, Ordering::Relaxed);
    let mut all = Vec::new();
    for task in tasks {
        all.extend(task.await.expect("client task"));
    }
    Lat::from(all, start.elapsed())
}

/// One call every [`FRESH_EVERY`] on a new connection, for `run`.
async fn fresh(t: &Target, run: Duration) -> Lat {
    let mut ticks = tokio::time::interval(FRESH_EVERY);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let start = Instant::now();
    let mut lat = Vec::new();
    while start.elapsed() < run {
        ticks.tick().await;
        let began = Instant::now();
        let mut c = Client::connect(&t.addr, &t.host, Arc::clone(&t.tls))
            .await
            .expect("connect on a fresh connection");
        describe(&mut c, &t.token).await;
        lat.push(began.elapsed());
    }
    Lat::from(lat, start.elapsed())
}

async fn connect_from(from: Ipv4Addr, to: SocketAddr) -> std::io::Result<TcpStream> {
    let socket = TcpSocket::new_v4()?;
    socket.bind(SocketAddr::new(IpAddr::V4(from), 0))?;
    socket.connect(to).await
}

async fn until_closed<S: tokio::io::AsyncRead + Unpin>(s: &mut S) {
    let mut buf = [0u8; 256];
    while let Ok(n) = s.read(&mut buf).await {
        if n == 0 {
            return;
        }
    }
}

/// The attack's counts.
#[derive(Default)]
struct AttackCounts {
    idle_connects: AtomicU64,
    flood_attempts: AtomicU64,
}

/// Runs the attack on `rt` until `stop`; returns once the first [`IDLE`]
/// idle connections are open.
fn attack(
    rt: &tokio::runtime::Runtime,
    to: SocketAddr,
    roots: CaRoots,
    host: PrincipalId,
    paced: bool,
    stop: Arc<AtomicBool>,
    counts: Arc<AttackCounts>,
) -> Vec<tokio::task::JoinHandle<()>> {
    let mut tasks = Vec::new();
    rt.block_on(async {
        for _ in 0..IDLE {
            let Ok(first) = connect_from(ATTACKER_IDLE, to).await else {
                continue;
            };
            counts.idle_connects.fetch_add(1, Ordering::Relaxed);
            let (stop, counts) = (Arc::clone(&stop), Arc::clone(&counts));
            tasks.push(tokio::spawn(async move {
                let mut tcp = first;
                while !stop.load(Ordering::Relaxed) {
                    tokio::select! {
                        () = until_closed(&mut tcp) => {}
                        () = stopped(&stop) => return,
                    }
                    tokio::time::sleep(IDLE_PAUSE).await;
                    if let Ok(t) = connect_from(ATTACKER_IDLE, to).await {
                        counts.idle_connects.fetch_add(1, Ordering::Relaxed);
                        tcp = t;
                    }
                }
            }));
        }
    });
    let hello = nitrile_pki::tls::danger::danger_client_config_without_certificate(&roots)
        .expect("client config without certificate");
    for k in 0..FLOOD_TASKS {
        let (stop, counts, hello, host) = (
            Arc::clone(&stop),
            Arc::clone(&counts),
            Arc::clone(&hello),
            host.clone(),
        );
        tasks.push(rt.spawn(async move {
            let connector = tokio_rustls::TlsConnector::from(hello);
            let every = Duration::from_secs(FLOOD_TASKS as u64) / PACED_FLOOD_PER_SEC;
            let mut ticks = tokio::time::interval(every);
            let mut i = k;
            while !stop.load(Ordering::Relaxed) {
                if paced {
                    ticks.tick().await;
                }
                i += 1;
                let Ok(mut tcp) = connect_from(ATTACKER_FLOOD, to).await else {
                    continue;
                };
                counts.flood_attempts.fetch_add(1, Ordering::Relaxed);
                if i % 2 == 0 {
                    let _ = tcp.write_all(b"GET / HTTP/1.1\r\n\r\n").await;
                    until_closed(&mut tcp).await;
                } else if let Ok(mut s) = connector.connect(server_name(&host), tcp).await {
                    let _ = s.write_all(b"GET / HTTP/1.1\r\n\r\n").await;
                    until_closed(&mut s).await;
                }
            }
        }));
    }
    tasks
}

async fn stopped(stop: &AtomicBool) {
    while !stop.load(Ordering::Relaxed) {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// What the host journal holds.
struct JournalCheck {
    requests: u64,
    outcomes: u64,
    tls_records: u64,
    tls_connections: u64,
}

fn check_journal(path: &Path) -> JournalCheck {
    verify_journal(path).expect("the host journal verifies");
    let mut c = JournalCheck {
        requests: 0,
        outcomes: 0,
        tls_records: 0,
        tls_connections: 0,
    };
    for entry in JournalReader::open(path).expect("journal") {
        let record = entry.expect("entry").record().expect("record");
        match record.kind {
            RecordKind::Request => c.requests += 1,
            RecordKind::Outcome if record.outcome == Some(Outcome::Executed) => c.outcomes += 1,
            RecordKind::Refusal if record.step == Some(nitrile_api::wire::RefusalStep::Tls) => {
                c.tls_records += 1;
                let total = record
                    .detail
                    .as_ref()
                    .and_then(|d| d.get("total"))
                    .and_then(serde_json::Value::as_u64);
                c.tls_connections += total.unwrap_or(1);
            }
            other => panic!("unexpected {other:?} record: {record:?}"),
        }
    }
    c
}

/// A counter of the host's metrics file.
fn metric(prom: &str, name: &str) -> u64 {
    prom.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or(0)
}

/// CPU seconds used so far by this process's threads, by the runtime their
/// name says they belong to (`hostd`, `client`, `attack`; else `other`).
/// `/proc` counts in USER_HZ, 100 a second on Linux.
fn cpu_by_runtime() -> std::collections::BTreeMap<&'static str, f64> {
    let mut out = std::collections::BTreeMap::new();
    let Ok(tasks) = std::fs::read_dir("/proc/self/task") else {
        return out;
    };
    for task in tasks.flatten() {
        let path = task.path();
        let (Ok(comm), Ok(stat)) = (
            std::fs::read_to_string(path.join("comm")),
            std::fs::read_to_string(path.join("stat")),
        ) else {
            continue;
        };
        let Some(after) = stat.rsplit_once(')').map(|(_, rest)| rest) else {
            continue;
        };
        let fields: Vec<&str> = after.split_whitespace().collect();
        let ticks = |i: usize| {
            fields
                .get(i)
                .and_then(|f| f.parse::<u64>().ok())
                .unwrap_or(0)
        };
        // Fields 14 and 15 of stat (utime, stime), counted from 3 after ')'.
        let seconds = (ticks(11) + ticks(12)) as f64 / 100.0;
        let group = ["hostd", "client", "attack"]
            .into_iter()
            .find(|g| comm.starts_with(g))
            .unwrap_or("other");
        *out.entry(group).or_insert(0.0) += seconds;
    }
    out
}

fn raise_nofile(want: u64) {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE).expect("getrlimit");
    if soft < want {
        setrlimit(Resource::RLIMIT_NOFILE, want.min(hard), hard).expect("setrlimit");
    }
}

fn main() {
    let started = Instant::now();
    raise_nofile(16_384);
    let run = run_length();
    let cell = cell();
    let host = Name::new("h1").expect("host name");
    let clients_rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("client-rt")
        .enable_all()
        .build()
        .expect("client runtime");
    let token: Arc<str> = clients_rt.block_on(mint(&cell, &host)).into();
    let config = cell.host_config(&host, cell.layout.host_dir(&host));
    let state: PathBuf = config.state.clone();
    let host_principal = PrincipalId::new(cell.cell.clone(), PrincipalKind::Host, host.clone());

    let server = start_hostd(config, HostdOptions::default());
    let addr = server.addr;
    let target = Target {
        addr: addr.to_string(),
        host: host_principal.clone(),
        token,
        tls: client_config(&cell.roots(), &cell.alice_tls()).expect("client TLS config"),
    };
    let attack_rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name("attack-rt")
        .enable_all()
        .build()
        .expect("attack runtime");

    let mut rows = Vec::new();
    let mut answered = 0u64;
    let mut attack_rates = Vec::new();
    for phase in ["quiet", "paced flood", "full flood", "quiet again"] {
        let attacked = phase.ends_with("flood");
        let stop = Arc::new(AtomicBool::new(false));
        let counts = Arc::new(AttackCounts::default());
        let began = Instant::now();
        let tasks = if attacked {
            attack(
                &attack_rt,
                addr,
                cell.roots(),
                host_principal.clone(),
                phase == "paced flood",
                Arc::clone(&stop),
                Arc::clone(&counts),
            )
        } else {
            Vec::new()
        };
        let measure_from = Instant::now();
        let cpu_before = cpu_by_runtime();
        let ka = clients_rt.block_on(keep_alive(&target, run));
        let wall = measure_from.elapsed().as_secs_f64();
        let cpu_after = cpu_by_runtime();
        let fr = clients_rt.block_on(fresh(&target, run));
        let cores: Vec<(&'static str, f64)> = cpu_after
            .iter()
            .map(|(g, after)| (*g, (after - cpu_before.get(g).unwrap_or(&0.0)) / wall))
            .collect();
        if attacked {
            let seconds = measure_from.elapsed().as_secs_f64();
            let idle = counts.idle_connects.load(Ordering::Relaxed) as f64;
            attack_rates.push((
                phase,
                idle / began.elapsed().as_secs_f64(),
                counts.flood_attempts.load(Ordering::Relaxed) as f64 / seconds,
            ));
            stop.store(true, Ordering::Relaxed);
            attack_rt.block_on(async {
                for t in tasks {
                    let _ = t.await;
                }
            });
        }
        answered += (ka.calls + KEEP_ALIVE_CLIENTS + fr.calls) as u64;
        rows.push((phase, ka, fr, cores));
    }
    drop(attack_rt);
    drop(clients_rt);
    server.stop();

    println!();
    println!(
        "host.describe from 127.0.0.1, {run:?} per run; attack: {IDLE} idle connections from \
         127.0.0.2 (reopened {IDLE_PAUSE:?} after each close), {FLOOD_TASKS} flood tasks from 127.0.0.3"
    );
    println!(
        "{:<12} {:>14} {:>9} {:>9} {:>12} {:>9} {:>9}",
        "phase", "keep-alive/s", "p50", "p99", "fresh calls", "p50", "p99"
    );
    for (phase, ka, fr, _) in &rows {
        println!(
            "{:<12} {:>14.0} {:>9.2?} {:>9.2?} {:>12} {:>9.2?} {:>9.2?}",
            phase, ka.rate, ka.p50, ka.p99, fr.calls, fr.p50, fr.p99
        );
    }
    println!("cores used during the keep-alive run (CPU seconds / wall seconds, by runtime):");
    for (phase, _, _, cores) in &rows {
        let shown: Vec<String> = cores.iter().map(|(g, c)| format!("{g} {c:.2}")).collect();
        println!("  {phase:<12} {}", shown.join(", "));
    }
    // Against the better of the two quiet runs: the stricter comparison.
    let quiet_ka = rows[0].1.p99.min(rows[3].1.p99);
    let quiet_fr = rows[0].2.p99.min(rows[3].2.p99);
    let verdict = |r: f64| if r <= GOAL_RATIO { "met" } else { "NOT met" };
    for (phase, ka, fr, _) in &rows[1..3] {
        let ratio_ka = ka.p99.as_secs_f64() / quiet_ka.as_secs_f64();
        let ratio_fr = fr.p99.as_secs_f64() / quiet_fr.as_secs_f64();
        println!(
            "{phase}: p99 / quiet p99 (the smaller of the two): keep-alive {ratio_ka:.2} ({}), fresh connection {ratio_fr:.2} ({}); goal <= {GOAL_RATIO}",
            verdict(ratio_ka),
            verdict(ratio_fr)
        );
    }
    for (phase, idle, flood) in &attack_rates {
        println!(
            "{phase}: the attack opened {idle:.0} idle connections/s and {flood:.0} flood connections/s"
        );
    }

    let prom = std::fs::read_to_string(state.join("metrics.prom")).expect("metrics file");
    let p = "nitrile_hostd_";
    let accepted = metric(&prom, &format!("{p}connections_accepted_total"));
    let sessions = metric(&prom, &format!("{p}tls_sessions_total"));
    let failures = metric(&prom, &format!("{p}tls_handshake_failures_total"));
    let refused: u64 = [
        "source_handshakes",
        "source_connections",
        "source_rate",
        "handshakes",
        "evicted",
        "connections",
    ]
    .iter()
    .map(|r| metric(&prom, &format!("{p}preauth_refused_{r}_total")))
    .sum();
    println!(
        "host counted: {accepted} connections accepted, {sessions} TLS sessions, {failures} failed handshakes, {refused} refused before the handshake"
    );
    for r in [
        "source_handshakes",
        "source_rate",
        "source_connections",
        "handshakes",
        "evicted",
    ] {
        println!(
            "  refused {r}: {}",
            metric(&prom, &format!("{p}preauth_refused_{r}_total"))
        );
    }
    let j = check_journal(&state.join("journal"));
    println!(
        "journal: verified; {} requests + {} outcomes for {answered} answered calls; {} tls records for {} failed or refused connections",
        j.requests, j.outcomes, j.tls_records, j.tls_connections
    );
    assert_eq!(j.requests, answered, "one request record per call");
    assert_eq!(j.outcomes, answered, "one outcome record per call");
    // Every failed or refused connection is in exactly one record (one by
    // one or in its interval's summary), and the records stay few: at most
    // 8 one by one and one summary per 10 s interval.
    assert_eq!(
        j.tls_connections,
        failures + refused,
        "tls records incomplete"
    );
    let intervals = started.elapsed().as_secs() / 10 + 2;
    assert!(
        j.tls_records <= intervals * (nitrile_net::MAX_INDIVIDUAL_REPORTS as u64 + 1),
        "{} tls records in {intervals} intervals",
        j.tls_records
    );
}
