"""Opens a host attestation document with pycose, an implementation of COSE
(RFC 9052) nobody here wrote, and checks it the way a Nitro attestation
document is checked: COSE_Sign1 (tag 18), ES384 in the protected header, the
signature under the key of the document's certificate, and the payload's
fields in the Nitro layout with the TPM's PCRs under `nitrotpm_pcrs`.

usage: cose_verify.py DOCUMENT [NONCE_HEX]
Prints the payload's fields as JSON; exits 1 if anything does not hold.
"""
import json
import sys

import cbor2
from cryptography import x509
from pycose.keys import EC2Key
from pycose.messages import Sign1Message

doc = open(sys.argv[1], "rb").read()
msg = Sign1Message.decode(doc)
alg = msg.get_attr(1) if hasattr(msg, "get_attr") else None
payload = cbor2.loads(msg.payload)
cert = x509.load_der_x509_certificate(payload["certificate"])
numbers = cert.public_key().public_numbers()
msg.key = EC2Key(crv="P_384", x=numbers.x.to_bytes(48, "big"), y=numbers.y.to_bytes(48, "big"))
if not msg.verify_signature():
    print("the signature does not verify", file=sys.stderr)
    sys.exit(1)
want = ["module_id", "digest", "timestamp", "nitrotpm_pcrs", "certificate", "cabundle",
        "public_key", "user_data", "nonce"]
if list(payload.keys()) != want:
    print(f"payload keys {list(payload.keys())}", file=sys.stderr)
    sys.exit(1)
if len(sys.argv) > 2 and payload["nonce"] != bytes.fromhex(sys.argv[2]):
    print("the nonce is not the one asked for", file=sys.stderr)
    sys.exit(1)
print(json.dumps({
    "alg": str(msg.phdr),
    "module_id": payload["module_id"],
    "digest": payload["digest"],
    "pcrs": {str(k): v.hex() for k, v in payload["nitrotpm_pcrs"].items()},
    "cabundle": len(payload["cabundle"]),
    "subject": cert.subject.rfc4514_string(),
}))
