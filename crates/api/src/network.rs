//! The instance network as the admin API speaks it: what a launch asks for
//! (`NetworkAttachment`), what a host announces of its tunnel endpoint
//! (`PeerAnnouncement`, signed with the host's cell certificate key), and
//! what placement gives every host (`NetworkUpdate`: the announcements of
//! the other hosts and where each instance address lives).
//!
//! Every field is bounded and checked by `validate`; nothing here is a
//! secret (the tunnel's private keys never leave the host's data path) and
//! no response carries a customer's user data or SSH keys: a host keeps
//! them for the instance's metadata service only.

use std::collections::BTreeSet;
use std::fmt;
use std::net::{Ipv4Addr, SocketAddr};
use std::str::FromStr;

use base64::Engine as _;
use schemars::JsonSchema;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::Name;

/// Most bytes of user data an instance gets (after base64 decoding).
pub const MAX_USER_DATA: usize = 16 * 1024;
/// Most SSH public keys an instance gets.
pub const MAX_SSH_KEYS: usize = 16;
/// Longest SSH public key line.
pub const MAX_SSH_KEY_LEN: usize = 4 * 1024;
/// Most TCP ports an instance publishes on its host's address.
pub const MAX_PUBLISHED_PORTS: usize = 8;
/// Most hosts a network update names.
pub const MAX_PEERS: usize = 64;
/// Most instance addresses a network update names.
pub const MAX_ROUTES: usize = 1024;
/// Longest PEM certificate in an announcement.
pub const MAX_CERT_PEM_LEN: usize = 4 * 1024;
/// Longest base64 signature in an announcement (an ECDSA P-256 signature in
/// DER is at most 72 bytes).
pub const MAX_SIGNATURE_LEN: usize = 128;
/// Longest text form of a socket address.
pub const MAX_ENDPOINT_LEN: usize = 64;
/// Largest virtual network identifier (24 bits, as VXLAN's).
pub const MAX_VNI: u32 = (1 << 24) - 1;
/// The domain separation prefix of a signed peer announcement.
pub const ANNOUNCEMENT_CONTEXT: &str = "nitrile peer announcement v1";

/// A MAC address, `02:4e:00:07:00:0a` on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct MacAddr(pub [u8; 6]);

/// A MAC address that is not six colon-separated hex pairs.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("a MAC address is six two-digit hex numbers separated by ':'")]
pub struct MacError;

impl MacAddr {
    /// Whether it is a unicast, locally administered address (what a
    /// cell assigns): bit 0 of the first octet clear, bit 1 set.
    pub fn is_local_unicast(&self) -> bool {
        self.0[0] & 0x01 == 0 && self.0[0] & 0x02 != 0
    }
}

impl fmt::Display for MacAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let [a, b, c, d, e, g] = self.0;
        write!(f, "{a:02x}:{b:02x}:{c:02x}:{d:02x}:{e:02x}:{g:02x}")
    }
}

impl FromStr for MacAddr {
    type Err = MacError;
    fn from_str(s: &str) -> Result<Self, MacError> {
        let mut out = [0u8; 6];
        let mut parts = s.split(':');
        for byte in &mut out {
            let p = parts.next().ok_or(MacError)?;
            if p.len() != 2 {
                return Err(MacError);
            }
            *byte = u8::from_str_radix(p, 16).map_err(|_| MacError)?;
        }
        if parts.next().is_some() {
            return Err(MacError);
        }
        Ok(Self(out))
    }
}

impl Serialize for MacAddr {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for MacAddr {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

impl JsonSchema for MacAddr {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "MacAddr".into()
    }
    fn json_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
        schemars::json_schema!({
            "type": "string",
            "description": "A MAC address: six two-digit lowercase hex numbers separated by ':'.",
            "pattern": "^[0-9a-f]{2}(:[0-9a-f]{2}){5}$",
            "maxLength": 17
        })
    }
}

/// What a launch asks of the host's data path: the instance's place on its
/// customer's virtual network, and what its metadata service serves it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct NetworkAttachment {
    /// The customer whose network this is.
    pub customer: Name,
    /// The customer network's identifier, 1 to [`MAX_VNI`]: no frame
    /// crosses from one VNI to another.
    #[schemars(range(min = 1, max = MAX_VNI))]
    pub vni: u32,
    /// The instance's private address.
    #[schemars(length(max = 15))]
    pub address: Ipv4Addr,
    /// The network's prefix length, 8 to 29; the gateway is the first
    /// address of the prefix.
    #[schemars(range(min = 8, max = 29))]
    pub prefix_len: u8,
    /// The instance's MAC address (unicast, locally administered).
    pub mac: MacAddr,
    /// SSH public keys the metadata service gives the instance, one line
    /// each, at most [`MAX_SSH_KEYS`].
    #[serde(default)]
    #[schemars(length(max = MAX_SSH_KEYS))]
    pub ssh_public_keys: Vec<String>,
    /// User data, base64, at most [`MAX_USER_DATA`] bytes decoded; served
    /// to the instance only, never in a response.
    #[serde(default)]
    pub user_data: String,
    /// TCP ports of the instance published on the host's address (the
    /// host picks the outside port and says it in `instance.describe`);
    /// nothing else from outside reaches the instance.
    #[serde(default)]
    #[schemars(length(max = MAX_PUBLISHED_PORTS))]
    pub publish: Vec<u16>,
}

impl NetworkAttachment {
    /// The gateway address: the first address of the prefix.
    pub fn gateway(&self) -> Ipv4Addr {
        let net = u32::from(self.address) & prefix_mask(self.prefix_len);
        Ipv4Addr::from(net + 1)
    }

    /// The user data, decoded (empty when none).
    pub fn user_data_bytes(&self) -> Result<Vec<u8>, String> {
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(self.user_data.as_bytes())
            .map_err(|e| format!("user_data is not base64: {e}"))?;
        if bytes.len() > MAX_USER_DATA {
            return Err(format!(
                "user_data is {} bytes; at most {MAX_USER_DATA} are allowed",
                bytes.len()
            ));
        }
        Ok(bytes)
    }

    /// What a journal may keep of the attachment: everything but the
    /// user data and the SSH keys, which are the customer's and are
    /// replaced by their SHA-256 (and the user data's length), so the
    /// audit log shows which rule (published ports, addresses) a launch set
    /// without carrying the customer's content.
    pub fn journal_view(&self) -> serde_json::Value {
        use sha2::Digest as _;
        let hex = |b: &[u8]| {
            sha2::Sha256::digest(b)
                .iter()
                .map(|x| format!("{x:02x}"))
                .collect::<String>()
        };
        let user_data = self.user_data_bytes().unwrap_or_default();
        serde_json::json!({
            "customer": self.customer,
            "vni": self.vni,
            "address": self.address,
            "prefix_len": self.prefix_len,
            "mac": self.mac,
            "ssh_public_keys_sha256": self
                .ssh_public_keys
                .iter()
                .map(|k| hex(k.as_bytes()))
                .collect::<Vec<_>>(),
            "user_data": { "bytes": user_data.len(), "sha256": hex(&user_data) },
            "publish": self.publish,
        })
    }

    /// Checks what the types cannot express.
    pub fn validate(&self) -> Result<(), String> {
        if !(1..=MAX_VNI).contains(&self.vni) {
            return Err(format!("network vni must be 1 to {MAX_VNI}"));
        }
        if !(8..=29).contains(&self.prefix_len) {
            return Err("network prefix_len must be 8 to 29".into());
        }
        let mask = prefix_mask(self.prefix_len);
        let addr = u32::from(self.address);
        let host_part = addr & !mask;
        if host_part <= 1 || host_part == !mask {
            return Err(format!(
                "network address {} is the network, gateway or broadcast address of its prefix",
                self.address
            ));
        }
        if !self.mac.is_local_unicast() {
            return Err(format!(
                "network mac {} must be unicast and locally administered",
                self.mac
            ));
        }
        if self.ssh_public_keys.len() > MAX_SSH_KEYS {
            return Err(format!("at most {MAX_SSH_KEYS} ssh_public_keys"));
        }
        for key in &self.ssh_public_keys {
            if key.is_empty()
                || key.len() > MAX_SSH_KEY_LEN
                || !key.bytes().all(|b| (0x20..0x7f).contains(&b))
            {
                return Err(format!(
                    "each ssh public key must be one line of 1 to {MAX_SSH_KEY_LEN} printable ASCII characters"
                ));
            }
        }
        if self.user_data.len() > MAX_USER_DATA.div_ceil(3) * 4 + 4 {
            return Err(format!("user_data is larger than {MAX_USER_DATA} bytes"));
        }
        self.user_data_bytes()?;
        if self.publish.len() > MAX_PUBLISHED_PORTS {
            return Err(format!("at most {MAX_PUBLISHED_PORTS} published ports"));
        }
        let mut seen = BTreeSet::new();
        for port in &self.publish {
            if *port == 0 || !seen.insert(*port) {
                return Err(format!("published port {port} is 0 or listed twice"));
            }
        }
        Ok(())
    }
}

/// The network mask of a prefix length.
pub fn prefix_mask(prefix_len: u8) -> u32 {
    match prefix_len {
        0 => 0,
        n if n >= 32 => u32::MAX,
        n => u32::MAX << (32 - n),
    }
}

/// One port an instance publishes, as a response shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct PublishedPort {
    /// The instance's TCP port.
    pub instance_port: u16,
    /// Where it is reached from outside: the host's address and port.
    #[schemars(length(max = MAX_ENDPOINT_LEN))]
    pub endpoint: String,
}

/// An instance's network, as `instance.describe` shows it: addresses and
/// ports, never its keys or user data.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct InstanceNetwork {
    /// The customer whose network it is.
    pub customer: Name,
    /// The customer network's identifier.
    pub vni: u32,
    /// The instance's private address.
    #[schemars(length(max = 15))]
    pub address: Ipv4Addr,
    /// The prefix length.
    pub prefix_len: u8,
    /// The instance's MAC address.
    pub mac: MacAddr,
    /// Its published ports.
    #[schemars(length(max = MAX_PUBLISHED_PORTS))]
    pub published: Vec<PublishedPort>,
}

/// A host's tunnel endpoint, signed with the key of its cell certificate,
/// so that a host believes an announcement only if the cell's CA vouches
/// for the host that made it, whoever relayed it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct PeerAnnouncement {
    /// The announcing host.
    pub host: Name,
    /// Its cell.
    pub cell: Name,
    /// Its WireGuard static public key (X25519), base64.
    #[schemars(length(max = 44))]
    pub wireguard_public_key: String,
    /// Where its data path receives tunnel datagrams.
    #[schemars(length(max = MAX_ENDPOINT_LEN))]
    pub endpoint: String,
    /// When the host signed it (RFC 3339).
    #[schemars(length(max = crate::admin::MAX_TIMESTAMP_LEN), extend("format" = "date-time"))]
    pub issued_at: String,
    /// The host's certificate (PEM), issued by the cell's CA and naming
    /// `nitrile://<cell>/host/<host>`.
    #[schemars(length(max = MAX_CERT_PEM_LEN))]
    pub certificate: String,
    /// The signature (base64, the certificate key's scheme) over
    /// [`PeerAnnouncement::signed_bytes`].
    #[schemars(length(max = MAX_SIGNATURE_LEN))]
    pub signature: String,
}

impl PeerAnnouncement {
    /// The bytes the signature covers: a context line, then each field on
    /// a line of its own (no field can hold a newline: each is checked).
    pub fn signed_bytes(&self) -> Vec<u8> {
        format!(
            "{ANNOUNCEMENT_CONTEXT}\nhost {}\ncell {}\nwireguard {}\nendpoint {}\nissued {}\n",
            self.host, self.cell, self.wireguard_public_key, self.endpoint, self.issued_at
        )
        .into_bytes()
    }

    /// The WireGuard public key, decoded.
    pub fn public_key(&self) -> Result<[u8; 32], String> {
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(self.wireguard_public_key.as_bytes())
            .map_err(|e| format!("wireguard_public_key is not base64: {e}"))?;
        bytes
            .try_into()
            .map_err(|_| "wireguard_public_key is not 32 bytes".to_owned())
    }

    /// The endpoint, parsed.
    pub fn endpoint(&self) -> Result<SocketAddr, String> {
        self.endpoint
            .parse()
            .map_err(|_| format!("endpoint {:?} is not an address:port", clip(&self.endpoint)))
    }

    /// Checks the bounds and forms (not the signature: that needs the CA).
    pub fn validate(&self) -> Result<(), String> {
        self.public_key()?;
        self.endpoint()?;
        let line = |s: &str, max: usize, what: &str| {
            if s.len() > max || s.bytes().any(|b| b == b'\n' || b == b'\r') {
                Err(format!("{what} is longer than {max} or holds a line break"))
            } else {
                Ok(())
            }
        };
        line(
            &self.issued_at,
            crate::admin::MAX_TIMESTAMP_LEN,
            "issued_at",
        )?;
        if self.certificate.len() > MAX_CERT_PEM_LEN {
            return Err(format!("certificate is longer than {MAX_CERT_PEM_LEN}"));
        }
        line(&self.signature, MAX_SIGNATURE_LEN, "signature")?;
        Ok(())
    }
}

fn clip(s: &str) -> String {
    s.chars().take(80).collect()
}

/// Where one instance address of one customer network lives.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct NetworkRoute {
    /// The customer network.
    #[schemars(range(min = 1, max = MAX_VNI))]
    pub vni: u32,
    /// The instance address.
    #[schemars(length(max = 15))]
    pub address: Ipv4Addr,
    /// The host that runs it.
    pub host: Name,
}

/// `network.update`: the whole instance network of the cell as one host
/// needs it; it replaces what the host had.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct NetworkUpdate {
    /// The hosts' signed announcements (this host's own is ignored).
    #[schemars(length(max = MAX_PEERS))]
    pub peers: Vec<PeerAnnouncement>,
    /// Every instance address of the cell and its host.
    #[schemars(length(max = MAX_ROUTES))]
    pub routes: Vec<NetworkRoute>,
}

impl NetworkUpdate {
    /// Checks bounds and uniqueness.
    pub fn validate(&self) -> Result<(), String> {
        if self.peers.len() > MAX_PEERS {
            return Err(format!("at most {MAX_PEERS} peers"));
        }
        if self.routes.len() > MAX_ROUTES {
            return Err(format!("at most {MAX_ROUTES} routes"));
        }
        let mut hosts = BTreeSet::new();
        for p in &self.peers {
            p.validate().map_err(|e| format!("peer {}: {e}", p.host))?;
            if !hosts.insert(&p.host) {
                return Err(format!("peer {} is listed twice", p.host));
            }
        }
        let mut addrs = BTreeSet::new();
        for r in &self.routes {
            if !(1..=MAX_VNI).contains(&r.vni) {
                return Err(format!("route vni must be 1 to {MAX_VNI}"));
            }
            if !addrs.insert((r.vni, r.address)) {
                return Err(format!(
                    "route {} of vni {} is listed twice",
                    r.address, r.vni
                ));
            }
        }
        Ok(())
    }
}

/// A host's network, as `host.describe` shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct HostNetwork {
    /// Its signed tunnel announcement, which placement relays to the other
    /// hosts.
    pub announcement: PeerAnnouncement,
    /// Peers it has a tunnel to.
    pub peers: u32,
    /// Instance addresses it routes to other hosts.
    pub routes: u32,
}

/// The domain separation prefix of a signed instance identity document.
pub const IDENTITY_CONTEXT: &str = "nitrile instance identity v1\n";
/// Largest signed identity document accepted.
pub const MAX_IDENTITY_DOCUMENT_LEN: usize = 16 * 1024;

/// What the host states about an instance it runs: served to the instance
/// by its metadata service, signed with the host's cell certificate key,
/// so anyone holding the cell's CA certificate can check it
/// (`nitrile instance verify-identity`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InstanceIdentity {
    /// The document's format, 1.
    pub version: u32,
    /// The cell.
    pub cell: Name,
    /// The host that runs the instance.
    pub host: Name,
    /// The instance.
    pub instance: Name,
    /// Its customer.
    pub customer: Name,
    /// Its image digest.
    pub image: crate::admin::Sha256Hex,
    /// Its customer network.
    pub vni: u32,
    /// Its private address.
    pub private_ipv4: Ipv4Addr,
    /// Its MAC address.
    pub mac: MacAddr,
    /// When it was launched (RFC 3339).
    pub launched_at: String,
    /// When the host signed this (RFC 3339).
    pub issued_at: String,
}

/// An identity document as the metadata service serves it: the document's
/// JSON (base64), the signature over [`IDENTITY_CONTEXT`] followed by those
/// bytes, and the signing host's certificate.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SignedIdentityDocument {
    /// The [`InstanceIdentity`] JSON, base64.
    pub document: String,
    /// The signature, base64.
    pub signature: String,
    /// The host's certificate, PEM.
    pub certificate: String,
}

impl SignedIdentityDocument {
    /// The document bytes and the bytes the signature covers.
    pub fn decode(&self) -> Result<(InstanceIdentity, Vec<u8>, Vec<u8>), String> {
        let b64 = base64::engine::general_purpose::STANDARD;
        let doc = b64
            .decode(self.document.as_bytes())
            .map_err(|e| format!("the document is not base64: {e}"))?;
        let sig = b64
            .decode(self.signature.as_bytes())
            .map_err(|e| format!("the signature is not base64: {e}"))?;
        let identity: InstanceIdentity = serde_json::from_slice(&doc)
            .map_err(|e| format!("the document is not an instance identity: {e}"))?;
        let mut signed = IDENTITY_CONTEXT.as_bytes().to_vec();
        signed.extend_from_slice(&doc);
        Ok((identity, signed, sig))
    }
}
