//! The orders capability's settings (`[orders]` in the node's config file): the saga's own knobs.

use serde::{Deserialize, Serialize};

/// `[orders]`: the order saga's own settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct OrdersConfig {
    /// How long an order may hold stock without a definite charge: past it (in the shard's group
    /// time) the saga cancels the order, voids or refunds any charge that may have landed, and
    /// releases its holds, so an outage of payments keeps no stock from other buyers for longer.
    /// Every node should use the same value: the leader of the order's shard applies its own.
    pub reservation_window_ms: u64,
}

impl Default for OrdersConfig {
    fn default() -> Self {
        Self { reservation_window_ms: 15 * 60 * 1000 }
    }
}

impl OrdersConfig {
    pub fn validate(&self) -> Result<(), String> {
        if self.reservation_window_ms < 100 {
            return Err("orders.reservation_window_ms must be at least 100 (default 900000: 15 minutes)".into());
        }
        Ok(())
    }
}
