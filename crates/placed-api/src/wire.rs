//! The JSON bodies of the customer API, with their bounds. Responses are
//! metadata only: no user data, no SSH keys, no image bytes.

use nitrile_api::network::PublishedPort;
use nitrile_api::{Name, PrincipalId};
use nitrile_image::Digest;
use serde::{Deserialize, Deserializer, Serialize};

/// Largest JSON request body (a run request with its keys and user data).
pub const MAX_REQUEST_BODY: usize = 64 * 1024;
/// Most SSH public keys an instance is given (the host's bound: a run
/// placement accepts is never refused by the host for its keys).
pub const MAX_SSH_KEYS: usize = nitrile_api::network::MAX_SSH_KEYS;
/// Longest SSH public key line.
pub const MAX_SSH_KEY_LEN: usize = nitrile_api::network::MAX_SSH_KEY_LEN;
/// Largest user data, in bytes.
pub const MAX_USER_DATA: usize = nitrile_api::network::MAX_USER_DATA;
/// Most instance ports published on the host's address.
pub const MAX_PUBLISHED_PORTS: usize = nitrile_api::network::MAX_PUBLISHED_PORTS;
/// Least memory an instance may have, in MiB.
pub const MIN_MEMORY_MIB: u32 = 64;
/// Most memory an instance may have, in MiB.
pub const MAX_MEMORY_MIB: u32 = 64 * 1024;
/// Most vCPUs an instance may have.
pub const MAX_VCPUS: u8 = 32;
/// Most instances or images one list answer carries.
pub const MAX_LISTED: usize = 4096;

/// `POST /v1/instances`: run an instance.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RunRequest {
    /// The instance's name within the customer's (the resource is
    /// `instance/<customer>--<name>`).
    pub name: Name,
    /// The image to boot: one of the customer's own.
    pub image: Digest,
    /// Memory in MiB.
    #[serde(deserialize_with = "memory")]
    pub memory_mib: u32,
    /// vCPUs.
    #[serde(deserialize_with = "vcpus")]
    pub vcpus: u8,
    /// SSH public keys (OpenSSH one-line form) the instance's metadata
    /// service hands out.
    #[serde(default, deserialize_with = "ssh_keys")]
    pub ssh_public_keys: Vec<String>,
    /// User data the metadata service hands to the instance.
    #[serde(default, deserialize_with = "user_data")]
    pub user_data: Option<String>,
    /// Instance TCP ports to publish on the host's address.
    #[serde(default, deserialize_with = "ports")]
    pub publish: Vec<u16>,
    /// One of the customer's own key service keys (its bare name): the
    /// instance's root volume, a copy of the image's root disk, is
    /// encrypted under a data key it wraps. Needed when the image has a
    /// root disk, refused when it has none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kms_key: Option<Name>,
}

fn memory<'de, D: Deserializer<'de>>(d: D) -> Result<u32, D::Error> {
    let m = u32::deserialize(d)?;
    if !(MIN_MEMORY_MIB..=MAX_MEMORY_MIB).contains(&m) {
        return Err(serde::de::Error::custom(format!(
            "memory_mib {m} is outside {MIN_MEMORY_MIB}..={MAX_MEMORY_MIB}"
        )));
    }
    Ok(m)
}

fn vcpus<'de, D: Deserializer<'de>>(d: D) -> Result<u8, D::Error> {
    let v = u8::deserialize(d)?;
    if v == 0 || v > MAX_VCPUS {
        return Err(serde::de::Error::custom(format!(
            "vcpus {v} is outside 1..={MAX_VCPUS}"
        )));
    }
    Ok(v)
}

/// Whether `key` looks like one OpenSSH public key line: printable ASCII,
/// a key type, a base64 blob, an optional comment.
pub fn ssh_key_ok(key: &str) -> bool {
    let mut parts = key.split(' ');
    let (Some(kind), Some(blob)) = (parts.next(), parts.next()) else {
        return false;
    };
    key.len() <= MAX_SSH_KEY_LEN
        && key.bytes().all(|b| (0x20..0x7f).contains(&b))
        && (kind.starts_with("ssh-") || kind.starts_with("ecdsa-") || kind.starts_with("sk-"))
        && !blob.is_empty()
        && blob
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'+' | b'/' | b'='))
}

fn ssh_keys<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
    let keys = Vec::<String>::deserialize(d)?;
    if keys.len() > MAX_SSH_KEYS {
        return Err(serde::de::Error::custom(format!(
            "{} SSH keys; at most {MAX_SSH_KEYS}",
            keys.len()
        )));
    }
    if let Some(i) = keys.iter().position(|k| !ssh_key_ok(k)) {
        return Err(serde::de::Error::custom(format!(
            "SSH key {} is not one OpenSSH public key line of at most {MAX_SSH_KEY_LEN} bytes",
            i + 1
        )));
    }
    Ok(keys)
}

fn user_data<'de, D: Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    let data = Option::<String>::deserialize(d)?;
    if let Some(u) = &data
        && u.len() > MAX_USER_DATA
    {
        return Err(serde::de::Error::custom(format!(
            "user data of {} bytes; at most {MAX_USER_DATA}",
            u.len()
        )));
    }
    Ok(data)
}

fn ports<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u16>, D::Error> {
    let ports = Vec::<u16>::deserialize(d)?;
    if ports.len() > MAX_PUBLISHED_PORTS {
        return Err(serde::de::Error::custom(format!(
            "{} published ports; at most {MAX_PUBLISHED_PORTS}",
            ports.len()
        )));
    }
    let mut seen = std::collections::BTreeSet::new();
    for p in &ports {
        if *p == 0 || !seen.insert(*p) {
            return Err(serde::de::Error::custom(format!(
                "published port {p} is zero or repeated"
            )));
        }
    }
    Ok(ports)
}

/// An instance's state as placement reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum InstanceState {
    /// Being launched on its host.
    Pending,
    /// Running.
    Running,
    /// Stopped; its address stays allocated.
    Stopped,
    /// Terminated; its address is free again.
    Terminated,
    /// Its host did not answer or reported a failure.
    Unknown,
}

impl InstanceState {
    /// The state's wire name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Pending => "pending",
            Self::Running => "running",
            Self::Stopped => "stopped",
            Self::Terminated => "terminated",
            Self::Unknown => "unknown",
        }
    }
}

/// One customer instance, as placement records it: metadata only.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CustomerInstance {
    /// The instance's name within the customer's.
    pub name: Name,
    /// Its owner.
    pub customer: PrincipalId,
    /// The host it runs on.
    pub host: Name,
    /// The image it boots.
    pub image: Digest,
    /// Memory in MiB.
    pub memory_mib: u32,
    /// vCPUs.
    pub vcpus: u8,
    /// The customer's virtual network.
    pub vni: u32,
    /// Its private address on that network (`10.80.0.x`).
    pub address: String,
    /// Its NIC's MAC address.
    pub mac: String,
    /// The instance ports published on its host's address.
    pub publish: Vec<u16>,
    /// Its root volume (`volume/<customer>--<name>-root`, the image's root
    /// disk copied into it at first boot) and the customer's key that
    /// wraps its data key, when the image has a root disk.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub root_volume: Option<RootVolume>,
    /// Where each published port is reached from outside (the host's
    /// address and the port it picked), as the host last said.
    #[serde(default)]
    pub published: Vec<PublishedPort>,
    /// Its state.
    pub state: InstanceState,
    /// When it was run (RFC 3339).
    pub created: String,
}

/// An instance's root volume.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RootVolume {
    /// The volume's id (`<customer>--<instance>-root`).
    pub volume: Name,
    /// The customer's key that wraps its data key (bare name).
    pub kms_key: Name,
    /// Its size in MiB (the root disk's).
    pub size_mib: u64,
}

/// `GET /v1/instances`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InstanceList {
    /// The caller's instances, by name.
    pub instances: Vec<CustomerInstance>,
}

/// One customer image, as placement records it: digests and sizes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CustomerImage {
    /// The image digest.
    pub digest: Digest,
    /// Its owner.
    pub customer: PrincipalId,
    /// SHA-256 of the kernel.
    pub kernel_sha256: Digest,
    /// Kernel size in bytes.
    pub kernel_size: u64,
    /// The kernel's boot format (`elf`, `bzimage`).
    pub kernel_format: String,
    /// The kernel release the file names, if it does.
    pub kernel_release: Option<String>,
    /// SHA-256 of the initramfs.
    pub initramfs_sha256: Digest,
    /// Initramfs size in bytes.
    pub initramfs_size: u64,
    /// SHA-256 of the command line.
    pub cmdline_sha256: Digest,
    /// SHA-256 of the root disk, if the image has one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub root_disk_sha256: Option<Digest>,
    /// Root disk size in bytes, if the image has one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub root_disk_size: Option<u64>,
    /// When it was imported (RFC 3339).
    pub imported: String,
}

/// `GET /v1/images`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ImageList {
    /// The caller's images, by digest.
    pub images: Vec<CustomerImage>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(extra: &str) -> Result<RunRequest, serde_json::Error> {
        let digest = "ab".repeat(32);
        serde_json::from_str(&format!(
            r#"{{"name":"web1","image":"{digest}","memory_mib":256,"vcpus":1{extra}}}"#
        ))
    }

    #[test]
    fn run_requests_are_bounded() {
        let ok =
            run(r#","ssh_public_keys":["ssh-ed25519 AAAAC3Nza me@x"],"publish":[22]"#).unwrap();
        assert_eq!(ok.publish, [22]);
        assert!(run(r#","user_data":"hello""#).is_ok());
        for bad in [
            r#","extra":1"#.to_owned(),
            r#","ssh_public_keys":["not a key"]"#.to_owned(),
            r#","ssh_public_keys":["ssh-ed25519 AAAA\nssh-rsa BBBB"]"#.to_owned(),
            format!(r#","user_data":"{}""#, "x".repeat(MAX_USER_DATA + 1)),
            format!(
                r#","ssh_public_keys":[{}]"#,
                vec![r#""ssh-ed25519 AAAA""#; MAX_SSH_KEYS + 1].join(",")
            ),
            r#","publish":[22,22]"#.to_owned(),
            r#","publish":[0]"#.to_owned(),
            r#","publish":[65536]"#.to_owned(),
        ] {
            assert!(run(&bad).is_err(), "{bad}");
        }
        let digest = "ab".repeat(32);
        for (memory, vcpus) in [(1, 1), (MAX_MEMORY_MIB + 1, 1), (256, 0), (256, 33)] {
            let text = format!(
                r#"{{"name":"web1","image":"{digest}","memory_mib":{memory},"vcpus":{vcpus}}}"#
            );
            assert!(serde_json::from_str::<RunRequest>(&text).is_err(), "{text}");
        }
        assert!(
            serde_json::from_str::<RunRequest>(
                r#"{"name":"web1","image":"sha256:00","memory_mib":256,"vcpus":1}"#
            )
            .is_err()
        );
    }
}
