//! Property tests for the decoders of untrusted bytes: they never panic,
//! accept only canonical input, and round-trip what we produce.

use nitrile_tlog::{
    Checkpoint, NoteSigner, NoteVerifier, SignedNote, TilePath, cosignatures, decode_bundle,
    encode_bundle, open_checkpoint,
};
use proptest::prelude::*;
use proptest::test_runner::FileFailurePersistence;

proptest! {
    #![proptest_config(ProptestConfig {
        cases: 512,
        failure_persistence: Some(Box::new(FileFailurePersistence::Direct("tests/parsers_prop.regressions"))),
        ..ProptestConfig::default()
    })]

    #[test]
    fn tile_paths_round_trip(level in 0u8..64, index in any::<u64>(), width in 1u16..=256, entries in any::<bool>()) {
        let p = if entries { TilePath::entries(index, width) } else { TilePath::hashes(level, index, width) };
        prop_assert_eq!(TilePath::parse(&p.to_string()).unwrap(), p);
    }

    #[test]
    fn tile_path_parser_accepts_only_canonical_paths(s in "tile/(entries|[0-9]{1,3})/(x[0-9]{1,4}/){0,3}[0-9]{1,4}(\\.p/[0-9]{1,4})?") {
        if let Ok(p) = TilePath::parse(&s) {
            prop_assert_eq!(p.to_string(), s);
        }
    }

    #[test]
    fn bundles_round_trip_and_random_bytes_never_panic(
        entries in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..300), 0..40),
        noise in proptest::collection::vec(any::<u8>(), 0..2000),
    ) {
        let b = encode_bundle(&entries).unwrap();
        prop_assert_eq!(decode_bundle(&b, entries.len() as u64).unwrap(), entries.clone());
        if !b.is_empty() {
            prop_assert!(decode_bundle(&b[..b.len() - 1], entries.len() as u64).is_err());
        }
        let _ = decode_bundle(&noise, 3);
    }

    #[test]
    fn notes_from_random_text_never_verify_or_panic(text in "(\\PC|\n){0,400}", vkey in "[a-z.+/=A-Z0-9]{0,80}") {
        let v = NoteSigner::generate("local.nitrile/log").unwrap().verifier();
        prop_assert!(open_checkpoint(&text, "local.nitrile/log", &v).is_err());
        prop_assert!(cosignatures(&text, &[v]).is_empty());
        let _ = NoteVerifier::from_vkey(&vkey);
        let _ = NoteSigner::from_skey(&vkey);
    }

    #[test]
    fn checkpoints_round_trip_and_any_changed_byte_fails(
        size in 0u64..(1 << 62), root in any::<[u8; 32]>(), pos in any::<usize>(), xor in 1u8..=255,
    ) {
        let k = NoteSigner::generate("local.nitrile/log").unwrap();
        let cp = Checkpoint { origin: "local.nitrile/log".into(), size, root };
        let note = SignedNote::sign(&cp.body(), &k, 0).unwrap();
        prop_assert_eq!(open_checkpoint(&note.text, "local.nitrile/log", &k.verifier()).unwrap(), cp);
        let mut bytes = note.text.clone().into_bytes();
        let at = pos % bytes.len();
        bytes[at] ^= xor;
        if let Ok(changed) = String::from_utf8(bytes) {
            prop_assert!(open_checkpoint(&changed, "local.nitrile/log", &k.verifier()).is_err());
        }
    }
}
