//! Someone on the network with no credentials of the cell. The attack runs
//! from a second loopback address (127.0.0.2), as a host elsewhere would,
//! so the services can tell it from the operators on 127.0.0.1.

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

use crate::cell::Cell;
use crate::{logd_of, runtime};

const ATTACKER: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 2);
/// Idle connections held open against the cell's three ports.
const IDLE: usize = 2_000;

fn raise_nofile(want: u64) {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE).unwrap();
    if soft < want {
        setrlimit(Resource::RLIMIT_NOFILE, want.min(hard), hard).unwrap();
    }
}

async fn connect_from(to: SocketAddr) -> std::io::Result<TcpStream> {
    let socket = TcpSocket::new_v4()?;
    socket.bind(SocketAddr::from((ATTACKER, 0)))?;
    socket.connect(to).await
}

/// Each of the cell's ports, its journal's `tls` refusals counted in it.
fn tls_records(cell: &Cell, journal: &std::path::Path) -> usize {
    cell.journal(journal)
        .iter()
        .filter(|r| r["step"] == "tls")
        .count()
}

/// Issue 9, 1: about 1,100 idle TCP connections that never send a TLS
/// hello made legitimate calls to hostd, tokend and logd time out, and every
/// failed handshake was one more synced journal record, without bound.
#[test]
fn claim5_an_outsider_cannot_block_the_admin_plane_or_flood_its_journals() {
    raise_nofile(16_384);
    let cell = Cell::up();
    let (_, logd) = logd_of(&cell.carol);
    let targets: Vec<SocketAddr> = vec![cell.hostd_addr, cell.tokend_addr, logd.parse().unwrap()];
    let journals = [cell.host_journal(), cell.tokend_journal()];
    let before: Vec<usize> = journals.iter().map(|j| tls_records(&cell, j)).collect();
    let rt = runtime();
    let started = Instant::now();

    // 2,000 idle connections that never say a word, held open.
    let idle = rt.block_on(async {
        let mut held = Vec::new();
        for i in 0..IDLE {
            if let Ok(c) = connect_from(targets[i % targets.len()]).await {
                held.push(c);
            }
        }
        held
    });
    // A handshake flood beside them: garbage instead of a ClientHello, as
    // fast as it goes, on every port.
    let stop = Arc::new(AtomicBool::new(false));
    let attempts = Arc::new(AtomicU64::new(0));
    let flood: Vec<_> = targets
        .iter()
        .map(|&to| {
            let (stop, attempts) = (Arc::clone(&stop), Arc::clone(&attempts));
            rt.spawn(async move {
                while !stop.load(Ordering::Relaxed) {
                    if let Ok(mut c) = connect_from(to).await {
                        attempts.fetch_add(1, Ordering::Relaxed);
                        let _ = c.write_all(b"\x16\x03\x01\x00\x05hello").await;
                        let mut buf = [0u8; 64];
                        let _ =
                            tokio::time::timeout(Duration::from_secs(1), c.read(&mut buf)).await;
                    } else {
                        tokio::time::sleep(Duration::from_millis(5)).await;
                    }
                }
            })
        })
        .collect();

    // Legitimate callers on 127.0.0.1 are served meanwhile: a token, a host
    // call, an auditor's read (each through all three services).
    for _ in 0..3 {
        cell.ok(&cell.alice, &["host", "describe"]);
    }
    cell.ok(&cell.carol, &["audit", "tail", "-n", "1"]);

    stop.store(true, Ordering::Relaxed);
    rt.block_on(async {
        for f in flood {
            let _ = f.await;
        }
    });
    drop(idle);
    assert!(
        attempts.load(Ordering::Relaxed) > 100,
        "the flood did not run"
    );
    // Failed and refused handshakes are on the record, but as a bounded
    // number of records: a few at once and one summary per 10 s interval
    // (nitrile_net's PREAUTH_REPORT_INTERVAL), not one synced record each.
    let intervals = started.elapsed().as_secs() / 10 + 2;
    std::thread::sleep(Duration::from_secs(11));
    for (journal, before) in journals.iter().zip(before) {
        let added = tls_records(&cell, journal) - before;
        assert!(added > 0, "{}: no record of the attack", journal.display());
        assert!(
            added as u64 <= 9 * (intervals + 1),
            "{}: {added} tls records for {} attempts",
            journal.display(),
            attempts.load(Ordering::Relaxed)
        );
    }
}
