//! The one-for-one supervisor every capability runs under.
//!
//! ractor's default `handle_supervisor_evt` stops the supervisor when any child exits, and ractor has
//! no restart strategies; this is ours. A child that fails (panic or error) is restarted alone; more
//! than `max_restarts` failures within `window` is a crash loop: the supervisor escalates by stopping
//! the capability and marking it unhealthy in the cluster view (so peers stop routing to it) instead
//! of restarting forever. A child that stops cleanly (node shutdown) is not restarted. Restarts lose
//! no durable state: workers rebuild from their store in `pre_start`.

use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bulkhead_cluster::Cluster;
use ractor::{Actor, ActorCell, ActorId, ActorProcessingErr, ActorRef, SpawnErr, SupervisionEvent};
use ractor_cluster::RactorMessage;

use crate::capability::Capability;

type StartFn = dyn Fn(ActorCell) -> Pin<Box<dyn Future<Output = Result<ActorCell, SpawnErr>> + Send>> + Send + Sync;

/// How to (re)start one child, linked to the supervisor passed in.
#[derive(Clone)]
pub struct ChildSpec {
    pub name: String,
    pub start: Arc<StartFn>,
}

impl ChildSpec {
    /// A child started with `Actor::spawn_linked(Some(registered_name), actor(), args(), supervisor)`.
    pub fn new<A, FA, FG>(registered_name: String, actor: FA, args: FG) -> ChildSpec
    where
        A: Actor,
        FA: Fn() -> A + Send + Sync + 'static,
        FG: Fn() -> A::Arguments + Send + Sync + 'static,
    {
        let name = registered_name.clone();
        let start = Arc::new(move |sup: ActorCell| {
            let (a, g, n) = (actor(), args(), registered_name.clone());
            Box::pin(async move { Actor::spawn_linked(Some(n), a, g, sup).await.map(|(r, _)| r.get_cell()) })
                as Pin<Box<dyn Future<Output = Result<ActorCell, SpawnErr>> + Send>>
        });
        ChildSpec { name, start }
    }
}

/// Restart intensity: at most `max_restarts` within `window`.
#[derive(Debug, Clone, Copy)]
pub struct Intensity {
    pub max_restarts: usize,
    pub window: Duration,
}

impl Default for Intensity {
    fn default() -> Self {
        Self { max_restarts: 5, window: Duration::from_secs(10) }
    }
}

/// What to do about a child's failure: the pure part of the supervisor.
#[derive(Debug, Default)]
pub struct RestartBudget {
    recent: VecDeque<Instant>,
}

impl RestartBudget {
    /// Records a failure at `now`; true if a restart is still allowed.
    pub fn allow(&mut self, intensity: Intensity, now: Instant) -> bool {
        while self.recent.front().is_some_and(|t| now.duration_since(*t) > intensity.window) {
            self.recent.pop_front();
        }
        if self.recent.len() >= intensity.max_restarts {
            return false;
        }
        self.recent.push_back(now);
        true
    }
}

#[derive(RactorMessage)]
pub enum SupervisorMsg {
    /// Try again to start a child that could not be started (does not count as a restart).
    Retry(usize),
    /// The cool-down after an escalation is over: start the capability again.
    Recover,
}

/// How long an escalated (crash-looping) capability stays down before the supervisor tries again.
pub const ESCALATION_COOLDOWN: Duration = Duration::from_secs(30);

pub struct Supervisor;

pub struct SupervisorArgs {
    pub capability: Capability,
    pub cluster: Cluster,
    pub children: Vec<ChildSpec>,
    pub intensity: Intensity,
    /// Set while the node shuts down: children that stop then are not restarted.
    pub shutting_down: Arc<std::sync::atomic::AtomicBool>,
}

pub struct SupervisorState {
    args: SupervisorArgs,
    running: Vec<Option<ActorId>>,
    /// Consecutive failed starts per child (reset by a successful start).
    start_failures: Vec<u32>,
    budget: RestartBudget,
    escalated: bool,
}

impl SupervisorState {
    fn index_of(&self, id: ActorId) -> Option<usize> {
        self.running.iter().position(|r| *r == Some(id))
    }
}

async fn start_child(myself: &ActorRef<SupervisorMsg>, state: &mut SupervisorState, i: usize) -> Result<(), SpawnErr> {
    let cell = (state.args.children[i].start)(myself.get_cell()).await?;
    state.running[i] = Some(cell.get_id());
    Ok(())
}

impl Actor for Supervisor {
    type Msg = SupervisorMsg;
    type State = SupervisorState;
    type Arguments = SupervisorArgs;

    async fn pre_start(
        &self,
        _myself: ActorRef<SupervisorMsg>,
        args: SupervisorArgs,
    ) -> Result<SupervisorState, ActorProcessingErr> {
        let n = args.children.len();
        Ok(SupervisorState {
            args,
            running: vec![None; n],
            start_failures: vec![0; n],
            budget: RestartBudget::default(),
            escalated: false,
        })
    }

    async fn post_start(
        &self,
        myself: ActorRef<SupervisorMsg>,
        state: &mut SupervisorState,
    ) -> Result<(), ActorProcessingErr> {
        for i in 0..state.running.len() {
            start_child(&myself, state, i).await?;
        }
        let cap = state.args.capability;
        state.args.cluster.set_health(cap, true, "ready");
        tracing::info!(capability = %cap, children = state.running.len(), "capability ready");
        Ok(())
    }

    async fn handle(
        &self,
        myself: ActorRef<SupervisorMsg>,
        msg: SupervisorMsg,
        state: &mut SupervisorState,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            SupervisorMsg::Retry(i) => {
                if !state.escalated && state.running[i].is_none() {
                    spawn_or_retry(&myself, state, i).await;
                }
            }
            SupervisorMsg::Recover => {
                let cap = state.args.capability;
                tracing::warn!(capability = %cap, "cool-down over: starting the capability again");
                state.escalated = false;
                state.budget = RestartBudget::default();
                for i in 0..state.running.len() {
                    if state.running[i].is_none() {
                        spawn_or_retry(&myself, state, i).await;
                    }
                }
                mark_ready_if_complete(state);
            }
        }
        Ok(())
    }

    async fn handle_supervisor_evt(
        &self,
        myself: ActorRef<SupervisorMsg>,
        evt: SupervisionEvent,
        state: &mut SupervisorState,
    ) -> Result<(), ActorProcessingErr> {
        let (id, why) = match evt {
            SupervisionEvent::ActorFailed(cell, err) => (cell.get_id(), err.to_string()),
            SupervisionEvent::ActorTerminated(cell, _, reason) => {
                (cell.get_id(), format!("stopped: {}", reason.unwrap_or_else(|| "no reason given".into())))
            }
            _ => return Ok(()),
        };
        let Some(i) = state.index_of(id) else { return Ok(()) };
        state.running[i] = None;
        if state.args.shutting_down.load(Ordering::Relaxed) || state.escalated {
            tracing::info!(capability = %state.args.capability, child = %state.args.children[i].name, %why, "child stopped");
            return Ok(());
        }
        // A child that stops on its own outside shutdown is as broken as one that panicked.
        self.on_failure(&myself, state, i, &why).await;
        Ok(())
    }
}

/// The capability is ready again once every child runs.
fn mark_ready_if_complete(state: &SupervisorState) {
    if !state.escalated && state.running.iter().all(Option::is_some) {
        state.args.cluster.set_health(state.args.capability, true, "ready");
    }
}

/// Starts child `i`; if that fails (its registered name not yet released, or its `pre_start` failing,
/// e.g. a store read error), tries again with backoff (20 ms doubling to 1 s) without counting it
/// as another restart, and reports the capability not ready meanwhile.
async fn spawn_or_retry(myself: &ActorRef<SupervisorMsg>, state: &mut SupervisorState, i: usize) {
    let (cap, child) = (state.args.capability, state.args.children[i].name.clone());
    let started = Instant::now();
    match start_child(myself, state, i).await {
        Ok(()) => {
            state.start_failures[i] = 0;
            tracing::info!(capability = %cap, %child, took_us = started.elapsed().as_micros() as u64, "child started");
            mark_ready_if_complete(state);
        }
        Err(e) => {
            state.start_failures[i] += 1;
            let n = state.start_failures[i];
            let wait = Duration::from_millis((20u64 << n.min(6)).min(1_000));
            tracing::warn!(capability = %cap, %child, error = %e, attempt = n, ?wait, "start failed; retrying");
            if n > 1 {
                state.args.cluster.set_health(cap, false, &format!("{child} fails to start: {e}"));
            }
            myself.send_after(wait, move || SupervisorMsg::Retry(i));
        }
    }
}

impl Supervisor {
    async fn on_failure(&self, myself: &ActorRef<SupervisorMsg>, state: &mut SupervisorState, i: usize, why: &str) {
        let cap = state.args.capability;
        let child = state.args.children[i].name.clone();
        if !state.budget.allow(state.args.intensity, Instant::now()) {
            state.escalated = true;
            let detail = format!(
                "crash loop: more than {} restarts in {:?}; last failure of {child}: {why}; retrying in {:?}",
                state.args.intensity.max_restarts, state.args.intensity.window, ESCALATION_COOLDOWN
            );
            tracing::error!(capability = %cap, "{detail}; escalating: capability marked unhealthy");
            state.args.cluster.set_health(cap, false, &detail);
            for id in state.running.iter().flatten() {
                if let Some(c) = ractor::registry::where_is_pid(*id) {
                    c.stop(Some("supervisor escalated".into()));
                }
            }
            myself.send_after(ESCALATION_COOLDOWN, || SupervisorMsg::Recover);
            return;
        }
        tracing::warn!(capability = %cap, %child, failure = %why, "restarting failed child");
        spawn_or_retry(myself, state, i).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn budget_allows_five_in_ten_seconds_then_refuses() {
        let i = Intensity::default();
        let t0 = Instant::now();
        let mut b = RestartBudget::default();
        for k in 0..5 {
            assert!(b.allow(i, t0 + Duration::from_millis(k)));
        }
        assert!(!b.allow(i, t0 + Duration::from_secs(1)));
        // Once the window has passed, restarts are allowed again.
        let mut b = RestartBudget::default();
        for k in 0..5 {
            assert!(b.allow(i, t0 + Duration::from_secs(k * 3)));
        }
    }
}
