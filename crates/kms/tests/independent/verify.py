#!/usr/bin/env python3
"""An independent opener of nitrile-kms wrapped and sealed volume keys.

Written from the formats documented in crates/kms/src/wrap.rs and
crates/kms/src/seal.rs, with third-party cryptography only: `cryptography`
(HKDF-SHA256, AES-256-GCM) for wrapped keys, `pyhpke` (RFC 9180) for sealed
keys. It shares no code with the Rust implementation it checks.

Input: a JSON file
  {"cases": [{"volume": str, "wrapped": hex, "kek": hex, "secret": hex,
              "sealed": hex, "recipient_private_key": hex,
              "other_volume": str}]}
Output (stdout): JSON
  {"results": [{"from_wrapped": hex, "from_sealed": hex,
                "wrapped_as_other_volume": "refused" | hex,
                "sealed_as_other_volume": "refused" | hex,
                "wrapped_with_other_salt": "refused" | hex}]}
Exit status 0 when every case was processed, 1 on a malformed input.
"""

import json
import sys

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from pyhpke import AEADId, CipherSuite, KDFId, KEMId

DEK_LEN = 64


def parse_wrapped(blob: bytes):
    """magic "NKWK", version 1, len+volume, len+key, nonce 12, ct 64, tag 16."""
    if blob[:4] != b"NKWK" or blob[4] != 1:
        raise ValueError("not a version 1 wrapped key")
    at = 5
    names = []
    for _ in range(2):
        n = blob[at]
        names.append(blob[at + 1 : at + 1 + n].decode("ascii"))
        at += 1 + n
    header = blob[:at]
    nonce = blob[at : at + 12]
    ct_and_tag = blob[at + 12 :]
    if len(ct_and_tag) != DEK_LEN + 16:
        raise ValueError("wrong length")
    return names[0], names[1], header, nonce, ct_and_tag


def open_wrapped(blob: bytes, kek: bytes, secret: bytes, volume: str) -> bytes:
    _, _, header, nonce, ct_and_tag = parse_wrapped(blob)
    info = f"nitrile-kms wrapped-key v1 volume/{volume}".encode()
    key = HKDF(algorithm=hashes.SHA256(), length=32, salt=secret, info=info).derive(kek)
    return AESGCM(key).decrypt(nonce, ct_and_tag, header)


def open_sealed(blob: bytes, private_key: bytes, volume: str) -> bytes:
    """magic "NKSK", version 1, suite 0x0020 0x0001 0x0002, enc 32, ct 64, tag 16."""
    header = blob[:11]
    if header != b"NKSK\x01\x00\x20\x00\x01\x00\x02" or len(blob) != 11 + 32 + DEK_LEN + 16:
        raise ValueError("not a version 1 sealed key of the expected suite")
    enc = blob[11:43]
    ct_and_tag = blob[43:]
    suite = CipherSuite.new(
        KEMId.DHKEM_X25519_HKDF_SHA256, KDFId.HKDF_SHA256, AEADId.AES256_GCM
    )
    skr = suite.kem.deserialize_private_key(private_key)
    info = f"nitrile-kms sealed volume key v1 volume/{volume}".encode()
    recipient = suite.create_recipient_context(enc, skr, info=info)
    return recipient.open(ct_and_tag, aad=header)


def refused_or_hex(f) -> str:
    try:
        return f().hex()
    except (InvalidTag, Exception):  # pyhpke raises its own OpenError
        return "refused"


def main() -> int:
    with open(sys.argv[1]) as fh:
        cases = json.load(fh)["cases"]
    results = []
    for c in cases:
        wrapped = bytes.fromhex(c["wrapped"])
        kek = bytes.fromhex(c["kek"])
        secret = bytes.fromhex(c["secret"])
        sealed = bytes.fromhex(c["sealed"])
        sk = bytes.fromhex(c["recipient_private_key"])
        volume, other = c["volume"], c["other_volume"]
        named_volume, _, _, _, _ = parse_wrapped(wrapped)
        if named_volume != volume:
            print(f"the wrapped key names {named_volume}, not {volume}", file=sys.stderr)
            return 1
        other_salt = bytes(b ^ 1 for b in secret)
        results.append(
            {
                "from_wrapped": open_wrapped(wrapped, kek, secret, volume).hex(),
                "from_sealed": open_sealed(sealed, sk, volume).hex(),
                "wrapped_as_other_volume": refused_or_hex(
                    lambda: open_wrapped(wrapped, kek, secret, other)
                ),
                "sealed_as_other_volume": refused_or_hex(
                    lambda: open_sealed(sealed, sk, other)
                ),
                "wrapped_with_other_salt": refused_or_hex(
                    lambda: open_wrapped(wrapped, kek, other_salt, volume)
                ),
            }
        )
    json.dump({"results": results}, sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
