//! How a volume's data key reaches the process that serves the volume
//! without passing through the host agent in plaintext.
//!
//! The process that will serve a VM's volumes (the `kvm` backend's `nitrile
//! vmm`, the `qemu` backend's launcher) makes one ephemeral X25519 key pair
//! per volume ([`Recipient`]) and offers the public halves to its backend; the backend returns them from
//! [`Hypervisor::create`](crate::Hypervisor::create) ([`CreatedVm`]). The
//! host has the key service seal each volume's data key to its recipient
//! (HPKE, RFC 9180, for that volume only) and hands the sealed keys back
//! through [`Hypervisor::supply_keys`](crate::Hypervisor::supply_keys)
//! ([`SealedVolumeKeys`]); the backend relays them and the process opens
//! each straight into a locked page ([`VolumeKey::open_sealed`]). The
//! private halves never leave the process and are zeroized as soon as the
//! keys are open. A VM cannot start before every volume's key is open.
//!
//! On the control channel ([`crate::control`]'s framing), before anything
//! else, in the spec's volume order:
//!
//! ```text
//! process -> backend   {"event":"recipient","volume":0,"key":"<64 hex digits>"}
//! backend -> process   {"op":"sealed_key","volume":0,"key":"<base64 of the sealed key>"}
//! ```
//!
//! Each line names the volume by its index in the spec (so a line stays
//! within [`crate::control::MAX_CONTROL_LINE`] whatever the id's length),
//! and is refused out of order. What the backend relays is
//! [`SEALED_KEY_LEN`] bytes of ciphertext: a host that reads the channel,
//! or the backend's memory, learns no key.

mod sealed;

use std::collections::BTreeMap;
use std::fmt;
use std::io::{BufRead, Write};

use base64::Engine as _;
use nitrile_api::Name;
use serde::{Deserialize, Serialize};

pub use sealed::{
    HPKE_AEAD_ID, HPKE_KDF_ID, HPKE_KEM_ID, OpenError, RECIPIENT_KEY_LEN, Recipient,
    RecipientKeyError, RecipientPublicKey, SEALED_KEY_LEN, SEALED_KEY_MAGIC, SEALED_KEY_VERSION,
    SealedKey, SealedKeyError, seal_info,
};

use crate::control::{self, ControlError};
use crate::{KeyError, VmId, VmSpec, VolumeKey};

/// What the process offers: volume `volume`'s recipient public key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "snake_case", deny_unknown_fields)]
enum Offer {
    /// One volume's recipient key, as 64 lowercase hex digits.
    Recipient {
        /// The volume's index in the spec.
        volume: u8,
        /// The X25519 public key.
        key: String,
    },
}

/// What the backend relays: volume `volume`'s sealed key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case", deny_unknown_fields)]
enum Relay {
    /// One volume's sealed key, standard base64 with padding.
    SealedKey {
        /// The volume's index in the spec.
        volume: u8,
        /// The sealed key.
        key: String,
    },
}

/// Why the key exchange failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum UnlockError {
    /// the control channel failed or carried something else
    #[error("key exchange: control channel")]
    Control(#[from] ControlError),
    /// a message named another volume than the next one in the spec
    #[error("key exchange: expected volume {expected}, got {got}")]
    OutOfOrder {
        /// The index expected.
        expected: usize,
        /// The index received.
        got: u8,
    },
    /// a recipient key was not 64 hex digits
    #[error("key exchange: the recipient key of volume {0} is not 32 bytes of hex")]
    BadRecipient(Name),
    /// a sealed key was not base64 of a sealed key
    #[error("key exchange: the sealed key of volume {volume} is malformed")]
    BadSealedKey {
        /// The volume.
        volume: Name,
        /// Why, when the base64 decoded.
        #[source]
        source: Option<SealedKeyError>,
    },
    /// the process's recipient key pair could not be made
    #[error("key exchange: no randomness for a recipient key")]
    Random(#[source] rand_core::Error),
    /// a sealed key did not open, or its page could not be locked
    #[error("key exchange: volume {volume}")]
    Key {
        /// The volume.
        volume: Name,
        /// Why.
        #[source]
        source: KeyError,
    },
}

/// One volume's recipient: the public half of the key pair its VMM made.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VolumeRecipient {
    /// The volume id (a key sealed for it opens only as this volume's key).
    pub volume: Name,
    /// The public key to seal the volume's data key to.
    pub key: RecipientPublicKey,
}

/// What [`Hypervisor::create`](crate::Hypervisor::create) returns: the VM's
/// id and, in the spec's volume order, one recipient per volume.
///
/// With no volumes the VM is created and may be started at once; otherwise
/// it waits in [`VmStatus::AwaitingKeys`](crate::VmStatus::AwaitingKeys)
/// for [`Hypervisor::supply_keys`](crate::Hypervisor::supply_keys).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CreatedVm {
    /// The VM.
    pub id: VmId,
    /// The recipients, in the spec's volume order.
    pub recipients: Vec<VolumeRecipient>,
}

/// The sealed data keys of a VM's volumes, by volume id: ciphertext only,
/// which opens only inside the VMM that made the recipients.
#[derive(Debug, Clone, Default)]
pub struct SealedVolumeKeys {
    keys: BTreeMap<Name, SealedKey>,
}

impl SealedVolumeKeys {
    /// No keys.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds volume `id`'s sealed key, returning the one it replaces.
    pub fn insert(&mut self, id: Name, key: SealedKey) -> Option<SealedKey> {
        self.keys.insert(id, key)
    }

    /// Volume `id`'s sealed key.
    pub fn get(&self, id: &Name) -> Option<&SealedKey> {
        self.keys.get(id)
    }

    /// The volume ids that have keys.
    pub fn ids(&self) -> impl Iterator<Item = &Name> {
        self.keys.keys()
    }

    /// Number of keys.
    pub fn len(&self) -> usize {
        self.keys.len()
    }

    /// Whether there are no keys.
    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    /// Checks that there is exactly one key per volume of `spec`.
    pub(crate) fn check(&self, spec: &VmSpec) -> Result<(), crate::VmmError> {
        for vol in spec.volumes() {
            if !self.keys.contains_key(&vol.id) {
                return Err(crate::VmmError::MissingKey(vol.id.clone()));
            }
        }
        if let Some(extra) = self
            .keys
            .keys()
            .find(|k| !spec.volumes().iter().any(|v| &v.id == *k))
        {
            return Err(crate::VmmError::UnexpectedKey(extra.clone()));
        }
        Ok(())
    }
}

impl fmt::Display for SealedVolumeKeys {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} sealed keys", self.keys.len())
    }
}

fn index_of(i: usize) -> u8 {
    // A spec has at most MAX_VOLUMES (8) volumes.
    u8::try_from(i).unwrap_or(u8::MAX)
}

/// The VMM's side: makes one recipient per volume of `spec`, offers their
/// public keys on `w`, reads one sealed key per volume from `r` and opens
/// each into a locked [`VolumeKey`], in the spec's volume order. The
/// recipients' private keys are zeroized before this returns.
pub fn receive_keys(
    spec: &VmSpec,
    r: &mut impl BufRead,
    w: &mut impl Write,
) -> Result<Vec<VolumeKey>, UnlockError> {
    let mut recipients = Vec::with_capacity(spec.volumes().len());
    for (i, _) in spec.volumes().iter().enumerate() {
        let recipient = Recipient::generate().map_err(UnlockError::Random)?;
        control::write_message(
            w,
            &Offer::Recipient {
                volume: index_of(i),
                key: hex::encode(recipient.public_key().as_bytes()),
            },
        )?;
        recipients.push(recipient);
    }
    let mut keys = Vec::with_capacity(recipients.len());
    for (i, (vol, recipient)) in spec.volumes().iter().zip(&recipients).enumerate() {
        let Relay::SealedKey { volume, key } = control::read_message::<Relay>(r)?;
        if usize::from(volume) != i {
            return Err(UnlockError::OutOfOrder {
                expected: i,
                got: volume,
            });
        }
        let sealed = decode_sealed(&key).map_err(|source| UnlockError::BadSealedKey {
            volume: vol.id.clone(),
            source,
        })?;
        let key = VolumeKey::open_sealed(recipient, &sealed, &vol.id).map_err(|source| {
            UnlockError::Key {
                volume: vol.id.clone(),
                source,
            }
        })?;
        keys.push(key);
    }
    Ok(keys)
}

fn decode_sealed(text: &str) -> Result<SealedKey, Option<SealedKeyError>> {
    // Base64 of SEALED_KEY_LEN bytes; anything longer is refused unread.
    if text.len() > SEALED_KEY_LEN.div_ceil(3) * 4 {
        return Err(None);
    }
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(text)
        .map_err(|_| None)?;
    SealedKey::decode(&bytes).map_err(Some)
}

/// The backend's side, first half: reads one recipient per volume of
/// `spec` from `r`, in the spec's volume order.
pub(crate) fn read_offers(
    spec: &VmSpec,
    r: &mut impl BufRead,
) -> Result<Vec<VolumeRecipient>, UnlockError> {
    let mut out = Vec::with_capacity(spec.volumes().len());
    for (i, vol) in spec.volumes().iter().enumerate() {
        let Offer::Recipient { volume, key } = control::read_message::<Offer>(r)?;
        if usize::from(volume) != i {
            return Err(UnlockError::OutOfOrder {
                expected: i,
                got: volume,
            });
        }
        let mut bytes = [0u8; RECIPIENT_KEY_LEN];
        if key.len() != 2 * RECIPIENT_KEY_LEN
            || !key.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
            || hex::decode_to_slice(&key, &mut bytes).is_err()
        {
            return Err(UnlockError::BadRecipient(vol.id.clone()));
        }
        let key = RecipientPublicKey::from_bytes(&bytes)
            .map_err(|_| UnlockError::BadRecipient(vol.id.clone()))?;
        out.push(VolumeRecipient {
            volume: vol.id.clone(),
            key,
        });
    }
    Ok(out)
}

/// The backend's side, second half: relays the sealed keys (checked by
/// the caller to be one per volume) on `w`, in the spec's volume order.
pub(crate) fn send_sealed(
    spec: &VmSpec,
    keys: &SealedVolumeKeys,
    w: &mut impl Write,
) -> Result<(), UnlockError> {
    for (i, vol) in spec.volumes().iter().enumerate() {
        let Some(sealed) = keys.get(&vol.id) else {
            return Err(UnlockError::BadSealedKey {
                volume: vol.id.clone(),
                source: None,
            });
        };
        control::write_message(
            w,
            &Relay::SealedKey {
                volume: index_of(i),
                key: base64::engine::general_purpose::STANDARD.encode(sealed.encode()),
            },
        )?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{BufReader, Cursor};

    fn spec(volumes: &[&str]) -> VmSpec {
        let vols: Vec<_> = volumes
            .iter()
            .map(|v| serde_json::json!({"id": v, "path": format!("/v/{v}.img"), "size_mib": 1}))
            .collect();
        let json = serde_json::json!({
            "instance": "i-1",
            "image": {"digest": "ab".repeat(32), "kernel": "/k", "initramfs": "/i", "cmdline": ""},
            "vcpus": 1, "memory_mib": 32, "volumes": vols,
        });
        VmSpec::parse_json(&serde_json::to_vec(&json).unwrap()).unwrap()
    }

    /// A key service in a temporary directory, with one volume record per
    /// id and the plaintext export for the test's checks.
    struct Service {
        _dir: tempfile::TempDir,
        kms: nitrile_kms::Kms,
        now: time::OffsetDateTime,
        wrapped: BTreeMap<Name, Vec<u8>>,
    }

    impl Service {
        fn new(volumes: &[&str]) -> Self {
            let dir = tempfile::tempdir().unwrap();
            let kms = nitrile_kms::Kms::open(&dir.path().join("kms")).unwrap();
            let now = time::OffsetDateTime::now_utc();
            let owner = nitrile_api::PrincipalId::parse("nitrile://local/service/kms").unwrap();
            let kek = nitrile_kms::KeyName::default_key();
            kms.create_key(&kek, &owner, now).unwrap();
            let mut wrapped = BTreeMap::new();
            for v in volumes {
                let v = Name::new(v).unwrap();
                let g = kms.generate_volume_key(&v, &kek, now).unwrap();
                wrapped.insert(v, g.wrapped.encode());
            }
            Self {
                _dir: dir,
                kms,
                now,
                wrapped,
            }
        }

        fn seal(&self, volume: &Name, to: &RecipientPublicKey) -> SealedKey {
            let to = nitrile_kms::RecipientPublicKey::from_bytes(to.as_bytes()).unwrap();
            let sealed = self
                .kms
                .unwrap_sealed(volume, &self.wrapped[volume], &to, self.now)
                .unwrap();
            SealedKey::decode(&sealed.encode()).unwrap()
        }

        fn dek(&self, volume: &str) -> [u8; 64] {
            let v = Name::new(volume).unwrap();
            *self
                .kms
                .export_volume_key_for_tests(&v, &self.wrapped[&v])
                .unwrap()
        }
    }

    /// Runs the VMM side against a backend side in another thread, over a
    /// socketpair, with `answer` turning the offers into sealed keys.
    fn exchange(
        spec: &VmSpec,
        answer: impl FnOnce(&[VolumeRecipient]) -> SealedVolumeKeys + Send + 'static,
    ) -> Result<Vec<VolumeKey>, UnlockError> {
        let (vmm, backend) = std::os::unix::net::UnixStream::pair().unwrap();
        let backend_spec = spec.clone();
        let relay = std::thread::spawn(move || {
            let mut r = BufReader::new(backend.try_clone().unwrap());
            let mut w = backend;
            let offers = read_offers(&backend_spec, &mut r).unwrap();
            let keys = answer(&offers);
            send_sealed(&backend_spec, &keys, &mut w).unwrap();
        });
        let mut r = BufReader::new(vmm.try_clone().unwrap());
        let mut w = vmm;
        let out = receive_keys(spec, &mut r, &mut w);
        relay.join().unwrap();
        out
    }

    #[test]
    fn each_volume_gets_its_own_data_key_through_the_exchange() {
        let spec = spec(&["data", "logs"]);
        let service = std::sync::Arc::new(Service::new(&["data", "logs"]));
        let s = std::sync::Arc::clone(&service);
        let keys = exchange(&spec, move |offers| {
            assert_eq!(offers.len(), 2);
            assert_ne!(offers[0].key, offers[1].key, "one recipient per volume");
            let mut keys = SealedVolumeKeys::new();
            for o in offers {
                keys.insert(o.volume.clone(), s.seal(&o.volume, &o.key));
            }
            keys
        })
        .unwrap();
        assert_eq!(keys[0].expose_secret(), &service.dek("data"));
        assert_eq!(keys[1].expose_secret(), &service.dek("logs"));
    }

    #[test]
    fn a_key_sealed_for_another_volume_or_recipient_does_not_open() {
        let spec = spec(&["data", "logs"]);
        let service = std::sync::Arc::new(Service::new(&["data", "logs"]));
        // The two volumes' sealed keys swapped: each opens only as its own
        // volume's key.
        let s = std::sync::Arc::clone(&service);
        let err = exchange(&spec, move |offers| {
            let mut keys = SealedVolumeKeys::new();
            keys.insert(
                offers[0].volume.clone(),
                s.seal(&offers[1].volume, &offers[0].key),
            );
            keys.insert(
                offers[1].volume.clone(),
                s.seal(&offers[0].volume, &offers[1].key),
            );
            keys
        })
        .unwrap_err();
        assert!(
            matches!(&err, UnlockError::Key { volume, source: KeyError::DoesNotOpen(_) } if volume.as_str() == "data"),
            "{err:?}"
        );
        // Sealed to a recipient the VMM did not make.
        let s = std::sync::Arc::clone(&service);
        let err = exchange(&spec, move |offers| {
            let stranger = Recipient::generate().unwrap();
            let mut keys = SealedVolumeKeys::new();
            for o in offers {
                keys.insert(o.volume.clone(), s.seal(&o.volume, stranger.public_key()));
            }
            keys
        })
        .unwrap_err();
        assert!(
            matches!(
                err,
                UnlockError::Key {
                    source: KeyError::DoesNotOpen(_),
                    ..
                }
            ),
            "{err:?}"
        );
    }

    #[test]
    fn no_volumes_means_no_messages() {
        let spec = spec(&[]);
        let mut out = Vec::new();
        let keys = receive_keys(&spec, &mut Cursor::new(Vec::new()), &mut out).unwrap();
        assert!(keys.is_empty() && out.is_empty());
    }

    #[test]
    fn malformed_and_out_of_order_messages_are_refused() {
        let spec = spec(&["data", "logs"]);
        let run = |input: &str| {
            let mut sink = Vec::new();
            receive_keys(
                &spec,
                &mut Cursor::new(input.as_bytes().to_vec()),
                &mut sink,
            )
        };
        let sealed = base64::engine::general_purpose::STANDARD.encode([0u8; SEALED_KEY_LEN]);
        assert!(matches!(
            run(&format!(
                "{{\"op\":\"sealed_key\",\"volume\":1,\"key\":\"{sealed}\"}}\n"
            )),
            Err(UnlockError::OutOfOrder {
                expected: 0,
                got: 1
            })
        ));
        assert!(matches!(
            run(&format!(
                "{{\"op\":\"sealed_key\",\"volume\":0,\"key\":\"{sealed}\"}}\n"
            )),
            Err(UnlockError::BadSealedKey {
                source: Some(SealedKeyError::BadMagic),
                ..
            })
        ));
        assert!(matches!(
            run("{\"op\":\"sealed_key\",\"volume\":0,\"key\":\"not base64!\"}\n"),
            Err(UnlockError::BadSealedKey { source: None, .. })
        ));
        assert!(matches!(
            run("{\"op\":\"start\"}\n"),
            Err(UnlockError::Control(ControlError::Malformed(_)))
        ));
        assert!(matches!(
            run(""),
            Err(UnlockError::Control(ControlError::Closed))
        ));

        let offers = |input: &str| read_offers(&spec, &mut Cursor::new(input.as_bytes().to_vec()));
        let good = "ab".repeat(32);
        assert!(matches!(
            offers(&format!(
                "{{\"event\":\"recipient\",\"volume\":1,\"key\":\"{good}\"}}\n"
            )),
            Err(UnlockError::OutOfOrder { .. })
        ));
        for bad in ["AB".repeat(32), "ab".repeat(31), "zz".repeat(32)] {
            assert!(matches!(
                offers(&format!(
                    "{{\"event\":\"recipient\",\"volume\":0,\"key\":\"{bad}\"}}\n"
                )),
                Err(UnlockError::BadRecipient(_))
            ));
        }
    }

    proptest::proptest! {
        #[test]
        fn arbitrary_lines_never_panic(bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..700)) {
            let spec = spec(&["data"]);
            let mut sink = Vec::new();
            let _ = receive_keys(&spec, &mut Cursor::new(bytes.clone()), &mut sink);
            let _ = read_offers(&spec, &mut Cursor::new(bytes));
        }
    }
}
