//! The host's side of instance networks over real mTLS with real tokens:
//! a host believes another host's tunnel announcement only if the cell's
//! CA vouches for that host and it signed exactly what is announced,
//! whoever relays it; only placement may update a host's network; a host
//! without a data path refuses a launch with a NIC.
//!
//! Data paths live in network namespaces of their own: the tests that
//! start one need root and print `SKIPPED: <reason>` without it.

use std::net::{IpAddr, Ipv4Addr};

use base64::Engine as _;
use nitrile_api::admin::{AdminRequest, HostDescription, LaunchRequest};
use nitrile_api::network::{
    HostNetwork, MacAddr, NetworkAttachment, NetworkRoute, NetworkUpdate, PeerAnnouncement,
};
use nitrile_api::wire::TokenRequest;
use nitrile_api::{Audience, Name, Operation, PrincipalId};
use nitrile_audit::RecordKind;
use nitrile_hostd::network::NetworkConfig;
use nitrile_pki::sign::CellSigner;
use nitrile_pki::tls::TlsIdentity;
use support::guest::Namespaces;
use support::{TestCell, is_root, journal_records, r, refusal};

mod support;

const ALICE: &str = "operator/alice";
const PLACEMENT: &str = "service/placement";

fn name(s: &str) -> Name {
    Name::new(s).unwrap()
}

fn network_config(host: &str) -> NetworkConfig {
    NetworkConfig {
        wireguard_listen: "127.0.0.1:0".parse().unwrap(),
        ingress_address: IpAddr::V4(Ipv4Addr::LOCALHOST),
        netns: Some(format!("nitrile-t{}-{host}", std::process::id() % 100_000)),
    }
}

async fn cell_with_network(hosts: &[&str]) -> Option<TestCell> {
    if !is_root() {
        println!("SKIPPED: a host's data path makes a network namespace, which needs root");
        return None;
    }
    let mut cell = TestCell::new().await;
    for h in hosts {
        let mut setup = cell.default_setup();
        setup.network = Some(network_config(h));
        cell.start_host_with(h, setup).await;
    }
    Some(cell)
}

async fn describe(cell: &TestCell, host: &str) -> HostDescription {
    let req = AdminRequest::HostDescribe;
    let token = cell.token_for(ALICE, host, &req).await;
    let (status, body) = cell.call(ALICE, host, &req, Some(&token)).await;
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    serde_json::from_slice(&body).unwrap()
}

async fn update(cell: &TestCell, host: &str, update: NetworkUpdate) -> (u16, bytes::Bytes) {
    let req = AdminRequest::NetworkUpdate(update);
    let token = cell.token_for(PLACEMENT, host, &req).await;
    cell.call(PLACEMENT, host, &req, Some(&token)).await
}

/// The stable code of the refusal in `body`, from its journal record.
fn code_of(cell: &TestCell, host: &str, body: &[u8]) -> String {
    let seq = refusal(body)
        .audit_seq
        .expect("the refusal names its record");
    let record =
        journal_records(&cell.host_journal(host))[usize::try_from(seq - 1).unwrap()].clone();
    match record.kind {
        RecordKind::Refusal => record
            .reason
            .unwrap_or_default()
            .split(':')
            .next()
            .unwrap()
            .to_owned(),
        _ => record.detail.unwrap()["code"].as_str().unwrap().to_owned(),
    }
}

/// An announcement of `host` signed with `identity`'s key.
fn signed(identity: &TlsIdentity, cell: &str, host: &str, endpoint: &str) -> PeerAnnouncement {
    let signer = CellSigner::new(identity).unwrap();
    let mut a = PeerAnnouncement {
        host: name(host),
        cell: name(cell),
        wireguard_public_key: base64::engine::general_purpose::STANDARD.encode([7u8; 32]),
        endpoint: endpoint.to_owned(),
        issued_at: "2026-12-06T00:00:00Z".to_owned(),
        certificate: signer.certificate_pem().to_owned(),
        signature: String::new(),
    };
    a.signature =
        base64::engine::general_purpose::STANDARD.encode(signer.sign(&a.signed_bytes()).unwrap());
    a
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_host_believes_only_announcements_the_cell_ca_vouches_for() {
    let _namespaces = Namespaces(
        ["h1", "h2"]
            .iter()
            .map(|h| network_config(h).netns.unwrap())
            .collect(),
    );
    let Some(cell) = cell_with_network(&["h1", "h2"]).await else {
        return;
    };
    let h2 = describe(&cell, "h2").await;
    let good = h2.network.expect("h2 has a data path").announcement;
    assert_eq!(good.host, name("h2"));
    let route = NetworkRoute {
        vni: 7,
        address: Ipv4Addr::new(10, 80, 0, 11),
        host: name("h2"),
    };

    // The genuine announcement, relayed by placement: h2 becomes a peer.
    let (status, body) = update(
        &cell,
        "h1",
        NetworkUpdate {
            peers: vec![good.clone()],
            routes: vec![route.clone()],
        },
    )
    .await;
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    let net: HostNetwork = serde_json::from_slice(&body).unwrap();
    assert_eq!((net.peers, net.routes), (1, 1));

    // Each forgery refuses the whole update and changes nothing.
    let mut moved = good.clone();
    moved.endpoint = "127.0.0.1:9".to_owned();
    let mut other_key = good.clone();
    other_key.wireguard_public_key = base64::engine::general_purpose::STANDARD.encode([9u8; 32]);
    let mut renamed = good.clone();
    renamed.host = name("h3");
    // Signed by placement's own certificate, claiming to be host h3.
    let by_placement = signed(&cell.identity(PLACEMENT), "local", "h3", "127.0.0.1:9");
    // Signed by a host of another cell's CA.
    let other_dir = tempfile::tempdir().unwrap();
    let other_ca = nitrile_pki::CellCa::init_or_load(
        other_dir.path(),
        &name("local"),
        time::OffsetDateTime::now_utc(),
    )
    .unwrap();
    let issued = other_ca
        .issue(
            &PrincipalId::parse("nitrile://local/host/h3").unwrap(),
            None,
            time::OffsetDateTime::now_utc(),
        )
        .unwrap();
    let foreign = signed(
        &TlsIdentity::from_issued(&issued).unwrap(),
        "local",
        "h3",
        "127.0.0.1:9",
    );
    for (what, forged) in [
        ("a moved endpoint", moved),
        ("another key", other_key),
        ("another host name", renamed),
        ("a service's certificate", by_placement),
        ("another CA's host", foreign),
    ] {
        let (status, body) = update(
            &cell,
            "h1",
            NetworkUpdate {
                // Beside the genuine one when it names another host: one
                // bad announcement refuses the whole update.
                peers: if forged.host == good.host {
                    vec![forged]
                } else {
                    vec![good.clone(), forged]
                },
                routes: vec![],
            },
        )
        .await;
        assert_eq!(status, 400, "{what}: {}", String::from_utf8_lossy(&body));
        assert_eq!(code_of(&cell, "h1", &body), "bad_network", "{what}");
        let net = describe(&cell, "h1").await.network.unwrap();
        assert_eq!(
            (net.peers, net.routes),
            (1, 1),
            "{what} changed the network"
        );
    }

    // Every update, refused ones included, is on h1's record before it acted.
    let records = journal_records(&cell.host_journal("h1"));
    let updates = records
        .iter()
        .filter(|r| {
            r.kind == RecordKind::Request && r.operations.first() == Some(&Operation::NetworkUpdate)
        })
        .count();
    assert_eq!(updates, 6);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_placement_updates_a_hosts_network() {
    let cell = TestCell::new().await;
    for who in [ALICE, "auditor/carol"] {
        let ask = TokenRequest {
            operations: vec![Operation::NetworkUpdate],
            resources: vec![r("host/h1")],
            audience: Audience::new("h1").unwrap(),
            group: None,
            lifetime_secs: None,
        };
        let resp = cell.token_request(who, &ask).await;
        assert_eq!(
            resp.status.as_u16(),
            403,
            "{who} got a network.update token"
        );
        let refused = resp.refusal().unwrap();
        assert_eq!(refused.step.as_str(), "entitlement", "{who}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_host_without_a_data_path_refuses_a_launch_with_a_nic() {
    let mut cell = TestCell::new().await;
    cell.start_host("h1").await;
    let req = AdminRequest::InstanceLaunch(LaunchRequest {
        instance: name("acme--web1"),
        image: "ab".repeat(32).parse().unwrap(),
        vcpus: 1,
        memory_mib: 128,
        volumes: vec![],
        scratch_mib: None,
        network: Some(NetworkAttachment {
            customer: name("acme"),
            vni: 100,
            address: Ipv4Addr::new(10, 80, 0, 10),
            prefix_len: 24,
            mac: MacAddr([0x02, 0x4e, 0, 100, 0, 10]),
            ssh_public_keys: vec![],
            user_data: String::new(),
            publish: vec![22],
        }),
    });
    let token = cell.token_for(PLACEMENT, "h1", &req).await;
    let (status, body) = cell.call(PLACEMENT, "h1", &req, Some(&token)).await;
    assert_eq!(status, 409, "{}", String::from_utf8_lossy(&body));
    assert_eq!(code_of(&cell, "h1", &body), "no_network");
}
