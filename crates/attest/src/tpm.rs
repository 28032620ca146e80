//! The host side: one connection to the TPM through tpm2-tss's ESAPI.
//!
//! Every key this module makes is transient and flushed before the call
//! that made it returns, so it works against a TPM without a resource
//! manager (swtpm) as well as through `/dev/tpmrm0`.

use std::collections::BTreeMap;
use std::str::FromStr;

use tss_esapi::Context;
use tss_esapi::abstraction::pcr;
use tss_esapi::attributes::{NvIndexAttributesBuilder, ObjectAttributesBuilder};
use tss_esapi::constants::SessionType;
use tss_esapi::handles::{KeyHandle, NvIndexHandle, NvIndexTpmHandle, ObjectHandle, TpmHandle};
use tss_esapi::interface_types::algorithm::{HashingAlgorithm, PublicAlgorithm};
use tss_esapi::interface_types::ecc::EccCurve;
use tss_esapi::interface_types::resource_handles::{Hierarchy, NvAuth, Provision};
use tss_esapi::interface_types::session_handles::AuthSession;
use tss_esapi::structures::{
    Data, Digest, DigestValues, EccPoint, EccScheme, HashScheme, KeyDerivationFunctionScheme,
    MaxNvBuffer, NvPublicBuilder, PcrSelectionList, PcrSelectionListBuilder, PcrSlot, Public,
    PublicBuilder, PublicEccParametersBuilder, Signature, SignatureScheme, SymmetricDefinition,
};
use tss_esapi::tcti_ldr::TctiNameConf;
use tss_esapi::traits::Marshall;

use crate::quote::{PCR_BANK, Quote};
use crate::{AkPublic, AttestError, Pcrs};

/// Where the endorsement key certificates live (TCG EK Credential Profile):
/// swtpm's manufacturing writes the RSA 2048 one and the ECC NIST P-384 one.
pub const EK_CERT_NV_RSA2048: u32 = 0x01c0_0002;
/// The ECC NIST P-384 endorsement key certificate (high range, H-3).
pub const EK_CERT_NV_P384: u32 = 0x01c0_0016;

/// The NV index of the anti-rollback record: the highest host software
/// version this TPM's host has committed to (owner range).
pub const HIGHEST_VERSION_NV: u32 = 0x0150_0100;

/// A TCTI as tpm2-tss names it, checked: `swtpm:path=SOCKET`,
/// `swtpm:host=H,port=P`, `device:/dev/tpmrm0` or `mssim:...`.
pub fn parse_tcti(spec: &str) -> Result<TctiNameConf, AttestError> {
    let kind = spec.split(':').next().unwrap_or_default();
    if !matches!(kind, "swtpm" | "device" | "mssim") {
        return Err(AttestError::Tcti(format!(
            "{spec:?}: expected swtpm:path=SOCKET, swtpm:host=H,port=P or device:/dev/tpmrm0"
        )));
    }
    TctiNameConf::from_str(spec).map_err(|e| AttestError::Tcti(format!("{spec:?}: {e}")))
}

/// An open TPM.
pub struct Tpm {
    ctx: Context,
}

impl std::fmt::Debug for Tpm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tpm").finish_non_exhaustive()
    }
}

fn tss(what: &'static str) -> impl FnOnce(tss_esapi::Error) -> AttestError {
    move |e| AttestError::Tpm {
        what,
        source: Box::new(e),
    }
}

fn slot(index: u8) -> Result<PcrSlot, AttestError> {
    if index > 23 {
        return Err(AttestError::PcrIndex(index));
    }
    PcrSlot::try_from(1u32 << index).map_err(|_| AttestError::PcrIndex(index))
}

fn null_ticket() -> Result<tss_esapi::structures::HashcheckTicket, AttestError> {
    use tss_esapi::constants::tss::{TPM2_RH_NULL, TPM2_ST_HASHCHECK};
    let raw = tss_esapi::tss2_esys::TPMT_TK_HASHCHECK {
        tag: TPM2_ST_HASHCHECK,
        hierarchy: TPM2_RH_NULL,
        digest: Default::default(),
    };
    tss_esapi::structures::HashcheckTicket::try_from(raw).map_err(tss("a null ticket"))
}

/// The persistent handle of the RSA 2048 endorsement key (TCG default,
/// low range: its policy is PolicySecret of the endorsement hierarchy).
pub const EK_RSA_PERSISTENT: u32 = 0x8101_0001;

/// A key created in the TPM and bound to PCR values
/// ([`Tpm::create_bound_key`]): its public area and its private part as the
/// TPM encrypted it (loadable only in that TPM).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct BoundKey {
    /// The marshalled TPMT_PUBLIC.
    #[serde(with = "hex::serde")]
    pub public: Vec<u8>,
    /// The TPM2B_PRIVATE's contents.
    #[serde(with = "hex::serde")]
    pub private: Vec<u8>,
    /// The PCRs it is bound to.
    pub pcrs: Vec<u8>,
}

fn storage_key_template() -> Result<Public, AttestError> {
    let attributes = ObjectAttributesBuilder::new()
        .with_fixed_tpm(true)
        .with_fixed_parent(true)
        .with_sensitive_data_origin(true)
        .with_user_with_auth(true)
        .with_no_da(true)
        .with_restricted(true)
        .with_decrypt(true)
        .build()
        .map_err(tss("the storage key's attributes"))?;
    let parameters = PublicEccParametersBuilder::new_restricted_decryption_key(
        tss_esapi::structures::SymmetricDefinitionObject::AES_128_CFB,
        EccCurve::NistP256,
    )
    .build()
    .map_err(tss("the storage key's parameters"))?;
    PublicBuilder::new()
        .with_public_algorithm(PublicAlgorithm::Ecc)
        .with_name_hashing_algorithm(HashingAlgorithm::Sha256)
        .with_object_attributes(attributes)
        .with_ecc_parameters(parameters)
        .with_ecc_unique_identifier(EccPoint::default())
        .build()
        .map_err(tss("the storage key's template"))
}

/// The template of the document key bound to `values` of the host PCRs
/// ([`crate::HOST_PCRS`]): the attestation key's, unrestricted, usable only
/// through its policy (userWithAuth clear), which is TPM2_PolicyPCR over
/// those values. It is a primary of the endorsement hierarchy: the same
/// TPM and values always derive the same key, and once the PCRs hold other
/// values the TPM refuses to sign with it. A host running other software
/// derives another key, which no CA certified.
pub fn document_key_template(values: &[[u8; 32]]) -> Result<Public, AttestError> {
    if values.len() != crate::HOST_PCRS.len() {
        return Err(AttestError::Malformed(
            "the document key is bound to every host PCR",
        ));
    }
    let policy = crate::credential::policy_pcr_digest(&crate::HOST_PCRS, values);
    key_template(false, Some(policy))
}

/// The template of the attestation key: a restricted ECDSA P-384 signing
/// key (SHA-384), fixed to this TPM, a primary of the endorsement hierarchy
/// so that the same TPM always derives the same key and nothing of it is
/// stored outside the TPM.
pub fn attestation_key_template() -> Result<Public, AttestError> {
    key_template(true, None)
}

fn key_template(restricted: bool, policy: Option<[u8; 32]>) -> Result<Public, AttestError> {
    let attributes = ObjectAttributesBuilder::new()
        .with_fixed_tpm(true)
        .with_fixed_parent(true)
        .with_sensitive_data_origin(true)
        .with_user_with_auth(policy.is_none())
        .with_restricted(restricted)
        .with_sign_encrypt(true)
        .build()
        .map_err(tss("the attestation key's attributes"))?;
    let parameters = PublicEccParametersBuilder::new()
        .with_ecc_scheme(EccScheme::EcDsa(HashScheme::new(HashingAlgorithm::Sha384)))
        .with_curve(EccCurve::NistP384)
        .with_is_signing_key(true)
        .with_is_decryption_key(false)
        .with_restricted(restricted)
        .with_key_derivation_function_scheme(KeyDerivationFunctionScheme::Null)
        .build()
        .map_err(tss("the attestation key's parameters"))?;
    let mut builder = PublicBuilder::new()
        .with_public_algorithm(PublicAlgorithm::Ecc)
        .with_name_hashing_algorithm(HashingAlgorithm::Sha256)
        .with_object_attributes(attributes)
        .with_ecc_parameters(parameters)
        .with_ecc_unique_identifier(EccPoint::default());
    if let Some(policy) = policy {
        builder = builder
            .with_auth_policy(Digest::try_from(policy.to_vec()).map_err(tss("a policy digest"))?);
    }
    builder
        .build()
        .map_err(tss("the attestation key's template"))
}

impl Tpm {
    /// Opens the TPM behind `tcti` (see [`parse_tcti`]).
    pub fn open(tcti: &str) -> Result<Self, AttestError> {
        let conf = parse_tcti(tcti)?;
        let ctx = Context::new(conf).map_err(tss("opening the TPM"))?;
        Ok(Self { ctx })
    }

    /// Reads PCRs of the SHA-256 bank.
    pub fn pcrs(&mut self, indices: &[u8]) -> Result<Pcrs, AttestError> {
        let slots = indices
            .iter()
            .map(|&i| slot(i))
            .collect::<Result<Vec<_>, _>>()?;
        let selection = PcrSelectionListBuilder::new()
            .with_selection(HashingAlgorithm::Sha256, &slots)
            .build()
            .map_err(tss("a PCR selection"))?;
        let data = pcr::read_all(&mut self.ctx, selection).map_err(tss("reading PCRs"))?;
        let bank = data
            .pcr_bank(HashingAlgorithm::Sha256)
            .ok_or(AttestError::NoBank)?;
        let mut out = BTreeMap::new();
        for &i in indices {
            let d = bank.get_digest(slot(i)?).ok_or(AttestError::NoBank)?;
            let v: [u8; 32] = d.value().try_into().map_err(|_| AttestError::NoBank)?;
            out.insert(i, v);
        }
        Ok(Pcrs(out))
    }

    /// Extends PCR `index` of the SHA-256 bank with `digest`.
    pub fn extend(&mut self, index: u8, digest: [u8; 32]) -> Result<(), AttestError> {
        let mut values = DigestValues::new();
        values.set(
            HashingAlgorithm::Sha256,
            Digest::try_from(digest.to_vec()).map_err(tss("a digest"))?,
        );
        let handle = pcr_handle(index)?;
        self.ctx
            .execute_with_session(Some(AuthSession::Password), |ctx| {
                ctx.pcr_extend(handle, values)
            })
            .map_err(tss("extending a PCR"))
    }

    /// The certificate (DER) of the endorsement key [`Tpm::ek_public`]
    /// names (RSA 2048), as the TPM's manufacturer stored it.
    pub fn ek_certificate(&mut self) -> Result<Option<Vec<u8>>, AttestError> {
        for index in [EK_CERT_NV_RSA2048] {
            if let Some(bytes) = self.nv_read_all(index)? {
                return Ok(Some(bytes));
            }
        }
        Ok(None)
    }

    fn with_ak<T>(
        &mut self,
        f: impl FnOnce(&mut Context, KeyHandle) -> Result<T, AttestError>,
    ) -> Result<T, AttestError> {
        self.with_key(attestation_key_template()?, f)
    }

    fn with_key<T>(
        &mut self,
        template: Public,
        f: impl FnOnce(&mut Context, KeyHandle) -> Result<T, AttestError>,
    ) -> Result<T, AttestError> {
        self.with_primary(Hierarchy::Endorsement, template, f)
    }

    /// The attestation key's public part (derived again, not stored).
    pub fn attestation_key(&mut self) -> Result<AkPublic, AttestError> {
        self.with_ak(|ctx, key| {
            let (public, _, _) = ctx.read_public(key).map_err(tss("reading a public key"))?;
            AkPublic::from_tpm_public(&public)
        })
    }

    /// A quote of `indices` (SHA-256 bank) with `nonce` as its qualifying
    /// data, signed by the attestation key, with the PCR values read right
    /// after it (the quote's digest says whether they are the quoted ones).
    pub fn quote(&mut self, nonce: &[u8], indices: &[u8]) -> Result<Quote, AttestError> {
        if nonce.len() > 64 {
            return Err(AttestError::Nonce(nonce.len()));
        }
        let slots = indices
            .iter()
            .map(|&i| slot(i))
            .collect::<Result<Vec<_>, _>>()?;
        let selection = PcrSelectionListBuilder::new()
            .with_selection(PCR_BANK, &slots)
            .build()
            .map_err(tss("a PCR selection"))?;
        let data = Data::try_from(nonce.to_vec()).map_err(tss("the nonce"))?;
        let (attest, signature) = self.with_ak(|ctx, key| {
            ctx.execute_with_nullauth_session(|ctx| {
                ctx.quote(key, data, SignatureScheme::Null, selection)
            })
            .map_err(tss("quoting"))
        })?;
        let message = attest.marshall().map_err(tss("marshalling a quote"))?;
        let signature = signature
            .marshall()
            .map_err(tss("marshalling a signature"))?;
        let pcrs = self.pcrs(indices)?;
        Ok(Quote {
            message,
            signature,
            pcrs,
        })
    }

    /// The host PCRs' values now, in [`crate::HOST_PCRS`] order.
    fn host_pcr_values(&mut self) -> Result<Vec<[u8; 32]>, AttestError> {
        Ok(self.pcrs(&crate::HOST_PCRS)?.0.values().copied().collect())
    }

    /// Signs `data` with the document key bound to the PCR values the TPM
    /// holds now (ECDSA P-384 over SHA-384 of the data, hashed here), for
    /// attestation documents (COSE_Sign1). The document key is not the
    /// attestation key: it is unrestricted, so it could sign anything, and
    /// no verifier takes it for quotes; it signs only while the PCRs hold
    /// the values it is bound to. Returns `r || s`, 48 bytes each.
    pub fn sign_document(&mut self, data: &[u8]) -> Result<Vec<u8>, AttestError> {
        let values = self.host_pcr_values()?;
        self.sign_document_bound_to(&values, data)
    }

    /// Signs `data` with the document key bound to `values` of the host
    /// PCRs: the TPM refuses ([`AttestError::PolicyRefused`]) unless the
    /// PCRs hold them.
    pub fn sign_document_bound_to(
        &mut self,
        values: &[[u8; 32]],
        data: &[u8],
    ) -> Result<Vec<u8>, AttestError> {
        use sha2::Digest as _;
        let digest =
            Digest::try_from(sha2::Sha384::digest(data).to_vec()).map_err(tss("a digest"))?;
        let ticket = null_ticket()?;
        let selection = host_selection()?;
        let signature = self.with_key(document_key_template(values)?, |ctx, key| {
            with_pcr_policy(ctx, selection, |ctx, session| {
                ctx.execute_with_session(Some(session), |ctx| {
                    ctx.sign(key, digest, SignatureScheme::Null, ticket)
                })
                .map_err(|e| AttestError::PolicyRefused(e.to_string()))
            })
        })?;
        match signature {
            Signature::EcDsa(sig) => {
                let mut out = Vec::with_capacity(96);
                out.extend_from_slice(&pad48(sig.signature_r().value())?);
                out.extend_from_slice(&pad48(sig.signature_s().value())?);
                Ok(out)
            }
            _ => Err(AttestError::Malformed(
                "the TPM made a signature that is not ECDSA",
            )),
        }
    }

    /// The public part of the document key bound to the PCR values the TPM
    /// holds now (derived again, not stored).
    pub fn document_key(&mut self) -> Result<AkPublic, AttestError> {
        let values = self.host_pcr_values()?;
        self.document_key_bound_to(&values)
    }

    /// The public part of the document key bound to `values` of the host
    /// PCRs (whatever they hold now).
    pub fn document_key_bound_to(&mut self, values: &[[u8; 32]]) -> Result<AkPublic, AttestError> {
        self.with_key(document_key_template(values)?, |ctx, key| {
            let (public, _, _) = ctx.read_public(key).map_err(tss("reading a public key"))?;
            AkPublic::from_tpm_public_any(&public)
        })
    }

    fn nv_read_all(&mut self, index: u32) -> Result<Option<Vec<u8>>, AttestError> {
        let Some(handle) = self.nv_handle(index)? else {
            return Ok(None);
        };
        let (public, _) = self
            .ctx
            .execute_without_session(|ctx| ctx.nv_read_public(handle))
            .map_err(tss("reading an NV index's public area"))?;
        let size = public.data_size();
        let mut bytes = Vec::with_capacity(size);
        let attrs = public.attributes();
        let auth = if attrs.owner_read() {
            NvAuth::Owner
        } else {
            NvAuth::NvIndex(handle)
        };
        while bytes.len() < size {
            let chunk = (size - bytes.len()).min(1024) as u16;
            let offset = bytes.len() as u16;
            let part = self
                .ctx
                .execute_with_session(Some(AuthSession::Password), |ctx| {
                    ctx.nv_read(auth, handle, chunk, offset)
                })
                .map_err(tss("reading an NV index"))?;
            bytes.extend_from_slice(part.value());
        }
        let _ = self.ctx.tr_close(&mut ObjectHandle::from(handle));
        Ok(Some(bytes))
    }

    fn nv_handle(&mut self, index: u32) -> Result<Option<NvIndexHandle>, AttestError> {
        let tpm_handle = NvIndexTpmHandle::new(index).map_err(tss("an NV index"))?;
        match self
            .ctx
            .execute_without_session(|ctx| ctx.tr_from_tpm_public(TpmHandle::NvIndex(tpm_handle)))
        {
            Ok(h) => Ok(Some(NvIndexHandle::from(h))),
            Err(e) if is_handle_missing(&e) => Ok(None),
            Err(e) => Err(tss("opening an NV index")(e)),
        }
    }

    /// The highest host software version recorded in the TPM, as the 8
    /// bytes written by [`Tpm::advance_highest`], or `None` before the first.
    pub fn highest(&mut self) -> Result<Option<[u8; 8]>, AttestError> {
        match self.nv_read_all(HIGHEST_VERSION_NV)? {
            None => Ok(None),
            Some(bytes) => {
                let v: [u8; 8] = bytes.as_slice().try_into().map_err(|_| {
                    AttestError::Malformed("the highest-version NV index is not 8 bytes")
                })?;
                // Written once at definition as all ones until the first
                // record (TPMA_NV_WRITTEN is not relied upon).
                Ok(Some(v))
            }
        }
    }

    /// Records `version` (8 bytes, big-endian order equal to version order)
    /// as the highest: refused if the TPM already holds a higher one, so a
    /// host agent cannot lower it whatever its disk says.
    pub fn advance_highest(&mut self, version: [u8; 8]) -> Result<(), AttestError> {
        let current = self.highest()?;
        if let Some(current) = current {
            if current > version {
                return Err(AttestError::Rollback {
                    recorded: current,
                    offered: version,
                });
            }
            if current == version {
                return Ok(());
            }
        }
        let handle = match self.nv_handle(HIGHEST_VERSION_NV)? {
            Some(h) => h,
            None => {
                let attributes = NvIndexAttributesBuilder::new()
                    .with_owner_write(true)
                    .with_owner_read(true)
                    .with_no_da(true)
                    .build()
                    .map_err(tss("NV attributes"))?;
                let public = NvPublicBuilder::new()
                    .with_nv_index(
                        NvIndexTpmHandle::new(HIGHEST_VERSION_NV).map_err(tss("an NV index"))?,
                    )
                    .with_index_name_algorithm(HashingAlgorithm::Sha256)
                    .with_index_attributes(attributes)
                    .with_data_area_size(8)
                    .build()
                    .map_err(tss("an NV index's public area"))?;
                self.ctx
                    .execute_with_session(Some(AuthSession::Password), |ctx| {
                        ctx.nv_define_space(Provision::Owner, None, public)
                    })
                    .map_err(tss("defining the highest-version NV index"))?
            }
        };
        let data = MaxNvBuffer::try_from(version.to_vec()).map_err(tss("an NV buffer"))?;
        let written = self
            .ctx
            .execute_with_session(Some(AuthSession::Password), |ctx| {
                ctx.nv_write(NvAuth::Owner, handle, data, 0)
            })
            .map_err(tss("writing the highest-version NV index"));
        let _ = self.ctx.tr_close(&mut ObjectHandle::from(handle));
        written
    }

    /// The endorsement key's public area (a marshalled TPMT_PUBLIC): the
    /// RSA 2048 one of the TCG default template (low range), persisted by
    /// the manufacturer at 0x81010001, else derived again.
    pub fn ek_public(&mut self) -> Result<Vec<u8>, AttestError> {
        self.with_ek(|ctx, ek| {
            let (public, _, _) = ctx
                .read_public(ek)
                .map_err(tss("reading the endorsement key"))?;
            public
                .marshall()
                .map_err(tss("marshalling the endorsement key"))
        })
    }

    fn with_ek<T>(
        &mut self,
        f: impl FnOnce(&mut Context, KeyHandle) -> Result<T, AttestError>,
    ) -> Result<T, AttestError> {
        let persistent = TpmHandle::Persistent(
            tss_esapi::handles::PersistentTpmHandle::new(EK_RSA_PERSISTENT)
                .map_err(tss("a handle"))?,
        );
        match self
            .ctx
            .execute_without_session(|ctx| ctx.tr_from_tpm_public(persistent))
        {
            Ok(h) => {
                let out = f(&mut self.ctx, KeyHandle::from(h));
                let _ = self.ctx.tr_close(&mut h.clone());
                out
            }
            Err(e) if is_handle_missing(&e) => {
                let ek = tss_esapi::abstraction::ek::create_ek_object_2(
                    &mut self.ctx,
                    tss_esapi::abstraction::AsymmetricAlgorithmSelection::Rsa(
                        tss_esapi::interface_types::key_bits::RsaKeyBits::Rsa2048,
                    ),
                    None,
                )
                .map_err(tss("creating the endorsement key"))?;
                let out = f(&mut self.ctx, ek);
                let _ = self.ctx.flush_context(ObjectHandle::from(ek));
                out
            }
            Err(e) => Err(tss("opening the endorsement key")(e)),
        }
    }

    /// TPM2_ActivateCredential: recovers the secret of a credential made
    /// ([`crate::credential::make_credential`]) for this TPM's endorsement
    /// key and its attestation key's name. Another TPM, or another key
    /// name, fails the TPM's integrity check.
    pub fn activate_credential(
        &mut self,
        credential: &crate::credential::Credential,
    ) -> Result<Vec<u8>, AttestError> {
        use tss_esapi::interface_types::session_handles::PolicySession;
        use tss_esapi::structures::{EncryptedSecret, IdObject};
        let blob = IdObject::try_from(credential.blob.clone()).map_err(tss("a credential"))?;
        let secret = EncryptedSecret::try_from(credential.secret.clone())
            .map_err(tss("a credential secret"))?;
        let template = attestation_key_template()?;
        let ak = primary(&mut self.ctx, Hierarchy::Endorsement, template)?;
        let out = self.with_ek(|ctx, ek| {
            let session = policy_session(ctx)?;
            let policy = PolicySession::try_from(session).map_err(tss("a policy session"))?;
            let result = ctx
                .execute_with_nullauth_session(|ctx| {
                    ctx.policy_secret(
                        policy,
                        tss_esapi::handles::AuthHandle::Endorsement,
                        Default::default(),
                        Default::default(),
                        Default::default(),
                        None,
                    )
                })
                .map_err(tss("authorizing the endorsement key"))
                .and_then(|_| {
                    ctx.execute_with_sessions(
                        (Some(AuthSession::Password), Some(session), None),
                        |ctx| ctx.activate_credential(ak, ek, blob, secret),
                    )
                    .map_err(tss("activating a credential"))
                });
            let _ = ctx.flush_context(ObjectHandle::from(tss_esapi::handles::SessionHandle::from(
                session,
            )));
            result
        });
        let _ = self.ctx.flush_context(ObjectHandle::from(ak));
        Ok(out?.value().to_vec())
    }

    fn with_srk<T>(
        &mut self,
        f: impl FnOnce(&mut Context, KeyHandle) -> Result<T, AttestError>,
    ) -> Result<T, AttestError> {
        self.with_primary(Hierarchy::Owner, storage_key_template()?, f)
    }

    fn with_primary<T>(
        &mut self,
        hierarchy: Hierarchy,
        template: Public,
        f: impl FnOnce(&mut Context, KeyHandle) -> Result<T, AttestError>,
    ) -> Result<T, AttestError> {
        let key = primary(&mut self.ctx, hierarchy, template)?;
        let out = f(&mut self.ctx, key);
        let flushed = self
            .ctx
            .flush_context(ObjectHandle::from(key))
            .map_err(tss("flushing a key"));
        let out = out?;
        flushed?;
        Ok(out)
    }

    /// Creates a signing key (ECDSA P-256) usable only while `pcrs` hold
    /// `values` (its authPolicy is TPM2_PolicyPCR over them, see
    /// [`crate::credential::policy_pcr_digest`]), under the owner
    /// hierarchy's storage key. What comes back is useless without this
    /// TPM: the private part is encrypted by its storage key.
    pub fn create_bound_key(
        &mut self,
        pcrs: &[u8],
        values: &[[u8; 32]],
    ) -> Result<BoundKey, AttestError> {
        let policy = crate::credential::policy_pcr_digest(pcrs, values);
        let attributes = ObjectAttributesBuilder::new()
            .with_fixed_tpm(true)
            .with_fixed_parent(true)
            .with_sensitive_data_origin(true)
            .with_user_with_auth(false)
            .with_admin_with_policy(false)
            .with_no_da(true)
            .with_sign_encrypt(true)
            .build()
            .map_err(tss("a bound key's attributes"))?;
        let parameters = PublicEccParametersBuilder::new()
            .with_ecc_scheme(EccScheme::EcDsa(HashScheme::new(HashingAlgorithm::Sha256)))
            .with_curve(EccCurve::NistP256)
            .with_is_signing_key(true)
            .with_is_decryption_key(false)
            .with_restricted(false)
            .with_key_derivation_function_scheme(KeyDerivationFunctionScheme::Null)
            .build()
            .map_err(tss("a bound key's parameters"))?;
        let template = PublicBuilder::new()
            .with_public_algorithm(PublicAlgorithm::Ecc)
            .with_name_hashing_algorithm(HashingAlgorithm::Sha256)
            .with_object_attributes(attributes)
            .with_auth_policy(Digest::try_from(policy.to_vec()).map_err(tss("a policy digest"))?)
            .with_ecc_parameters(parameters)
            .with_ecc_unique_identifier(EccPoint::default())
            .build()
            .map_err(tss("a bound key's template"))?;
        let created = self.with_srk(|ctx, srk| {
            ctx.execute_with_nullauth_session(|ctx| {
                ctx.create(srk, template, None, None, None, None)
            })
            .map_err(tss("creating a bound key"))
        })?;
        Ok(BoundKey {
            public: created
                .out_public
                .marshall()
                .map_err(tss("marshalling a public key"))?,
            private: created.out_private.value().to_vec(),
            pcrs: pcrs.to_vec(),
        })
    }

    fn with_bound<T>(
        &mut self,
        key: &BoundKey,
        f: impl FnOnce(&mut Context, KeyHandle) -> Result<T, AttestError>,
    ) -> Result<T, AttestError> {
        use tss_esapi::traits::UnMarshall;
        let public = Public::unmarshall(&key.public).map_err(tss("a bound key's public part"))?;
        let private = tss_esapi::structures::Private::try_from(key.private.clone())
            .map_err(tss("a bound key's private part"))?;
        self.with_srk(|ctx, srk| {
            let handle = ctx
                .execute_with_nullauth_session(|ctx| ctx.load(srk, private, public))
                .map_err(tss("loading a bound key"))?;
            let out = f(ctx, handle);
            let _ = ctx.flush_context(ObjectHandle::from(handle));
            out
        })
    }

    /// TPM2_Certify of a bound key by the attestation key, with `nonce`:
    /// the TPM says the key with that name (so that public area, policy
    /// included) lives in it. Returns the TPMS_ATTEST and TPMT_SIGNATURE.
    pub fn certify(
        &mut self,
        key: &BoundKey,
        nonce: &[u8],
    ) -> Result<(Vec<u8>, Vec<u8>), AttestError> {
        let data = Data::try_from(nonce.to_vec()).map_err(tss("the nonce"))?;
        let template = attestation_key_template()?;
        let ak = primary(&mut self.ctx, Hierarchy::Endorsement, template)?;
        let out = self.with_bound(key, |ctx, handle| {
            ctx.execute_with_sessions(
                (
                    Some(AuthSession::Password),
                    Some(AuthSession::Password),
                    None,
                ),
                |ctx| ctx.certify(ObjectHandle::from(handle), ak, data, SignatureScheme::Null),
            )
            .map_err(tss("certifying a key"))
        });
        let _ = self.ctx.flush_context(ObjectHandle::from(ak));
        let (attest, signature) = out?;
        Ok((
            attest
                .marshall()
                .map_err(tss("marshalling a certification"))?,
            signature
                .marshall()
                .map_err(tss("marshalling a signature"))?,
        ))
    }

    /// TPM2_Certify, with `nonce`, of the document key bound to the PCR
    /// values the TPM holds now, by the attestation key.
    pub fn certify_document_key(
        &mut self,
        nonce: &[u8],
    ) -> Result<(Vec<u8>, Vec<u8>), AttestError> {
        let values = self.host_pcr_values()?;
        self.certify_document_key_bound_to(&values, nonce)
    }

    /// TPM2_Certify, with `nonce`, of the document key bound to `values`.
    pub fn certify_document_key_bound_to(
        &mut self,
        values: &[[u8; 32]],
        nonce: &[u8],
    ) -> Result<(Vec<u8>, Vec<u8>), AttestError> {
        let data = Data::try_from(nonce.to_vec()).map_err(tss("the nonce"))?;
        let doc_template = document_key_template(values)?;
        let out = self.with_ak(|ctx, ak| {
            let doc = primary(ctx, Hierarchy::Endorsement, doc_template)?;
            let out = ctx
                .execute_with_sessions(
                    (
                        Some(AuthSession::Password),
                        Some(AuthSession::Password),
                        None,
                    ),
                    |ctx| ctx.certify(ObjectHandle::from(doc), ak, data, SignatureScheme::Null),
                )
                .map_err(tss("certifying the document key"));
            let _ = ctx.flush_context(ObjectHandle::from(doc));
            out
        })?;
        Ok((
            out.0
                .marshall()
                .map_err(tss("marshalling a certification"))?,
            out.1.marshall().map_err(tss("marshalling a signature"))?,
        ))
    }

    /// Signs the SHA-256 `digest` with a bound key: the TPM refuses unless
    /// the PCRs hold the values the key was bound to. Returns `r || s`.
    pub fn sign_bound(&mut self, key: &BoundKey, digest: [u8; 32]) -> Result<Vec<u8>, AttestError> {
        let selection = selection_of(&key.pcrs)?;
        let digest = Digest::try_from(digest.to_vec()).map_err(tss("a digest"))?;
        let ticket = null_ticket()?;
        let signature = self.with_bound(key, |ctx, handle| {
            with_pcr_policy(ctx, selection, |ctx, session| {
                ctx.execute_with_session(Some(session), |ctx| {
                    ctx.sign(handle, digest, SignatureScheme::Null, ticket)
                })
                .map_err(|e| AttestError::PolicyRefused(e.to_string()))
            })
        })?;
        match signature {
            Signature::EcDsa(sig) => {
                let mut out = Vec::with_capacity(64);
                for part in [sig.signature_r().value(), sig.signature_s().value()] {
                    let p = &part[part.iter().position(|&b| b != 0).unwrap_or(part.len())..];
                    if p.len() > 32 {
                        return Err(AttestError::Malformed(
                            "an ECDSA component longer than 32 bytes",
                        ));
                    }
                    out.extend(std::iter::repeat_n(0u8, 32 - p.len()));
                    out.extend_from_slice(p);
                }
                Ok(out)
            }
            _ => Err(AttestError::Malformed(
                "the TPM made a signature that is not ECDSA",
            )),
        }
    }
}

/// A primary key of `hierarchy` made from `template` (the same template
/// always gives the same key); the caller flushes it.
fn primary(
    ctx: &mut Context,
    hierarchy: Hierarchy,
    template: Public,
) -> Result<KeyHandle, AttestError> {
    Ok(ctx
        .execute_with_nullauth_session(|ctx| {
            ctx.create_primary(hierarchy, template, None, None, None, None)
        })
        .map_err(tss("creating a primary key"))?
        .key_handle)
}

/// The SHA-256 bank's selection of `pcrs`.
fn selection_of(pcrs: &[u8]) -> Result<PcrSelectionList, AttestError> {
    let slots = pcrs
        .iter()
        .map(|&i| slot(i))
        .collect::<Result<Vec<_>, _>>()?;
    PcrSelectionListBuilder::new()
        .with_selection(HashingAlgorithm::Sha256, &slots)
        .build()
        .map_err(tss("a PCR selection"))
}

/// The selection of the host PCRs.
fn host_selection() -> Result<PcrSelectionList, AttestError> {
    selection_of(&crate::HOST_PCRS)
}

/// Runs `f` with a policy session that passed TPM2_PolicyPCR over
/// `selection` at the values the PCRs hold now, then flushes the session.
fn with_pcr_policy<T>(
    ctx: &mut Context,
    selection: PcrSelectionList,
    f: impl FnOnce(&mut Context, AuthSession) -> Result<T, AttestError>,
) -> Result<T, AttestError> {
    use tss_esapi::interface_types::session_handles::PolicySession;
    let session = policy_session(ctx)?;
    let result = PolicySession::try_from(session)
        .map_err(tss("a policy session"))
        .and_then(|policy| {
            ctx.policy_pcr(policy, Digest::default(), selection)
                .map_err(tss("the PCR policy"))
        })
        .and_then(|()| f(ctx, session));
    let _ = ctx.flush_context(ObjectHandle::from(tss_esapi::handles::SessionHandle::from(
        session,
    )));
    result
}

/// A policy session (SHA-256, AES-128-CFB parameter encryption); the
/// caller flushes it.
fn policy_session(ctx: &mut Context) -> Result<AuthSession, AttestError> {
    ctx.start_auth_session(
        None,
        None,
        None,
        SessionType::Policy,
        SymmetricDefinition::AES_128_CFB,
        HashingAlgorithm::Sha256,
    )
    .map_err(tss("starting a policy session"))?
    .ok_or(AttestError::Malformed("no session"))
}

fn pad48(v: &[u8]) -> Result<[u8; 48], AttestError> {
    let v = match v.iter().position(|&b| b != 0) {
        Some(i) if v.len() - i <= 48 => &v[i..],
        None => &[][..],
        _ => {
            return Err(AttestError::Malformed(
                "an ECDSA component longer than 48 bytes",
            ));
        }
    };
    let mut out = [0u8; 48];
    out[48 - v.len()..].copy_from_slice(v);
    Ok(out)
}

fn pcr_handle(index: u8) -> Result<tss_esapi::handles::PcrHandle, AttestError> {
    use tss_esapi::handles::PcrHandle as P;
    Ok(match index {
        0 => P::Pcr0,
        1 => P::Pcr1,
        2 => P::Pcr2,
        3 => P::Pcr3,
        4 => P::Pcr4,
        5 => P::Pcr5,
        6 => P::Pcr6,
        7 => P::Pcr7,
        8 => P::Pcr8,
        9 => P::Pcr9,
        10 => P::Pcr10,
        11 => P::Pcr11,
        12 => P::Pcr12,
        13 => P::Pcr13,
        14 => P::Pcr14,
        15 => P::Pcr15,
        16 => P::Pcr16,
        23 => P::Pcr23,
        _ => return Err(AttestError::PcrIndex(index)),
    })
}

fn is_handle_missing(e: &tss_esapi::Error) -> bool {
    // TPM_RC_HANDLE, as the TPM answers reading the public area of an NV
    // index that is not defined.
    use tss_esapi::constants::response_code::Tss2ResponseCodeKind;
    matches!(e, tss_esapi::Error::Tss2Error(rc) if rc.kind() == Some(Tss2ResponseCodeKind::Handle))
}
