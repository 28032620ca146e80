//! Claim 1 against the real binary: a running host agent (`nitrile up`'s
//! child `nitrile hostd`) has exactly one listening socket, its mTLS port;
//! a plain TCP client and a TLS 1.3 client without a certificate get no
//! HTTP answer, and both failed handshakes are in the host journal; the
//! host's state directory holds no socket or FIFO.

use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::fs::FileTypeExt;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

mod cell;
use cell::{Cell, HOST};

/// `__SO_ACCEPTCON` in the flags column of `/proc/net/unix`: a listening
/// unix socket.
const SO_ACCEPTCON: u64 = 0x0001_0000;
/// The `st` column of `/proc/net/tcp` for LISTEN.
const TCP_LISTEN: &str = "0A";

/// The inodes of the sockets a process has open.
fn socket_inodes(pid: u32) -> BTreeSet<u64> {
    let mut inodes = BTreeSet::new();
    for entry in std::fs::read_dir(format!("/proc/{pid}/fd")).unwrap() {
        let Ok(target) = std::fs::read_link(entry.unwrap().path()) else {
            continue; // closed meanwhile
        };
        let target = target.to_string_lossy().into_owned();
        if let Some(inode) = target
            .strip_prefix("socket:[")
            .and_then(|r| r.strip_suffix(']'))
        {
            inodes.insert(inode.parse().unwrap());
        }
    }
    inodes
}

/// `0100007F:1F90` (an IPv4 `/proc/net/tcp` address) as `127.0.0.1:8080`;
/// other forms as they are, with the port decoded.
fn decode_addr(hex: &str) -> String {
    let (ip, port) = hex.split_once(':').unwrap();
    let port = u16::from_str_radix(port, 16).unwrap();
    if ip.len() == 8 {
        let n = u32::from_str_radix(ip, 16).unwrap();
        let [a, b, c, d] = n.to_le_bytes();
        format!("{a}.{b}.{c}.{d}:{port}")
    } else {
        format!("[{ip}]:{port}")
    }
}

/// The sockets of `pid` that accept connections or datagrams: listening
/// TCP, any UDP or raw socket, listening unix sockets. Each as
/// `(table, address)`. Also returns how many of its sockets were found in
/// any table (so an empty answer cannot come from reading nothing).
fn listening_sockets(pid: u32) -> (Vec<(String, String)>, usize) {
    let mine = socket_inodes(pid);
    let mut found = Vec::new();
    let mut seen = 0;
    for table in ["tcp", "tcp6", "udp", "udp6", "raw", "raw6", "unix"] {
        let text = std::fs::read_to_string(format!("/proc/{pid}/net/{table}")).unwrap_or_default();
        for line in text.lines().skip(1) {
            let f: Vec<&str> = line.split_whitespace().collect();
            let (inode, listening, addr) = if table == "unix" {
                // Num RefCount Protocol Flags Type St Inode [Path]
                let flags = u64::from_str_radix(f[3], 16).unwrap();
                let path = f.get(7).copied().unwrap_or("(unnamed)").to_owned();
                (f[6], flags & SO_ACCEPTCON != 0, path)
            } else {
                // sl local rem st tx:rx tr:when retrnsmt uid timeout inode
                let listening = !table.starts_with("tcp") || f[3] == TCP_LISTEN;
                (f[9], listening, decode_addr(f[1]))
            };
            let inode: u64 = inode.parse().unwrap();
            if !mine.contains(&inode) {
                continue;
            }
            seen += 1;
            if listening {
                found.push((table.to_owned(), addr));
            }
        }
    }
    (found, seen)
}

/// Reads until the peer closes, fails or stays silent; what it sent and how
/// the read ended.
fn read_all(stream: &mut impl Read) -> (Vec<u8>, String) {
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match stream.read(&mut buf) {
            Ok(0) => return (got, "closed".into()),
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e) => return (got, e.to_string()),
        }
    }
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

const REQUEST: &[u8] = b"GET /v1/host HTTP/1.1\r\nHost: h1\r\nConnection: close\r\n\r\n";

/// A plain TCP client asking for the host description; its local address.
fn plain_tcp_client(addr: SocketAddr) -> SocketAddr {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let local = s.local_addr().unwrap();
    s.write_all(REQUEST).unwrap();
    let (got, end) = read_all(&mut s);
    assert!(
        !contains(&got, b"HTTP/"),
        "a plain TCP client got an HTTP answer: {:?}",
        String::from_utf8_lossy(&got)
    );
    // Whatever came back is a TLS record (an alert), never plaintext.
    assert!(
        got.is_empty() || got[0] == 0x15,
        "unexpected bytes {got:02x?} ({end})"
    );
    local
}

/// A TLS 1.3 client that trusts the cell CA and presents no certificate;
/// its local address.
fn tls_client_without_certificate(addr: SocketAddr, ca: &Path) -> SocketAddr {
    let roots = nitrile_pki::tls::CaRoots::load(ca).unwrap();
    let config =
        nitrile_pki::tls::danger::danger_client_config_without_certificate(&roots).unwrap();
    let host = nitrile_api::PrincipalId::parse(&format!("nitrile://local/host/{HOST}")).unwrap();
    let name = nitrile_pki::tls::server_name(&host);
    let conn = rustls::ClientConnection::new(Arc::clone(&config), name).unwrap();
    let tcp = TcpStream::connect(addr).unwrap();
    tcp.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let local = tcp.local_addr().unwrap();
    let mut tls = rustls::StreamOwned::new(conn, tcp);
    // With TLS 1.3 the client may finish its side of the handshake and send
    // the request before the server looks at the (missing) certificate.
    let wrote = tls.write_all(REQUEST).and_then(|()| tls.flush());
    let (got, end) = read_all(&mut tls);
    assert!(
        got.is_empty(),
        "a client without a certificate got an answer: {:?} (write {wrote:?}, {end})",
        String::from_utf8_lossy(&got)
    );
    local
}

/// Waits (bounded) for a `tls` refusal in the host journal naming each
/// remote address; the records found.
fn tls_refusals_for(cell: &Cell, remotes: &[SocketAddr]) -> Vec<serde_json::Value> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let records = cell.journal(&cell.host_journal());
        let found: Vec<serde_json::Value> = remotes
            .iter()
            .filter_map(|remote| {
                records
                    .iter()
                    .find(|r| {
                        r["step"] == "tls" && r["detail"]["remote"] == remote.to_string().as_str()
                    })
                    .cloned()
            })
            .collect();
        if found.len() == remotes.len() {
            return found;
        }
        assert!(
            Instant::now() < deadline,
            "no tls refusal for each of {remotes:?} in the host journal: {records:#?}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// The UDP endpoint of the host's data path, from its `host describe`.
fn tunnel_endpoint(described: &str) -> Option<std::net::SocketAddr> {
    let v: serde_json::Value = serde_json::from_str(described).unwrap();
    v["network"]["announcement"]["endpoint"]
        .as_str()
        .map(|e| e.parse().unwrap())
}

/// What the host agent may listen on: its mTLS port and, with a data path,
/// the tunnel port it announces (instances published no port here).
fn expected_sockets(described: &str, mtls: std::net::SocketAddr) -> Vec<(String, String)> {
    let mut v = vec![("tcp".to_owned(), mtls.to_string())];
    if let Some(udp) = tunnel_endpoint(described) {
        v.push(("udp".to_owned(), udp.to_string()));
    }
    v
}

/// Every socket or FIFO under `dir`.
fn sockets_and_fifos(dir: &Path, out: &mut Vec<String>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let entry = entry.unwrap();
        let ty = std::fs::symlink_metadata(entry.path()).unwrap().file_type();
        if ty.is_socket() || ty.is_fifo() {
            out.push(entry.path().display().to_string());
        } else if ty.is_dir() {
            sockets_and_fifos(&entry.path(), out);
        }
    }
}

#[test]
fn claim1_hostd_listens_only_on_its_mtls_port_and_answers_no_one_without_a_certificate() {
    let cell = Cell::up();
    // The agent answers a real client first: it is up and serving.
    let described = cell.ok(&cell.alice, &["host", "describe", "-o", "json"]);
    assert!(
        described.contains(&format!("\"host\": \"{HOST}\"")),
        "{described}"
    );

    let pid = cell.hostd_pid();
    let cmd = cell::cmdline(pid).unwrap();
    assert!(
        contains(&cmd, b"hostd\0"),
        "pid {pid} is not the host agent: {}",
        String::from_utf8_lossy(&cmd)
    );
    let (listening, seen) = listening_sockets(pid);
    assert!(seen >= 1, "none of the agent's sockets found in /proc/net");
    assert_eq!(
        listening,
        expected_sockets(&described, cell.hostd_addr),
        "the host agent must listen on its mTLS port and its data path's tunnel port only"
    );
    // The tunnel port answers no one who is not a peer: neither a
    // handshake-sized datagram of noise nor a short one gets a reply.
    let tunnel = tunnel_endpoint(&described).expect("nitrile up gives h1 a data path");
    let probe = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    probe
        .set_read_timeout(Some(Duration::from_millis(1500)))
        .unwrap();
    for size in [148usize, 32, 1] {
        let mut noise = vec![0u8; size];
        noise[0] = 1; // a handshake initiation's message type
        for (i, b) in noise.iter_mut().enumerate().skip(4) {
            *b = u8::try_from(i % 251).unwrap();
        }
        probe.send_to(&noise, tunnel).unwrap();
        let mut buf = [0u8; 2048];
        assert!(
            probe.recv_from(&mut buf).is_err(),
            "the tunnel port answered a stranger's {size}-byte datagram"
        );
    }

    let before = cell.journal(&cell.host_journal()).len();
    let plain = plain_tcp_client(cell.hostd_addr);
    let no_cert =
        tls_client_without_certificate(cell.hostd_addr, &cell.state.join("pki").join("ca.pem"));
    let refusals = tls_refusals_for(&cell, &[plain, no_cert]);
    for r in &refusals {
        assert_eq!(r["kind"], "refusal", "{r}");
        assert!(r["principal"].is_null(), "{r}");
        assert!(
            r["reason"]
                .as_str()
                .is_some_and(|s| s.contains("TLS handshake failed")),
            "{r}"
        );
    }
    let records = cell.journal(&cell.host_journal());
    assert!(records.len() >= before + 2);
    // Neither client got anything executed: no request or outcome record
    // after the describe.
    assert!(
        records[before..]
            .iter()
            .all(|r| r["kind"] == "refusal" && r["step"] == "tls"),
        "{:#?}",
        &records[before..]
    );
    cell.verify_journal(&cell.host_journal());

    // Still the same ports after those connections.
    let (listening, _) = listening_sockets(pid);
    assert_eq!(
        listening,
        expected_sockets(&described, cell.hostd_addr),
        "{listening:?}"
    );

    let mut special = Vec::new();
    sockets_and_fifos(&cell.host_dir(), &mut special);
    assert!(
        special.is_empty(),
        "sockets or FIFOs in the host state directory: {special:?}"
    );
}

#[test]
fn claim1_with_an_instance_running_no_process_of_the_host_listens_on_another_port() {
    let _ = guest_or_skip!();
    let cell = Cell::up();
    let described: nitrile_api::admin::HostDescription =
        serde_json::from_str(&cell.ok(&cell.alice, &["host", "describe", "-o", "json"])).unwrap();
    let image = described
        .images
        .first()
        .expect("nitrile up imported the guest image")
        .digest
        .to_string();
    cell.ok(
        &cell.placement,
        &[
            "instance", "launch", "web1", "--image", &image, "--memory", "128M", "--volume",
            "data=8M",
        ],
    );

    // The agent itself: still its two ports, though it spawned a VM (one
    // launched without a NIC publishes nothing).
    let hostd = cell.hostd_pid();
    let (listening, _) = listening_sockets(hostd);
    let described_text = cell.ok(&cell.alice, &["host", "describe", "-o", "json"]);
    assert_eq!(
        listening,
        expected_sockets(&described_text, cell.hostd_addr),
        "the host agent must listen on its mTLS port and its data path's tunnel port only"
    );
    // Every other process of the host (QEMU, the waiting parents of jailed
    // VMs) accepts no network connection or datagram at all.
    let others: Vec<u32> = cell
        .processes()
        .into_iter()
        .filter(|pid| {
            // `nitrile up`, the log's witness, the key service, the
            // placement service and the deployment service are the cell's,
            // not the host's.
            *pid != hostd
                && cell::cmdline(*pid).is_some_and(|c| {
                    !contains(&c, b"\0up\0")
                        && !contains(&c, b"\0audit\0witness\0")
                        && !contains(&c, b"\0kms\0")
                        && !contains(&c, b"\0placed\0")
                        && !contains(&c, b"\0deployd\0")
                })
        })
        .collect();
    assert!(!others.is_empty(), "no VM process found");
    for pid in others {
        let (listening, _) = listening_sockets(pid);
        let network: Vec<_> = listening
            .iter()
            .filter(|(table, _)| table != "unix")
            .collect();
        assert!(
            network.is_empty(),
            "process {pid} ({}) listens on {network:?}",
            String::from_utf8_lossy(&cell::cmdline(pid).unwrap_or_default())
        );
    }
    cell.ok(&cell.placement, &["instance", "terminate", "web1"]);
}
