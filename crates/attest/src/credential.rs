//! Credential activation, the verifier's half (TPM 2.0 Part 1, 24 "Credential
//! Protection"; Part 3, TPM2_MakeCredential), in software: a secret is
//! encrypted so that only the TPM holding the endorsement key can recover
//! it, and only for a key of a given name loaded in that same TPM
//! (TPM2_ActivateCredential). The CA learns that the attestation key lives
//! in the TPM whose endorsement key the manufacturer certified.
//!
//! The seed: for an RSA endorsement key, random and encrypted with
//! RSAES-OAEP (label `"IDENTITY\0"`); for an ECC one, an ephemeral ECDH key
//! on its curve gives Z and `seed = KDFe(nameAlg, Z, "IDENTITY", ephemeral.x,
//! ek.x)`. The credential
//! (as a TPM2B) is encrypted with AES-CFB (IV zero) under
//! `KDFa(nameAlg, seed, "STORAGE", name, "", keyBits)`, and an HMAC under
//! `KDFa(nameAlg, seed, "INTEGRITY", "", "", hashBits)` covers the
//! ciphertext and the name. A test activates what this makes in swtpm.

use aes::cipher::{BlockEncrypt, KeyInit, generic_array::GenericArray};
use ring::{agreement, hmac, rand};

use crate::AttestError;

const TPM_ALG_ECC: u16 = 0x0023;
const TPM_ALG_AES: u16 = 0x0006;
const TPM_ALG_CFB: u16 = 0x0043;
const TPM_ALG_SHA256: u16 = 0x000b;
const TPM_ALG_SHA384: u16 = 0x000c;
const TPM_ECC_NIST_P256: u16 = 0x0003;
const TPM_ECC_NIST_P384: u16 = 0x0004;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Hash {
    Sha256,
    Sha384,
}

impl Hash {
    fn len(self) -> usize {
        match self {
            Self::Sha256 => 32,
            Self::Sha384 => 48,
        }
    }
    fn hmac(self) -> hmac::Algorithm {
        match self {
            Self::Sha256 => hmac::HMAC_SHA256,
            Self::Sha384 => hmac::HMAC_SHA384,
        }
    }
    fn digest(self, parts: &[&[u8]]) -> Vec<u8> {
        let alg = match self {
            Self::Sha256 => &ring::digest::SHA256,
            Self::Sha384 => &ring::digest::SHA384,
        };
        let mut c = ring::digest::Context::new(alg);
        for p in parts {
            c.update(p);
        }
        c.finish().as_ref().to_vec()
    }
}

/// What MakeCredential needs of an endorsement key, parsed from its
/// TPMT_PUBLIC.
#[derive(Debug)]
struct EkParams {
    name_alg: Hash,
    aes_bits: usize,
    key: EkKey,
}

#[derive(Debug)]
enum EkKey {
    Ecc { p384: bool, x: Vec<u8>, y: Vec<u8> },
    Rsa { modulus: Vec<u8>, exponent: u32 },
}

/// The endorsement key's public key: for RSA its modulus and exponent, for
/// ECC its point's coordinates (for comparing with its certificate).
pub fn ek_key(tpmt_public: &[u8]) -> Result<(Vec<u8>, Vec<u8>), AttestError> {
    Ok(match parse_ek(tpmt_public)?.key {
        EkKey::Ecc { x, y, .. } => (x, y),
        EkKey::Rsa { modulus, exponent } => (modulus, exponent.to_be_bytes().to_vec()),
    })
}

const TPM_ALG_RSA: u16 = 0x0001;

fn parse_ek(tpmt_public: &[u8]) -> Result<EkParams, AttestError> {
    if tpmt_public.get(..2) == Some(&TPM_ALG_RSA.to_be_bytes()[..]) {
        return parse_rsa_ek(tpmt_public);
    }
    let mut at = 0usize;
    let mut take = |n: usize| -> Result<&[u8], AttestError> {
        let s = tpmt_public
            .get(at..at + n)
            .ok_or(AttestError::Malformed("an endorsement key ends early"))?;
        at += n;
        Ok(s)
    };
    let u16_of = |s: &[u8]| u16::from_be_bytes([s[0], s[1]]);
    if u16_of(take(2)?) != TPM_ALG_ECC {
        return Err(AttestError::Malformed(
            "the endorsement key is not an ECC key",
        ));
    }
    let name_alg = match u16_of(take(2)?) {
        TPM_ALG_SHA256 => Hash::Sha256,
        TPM_ALG_SHA384 => Hash::Sha384,
        _ => return Err(AttestError::Malformed("the endorsement key's name hash")),
    };
    let _attributes = take(4)?;
    let policy = u16_of(take(2)?) as usize;
    take(policy)?;
    if u16_of(take(2)?) != TPM_ALG_AES {
        return Err(AttestError::Malformed(
            "the endorsement key's symmetric algorithm is not AES",
        ));
    }
    let aes_bits = u16_of(take(2)?) as usize;
    if u16_of(take(2)?) != TPM_ALG_CFB || !(aes_bits == 128 || aes_bits == 256) {
        return Err(AttestError::Malformed(
            "the endorsement key's symmetric mode",
        ));
    }
    let scheme = u16_of(take(2)?);
    if scheme != 0x0010 {
        take(2)?;
    }
    let p384 = match u16_of(take(2)?) {
        TPM_ECC_NIST_P256 => false,
        TPM_ECC_NIST_P384 => true,
        _ => return Err(AttestError::Malformed("the endorsement key's curve")),
    };
    if u16_of(take(2)?) != 0x0010 {
        take(2)?;
    }
    let size = if p384 { 48 } else { 32 };
    let mut coord = || -> Result<Vec<u8>, AttestError> {
        let n = u16_of(take(2)?) as usize;
        let c = take(n)?;
        let c = &c[c.iter().position(|&b| b != 0).unwrap_or(c.len())..];
        if c.len() > size {
            return Err(AttestError::Malformed("an endorsement key coordinate"));
        }
        let mut v = vec![0u8; size - c.len()];
        v.extend_from_slice(c);
        Ok(v)
    };
    let x = coord()?;
    let y = coord()?;
    Ok(EkParams {
        name_alg,
        aes_bits,
        key: EkKey::Ecc { p384, x, y },
    })
}

fn parse_rsa_ek(tpmt_public: &[u8]) -> Result<EkParams, AttestError> {
    let mut r = crate::quote::Reader { b: tpmt_public };
    r.u16()?;
    let name_alg = match r.u16()? {
        TPM_ALG_SHA256 => Hash::Sha256,
        TPM_ALG_SHA384 => Hash::Sha384,
        _ => return Err(AttestError::Malformed("the endorsement key's name hash")),
    };
    r.u32()?;
    r.tpm2b()?;
    if r.u16()? != TPM_ALG_AES {
        return Err(AttestError::Malformed(
            "the endorsement key's symmetric algorithm is not AES",
        ));
    }
    let aes_bits = r.u16()? as usize;
    if r.u16()? != TPM_ALG_CFB || !(aes_bits == 128 || aes_bits == 256) {
        return Err(AttestError::Malformed(
            "the endorsement key's symmetric mode",
        ));
    }
    if r.u16()? != 0x0010 {
        r.u16()?;
    }
    let bits = r.u16()? as usize;
    let exponent = match r.u32()? {
        0 => 65537,
        e => e,
    };
    let modulus = r.tpm2b()?.to_vec();
    if modulus.len() * 8 != bits || !(2048..=4096).contains(&bits) {
        return Err(AttestError::Malformed("the endorsement key's modulus"));
    }
    Ok(EkParams {
        name_alg,
        aes_bits,
        key: EkKey::Rsa { modulus, exponent },
    })
}

/// MGF1 (RFC 8017 B.2.1).
fn mgf1(hash: Hash, seed: &[u8], len: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(len + hash.len());
    let mut counter = 0u32;
    while out.len() < len {
        out.extend(hash.digest(&[seed, &counter.to_be_bytes()]));
        counter += 1;
    }
    out.truncate(len);
    out
}

/// RSAES-OAEP encryption (RFC 8017 7.1.1) with `hash` for the label and
/// MGF1, as TPM2_MakeCredential does for an RSA endorsement key. Only the
/// public operation: nothing secret but the random message, which the
/// endorsement key alone can recover.
fn rsa_oaep_encrypt(
    hash: Hash,
    modulus: &[u8],
    exponent: u32,
    label: &[u8],
    message: &[u8],
) -> Result<Vec<u8>, AttestError> {
    use num_bigint::BigUint;
    let k = modulus.len();
    let h = hash.len();
    if message.len() + 2 * h + 2 > k {
        return Err(AttestError::Malformed(
            "an OAEP message too long for the key",
        ));
    }
    let mut db = hash.digest(&[label]);
    db.extend(std::iter::repeat_n(0u8, k - message.len() - 2 * h - 2));
    db.push(1);
    db.extend_from_slice(message);
    let mut seed = vec![0u8; h];
    rand::SecureRandom::fill(&rand::SystemRandom::new(), &mut seed)
        .map_err(|_| AttestError::Malformed("randomness"))?;
    for (d, m) in db.iter_mut().zip(mgf1(hash, &seed, k - h - 1)) {
        *d ^= m;
    }
    for (s, m) in seed.iter_mut().zip(mgf1(hash, &db, h)) {
        *s ^= m;
    }
    let mut em = vec![0u8];
    em.extend_from_slice(&seed);
    em.extend_from_slice(&db);
    let n = BigUint::from_bytes_be(modulus);
    let c = BigUint::from_bytes_be(&em).modpow(&BigUint::from(exponent), &n);
    let c = c.to_bytes_be();
    let mut out = vec![0u8; k - c.len()];
    out.extend_from_slice(&c);
    Ok(out)
}

/// KDFa (SP 800-108 counter mode with HMAC), as TPM 2.0 Part 1 11.4.10.2.
fn kdfa(
    hash: Hash,
    key: &[u8],
    label: &str,
    context_u: &[u8],
    context_v: &[u8],
    bits: usize,
) -> Vec<u8> {
    let key = hmac::Key::new(hash.hmac(), key);
    let mut out = Vec::new();
    let mut counter = 1u32;
    while out.len() * 8 < bits {
        let mut c = hmac::Context::with_key(&key);
        c.update(&counter.to_be_bytes());
        c.update(label.as_bytes());
        c.update(&[0]);
        c.update(context_u);
        c.update(context_v);
        c.update(&(bits as u32).to_be_bytes());
        out.extend_from_slice(c.sign().as_ref());
        counter += 1;
    }
    out.truncate(bits / 8);
    out
}

/// KDFe (SP 800-56A concatenation), as TPM 2.0 Part 1 11.4.10.3.
fn kdfe(hash: Hash, z: &[u8], label: &str, party_u: &[u8], party_v: &[u8], bits: usize) -> Vec<u8> {
    let mut out = Vec::new();
    let mut counter = 1u32;
    while out.len() * 8 < bits {
        let mut use_ = label.as_bytes().to_vec();
        use_.push(0);
        out.extend(hash.digest(&[&counter.to_be_bytes(), z, &use_, party_u, party_v]));
        counter += 1;
    }
    out.truncate(bits / 8);
    out
}

fn aes_cfb_encrypt(key: &[u8], data: &mut [u8]) -> Result<(), AttestError> {
    let mut iv = [0u8; 16];
    macro_rules! run {
        ($cipher:ty) => {{
            let c =
                <$cipher>::new_from_slice(key).map_err(|_| AttestError::Malformed("an AES key"))?;
            for chunk in data.chunks_mut(16) {
                let mut block = GenericArray::clone_from_slice(&iv);
                c.encrypt_block(&mut block);
                for (d, k) in chunk.iter_mut().zip(block.iter()) {
                    *d ^= k;
                }
                iv[..chunk.len()].copy_from_slice(chunk);
            }
        }};
    }
    match key.len() {
        16 => run!(aes::Aes128),
        32 => run!(aes::Aes256),
        _ => return Err(AttestError::Malformed("an AES key length")),
    }
    Ok(())
}

/// A credential made for one TPM and one key name: the bytes of the
/// TPM2B_ID_OBJECT and TPM2B_ENCRYPTED_SECRET contents that
/// TPM2_ActivateCredential takes.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Credential {
    /// The credential blob (`TPM2B(outerHMAC) || encIdentity`).
    #[serde(with = "hex::serde")]
    pub blob: Vec<u8>,
    /// The encrypted seed: for an RSA endorsement key the OAEP ciphertext,
    /// for an ECC one the ephemeral public point (a marshalled
    /// TPMS_ECC_POINT).
    #[serde(with = "hex::serde")]
    pub secret: Vec<u8>,
}

/// Makes a credential carrying `secret` (at most the name hash's length)
/// for the object named `name` in the TPM of the ECC endorsement key
/// `ek_public` (its TPMT_PUBLIC).
pub fn make_credential(
    ek_public: &[u8],
    name: &[u8],
    secret: &[u8],
) -> Result<Credential, AttestError> {
    let ek = parse_ek(ek_public)?;
    if secret.is_empty() || secret.len() > ek.name_alg.len() {
        return Err(AttestError::Malformed("a credential of the wrong size"));
    }
    let hash = ek.name_alg;
    let (seed, encrypted_seed) = match &ek.key {
        EkKey::Rsa { modulus, exponent } => {
            let mut seed = vec![0u8; hash.len()];
            rand::SecureRandom::fill(&rand::SystemRandom::new(), &mut seed)
                .map_err(|_| AttestError::Malformed("randomness"))?;
            let enc = rsa_oaep_encrypt(hash, modulus, *exponent, b"IDENTITY\0", &seed)?;
            (seed, enc)
        }
        EkKey::Ecc { p384, x, y } => {
            let rng = rand::SystemRandom::new();
            let alg = if *p384 {
                &agreement::ECDH_P384
            } else {
                &agreement::ECDH_P256
            };
            let private = agreement::EphemeralPrivateKey::generate(alg, &rng)
                .map_err(|_| AttestError::Malformed("an ephemeral key"))?;
            let public = private
                .compute_public_key()
                .map_err(|_| AttestError::Malformed("an ephemeral key"))?;
            let public = public.as_ref().to_vec();
            let size = x.len();
            let (ex, ey) = (&public[1..1 + size], &public[1 + size..]);
            let mut peer = vec![4u8];
            peer.extend_from_slice(x);
            peer.extend_from_slice(y);
            let z = agreement::agree_ephemeral(
                private,
                &agreement::UnparsedPublicKey::new(alg, &peer),
                |z| z.to_vec(),
            )
            .map_err(|_| {
                AttestError::Malformed("the endorsement key is not a point on its curve")
            })?;
            let seed = kdfe(hash, &z, "IDENTITY", ex, x, hash.len() * 8);
            let mut point = (size as u16).to_be_bytes().to_vec();
            point.extend_from_slice(ex);
            point.extend_from_slice(&(size as u16).to_be_bytes());
            point.extend_from_slice(ey);
            (seed, point)
        }
    };
    let sym = kdfa(hash, &seed, "STORAGE", name, &[], ek.aes_bits);
    let mut enc_identity = (secret.len() as u16).to_be_bytes().to_vec();
    enc_identity.extend_from_slice(secret);
    aes_cfb_encrypt(&sym, &mut enc_identity)?;
    let hmac_key = kdfa(hash, &seed, "INTEGRITY", &[], &[], hash.len() * 8);
    let tag = hmac::sign(
        &hmac::Key::new(hash.hmac(), &hmac_key),
        &[&enc_identity[..], name].concat(),
    );
    let mut blob = (tag.as_ref().len() as u16).to_be_bytes().to_vec();
    blob.extend_from_slice(tag.as_ref());
    blob.extend_from_slice(&enc_identity);
    Ok(Credential {
        blob,
        secret: encrypted_seed,
    })
}

/// The digest of a policy that is only TPM2_PolicyPCR over `pcrs` (SHA-256
/// bank) holding `values` in index order: what a key bound to those PCR
/// values carries as its authPolicy (TPM 2.0 Part 3, 23.7).
pub fn policy_pcr_digest(pcrs: &[u8], values: &[[u8; 32]]) -> [u8; 32] {
    const TPM_CC_POLICY_PCR: u32 = 0x0000_017f;
    let mut select = [0u8; 3];
    for &i in pcrs {
        if let Some(b) = select.get_mut(usize::from(i / 8)) {
            *b |= 1 << (i % 8);
        }
    }
    let mut selection = 1u32.to_be_bytes().to_vec();
    selection.extend_from_slice(&TPM_ALG_SHA256.to_be_bytes());
    selection.push(3);
    selection.extend_from_slice(&select);
    let concat: Vec<u8> = values.iter().flatten().copied().collect();
    let pcr_digest = Hash::Sha256.digest(&[&concat]);
    let out = Hash::Sha256.digest(&[
        &[0u8; 32],
        &TPM_CC_POLICY_PCR.to_be_bytes(),
        &selection,
        &pcr_digest,
    ]);
    out.try_into().unwrap_or([0; 32])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kdfa_matches_its_definition_for_two_blocks() {
        // 384 bits of SHA-256 KDFa are two HMAC blocks, the second with
        // counter 2, truncated.
        let k = kdfa(Hash::Sha256, b"key", "STORAGE", b"u", b"v", 384);
        assert_eq!(k.len(), 48);
        let key = hmac::Key::new(hmac::HMAC_SHA256, b"key");
        let block = |i: u32| {
            let mut m = i.to_be_bytes().to_vec();
            m.extend_from_slice(b"STORAGE\0uv");
            m.extend_from_slice(&384u32.to_be_bytes());
            hmac::sign(&key, &m).as_ref().to_vec()
        };
        assert_eq!(&k[..32], &block(1)[..]);
        assert_eq!(&k[32..], &block(2)[..16]);
    }

    #[test]
    fn cfb_is_its_own_keystream() {
        let mut a = b"sixteen byte blk and a tail".to_vec();
        aes_cfb_encrypt(&[7u8; 16], &mut a).unwrap();
        assert_ne!(&a[..], b"sixteen byte blk and a tail");
    }
}
