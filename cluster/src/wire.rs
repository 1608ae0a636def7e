//! The wire envelope: what every cross-node payload travels in.
//!
//! ractor_cluster decodes a message's fields with `BytesConvertable::from_bytes`, which cannot fail:
//! a payload that does not decode would be dropped silently. So the one remotable message type,
//! [`WireMsg`], carries plain bytes, and *we* decode them: an [`Envelope`] (version byte, message id,
//! W3C traceparent, the sender of a request, payload) whose payload is a capability's versioned request. Anything that does
//! not decode is counted in [`WIRE_STATS`] and logged at warn, and a call gets a `Refused` answer.
//!
//! The variant names of [`WireMsg`] are ractor_cluster's wire tags: never rename them.

use std::sync::atomic::{AtomicU64, Ordering};

use bulkhead_codec::{decode_payload, decode_wire, encode, unknown_version, CodecError, Record};
use ractor::RpcReplyPort;
use ractor_cluster::RactorClusterMessage;
use serde::{Deserialize, Serialize};

use crate::senders::Sender;

/// The only message type any remotable Bulkhead actor accepts.
#[derive(RactorClusterMessage)]
pub enum WireMsg {
    /// Fire-and-forget: an encoded [`Envelope`].
    Tell(Vec<u8>),
    /// Request/response: an encoded [`Envelope`]; the answer is an encoded envelope holding a [`WireReply`].
    #[rpc]
    Ask(Vec<u8>, RpcReplyPort<Vec<u8>>),
}

/// Version of the envelope layout itself (the first byte on the wire).
pub const ENVELOPE_VERSION: u8 = 2;

/// Envelope around every cross-node payload.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Envelope {
    /// Unique per message; logged on both sides.
    pub msg_id: u128,
    /// W3C trace context of the caller (`00-<trace>-<span>-01`), so one order can be followed across nodes.
    pub traceparent: String,
    /// Who sent a request, with the binding of the link it went over ([`crate::senders`]); `None`
    /// on replies and heartbeats (which carry their own proof).
    pub sender: Option<Sender>,
    /// The capability's own versioned record (request, reply or event).
    pub payload: Vec<u8>,
}

impl Record for Envelope {
    /// 2: `sender` (version 1 had none; it reads as `None`, and a gateway refuses such a request).
    const VERSION: u8 = ENVELOPE_VERSION;

    fn upgrade(version: u8, payload: &[u8]) -> Result<Self, CodecError> {
        match version {
            1 => decode_payload::<EnvelopeV1>(payload).map(Into::into),
            2 => decode_payload(payload),
            v => Err(unknown_version::<Self>(v)),
        }
    }
}

/// [`Envelope`] version 1 (2c05dbb until vouched senders).
#[derive(Debug, Serialize, Deserialize)]
pub(crate) struct EnvelopeV1 {
    pub msg_id: u128,
    pub traceparent: String,
    pub payload: Vec<u8>,
}

impl From<EnvelopeV1> for Envelope {
    fn from(old: EnvelopeV1) -> Self {
        Self { msg_id: old.msg_id, traceparent: old.traceparent, sender: None, payload: old.payload }
    }
}

/// The answer to an `Ask`: the handler's reply, or why the request was refused.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum WireReply {
    Ok(Vec<u8>),
    /// Not answered by the handler: `kind` says what the caller may conclude, `reason` is for people.
    Refused {
        kind: Refusal,
        reason: String,
    },
}

/// What a refusal means for the request: the caller decides retry or give up on this, never on
/// the text of the reason.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Refusal {
    /// Refused before it reached the worker (restarting, stopping, shedding load): not applied.
    Busy,
    /// Handed to the worker, which stopped or did not answer in time: it may have been applied.
    Lost,
    /// The member will not handle this request (it does not decode, or is not for it).
    Rejected,
}

impl Record for WireReply {
    /// 2: `Refused` with a typed kind replaced `Rejected(String)` with a text prefix (29ed679).
    const VERSION: u8 = 2;

    fn upgrade(version: u8, payload: &[u8]) -> Result<Self, CodecError> {
        match version {
            1 => decode_payload::<WireReplyV1>(payload).map(Into::into),
            2 => decode_payload(payload),
            v => Err(unknown_version::<Self>(v)),
        }
    }
}

/// [`WireReply`] version 1: the kind of a refusal was a prefix of its text.
#[derive(Debug, Serialize, Deserialize)]
pub(crate) enum WireReplyV1 {
    Ok(Vec<u8>),
    Rejected(String),
}

impl From<WireReplyV1> for WireReply {
    fn from(old: WireReplyV1) -> Self {
        match old {
            WireReplyV1::Ok(bytes) => WireReply::Ok(bytes),
            WireReplyV1::Rejected(text) => {
                // The prefixes version 1's gateway wrote (`gateway::LOST`, `gateway::UNAVAILABLE`).
                let (kind, reason) = if let Some(r) = text.strip_prefix("lost: ") {
                    (Refusal::Lost, r.to_string())
                } else if let Some(r) = text.strip_prefix("unavailable: ") {
                    (Refusal::Busy, r.to_string())
                } else {
                    (Refusal::Rejected, text)
                };
                WireReply::Refused { kind, reason }
            }
        }
    }
}

/// Counters of what arrived and could not be understood.
#[derive(Debug, Default)]
pub struct WireStats {
    pub undecodable_envelopes: AtomicU64,
    pub undecodable_payloads: AtomicU64,
    pub sent: AtomicU64,
    pub received: AtomicU64,
}

pub static WIRE_STATS: WireStats = WireStats {
    undecodable_envelopes: AtomicU64::new(0),
    undecodable_payloads: AtomicU64::new(0),
    sent: AtomicU64::new(0),
    received: AtomicU64::new(0),
};

/// Wraps a payload record in an envelope that names no sender (a reply, a heartbeat), ready for `WireMsg`.
pub fn seal<T: Record>(payload: &T, traceparent: &str) -> Vec<u8> {
    seal_from(payload, traceparent, None)
}

/// Wraps a request in an envelope that names its sender.
pub fn seal_from<T: Record>(payload: &T, traceparent: &str, sender: Option<Sender>) -> Vec<u8> {
    WIRE_STATS.sent.fetch_add(1, Ordering::Relaxed);
    encode(&Envelope {
        msg_id: uuid::Uuid::new_v4().as_u128(),
        traceparent: traceparent.to_string(),
        sender,
        payload: encode(payload),
    })
}

/// Opens an envelope and decodes its payload; counts and logs anything it cannot read.
pub fn open<T: Record>(bytes: &[u8], what: &str) -> Result<(Envelope, T), CodecError> {
    WIRE_STATS.received.fetch_add(1, Ordering::Relaxed);
    let env: Envelope = decode_wire(bytes).inspect_err(|e| {
        WIRE_STATS.undecodable_envelopes.fetch_add(1, Ordering::Relaxed);
        tracing::warn!(what, error = %e, len = bytes.len(), "undecodable cluster envelope dropped");
    })?;
    let payload = decode_wire(&env.payload).inspect_err(|e| {
        WIRE_STATS.undecodable_payloads.fetch_add(1, Ordering::Relaxed);
        tracing::warn!(what, msg_id = %uuid::Uuid::from_u128(env.msg_id), traceparent = %env.traceparent,
            error = %e, "undecodable cluster payload dropped");
    })?;
    Ok((env, payload))
}

// Trace context lives in `crate::trace`; these names stay here for the call sites that seal.
pub use crate::trace::{child_traceparent, new_traceparent, trace_id};

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, PartialEq, Serialize, Deserialize)]
    struct Ping(u32);
    impl Record for Ping {
        const VERSION: u8 = 1;
    }

    #[test]
    fn round_trip_keeps_trace() {
        let tp = new_traceparent();
        let bytes = seal(&Ping(7), &tp);
        let (env, p): (Envelope, Ping) = open(&bytes, "test").unwrap();
        assert_eq!(p, Ping(7));
        assert_eq!(env.traceparent, tp);
        assert_eq!(trace_id(&child_traceparent(&tp)), trace_id(&tp));
    }

    #[test]
    fn garbage_is_counted_not_silent() {
        let before = WIRE_STATS.undecodable_envelopes.load(Ordering::Relaxed);
        assert!(open::<Ping>(&[0xde, 0xad, 0xbe, 0xef], "test").is_err());
        assert!(open::<Ping>(&[], "test").is_err());
        assert_eq!(WIRE_STATS.undecodable_envelopes.load(Ordering::Relaxed), before + 2);

        let before = WIRE_STATS.undecodable_payloads.load(Ordering::Relaxed);
        let env = encode(&Envelope { msg_id: 1, traceparent: String::new(), sender: None, payload: vec![9, 9] });
        assert!(open::<Ping>(&env, "test").is_err());
        assert_eq!(WIRE_STATS.undecodable_payloads.load(Ordering::Relaxed), before + 1);
    }

    #[test]
    fn envelope_fixture_decodes() {
        // Checked-in bytes of an envelope v1 {msg_id: 1, traceparent: "t", payload: [1, 5]}.
        let fixture = [1u8, 1, 1, b't', 2, 1, 5];
        let env: Envelope = bulkhead_codec::decode(&fixture).unwrap();
        assert_eq!(env, Envelope { msg_id: 1, traceparent: "t".into(), sender: None, payload: vec![1, 5] });
    }

    #[test]
    fn reply_fixture_decodes() {
        // Checked-in bytes of a reply v2 Refused {kind: Lost, reason: "x"}.
        let fixture = [2u8, 1, 1, 1, b'x'];
        let reply: WireReply = bulkhead_codec::decode(&fixture).unwrap();
        assert_eq!(reply, WireReply::Refused { kind: Refusal::Lost, reason: "x".into() });
        assert_eq!(encode(&reply), fixture);
    }
}
