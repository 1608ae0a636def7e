//! The payments state machine: the simulated provider and the per-order ledger, no I/O.
//!
//! Tokens: `tok_decline` is declined; `tok_slow` is approved after 3 s; `tok_error` fails
//! transiently twice, then succeeds; anything else is approved. One record per order id makes
//! "at most one successful charge per order" true by construction: a repeated charge returns the
//! recorded outcome.

use bulkhead_storage::Record;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use super::protocol::{PaymentReply, PaymentView};

pub const SLOW_MS: u64 = 3_000;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ChargeStatus {
    /// The provider is working on it (tok_slow) until `ready_ms`.
    Processing {
        ready_ms: u64,
    },
    /// Failed transiently this many times so far.
    Failing,
    Charged,
    Declined,
    Refunded,
    /// Cancelled before any charge landed: a charge that arrives later is refused.
    Voided,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PaymentRecord {
    pub payment_id: String,
    pub order_id: Uuid,
    pub amount_cents: u64,
    pub token: String,
    pub status: ChargeStatus,
    pub attempts: u32,
    pub at_ms: u64,
}

impl Record for PaymentRecord {
    const VERSION: u8 = 1;
}

impl PaymentRecord {
    pub fn view(&self) -> PaymentView {
        let status = match self.status {
            ChargeStatus::Processing { .. } => "processing",
            ChargeStatus::Failing => "failing",
            ChargeStatus::Charged => "charged",
            ChargeStatus::Declined => "declined",
            ChargeStatus::Refunded => "refunded",
            ChargeStatus::Voided => "voided",
        };
        PaymentView {
            payment_id: self.payment_id.clone(),
            order_id: self.order_id,
            amount_cents: self.amount_cents,
            status: status.into(),
            attempts: self.attempts,
            at_ms: self.at_ms,
        }
    }
}

/// The outcome of a charge request: the reply, the record to store (if it changed), and when to
/// look again (for a slow charge).
#[derive(Debug, PartialEq, Eq)]
pub struct ChargeDecision {
    pub reply: PaymentReply,
    pub record: Option<PaymentRecord>,
    pub wake_at_ms: Option<u64>,
}

/// Decides a charge for `order_id` given what is recorded for it.
pub fn charge(
    existing: Option<&PaymentRecord>,
    order_id: Uuid,
    amount_cents: u64,
    token: &str,
    now_ms: u64,
    new_id: Uuid,
) -> ChargeDecision {
    let mut rec = match existing {
        Some(r) => match &r.status {
            ChargeStatus::Charged => return done(PaymentReply::Charged { payment_id: r.payment_id.clone() }, None),
            ChargeStatus::Declined => return done(PaymentReply::Declined { reason: "card declined".into() }, None),
            ChargeStatus::Refunded => return done(PaymentReply::Declined { reason: "refunded".into() }, None),
            ChargeStatus::Voided => return done(PaymentReply::Declined { reason: "order cancelled".into() }, None),
            ChargeStatus::Processing { ready_ms } if now_ms < *ready_ms => {
                return ChargeDecision { reply: PaymentReply::InProgress, record: None, wake_at_ms: Some(*ready_ms) };
            }
            ChargeStatus::Processing { .. } => {
                let mut r = r.clone();
                r.status = ChargeStatus::Charged;
                r.at_ms = now_ms;
                return done(PaymentReply::Charged { payment_id: r.payment_id.clone() }, Some(r));
            }
            ChargeStatus::Failing => r.clone(),
        },
        None => PaymentRecord {
            payment_id: format!("pay_{}", new_id.simple()),
            order_id,
            amount_cents,
            token: token.to_string(),
            status: ChargeStatus::Failing,
            attempts: 0,
            at_ms: now_ms,
        },
    };
    rec.attempts += 1;
    rec.at_ms = now_ms;
    match token {
        "tok_decline" => {
            rec.status = ChargeStatus::Declined;
            done(PaymentReply::Declined { reason: "card declined".into() }, Some(rec))
        }
        "tok_error" if rec.attempts <= 2 => {
            rec.status = ChargeStatus::Failing;
            done(
                PaymentReply::TransientError { reason: format!("provider error (attempt {})", rec.attempts) },
                Some(rec),
            )
        }
        "tok_slow" => {
            let ready = now_ms + SLOW_MS;
            rec.status = ChargeStatus::Processing { ready_ms: ready };
            ChargeDecision { reply: PaymentReply::InProgress, record: Some(rec), wake_at_ms: Some(ready) }
        }
        _ => {
            rec.status = ChargeStatus::Charged;
            done(PaymentReply::Charged { payment_id: rec.payment_id.clone() }, Some(rec))
        }
    }
}

fn done(reply: PaymentReply, record: Option<PaymentRecord>) -> ChargeDecision {
    ChargeDecision { reply, record, wake_at_ms: None }
}

/// Refunds a charged order. With no charge yet, voids the order instead, so that a charge still in
/// flight (it may arrive after this refund) is refused rather than taken.
pub fn refund(existing: Option<&PaymentRecord>, order_id: Uuid, now_ms: u64) -> (PaymentReply, Option<PaymentRecord>) {
    let void = |r: Option<&PaymentRecord>| PaymentRecord {
        payment_id: r.map(|r| r.payment_id.clone()).unwrap_or_default(),
        order_id,
        amount_cents: 0,
        token: r.map(|r| r.token.clone()).unwrap_or_default(),
        status: ChargeStatus::Voided,
        attempts: r.map(|r| r.attempts).unwrap_or(0),
        at_ms: now_ms,
    };
    match existing.map(|r| &r.status) {
        Some(ChargeStatus::Charged) => {
            let mut r = existing.cloned().expect("matched Some");
            r.status = ChargeStatus::Refunded;
            r.at_ms = now_ms;
            (PaymentReply::Refunded, Some(r))
        }
        Some(ChargeStatus::Refunded) => (PaymentReply::Refunded, None),
        Some(ChargeStatus::Declined | ChargeStatus::Voided) => (PaymentReply::NothingToRefund, None),
        // No charge has landed (none asked yet, still processing, or failing transiently): void the
        // order, so that a charge arriving or completing after this is refused, not taken.
        None | Some(ChargeStatus::Processing { .. } | ChargeStatus::Failing) => {
            (PaymentReply::NothingToRefund, Some(void(existing)))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(token: &str, times: usize) -> Vec<PaymentReply> {
        let mut rec: Option<PaymentRecord> = None;
        let mut out = vec![];
        for i in 0..times {
            let d =
                charge(rec.as_ref(), Uuid::from_u128(1), 500, token, i as u64 * 10, Uuid::from_u128(i as u128 + 100));
            if let Some(r) = d.record {
                rec = Some(r);
            }
            out.push(d.reply);
        }
        out
    }

    #[test]
    fn ok_charges_once_and_repeats_return_the_same_payment() {
        let r = run("tok_ok", 3);
        assert!(matches!(&r[0], PaymentReply::Charged { .. }));
        assert_eq!(r[0], r[1]);
        assert_eq!(r[1], r[2]);
    }

    #[test]
    fn decline_is_final() {
        let r = run("tok_decline", 2);
        assert!(r.iter().all(|x| matches!(x, PaymentReply::Declined { .. })));
    }

    #[test]
    fn error_fails_twice_then_succeeds() {
        let r = run("tok_error", 4);
        assert!(matches!(r[0], PaymentReply::TransientError { .. }));
        assert!(matches!(r[1], PaymentReply::TransientError { .. }));
        assert!(matches!(r[2], PaymentReply::Charged { .. }));
        assert_eq!(r[2], r[3]);
    }

    #[test]
    fn slow_is_in_progress_until_ready() {
        let o = Uuid::from_u128(1);
        let d = charge(None, o, 5, "tok_slow", 0, Uuid::from_u128(2));
        assert_eq!((d.reply, d.wake_at_ms), (PaymentReply::InProgress, Some(SLOW_MS)));
        let rec = d.record.unwrap();
        let d2 = charge(Some(&rec), o, 5, "tok_slow", SLOW_MS - 1, Uuid::from_u128(3));
        assert_eq!(d2.reply, PaymentReply::InProgress);
        let d3 = charge(Some(&rec), o, 5, "tok_slow", SLOW_MS, Uuid::from_u128(4));
        assert_eq!(d3.reply, PaymentReply::Charged { payment_id: rec.payment_id.clone() });
    }

    #[test]
    fn refund_only_what_was_charged() {
        let d = charge(None, Uuid::from_u128(1), 5, "tok_ok", 0, Uuid::from_u128(2));
        let rec = d.record.unwrap();
        let o = Uuid::from_u128(1);
        let (r, after) = refund(Some(&rec), o, 1);
        assert_eq!(r, PaymentReply::Refunded);
        assert_eq!(refund(after.as_ref(), o, 2).0, PaymentReply::Refunded);
        // A refund that overtakes its charge voids the order: the late charge is refused.
        let (r, void) = refund(None, o, 2);
        assert_eq!(r, PaymentReply::NothingToRefund);
        let late = charge(void.as_ref(), o, 5, "tok_ok", 3, Uuid::from_u128(9));
        assert!(matches!(late.reply, PaymentReply::Declined { .. }));
        assert_eq!(late.record, None);
        // Same for a slow charge still processing when the refund arrives: it never completes.
        let slow = charge(None, o, 5, "tok_slow", 0, Uuid::from_u128(10)).record;
        let (_, voided) = refund(slow.as_ref(), o, 1);
        let done = charge(voided.as_ref(), o, 5, "tok_slow", SLOW_MS + 1, Uuid::from_u128(11));
        assert!(matches!(done.reply, PaymentReply::Declined { .. }));
    }
}
