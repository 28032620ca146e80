//! The one-machine cell the host agent's benchmarks run against: the
//! sample cell's CA, entitlements and principals, a host agent config, and
//! a token minted by the token service in-process.

#![allow(dead_code)]

use std::path::PathBuf;

use nitrile_api::wire::{TokenRequest, TokenResponse};
use nitrile_api::{Audience, Name, Operation, PrincipalId, PrincipalKind, ResourceId};
use nitrile_cell::{CellLayout, bootstrap, provision_host};
use nitrile_hostd::{BackendName, HostdConfig};
use nitrile_pki::PeerIdentity;
use nitrile_pki::tls::{CaRoots, TlsIdentity};
use nitrile_tokend::{Tokend, TokendConfig};
use time::OffsetDateTime;

pub(crate) struct Cell {
    _dir: tempfile::TempDir,
    pub(crate) layout: CellLayout,
    pub(crate) cell: Name,
    pub(crate) tokend: PrincipalId,
    pub(crate) alice: PrincipalId,
}

/// A fresh sample cell in a temporary directory.
pub(crate) fn cell() -> Cell {
    let dir = tempfile::tempdir().expect("temporary directory");
    let layout = CellLayout::new(&dir.path().join("state"));
    let cell = Name::new("bench").expect("cell name");
    let boot =
        bootstrap(&layout, &cell, "127.0.0.1:0", OffsetDateTime::now_utc()).expect("bootstrap");
    let alice = boot
        .clients
        .iter()
        .map(|(p, _)| p.clone())
        .find(|p| p.kind == PrincipalKind::Operator && p.name.as_str() == "alice")
        .expect("the sample cell has operator alice");
    Cell {
        _dir: dir,
        layout,
        cell,
        tokend: boot.tokend,
        alice,
    }
}

impl Cell {
    pub(crate) fn tokend_config(&self) -> TokendConfig {
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

    /// The cell's CA roots.
    pub(crate) fn roots(&self) -> CaRoots {
        CaRoots::load(&self.layout.ca_cert()).expect("CA roots")
    }

    pub(crate) fn alice_tls(&self) -> TlsIdentity {
        let (cert, key) = self.layout.cert_and_key(&self.alice);
        TlsIdentity::load(&cert, &key).expect("alice's certificate")
    }

    /// A host agent config for `host`, provisioned afresh (certificate,
    /// pinned issuer keys), with its own state directory.
    pub(crate) fn host_config(&self, host: &Name, state: PathBuf) -> HostdConfig {
        let provisioned = provision_host(&self.layout, &self.cell, host, OffsetDateTime::now_utc())
            .expect("provision host");
        let images = self.layout.images_dir();
        std::fs::create_dir_all(&images).expect("image store directory");
        let mut config = HostdConfig::new(
            self.cell.clone(),
            host.clone(),
            "127.0.0.1:0".parse().expect("address"),
            state,
            self.layout.ca_cert(),
            provisioned.cert,
            provisioned.key,
            provisioned.issuer_keys,
            images,
        );
        // No VM is launched here; the qemu backend is cheapest to set up.
        config.hypervisor.backend = BackendName::Qemu;
        config
    }
}

/// Mints a `host.describe` token on `host/<host>` for alice through the
/// token service in-process (Cedar, quota-free grant, grant record durable).
pub(crate) async fn mint(cell: &Cell, host: &Name) -> String {
    let tokend = Tokend::open(&cell.tokend_config())
        .await
        .expect("open tokend");
    let peer = PeerIdentity::from_der(cell.alice_tls().leaf(), &cell.cell).expect("alice");
    let resource = ResourceId::parse(&format!("host/{host}")).expect("resource");
    let request = TokenRequest {
        operations: vec![Operation::HostDescribe],
        resources: vec![resource],
        audience: Audience::new(host.as_str()).expect("audience"),
        group: None,
        lifetime_secs: Some(300),
    };
    let body = serde_json::to_vec(&request).expect("request JSON");
    let reply = tokend.service().issue(&peer, &body);
    assert_eq!(
        reply.status,
        200,
        "{}",
        String::from_utf8_lossy(&reply.body)
    );
    let response: TokenResponse = serde_json::from_slice(&reply.body).expect("token response");
    response.token
}

/// A host agent serving on its own thread and multi-thread runtime (named
/// `hostd-rt`, so its CPU can be told apart), until [`RunningHost::stop`].
pub(crate) struct RunningHost {
    pub(crate) addr: std::net::SocketAddr,
    stop: tokio::sync::oneshot::Sender<()>,
    thread: std::thread::JoinHandle<()>,
}

impl RunningHost {
    /// Stops the agent and waits for its thread.
    pub(crate) fn stop(self) {
        let _ = self.stop.send(());
        self.thread.join().expect("hostd thread");
    }
}

/// Starts the host agent of `config` with `options`.
pub(crate) fn start_hostd(
    config: HostdConfig,
    options: nitrile_hostd::HostdOptions,
) -> RunningHost {
    let (addr_tx, addr_rx) = std::sync::mpsc::channel::<std::net::SocketAddr>();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let thread = std::thread::Builder::new()
        .name("hostd".into())
        .spawn(move || {
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .thread_name("hostd-rt")
                .enable_all()
                .build()
                .expect("hostd runtime");
            runtime.block_on(async move {
                let hostd = nitrile_hostd::Hostd::open(&config, options)
                    .await
                    .expect("open hostd");
                addr_tx
                    .send(hostd.local_addr().expect("bound address"))
                    .expect("send address");
                hostd
                    .serve(async move {
                        let _ = stop_rx.await;
                    })
                    .await
                    .expect("hostd serve");
            });
        })
        .expect("hostd thread");
    let addr = addr_rx.recv().expect("hostd address");
    RunningHost {
        addr,
        stop: stop_tx,
        thread,
    }
}
