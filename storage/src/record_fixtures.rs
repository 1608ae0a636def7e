//! Every checked-in fixture of this crate's records (`tests/fixtures/records.txt`) decodes with
//! today's decoders into the value it was made from; no version of any record lacks one.

use std::path::Path;

use crate::fixtures::{check_all, check_current, check_old, Fixture};
use crate::idempotency::{IdemKeyRef, IdemRecordV1};
use crate::store::Intent;
use crate::{BodyHash, IdemRecord, Record};

const TYPES: &[(&str, u8)] =
    &[("IdemRecord", IdemRecord::VERSION), ("IdemKeyRef", IdemKeyRef::VERSION), ("Intent", Intent::VERSION)];

fn check(f: &Fixture) {
    match (f.type_name.as_str(), f.label.as_str()) {
        ("IdemRecord", "1") => check_old(
            f,
            &IdemRecordV1 { body_hash: 0x0123_4567_89ab_cdef, result: vec![7, 8, 9], created_ms: 1_764_547_200_000 },
            &IdemRecord {
                body: BodyHash::Fnv64(0x0123_4567_89ab_cdef),
                result: vec![7, 8, 9],
                created_ms: 1_764_547_200_000,
            },
        ),
        ("IdemRecord", "2") => check_current(
            f,
            &IdemRecord { body: BodyHash::Sha256([0xab; 32]), result: vec![7, 8, 9], created_ms: 1_764_547_200_000 },
        ),
        ("IdemRecord", "2/fnv") => check_current(
            f,
            &IdemRecord {
                body: BodyHash::Fnv64(0x0123_4567_89ab_cdef),
                result: vec![7, 8, 9],
                created_ms: 1_764_547_200_000,
            },
        ),
        ("IdemKeyRef", "1") => check_current(f, &IdemKeyRef("key-1".into())),
        ("Intent", "1") => {
            check_current(f, &Intent { ops: vec![(vec![1, 0xa0], Some(vec![2, 3])), (vec![1, 0xa1], None)] })
        }
        (t, l) => panic!("{t} {l} (line {}): no check for this fixture", f.line),
    }
}

#[test]
fn every_fixture_of_every_version_decodes() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    check_all(include_str!("../tests/fixtures/records.txt"), TYPES, &src, check);
}
