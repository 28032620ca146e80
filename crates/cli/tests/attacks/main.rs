//! Our own attacks on a whole cell (`nitrile up`, the real binary and its
//! real services on loopback), one module per adversary, each test named
//! after the claim it attacks:
//!
//! - [`outsider`]: someone on the network with no credentials;
//! - [`operator`]: provider staff with a valid certificate;
//! - [`rogue_service`]: a service principal of the cell acting beyond its
//!   role;
//! - [`thief`]: whoever holds (a copy of) a service's state directory.
//!
//! Each attack was open before the fix its test names and fails the test
//! if it opens again. Attacks that need only one service are in that
//! service's crate (see the threat model in docs/ARCHITECTURE.md for the
//! whole list).

#![allow(clippy::disallowed_macros)]

#[path = "../cell/mod.rs"]
mod cell;

mod operator;
mod outsider;
mod rogue_service;
mod thief;

use std::path::Path;
use std::sync::Arc;

use bytes::Bytes;
use nitrile_api::PrincipalId;

/// A connection to the service at `addr` (principal `server`) as the
/// principal whose certificate is `<state>/pki/<kind-name>.pem`, with the
/// cell's CA.
pub(crate) async fn connect_as(
    state: &Path,
    kind_name: &str,
    addr: &str,
    server: &PrincipalId,
) -> nitrile_net::Client {
    let pki = state.join("pki");
    let roots = nitrile_pki::tls::CaRoots::load(&pki.join("ca.pem")).unwrap();
    let me = nitrile_pki::tls::TlsIdentity::load(
        &pki.join(format!("{kind_name}.pem")),
        &pki.join(format!("{kind_name}.key")),
    )
    .unwrap();
    let tls = nitrile_pki::tls::client_config(&roots, &me).unwrap();
    nitrile_net::Client::connect(addr, server, Arc::clone(&tls))
        .await
        .unwrap()
}

/// POSTs `body` to `path` over `client`; the status and body.
pub(crate) async fn post(
    client: &mut nitrile_net::Client,
    path: &str,
    body: Vec<u8>,
) -> (u16, Bytes) {
    let req = http::Request::builder()
        .method(http::Method::POST)
        .uri(path)
        .header(http::header::CONTENT_TYPE, "application/json")
        .body(Bytes::from(body))
        .unwrap();
    let resp = client.send(req).await.unwrap();
    (resp.status.as_u16(), resp.body)
}

/// logd's principal and address in the cell whose auditor config is
/// `carol`.
pub(crate) fn logd_of(carol: &Path) -> (PrincipalId, String) {
    let config = nitrile_cell::ClientConfig::load(carol).unwrap();
    (
        PrincipalId::parse(&format!("nitrile://{}/service/logd", config.cell)).unwrap(),
        config.endpoints.logd.clone().unwrap(),
    )
}

/// A current-thread runtime for the async parts of a test.
pub(crate) fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

/// An ingest batch of a journal of `source` (`kind/name`) whose one record
/// says operator/bob executed host.drain on host/h1.
pub(crate) fn bobs_drain_batch(dir: &Path, source: &str) -> Vec<u8> {
    use nitrile_api::{Audience, Operation, ResourceId};
    use nitrile_audit::{AuditRecord, Journal, JournalReader, Outcome, RequestId};
    let writer = PrincipalId::parse(&format!("nitrile://local/{source}")).unwrap();
    let path = dir.join(format!("journal-{}", source.replace('/', "-")));
    let j = Journal::open(&path, &writer.uri()).unwrap();
    let drain = AuditRecord::outcome(
        time::OffsetDateTime::now_utc(),
        writer,
        RequestId::from_bytes([0xbb; 16]),
        Outcome::Executed,
    )
    .with_principal(PrincipalId::parse("nitrile://local/operator/bob").unwrap())
    .with_operations([Operation::HostDrain])
    .with_resources([ResourceId::parse("host/h1").unwrap()])
    .with_audience(Audience::new("h1").unwrap());
    j.append(&drain.encode().unwrap()).unwrap();
    drop(j);
    let reader = JournalReader::open(&path).unwrap();
    let h = reader.header().clone();
    let entries: Vec<_> = reader
        .map(|e| {
            let e = e.unwrap();
            nitrile_logclient::protocol::IngestEntry {
                seq: e.seq,
                hash: e.hash,
                payload: e.payload,
            }
        })
        .collect();
    serde_json::to_vec(&nitrile_logclient::protocol::IngestBatch {
        journal: nitrile_logclient::protocol::JournalRef {
            source: h.source,
            journal_id: h.journal_id,
            genesis: h.genesis,
        },
        entries,
        head: None,
    })
    .unwrap()
}

/// carol's alerts, as `nitrile audit alerts -o json` lists them.
pub(crate) fn alerts(cell: &cell::Cell) -> Vec<serde_json::Value> {
    let out = cell.ok(&cell.carol, &["audit", "alerts", "-o", "json"]);
    serde_json::from_str(&out).unwrap()
}
