# Writes testdata/v1-three-records.journal from the format described in the
# crate docs, independently of the Rust code, and prints its head hash.
# Usage: python3 make_v1_vector.py v1-three-records.journal
import hashlib, struct, json, sys
src = b"nitrile://cell-1/host/h1"
jid = bytes(range(16))
ver = 1
g = hashlib.sha256(b"nitrile/journal/genesis/v1\0" + struct.pack("<H", ver) + jid + struct.pack("<H", len(src)) + src).digest()
out = b"NITRILEJ" + struct.pack("<HH", ver, len(src)) + jid + src + g
prev = g
recs = [
 {"time":"2030-01-01T00:00:00Z","source":"nitrile://cell-1/host/h1","request_id":"00"*16,"kind":"request","principal":"nitrile://cell-1/operator/alice","cert_sha256":None,"operations":["host.drain"],"resources":["host/h1"],"audience":"h1","token_id":"t1","group":"oncall","step":None,"reason":None,"outcome":None,"detail":None},
 {"time":"2030-01-01T00:00:01Z","source":"nitrile://cell-1/host/h1","request_id":"00"*16,"kind":"outcome","outcome":"executed"},
 {"time":"2030-01-01T00:00:02Z","source":"nitrile://cell-1/host/h1","request_id":"11"*16,"kind":"refusal","step":"token","reason":"token expired"},
]
for i, r in enumerate(recs, 1):
    p = json.dumps(r, separators=(",",":")).encode()
    h = hashlib.sha256(b"nitrile/journal/record/v1\0" + prev + struct.pack("<QI", i, len(p)) + p).digest()
    out += struct.pack("<IQ", len(p), i) + p + h
    prev = h
open(sys.argv[1], "wb").write(out)
print(prev.hex())
