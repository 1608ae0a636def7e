//! A capability as the cluster layer sees it: an opaque [`CapabilityId`]. The cluster routes, keeps
//! breakers, names process groups and Raft groups by it, and knows nothing of what a capability
//! does; the layer above (the actors crate) defines the capabilities, their ids and their names.
//!
//! On the wire and on disk an id is one byte (`u8`): the same byte a fieldless enum's variant
//! index 0..=250 takes in bincode, so records written when capabilities were an enum here read
//! back unchanged. A name, where one is shown (logs, errors, metric labels, process-group names),
//! is the one given to [`CapabilityId::named`] in this process.

use std::fmt;
use std::sync::OnceLock;

use serde::{Deserialize, Serialize};

/// One capability, by the code the layer above gives it. Codes are fixed for good: they are
/// written into Raft groups' ids, node-log stream ids and every message that names a capability.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct CapabilityId(pub u8);

/// The name given to each code in this process (the first one given stays).
static NAMES: [OnceLock<&'static str>; 256] = [const { OnceLock::new() }; 256];

impl CapabilityId {
    /// The id `code`, named `name` in this process from now on (the first name a code is given
    /// stays; an id is shown as `capability-<code>` until it is named).
    pub fn named(code: u8, name: &'static str) -> CapabilityId {
        let _ = NAMES[usize::from(code)].set(name);
        CapabilityId(code)
    }

    /// The name given to this id in this process, if any.
    pub fn name(self) -> Option<&'static str> {
        NAMES[usize::from(self.0)].get().copied()
    }

    /// How this id is shown: its name, else `capability-<code>`.
    pub fn label(self) -> std::borrow::Cow<'static, str> {
        match self.name() {
            Some(name) => name.into(),
            None => format!("capability-{}", self.0).into(),
        }
    }
}

impl fmt::Display for CapabilityId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.name() {
            Some(name) => f.write_str(name),
            None => write!(f, "capability-{}", self.0),
        }
    }
}

impl fmt::Debug for CapabilityId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_id_is_one_byte_and_shows_its_name_once_named() {
        let config = bincode::config::standard();
        let bytes = bincode::serde::encode_to_vec(CapabilityId(4), config).unwrap();
        assert_eq!(bytes, [4]);
        assert_eq!(CapabilityId(250).to_string(), "capability-250");
        let id = CapabilityId::named(251, "alpha");
        assert_eq!((id.to_string(), CapabilityId(251).label().into_owned()), ("alpha".into(), "alpha".into()));
        CapabilityId::named(251, "beta");
        assert_eq!(CapabilityId(251).name(), Some("alpha"), "the first name stays");
    }
}
