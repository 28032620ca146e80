//! RFC 9162 section 2: Merkle tree hashes, inclusion and consistency proofs.

use sha2::{Digest, Sha256};

use crate::Hash;

/// The hash of an RFC 6962 leaf: `SHA-256(0x00 || entry)`.
pub fn leaf_hash(entry: &[u8]) -> Hash {
    let mut h = Sha256::new();
    h.update([0u8]);
    h.update(entry);
    h.finalize().into()
}

/// The hash of an interior node: `SHA-256(0x01 || left || right)`.
pub fn node_hash(left: &Hash, right: &Hash) -> Hash {
    let mut h = Sha256::new();
    h.update([1u8]);
    h.update(left);
    h.update(right);
    h.finalize().into()
}

/// The root of the empty tree: `SHA-256("")`.
pub fn empty_root() -> Hash {
    Sha256::digest([]).into()
}

/// Why a proof did not verify, or could not be made.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum ProofError {
    /// the leaf index {index} is not below the tree size {size}
    #[error("the leaf index {index} is not below the tree size {size}")]
    IndexOutOfRange {
        /// The leaf index asked for.
        index: u64,
        /// The tree size.
        size: u64,
    },
    /// the old tree size {old} is larger than the new tree size {new}
    #[error("the old tree size {old} is larger than the new tree size {new}")]
    SizesReversed {
        /// The older (smaller) size.
        old: u64,
        /// The newer (larger) size.
        new: u64,
    },
    /// the proof has the wrong number of hashes for these sizes
    #[error("the proof has {got} hashes; these sizes need {want}")]
    WrongLength {
        /// Hashes in the proof.
        got: usize,
        /// Hashes the sizes need.
        want: usize,
    },
    /// the proof does not lead to the expected root
    #[error("the proof does not lead to the expected root")]
    RootMismatch,
    /// the proof does not lead to the expected old root
    #[error("the proof does not lead to the expected old root")]
    OldRootMismatch,
    /// the tree is smaller than the size asked for
    #[error("the tree has {have} leaves; size {want} was asked for")]
    TreeTooSmall {
        /// Leaves in the tree.
        have: u64,
        /// Size asked for.
        want: u64,
    },
}

/// An inclusion proof verified: the leaf is at its index in the tree with that root.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InclusionValid(());

/// A consistency proof verified: the old tree is a prefix of the new one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConsistencyValid(());

/// The number of hashes in an inclusion proof for `index` in a tree of `size`.
fn inclusion_len(index: u64, size: u64) -> usize {
    // Hashes on the path: one per level where the sibling exists.
    let inner = 64 - (index ^ (size - 1)).leading_zeros();
    let border = (index >> inner).count_ones();
    (inner + border) as usize
}

/// The number of hashes in a consistency proof from `old` to `new` leaves
/// (`0 < old < new`).
fn consistency_len(old: u64, new: u64) -> usize {
    let inner = 64 - ((old - 1) ^ (new - 1)).leading_zeros();
    let border = ((old - 1) >> inner).count_ones();
    let shift = old.trailing_zeros();
    let start = u32::from(!old.is_power_of_two());
    (start + inner - shift + border) as usize
}

/// Verifies an RFC 9162 inclusion proof (section 2.1.3.2).
pub fn verify_inclusion(
    leaf_hash: &Hash,
    index: u64,
    size: u64,
    proof: &[Hash],
    root: &Hash,
) -> Result<InclusionValid, ProofError> {
    if index >= size {
        return Err(ProofError::IndexOutOfRange { index, size });
    }
    let want = inclusion_len(index, size);
    if proof.len() != want {
        return Err(ProofError::WrongLength {
            got: proof.len(),
            want,
        });
    }
    let mut fnode = index;
    let mut snode = size - 1;
    let mut r = *leaf_hash;
    for p in proof {
        if snode == 0 {
            return Err(ProofError::WrongLength {
                got: proof.len(),
                want,
            });
        }
        if fnode & 1 == 1 || fnode == snode {
            r = node_hash(p, &r);
            if fnode & 1 == 0 {
                while fnode & 1 == 0 && fnode != 0 {
                    fnode >>= 1;
                    snode >>= 1;
                }
            }
        } else {
            r = node_hash(&r, p);
        }
        fnode >>= 1;
        snode >>= 1;
    }
    if snode != 0 {
        return Err(ProofError::WrongLength {
            got: proof.len(),
            want,
        });
    }
    if &r != root {
        return Err(ProofError::RootMismatch);
    }
    Ok(InclusionValid(()))
}

/// Verifies an RFC 9162 consistency proof (section 2.1.4.2).
///
/// A tree of size 0 is consistent with every tree (the proof must be empty);
/// equal sizes need an empty proof and equal roots.
pub fn verify_consistency(
    old_size: u64,
    new_size: u64,
    old_root: &Hash,
    new_root: &Hash,
    proof: &[Hash],
) -> Result<ConsistencyValid, ProofError> {
    if old_size > new_size {
        return Err(ProofError::SizesReversed {
            old: old_size,
            new: new_size,
        });
    }
    if old_size == 0 || old_size == new_size {
        if !proof.is_empty() {
            return Err(ProofError::WrongLength {
                got: proof.len(),
                want: 0,
            });
        }
        if old_size == new_size && old_root != new_root {
            return Err(ProofError::RootMismatch);
        }
        return Ok(ConsistencyValid(()));
    }
    let want = consistency_len(old_size, new_size);
    if proof.len() != want {
        return Err(ProofError::WrongLength {
            got: proof.len(),
            want,
        });
    }
    let mut path: Vec<Hash> = Vec::with_capacity(proof.len() + 1);
    if old_size.is_power_of_two() {
        path.push(*old_root);
    }
    path.extend_from_slice(proof);
    let mut fnode = old_size - 1;
    let mut snode = new_size - 1;
    while fnode & 1 == 1 {
        fnode >>= 1;
        snode >>= 1;
    }
    let mut fr = path[0];
    let mut sr = path[0];
    for c in &path[1..] {
        if snode == 0 {
            return Err(ProofError::WrongLength {
                got: proof.len(),
                want,
            });
        }
        if fnode & 1 == 1 || fnode == snode {
            fr = node_hash(c, &fr);
            sr = node_hash(c, &sr);
            if fnode & 1 == 0 {
                while fnode & 1 == 0 && fnode != 0 {
                    fnode >>= 1;
                    snode >>= 1;
                }
            }
        } else {
            sr = node_hash(&sr, c);
        }
        fnode >>= 1;
        snode >>= 1;
    }
    if snode != 0 {
        return Err(ProofError::WrongLength {
            got: proof.len(),
            want,
        });
    }
    if &fr != old_root {
        return Err(ProofError::OldRootMismatch);
    }
    if &sr != new_root {
        return Err(ProofError::RootMismatch);
    }
    Ok(ConsistencyValid(()))
}

/// The largest power of two strictly smaller than `n` (`n >= 2`).
fn split_point(n: u64) -> u64 {
    1 << (63 - (n - 1).leading_zeros())
}

/// An in-memory Merkle tree: every complete subtree hash, level by level.
///
/// `levels[l][i]` is the hash of leaves `i * 2^l .. (i + 1) * 2^l`. Appending
/// costs amortised two hashes per leaf; any root, inclusion or consistency
/// proof for any size up to the current one costs O(log² n) hashes.
#[derive(Debug, Clone, Default)]
pub struct Tree {
    levels: Vec<Vec<Hash>>,
}

impl Tree {
    /// An empty tree.
    pub fn new() -> Self {
        Self::default()
    }

    /// The number of leaves.
    pub fn size(&self) -> u64 {
        self.levels.first().map_or(0, |l| l.len() as u64)
    }

    /// Appends one leaf hash.
    pub fn push(&mut self, leaf: Hash) {
        let mut hash = leaf;
        let mut level = 0;
        loop {
            if self.levels.len() == level {
                self.levels.push(Vec::new());
            }
            self.levels[level].push(hash);
            let len = self.levels[level].len();
            if len % 2 == 1 {
                break;
            }
            hash = node_hash(&self.levels[level][len - 2], &self.levels[level][len - 1]);
            level += 1;
        }
    }

    /// The leaf hash at `index`, if the tree has it.
    pub fn leaf(&self, index: u64) -> Option<Hash> {
        self.complete(0, index)
    }

    /// The hash of the complete subtree of `2^level` leaves starting at
    /// `index * 2^level`, if all its leaves are in the tree.
    pub fn complete(&self, level: u32, index: u64) -> Option<Hash> {
        let index = usize::try_from(index).ok()?;
        self.levels.get(level as usize)?.get(index).copied()
    }

    /// `len` consecutive complete subtree hashes at `level`, from `start`.
    pub fn hashes(&self, level: u32, start: u64, len: u64) -> Option<&[Hash]> {
        let start = usize::try_from(start).ok()?;
        let end = start.checked_add(usize::try_from(len).ok()?)?;
        self.levels.get(level as usize)?.get(start..end)
    }

    /// The number of complete subtrees of `2^level` leaves.
    pub fn complete_count(&self, level: u32) -> u64 {
        self.levels
            .get(level as usize)
            .map_or(0, |l| l.len() as u64)
    }

    /// MTH(D[lo:hi]) for a range on the RFC 9162 recursion (`lo` aligned to
    /// the largest power of two not above `hi - lo`), `hi <= size`.
    fn range_hash(&self, lo: u64, hi: u64) -> Hash {
        let n = hi - lo;
        if n.is_power_of_two() && lo.is_multiple_of(n) {
            let level = n.trailing_zeros();
            if let Some(h) = self.complete(level, lo >> level) {
                return h;
            }
        }
        let k = split_point(n);
        node_hash(&self.range_hash(lo, lo + k), &self.range_hash(lo + k, hi))
    }

    /// The root of the tree of the first `size` leaves.
    pub fn root_at(&self, size: u64) -> Result<Hash, ProofError> {
        self.check_size(size)?;
        if size == 0 {
            return Ok(empty_root());
        }
        Ok(self.range_hash(0, size))
    }

    /// The root of the whole tree.
    pub fn root(&self) -> Hash {
        let size = self.size();
        if size == 0 {
            empty_root()
        } else {
            self.range_hash(0, size)
        }
    }

    fn check_size(&self, size: u64) -> Result<(), ProofError> {
        if size > self.size() {
            return Err(ProofError::TreeTooSmall {
                have: self.size(),
                want: size,
            });
        }
        Ok(())
    }

    /// The RFC 9162 inclusion proof of leaf `index` in the tree of `size` leaves.
    pub fn inclusion_proof(&self, index: u64, size: u64) -> Result<Vec<Hash>, ProofError> {
        self.check_size(size)?;
        if index >= size {
            return Err(ProofError::IndexOutOfRange { index, size });
        }
        let mut proof = Vec::new();
        self.path(index, 0, size, &mut proof);
        Ok(proof)
    }

    fn path(&self, m: u64, lo: u64, hi: u64, out: &mut Vec<Hash>) {
        let n = hi - lo;
        if n == 1 {
            return;
        }
        let k = split_point(n);
        if m - lo < k {
            self.path(m, lo, lo + k, out);
            out.push(self.range_hash(lo + k, hi));
        } else {
            self.path(m, lo + k, hi, out);
            out.push(self.range_hash(lo, lo + k));
        }
    }

    /// The RFC 9162 consistency proof from the tree of `old` leaves to the
    /// tree of `new` leaves (empty when `old` is 0 or equals `new`).
    pub fn consistency_proof(&self, old: u64, new: u64) -> Result<Vec<Hash>, ProofError> {
        self.check_size(new)?;
        if old > new {
            return Err(ProofError::SizesReversed { old, new });
        }
        let mut proof = Vec::new();
        if old == 0 || old == new {
            return Ok(proof);
        }
        self.subproof(old, 0, new, true, &mut proof);
        Ok(proof)
    }

    fn subproof(&self, m: u64, lo: u64, hi: u64, complete: bool, out: &mut Vec<Hash>) {
        let n = hi - lo;
        if m == n {
            if !complete {
                out.push(self.range_hash(lo, hi));
            }
            return;
        }
        let k = split_point(n);
        if m <= k {
            self.subproof(m, lo, lo + k, complete, out);
            out.push(self.range_hash(lo + k, hi));
        } else {
            self.subproof(m - k, lo + k, hi, false, out);
            out.push(self.range_hash(lo, lo + k));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// MTH computed straight from the RFC definition, for comparison.
    fn reference_root(leaves: &[Hash]) -> Hash {
        match leaves.len() {
            0 => empty_root(),
            1 => leaves[0],
            n => {
                let k = split_point(n as u64) as usize;
                node_hash(&reference_root(&leaves[..k]), &reference_root(&leaves[k..]))
            }
        }
    }

    #[test]
    fn roots_match_the_rfc_definition_for_every_size_up_to_300() {
        let leaves: Vec<Hash> = (0u32..300).map(|i| leaf_hash(&i.to_be_bytes())).collect();
        let mut tree = Tree::new();
        for (i, l) in leaves.iter().enumerate() {
            tree.push(*l);
            assert_eq!(tree.root(), reference_root(&leaves[..=i]), "size {}", i + 1);
        }
        for size in 0..=300u64 {
            assert_eq!(
                tree.root_at(size).unwrap(),
                reference_root(&leaves[..size as usize])
            );
        }
        assert!(matches!(
            tree.root_at(301),
            Err(ProofError::TreeTooSmall { .. })
        ));
    }

    #[test]
    fn every_proof_of_a_small_tree_verifies_and_has_the_predicted_length() {
        let mut tree = Tree::new();
        for i in 0u32..70 {
            tree.push(leaf_hash(&i.to_le_bytes()));
        }
        for size in 1..=70u64 {
            let root = tree.root_at(size).unwrap();
            for index in 0..size {
                let proof = tree.inclusion_proof(index, size).unwrap();
                assert_eq!(proof.len(), inclusion_len(index, size));
                verify_inclusion(&tree.leaf(index).unwrap(), index, size, &proof, &root).unwrap();
            }
            for old in 0..=size {
                let proof = tree.consistency_proof(old, size).unwrap();
                if old > 0 && old < size {
                    assert_eq!(proof.len(), consistency_len(old, size));
                }
                let old_root = tree.root_at(old).unwrap();
                verify_consistency(old, size, &old_root, &root, &proof).unwrap();
            }
        }
    }

    #[test]
    fn consistency_with_equal_sizes_needs_equal_roots() {
        let a = leaf_hash(b"a");
        let b = leaf_hash(b"b");
        verify_consistency(1, 1, &a, &a, &[]).unwrap();
        assert_eq!(
            verify_consistency(1, 1, &a, &b, &[]),
            Err(ProofError::RootMismatch)
        );
        assert!(verify_consistency(2, 1, &a, &b, &[]).is_err());
    }
}
