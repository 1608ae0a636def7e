//! systemd's notify protocol (`Type=notify`), through the `sd-notify` crate: `READY=1` the first
//! time the node is ready ([`bulkhead_http::ready`]), `STATUS=` lines as it starts and stops,
//! `STOPPING=1` when a drain begins, and `WATCHDOG=1` every half `WATCHDOG_USEC` while the node is
//! alive ([`alive`]). Without `NOTIFY_SOCKET` (not under systemd) every call is a no-op.
//!
//! What a watchdog ping proves: not only that a timer fires (any runtime thread could do that
//! while the rest is wedged), but that the actor system still delivers messages (the membership
//! actor handled a tick lately: it drives heartbeats and failure detection) and that the HTTP
//! front still serves (its actor stops when its server ends). A capability its supervisor gave up
//! on is not a reason: the node keeps serving the others (that is the point of bulkheads), and
//! `/readyz` reports it. During a drain the pings go on: the drain is bounded by itself and by
//! `TimeoutStopSec=`, and it stops those actors on purpose.

use std::time::Duration;

use sd_notify::NotifyState;

/// The notify socket and watchdog interval systemd gave this process, if any.
#[derive(Debug, Clone, Copy)]
pub struct Systemd {
    enabled: bool,
    watchdog: Option<Duration>,
}

impl Systemd {
    pub fn from_env() -> Self {
        Self { enabled: std::env::var_os("NOTIFY_SOCKET").is_some(), watchdog: sd_notify::watchdog_enabled() }
    }

    fn notify(&self, states: &[NotifyState]) {
        if !self.enabled {
            return;
        }
        if let Err(e) = sd_notify::notify(states) {
            tracing::warn!(error = %e, "cannot notify systemd");
        }
    }

    pub fn status(&self, status: &str) {
        self.notify(&[NotifyState::Status(status)]);
    }

    pub fn ready(&self) {
        self.notify(&[NotifyState::Ready, NotifyState::Status("ready")]);
    }

    pub fn stopping(&self) {
        self.notify(&[NotifyState::Stopping, NotifyState::Status("draining")]);
    }

    /// Sends `READY=1` once `ready` first says so (polled), and a `STATUS=` line whenever its
    /// answer changes (a lost shard after start shows in `systemctl status`). Ends with the process.
    pub fn spawn_ready_notifier(
        self,
        ready: impl Fn() -> Result<(), String> + Send + 'static,
    ) -> Option<tokio::task::JoinHandle<()>> {
        if !self.enabled {
            return None;
        }
        Some(tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(200));
            let (mut told_ready, mut last) = (false, None::<Result<(), String>>);
            loop {
                tick.tick().await;
                let now = ready();
                if last.as_ref() == Some(&now) {
                    continue;
                }
                match &now {
                    Ok(()) if !told_ready => {
                        told_ready = true;
                        tracing::info!("ready: telling systemd");
                        self.ready();
                    }
                    Ok(()) => self.status("ready"),
                    Err(why) if told_ready => self.status(&format!("degraded: {why}")),
                    Err(why) => self.status(&format!("starting: {why}")),
                }
                last = Some(now);
            }
        }))
    }

    /// Pings the watchdog every half `WATCHDOG_USEC` while `alive` says so; skips (and logs) a
    /// ping otherwise, so that systemd kills and restarts a wedged node.
    pub fn spawn_watchdog(
        self,
        alive: impl Fn() -> Result<(), String> + Send + 'static,
    ) -> Option<tokio::task::JoinHandle<()>> {
        let period = self.watchdog.filter(|_| self.enabled)? / 2;
        tracing::info!(every_ms = period.as_millis() as u64, "systemd watchdog on");
        Some(tokio::spawn(async move {
            let mut tick = tokio::time::interval(period);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                match alive() {
                    Ok(()) => self.notify(&[NotifyState::Watchdog]),
                    Err(why) => tracing::error!("watchdog: not pinging systemd: {why}"),
                }
            }
        }))
    }
}

/// What the watchdog judges.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LivenessFacts {
    pub draining: bool,
    /// Since the membership actor last handled a tick.
    pub membership_silent_for: Duration,
    /// The longest silence that is still healthy.
    pub membership_limit: Duration,
    /// The HTTP front's actor is running (it stops when its server ends).
    pub http_front: bool,
}

/// Whether the node is alive enough to ping the watchdog (see the module doc).
pub fn alive(f: &LivenessFacts) -> Result<(), String> {
    if f.draining {
        return Ok(());
    }
    if f.membership_silent_for > f.membership_limit {
        return Err(format!(
            "the membership actor has handled no tick for {} ms (limit {} ms)",
            f.membership_silent_for.as_millis(),
            f.membership_limit.as_millis()
        ));
    }
    if !f.http_front {
        return Err("the HTTP front has stopped".into());
    }
    Ok(())
}

/// The membership actor ticks a few times per heartbeat; this much silence is a stuck actor system.
pub fn membership_limit(heartbeat_ms: u64) -> Duration {
    Duration::from_millis(heartbeat_ms.saturating_mul(20).max(2_000))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fine() -> LivenessFacts {
        LivenessFacts {
            draining: false,
            membership_silent_for: Duration::from_millis(30),
            membership_limit: membership_limit(100),
            http_front: true,
        }
    }

    #[test]
    fn a_node_whose_actors_run_is_alive() {
        assert_eq!(alive(&fine()), Ok(()));
        assert_eq!(membership_limit(100), Duration::from_secs(2));
        assert_eq!(membership_limit(500), Duration::from_secs(10));
    }

    #[test]
    fn a_stuck_membership_actor_or_a_dead_front_stops_the_pings() {
        let stuck = LivenessFacts { membership_silent_for: Duration::from_secs(3), ..fine() };
        assert!(alive(&stuck).unwrap_err().contains("membership"));
        assert!(alive(&LivenessFacts { http_front: false, ..fine() }).unwrap_err().contains("HTTP"));
        // A drain stops both on purpose, within its own bound.
        assert_eq!(alive(&LivenessFacts { draining: true, http_front: false, ..stuck }), Ok(()));
    }
}
