//! Every decoder of bytes that a peer (or anyone who reaches the cluster port) can send, fed
//! arbitrary bytes and crafted length prefixes: none panics, and none allocates more than
//! [`BOUND`] at once, whatever length a prefix claims.
//!
//! What bounds it: bincode allocates a string's claimed length before it reads the string, so
//! network bytes are decoded under a limit (`bulkhead_storage::decode_wire`, `WIRE_DECODE_LIMIT`,
//! 64 MiB: what a full 8 MiB frame can count) that refuses a larger claim before the allocation. Without it, a length prefix of 2^40 made a
//! node ask for a terabyte and abort; this test found that. Sequences decoded through serde
//! (`Vec<u8>` fields, lists) are preallocated at most 1 MiB whatever their prefix claims, and grow
//! only as their elements actually decode.
//!
//! Allocations are measured by a counting global allocator: the largest single request while a
//! decode runs. The test is one `#[test]` so no other test's allocations run beside it.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};

use bulkhead_actors::consumer::{ConsumerReply, ConsumerRequest};
use bulkhead_actors::inventory::{InventoryReply, InventoryRequest};
use bulkhead_actors::orders::{OrdersReply, OrdersRequest};
use bulkhead_actors::payments::{PaymentReply, PaymentRequest};
use bulkhead_cluster::membership::Heartbeat;
use bulkhead_cluster::raft::network::{RaftCall, RaftFrame};
use bulkhead_cluster::raft::types::{CommandBatch, Proposal, ReplyBatch};
use bulkhead_cluster::raft::{RaftRpc, RaftRpcReply};
use bulkhead_cluster::wire::{Envelope, WireReply};
use bulkhead_storage::{decode_wire, Record};
use proptest::prelude::*;

/// The largest single allocation any one decode may make: the codec's limit on what length
/// prefixes may claim, with room for the decoded value's own small allocations.
const BOUND: usize = bulkhead_storage::WIRE_DECODE_LIMIT + 64 * 1024;

struct Counting;

static LARGEST: AtomicUsize = AtomicUsize::new(0);

// SAFETY: every call is passed on to the system allocator unchanged; only sizes are recorded.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        LARGEST.fetch_max(layout.size(), Ordering::Relaxed);
        unsafe { System.alloc(layout) }
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        LARGEST.fetch_max(layout.size(), Ordering::Relaxed);
        unsafe { System.alloc_zeroed(layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        LARGEST.fetch_max(new_size, Ordering::Relaxed);
        unsafe { System.realloc(ptr, layout, new_size) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

/// A decoder of network bytes, by name.
type Decoder = (&'static str, fn(&[u8]) -> bool);

fn ok<T: Record>(bytes: &[u8]) -> bool {
    decode_wire::<T>(bytes).is_ok()
}

/// Every type that arrives from the network: the envelope and the replies to calls, Raft's
/// messages, the heartbeat, each capability's requests and replies, and the batches inside Raft
/// entries (a leader's bytes, applied by every follower).
fn decoders() -> Vec<Decoder> {
    vec![
        ("Envelope", ok::<Envelope>),
        ("WireReply", ok::<WireReply>),
        ("RaftCall", ok::<RaftCall>),
        ("RaftFrame", ok::<RaftFrame>),
        ("RaftRpc", ok::<RaftRpc>),
        ("RaftRpcReply", ok::<RaftRpcReply>),
        ("Heartbeat", ok::<Heartbeat>),
        ("OrdersRequest", ok::<OrdersRequest>),
        ("OrdersReply", ok::<OrdersReply>),
        ("InventoryRequest", ok::<InventoryRequest>),
        ("InventoryReply", ok::<InventoryReply>),
        ("PaymentRequest", ok::<PaymentRequest>),
        ("PaymentReply", ok::<PaymentReply>),
        ("ConsumerRequest", ok::<ConsumerRequest>),
        ("ConsumerReply", ok::<ConsumerReply>),
        ("CommandBatch", ok::<CommandBatch>),
        ("ReplyBatch", ok::<ReplyBatch>),
        ("Proposal::batch", |b| Proposal(b.to_vec()).batch().is_some_and(|r| r.is_ok())),
    ]
}

/// Runs `decoder` on `bytes`; the largest single allocation it made.
fn largest_allocation(decoder: &Decoder, bytes: &[u8]) -> usize {
    LARGEST.store(0, Ordering::Relaxed);
    let _ = std::hint::black_box((decoder.1)(std::hint::black_box(bytes)));
    LARGEST.load(Ordering::Relaxed)
}

/// Inputs made to hit a length prefix: a version byte, `skip` bytes of `fill` (to walk the prefix
/// across the fields before it), then a bincode varint claiming about `claim` elements or bytes,
/// then a little more.
fn crafted() -> Vec<Vec<u8>> {
    let claims: [&[u8]; 5] = [
        &[253, 0, 0, 0, 0, 0, 1, 0, 0],                         // 2^40, as a u64
        &[253, 255, 255, 255, 255, 255, 255, 255, 127],         // i64::MAX
        &[252, 0, 0, 0, 16],                                    // 2^28, as a u32
        &[254, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1], // 2^120, as a u128
        &[252, 0, 0, 0xF0, 3],                                  // 63 MiB: under the limit
    ];
    let mut out = Vec::new();
    for version in 0..=6u8 {
        for skip in 0..40 {
            for fill in [0u8, 1, 2] {
                for claim in claims {
                    let mut b = vec![version];
                    b.extend(std::iter::repeat_n(fill, skip));
                    b.extend_from_slice(claim);
                    b.extend_from_slice(&[1, 2, 3, 4, 5, 6, 7, 8]);
                    out.push(b);
                }
            }
        }
    }
    // A batch marker in front, for the proposal's batch decoder.
    let marked: Vec<Vec<u8>> = out.iter().map(|b| [&[0xB7][..], b].concat()).collect();
    out.extend(marked);
    out
}

#[test]
fn no_wire_decoder_panics_or_allocates_what_a_length_prefix_claims() {
    let decoders = decoders();
    let mut worst = (0usize, "", Vec::new());
    for input in crafted() {
        for d in &decoders {
            let got = largest_allocation(d, &input);
            if got > worst.0 {
                worst = (got, d.0, input.clone());
            }
        }
    }
    assert!(worst.0 <= BOUND, "{} allocated {} bytes at once for {:?}", worst.1, worst.0, worst.2);

    // Arbitrary bytes, and arbitrary bytes behind each version byte.
    let mut runner =
        proptest::test_runner::TestRunner::new(ProptestConfig { cases: 2_000, ..ProptestConfig::default() });
    let inputs = (0u8..8, proptest::collection::vec(any::<u8>(), 0..512));
    runner
        .run(&inputs, |(version, tail)| {
            let bytes = [&[version][..], &tail].concat();
            for d in &decoders {
                let got = largest_allocation(d, &bytes);
                prop_assert!(got <= BOUND, "{} allocated {} bytes at once for {:?}", d.0, got, bytes);
            }
            Ok(())
        })
        .unwrap();
}
