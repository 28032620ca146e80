//! Property tests: for random trees every inclusion and consistency proof
//! verifies, and any change to a proof, root, index or size makes it fail.

use nitrile_tlog::{Hash, Tree, leaf_hash, verify_consistency, verify_inclusion};
use proptest::prelude::*;
use proptest::test_runner::FileFailurePersistence;

fn tree(size: u64, seed: u64) -> Tree {
    let mut t = Tree::new();
    for i in 0..size {
        t.push(leaf_hash(&(i ^ seed).to_le_bytes()));
    }
    t
}

fn flip(h: &Hash, bit: usize) -> Hash {
    let mut h = *h;
    h[(bit / 8) % 32] ^= 1 << (bit % 8);
    h
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: 256,
        failure_persistence: Some(Box::new(FileFailurePersistence::Direct("tests/proofs_prop.regressions"))),
        ..ProptestConfig::default()
    })]

    #[test]
    fn inclusion_proofs_verify_and_alterations_fail(
        size in 1u64..2000, index_seed in any::<u64>(), seed in any::<u64>(), bit in 0usize..256, pick in any::<usize>(),
    ) {
        let t = tree(size, seed);
        let index = index_seed % size;
        let root = t.root();
        let leaf = t.leaf(index).unwrap();
        let proof = t.inclusion_proof(index, size).unwrap();
        prop_assert!(verify_inclusion(&leaf, index, size, &proof, &root).is_ok());
        // Altered root or leaf.
        prop_assert!(verify_inclusion(&leaf, index, size, &proof, &flip(&root, bit)).is_err());
        prop_assert!(verify_inclusion(&flip(&leaf, bit), index, size, &proof, &root).is_err());
        // Altered proof hash, dropped or extra hash.
        if !proof.is_empty() {
            let mut p = proof.clone();
            let k = pick % p.len();
            p[k] = flip(&p[k], bit);
            prop_assert!(verify_inclusion(&leaf, index, size, &p, &root).is_err());
            let mut p = proof.clone();
            p.remove(pick % proof.len());
            prop_assert!(verify_inclusion(&leaf, index, size, &p, &root).is_err());
        }
        let mut p = proof.clone();
        p.push(root);
        prop_assert!(verify_inclusion(&leaf, index, size, &p, &root).is_err());
        // Another index (the leaf is not there), or an index past the end.
        if size > 1 {
            let other = (index + 1 + (pick as u64 % (size - 1))) % size;
            prop_assert!(verify_inclusion(&leaf, other, size, &proof, &root).is_err());
        }
        prop_assert!(verify_inclusion(&leaf, size, size, &proof, &root).is_err());
        // (A proof may also verify for another tree size whose path has the
        // same shape: the size is bound by the signed checkpoint, not the proof.)
    }

    #[test]
    fn consistency_proofs_verify_and_alterations_fail(
        new in 1u64..2000, old_seed in any::<u64>(), seed in any::<u64>(), bit in 0usize..256, pick in any::<usize>(),
    ) {
        let t = tree(new, seed);
        let old = 1 + old_seed % new;
        let old_root = t.root_at(old).unwrap();
        let new_root = t.root();
        let proof = t.consistency_proof(old, new).unwrap();
        prop_assert!(verify_consistency(old, new, &old_root, &new_root, &proof).is_ok());
        prop_assert!(verify_consistency(old, new, &flip(&old_root, bit), &new_root, &proof).is_err());
        prop_assert!(verify_consistency(old, new, &old_root, &flip(&new_root, bit), &proof).is_err());
        if !proof.is_empty() {
            let mut p = proof.clone();
            let k = pick % p.len();
            p[k] = flip(&p[k], bit);
            prop_assert!(verify_consistency(old, new, &old_root, &new_root, &p).is_err());
            let mut p = proof.clone();
            p.remove(pick % proof.len());
            prop_assert!(verify_consistency(old, new, &old_root, &new_root, &p).is_err());
        }
        if old < new {
            // A different old size with the same roots and proof.
            let other = 1 + (old + pick as u64 % (new - 1)) % (new - 1);
            if other != old {
                prop_assert!(verify_consistency(other, new, &old_root, &new_root, &proof).is_err());
            }
            // A fork: the new tree with one leaf of the old part changed.
            let mut forked = Tree::new();
            let changed = pick as u64 % old;
            for i in 0..new {
                let l = t.leaf(i).unwrap();
                forked.push(if i == changed { flip(&l, bit) } else { l });
            }
            let fork_proof = forked.consistency_proof(old, new).unwrap();
            prop_assert!(verify_consistency(old, new, &old_root, &forked.root(), &fork_proof).is_err());
        }
        // Sizes the wrong way round.
        prop_assert!(verify_consistency(new, old - 1, &new_root, &old_root, &proof).is_err());
    }
}
