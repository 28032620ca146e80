#!/usr/bin/env python3
"""An independent RFC 9162 verifier (Python 3.11, standard library only).

Written from RFC 9162 section 2.1: the Merkle Tree Hash (2.1.1), inclusion
proof verification (2.1.3.2) and consistency proof verification (2.1.4.2).
It shares no code with the Rust implementation it checks.

Input: a JSON file
  {"entries": [hex, ...],
   "inclusion": [{"index", "size", "root", "proof": [hex]}],
   "consistency": [{"old", "new", "old_root", "new_root", "proof": [hex]}]}
Every root is recomputed from the entries with MTH and compared, and every
proof verified. Exit status 0 when everything holds, 1 otherwise.
"""

import hashlib
import json
import sys


def leaf(entry: bytes) -> bytes:
    return hashlib.sha256(b"\x00" + entry).digest()


def node(left: bytes, right: bytes) -> bytes:
    return hashlib.sha256(b"\x01" + left + right).digest()


def mth(leaves: list[bytes]) -> bytes:
    """MTH(D[n]) by the recursive definition of section 2.1.1."""
    n = len(leaves)
    if n == 0:
        return hashlib.sha256(b"").digest()
    if n == 1:
        return leaves[0]
    k = 1
    while k * 2 < n:
        k *= 2
    return node(mth(leaves[:k]), mth(leaves[k:]))


def verify_inclusion(leaf_index, tree_size, leaf_hash, path, root) -> bool:
    """Section 2.1.3.2."""
    if leaf_index >= tree_size:
        return False
    fn, sn, r = leaf_index, tree_size - 1, leaf_hash
    for p in path:
        if sn == 0:
            return False
        if fn & 1 or fn == sn:
            r = node(p, r)
            if not fn & 1:
                while not (fn & 1) and fn != 0:
                    fn >>= 1
                    sn >>= 1
        else:
            r = node(r, p)
        fn >>= 1
        sn >>= 1
    return sn == 0 and r == root


def verify_consistency(first, second, first_hash, second_hash, path) -> bool:
    """Section 2.1.4.2 (sizes 0 < first < second; equal sizes need equal roots)."""
    if first == second:
        return not path and first_hash == second_hash
    if first == 0 or first > second or not path:
        return first == 0 and not path
    if first & (first - 1) == 0:
        path = [first_hash] + list(path)
    fn, sn = first - 1, second - 1
    while fn & 1:
        fn >>= 1
        sn >>= 1
    fr = sr = path[0]
    for c in path[1:]:
        if sn == 0:
            return False
        if fn & 1 or fn == sn:
            fr = node(c, fr)
            sr = node(c, sr)
            if not fn & 1:
                while not (fn & 1) and fn != 0:
                    fn >>= 1
                    sn >>= 1
        else:
            sr = node(sr, c)
        fn >>= 1
        sn >>= 1
    return fr == first_hash and sr == second_hash and sn == 0


def main() -> int:
    with open(sys.argv[1], encoding="utf-8") as f:
        data = json.load(f)
    leaves = [leaf(bytes.fromhex(e)) for e in data["entries"]]
    roots: dict[int, bytes] = {}

    def root_of(size: int) -> bytes:
        if size not in roots:
            roots[size] = mth(leaves[:size])
        return roots[size]

    failures = 0
    for c in data["inclusion"]:
        root = bytes.fromhex(c["root"])
        proof = [bytes.fromhex(h) for h in c["proof"]]
        ok = root == root_of(c["size"]) and verify_inclusion(
            c["index"], c["size"], leaves[c["index"]], proof, root)
        if not ok:
            failures += 1
            print(f"inclusion FAILED index={c['index']} size={c['size']}")
    for c in data["consistency"]:
        old_root, new_root = bytes.fromhex(c["old_root"]), bytes.fromhex(c["new_root"])
        proof = [bytes.fromhex(h) for h in c["proof"]]
        ok = (old_root == root_of(c["old"]) and new_root == root_of(c["new"])
              and verify_consistency(c["old"], c["new"], old_root, new_root, proof))
        if not ok:
            failures += 1
            print(f"consistency FAILED old={c['old']} new={c['new']}")
    checked = len(data["inclusion"]) + len(data["consistency"])
    print(f"checked {checked} proofs over {len(leaves)} entries, {failures} failed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
