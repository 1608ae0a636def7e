//! Small pieces every worker shares.

use bulkhead_storage::Store;
use ractor::RpcReplyPort;

/// Answers `reply` with `value` once the store has flushed every write applied so far: the
/// acknowledgement never overtakes the durability it promises. The worker does not wait: it goes on
/// with the next message while the flush runs (group commit batches them).
pub fn reply_after_sync<T: Send + 'static>(store: &Store, reply: RpcReplyPort<T>, value: T) {
    let capability = store.capability().to_string();
    store.after_sync(move |result| match result {
        Ok(()) => {
            let _ = reply.send(value);
        }
        // Dropping the port tells the caller "no answer": it retries, and every handler is idempotent.
        Err(e) => tracing::error!(%capability, error = %e, "flush failed; request left unanswered"),
    });
}

/// Exponential backoff with jitter: `base * 2^attempt`, capped, scaled by `jitter` in [0.5, 1.0].
pub fn backoff_ms(attempt: u32, base_ms: u64, cap_ms: u64, jitter: f64) -> u64 {
    let exp = base_ms.saturating_mul(1u64 << attempt.min(20));
    let capped = exp.min(cap_ms) as f64;
    (capped * jitter.clamp(0.5, 1.0)) as u64
}

/// A random jitter factor in [0.5, 1.0].
pub fn jitter() -> f64 {
    0.5 + rand::random::<f64>() / 2.0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_then_caps() {
        assert_eq!(backoff_ms(0, 100, 5_000, 1.0), 100);
        assert_eq!(backoff_ms(3, 100, 5_000, 1.0), 800);
        assert_eq!(backoff_ms(30, 100, 5_000, 1.0), 5_000);
        assert_eq!(backoff_ms(30, 100, 5_000, 0.5), 2_500);
        assert_eq!(backoff_ms(0, 100, 5_000, 7.0), 100);
    }
}
