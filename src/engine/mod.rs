//! The engine: a dispatcher that decides which job steps run, and step tasks that
//! each carry one job one step forward (`step.rs`).
//!
//! The dispatcher owns the decisions (cargo-nextest's runner shape): for every
//! provider ("lane") it picks due jobs from the store's state index, polls and
//! downloads first, then reconciliations, then new submissions while the number of
//! remote tasks in flight allows; it spawns a step task per job, bounded by the
//! lane's concurrency semaphore, and sleeps until a step finishes or the next job
//! falls due. Nothing here knows a provider's details; the lane holds the adapter,
//! its `Api` and its rate-limit gate.

pub mod budget;
pub mod cancel;
pub mod halt;
pub mod limiter;
pub mod retry;
pub mod spend;
mod step;

use std::collections::{BTreeMap, HashSet, VecDeque};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{watch, Notify, Semaphore};
use tokio::task::JoinSet;

use crate::api::Api;
use crate::config::{Config, ProviderConfig};
use crate::model::{now_ms, JobState, ProviderKind};
use crate::providers::Provider;
use crate::store::{Store, StoreError};
use halt::{HaltReason, ProviderHalt};
use limiter::ProviderGate;

/// How a run is asked to stop.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum StopSignal {
    Run,
    /// Stop taking new work, let running steps end (briefly), persist, return.
    Graceful,
}

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("{0}")]
    Setup(String),
    /// A step of this job could not write the database: the run stops.
    #[error("job {job}: {source}{}", disk_full_hint(&source.to_string()))]
    Job { job: String, source: StoreError },
    /// A step asked the whole run to stop (the disk is full): the reason names the job.
    #[error("{0}")]
    Halted(String),
}

/// The next move, when a database error says the disk is full.
fn disk_full_hint(message: &str) -> &'static str {
    if message.contains("No space left on device") || message.contains("Disk quota exceeded") {
        "; free some space and run again: the next run carries on"
    } else {
        ""
    }
}

/// Counters shared by a run's lanes, for progress lines and the summary.
#[derive(Debug, Default)]
pub struct RunStats {
    pub done: AtomicU64,
    pub failed: AtomicU64,
    /// Finish times (ms) of the last minute, for the rate and the ETA.
    recent: Mutex<VecDeque<u64>>,
    /// The same per provider: each provider's own rate sets its own ETA.
    recent_by: Mutex<BTreeMap<ProviderKind, VecDeque<u64>>>,
}

impl RunStats {
    pub fn record_done(&self, kind: ProviderKind) {
        self.done.fetch_add(1, Ordering::Relaxed);
        self.note_finish(kind);
    }

    pub fn record_failed(&self, kind: ProviderKind) {
        self.failed.fetch_add(1, Ordering::Relaxed);
        self.note_finish(kind);
    }

    fn note_finish(&self, kind: ProviderKind) {
        let now = now_ms();
        let keep = |r: &mut VecDeque<u64>| {
            r.push_back(now);
            while r.front().is_some_and(|&t| t + 60_000 < now) {
                r.pop_front();
            }
        };
        if let Ok(mut r) = self.recent.lock() {
            keep(&mut r);
        }
        if let Ok(mut by) = self.recent_by.lock() {
            keep(by.entry(kind).or_default());
        }
    }

    fn rate_of(r: &VecDeque<u64>, run_started_ms: u64) -> f64 {
        let now = now_ms();
        let n = r.iter().filter(|&&t| t + 60_000 >= now).count();
        let span = (now.saturating_sub(run_started_ms)).clamp(1, 60_000) as f64 / 1000.0;
        n as f64 / span.max(1.0)
    }

    /// Jobs finished per second over the last minute (or since the start).
    pub fn rate_per_sec(&self, run_started_ms: u64) -> f64 {
        self.recent
            .lock()
            .map(|r| Self::rate_of(&r, run_started_ms))
            .unwrap_or(0.0)
    }

    /// One provider's jobs finished per second, the same way.
    pub fn provider_rate_per_sec(&self, kind: ProviderKind, run_started_ms: u64) -> f64 {
        self.recent_by
            .lock()
            .ok()
            .and_then(|by| by.get(&kind).map(|r| Self::rate_of(r, run_started_ms)))
            .unwrap_or(0.0)
    }
}

/// What a run's providers are doing, for `status` (over the control socket) and the
/// progress line: built once, read from any thread while the engine runs.
#[derive(Clone)]
pub struct LiveView {
    lanes: BTreeMap<ProviderKind, Arc<Lane>>,
    stats: Arc<RunStats>,
    spend: Arc<spend::SpendGate>,
}

impl LiveView {
    /// Per provider of the run: its rate and why it waits (what is left is the
    /// queue's: see [`crate::wait::ProviderLive::with_remaining`]).
    pub fn providers(&self, run_started_ms: u64) -> Vec<crate::wait::ProviderLive> {
        self.lanes
            .values()
            .map(|lane| {
                let mut p = crate::wait::ProviderLive::new(lane.kind);
                p.jobs_per_min = self.stats.provider_rate_per_sec(lane.kind, run_started_ms) * 60.0;
                p.requests_per_sec = lane.gate.requests_per_sec();
                p.wait = self.wait_reason(lane);
                p
            })
            .collect()
    }

    /// The gate's reason, but a halt or the spend cap first: they stop the provider
    /// for the rest of the run, a window or a pause only for a while.
    fn wait_reason(&self, lane: &Lane) -> Option<crate::wait::WaitReason> {
        let reason = lane.gate.wait_reason();
        if matches!(reason, Some(crate::wait::WaitReason::Halted { .. })) {
            return reason;
        }
        if self.spend.is_stopped(lane.kind) {
            let detail = self
                .spend
                .stopped()
                .into_iter()
                .find(|s| s.kind == lane.kind)
                .and_then(|s| s.stopped)
                .unwrap_or_default();
            return Some(crate::wait::WaitReason::SpendCap { detail });
        }
        reason
    }
}

/// One provider's share of the engine.
pub struct Lane {
    pub kind: ProviderKind,
    pub adapter: Arc<dyn Provider>,
    pub api: Api,
    pub gate: Arc<ProviderGate>,
    pub config: ProviderConfig,
    permits: Arc<Semaphore>,
    pub stats: Arc<RunStats>,
    /// This provider's counters for `--metrics-addr` / `--metrics-file`.
    pub metrics: Arc<crate::metrics::ProviderMetrics>,
    /// How long an accepted task may go unpolled (config, else the adapter's).
    pub keep_alive: Option<Duration>,
    /// How long after its submission a task's "lost" answer means "not visible yet"
    /// (config, else the adapter's; see `Provider::early_not_found`).
    pub early_not_found: Option<Duration>,
    /// New-work steps (preparing or submitting) running now: they will need polls
    /// soon, so they count as live tasks for the keep-alive budget.
    starting: std::sync::atomic::AtomicUsize,
    /// Set once when the provider is halted (refused credential, unreachable): the
    /// dispatcher starts no more steps for it, and its gate lets go of (and does not
    /// send) the requests waiting there, so the steps under way end at once.
    halt: watch::Sender<Option<ProviderHalt>>,
}

impl Lane {
    /// Halts the provider (the first reason wins). Says so once, with the provider's
    /// own words, and returns whether this call halted it.
    pub(crate) fn halt_with(&self, reason: HaltReason) -> bool {
        let halt = ProviderHalt::new(self.kind, reason, &self.config.base_url);
        let first = self.halt.send_if_modified(|h| {
            if h.is_some() {
                return false;
            }
            *h = Some(halt.clone());
            true
        });
        if first {
            // `status` says "topaz … waiting: halted: <this>": no provider name again.
            self.gate.halt(halt.summary());
            tracing::error!(
                provider = %self.kind,
                "{halt} ({}); its jobs {}, the other providers go on",
                halt.detail(),
                halt.jobs_note()
            );
        }
        first
    }

    pub fn halted(&self) -> Option<ProviderHalt> {
        self.halt.borrow().clone()
    }

    /// When to poll next: the provider's wish, but never so late that a provider
    /// with a keep-alive drops the task (half of it: room for a slow answer, a
    /// wait at the gate, and one retry).
    pub(crate) fn poll_wait(&self, wish: Duration) -> Duration {
        match self.keep_alive {
            Some(k) => {
                let wait = wish.min(k / 2);
                self.gate.note_poll_gap(wait);
                wait
            }
            None => wish,
        }
    }
}

/// Which of the database's jobs a run works (`run --provider`, `run --limit`).
#[derive(Debug, Clone, Default)]
pub struct Selection {
    /// Only these providers' jobs (empty: every provider's).
    pub providers: Vec<ProviderKind>,
    /// Start at most this many queued jobs; jobs already under way are finished.
    pub max_new_jobs: Option<u64>,
}

impl Selection {
    fn includes(&self, kind: ProviderKind) -> bool {
        self.providers.is_empty() || self.providers.contains(&kind)
    }
}

/// What a run ended with.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RunSummary {
    pub done: u64,
    pub failed: u64,
    pub cancelled: u64,
    /// Jobs neither done, failed nor cancelled (only after an interrupted run).
    pub unfinished: u64,
    pub interrupted: bool,
    /// Jobs finished by this run.
    pub finished_this_run: u64,
    /// Of the unfinished, those the run was told to leave: other providers'
    /// (`--provider`) and queued ones past `--limit`.
    pub held_back: u64,
    /// Providers the run halted (no credentials, credential refused, unreachable):
    /// their jobs are kept for a later run.
    pub halted: Vec<ProviderHalt>,
}

/// A snapshot for progress displays.
#[derive(Debug, Clone, Default)]
pub struct Progress {
    pub counts: BTreeMap<JobState, u64>,
    pub total: u64,
    pub rate_per_sec: f64,
    /// The slowest provider's: see [`crate::wait::total_eta`].
    pub eta_secs: Option<u64>,
    /// Since the run started.
    pub elapsed_secs: u64,
    /// Per provider of the run: rate, what is left, ETA and why it waits.
    pub providers: Vec<crate::wait::ProviderLive>,
}

/// Receives progress snapshots (the CLI draws a bar or prints lines).
pub trait ProgressSink: Send + Sync {
    fn update(&self, progress: &Progress);
}

/// States the dispatcher serves, in priority order: keep accepted (paid) work moving
/// before starting new work.
const DISPATCH_ORDER: [JobState; 7] = [
    JobState::Submitted,
    JobState::Polling,
    JobState::Downloading,
    JobState::Submitting,
    JobState::Preparing,
    JobState::RetryWait,
    JobState::Queued,
];

fn is_new_work(s: JobState) -> bool {
    matches!(
        s,
        JobState::Preparing | JobState::RetryWait | JobState::Queued
    )
}

pub struct Engine {
    store: Store,
    out_dir: PathBuf,
    config: Config,
    lanes: BTreeMap<ProviderKind, Arc<Lane>>,
    stats: Arc<RunStats>,
    metrics: Arc<crate::metrics::Metrics>,
    /// Consulted before each job's new work starts (`run --max-credits`).
    spend: Arc<spend::SpendGate>,
    /// Jobs a step (or a cancel) is working on; shared with [`cancel::Canceller`].
    claimed: Arc<Mutex<HashSet<String>>>,
    wake: Arc<Notify>,
    /// How many queued jobs may still be started (`run --limit`); None: no limit.
    start_budget: Option<Arc<std::sync::atomic::AtomicU64>>,
    /// Providers with unfinished jobs and no usable credentials: no lane, halted
    /// from the start.
    not_configured: Vec<ProviderHalt>,
}

/// The halted providers of a run, for `status` while it works.
#[derive(Clone)]
pub struct HaltView {
    lanes: Vec<Arc<Lane>>,
    not_configured: Vec<ProviderHalt>,
}

impl HaltView {
    pub fn list(&self) -> Vec<ProviderHalt> {
        let mut all = self.not_configured.clone();
        all.extend(self.lanes.iter().filter_map(|l| l.halted()));
        all
    }
}

impl Engine {
    /// Builds a lane for every provider that has unfinished jobs. A provider whose
    /// adapter cannot be built (no credentials) gets no lane: it is halted from the
    /// start, named (with the variable to set) before any request, and its jobs are
    /// left as they are for a later run while the other providers work.
    pub fn new(store: Store, config: Config, out_dir: PathBuf) -> Result<Engine, EngineError> {
        Engine::with_selection(store, config, out_dir, Selection::default())
    }

    /// As [`Engine::new`], working only the jobs `selection` takes.
    pub fn with_selection(
        store: Store,
        config: Config,
        out_dir: PathBuf,
        selection: Selection,
    ) -> Result<Engine, EngineError> {
        let stats = Arc::new(RunStats::default());
        let metrics = Arc::new(crate::metrics::Metrics::new());
        let counts = store.counts()?;
        let mut needed: Vec<ProviderKind> = counts
            .iter()
            .filter(|((s, _), n)| !s.is_terminal() && **n > 0)
            .map(|((_, p), _)| *p)
            .filter(|p| selection.includes(*p))
            .collect();
        // Counts are keyed by (state, provider): one provider shows up once per
        // state, not always next to itself.
        needed.sort();
        needed.dedup();
        let mut lanes = BTreeMap::new();
        let mut not_configured = Vec::new();
        for kind in needed {
            if lanes.contains_key(&kind) {
                continue;
            }
            let pc = config.provider(kind);
            let adapter = match crate::providers::build(&pc) {
                Ok(a) => a,
                Err(e) => {
                    let detail = halt::without_prefix(kind, &e);
                    not_configured.push(ProviderHalt::new(
                        kind,
                        HaltReason::NotConfigured { detail },
                        &pc.base_url,
                    ));
                    continue;
                }
            };
            let client = http_client(&pc).map_err(EngineError::Setup)?;
            let keep_alive = pc.keep_alive.or_else(|| adapter.keep_alive());
            let early_not_found = pc.early_not_found.or_else(|| adapter.early_not_found());
            let mut gate = ProviderGate::new(
                kind,
                &pc.rate_limits,
                config.engine.rate_margin,
                Some(store.clone()),
            )
            .with_outage_patience(config.engine.outage_patience)
            .with_shared_budget_in(
                config.engine.state_dir.as_deref(),
                &pc.base_url,
                &pc.credentials,
            );
            if let Some(k) = keep_alive {
                gate = gate.with_keep_alive(k, pc.poll_interval);
            }
            if pc.adaptive {
                gate = gate.with_adaptive_rate();
            }
            let gate = Arc::new(gate);
            let api =
                Api::new(&pc.base_url, client, gate.clone()).with_metrics(metrics.provider(kind));
            lanes.insert(
                kind,
                Arc::new(Lane {
                    kind,
                    adapter,
                    api,
                    gate,
                    permits: Arc::new(Semaphore::new(pc.concurrency)),
                    config: pc,
                    stats: stats.clone(),
                    metrics: metrics.provider(kind),
                    keep_alive,
                    early_not_found,
                    starting: Default::default(),
                    halt: watch::Sender::new(None),
                }),
            );
        }
        Ok(Engine {
            spend: Arc::new(spend::SpendGate::uncapped(&config)),
            store,
            // Absolute: it is recorded in each job (`Job::out_dir`) for later readers,
            // which may run from another folder.
            out_dir: std::path::absolute(&out_dir).unwrap_or(out_dir),
            config,
            lanes,
            stats,
            metrics,
            claimed: Arc::default(),
            wake: Arc::new(Notify::new()),
            start_budget: selection
                .max_new_jobs
                .map(|n| Arc::new(std::sync::atomic::AtomicU64::new(n))),
            not_configured,
        })
    }

    /// Whether `--limit` still lets a queued job start.
    fn may_start(&self) -> bool {
        self.start_budget
            .as_ref()
            .is_none_or(|b| b.load(Ordering::SeqCst) > 0)
    }

    /// Providers halted before the run starts (no credentials).
    pub fn not_configured(&self) -> &[ProviderHalt] {
        &self.not_configured
    }

    /// The run's halted providers, readable from other tasks (`status`).
    pub fn halt_view(&self) -> HaltView {
        HaltView {
            lanes: self.lanes.values().cloned().collect(),
            not_configured: self.not_configured.clone(),
        }
    }

    /// Replaces the default gate (which records spend and never refuses).
    pub fn with_spend_gate(mut self, gate: Arc<spend::SpendGate>) -> Engine {
        self.spend = gate;
        self
    }

    /// Cancels jobs while this engine runs (the control socket's `cancel`).
    pub fn canceller(&self) -> cancel::Canceller {
        cancel::Canceller {
            store: self.store.clone(),
            lanes: self.lanes.clone(),
            claimed: self.claimed.clone(),
            wake: self.wake.clone(),
        }
    }

    pub fn stats(&self) -> Arc<RunStats> {
        self.stats.clone()
    }

    /// The providers' rates and wait reasons, readable while the engine runs.
    pub fn live_view(&self) -> LiveView {
        LiveView {
            lanes: self.lanes.clone(),
            stats: self.stats.clone(),
            spend: self.spend.clone(),
        }
    }

    /// The run's counters, and the providers it works (see `metrics`).
    pub fn metrics(&self) -> (Arc<crate::metrics::Metrics>, Vec<ProviderKind>) {
        (self.metrics.clone(), self.lanes.keys().copied().collect())
    }

    pub fn config(&self) -> &Config {
        &self.config
    }

    /// Works until no job is runnable, or until `stop` says otherwise.
    pub async fn run(
        &self,
        mut stop: watch::Receiver<StopSignal>,
        progress: Option<Arc<dyn ProgressSink>>,
    ) -> Result<RunSummary, EngineError> {
        let started = now_ms();
        // All at once: one provider slow to authenticate holds up no other.
        let checks = self.lanes.values().map(|lane| async move {
            if authenticate(lane).await? {
                self.check_balance(lane).await?;
            }
            Ok::<(), EngineError>(())
        });
        for r in futures_util::future::join_all(checks).await {
            r?;
        }
        self.spend.load(&self.store, &self.lanes).await?;
        let claimed = self.claimed.clone();
        let wake = self.wake.clone();
        let mut tasks: JoinSet<Result<(), EngineError>> = JoinSet::new();
        let mut interrupted = false;
        // Set by a step that cannot go on (no space left): stop as on Ctrl-C, then fail.
        let halt: Arc<Mutex<Option<String>>> = Arc::default();
        let mut halted = None;
        let mut last_progress = 0u64;
        let mut last_prune = now_ms();

        loop {
            while let Some(done) = tasks.try_join_next() {
                match done {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => {
                        tasks.abort_all();
                        return Err(e);
                    }
                    Err(e) if e.is_panic() => {
                        tasks.abort_all();
                        return Err(EngineError::Setup(format!("a step panicked: {e}")));
                    }
                    Err(_) => {}
                }
            }
            if *stop.borrow() != StopSignal::Run {
                interrupted = true;
                break;
            }
            if let Some(reason) = halt.lock().ok().and_then(|mut h| h.take()) {
                halted = Some(reason);
                interrupted = true;
                break;
            }

            let now = now_ms();
            let mut next_wake = now + 1_000;
            for lane in self.lanes.values() {
                if let Some((since, last)) = lane.gate.unreachable_since() {
                    let bound = lane.config.unreachable_after.as_millis() as u64;
                    if now.saturating_sub(since) >= bound && lane.halted().is_none() {
                        lane.halt_with(HaltReason::Unreachable {
                            target: api_target(&lane.config.base_url),
                            detail: last,
                            for_secs: now.saturating_sub(since) / 1000,
                        });
                    }
                }
                if lane.halted().is_some() {
                    // Nothing more goes to it; its jobs wait for a later run.
                    continue;
                }
                let mut remote_in_flight = [
                    JobState::Submitting,
                    JobState::Submitted,
                    JobState::Polling,
                    JobState::Downloading,
                ]
                .iter()
                .map(|s| self.store.count(*s, lane.kind).unwrap_or(0))
                .sum::<u64>() as usize;
                // Tasks that need polls: accepted ones, and new work under way (which
                // will be accepted soon). The gate sees only the accepted ones: they
                // end on their own, so a request waiting for room never waits on
                // itself.
                let accepted = [JobState::Submitted, JobState::Polling]
                    .iter()
                    .map(|s| self.store.count(*s, lane.kind).unwrap_or(0))
                    .sum::<u64>() as usize;
                lane.gate.set_live_tasks(accepted);
                let mut live_tasks = accepted + lane.starting.load(Ordering::SeqCst);
                for state in DISPATCH_ORDER {
                    let free = lane.permits.available_permits();
                    if free == 0 {
                        break;
                    }
                    if is_new_work(state) && remote_in_flight >= lane.config.max_in_flight {
                        continue;
                    }
                    if is_new_work(state) && self.spend.is_stopped(lane.kind) {
                        continue;
                    }
                    if state == JobState::Queued && !self.may_start() {
                        continue;
                    }
                    let busy = claimed.lock().map(|c| c.len()).unwrap_or(0);
                    let ids = self.store.due(state, lane.kind, now, free + busy)?;
                    for id in ids {
                        if is_new_work(state) && remote_in_flight >= lane.config.max_in_flight {
                            break;
                        }
                        if is_new_work(state) && !lane.gate.keep_alive_fits(live_tasks + 1) {
                            // The polls of the tasks already accepted come first; look
                            // again soon (the window slides, tasks finish).
                            lane.gate.note_keep_alive_hold(live_tasks);
                            next_wake = next_wake.min(now + 20);
                            break;
                        }
                        let fresh = claimed
                            .lock()
                            .map(|mut c| c.insert(id.clone()))
                            .unwrap_or(false);
                        if !fresh {
                            continue;
                        }
                        if is_new_work(state) && self.spend.caps_provider(lane.kind) {
                            // In queue order, so the cap stops at the same job every time.
                            let admission = self.spend.admit_in_order(lane, &self.store, &id);
                            if !matches!(admission, Ok(spend::Admission::Go)) {
                                if let Ok(mut c) = claimed.lock() {
                                    c.remove(&id);
                                }
                                admission?;
                                next_wake = next_wake.min(now + 20);
                                break;
                            }
                        }
                        if state == JobState::Queued && !self.may_start() {
                            if let Ok(mut c) = claimed.lock() {
                                c.remove(&id);
                            }
                            break;
                        }
                        let Ok(permit) = lane.permits.clone().try_acquire_owned() else {
                            if let Ok(mut c) = claimed.lock() {
                                c.remove(&id);
                            }
                            break;
                        };
                        if state == JobState::Queued {
                            if let Some(budget) = &self.start_budget {
                                budget.fetch_sub(1, Ordering::SeqCst);
                            }
                        }
                        let new_work = is_new_work(state);
                        if new_work {
                            remote_in_flight += 1;
                            live_tasks += 1;
                            lane.starting.fetch_add(1, Ordering::SeqCst);
                        }
                        let lane = lane.clone();
                        let store = self.store.clone();
                        let out_dir = self.out_dir.clone();
                        let claimed = claimed.clone();
                        let wake = wake.clone();
                        let halt = halt.clone();
                        let max_download_bytes = self.config.engine.max_download_bytes;
                        let spend = self.spend.clone();
                        tasks.spawn(async move {
                            let env = step::StepEnv {
                                lane: &lane,
                                store: &store,
                                out_dir: &out_dir,
                                max_download_bytes,
                                spend: &spend,
                                halt: &halt,
                            };
                            let result =
                                step::run(&env, &id)
                                    .await
                                    .map_err(|source| EngineError::Job {
                                        job: id.clone(),
                                        source,
                                    });
                            if new_work {
                                lane.starting.fetch_sub(1, Ordering::SeqCst);
                            }
                            if let Ok(mut c) = claimed.lock() {
                                c.remove(&id);
                            }
                            drop(permit);
                            wake.notify_one();
                            result
                        });
                    }
                    if let Some(due) = self.store.next_due(state, lane.kind)? {
                        if due > now {
                            next_wake = next_wake.min(due);
                        }
                    }
                }
            }

            if now >= last_progress + 250 {
                last_progress = now;
                if let Some(p) = &progress {
                    p.update(&self.progress(started)?);
                }
            }
            if now >= last_prune + 10_000 {
                last_prune = now;
                for lane in self.lanes.values() {
                    lane.gate.prune().await;
                }
            }

            let unfinished: u64 = self
                .store
                .counts()?
                .iter()
                .filter(|((s, p), _)| {
                    !s.is_terminal() && self.lanes.get(p).is_some_and(|l| l.halted().is_none())
                })
                // New work the spend cap holds back is not waited for.
                .filter(|((s, p), _)| !(is_new_work(*s) && self.spend.is_stopped(*p)))
                // Nor queued jobs past `--limit`.
                .filter(|((s, _), _)| *s != JobState::Queued || self.may_start())
                .map(|(_, n)| n)
                .sum();
            if unfinished == 0 && tasks.is_empty() {
                break;
            }

            let sleep_ms = next_wake.saturating_sub(now_ms()).clamp(5, 1_000);
            tokio::select! {
                _ = wake.notified() => {}
                _ = tokio::time::sleep(Duration::from_millis(sleep_ms)) => {}
                _ = stop.changed() => {}
            }
        }

        if interrupted {
            // Let steps that are mid-request finish for a moment; whatever is cut
            // off is safe: its last durable state leads the next run to reconcile.
            let deadline = tokio::time::sleep(Duration::from_secs(3));
            tokio::pin!(deadline);
            loop {
                tokio::select! {
                    next = tasks.join_next() => if next.is_none() { break },
                    _ = &mut deadline => { tasks.abort_all(); break; }
                }
            }
        }
        let synced = self.store.sync().await;
        if let Some(reason) = halted {
            return Err(EngineError::Halted(reason));
        }
        synced?;
        if let Some(p) = &progress {
            p.update(&self.progress(started)?);
        }
        let mut summary = self.summary()?;
        summary.interrupted = interrupted;
        summary.held_back = self
            .store
            .counts()?
            .iter()
            .filter(|((s, p), _)| {
                // A provider without a lane was left out by `--provider`, unless it
                // is halted for want of credentials (that is not "as asked").
                let left_out = !self.lanes.contains_key(p)
                    && !self.not_configured.iter().any(|h| h.provider == *p);
                !s.is_terminal() && (left_out || (*s == JobState::Queued && !self.may_start()))
            })
            .map(|(_, n)| n)
            .sum();
        summary.finished_this_run =
            self.stats.done.load(Ordering::Relaxed) + self.stats.failed.load(Ordering::Relaxed);
        summary.halted = self.halt_view().list();
        Ok(summary)
    }

    /// Warns when the account looks too poor for the jobs not yet submitted, where
    /// the provider tells the balance and the user configured a cost per job. A
    /// warning, not a stop: the estimate is the user's, and the provider refuses
    /// what it will not pay for anyway.
    async fn check_balance(&self, lane: &Lane) -> Result<(), StoreError> {
        let Some(cost) = lane.config.cost_per_job else {
            return Ok(());
        };
        let mut to_submit = 0;
        for state in [JobState::Queued, JobState::RetryWait, JobState::Preparing] {
            to_submit += self.store.count(state, lane.kind)?;
        }
        if to_submit == 0 {
            return Ok(());
        }
        match lane.adapter.balance(&lane.api).await {
            Ok(Some(balance)) => {
                let needed = cost * to_submit as f64;
                if balance.amount < needed {
                    tracing::warn!(
                        provider = %lane.kind,
                        "the balance looks too low: {} {} left, {to_submit} jobs to submit at {cost} each need {needed}",
                        balance.amount,
                        balance.unit
                    );
                } else {
                    tracing::info!(provider = %lane.kind, "balance {} {} for {to_submit} jobs at {cost} each", balance.amount, balance.unit);
                }
            }
            Ok(None) => {}
            Err(e) => tracing::warn!(provider = %lane.kind, "could not read the balance: {e}"),
        }
        Ok(())
    }

    fn progress(&self, started: u64) -> Result<Progress, StoreError> {
        let mut counts = BTreeMap::new();
        let mut left: BTreeMap<ProviderKind, u64> = BTreeMap::new();
        for ((s, p), n) in self.store.counts()? {
            *counts.entry(s).or_insert(0) += n;
            if !s.is_terminal() {
                *left.entry(p).or_insert(0) += n;
            }
        }
        let total = counts.values().sum();
        let rate = self.stats.rate_per_sec(started);
        let providers: Vec<_> = self
            .live_view()
            .providers(started)
            .into_iter()
            .map(|mut p| {
                if p.wait.is_none() {
                    p.wait = crate::wait::idle_backoff(&self.store, p.provider, now_ms());
                }
                let n = left.get(&p.provider).copied().unwrap_or(0);
                p.with_remaining(n)
            })
            .collect();
        Ok(Progress {
            counts,
            total,
            rate_per_sec: rate,
            eta_secs: crate::wait::total_eta(&providers),
            elapsed_secs: now_ms().saturating_sub(started) / 1000,
            providers,
        })
    }

    pub fn summary(&self) -> Result<RunSummary, StoreError> {
        summarize(&self.store)
    }
}

/// `provider: message`, unless the message already starts with the provider's name
/// (adapters' own messages often do): never "perfect: perfect: …".
pub fn naming(kind: ProviderKind, message: &str) -> String {
    let prefix = format!("{kind}: ");
    if message.starts_with(&prefix) {
        message.to_string()
    } else {
        format!("{prefix}{message}")
    }
}

/// Credentials are checked before any job of the provider is touched. A refusal (a
/// wrong key) halts the provider, and so does a host that never answered in all the
/// tries (named with its host and port); the other providers go on. A garbled
/// answer, a 5xx or a 429 is only bad luck and is tried again, with backoff, a few
/// times. Returns whether the provider may be worked.
async fn authenticate(lane: &Lane) -> Result<bool, EngineError> {
    const TRIES: u32 = 8;
    for attempt in 1..=TRIES {
        match lane.adapter.authenticate(&lane.api).await {
            Ok(()) => return Ok(true),
            Err(
                crate::api::ProviderError::Credential(reason)
                | crate::api::ProviderError::Permanent(reason),
            ) => {
                lane.halt_with(HaltReason::CredentialRefused {
                    status: halt::refused_status(&reason),
                    detail: reason,
                });
                return Ok(false);
            }
            Err(e)
                if attempt == TRIES
                    || lane.gate.unreachable_since().is_some_and(|(since, _)| {
                        now_ms().saturating_sub(since)
                            >= lane.config.unreachable_after.as_millis() as u64
                    }) =>
            {
                if let Some((since, last)) = lane.gate.unreachable_since() {
                    lane.halt_with(HaltReason::Unreachable {
                        target: api_target(&lane.config.base_url),
                        detail: last,
                        for_secs: now_ms().saturating_sub(since) / 1000,
                    });
                    return Ok(false);
                }
                return Err(EngineError::Setup(format!(
                    "{}: could not authenticate after {TRIES} tries: {e}",
                    lane.kind
                )));
            }
            Err(e) => {
                let (retry_after, rate_limited) = match &e {
                    crate::api::ProviderError::Transient {
                        retry_after,
                        rate_limited,
                        ..
                    } => (*retry_after, *rate_limited),
                    _ => (None, false),
                };
                let wait = retry::backoff_delay(attempt, retry_after);
                tracing::warn!(
                    provider = %lane.kind,
                    "authentication failed ({e}){}; trying again in {} ms",
                    if rate_limited { " [rate limited]" } else { "" },
                    wait.as_millis()
                );
                tokio::time::sleep(wait).await;
            }
        }
    }
    Ok(true)
}

/// `host:port` of a provider's API, for messages about reaching it.
fn api_target(base_url: &str) -> String {
    match reqwest::Url::parse(base_url) {
        Ok(u) => crate::api::host_port(&u),
        Err(_) => base_url.to_string(),
    }
}

/// The HTTP client for one provider's requests (API host, uploads, downloads).
pub fn http_client(pc: &ProviderConfig) -> Result<reqwest::Client, String> {
    reqwest::Client::builder()
        .connect_timeout(Duration::from_secs(15))
        .read_timeout(pc.timeout)
        .redirect(crate::download::redirect_policy())
        .user_agent(concat!("pixbatch/", env!("CARGO_PKG_VERSION")))
        .build()
        .map_err(|e| format!("{}: HTTP client: {e}", pc.kind))
}

/// An adapter and its `Api` outside a run (`styles`, `balance`, `cancel`): the
/// provider's limits are kept in memory only, and credentials are checked first.
pub async fn standalone(
    config: &Config,
    kind: ProviderKind,
) -> Result<(Arc<dyn Provider>, Api), String> {
    let (adapter, api) = standalone_unchecked(config, kind)?;
    adapter
        .authenticate(&api)
        .await
        .map_err(|e| naming(kind, &e.to_string()))?;
    Ok((adapter, api))
}

/// [`standalone`] without the up-front `authenticate`: for the balance, which some
/// credentials can read although they cannot run jobs (a Perfect console API key;
/// docs/providers.md). Adapters with tokens still obtain one on the first call.
pub fn standalone_unchecked(
    config: &Config,
    kind: ProviderKind,
) -> Result<(Arc<dyn Provider>, Api), String> {
    let pc = config.provider(kind);
    let adapter = crate::providers::build(&pc)?;
    let gate = Arc::new(
        ProviderGate::new(kind, &pc.rate_limits, config.engine.rate_margin, None)
            .with_shared_budget_in(
                config.engine.state_dir.as_deref(),
                &pc.base_url,
                &pc.credentials,
            ),
    );
    let api = Api::new(&pc.base_url, http_client(&pc)?, gate);
    Ok((adapter, api))
}

/// Counts of the whole queue, as `run` reports them and decides its exit code on.
pub fn summarize(store: &Store) -> Result<RunSummary, StoreError> {
    let mut s = RunSummary::default();
    for ((state, _), n) in store.counts()? {
        match state {
            JobState::Done => s.done += n,
            JobState::Failed => s.failed += n,
            JobState::Cancelled => s.cancelled += n,
            _ => s.unfinished += n,
        }
    }
    Ok(s)
}
