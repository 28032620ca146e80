//! The placement record: which host runs which customer instance, each
//! customer's virtual network (VNI) and addresses, and who owns which
//! image. One JSON file (`placement.json`, at most [`MAX_STATE_LEN`]),
//! replaced whole with `nitrile_fs::write_atomic` after every change, so a
//! crash leaves the record before or after a change, never half of one.
//!
//! Networks: every customer gets a VNI once (from [`FIRST_VNI`] up, never
//! reused) and the range `10.80.0.0/24`, the same for every customer: the
//! VNI keeps them apart. Instance addresses go from `10.80.0.10` up, per
//! customer, the lowest free one, never one still allocated; the MAC is
//! `02:4e:<vni hi>:<vni lo>:<address byte 3>:<address byte 4>`.

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};

use nitrile_api::Name;
use nitrile_api::admin::{HostDescription, PlacementState};
use nitrile_api::network::{NetworkAttachment, NetworkRoute, NetworkUpdate, PublishedPort};
use nitrile_image::Digest;
use nitrile_placed_api::wire::InstanceState;
use serde::{Deserialize, Serialize};

/// Largest placement record read.
pub const MAX_STATE_LEN: u64 = 16 * 1024 * 1024;
/// The first VNI given to a customer.
pub const FIRST_VNI: u32 = 100;
/// The largest VNI (24 bits).
pub const MAX_VNI: u32 = (1 << 24) - 1;
/// Every customer network's prefix.
pub const NETWORK: Ipv4Addr = Ipv4Addr::new(10, 80, 0, 0);
/// Its prefix length.
pub const PREFIX_LEN: u8 = 24;
/// The first instance address's last byte.
pub const FIRST_HOST_BYTE: u8 = 10;
/// The last instance address's last byte.
pub const LAST_HOST_BYTE: u8 = 254;

/// Why the placement record could not be read or changed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// the file could not be read or written
    #[error("placement record {}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: nitrile_fs::FsError,
    },
    /// the file is not a placement record
    #[error("placement record {} is malformed", path.display())]
    Malformed {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: serde_json::Error,
    },
    /// every VNI is taken
    #[error("no VNI is left for another customer")]
    NoVni,
    /// the customer's network has no free address
    #[error("customer {0}'s network has no free address (10.80.0.10 to .254 are allocated)")]
    NoAddress(Name),
}

/// One instance as placement records it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InstanceRecord {
    /// The owner's name.
    pub customer: Name,
    /// The instance's name within the owner's.
    pub name: Name,
    /// The host it runs on.
    pub host: Name,
    /// The image.
    pub image: Digest,
    /// Memory in MiB.
    pub memory_mib: u32,
    /// vCPUs.
    pub vcpus: u8,
    /// The owner's VNI.
    pub vni: u32,
    /// Its address on the owner's network.
    pub address: Ipv4Addr,
    /// Published instance ports.
    pub publish: Vec<u16>,
    /// Where the host publishes them (host address and port), as the host
    /// last said.
    #[serde(default)]
    pub published: Vec<PublishedPort>,
    /// Its state as placement last saw it.
    pub state: InstanceState,
    /// When it was run (RFC 3339).
    pub created: String,
    /// Its root volume, when its image has a root disk.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub root_volume: Option<nitrile_placed_api::wire::RootVolume>,
}

impl InstanceRecord {
    /// The volumes it boots with.
    pub fn volumes(&self) -> Vec<Name> {
        self.root_volume.iter().map(|r| r.volume.clone()).collect()
    }

    /// The key of the record: `<customer>--<name>`, the instance's name on
    /// its host.
    pub fn key(&self) -> String {
        format!("{}--{}", self.customer, self.name)
    }

    /// Its MAC address.
    pub fn mac(&self) -> String {
        mac(self.vni, self.address)
    }
}

/// The MAC of `address` on network `vni`.
pub fn mac(vni: u32, address: Ipv4Addr) -> String {
    let [_, _, c, d] = address.octets();
    let [_, _, hi, lo] = vni.to_be_bytes();
    format!("02:4e:{hi:02x}:{lo:02x}:{c:02x}:{d:02x}")
}

/// Who owns an image, and since when.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ImageRecord {
    /// The customers that imported it.
    pub owners: BTreeSet<Name>,
    /// When it was first imported (RFC 3339).
    pub imported: String,
}

/// The whole record.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Placements {
    /// Customer -> VNI.
    pub vnis: BTreeMap<Name, u32>,
    /// `<customer>--<name>` -> the instance (terminated ones are removed).
    pub instances: BTreeMap<String, InstanceRecord>,
    /// Image digest (hex) -> its owners.
    pub images: BTreeMap<String, ImageRecord>,
}

impl Placements {
    /// The VNI of `customer`, allocated (the next after the highest) if it
    /// has none.
    pub fn vni(&mut self, customer: &Name) -> Result<u32, StoreError> {
        if let Some(v) = self.vnis.get(customer) {
            return Ok(*v);
        }
        let next = self
            .vnis
            .values()
            .max()
            .map_or(Some(FIRST_VNI), |v| v.checked_add(1))
            .filter(|v| *v <= MAX_VNI)
            .ok_or(StoreError::NoVni)?;
        self.vnis.insert(customer.clone(), next);
        Ok(next)
    }

    /// The lowest address of `customer`'s network no instance of it holds.
    pub fn free_address(&self, customer: &Name) -> Result<Ipv4Addr, StoreError> {
        let used: BTreeSet<Ipv4Addr> = self
            .instances
            .values()
            .filter(|i| &i.customer == customer)
            .map(|i| i.address)
            .collect();
        let [a, b, c, _] = NETWORK.octets();
        (FIRST_HOST_BYTE..=LAST_HOST_BYTE)
            .map(|d| Ipv4Addr::new(a, b, c, d))
            .find(|addr| !used.contains(addr))
            .ok_or_else(|| StoreError::NoAddress(customer.clone()))
    }

    /// The instances of `customer`, by name.
    pub fn instances_of<'a>(
        &'a self,
        customer: &'a Name,
    ) -> impl Iterator<Item = &'a InstanceRecord> + 'a {
        self.instances
            .values()
            .filter(move |i| &i.customer == customer)
    }

    /// Where every instance address of the cell lives: one route per
    /// recorded instance (running, stopped or being launched; terminated
    /// ones are no longer recorded), by VNI and address.
    pub fn routes(&self) -> Vec<NetworkRoute> {
        let mut routes: Vec<NetworkRoute> = self
            .instances
            .values()
            .filter(|i| i.state != InstanceState::Terminated)
            .map(|i| NetworkRoute {
                vni: i.vni,
                address: i.address,
                host: i.host.clone(),
            })
            .collect();
        routes.sort();
        routes
    }

    /// Whether `customer` owns the image `digest`.
    pub fn owns_image(&self, customer: &Name, digest: &Digest) -> bool {
        self.images
            .get(&digest.to_hex())
            .is_some_and(|r| r.owners.contains(customer))
    }
}

/// Why a host was not chosen.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Skipped {
    /// It did not answer `host.describe`.
    Unreachable,
    /// It is drained.
    Drained,
    /// Its hypervisor or journal is not healthy.
    Unhealthy,
    /// Not enough vCPUs or memory left.
    Full,
}

/// Picks a host for an instance of `customer` with `vcpus` and
/// `memory_mib`: among the hosts that answered, are accepting, healthy and
/// have room, the one with the fewest instances of this customer, then the
/// fewest in all, then the first by name. `None` when no host fits; the
/// reasons are in `skipped`.
pub fn choose_host(
    described: &BTreeMap<Name, Option<HostDescription>>,
    state: &Placements,
    customer: &Name,
    vcpus: u8,
    memory_mib: u32,
    skipped: &mut Vec<(Name, Skipped)>,
) -> Option<Name> {
    // This customer's instances per host, counted once (not once per host).
    let mut mine_on: BTreeMap<&Name, usize> = BTreeMap::new();
    for i in state.instances_of(customer) {
        *mine_on.entry(&i.host).or_default() += 1;
    }
    let mut best: Option<(usize, u32, &Name)> = None;
    for (host, d) in described {
        let Some(d) = d else {
            skipped.push((host.clone(), Skipped::Unreachable));
            continue;
        };
        if d.placement != PlacementState::Accepting {
            skipped.push((host.clone(), Skipped::Drained));
            continue;
        }
        if d.health.journal != nitrile_api::admin::Health::Ok
            || d.health.hypervisor != nitrile_api::admin::Health::Ok
        {
            skipped.push((host.clone(), Skipped::Unhealthy));
            continue;
        }
        let c = &d.capacity;
        let vcpus_free = c.vcpus_total.saturating_sub(c.vcpus_allocated);
        let memory_free = c.memory_mib_total.saturating_sub(c.memory_mib_allocated);
        if vcpus_free < u32::from(vcpus) || memory_free < u64::from(memory_mib) {
            skipped.push((host.clone(), Skipped::Full));
            continue;
        }
        let mine = mine_on.get(host).copied().unwrap_or(0);
        let key = (mine, c.instances, host);
        if best.as_ref().is_none_or(|b| key < *b) {
            best = Some(key);
        }
    }
    best.map(|(_, _, h)| h.clone())
}

/// The `network.update` every host of the fleet gets: the signed
/// announcements of the hosts that answered `host.describe` with one (a
/// host without a data path, or one that did not answer, is left out; its
/// instances' routes stay, so that the others keep sending to it once it
/// is back), and every recorded instance's route.
pub fn network_update(
    described: &BTreeMap<Name, Option<HostDescription>>,
    state: &Placements,
) -> NetworkUpdate {
    NetworkUpdate {
        peers: described
            .values()
            .flatten()
            .filter_map(|d| d.network.as_ref().map(|n| n.announcement.clone()))
            .collect(),
        routes: state.routes(),
    }
}

/// What a network push depends on of one host, as `host.describe` showed
/// it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HostView {
    /// It did not answer.
    Unreachable,
    /// It answered without a data path.
    NoDataPath,
    /// It answered with this signed announcement (a host agent makes a new
    /// tunnel key, and so a new announcement, at every start).
    Announced(nitrile_api::network::PeerAnnouncement),
}

/// What a network push depends on of every host of the fleet.
pub type NetworkView = BTreeMap<Name, HostView>;

/// The view of the fleet `described` gives.
pub fn network_view(described: &BTreeMap<Name, Option<HostDescription>>) -> NetworkView {
    described
        .iter()
        .map(|(host, d)| {
            let view = match d {
                None => HostView::Unreachable,
                Some(d) => match &d.network {
                    None => HostView::NoDataPath,
                    Some(n) => HostView::Announced(n.announcement.clone()),
                },
            };
            (host.clone(), view)
        })
        .collect()
}

/// What changed between the view of the last push and `now`, one line per
/// host, by name (empty: nothing did, no push is needed).
pub fn view_changes(last: &NetworkView, now: &NetworkView) -> Vec<String> {
    let mut hosts: BTreeSet<&Name> = last.keys().collect();
    hosts.extend(now.keys());
    let mut changes = Vec::new();
    for host in hosts {
        let (before, after) = (last.get(host), now.get(host));
        if before == after {
            continue;
        }
        let what = match after {
            None => "left the fleet".to_owned(),
            Some(HostView::Unreachable) => "became unreachable".to_owned(),
            Some(HostView::NoDataPath) => "has no data path".to_owned(),
            Some(HostView::Announced(a)) => match before {
                Some(HostView::Announced(b))
                    if b.wireguard_public_key == a.wireguard_public_key =>
                {
                    format!("re-announced (endpoint {})", a.endpoint)
                }
                _ => format!(
                    "announced tunnel key {} at {}",
                    a.wireguard_public_key, a.endpoint
                ),
            },
        };
        changes.push(format!("{host} {what}"));
    }
    changes
}

/// What the launch of `record` asks of its host's data path: the
/// instance's place on its customer's network (VNI, address in
/// [`NETWORK`]/[`PREFIX_LEN`], MAC) and what its metadata service serves it
/// (SSH keys, user data as base64, published ports).
pub fn attachment(
    record: &InstanceRecord,
    ssh_public_keys: Vec<String>,
    user_data: &[u8],
) -> NetworkAttachment {
    use base64::Engine as _;
    let [_, _, hi, lo] = record.vni.to_be_bytes();
    let [_, _, c, d] = record.address.octets();
    NetworkAttachment {
        customer: record.customer.clone(),
        vni: record.vni,
        address: record.address,
        prefix_len: PREFIX_LEN,
        mac: nitrile_api::network::MacAddr([0x02, 0x4e, hi, lo, c, d]),
        ssh_public_keys,
        user_data: base64::engine::general_purpose::STANDARD.encode(user_data),
        publish: record.publish.clone(),
    }
}

/// Reads the record at `path` (an empty one when there is none).
pub fn load(path: &Path) -> Result<Placements, StoreError> {
    match nitrile_fs::read_bounded(path, MAX_STATE_LEN) {
        Ok(bytes) => serde_json::from_slice(&bytes).map_err(|source| StoreError::Malformed {
            path: path.to_owned(),
            source,
        }),
        Err(nitrile_fs::FsError::Missing { .. }) => Ok(Placements::default()),
        Err(source) => Err(StoreError::Io {
            path: path.to_owned(),
            source,
        }),
    }
}

/// Replaces the record at `path` with `state`, atomically and durably.
pub fn save(path: &Path, state: &Placements) -> Result<(), StoreError> {
    let mut bytes = serde_json::to_vec_pretty(state).map_err(|source| StoreError::Malformed {
        path: path.to_owned(),
        source,
    })?;
    bytes.push(b'\n');
    nitrile_fs::write_atomic(path, &bytes, 0o600).map_err(|source| StoreError::Io {
        path: path.to_owned(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use nitrile_api::admin::{Capacity, Health, HostHealth, Software};

    fn name(s: &str) -> Name {
        Name::new(s).unwrap()
    }

    fn host(
        h: &str,
        placement: PlacementState,
        instances: u32,
        vcpus_free: u32,
    ) -> HostDescription {
        HostDescription {
            host: name(h),
            cell: name("local"),
            placement,
            health: HostHealth {
                journal: Health::Ok,
                hypervisor: Health::Ok,
            },
            software: Software {
                nitrile: "0".into(),
                backend: "kvm".into(),
                backend_version: None,
                kernel: "0".into(),
            },
            measurements: Vec::new(),
            capacity: Capacity {
                vcpus_total: 8,
                vcpus_allocated: 8 - vcpus_free,
                memory_mib_total: 8192,
                memory_mib_allocated: 0,
                instances,
            },
            images: Vec::new(),
            started_at: "2024-01-01T00:00:00Z".into(),
            network: None,
        }
    }

    fn record(customer: &str, n: &str, h: &str, address: Ipv4Addr) -> InstanceRecord {
        InstanceRecord {
            customer: name(customer),
            name: name(n),
            host: name(h),
            image: Digest::of(b"x"),
            memory_mib: 256,
            vcpus: 1,
            vni: 100,
            address,
            publish: Vec::new(),
            published: Vec::new(),
            state: InstanceState::Running,
            created: String::new(),
            root_volume: None,
        }
    }

    #[test]
    fn hosts_are_spread_and_drained_or_full_ones_skipped() {
        let acme = name("acme");
        let mut state = Placements::default();
        let mut fleet = BTreeMap::from([
            (
                name("h1"),
                Some(host("h1", PlacementState::Accepting, 0, 8)),
            ),
            (
                name("h2"),
                Some(host("h2", PlacementState::Accepting, 0, 8)),
            ),
        ]);
        let mut skipped = Vec::new();
        assert_eq!(
            choose_host(&fleet, &state, &acme, 1, 256, &mut skipped),
            Some(name("h1"))
        );
        // One of acme's on h1: the next goes to h2, though h2 has more
        // instances of others.
        state.instances.insert(
            "acme--a".into(),
            record("acme", "a", "h1", Ipv4Addr::new(10, 80, 0, 10)),
        );
        fleet.insert(
            name("h2"),
            Some(host("h2", PlacementState::Accepting, 5, 8)),
        );
        assert_eq!(
            choose_host(&fleet, &state, &acme, 1, 256, &mut skipped),
            Some(name("h2"))
        );
        // Drained, full and unreachable hosts are skipped, and said so.
        fleet.insert(name("h2"), Some(host("h2", PlacementState::Drained, 0, 8)));
        fleet.insert(
            name("h3"),
            Some(host("h3", PlacementState::Accepting, 0, 0)),
        );
        fleet.insert(name("h4"), None);
        let mut skipped = Vec::new();
        assert_eq!(
            choose_host(&fleet, &state, &acme, 1, 256, &mut skipped),
            Some(name("h1"))
        );
        assert_eq!(
            skipped,
            [
                (name("h2"), Skipped::Drained),
                (name("h3"), Skipped::Full),
                (name("h4"), Skipped::Unreachable)
            ]
        );
        fleet.insert(name("h1"), Some(host("h1", PlacementState::Drained, 0, 8)));
        assert_eq!(
            choose_host(&fleet, &state, &acme, 1, 256, &mut Vec::new()),
            None
        );
    }

    #[test]
    fn networks_are_per_customer_and_addresses_never_double_allocated() {
        let mut state = Placements::default();
        let acme = name("acme");
        let globex = name("globex");
        assert_eq!(state.vni(&acme).unwrap(), FIRST_VNI);
        assert_eq!(state.vni(&globex).unwrap(), FIRST_VNI + 1);
        assert_eq!(state.vni(&acme).unwrap(), FIRST_VNI);
        let a = state.free_address(&acme).unwrap();
        assert_eq!(a, Ipv4Addr::new(10, 80, 0, 10));
        state
            .instances
            .insert("acme--a".into(), record("acme", "a", "h1", a));
        assert_eq!(
            state.free_address(&acme).unwrap(),
            Ipv4Addr::new(10, 80, 0, 11)
        );
        // globex's range is its own: the same address, another VNI.
        assert_eq!(state.free_address(&globex).unwrap(), a);
        for d in 11..=LAST_HOST_BYTE {
            let n = format!("i{d}");
            state.instances.insert(
                format!("acme--{n}"),
                record("acme", &n, "h1", Ipv4Addr::new(10, 80, 0, d)),
            );
        }
        assert!(matches!(
            state.free_address(&acme),
            Err(StoreError::NoAddress(_))
        ));
        assert_eq!(mac(0x0102, a), "02:4e:01:02:00:0a");
    }

    #[test]
    fn the_network_update_has_every_route_and_only_announced_peers() {
        use nitrile_api::network::{HostNetwork, PeerAnnouncement};
        let mut state = Placements::default();
        let a = Ipv4Addr::new(10, 80, 0, 10);
        state
            .instances
            .insert("acme--a".into(), record("acme", "a", "h1", a));
        let mut b = record("globex", "b", "h2", a);
        b.vni = 101;
        b.state = InstanceState::Stopped;
        state.instances.insert("globex--b".into(), b);
        let mut announced = host("h1", PlacementState::Accepting, 0, 8);
        let announcement = PeerAnnouncement {
            host: name("h1"),
            cell: name("local"),
            wireguard_public_key: "A".repeat(43) + "=",
            endpoint: "127.0.0.1:5000".into(),
            issued_at: "2024-01-01T00:00:00Z".into(),
            certificate: String::new(),
            signature: String::new(),
        };
        announced.network = Some(HostNetwork {
            announcement: announcement.clone(),
            peers: 0,
            routes: 0,
        });
        let mut fleet = BTreeMap::new();
        fleet.insert(name("h1"), Some(announced));
        fleet.insert(
            name("h2"),
            Some(host("h2", PlacementState::Accepting, 0, 8)),
        );
        fleet.insert(name("h3"), None);
        let update = network_update(&fleet, &state);
        assert_eq!(update.peers, [announcement]);
        assert_eq!(
            update.routes,
            [
                NetworkRoute {
                    vni: 100,
                    address: a,
                    host: name("h1")
                },
                NetworkRoute {
                    vni: 101,
                    address: a,
                    host: name("h2")
                },
            ]
        );
        update.validate().unwrap();
    }

    #[test]
    fn a_new_announcement_or_reachability_is_a_change_and_nothing_else_is() {
        use nitrile_api::network::{HostNetwork, PeerAnnouncement};
        let announced = |h: &str, key: char| {
            let mut d = host(h, PlacementState::Accepting, 0, 8);
            d.network = Some(HostNetwork {
                announcement: PeerAnnouncement {
                    host: name(h),
                    cell: name("local"),
                    wireguard_public_key: key.to_string().repeat(43) + "=",
                    endpoint: "127.0.0.1:5000".into(),
                    issued_at: "2024-01-01T00:00:00Z".into(),
                    certificate: String::new(),
                    signature: String::new(),
                },
                peers: 1,
                routes: 0,
            });
            d
        };
        let mut fleet = BTreeMap::new();
        fleet.insert(name("h1"), Some(announced("h1", 'A')));
        fleet.insert(name("h2"), Some(announced("h2", 'B')));
        let last = network_view(&fleet);
        // Described again, counters and capacity changed: no push.
        let mut again = fleet.clone();
        if let Some(Some(d)) = again.get_mut(&name("h1")) {
            d.capacity.instances = 3;
            d.network.as_mut().unwrap().peers = 0;
        }
        assert!(view_changes(&last, &network_view(&again)).is_empty());
        // h2's agent restarted with a new key.
        let mut restarted = fleet.clone();
        restarted.insert(name("h2"), Some(announced("h2", 'C')));
        let changes = view_changes(&last, &network_view(&restarted));
        assert_eq!(changes.len(), 1, "{changes:?}");
        assert!(
            changes[0].starts_with("h2 announced tunnel key CCC"),
            "{changes:?}"
        );
        // h1 unreachable, then back without a data path.
        let mut gone = fleet.clone();
        gone.insert(name("h1"), None);
        assert_eq!(
            view_changes(&last, &network_view(&gone)),
            ["h1 became unreachable"]
        );
        let mut bare = fleet;
        bare.insert(
            name("h1"),
            Some(host("h1", PlacementState::Accepting, 0, 8)),
        );
        assert_eq!(
            view_changes(&network_view(&gone), &network_view(&bare)),
            ["h1 has no data path"]
        );
        // The first push (nothing pushed yet) sees every host as a change.
        assert_eq!(view_changes(&NetworkView::new(), &last).len(), 2);
    }

    #[test]
    fn the_attachment_is_the_record_s_place_on_its_network() {
        let mut r = record("acme", "a", "h1", Ipv4Addr::new(10, 80, 0, 12));
        r.vni = 0x0102;
        r.publish = vec![22];
        let keys = vec!["ssh-ed25519 AAAA me@x".to_owned()];
        let att = attachment(&r, keys.clone(), b"#!/bin/sh\n");
        att.validate().unwrap();
        assert_eq!(att.mac.to_string(), r.mac());
        assert_eq!(att.mac.to_string(), "02:4e:01:02:00:0c");
        assert_eq!(att.prefix_len, 24);
        assert_eq!(att.ssh_public_keys, keys);
        assert_eq!(att.publish, [22]);
        assert_eq!(att.user_data_bytes().unwrap(), b"#!/bin/sh\n");
        assert_eq!(att.gateway(), Ipv4Addr::new(10, 80, 0, 1));
    }

    #[test]
    fn the_record_survives_a_reload_and_a_missing_one_is_empty() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(crate::config::STATE_FILE);
        assert_eq!(load(&path).unwrap(), Placements::default());
        let mut state = Placements::default();
        state.vni(&name("acme")).unwrap();
        save(&path, &state).unwrap();
        assert_eq!(load(&path).unwrap(), state);
        std::fs::write(&path, b"{\"vnis\":{},\"extra\":1}").unwrap();
        assert!(matches!(load(&path), Err(StoreError::Malformed { .. })));
    }
}
