//! Instance traffic between two hosts' data paths: encrypted (WireGuard,
//! as shipped) against the same path with the inner packets in the clear
//! (`DataPath::start_danger_plaintext_tunnel`), side by side in one process.
//!
//! Setup, for each of the two modes: two data paths ("hosts" a and b),
//! each with its own network namespace, peers of each other on loopback
//! (their UDP sockets talk directly, no relay), one network (VNI 7) with
//! instance a1 (10.80.0.10) on a and b1 (10.80.0.20) on b. The bench holds
//! both taps as a VMM would: a generator thread writes IPv4/UDP frames
//! from a1 to b1 into a1's tap, a reader thread drains b1's tap and
//! checks each frame (length, destination MAC, source address). The path
//! a frame takes is the production one: a1's packet socket, the switch's
//! checks, the route table, the inner header, WireGuard (or not), a UDP
//! datagram on loopback, b's checks (peer endpoint, inner form, source
//! routed to a, a local port), b1's packet socket, the tap.
//!
//! The generator writes "as fast as the path takes them": at most
//! [`WINDOW`] frames in flight (written and not yet read at b1), starting
//! at [`START_WINDOW`] and growing by one for each frame read, so the data
//! paths set the pace. A frame lost on the way (a full socket buffer)
//! keeps its slot, so losses shrink the window until what is in flight
//! fits the buffers; should the reader make no progress for [`STALL`],
//! the frames in flight are written off and the generator goes on. Lost
//! frames are counted (written minus read, after a drain) and printed.
//!
//! Each round runs both modes one after the other (the order alternating
//! from round to round), for each frame size: IPv4 packets of 1380 bytes
//! (the instance MTU) and of 128 bytes. Each run is a warm-up of
//! [`WARMUP`] (it also makes the WireGuard handshake) and a measured
//! interval of [`RUN`]. Throughput counts the instance's IPv4 packets
//! (not the Ethernet header, not the tunnel's framing). The bench prints
//! every run, the cores each thread used (from
//! `/proc/self/task/<tid>/schedstat`), the median per mode and size and
//! the ratio encrypted / plain, and then boringtun's own cost on one core
//! with no I/O (encapsulate and decapsulate of the same inner packets
//! between two sessions in memory).
//!
//! Run: `cargo bench -p nitrile-vnet --bench tunnel --features
//! danger-plaintext-tunnel` (the feature is required: it gives the
//! baseline). `NITRILE_BENCH_SECS` (default 5) and `NITRILE_BENCH_ROUNDS`
//! (default 3) change the length; `NITRILE_BENCH_WINDOW` the frames in
//! flight (default 256); `NITRILE_BENCH_QUICK=1` makes a short smoke run.
//! Needs root (namespaces, taps); prints `SKIPPED: <reason>` otherwise.
//! Goal of the issue: encrypted >= 70% of plain throughput.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr};
use std::os::fd::{AsFd, OwnedFd};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use boringtun::noise::{Tunn, TunnResult};
use nitrile_api::Name;
use nitrile_vnet::stack::InstanceMetadata;
use nitrile_vnet::{
    Counters, DataPath, DataPathConfig, DropReason, GATEWAY_MAC, INSTANCE_MTU, Namespace, Peer,
    PortConfig, Route, VnetError,
};

/// The goal of the issue: encrypted throughput at least this share of plain.
const GOAL: f64 = 0.70;
/// Length of each measured interval.
const RUN: Duration = Duration::from_secs(5);
/// A discarded interval before each measured one.
const WARMUP: Duration = Duration::from_secs(1);
/// Rounds of (encrypted, plain) per frame size.
const ROUNDS: usize = 3;
/// Frames in flight at most (written to a1's tap, not yet read at b1's).
const WINDOW: u64 = 256;
/// Frames in flight at first; one more for each frame read.
const START_WINDOW: u64 = 16;
/// No frame read for this long with the window full: the frames in flight
/// are taken as lost and the generator goes on.
const STALL: Duration = Duration::from_millis(20);
/// How long the reader keeps reading after the generator stopped.
const DRAIN: Duration = Duration::from_millis(300);
/// The instance packet sizes measured: the MTU and small packets.
const SIZES: [usize; 2] = [INSTANCE_MTU as usize, 128];
/// The network, addresses and MACs of a1 and b1.
const VNI: u32 = 7;
const A1: Ipv4Addr = Ipv4Addr::new(10, 80, 0, 10);
const B1: Ipv4Addr = Ipv4Addr::new(10, 80, 0, 20);
const A1_MAC: [u8; 6] = [0x02, 0x10, 0, 0, 0, 10];
const B1_MAC: [u8; 6] = [0x02, 0x10, 0, 0, 0, 20];
/// Inner packets each way for boringtun alone.
const CRYPTO_PACKETS: usize = 200_000;

struct Plan {
    run: Duration,
    warmup: Duration,
    rounds: usize,
    window: u64,
    crypto_packets: usize,
}

fn env_num(name: &str) -> Option<u64> {
    let v = std::env::var(name).ok()?;
    match v.parse() {
        Ok(n) if n > 0 => Some(n),
        _ => panic!("{name} must be a positive whole number, not {v:?}"),
    }
}

fn plan() -> Plan {
    let quick = std::env::var_os("NITRILE_BENCH_QUICK").is_some_and(|v| v == "1");
    let (run, warmup, rounds, crypto_packets) = if quick {
        (
            Duration::from_secs(1),
            Duration::from_millis(300),
            1,
            20_000,
        )
    } else {
        (RUN, WARMUP, ROUNDS, CRYPTO_PACKETS)
    };
    Plan {
        run: env_num("NITRILE_BENCH_SECS").map_or(run, Duration::from_secs),
        warmup,
        rounds: env_num("NITRILE_BENCH_ROUNDS").map_or(rounds, |n| n as usize),
        window: env_num("NITRILE_BENCH_WINDOW").unwrap_or(WINDOW),
        crypto_packets,
    }
}

fn skip() -> Option<&'static str> {
    if !nix::unistd::geteuid().is_root() {
        return Some("network namespaces and taps need root");
    }
    if !std::path::Path::new("/dev/net/tun").exists() {
        return Some("no /dev/net/tun");
    }
    None
}

// ---- frames, as a guest builds them ----

fn checksum(data: &[u8]) -> u16 {
    let mut sum: u32 = 0;
    for c in data.chunks(2) {
        sum += u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)]));
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// An IPv4 packet of `len` bytes from `src` to `dst` carrying UDP.
fn udp_packet(src: Ipv4Addr, dst: Ipv4Addr, len: usize) -> Vec<u8> {
    let mut p = vec![0x45, 0];
    p.extend_from_slice(&(len as u16).to_be_bytes());
    p.extend_from_slice(&[0, 0, 0x40, 0, 64, 17, 0, 0]);
    p.extend_from_slice(&src.octets());
    p.extend_from_slice(&dst.octets());
    let c = checksum(&p);
    p[10..12].copy_from_slice(&c.to_be_bytes());
    let udp_len = (len - 20) as u16;
    p.extend_from_slice(&4000u16.to_be_bytes());
    p.extend_from_slice(&5000u16.to_be_bytes());
    p.extend_from_slice(&udp_len.to_be_bytes());
    p.extend_from_slice(&[0, 0]);
    p.resize(len, 0x5a);
    p
}

/// The frame a1 sends: to the gateway MAC, an IPv4 packet of `len` bytes.
fn frame(len: usize) -> Vec<u8> {
    let mut f = Vec::with_capacity(14 + len);
    f.extend_from_slice(&GATEWAY_MAC);
    f.extend_from_slice(&A1_MAC);
    f.extend_from_slice(&0x0800u16.to_be_bytes());
    f.extend_from_slice(&udp_packet(A1, B1, len));
    f
}

// ---- hosts ----

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    WireGuard,
    Plaintext,
}

impl Mode {
    fn tag(self) -> &'static str {
        match self {
            Mode::WireGuard => "w",
            Mode::Plaintext => "p",
        }
    }

    fn label(self) -> &'static str {
        match self {
            Mode::WireGuard => "WireGuard",
            Mode::Plaintext => "plaintext",
        }
    }
}

struct Host {
    dp: DataPath,
    netns: String,
    /// The data path thread's id.
    tid: u32,
}

impl Drop for Host {
    fn drop(&mut self) {
        let _ = Namespace::remove(&self.netns);
    }
}

/// The ids of this process's threads named `comm`.
fn tids_named(comm: &str) -> Vec<u32> {
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc/self/task").expect("/proc/self/task") {
        let e = e.expect("a task");
        let Ok(tid) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        if std::fs::read_to_string(e.path().join("comm")).is_ok_and(|c| c.trim_end() == comm) {
            out.push(tid);
        }
    }
    out
}

/// The machine's CPU time so far (`/proc/stat`, all CPUs, in clock
/// ticks): busy (everything but idle and iowait), softirq, and the total.
fn machine_ticks() -> [u64; 3] {
    let s = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let Some(line) = s.lines().find(|l| l.starts_with("cpu ")) else {
        return [0; 3];
    };
    let v: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .filter_map(|x| x.parse().ok())
        .collect();
    let total: u64 = v.iter().take(8).sum();
    let idle = v.get(3).copied().unwrap_or(0) + v.get(4).copied().unwrap_or(0);
    [total - idle, v.get(6).copied().unwrap_or(0), total]
}

/// A thread's time on a CPU so far (`/proc/self/task/<tid>/schedstat`).
fn cpu_time(tid: u32) -> Duration {
    let s = std::fs::read_to_string(format!("/proc/self/task/{tid}/schedstat")).unwrap_or_default();
    let ns = s
        .split_whitespace()
        .next()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    Duration::from_nanos(ns)
}

fn start_host(mode: Mode, host: &str) -> Result<Host, VnetError> {
    let netns = format!("nitrile-bench-{}-{}-{host}", std::process::id(), mode.tag());
    let start = match mode {
        Mode::WireGuard => DataPath::start,
        Mode::Plaintext => DataPath::start_danger_plaintext_tunnel,
    };
    let before = tids_named("nitrile-vnet");
    let dp = start(DataPathConfig {
        host: Name::new(host).expect("a host name"),
        netns: netns.clone(),
        wireguard_listen: "127.0.0.1:0".parse().expect("an address"),
        ingress_addr: IpAddr::V4(Ipv4Addr::LOCALHOST),
    })?;
    // The thread names itself when it starts: wait for it.
    let deadline = Instant::now() + Duration::from_secs(5);
    let tid = loop {
        if let Some(t) = tids_named("nitrile-vnet")
            .into_iter()
            .find(|t| !before.contains(t))
        {
            break t;
        }
        assert!(Instant::now() < deadline, "no data path thread");
        std::thread::sleep(Duration::from_millis(1));
    };
    Ok(Host { dp, netns, tid })
}

fn attach(host: &Host, instance: &str, tap: &str, mac: [u8; 6], ip: Ipv4Addr) -> OwnedFd {
    let fd = host.dp.namespace().create_tap(tap).expect("a tap");
    host.dp
        .attach(PortConfig {
            instance: Name::new(instance).expect("an instance name"),
            tap: tap.to_owned(),
            vni: VNI,
            mac,
            address: ip,
            prefix_len: 24,
            metadata: Arc::new(InstanceMetadata {
                instance_id: instance.to_owned(),
                local_ipv4: ip,
                mac,
                ssh_public_keys: Vec::new(),
                user_data: Vec::new(),
                identity_document: Vec::new(),
            }),
        })
        .expect("attach");
    fd
}

/// Hosts a and b in one mode, with a1's and b1's taps.
struct Pair {
    mode: Mode,
    a: Host,
    b: Host,
    a1: OwnedFd,
    b1: OwnedFd,
}

fn pair(mode: Mode) -> Result<Pair, VnetError> {
    let a = start_host(mode, "a")?;
    let b = start_host(mode, "b")?;
    let peer = |h: &Host, name: &str| Peer {
        host: Name::new(name).expect("a host name"),
        public_key: h.dp.public_key(),
        endpoint: h.dp.local_endpoint(),
    };
    a.dp.set_peers(vec![peer(&b, "b")])?;
    b.dp.set_peers(vec![peer(&a, "a")])?;
    let routes: Vec<Route> = [(A1, "a"), (B1, "b")]
        .into_iter()
        .map(|(address, host)| Route {
            vni: VNI,
            address,
            host: Name::new(host).expect("a host name"),
        })
        .collect();
    a.dp.set_routes(routes.clone())?;
    b.dp.set_routes(routes)?;
    let tag = mode.tag();
    let pid = std::process::id() % 100_000;
    let a1 = attach(&a, "a1", &format!("nb{pid}{tag}a1"), A1_MAC, A1);
    let b1 = attach(&b, "b1", &format!("nb{pid}{tag}b1"), B1_MAC, B1);
    Ok(Pair { mode, a, b, a1, b1 })
}

// ---- one run ----

#[derive(Default)]
struct Progress {
    written: AtomicU64,
    read: AtomicU64,
    /// Frames read at b1 that are not the generator's.
    strays: AtomicU64,
    write_errors: AtomicU64,
    stop_writing: AtomicBool,
    stop_reading: AtomicBool,
    writer_tid: AtomicU64,
    reader_tid: AtomicU64,
}

fn writer(tap: &OwnedFd, frame: &[u8], window: u64, p: &Progress) {
    p.writer_tid
        .store(nix::unistd::gettid().as_raw() as u64, Ordering::SeqCst);
    let mut written_off = 0u64;
    let mut last_read = 0u64;
    let mut last_progress = Instant::now();
    while !p.stop_writing.load(Ordering::Relaxed) {
        let read = p.read.load(Ordering::Acquire);
        let written = p.written.load(Ordering::Relaxed);
        // Slow start: a burst of the whole window into a tap nobody read
        // yet would overflow the data path's socket buffer.
        let limit = window.min(START_WINDOW + read);
        if written.saturating_sub(read + written_off) < limit {
            match nix::unistd::write(tap, frame) {
                Ok(_) => {
                    p.written.fetch_add(1, Ordering::Relaxed);
                }
                Err(_) => {
                    p.write_errors.fetch_add(1, Ordering::Relaxed);
                }
            }
            continue;
        }
        let now = Instant::now();
        if read != last_read {
            last_read = read;
            last_progress = now;
        } else if now.duration_since(last_progress) > STALL {
            written_off = written - read;
            last_progress = now;
            continue;
        }
        std::thread::park_timeout(Duration::from_millis(1));
    }
}

fn reader(tap: &OwnedFd, len: usize, p: &Progress, writer: &std::thread::Thread) {
    use nix::fcntl::{FcntlArg, OFlag, fcntl};
    use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
    p.reader_tid
        .store(nix::unistd::gettid().as_raw() as u64, Ordering::SeqCst);
    let flags = OFlag::from_bits_truncate(fcntl(tap, FcntlArg::F_GETFL).expect("F_GETFL"));
    fcntl(tap, FcntlArg::F_SETFL(flags | OFlag::O_NONBLOCK)).expect("F_SETFL");
    let mut buf = vec![0u8; 65_536];
    loop {
        match nix::unistd::read(tap, &mut buf) {
            Ok(n) => {
                let ours = n == 14 + len
                    && buf[..6] == B1_MAC
                    && buf[6..12] == GATEWAY_MAC
                    && buf[26..30] == A1.octets();
                if ours {
                    p.read.fetch_add(1, Ordering::Release);
                    writer.unpark();
                } else {
                    p.strays.fetch_add(1, Ordering::Relaxed);
                }
            }
            Err(nix::errno::Errno::EAGAIN) => {
                writer.unpark();
                if p.stop_reading.load(Ordering::Relaxed) {
                    return;
                }
                let mut fds = [PollFd::new(tap.as_fd(), PollFlags::POLLIN)];
                let _ = poll(&mut fds, PollTimeout::from(50u16));
            }
            Err(e) => panic!("reading b1's tap: {e}"),
        }
    }
}

struct Row {
    mode: Mode,
    len: usize,
    /// Instance packets read at b1 per second, in the measured interval.
    pps: f64,
    written: u64,
    lost: u64,
    strays: u64,
    write_errors: u64,
    /// Cores used in the measured interval: writer, a, b, reader.
    cores: [f64; 4],
    /// Cores busy on the whole machine in the measured interval (this
    /// process and everything else), and of them in softirq.
    machine_busy: f64,
    machine_softirq: f64,
    /// Drops counted by the data paths during the run (a's and b's).
    drops: BTreeMap<String, u64>,
}

impl Row {
    fn mbits(&self) -> f64 {
        self.pps * self.len as f64 * 8.0 / 1e6
    }
}

fn drops(c: &Counters) -> BTreeMap<DropReason, u64> {
    c.drops.clone()
}

fn run(pair: &Pair, len: usize, plan: &Plan) -> Row {
    let frame = frame(len);
    let progress = &Progress::default();
    let drops_before = (drops(&pair.a.dp.counters()), drops(&pair.b.dp.counters()));
    let (measured, cores, machine) = std::thread::scope(|s| {
        let w = std::thread::Builder::new()
            .name("bench-writer".into())
            .spawn_scoped(s, || writer(&pair.a1, &frame, plan.window, progress))
            .expect("the writer thread");
        let writer_thread = w.thread().clone();
        let r = std::thread::Builder::new()
            .name("bench-reader".into())
            .spawn_scoped(s, move || reader(&pair.b1, len, progress, &writer_thread))
            .expect("the reader thread");
        std::thread::sleep(plan.warmup);
        let tids = [
            progress.writer_tid.load(Ordering::SeqCst) as u32,
            pair.a.tid,
            pair.b.tid,
            progress.reader_tid.load(Ordering::SeqCst) as u32,
        ];
        let cpu0 = tids.map(cpu_time);
        let m0 = machine_ticks();
        let read0 = progress.read.load(Ordering::SeqCst);
        let t0 = Instant::now();
        std::thread::sleep(plan.run);
        let read1 = progress.read.load(Ordering::SeqCst);
        let elapsed = t0.elapsed();
        let cpu1 = tids.map(cpu_time);
        let m1 = machine_ticks();
        progress.stop_writing.store(true, Ordering::SeqCst);
        w.join().expect("the writer");
        std::thread::sleep(DRAIN);
        progress.stop_reading.store(true, Ordering::SeqCst);
        r.join().expect("the reader");
        let mut cores = [0.0; 4];
        for i in 0..4 {
            cores[i] = (cpu1[i] - cpu0[i]).as_secs_f64() / elapsed.as_secs_f64();
        }
        let ncpu = std::thread::available_parallelism().map_or(1, |n| n.get()) as f64;
        let total = (m1[2] - m0[2]).max(1) as f64;
        let machine = (
            (m1[0] - m0[0]) as f64 / total * ncpu,
            (m1[1] - m0[1]) as f64 / total * ncpu,
        );
        (
            (read1 - read0) as f64 / elapsed.as_secs_f64(),
            cores,
            machine,
        )
    });
    let mut d = BTreeMap::new();
    let after = (drops(&pair.a.dp.counters()), drops(&pair.b.dp.counters()));
    for (before, after, side) in [
        (&drops_before.0, &after.0, "a"),
        (&drops_before.1, &after.1, "b"),
    ] {
        for (reason, n) in after {
            let n = n - before.get(reason).copied().unwrap_or(0);
            if n > 0 {
                d.insert(format!("{side}:{}", reason.as_str()), n);
            }
        }
    }
    let written = progress.written.load(Ordering::SeqCst);
    let read = progress.read.load(Ordering::SeqCst);
    Row {
        mode: pair.mode,
        len,
        pps: measured,
        written,
        lost: written.saturating_sub(read),
        strays: progress.strays.load(Ordering::SeqCst),
        write_errors: progress.write_errors.load(Ordering::SeqCst),
        cores,
        machine_busy: machine.0,
        machine_softirq: machine.1,
        drops: d,
    }
}

// ---- boringtun alone ----

/// Nanoseconds per packet to encapsulate and to decapsulate inner packets
/// of `len` bytes (an instance packet of `len` and the 24-byte inner
/// header) between two sessions in memory, one core, no I/O.
fn boringtun_alone(len: usize, packets: usize) -> (f64, f64) {
    let sa = x25519_dalek::StaticSecret::random_from_rng(rand_core::OsRng);
    let sb = x25519_dalek::StaticSecret::random_from_rng(rand_core::OsRng);
    let (pa, pb) = (
        x25519_dalek::PublicKey::from(&sa),
        x25519_dalek::PublicKey::from(&sb),
    );
    let mut ta = Tunn::new(sa, pb, None, None, 1, None);
    let mut tb = Tunn::new(sb, pa, None, None, 2, None);
    // The inner form: a synthetic IPv4 header (its length is what
    // boringtun reads), the VNI, the instance packet.
    let mut inner = vec![0u8; 24];
    inner[0] = 0x45;
    inner[2..4].copy_from_slice(&((24 + len) as u16).to_be_bytes());
    inner[20..24].copy_from_slice(&VNI.to_be_bytes());
    inner.extend_from_slice(&udp_packet(A1, B1, len));
    let mut wire = vec![0u8; 2048];
    let mut out = vec![0u8; 2048];
    // The handshake, the first packet queued behind it.
    let init = match ta.encapsulate(&inner, &mut wire) {
        TunnResult::WriteToNetwork(d) => d.to_vec(),
        _ => panic!("no handshake initiation"),
    };
    let resp = match tb.decapsulate(None, &init, &mut out) {
        TunnResult::WriteToNetwork(d) => d.to_vec(),
        _ => panic!("no handshake response"),
    };
    let mut from_a = Vec::new();
    if let TunnResult::WriteToNetwork(d) = ta.decapsulate(None, &resp, &mut wire) {
        from_a.push(d.to_vec());
    }
    while let TunnResult::WriteToNetwork(d) = ta.decapsulate(None, &[], &mut wire) {
        from_a.push(d.to_vec());
    }
    for d in from_a {
        let _ = tb.decapsulate(None, &d, &mut out);
    }
    let (mut enc, mut dec) = (Duration::ZERO, Duration::ZERO);
    for _ in 0..packets {
        let t = Instant::now();
        let n = match ta.encapsulate(&inner, &mut wire) {
            TunnResult::WriteToNetwork(d) => d.len(),
            _ => panic!("encapsulate"),
        };
        let t1 = Instant::now();
        match tb.decapsulate(None, &wire[..n], &mut out) {
            TunnResult::WriteToTunnelV4(p, _) => assert_eq!(p.len(), inner.len()),
            _ => panic!("decapsulate"),
        }
        enc += t1 - t;
        dec += t1.elapsed();
    }
    let per = |d: Duration| d.as_nanos() as f64 / packets as f64;
    (per(enc), per(dec))
}

// ---- output ----

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

fn print_row(round: usize, r: &Row) {
    let drops = if r.drops.is_empty() {
        "-".to_owned()
    } else {
        r.drops
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>()
            .join(" ")
    };
    println!(
        "{:>5} {:>9} {:>6} {:>10.1} {:>10.0} {:>10} {:>7} {:>5.2} {:>5.2} {:>5.2} {:>5.2} {:>5.2} {:>5.2}  {}",
        round,
        r.mode.label(),
        r.len,
        r.mbits(),
        r.pps,
        r.written,
        r.lost,
        r.cores[0],
        r.cores[1],
        r.cores[2],
        r.cores[3],
        r.machine_busy,
        r.machine_softirq,
        drops
    );
    assert_eq!(r.strays, 0, "frames at b1 that the generator did not send");
    assert_eq!(r.write_errors, 0, "writes to a1's tap failed");
}

fn main() {
    if let Some(why) = skip() {
        println!("SKIPPED: {why}");
        return;
    }
    let plan = plan();
    let wg = pair(Mode::WireGuard).expect("the WireGuard pair");
    let plain = pair(Mode::Plaintext).expect("the plaintext pair");
    println!(
        "instance traffic a1 -> b1 across two data paths on loopback: {} s measured after {} ms warm-up, {} round(s), at most {} frames in flight",
        plan.run.as_secs_f64(),
        plan.warmup.as_millis(),
        plan.rounds,
        plan.window
    );
    println!(
        "load average at start: {}",
        std::fs::read_to_string("/proc/loadavg")
            .unwrap_or_default()
            .trim()
    );
    println!();
    println!(
        "{:>5} {:>9} {:>6} {:>10} {:>10} {:>10} {:>7} {:>5} {:>5} {:>5} {:>5} {:>5} {:>5}  drops",
        "round",
        "tunnel",
        "bytes",
        "Mbit/s",
        "packets/s",
        "written",
        "lost",
        "gen",
        "dp a",
        "dp b",
        "read",
        "busy",
        "si"
    );
    let mut rows: Vec<Row> = Vec::new();
    for &len in &SIZES {
        for round in 1..=plan.rounds {
            // Alternate which mode goes first.
            let order = if round % 2 == 1 {
                [&wg, &plain]
            } else {
                [&plain, &wg]
            };
            for p in order {
                let r = run(p, len, &plan);
                print_row(round, &r);
                rows.push(r);
            }
        }
    }
    println!();
    println!(
        "(gen, dp a, dp b, read: cores used by the generator, a's and b's data path threads and the reader in the measured interval; busy, si: cores busy on the whole machine, and of them in softirq; Mbit/s counts instance IPv4 packets; lost: written minus read, frames the kernel's socket buffers dropped while the window filled)"
    );
    println!();
    println!(
        "{:>6} {:>16} {:>16} {:>14} {:>14} {:>8}",
        "bytes", "WireGuard Mbit/s", "plaintext Mbit/s", "WireGuard pps", "plaintext pps", "ratio"
    );
    for &len in &SIZES {
        let pick = |m: Mode| -> Vec<f64> {
            rows.iter()
                .filter(|r| r.mode == m && r.len == len)
                .map(|r| r.pps)
                .collect()
        };
        let (w, p) = (median(pick(Mode::WireGuard)), median(pick(Mode::Plaintext)));
        let ratio = w / p;
        let mbit = |pps: f64| pps * len as f64 * 8.0 / 1e6;
        println!(
            "{:>6} {:>16.1} {:>16.1} {:>14.0} {:>14.0} {:>8.3}  {}",
            len,
            mbit(w),
            mbit(p),
            w,
            p,
            ratio,
            if ratio >= GOAL {
                "goal >= 0.70 met"
            } else {
                "goal >= 0.70 NOT met"
            }
        );
    }
    println!();
    println!(
        "boringtun alone, one core, no I/O ({} packets):",
        plan.crypto_packets
    );
    println!(
        "{:>6} {:>16} {:>16} {:>26}",
        "bytes", "encapsulate ns", "decapsulate ns", "both on one core, Mbit/s"
    );
    for &len in &SIZES {
        let (e, d) = boringtun_alone(len, plan.crypto_packets);
        println!(
            "{:>6} {:>16.0} {:>16.0} {:>26.0}",
            len,
            e,
            d,
            len as f64 * 8.0 / ((e + d) / 1e3)
        );
    }
}
