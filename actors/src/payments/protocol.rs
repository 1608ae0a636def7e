//! Payments' requests and replies (remote, versioned; append variants at the end only).

use bulkhead_storage::Record;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum PaymentRequest {
    /// Charge `amount_cents` for `order_id`; idempotent by order id: a repeat returns the first result.
    Charge {
        order_id: Uuid,
        amount_cents: u64,
        token: String,
    },
    /// Refund the order's charge, if any (compensation).
    Refund {
        order_id: Uuid,
    },
    /// The charges recorded for an order.
    List {
        order_id: Uuid,
    },
    InjectPanic,
}

/// Charges and refunds come from the orders saga and its outbox, on a node that hosts orders;
/// listings from the front of any node, a drill only from the node itself.
impl bulkhead_cluster::SentBy for PaymentRequest {
    fn sent_by(&self) -> bulkhead_cluster::Role {
        use crate::capability::Capability;
        use bulkhead_cluster::Role;
        match self {
            Self::Charge { .. } | Self::Refund { .. } => Role::hosts(Capability::Orders),
            Self::List { .. } => Role::AnyMember,
            Self::InjectPanic => Role::Itself,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum PaymentReply {
    Charged {
        payment_id: String,
    },
    Declined {
        reason: String,
    },
    /// The provider failed transiently; try again later with the same order id.
    TransientError {
        reason: String,
    },
    /// A charge for this order is still being processed by the provider.
    InProgress,
    Refunded,
    NothingToRefund,
    Payments(Vec<PaymentView>),
    Refused(String),
    /// This replica does not lead the order's shard; `leader` is the one it knows, if any.
    NotLeader {
        leader: Option<String>,
    },
}

impl bulkhead_cluster::LeaderReply for PaymentReply {
    fn not_leader(&self) -> Option<Option<String>> {
        match self {
            PaymentReply::NotLeader { leader } => Some(leader.clone()),
            _ => None,
        }
    }
}

/// One recorded charge, as the API lists it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PaymentView {
    pub payment_id: String,
    pub order_id: Uuid,
    pub amount_cents: u64,
    pub status: String,
    pub attempts: u32,
    pub at_ms: u64,
}

impl Record for PaymentRequest {
    const VERSION: u8 = 1;
}
impl Record for PaymentReply {
    const VERSION: u8 = 1;
}
