//! The host's instance network: its data path (`nitrile_vnet`), its signed
//! tunnel announcement, the verification of the other hosts'
//! announcements before any becomes a peer, each instance's port with what
//! its metadata service serves, and the instance identity documents the
//! host signs.
//!
//! What a launch asked for (addresses, SSH keys, user data, published
//! ports) is kept in the instance's directory (`network.json`, owner-only)
//! so that a restarted host agent connects a re-adopted instance again;
//! no response carries the keys or the user data.

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use base64::Engine as _;
use nitrile_api::Name;
use nitrile_api::admin::Sha256Hex;
use nitrile_api::network::{
    HostNetwork, IDENTITY_CONTEXT, InstanceIdentity, InstanceNetwork, NetworkAttachment,
    NetworkUpdate, PeerAnnouncement, PublishedPort, SignedIdentityDocument,
};
use nitrile_pki::sign::{CellSigner, verify_signed};
use nitrile_pki::tls::{CaRoots, TlsIdentity};
use nitrile_vnet::stack::InstanceMetadata;
use nitrile_vnet::{DataPath, DataPathConfig, PortConfig};
use rustls_pki_types::UnixTime;
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

/// The `[network]` section of `hostd.toml`: the host has a data path.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetworkConfig {
    /// Where the data path receives WireGuard datagrams from other hosts
    /// (port 0: any free port; the announcement says which).
    pub wireguard_listen: SocketAddr,
    /// The host address instances' published ports are bound on.
    pub ingress_address: IpAddr,
    /// The data path's network namespace (default `nitrile-dp-<host>`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub netns: Option<String>,
}

/// Why the instance network could not start or act.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum NetError {
    /// The data path refused or failed.
    #[error("data path")]
    DataPath(#[from] nitrile_vnet::VnetError),
    /// The host's key cannot sign.
    #[error("signing with the host key")]
    Sign(#[from] nitrile_pki::sign::SignError),
    /// A peer announcement was refused; nothing changed.
    #[error("peer {host}: {reason}")]
    Peer {
        /// The announced host.
        host: Name,
        /// Why.
        reason: String,
    },
}

/// What a connected instance's network is kept as on disk.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InstancePort {
    /// What the launch asked for.
    pub attachment: NetworkAttachment,
    /// The tap device of its VM.
    pub tap: String,
    /// The host ports its published ports got (kept across restarts).
    #[serde(default)]
    pub published: Vec<PublishedPort>,
    /// Its signed identity document (JSON of [`SignedIdentityDocument`]).
    pub identity_document: String,
}

/// The host's instance network.
pub struct HostNet {
    dp: DataPath,
    signer: CellSigner,
    roots: CaRoots,
    cell: Name,
    host: Name,
    announcement: PeerAnnouncement,
    peers: AtomicU32,
    routes: AtomicU32,
    connected: Mutex<std::collections::BTreeSet<Name>>,
}

impl std::fmt::Debug for HostNet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HostNet")
            .field("host", &self.host)
            .field("endpoint", &self.announcement.endpoint)
            .finish_non_exhaustive()
    }
}

/// The tap name of an instance: `nt` and 12 hex digits of a hash of its
/// name (interface names are at most 15 bytes).
pub fn tap_name(instance: &Name) -> String {
    use sha2::Digest as _;
    let h = sha2::Sha256::digest(instance.as_str().as_bytes());
    let hex: String = h.iter().take(6).map(|b| format!("{b:02x}")).collect();
    format!("nt{hex}")
}

impl HostNet {
    /// Starts the data path and signs the host's announcement.
    pub fn start(
        config: &NetworkConfig,
        cell: &Name,
        host: &Name,
        identity: &TlsIdentity,
        roots: CaRoots,
        now: OffsetDateTime,
    ) -> Result<Self, NetError> {
        let netns = config
            .netns
            .clone()
            .unwrap_or_else(|| format!("nitrile-dp-{host}"));
        let dp = DataPath::start(DataPathConfig {
            host: host.clone(),
            netns,
            wireguard_listen: config.wireguard_listen,
            ingress_addr: config.ingress_address,
        })?;
        let signer = CellSigner::new(identity)?;
        let mut announcement = PeerAnnouncement {
            host: host.clone(),
            cell: cell.clone(),
            wireguard_public_key: base64::engine::general_purpose::STANDARD.encode(dp.public_key()),
            endpoint: dp.local_endpoint().to_string(),
            issued_at: nitrile_audit::format_time(now),
            certificate: signer.certificate_pem().to_owned(),
            signature: String::new(),
        };
        announcement.signature = base64::engine::general_purpose::STANDARD
            .encode(signer.sign(&announcement.signed_bytes())?);
        Ok(Self {
            dp,
            signer,
            roots,
            cell: cell.clone(),
            host: host.clone(),
            announcement,
            peers: AtomicU32::new(0),
            routes: AtomicU32::new(0),
            connected: Mutex::new(Default::default()),
        })
    }

    /// The file of the data path's namespace, where instance taps live.
    pub fn netns_path(&self) -> PathBuf {
        Path::new("/run/netns").join(self.dp.namespace().name())
    }

    /// What `host.describe` shows.
    pub fn describe(&self) -> HostNetwork {
        HostNetwork {
            announcement: self.announcement.clone(),
            peers: self.peers.load(Ordering::SeqCst),
            routes: self.routes.load(Ordering::SeqCst),
        }
    }

    /// Checks one announcement: its certificate chains to the cell CA,
    /// names `host/<announced host>` of this cell, and signed exactly
    /// these fields.
    fn verify(&self, a: &PeerAnnouncement) -> Result<nitrile_vnet::Peer, NetError> {
        let refuse = |reason: String| NetError::Peer {
            host: a.host.clone(),
            reason,
        };
        if a.cell != self.cell {
            return Err(refuse(format!(
                "announces cell {}, not {}",
                a.cell, self.cell
            )));
        }
        let signature = base64::engine::general_purpose::STANDARD
            .decode(a.signature.as_bytes())
            .map_err(|_| refuse("the signature is not base64".into()))?;
        let principal = verify_signed(
            &self.roots,
            &self.cell,
            a.certificate.as_bytes(),
            &a.signed_bytes(),
            &signature,
            UnixTime::now(),
        )
        .map_err(|e| refuse(e.to_string()))?;
        if principal.kind != nitrile_api::PrincipalKind::Host || principal.name != a.host {
            return Err(refuse(format!(
                "its certificate names {principal}, not host {}",
                a.host
            )));
        }
        Ok(nitrile_vnet::Peer {
            host: a.host.clone(),
            public_key: a.public_key().map_err(refuse)?,
            endpoint: a.endpoint().map_err(refuse)?,
        })
    }

    /// `network.update`: every announcement verified first (one bad one
    /// refuses the whole update and changes nothing), then peers and routes
    /// replaced.
    pub fn update(&self, update: &NetworkUpdate) -> Result<HostNetwork, NetError> {
        let mut peers = Vec::new();
        for a in &update.peers {
            let peer = self.verify(a)?;
            if a.host != self.host {
                peers.push(peer);
            }
        }
        let routes: Vec<nitrile_vnet::Route> = update
            .routes
            .iter()
            .map(|r| nitrile_vnet::Route {
                vni: r.vni,
                address: r.address,
                host: r.host.clone(),
            })
            .collect();
        let n_peers = u32::try_from(peers.len()).unwrap_or(u32::MAX);
        let n_routes = u32::try_from(routes.len()).unwrap_or(u32::MAX);
        self.dp.set_peers(peers)?;
        self.dp.set_routes(routes)?;
        self.peers.store(n_peers, Ordering::SeqCst);
        self.routes.store(n_routes, Ordering::SeqCst);
        Ok(self.describe())
    }

    /// Makes and signs an instance's identity document.
    pub fn identity_document(
        &self,
        instance: &Name,
        image: Sha256Hex,
        attachment: &NetworkAttachment,
        launched_at: &str,
        now: OffsetDateTime,
    ) -> Result<String, NetError> {
        let identity = InstanceIdentity {
            version: 1,
            cell: self.cell.clone(),
            host: self.host.clone(),
            instance: instance.clone(),
            customer: attachment.customer.clone(),
            image,
            vni: attachment.vni,
            private_ipv4: attachment.address,
            mac: attachment.mac,
            launched_at: launched_at.to_owned(),
            issued_at: nitrile_audit::format_time(now),
        };
        let document = serde_json::to_vec(&identity)
            .unwrap_or_else(|_| unreachable!("names, numbers and addresses serialize"));
        let mut signed = IDENTITY_CONTEXT.as_bytes().to_vec();
        signed.extend_from_slice(&document);
        let signature = self.signer.sign(&signed)?;
        let b64 = base64::engine::general_purpose::STANDARD;
        let doc = SignedIdentityDocument {
            document: b64.encode(&document),
            signature: b64.encode(signature),
            certificate: self.signer.certificate_pem().to_owned(),
        };
        Ok(
            serde_json::to_string_pretty(&doc)
                .unwrap_or_else(|_| unreachable!("strings serialize")),
        )
    }

    /// Connects a running instance's VM (its tap exists) to the data path
    /// and publishes its ports (on the host ports it had, if any); returns
    /// what `instance.describe` shows.
    pub fn connect(
        &self,
        instance: &Name,
        port: &mut InstancePort,
    ) -> Result<InstanceNetwork, NetError> {
        let a = &port.attachment;
        let user_data = a.user_data_bytes().unwrap_or_default();
        let metadata = InstanceMetadata {
            instance_id: instance.to_string(),
            local_ipv4: a.address,
            mac: a.mac.0,
            ssh_public_keys: a.ssh_public_keys.clone(),
            user_data,
            identity_document: port.identity_document.clone().into_bytes(),
        };
        self.dp.attach(PortConfig {
            instance: instance.clone(),
            tap: port.tap.clone(),
            vni: a.vni,
            mac: a.mac.0,
            address: a.address,
            prefix_len: a.prefix_len,
            metadata: Arc::new(metadata),
        })?;
        self.connected
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(instance.clone());
        let mut published = Vec::new();
        for instance_port in &a.publish {
            let before = port
                .published
                .iter()
                .find(|p| p.instance_port == *instance_port)
                .and_then(|p| p.endpoint.parse::<SocketAddr>().ok())
                .map_or(0, |e| e.port());
            let bound = match self.dp.publish(instance, before, *instance_port) {
                Ok(b) => b,
                // The port it had is taken now: any free one.
                Err(_) if before != 0 => self.dp.publish(instance, 0, *instance_port)?,
                Err(e) => return Err(e.into()),
            };
            published.push(PublishedPort {
                instance_port: *instance_port,
                endpoint: bound.to_string(),
            });
        }
        port.published = published.clone();
        Ok(InstanceNetwork {
            customer: a.customer.clone(),
            vni: a.vni,
            address: a.address,
            prefix_len: a.prefix_len,
            mac: a.mac,
            published,
        })
    }

    /// Disconnects an instance (its published ports close).
    pub fn disconnect(&self, instance: &Name) {
        let was = self
            .connected
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(instance);
        if was {
            self.dp.detach(instance);
        }
    }

    /// Removes the data path's namespace (its bind mount), once no VM
    /// holds a tap in it: at a shutdown that stopped every instance.
    pub fn remove_namespace(&self) {
        let name = self.dp.namespace().name().to_owned();
        if let Err(e) = nitrile_vnet::Namespace::remove(&name) {
            tracing::warn!(namespace = %name, error = %e, "could not remove the data path's namespace");
        }
    }

    /// The data path's counters.
    pub fn counters(&self) -> nitrile_vnet::Counters {
        self.dp.counters()
    }
}
