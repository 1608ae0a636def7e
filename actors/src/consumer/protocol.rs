//! Events and requests for the asynchronous consumers (remote, versioned).

use bulkhead_storage::Record;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::inventory::PricedLine;

/// Published by orders (through its outbox) when an order is confirmed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OrderConfirmed {
    pub event_id: Uuid,
    pub order_id: Uuid,
    pub customer_id: String,
    pub lines: Vec<PricedLine>,
    pub total_cents: u64,
    pub payment_id: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ConsumerRequest {
    Deliver(OrderConfirmed),
    List {
        order_id: Uuid,
    },
    InjectPanic,
    /// Several events for one shard, as the outbox relay batches them: answered
    /// [`ConsumerReply::Each`], one reply per event in order. Each event is still its own
    /// command (deduped by its event id); the shard's proposer puts them in as few entries as it
    /// can. A batch that spans shards is refused whole (the sender delivers one by one).
    DeliverMany(Vec<OrderConfirmed>),
}

/// Confirmed orders are delivered by the orders outbox, on a node that hosts orders; listings come
/// from the front of any node, a drill only from the node itself.
impl bulkhead_cluster::SentBy for ConsumerRequest {
    fn sent_by(&self) -> bulkhead_cluster::Role {
        use crate::capability::Capability;
        use bulkhead_cluster::Role;
        match self {
            Self::Deliver(_) | Self::DeliverMany(_) => Role::hosts(Capability::Orders),
            Self::List { .. } => Role::AnyMember,
            Self::InjectPanic => Role::Itself,
        }
    }
}

/// A shipment or a notification, as the API lists it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Delivery {
    pub id: String,
    pub order_id: Uuid,
    pub event_id: Uuid,
    pub kind: String,
    pub detail: String,
    pub created_ms: u64,
}

impl Record for Delivery {
    const VERSION: u8 = 1;
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ConsumerReply {
    /// Accepted; `duplicate` when this event id was seen before (nothing new recorded).
    Accepted {
        duplicate: bool,
    },
    Listed(Vec<Delivery>),
    Refused(String),
    /// This replica does not lead the order's shard; `leader` is the one it knows, if any.
    NotLeader {
        leader: Option<String>,
    },
    /// Could not be served right now (no majority answered in time); try again later.
    Unavailable(String),
    /// The answers to a [`ConsumerRequest::DeliverMany`], one per event, in its order.
    Each(Vec<ConsumerReply>),
}

impl bulkhead_cluster::LeaderReply for ConsumerReply {
    fn not_leader(&self) -> Option<Option<String>> {
        match self {
            ConsumerReply::NotLeader { leader } => Some(leader.clone()),
            _ => None,
        }
    }
}

impl Record for ConsumerRequest {
    const VERSION: u8 = 1;
}
impl Record for ConsumerReply {
    const VERSION: u8 = 1;
}
