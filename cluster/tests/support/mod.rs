//! What the cluster tests and the call benchmark share: the `Ping`/`Pong` records they send, a
//! worker that answers at once, and an in-memory stream ractor_cluster accepts as a link between
//! two nodes. Not every includer uses every item.
#![allow(dead_code)]

use bulkhead_cluster::Inbound;
use bulkhead_codec::Record;
use serde::{Deserialize, Serialize};

#[derive(Debug, Serialize, Deserialize)]
pub struct Ping(pub u32);
impl Record for Ping {
    const VERSION: u8 = 1;
}
#[derive(Debug, PartialEq, Serialize, Deserialize)]
pub struct Pong(pub u32);
impl Record for Pong {
    const VERSION: u8 = 1;
}
use ractor::{Actor, ActorProcessingErr, ActorRef};
use ractor_cluster::{BoxRead, BoxWrite, ClusterBidiStream, RactorMessage};
use tokio::io::DuplexStream;

#[derive(RactorMessage)]
pub enum EchoMsg<Req: Send + 'static, Resp: Send + 'static> {
    Req(Inbound<Req, Resp>),
}

/// A worker that answers every request at once with `answer(&req)`: what is left to measure or
/// test is the path itself.
pub struct Echo<Req, Resp> {
    pub answer: fn(&Req) -> Resp,
}

impl<Req: Send + Sync + 'static, Resp: Send + Sync + 'static> Actor for Echo<Req, Resp> {
    type Msg = EchoMsg<Req, Resp>;
    type State = ();
    type Arguments = ();
    async fn pre_start(&self, _: ActorRef<Self::Msg>, _: ()) -> Result<(), ActorProcessingErr> {
        Ok(())
    }
    async fn handle(&self, _: ActorRef<Self::Msg>, msg: Self::Msg, _: &mut ()) -> Result<(), ActorProcessingErr> {
        let EchoMsg::Req(Inbound { req, reply, .. }) = msg;
        let _ = reply.send((self.answer)(&req));
        Ok(())
    }
}

/// One end of an in-memory link, as ractor_cluster's external stream.
pub struct Duplex(pub DuplexStream);

impl ClusterBidiStream for Duplex {
    fn split(self: Box<Self>) -> (BoxRead, BoxWrite) {
        let (r, w) = tokio::io::split(self.0);
        (Box::new(r), Box::new(w))
    }
}

impl bulkhead_cluster::SentBy for Ping {
    fn sent_by(&self) -> bulkhead_cluster::Role {
        bulkhead_cluster::Role::AnyMember
    }
}

/// The sender check for bare ractor_cluster nodes joined without Bulkhead's links (there is no
/// link binding to prove a name): believes any name in `members`. The check itself is tested in
/// `src/senders.rs`, and across real links in `tests/cluster_security.rs` at the top of the repo.
pub struct NamedMembers(pub &'static [&'static str]);

impl bulkhead_cluster::senders::Peers for NamedMembers {
    fn vouches_for(&self, node: &str, _binding: &[u8]) -> bool {
        self.0.contains(&node)
    }
    fn in_map(&self, node: &str) -> bool {
        self.0.contains(&node)
    }
    fn hosts(&self, node: &str, _cap: bulkhead_cluster::CapabilityId) -> bool {
        self.0.contains(&node)
    }
    fn me(&self) -> &str {
        self.0.last().copied().unwrap_or_default()
    }
}

/// `node` as the sender of a request from a bare node.
pub fn sender(node: &str) -> bulkhead_cluster::senders::Sender {
    bulkhead_cluster::senders::Sender { node: node.into(), binding: Vec::new() }
}
