//! The checked-in record fixtures: bytes of every version each record type has had, and the checks
//! that none is missing. Pure text and file reading, used by each crate's fixture test.
//!
//! Each crate keeps `tests/fixtures/records.txt`, one fixture a line:
//!
//! ```text
//! # comments say which commit's layout produced the bytes, and what value they hold
//! Heartbeat 2b 0202…
//! ```
//!
//! The label is the version (the record's first byte), then optionally a letter when one version
//! number shipped more than one layout (`2a`, `2b`), then optionally `/case` for more than one value
//! of the same layout. The crate's test decodes every line with today's decoder and compares the
//! value field by field; [`gaps`] says which (type, version) has no fixture, so a bumped
//! [`crate::Record::VERSION`] without one fails; [`record_impls`] lists the record types a crate
//! defines, so a new type without fixtures fails too.

use std::fmt::{self, Debug};
use std::path::Path;

use serde::Serialize;

use crate::record::{decode, encode, encode_payload, CodecError, Record};

/// One fixture line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fixture {
    pub type_name: String,
    /// `2`, `2b`, `1/vote`: what the crate's test matches on.
    pub label: String,
    pub version: u8,
    pub bytes: Vec<u8>,
    /// 1-based line in the file, for messages.
    pub line: usize,
}

/// A line that is not a fixture.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FixtureError {
    #[error("line {line}: expected `<Type> <label> <hex>`")]
    Shape { line: usize },
    #[error("line {line}: label `{label}` does not start with a version number")]
    Label { line: usize, label: String },
    #[error("line {line}: bad hex")]
    Hex { line: usize },
    #[error("line {line}: the bytes say version {found}, the label {label}")]
    VersionByte { line: usize, found: u8, label: u8 },
    #[error("line {line}: {type_name} {label} appears twice")]
    Duplicate { line: usize, type_name: String, label: String },
}

/// Reads a fixture file; blank lines and `#` comments are skipped.
pub fn parse(text: &str) -> Result<Vec<Fixture>, FixtureError> {
    let mut out: Vec<Fixture> = Vec::new();
    for (i, raw) in text.lines().enumerate() {
        let line = i + 1;
        let content = raw.trim();
        if content.is_empty() || content.starts_with('#') {
            continue;
        }
        let parts: Vec<&str> = content.split_whitespace().collect();
        let [type_name, label, hex] = parts[..] else { return Err(FixtureError::Shape { line }) };
        let digits: String = label.chars().take_while(char::is_ascii_digit).collect();
        let version: u8 = digits.parse().map_err(|_| FixtureError::Label { line, label: label.to_string() })?;
        let bytes = unhex(hex).ok_or(FixtureError::Hex { line })?;
        if bytes.first() != Some(&version) {
            return Err(FixtureError::VersionByte { line, found: bytes.first().copied().unwrap_or(0), label: version });
        }
        if out.iter().any(|f| f.type_name == type_name && f.label == label) {
            return Err(FixtureError::Duplicate { line, type_name: type_name.to_string(), label: label.to_string() });
        }
        out.push(Fixture { type_name: type_name.to_string(), label: label.to_string(), version, bytes, line });
    }
    Ok(out)
}

fn unhex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    (0..s.len()).step_by(2).map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok()).collect()
}

/// Lowercase hex, as the fixture files hold bytes.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Checks a fixture of the current layout of `T`: today's encoder writes exactly its bytes for
/// `expected`, and today's decoder reads them back as `expected` (compared field by field, through
/// `Debug`, so types without `PartialEq` are checked too). With `BULKHEAD_FIXTURES_PRINT` set it
/// prints the line instead (how a new fixture is made: add `<Type> <label> <version byte>`, run,
/// paste).
pub fn check_current<T: Record + Debug>(f: &Fixture, expected: &T) {
    assert_eq!(
        f.version,
        T::VERSION,
        "{} {} (line {}): {} is at version {} now: check this fixture with check_old (a copy of the old layout) \
         and add a fixture of the new version",
        f.type_name,
        f.label,
        f.line,
        f.type_name,
        T::VERSION
    );
    check(f, &encode(expected), expected);
}

/// Checks a fixture of an older layout: `old` (a copy of that layout's struct, filled with the same
/// value) encodes to exactly its bytes, and today's decoder reads them as `expected`.
pub fn check_old<Old: Serialize, T: Record + Debug>(f: &Fixture, old: &Old, expected: &T) {
    let mut made = vec![f.version];
    made.extend(encode_payload(old));
    check(f, &made, expected);
}

/// Checks a fixture of an older layout whose meaning is gone: `old` encodes to exactly its bytes,
/// and today's decoder refuses them with `expected`.
pub fn check_refused<Old: Serialize, T: Record + Debug>(f: &Fixture, old: &Old, expected: &CodecError) {
    let mut made = vec![f.version];
    made.extend(encode_payload(old));
    let what = format!("{} {} (line {})", f.type_name, f.label, f.line);
    if std::env::var_os("BULKHEAD_FIXTURES_PRINT").is_some() {
        eprintln!("{} {} {}", f.type_name, f.label, hex(&made));
        return;
    }
    assert_eq!(hex(&f.bytes), hex(&made), "{what}: the value no longer encodes to the checked-in bytes");
    match decode::<T>(&f.bytes) {
        Err(e) => assert_eq!(&e, expected, "{what}: refused for another reason"),
        Ok(v) => panic!("{what}: decoded as {v:?}, expected the refusal {expected}"),
    }
}

fn check<T: Record + Debug>(f: &Fixture, made: &[u8], expected: &T) {
    let what = format!("{} {} (line {})", f.type_name, f.label, f.line);
    if std::env::var_os("BULKHEAD_FIXTURES_PRINT").is_some() {
        eprintln!("{} {} {}", f.type_name, f.label, hex(made));
        return;
    }
    assert_eq!(hex(&f.bytes), hex(made), "{what}: the value no longer encodes to the checked-in bytes");
    let got = decode::<T>(&f.bytes).unwrap_or_else(|e| panic!("{what}: does not decode: {e}"));
    assert_eq!(format!("{got:#?}"), format!("{expected:#?}"), "{what}: decodes to another value");
}

/// Checks a crate's fixture file: it parses, every line passes `check_line` (which must match on
/// the type and label, and panic on one it does not know), no (type, version) of `types` lacks a
/// fixture, and `types` names every type `src_dir` implements `Record` for.
pub fn check_all(text: &str, types: &[(&str, u8)], src_dir: &Path, check_line: impl Fn(&Fixture)) {
    let fixtures = parse(text).unwrap_or_else(|e| panic!("tests/fixtures/records.txt: {e}"));
    for f in &fixtures {
        check_line(f);
    }
    // Print mode makes the lines to paste; it must never pass for a check.
    assert!(
        std::env::var_os("BULKHEAD_FIXTURES_PRINT").is_none(),
        "BULKHEAD_FIXTURES_PRINT is set: the fixtures above were printed, not checked"
    );
    let gaps: Vec<String> = gaps(&fixtures, types).iter().map(Gap::to_string).collect();
    assert!(gaps.is_empty(), "record fixtures missing:\n{}", gaps.join("\n"));
    let listed: Vec<&str> = types.iter().map(|(name, _)| *name).collect();
    let unlisted: Vec<String> = record_impls(src_dir)
        .unwrap_or_else(|e| panic!("reading {}: {e}", src_dir.display()))
        .into_iter()
        .filter(|name| !listed.contains(&name.as_str()))
        .collect();
    assert!(unlisted.is_empty(), "record types without fixtures (add them to the list and the file): {unlisted:?}");
}

/// What the fixtures lack against the record types a crate declares.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Gap {
    /// `VERSION` says the type has had this version, and no fixture holds it.
    Missing { type_name: String, version: u8 },
    /// A fixture of a type the crate's list does not name (renamed, or a typo).
    Unlisted { type_name: String, line: usize },
    /// A fixture above the type's `VERSION` (a version that was never released).
    Ahead { type_name: String, version: u8, line: usize },
}

impl fmt::Display for Gap {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Gap::Missing { type_name, version } => {
                write!(f, "{type_name} v{version} has no fixture in tests/fixtures/records.txt")
            }
            Gap::Unlisted { type_name, line } => {
                write!(f, "line {line}: {type_name} is not in the crate's list of records")
            }
            Gap::Ahead { type_name, version, line } => {
                write!(f, "line {line}: {type_name} v{version} is above its VERSION")
            }
        }
    }
}

/// Every (type, version) from 1 to the type's `VERSION` must have a fixture; every fixture must be of
/// a listed type and at most its `VERSION`.
pub fn gaps(fixtures: &[Fixture], types: &[(&str, u8)]) -> Vec<Gap> {
    let mut out = Vec::new();
    for &(name, current) in types {
        for version in 1..=current {
            if !fixtures.iter().any(|f| f.type_name == name && f.version == version) {
                out.push(Gap::Missing { type_name: name.to_string(), version });
            }
        }
    }
    for f in fixtures {
        match types.iter().find(|(name, _)| *name == f.type_name) {
            None => out.push(Gap::Unlisted { type_name: f.type_name.clone(), line: f.line }),
            Some(&(_, current)) if f.version > current => {
                out.push(Gap::Ahead { type_name: f.type_name.clone(), version: f.version, line: f.line })
            }
            Some(_) => {}
        }
    }
    out
}

/// The types a crate's sources implement `Record` for, outside test modules (a `mod` at the start
/// of a line right after `#[cfg(test)]`, up to its closing brace at the start of a line).
pub fn record_impls(src_dir: &Path) -> std::io::Result<Vec<String>> {
    let mut files = Vec::new();
    collect_rs(src_dir, &mut files)?;
    let mut out = Vec::new();
    for file in files {
        out.extend(impls_in(&std::fs::read_to_string(&file)?));
    }
    out.sort();
    Ok(out)
}

fn collect_rs(dir: &Path, out: &mut Vec<std::path::PathBuf>) -> std::io::Result<()> {
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        if path.is_dir() {
            collect_rs(&path, out)?;
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
    Ok(())
}

fn impls_in(src: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut in_test_mod = false;
    let mut after_cfg_test = false;
    for line in src.lines() {
        if in_test_mod {
            in_test_mod = line != "}";
            continue;
        }
        if after_cfg_test && line.starts_with("mod ") && !line.ends_with(';') {
            in_test_mod = true;
            after_cfg_test = false;
            continue;
        }
        after_cfg_test = line == "#[cfg(test)]";
        let Some(rest) = line.trim_start().strip_prefix("impl ") else { continue };
        let Some((trait_path, rest)) = rest.split_once(" for ") else { continue };
        if trait_path == "Record" || trait_path.ends_with("::Record") {
            let name: String = rest.chars().take_while(|c| c.is_alphanumeric() || *c == '_').collect();
            out.push(name);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_labels_and_checks_the_version_byte() {
        let text = "# comment\n\nA 1 0105\nA 2b 02\nA 2/x 02ff\n";
        let f = parse(text).unwrap();
        assert_eq!(f.len(), 3);
        assert_eq!((f[1].label.as_str(), f[1].version, f[1].line), ("2b", 2, 4));
        assert_eq!(f[2].bytes, vec![2, 0xff]);
        assert_eq!(parse("A 2 0105"), Err(FixtureError::VersionByte { line: 1, found: 1, label: 2 }));
        assert_eq!(parse("A x 01"), Err(FixtureError::Label { line: 1, label: "x".into() }));
        assert_eq!(parse("A 1 0g"), Err(FixtureError::Hex { line: 1 }));
        assert!(matches!(parse("A 1 01\nA 1 01"), Err(FixtureError::Duplicate { line: 2, .. })));
    }

    #[test]
    fn a_bumped_version_without_a_fixture_is_a_gap() {
        let f = parse("A 1 01\nB 1 01\nC 1 01").unwrap();
        let gaps = gaps(&f, &[("A", 2), ("B", 0)]);
        assert_eq!(
            gaps,
            vec![
                Gap::Missing { type_name: "A".into(), version: 2 },
                Gap::Ahead { type_name: "B".into(), version: 1, line: 2 },
                Gap::Unlisted { type_name: "C".into(), line: 3 },
            ]
        );
    }

    #[test]
    fn record_impls_skip_test_modules_only() {
        let src = "impl Record for A {\n}\nimpl crate::codec::Record for B {\n}\n#[cfg(test)]\nmod tests {\n    impl Record for T {}\n}\nimpl Record for C {\n}\n";
        assert_eq!(impls_in(src), vec!["A", "B", "C"]);
    }
}
