//! Every checked-in fixture of this crate's records (`tests/fixtures/records.txt`) decodes with
//! today's decoders into the value it was made from; no version of any record lacks one. Old
//! layouts are written with copies of their structs ([`crate::membership::old_heartbeat`],
//! [`crate::wire::WireReplyV1`], [`crate::raft::types::SnapshotRecordV1`]), so each fixture says
//! field by field what its bytes hold.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use bulkhead_codec::fixtures::{check_all, check_current, check_old, Fixture};
use bulkhead_codec::Record;
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse, VoteRequest,
    VoteResponse,
};
use openraft::{
    BasicNode, CommittedLeaderId, Entry, EntryPayload, LogId, Membership, SnapshotMeta, StoredMembership, Vote,
};

use crate::capability::CapabilityId;
use crate::membership::{old_heartbeat as old, Heartbeat};
use crate::raft::network::{LaneItem, RaftCall, RaftFrame, RaftRpc, RaftRpcReply};
use crate::raft::types::*;
use crate::senders::Sender;
use crate::wire::{Envelope, EnvelopeV1, Refusal, WireReply, WireReplyV1};

const TYPES: &[(&str, u8)] = &[
    ("Heartbeat", Heartbeat::VERSION),
    ("Envelope", Envelope::VERSION),
    ("WireReply", WireReply::VERSION),
    ("RaftRpc", RaftRpc::VERSION),
    ("RaftCall", RaftCall::VERSION),
    ("RaftFrame", RaftFrame::VERSION),
    ("RaftRpcReply", RaftRpcReply::VERSION),
    ("LogRecord", LogRecord::VERSION),
    ("VoteRecord", VoteRecord::VERSION),
    ("LogIdRecord", LogIdRecord::VERSION),
    ("AppliedState", AppliedState::VERSION),
    ("SnapshotPart", SnapshotPart::VERSION),
    ("SnapshotRecord", SnapshotRecord::VERSION),
    ("SnapshotBody", SnapshotBody::VERSION),
    ("Identity", Identity::VERSION),
    ("GroupTime", GroupTime::VERSION),
    ("CommandBatch", CommandBatch::VERSION),
    ("ReplyBatch", ReplyBatch::VERSION),
];

// The values every heartbeat fixture holds (the fields each layout has).
const NAME: &str = "n1";
const CLUSTER_ADDR: &str = "10.0.0.1:7001";
const HTTP_ADDR: &str = "10.0.0.1:8001";
const PID: u32 = 4242;
const INCARNATION: u64 = 1_764_547_200_000;
const SEQ: u64 = 17;
const SHARDS: u64 = 0x1122_3344_5566_7788;
const TIMING: u64 = 0x99aa_bbcc_ddee_ff00;

/// The ids the fixtures were written with, as the capabilities' enum variants 0 and 2 then.
fn caps() -> Vec<CapabilityId> {
    vec![CapabilityId(0), CapabilityId(2)]
}
fn unhealthy() -> Vec<CapabilityId> {
    vec![CapabilityId(2)]
}
fn peers() -> Vec<String> {
    vec!["10.0.0.2:7001".into()]
}
fn witness() -> Vec<String> {
    vec!["n3".into()]
}

/// The heartbeat an old layout decodes to: its fields, no binding, `timing` as given.
fn heartbeat(timing_fingerprint: u64, binding: Vec<u8>) -> Heartbeat {
    Heartbeat {
        name: NAME.into(),
        cluster_addr: CLUSTER_ADDR.into(),
        http_addr: HTTP_ADDR.into(),
        pid: PID,
        incarnation: INCARNATION,
        seq: SEQ,
        capabilities: caps(),
        unhealthy: unhealthy(),
        shard_fingerprint: SHARDS,
        timing_fingerprint,
        peers: peers(),
        binding,
    }
}

fn heartbeat_v1() -> old::V1 {
    old::V1 {
        name: NAME.into(),
        cluster_addr: CLUSTER_ADDR.into(),
        http_addr: HTTP_ADDR.into(),
        pid: PID,
        incarnation: INCARNATION,
        seq: SEQ,
        capabilities: caps(),
        unhealthy: unhealthy(),
        shard_fingerprint: SHARDS,
        peers: peers(),
    }
}

const GROUP: GroupId = GroupId { capability: CapabilityId(2), shard: 1 };
/// Member ids as `member_id` makes them: a node's hash above, its store's incarnation below.
const M1: u64 = 0x8a3f_0c21_0000_0007;
const M2: u64 = 0x1b2c_3d4e_0000_0003;

fn log_id(term: u64, index: u64) -> LogId<u64> {
    LogId::new(CommittedLeaderId::new(term, M1), index)
}
fn membership() -> Membership<u64, BasicNode> {
    let nodes = BTreeMap::from([(M1, BasicNode::new("n1")), (M2, BasicNode::new("n2"))]);
    Membership::new(vec![BTreeSet::from([M1, M2])], nodes)
}
fn snapshot_meta() -> SnapshotMeta<u64, BasicNode> {
    SnapshotMeta {
        last_log_id: Some(log_id(3, 40)),
        last_membership: StoredMembership::new(Some(log_id(2, 5)), membership()),
        snapshot_id: "3-40-7".into(),
    }
}
fn entries() -> Vec<Entry<TypeConfig>> {
    vec![
        Entry { log_id: log_id(3, 41), payload: EntryPayload::Blank },
        Entry { log_id: log_id(3, 42), payload: EntryPayload::Normal(Proposal(vec![1, 2, 3])) },
        Entry { log_id: log_id(3, 43), payload: EntryPayload::Membership(membership()) },
    ]
}
fn append() -> RaftRpc {
    RaftRpc::Append {
        group: GROUP,
        to: M2,
        req: AppendEntriesRequest {
            vote: Vote::new_committed(3, M1),
            prev_log_id: Some(log_id(3, 40)),
            entries: entries(),
            leader_commit: Some(log_id(3, 40)),
        },
    }
}

fn check(f: &Fixture) {
    match (f.type_name.as_str(), f.label.as_str()) {
        ("Heartbeat", "1") => check_old(f, &heartbeat_v1(), &heartbeat(0, vec![])),
        ("Heartbeat", "2a") => {
            let v1 = heartbeat_v1();
            let old = old::V2a {
                name: v1.name,
                cluster_addr: v1.cluster_addr,
                http_addr: v1.http_addr,
                pid: v1.pid,
                incarnation: v1.incarnation,
                seq: v1.seq,
                capabilities: v1.capabilities,
                unhealthy: v1.unhealthy,
                shard_fingerprint: v1.shard_fingerprint,
                peers: v1.peers,
                down: witness(),
            };
            check_old(f, &old, &heartbeat(0, vec![]))
        }
        ("Heartbeat", "2b") => {
            let v1 = heartbeat_v1();
            let old = old::V2b {
                name: v1.name,
                cluster_addr: v1.cluster_addr,
                http_addr: v1.http_addr,
                pid: v1.pid,
                incarnation: v1.incarnation,
                seq: v1.seq,
                capabilities: v1.capabilities,
                unhealthy: v1.unhealthy,
                shard_fingerprint: v1.shard_fingerprint,
                peers: v1.peers,
                down: witness(),
                owes: witness(),
            };
            check_old(f, &old, &heartbeat(0, vec![]))
        }
        // Version 3 as ca16541 sent it: version 1's layout under the number 3.
        ("Heartbeat", "3a") => check_old(f, &heartbeat_v1(), &heartbeat(0, vec![])),
        ("Heartbeat", "3b") => {
            let v1 = heartbeat_v1();
            let old = old::V3b {
                name: v1.name,
                cluster_addr: v1.cluster_addr,
                http_addr: v1.http_addr,
                pid: v1.pid,
                incarnation: v1.incarnation,
                seq: v1.seq,
                capabilities: v1.capabilities,
                unhealthy: v1.unhealthy,
                shard_fingerprint: v1.shard_fingerprint,
                timing_fingerprint: TIMING,
                peers: v1.peers,
            };
            check_old(f, &old, &heartbeat(TIMING, vec![]))
        }
        ("Heartbeat", "4") => check_current(f, &heartbeat(TIMING, vec![0xb1, 0x2d, 0x00, 0xff])),
        ("Envelope", "1") => check_old(
            f,
            &EnvelopeV1 {
                msg_id: 0x0192_d3c4_b5a6_7000_8000_0000_0000_0001,
                traceparent: "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01".into(),
                payload: vec![2, 0, 3, 1, 2, 3],
            },
            &Envelope {
                msg_id: 0x0192_d3c4_b5a6_7000_8000_0000_0000_0001,
                traceparent: "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01".into(),
                sender: None,
                payload: vec![2, 0, 3, 1, 2, 3],
            },
        ),
        ("Envelope", "2") => check_current(
            f,
            &Envelope {
                msg_id: 0x0192_d3c4_b5a6_7000_8000_0000_0000_0001,
                traceparent: "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01".into(),
                sender: Some(Sender { node: "n1".into(), binding: vec![0xb1, 0x2d] }),
                payload: vec![2, 0, 3, 1, 2, 3],
            },
        ),
        ("Envelope", "2/reply") => check_current(
            f,
            &Envelope { msg_id: 1, traceparent: String::new(), sender: None, payload: vec![2, 0, 2, 1, 9] },
        ),
        ("WireReply", "1/ok") => check_old(f, &WireReplyV1::Ok(vec![1, 9]), &WireReply::Ok(vec![1, 9])),
        ("WireReply", "1/lost") => check_old(
            f,
            &WireReplyV1::Rejected("lost: the orders worker did not answer in time".into()),
            &WireReply::Refused { kind: Refusal::Lost, reason: "the orders worker did not answer in time".into() },
        ),
        ("WireReply", "1/unavailable") => check_old(
            f,
            &WireReplyV1::Rejected("unavailable: the orders worker is restarting".into()),
            &WireReply::Refused { kind: Refusal::Busy, reason: "the orders worker is restarting".into() },
        ),
        ("WireReply", "1/rejected") => check_old(
            f,
            &WireReplyV1::Rejected("undecodable request: x".into()),
            &WireReply::Refused { kind: Refusal::Rejected, reason: "undecodable request: x".into() },
        ),
        ("WireReply", "2") => {
            check_current(f, &WireReply::Refused { kind: Refusal::Busy, reason: "shedding load".into() })
        }
        ("RaftRpc", "1/append") => check_current(f, &append()),
        ("RaftRpc", "1/vote") => check_current(
            f,
            &RaftRpc::Vote {
                group: GROUP,
                to: M1,
                req: VoteRequest { vote: Vote::new(4, M2), last_log_id: Some(log_id(3, 43)) },
            },
        ),
        ("RaftRpc", "1/snapshot") => check_current(
            f,
            &RaftRpc::Snapshot {
                group: GROUP,
                to: M2,
                req: InstallSnapshotRequest {
                    vote: Vote::new_committed(3, M1),
                    meta: snapshot_meta(),
                    offset: 8192,
                    data: vec![0xde, 0xad],
                    done: true,
                },
            },
        ),
        ("RaftRpc", "1/hello") => check_current(f, &RaftRpc::Hello { group: GROUP }),
        ("RaftRpc", "1/take-lead") => check_current(f, &RaftRpc::TakeLead { group: GROUP, to: M2 }),
        ("RaftCall", "1") => {
            check_current(f, &RaftCall { from: "n1".into(), binding: vec![0xb1, 0x2d, 0x00, 0xff], rpc: append() })
        }
        ("RaftFrame", "1") => check_current(
            f,
            &RaftFrame {
                from: "n1".into(),
                binding: vec![0xb1, 0x2d, 0x00, 0xff],
                items: vec![
                    LaneItem::Request { id: 7, rpc: bulkhead_codec::encode(&append()) },
                    LaneItem::Answer {
                        id: 9,
                        reply: RaftRpcReply::Append(AppendEntriesResponse::HigherVote(Vote::new(5, M2))),
                    },
                ],
            },
        ),
        ("RaftRpcReply", "1/append") => {
            check_current(f, &RaftRpcReply::Append(AppendEntriesResponse::HigherVote(Vote::new(5, M2))))
        }
        ("RaftRpcReply", "1/vote") => check_current(
            f,
            &RaftRpcReply::Vote(VoteResponse {
                vote: Vote::new(4, M2),
                vote_granted: true,
                last_log_id: Some(log_id(3, 43)),
            }),
        ),
        ("RaftRpcReply", "1/snapshot") => {
            check_current(f, &RaftRpcReply::Snapshot(InstallSnapshotResponse { vote: Vote::new_committed(3, M1) }))
        }
        ("RaftRpcReply", "1/hello") => check_current(f, &RaftRpcReply::Hello { member: M2, initialized: true }),
        ("RaftRpcReply", "1/no-such-member") => {
            check_current(f, &RaftRpcReply::NoSuchMember("group payments/1 is not hosted on n3".into()))
        }
        ("LogRecord", "1") => check_current(
            f,
            &LogRecord(Entry { log_id: log_id(3, 42), payload: EntryPayload::Normal(Proposal(vec![1, 2, 3])) }),
        ),
        ("LogRecord", "1/membership") => check_current(
            f,
            &LogRecord(Entry { log_id: log_id(2, 5), payload: EntryPayload::Membership(membership()) }),
        ),
        ("VoteRecord", "1") => check_current(f, &VoteRecord(Vote::new_committed(3, M1))),
        ("LogIdRecord", "1") => check_current(f, &LogIdRecord(Some(log_id(3, 40)))),
        ("LogIdRecord", "1/none") => check_current(f, &LogIdRecord(None)),
        ("AppliedState", "1") => check_current(
            f,
            &AppliedState {
                last_applied: Some(log_id(3, 43)),
                membership: StoredMembership::new(Some(log_id(2, 5)), membership()),
            },
        ),
        ("SnapshotPart", "1") => check_current(f, &SnapshotPart(vec![9, 8, 7])),
        ("SnapshotRecord", "1") => check_old(
            f,
            &SnapshotRecordV1 { meta: snapshot_meta(), data: vec![1, 2] },
            &SnapshotRecord { meta: snapshot_meta(), data: SnapshotData::Inline(vec![1, 2]) },
        ),
        ("SnapshotRecord", "2") => {
            // Version 3 only appended a variant: a version 2 payload is today's, as it is.
            let parts = SnapshotRecord { meta: snapshot_meta(), data: SnapshotData::Parts { generation: 6, parts: 3 } };
            check_old(f, &parts, &parts)
        }
        ("SnapshotRecord", "3") => check_current(
            f,
            &SnapshotRecord {
                meta: snapshot_meta(),
                data: SnapshotData::File { generation: 7, len: 1 << 20, crc32: 0xdead_beef },
            },
        ),
        ("SnapshotBody", "1") => {
            check_current(f, &SnapshotBody { records: vec![(vec![1, 0xa0], vec![1, 5]), (vec![0xef, 0], vec![1, 9])] })
        }
        ("Identity", "1") => check_current(
            f,
            &Identity { node: "n2".into(), group: GROUP, incarnation: 3, created_ms: 1_764_547_200_000 },
        ),
        ("GroupTime", "1") => check_current(f, &GroupTime(1_764_547_260_123)),
        ("CommandBatch", "1") => check_current(f, &CommandBatch { commands: vec![vec![1, 7], vec![], vec![2, 0xff]] }),
        ("ReplyBatch", "1") => check_current(f, &ReplyBatch { replies: vec![vec![1, 3], vec![1]] }),
        (t, l) => panic!("{t} {l} (line {}): no check for this fixture", f.line),
    }
}

#[test]
fn every_fixture_of_every_version_decodes() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    check_all(include_str!("../tests/fixtures/records.txt"), TYPES, &src, check);
}

/// A node from before `RaftCall` (6f39912) sends a bare `RaftRpc`, also version 1: today's router
/// refuses it as undecodable rather than reading it as a call (docs/operations.md, "Upgrading").
#[test]
fn a_bare_raft_rpc_is_not_read_as_a_raft_call() {
    let text = include_str!("../tests/fixtures/records.txt");
    let fixtures = bulkhead_codec::fixtures::parse(text).unwrap();
    let rpcs: Vec<&Fixture> = fixtures.iter().filter(|f| f.type_name == "RaftRpc").collect();
    assert!(!rpcs.is_empty());
    for f in rpcs {
        assert!(bulkhead_codec::decode::<RaftCall>(&f.bytes).is_err(), "RaftRpc {} read as a RaftCall", f.label);
    }
}
