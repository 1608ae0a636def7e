//! The payments state machine as a Raft group applies it: committed commands in, ledger records
//! and replies out, on every replica alike. The leader's worker puts the time and the new
//! payment id into each command; `apply` reads no clock and draws no randomness.

use bulkhead_cluster::raft::Machine;
use bulkhead_storage::{Batch, Record, Store, StoreError, Table};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use super::ledger::{self, PaymentRecord};
use super::protocol::PaymentReply;

/// The ledger: one record per order id (in each shard's own store).
pub const PAYMENTS: Table<Uuid, PaymentRecord> = Table::new(1, "payments");

/// A change to the ledger (replicated, versioned; append variants at the end only).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum PaymentCommand {
    Charge { order_id: Uuid, amount_cents: u64, token: String, now_ms: u64, new_id: Uuid },
    Refund { order_id: Uuid, now_ms: u64 },
}

impl Record for PaymentCommand {
    const VERSION: u8 = 1;
}

/// Applies [`PaymentCommand`]s with the pure rules of [`ledger`].
pub struct PaymentsMachine;

impl Machine for PaymentsMachine {
    type Command = PaymentCommand;
    type Reply = PaymentReply;

    fn apply(&self, store: &Store, batch: &mut Batch, cmd: PaymentCommand) -> Result<PaymentReply, StoreError> {
        match cmd {
            PaymentCommand::Charge { order_id, amount_cents, token, now_ms, new_id } => {
                let existing = PAYMENTS.get_through(store, batch, &order_id)?;
                let d = ledger::charge(existing.as_ref(), order_id, amount_cents, &token, now_ms, new_id);
                if let Some(rec) = &d.record {
                    PAYMENTS.put(batch, &order_id, rec);
                }
                Ok(d.reply)
            }
            PaymentCommand::Refund { order_id, now_ms } => {
                let existing = PAYMENTS.get_through(store, batch, &order_id)?;
                let (reply, rec) = ledger::refund(existing.as_ref(), order_id, now_ms);
                if let Some(rec) = &rec {
                    PAYMENTS.put(batch, &order_id, rec);
                }
                Ok(reply)
            }
        }
    }

    fn time_of(&self, cmd: &PaymentCommand) -> Option<u64> {
        match cmd {
            PaymentCommand::Charge { now_ms, .. } | PaymentCommand::Refund { now_ms, .. } => Some(*now_ms),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bulkhead_storage::StoreOptions;

    fn cmds() -> Vec<PaymentCommand> {
        let o = |n| Uuid::from_u128(n);
        vec![
            PaymentCommand::Charge {
                order_id: o(1),
                amount_cents: 5,
                token: "tok_ok".into(),
                now_ms: 1,
                new_id: o(91),
            },
            PaymentCommand::Charge {
                order_id: o(2),
                amount_cents: 7,
                token: "tok_error".into(),
                now_ms: 2,
                new_id: o(92),
            },
            PaymentCommand::Charge {
                order_id: o(2),
                amount_cents: 7,
                token: "tok_error".into(),
                now_ms: 3,
                new_id: o(93),
            },
            PaymentCommand::Charge {
                order_id: o(2),
                amount_cents: 7,
                token: "tok_error".into(),
                now_ms: 4,
                new_id: o(94),
            },
            PaymentCommand::Refund { order_id: o(3), now_ms: 5 },
            PaymentCommand::Charge {
                order_id: o(3),
                amount_cents: 9,
                token: "tok_ok".into(),
                now_ms: 6,
                new_id: o(95),
            },
            PaymentCommand::Charge {
                order_id: o(4),
                amount_cents: 9,
                token: "tok_slow".into(),
                now_ms: 7,
                new_id: o(96),
            },
            PaymentCommand::Charge {
                order_id: o(4),
                amount_cents: 9,
                token: "tok_slow".into(),
                now_ms: 9_000,
                new_id: o(97),
            },
            PaymentCommand::Refund { order_id: o(1), now_ms: 10_000 },
        ]
    }

    fn replay(dir: &std::path::Path, name: &str) -> (Vec<PaymentReply>, Vec<(Uuid, PaymentRecord)>) {
        let store = Store::open(dir, name, &StoreOptions::default()).unwrap();
        let mut replies = vec![];
        for c in cmds() {
            let mut b = Batch::new();
            replies.push(PaymentsMachine.apply(&store, &mut b, c).unwrap());
            store.apply(b).unwrap();
        }
        let records = PAYMENTS.iter(&store).collect::<Result<Vec<_>, _>>().unwrap();
        (replies, records)
    }

    /// The same log applied on two replicas gives the same replies and the same ledger.
    #[tokio::test]
    async fn replicas_replaying_one_log_agree() {
        let dir = tempfile::tempdir().unwrap();
        let a = replay(dir.path(), "a");
        let b = replay(dir.path(), "b");
        assert_eq!(a, b);
        let (replies, records) = a;
        assert!(matches!(replies[0], PaymentReply::Charged { .. }));
        assert!(matches!(replies[3], PaymentReply::Charged { .. }), "tok_error charges on the third try");
        assert!(matches!(replies[5], PaymentReply::Declined { .. }), "a voided order is never charged");
        assert_eq!(replies[6], PaymentReply::InProgress);
        assert!(matches!(replies[7], PaymentReply::Charged { .. }), "tok_slow is charged once ready");
        assert_eq!(replies[8], PaymentReply::Refunded);
        assert_eq!(records.len(), 4);
    }
}
