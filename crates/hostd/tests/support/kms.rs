//! A key source for the host agent's tests: the key service's core library
//! (`nitrile-kms`, a dev-dependency only) in a state directory of the test,
//! standing in for `nitrile kms` (whose client, `KmsVolumeKeys`, the tests
//! of a whole cell use). It makes volume
//! keys and keeps nothing but their records, seals them to the recipients a
//! VMM made, destroys them, and remembers every call (with the token the
//! host relayed) so that tests can check what the host asked. Its plaintext
//! export exists only for the tests' searches.

// Each test binary uses part of the harness.
#![allow(dead_code, unreachable_pub)]

use std::path::Path;
use std::sync::Mutex;

use nitrile_api::{Name, PrincipalId};
use nitrile_hostd::volume_keys::{VolumeKeyError, VolumeKeySource, WrappedVolumeKey};
use nitrile_kms::{KeyName, Kms, KmsError};
use nitrile_vmm::{RecipientPublicKey, SealedKey};

/// What the host asked of the key source.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyCall {
    /// `generate`, `unwrap` or `destroy`.
    pub op: &'static str,
    /// The volume.
    pub volume: Name,
    /// The token the host relayed.
    pub token: String,
}

/// The kms core library as a [`VolumeKeySource`].
pub struct KmsKeySource {
    kms: Kms,
    kek: KeyName,
    calls: Mutex<Vec<KeyCall>>,
}

impl std::fmt::Debug for KmsKeySource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KmsKeySource").finish_non_exhaustive()
    }
}

fn refused(e: KmsError) -> VolumeKeyError {
    VolumeKeyError::Refused(Box::new(e))
}

impl KmsKeySource {
    /// A key service keeping its state under `dir` (in `dir/state`, made
    /// 0700), with its default KEK.
    pub fn open(dir: &Path) -> Self {
        std::fs::create_dir_all(dir).unwrap();
        let kms = Kms::open(&dir.join("state")).unwrap();
        let kek = KeyName::default_key();
        if kms.describe_key(&kek).is_err() {
            let owner = PrincipalId::parse("nitrile://local/service/kms").unwrap();
            kms.create_key(&kek, &owner, time::OffsetDateTime::now_utc())
                .unwrap();
        }
        Self {
            kms,
            kek,
            calls: Mutex::new(Vec::new()),
        }
    }

    /// Every call so far.
    pub fn calls(&self) -> Vec<KeyCall> {
        self.calls.lock().unwrap().clone()
    }

    /// Whether the service still has `volume`'s record.
    pub fn has_volume(&self, volume: &str) -> bool {
        self.kms
            .describe_volume(&Name::new(volume).unwrap())
            .is_ok()
    }

    /// `volume`'s data key in plaintext (for the tests' searches only).
    pub fn dek(&self, volume: &str, wrapped: &[u8]) -> [u8; 64] {
        *self
            .kms
            .export_volume_key_for_tests(&Name::new(volume).unwrap(), wrapped)
            .unwrap()
    }

    /// `volume`'s data key, if the key service still opens `wrapped`.
    pub fn try_dek(&self, volume: &str, wrapped: &[u8]) -> Option<[u8; 64]> {
        self.kms
            .export_volume_key_for_tests(&Name::new(volume).unwrap(), wrapped)
            .ok()
            .map(|k| *k)
    }

    fn record(&self, op: &'static str, volume: &Name, token: &str) {
        self.calls.lock().unwrap().push(KeyCall {
            op,
            volume: volume.clone(),
            token: token.to_owned(),
        });
    }
}

impl VolumeKeySource for KmsKeySource {
    fn generate(
        &self,
        volume: &Name,
        kms_key: &Name,
        caller_token: &str,
    ) -> Result<WrappedVolumeKey, VolumeKeyError> {
        self.record("generate", volume, caller_token);
        let kek =
            KeyName::new(kms_key.as_str()).map_err(|e| VolumeKeyError::Refused(Box::new(e)))?;
        let g = self
            .kms
            .generate_volume_key(volume, &kek, time::OffsetDateTime::now_utc())
            .map_err(refused)?;
        WrappedVolumeKey::new(g.wrapped.encode()).map_err(|e| VolumeKeyError::Failed(Box::new(e)))
    }

    fn unwrap_sealed(
        &self,
        volume: &Name,
        wrapped: &WrappedVolumeKey,
        recipient: &RecipientPublicKey,
        caller_token: &str,
    ) -> Result<SealedKey, VolumeKeyError> {
        self.record("unwrap", volume, caller_token);
        let recipient = nitrile_kms::RecipientPublicKey::from_bytes(recipient.as_bytes())
            .map_err(|e| VolumeKeyError::Refused(Box::new(e)))?;
        let sealed = self
            .kms
            .unwrap_sealed(
                volume,
                wrapped.as_bytes(),
                &recipient,
                time::OffsetDateTime::now_utc(),
            )
            .map_err(refused)?;
        SealedKey::decode(&sealed.encode()).map_err(|e| VolumeKeyError::Failed(Box::new(e)))
    }

    fn destroy(&self, volume: &Name, caller_token: &str) -> Result<(), VolumeKeyError> {
        self.record("destroy", volume, caller_token);
        match self.kms.destroy_volume(volume) {
            Ok(_) | Err(KmsError::UnknownVolume(_)) => Ok(()),
            Err(e) => Err(refused(e)),
        }
    }
}
