//! Rate limits: "at most N requests in any window of length W", every window of a
//! provider at once, exactly.
//!
//! Why not governor: governor implements GCRA, a burst plus a steady emission
//! interval. It cannot express "N in any window W" without either admitting up to
//! 2N−1 in some window (burst N) or giving up the provider's burst (burst 1, interval
//! W/N), and the second loses up to one whole window of time per run: a run of 10
//! windows' worth of requests takes 10 W instead of 9 W (efficiency 0.9, below the
//! 0.95 the project targets). Checking several governor limiters also consumes cells
//! of the ones that accept when another refuses. The test
//! `governor_gcra_cannot_use_a_window_in_full` below shows the first point. A
//! sliding log of send times is exact, costs N timestamps per window, and is what
//! must be persisted anyway so a restart does not burst; see `docs/ARCHITECTURE.md`.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use tokio::sync::{Mutex, Notify};

use crate::api::{RequestGate, RequestKind};
use crate::model::ProviderKind;
use crate::rate::RateSpec;
use crate::store::Store;
use crate::wait::WaitReason;

use super::budget::SharedBudget;

/// A sliding log of send times (ms) checked against every limit.
#[derive(Debug, Clone)]
pub struct SlidingLimiter {
    /// (count, window in ms including the safety margin)
    limits: Vec<(usize, u64)>,
    longest_ms: u64,
    sent: VecDeque<u64>,
}

impl SlidingLimiter {
    /// `margin` widens every window a little: the provider counts arrivals, we count
    /// departures, and the two clocks and the network do not agree to the millisecond.
    pub fn new(specs: &[RateSpec], margin: Duration) -> SlidingLimiter {
        let limits: Vec<(usize, u64)> = specs
            .iter()
            .map(|s| {
                let w = s.window.as_millis() as u64;
                let pad = (w / 100).max(margin.as_millis() as u64);
                (s.count.max(1) as usize, w + pad)
            })
            .collect();
        let longest_ms = limits.iter().map(|l| l.1).max().unwrap_or(0);
        SlidingLimiter {
            limits,
            longest_ms,
            sent: VecDeque::new(),
        }
    }

    pub fn longest_window_ms(&self) -> u64 {
        self.longest_ms
    }

    /// The largest COUNT of the limits (how many send times a limit can look at).
    pub fn largest_count(&self) -> usize {
        self.limits.iter().map(|l| l.0).max().unwrap_or(0)
    }

    /// Replaces the log with `times` (the shared budget file's, which holds every
    /// process's sends of this credential, this one's included).
    pub fn replace_log(&mut self, times: &[u64]) {
        self.sent.clear();
        for &t in times {
            self.record(t);
        }
    }

    /// The earliest time, not before `now`, at which one more request keeps every
    /// limit: for a limit (n, w), the n-th newest send must have left the window.
    pub fn next_free(&self, now: u64) -> u64 {
        let len = self.sent.len();
        let mut t = now;
        for &(n, w) in &self.limits {
            if len >= n {
                let nth_newest = self.sent[len - n];
                t = t.max(nth_newest + w);
            }
        }
        t
    }

    /// Moves a recorded send from `from` to the later `to` (the request left later
    /// than it was admitted).
    pub fn postpone(&mut self, from: u64, to: u64) {
        if let Some(pos) = self.sent.iter().rposition(|&x| x == from) {
            self.sent.remove(pos);
        }
        self.record(to);
    }

    pub fn is_unlimited(&self) -> bool {
        self.limits.is_empty()
    }

    /// Records a send at `t` (times must not go backwards much; they are kept sorted).
    pub fn record(&mut self, t: u64) {
        let pos = self
            .sent
            .iter()
            .rposition(|&x| x <= t)
            .map(|p| p + 1)
            .unwrap_or(0);
        self.sent.insert(pos, t);
        let horizon = t.saturating_sub(self.longest_ms);
        while self.sent.front().is_some_and(|&x| x < horizon) {
            self.sent.pop_front();
        }
    }

    /// Whether one more request sent at `now` still leaves room, in every window, for
    /// `reserved(τ)` further requests within the next τ ms, for every τ up to the
    /// window. Used to keep accepted tasks alive: `reserved` is the polls they will
    /// need. The worst moments are just before each logged send leaves the window
    /// (the reserve has grown, that send still counts), so only those are checked.
    pub fn fits_with_reserve(&self, now: u64, reserved: impl Fn(u64) -> usize) -> bool {
        for &(n, w) in &self.limits {
            let inside: Vec<u64> = self.sent.iter().copied().filter(|&t| t + w > now).collect();
            let len = inside.len();
            if len + 1 + reserved(0) > n {
                return false;
            }
            for (k, &t) in inside.iter().enumerate() {
                if (len - k) + 1 + reserved(t + w - now) > n {
                    return false;
                }
            }
            if 1 + reserved(w) > n {
                return false;
            }
        }
        true
    }

    /// Requests sent within the last `window_ms` before `now`.
    pub fn sent_within(&self, now: u64, window_ms: u64) -> usize {
        self.sent.iter().filter(|&&x| x + window_ms > now).count()
    }
}

/// Wall-clock milliseconds that never go backwards within the process.
#[derive(Debug, Clone)]
pub struct MonotonicClock {
    wall_at_start: u64,
    start: Instant,
}

impl MonotonicClock {
    pub fn new() -> Self {
        MonotonicClock {
            wall_at_start: crate::model::now_ms(),
            start: Instant::now(),
        }
    }

    pub fn now_ms(&self) -> u64 {
        self.wall_at_start + self.start.elapsed().as_millis() as u64
    }
}

impl Default for MonotonicClock {
    fn default() -> Self {
        Self::new()
    }
}

/// Counters a gate keeps for progress lines and metrics.
#[derive(Debug, Default)]
pub struct GateStats {
    pub admitted: AtomicU64,
    pub backoffs: AtomicU64,
    pub waited_ms: AtomicU64,
}

/// The engine's [`RequestGate`] for one provider: the provider's limits, a pause
/// after 429s, and polls before submissions.
pub struct ProviderGate {
    provider: ProviderKind,
    clock: MonotonicClock,
    /// Held by the request being admitted, including while it waits: waiters queue in
    /// FIFO order behind it (tokio's mutex is fair).
    turn: Mutex<()>,
    /// The send log; locked only for moments, never across an await.
    limiter: std::sync::Mutex<SlidingLimiter>,
    /// No request before this time (ms): set by a 429's Retry-After.
    paused_until: AtomicU64,
    /// Urgent requests (polls, links) waiting or being admitted; submissions stand
    /// aside while any are.
    urgent_waiting: AtomicUsize,
    urgent_done: Notify,
    store: Option<Store>,
    /// The credential's send log and Retry-After, shared with every pixbatch process
    /// of the user (see `engine::budget`). When set, it is the log of record and the
    /// database's request log is not written.
    shared: Option<SharedBudget>,
    pub stats: GateStats,
    /// Requests in a row that got no answer or a 5xx.
    failures_in_a_row: AtomicU64,
    /// When the current outage began (ms; 0 = none).
    outage_since: AtomicU64,
    /// How many times the breaker tripped in this outage (sets the pause).
    outage_trips: AtomicU64,
    outage_patience_ms: u64,
    /// Since when (ms; 0 = it answers) no request got any answer at all, and the
    /// last such failure: lets the engine halt a provider that stays unreachable.
    unreachable_since: AtomicU64,
    last_unanswered: std::sync::Mutex<String>,
    /// The engine halted the provider: waiting requests are let go at once, and
    /// `Api::send` sends none of them (`is_halted`).
    halted: std::sync::atomic::AtomicBool,
    halt_wake: Notify,
    /// Set for providers that drop a task not polled in time (Perfect).
    keep_alive: Option<KeepAlive>,
    /// Set for providers without a published limit (Dzine).
    adaptive: Option<AdaptiveRate>,
    /// What the request holding the turn waits for, while it waits (`status`).
    waiting: std::sync::Mutex<Option<WaitReason>>,
    /// The end of the last pause the outage breaker set (ms): a pause up to it is an
    /// outage's, a later one a Retry-After's.
    outage_pause_until: AtomicU64,
    /// When new work last held back for the keep-alive reserve (ms; 0 = never), and
    /// for how many tasks (accepted ones and new work under way).
    keep_alive_held_at: AtomicU64,
    keep_alive_held_for: AtomicUsize,
    /// Why the provider is halted for the run, for `status` and the progress line
    /// (see [`ProviderGate::halt`]).
    halt_detail: std::sync::Mutex<Option<String>>,
}

/// What the gate needs to keep accepted tasks alive: how many there are, how often
/// each is polled, and how many polls a task takes (learned as tasks finish).
#[derive(Debug)]
struct KeepAlive {
    keep_alive_ms: u64,
    /// Accepted tasks that need polls, as the dispatcher last counted them.
    live_tasks: AtomicUsize,
    /// Smoothed gap between two polls of one task (ms).
    poll_gap_ms: AtomicU64,
    polls: AtomicU64,
    tasks_finished: AtomicU64,
}

/// Polls a task is assumed to need before any has finished.
const PRIOR_POLLS_PER_TASK: u64 = 6;

impl KeepAlive {
    /// Polls one live task may still need: half again the average so far, plus one.
    fn polls_per_task(&self) -> u64 {
        let done = self.tasks_finished.load(Ordering::Relaxed);
        if done == 0 {
            return PRIOR_POLLS_PER_TASK;
        }
        let polls = self.polls.load(Ordering::Relaxed);
        (polls * 3).div_ceil(done * 2) + 1
    }

    /// The polls `tasks` live tasks may send within the next `tau` ms.
    fn reserve(&self, tasks: usize, tau: u64) -> usize {
        let gap = self.poll_gap_ms.load(Ordering::Relaxed).max(1);
        let per_task = (tau / gap + 1).min(self.polls_per_task());
        tasks * per_task as usize
    }
}

/// Additive increase, multiplicative decrease of the request rate, below the
/// configured limits: halve on a 429, a 5xx or no answer; creep back up while the
/// provider answers. Like TCP, one halving per congestion event: the failures of the
/// requests already in flight when the first came back (within `DECREASE_COOLDOWN_MS`)
/// do not halve again, or a burst of scattered errors would drive the rate to the
/// floor at once.
#[derive(Debug)]
struct AdaptiveRate {
    /// Requests per ms allowed by the tightest configured limit.
    ceiling: f64,
    /// Current rate (requests per ms).
    rate: std::sync::Mutex<f64>,
    last_sent: AtomicU64,
    /// When the rate was last halved (ms).
    last_decrease: AtomicU64,
}

/// How long after a halving further trouble counts as the same event.
const DECREASE_COOLDOWN_MS: u64 = 1_000;

impl AdaptiveRate {
    fn spacing_ms(&self) -> u64 {
        let rate = *self.rate.lock().unwrap_or_else(|p| p.into_inner());
        if rate >= self.ceiling {
            // At the ceiling the sliding log alone decides (bursts allowed).
            0
        } else {
            (1.0 / rate).ceil() as u64
        }
    }

    fn adjust(&self, healthy: bool, now_ms: u64) {
        let mut rate = self.rate.lock().unwrap_or_else(|p| p.into_inner());
        if healthy {
            *rate = (*rate + self.ceiling / 100.0).min(self.ceiling);
            return;
        }
        let last = self.last_decrease.load(Ordering::SeqCst);
        if last != 0 && now_ms < last + DECREASE_COOLDOWN_MS {
            return;
        }
        self.last_decrease.store(now_ms.max(1), Ordering::SeqCst);
        *rate = (*rate / 2.0).max(self.ceiling / 64.0);
    }

    fn rate_per_sec(&self) -> f64 {
        *self.rate.lock().unwrap_or_else(|p| p.into_inner()) * 1000.0
    }
}

/// Requests in a row failing with 5xx or no answer before the provider is taken to
/// be down: every request then pauses, and jobs' attempts stop counting (up to
/// the outage patience), so an outage does not fail the queue.
pub const OUTAGE_THRESHOLD: u64 = 5;

impl ProviderGate {
    /// Builds the gate, replaying the send times the store kept from earlier runs.
    pub fn new(
        provider: ProviderKind,
        limits: &[RateSpec],
        margin: Duration,
        store: Option<Store>,
    ) -> Self {
        let clock = MonotonicClock::new();
        let mut limiter = SlidingLimiter::new(limits, margin);
        if let Some(store) = &store {
            let since = clock.now_ms().saturating_sub(limiter.longest_window_ms());
            match store.sent_since(provider, since) {
                Ok(times) => {
                    for t in times {
                        limiter.record(t);
                    }
                }
                Err(e) => {
                    tracing::warn!(provider = %provider, "could not read the request log: {e}")
                }
            }
            if let Err(e) = store.prune_sent(provider, since) {
                tracing::warn!(provider = %provider, "could not prune the request log: {e}");
            }
        }
        ProviderGate {
            provider,
            clock,
            turn: Mutex::new(()),
            limiter: std::sync::Mutex::new(limiter),
            paused_until: AtomicU64::new(0),
            urgent_waiting: AtomicUsize::new(0),
            urgent_done: Notify::new(),
            store,
            shared: None,
            stats: GateStats::default(),
            failures_in_a_row: AtomicU64::new(0),
            outage_since: AtomicU64::new(0),
            outage_trips: AtomicU64::new(0),
            outage_patience_ms: 30 * 60 * 1000,
            unreachable_since: AtomicU64::new(0),
            last_unanswered: std::sync::Mutex::new(String::new()),
            halted: std::sync::atomic::AtomicBool::new(false),
            halt_wake: Notify::new(),
            keep_alive: None,
            adaptive: None,
            waiting: std::sync::Mutex::new(None),
            outage_pause_until: AtomicU64::new(0),
            keep_alive_held_at: AtomicU64::new(0),
            keep_alive_held_for: AtomicUsize::new(0),
            halt_detail: std::sync::Mutex::new(None),
        }
    }

    /// Keeps accepted tasks alive: requests that start new work wait until the
    /// limits leave room for the polls of every live task (see
    /// [`ProviderGate::keep_alive_fits`]). `poll_gap` is the first guess of how often
    /// a task is polled.
    pub fn with_keep_alive(mut self, keep_alive: Duration, poll_gap: Duration) -> Self {
        let keep_alive_ms = keep_alive.as_millis() as u64;
        let gap = (poll_gap.as_millis() as u64).clamp(1, (keep_alive_ms / 2).max(1));
        self.keep_alive = Some(KeepAlive {
            keep_alive_ms,
            live_tasks: AtomicUsize::new(0),
            poll_gap_ms: AtomicU64::new(gap),
            polls: AtomicU64::new(0),
            tasks_finished: AtomicU64::new(0),
        });
        self
    }

    /// Shares the send log and Retry-After with every process using the same
    /// credential: loads what the file holds now (so a restart right after a 429 waits
    /// it out), then reserves every request in the file before it goes. The database's
    /// request log is no longer used.
    pub fn with_shared_budget(mut self, budget: SharedBudget) -> Self {
        let now = self.clock.now_ms();
        match budget.reserve(now) {
            Ok(r) => {
                let (sent, not_before) = (r.state.sent_ms.clone(), r.state.not_before_ms);
                let unreadable = r.state.unreadable;
                drop(r);
                self.with_limiter(|l| l.replace_log(&sent));
                self.paused_until.fetch_max(not_before, Ordering::SeqCst);
                // (An unreadable file has said why it waits in its warning.)
                if not_before > now && !unreadable {
                    tracing::info!(
                        provider = %self.provider,
                        "waiting {:.1} s before the first request: the provider's Retry-After to a pixbatch process using this key (this database or another)",
                        (not_before - now) as f64 / 1000.0
                    );
                }
            }
            Err(e) => tracing::warn!(provider = %self.provider, "{e}"),
        }
        self.store = None;
        self.shared = Some(budget);
        self
    }

    /// [`ProviderGate::with_shared_budget`] with the credential's file in `dir`; when
    /// there is no state directory or it cannot be used, says so and keeps the
    /// database's own request log (the window is then not shared).
    pub fn with_shared_budget_in(
        self,
        dir: Option<&std::path::Path>,
        base_url: &str,
        credentials: &crate::providers::Credentials,
    ) -> Self {
        let Some(dir) = dir else {
            tracing::warn!(
                provider = %self.provider,
                "no state directory (set PIXBATCH_STATE_DIR or HOME): the rate window is not shared with other pixbatch processes"
            );
            return self;
        };
        let (keep_ms, keep_count) =
            self.with_limiter(|l| (l.longest_window_ms(), l.largest_count()));
        match SharedBudget::open(
            dir,
            self.provider,
            base_url,
            credentials,
            keep_ms,
            keep_count,
        ) {
            Ok(b) => self.with_shared_budget(b),
            Err(e) => {
                tracing::warn!(
                    provider = %self.provider,
                    "{e}: the rate window is not shared with other pixbatch processes"
                );
                self
            }
        }
    }

    /// Moves this process's entry `from` to the later `to` in the shared log.
    fn move_shared_entry(&self, from: u64, to: u64) {
        let Some(b) = &self.shared else {
            return;
        };
        let moved = b.reserve(to).and_then(|mut r| {
            match r.state.sent_ms.iter().rposition(|&t| t == from) {
                Some(p) => r.state.sent_ms[p] = to,
                None => r.state.sent_ms.push(to),
            }
            r.commit()
        });
        if let Err(e) = moved {
            tracing::warn!(provider = %self.provider, "{e}");
        }
    }

    /// The shared budget's state file, if the gate uses one.
    pub fn shared_budget_path(&self) -> Option<&std::path::Path> {
        self.shared.as_ref().map(|b| b.path())
    }

    /// Adapts the rate to the provider's answers (AIMD), never above the limits.
    pub fn with_adaptive_rate(mut self) -> Self {
        let ceiling = self.with_limiter(|l| {
            l.limits
                .iter()
                .map(|&(n, w)| n as f64 / w.max(1) as f64)
                .fold(f64::INFINITY, f64::min)
        });
        if ceiling.is_finite() && ceiling > 0.0 {
            self.adaptive = Some(AdaptiveRate {
                ceiling,
                rate: std::sync::Mutex::new(ceiling),
                last_sent: AtomicU64::new(0),
                last_decrease: AtomicU64::new(0),
            });
        }
        self
    }

    /// The adaptive rate now (requests per second), if the gate adapts.
    pub fn adaptive_rate_per_sec(&self) -> Option<f64> {
        self.adaptive.as_ref().map(AdaptiveRate::rate_per_sec)
    }

    /// The dispatcher's count of accepted tasks that need polls.
    pub fn set_live_tasks(&self, n: usize) {
        if let Some(k) = &self.keep_alive {
            k.live_tasks.store(n, Ordering::Relaxed);
        }
    }

    /// Whether `live_tasks` tasks can all be kept alive if one more request that
    /// starts new work goes now: every window must hold, at every moment of the next
    /// window length, what was sent, that request, and the polls the tasks will
    /// need by then. Always true for providers without a keep-alive, and for a
    /// single task (work must go on even when the limits are too tight to promise).
    pub fn keep_alive_fits(&self, live_tasks: usize) -> bool {
        let Some(k) = &self.keep_alive else {
            return true;
        };
        if live_tasks <= 1 {
            return true;
        }
        let now = self.clock.now_ms();
        self.with_limiter(|l| l.fits_with_reserve(now, |tau| k.reserve(live_tasks, tau)))
    }

    /// A poll was scheduled `wait` after the previous one.
    pub fn note_poll_gap(&self, wait: Duration) {
        if let Some(k) = &self.keep_alive {
            let w = wait.as_millis() as u64;
            let old = k.poll_gap_ms.load(Ordering::Relaxed);
            // Lean towards shorter gaps: they need more polls, the safe side.
            let new = if w < old { w } else { (old * 7 + w) / 8 };
            k.poll_gap_ms.store(
                new.clamp(1, (k.keep_alive_ms / 2).max(1)),
                Ordering::Relaxed,
            );
        }
    }

    /// A task stopped needing polls (finished, failed or lost).
    pub fn task_left_polling(&self) {
        if let Some(k) = &self.keep_alive {
            k.tasks_finished.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// How long an outage may last before jobs' attempts count again.
    pub fn with_outage_patience(mut self, patience: Duration) -> Self {
        self.outage_patience_ms = patience.as_millis() as u64;
        self
    }

    /// The provider looks down (and has not for longer than the patience): a failed
    /// request is the provider's fault, not the job's.
    pub fn excuses_failures(&self) -> bool {
        let since = self.outage_since.load(Ordering::SeqCst);
        since > 0 && self.clock.now_ms() < since + self.outage_patience_ms
    }

    /// Since when (ms) no request got any answer, with the last transport error;
    /// `None` while the provider answers (any status).
    pub fn unreachable_since(&self) -> Option<(u64, String)> {
        let since = self.unreachable_since.load(Ordering::SeqCst);
        (since > 0).then(|| {
            let last = self
                .last_unanswered
                .lock()
                .map(|l| l.clone())
                .unwrap_or_default();
            (since, last)
        })
    }

    /// The provider is halted: requests waiting here are released (and not sent),
    /// so its steps end at once instead of after a rate window or outage pause.
    /// `status` and the progress line show `detail` (the cause and what to fix).
    pub fn halt(&self, detail: String) {
        *self.halt_detail.lock().unwrap_or_else(|p| p.into_inner()) = Some(detail);
        self.halted.store(true, Ordering::SeqCst);
        self.halt_wake.notify_waiters();
    }

    /// Drops request-log entries older than the longest window.
    pub async fn prune(&self) {
        if let Some(store) = &self.store {
            let longest = self.with_limiter(|l| l.longest_window_ms());
            let before = self.clock.now_ms().saturating_sub(longest);
            if let Err(e) = store.prune_sent(self.provider, before) {
                tracing::warn!(provider = %self.provider, "could not prune the request log: {e}");
            }
        }
    }

    fn with_limiter<R>(&self, f: impl FnOnce(&mut SlidingLimiter) -> R) -> R {
        // A panic while holding this lock cannot leave the log half-written (every
        // method completes its change), so a poisoned lock is still usable.
        let mut guard = self.limiter.lock().unwrap_or_else(|p| p.into_inner());
        f(&mut guard)
    }

    /// New work was held back now so the polls of `tasks` tasks keep fitting (the
    /// dispatcher's check; the gate's own check notes it too).
    pub fn note_keep_alive_hold(&self, tasks: usize) {
        self.keep_alive_held_for.store(tasks, Ordering::Relaxed);
        self.keep_alive_held_at
            .store(self.clock.now_ms().max(1), Ordering::Relaxed);
    }

    fn set_waiting(&self, reason: Option<WaitReason>) {
        *self.waiting.lock().unwrap_or_else(|p| p.into_inner()) = reason;
    }

    /// Why this provider sends nothing now, if it does not: halted, then a pause
    /// (an outage's or a Retry-After's, whether or not a request waits on it), then
    /// a request waiting for the rate window, then new work held back for the
    /// keep-alive reserve (within the last second).
    pub fn wait_reason(&self) -> Option<WaitReason> {
        if let Some(detail) = self
            .halt_detail
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
        {
            return Some(WaitReason::Halted { detail });
        }
        let now = self.clock.now_ms();
        let paused = self.paused_until.load(Ordering::SeqCst);
        if paused > now {
            return Some(
                if paused <= self.outage_pause_until.load(Ordering::SeqCst) {
                    WaitReason::Outage { until_ms: paused }
                } else {
                    WaitReason::RetryAfter { until_ms: paused }
                },
            );
        }
        if let Some(w) = self
            .waiting
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
        {
            if w.until_ms().is_none_or(|t| t > now) {
                return Some(w);
            }
        }
        let held = self.keep_alive_held_at.load(Ordering::Relaxed);
        if held > 0 && now < held + 1_000 {
            let live_tasks = self.keep_alive_held_for.load(Ordering::Relaxed);
            return Some(WaitReason::KeepAliveReserve { live_tasks });
        }
        None
    }

    /// Requests admitted per second since the gate was made (the run's start).
    pub fn requests_per_sec(&self) -> f64 {
        let secs = (self.clock.start.elapsed().as_millis() as f64 / 1000.0).max(1.0);
        self.stats.admitted.load(Ordering::Relaxed) as f64 / secs
    }

    /// Milliseconds until the next request could go, for status lines.
    pub fn paused_for_ms(&self) -> u64 {
        self.paused_until
            .load(Ordering::SeqCst)
            .saturating_sub(self.clock.now_ms())
    }
}

impl ProviderGate {
    /// Counts an answer (healthy or not) toward the outage breaker.
    fn note_answer(&self, healthy: bool) {
        if let Some(a) = &self.adaptive {
            a.adjust(healthy, self.clock.now_ms());
        }
        if healthy {
            self.failures_in_a_row.store(0, Ordering::SeqCst);
            if self.outage_since.swap(0, Ordering::SeqCst) > 0 {
                self.outage_trips.store(0, Ordering::SeqCst);
                tracing::info!(provider = %self.provider, "answering again");
            }
            return;
        }
        let n = self.failures_in_a_row.fetch_add(1, Ordering::SeqCst) + 1;
        if n % OUTAGE_THRESHOLD != 0 {
            return;
        }
        let _ = self.outage_since.compare_exchange(
            0,
            self.clock.now_ms(),
            Ordering::SeqCst,
            Ordering::SeqCst,
        );
        let trips = self.outage_trips.fetch_add(1, Ordering::SeqCst).min(6);
        let pause = Duration::from_secs(5 << trips).min(Duration::from_secs(300));
        tracing::warn!(
            provider = %self.provider,
            "{n} requests in a row failed; the provider looks down: pausing its requests for {} s",
            pause.as_secs()
        );
        // An outage pause stays with this process: only the provider's own
        // Retry-After (a 429) is the credential's, shared through the budget file.
        self.pause(pause, false);
        self.outage_pause_until
            .fetch_max(self.paused_until.load(Ordering::SeqCst), Ordering::SeqCst);
    }
}

#[async_trait]
impl RequestGate for ProviderGate {
    async fn admit(&self, kind: RequestKind) {
        let urgent = kind.is_urgent();
        let started = self.clock.now_ms();
        if urgent {
            self.urgent_waiting.fetch_add(1, Ordering::SeqCst);
        }
        // Taken in turn (FIFO); a request that starts new work gives its turn back
        // while the polls of live tasks would not fit, so polls never queue behind it.
        let (turn, admitted_at, logged) = 'admission: loop {
            if !urgent {
                while self.urgent_waiting.load(Ordering::SeqCst) > 0 {
                    // The timeout only guards against a missed wake-up.
                    let _ = tokio::time::timeout(
                        Duration::from_millis(50),
                        self.urgent_done.notified(),
                    )
                    .await;
                }
            }
            let turn = self.turn.lock().await;
            loop {
                // With a shared budget, the file is locked from reading the log to
                // recording this request in it: no other process can take the same
                // slot. Held for a read and a write, never across an await.
                let reservation =
                    self.shared
                        .as_ref()
                        .and_then(|b| match b.reserve(self.clock.now_ms()) {
                            Ok(r) => Some(r),
                            Err(e) => {
                                tracing::warn!(provider = %self.provider, "{e}");
                                None
                            }
                        });
                if let Some(r) = &reservation {
                    self.with_limiter(|l| l.replace_log(&r.state.sent_ms));
                    self.paused_until
                        .fetch_max(r.state.not_before_ms, Ordering::SeqCst);
                }
                let now = self.clock.now_ms();
                if self.halted.load(Ordering::SeqCst) {
                    break 'admission (turn, now, false);
                }
                let mut free = self
                    .with_limiter(|l| l.next_free(now))
                    .max(self.paused_until.load(Ordering::SeqCst));
                if let Some(a) = &self.adaptive {
                    let spacing = a.spacing_ms();
                    if spacing > 0 {
                        free = free.max(a.last_sent.load(Ordering::SeqCst) + spacing);
                    }
                }
                if free <= now && !urgent {
                    if let Some(k) = &self.keep_alive {
                        // Only accepted tasks count here, plus the one this request
                        // may start: they end on their own, so the wait ends too.
                        let accepted = k.live_tasks.load(Ordering::Relaxed);
                        if !self.keep_alive_fits(accepted + 1) {
                            self.note_keep_alive_hold(accepted);
                            drop(reservation);
                            drop(turn);
                            tokio::time::sleep(Duration::from_millis(20)).await;
                            continue 'admission;
                        }
                    }
                }
                if free <= now {
                    // Recorded before the request goes: a process that reads the file
                    // next counts it, and so does a restart after a kill. Without
                    // limits there is no window to keep, only the Retry-After read.
                    let mut sent_at = now;
                    let mut logged = false;
                    if let Some(mut r) =
                        reservation.filter(|_| !self.with_limiter(|l| l.is_unlimited()))
                    {
                        r.state.sent_ms.push(now);
                        // The local log is the file's, this request included (the
                        // dispatcher's keep-alive checks read it between requests).
                        self.with_limiter(|l| l.replace_log(&r.state.sent_ms));
                        logged = true;
                        if let Err(e) = r.commit() {
                            tracing::warn!(provider = %self.provider, "{e}");
                        }
                        // The window counts from when the request leaves: a write
                        // slowed by a busy disk moves the entry to now (rare; a
                        // second write only then).
                        let after = self.clock.now_ms();
                        if after > now + 2 {
                            self.move_shared_entry(now, after);
                            self.with_limiter(|l| l.postpone(now, after));
                            sent_at = after;
                        }
                    }
                    break 'admission (turn, sent_at, logged);
                }
                let paused = self.paused_until.load(Ordering::SeqCst);
                // A pause shows as itself (see `wait_reason`); the window otherwise.
                if paused < free {
                    self.set_waiting(Some(WaitReason::RateWindow { until_ms: free }));
                }
                drop(reservation);
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_millis(free - now)) => {}
                    _ = self.halt_wake.notified() => {}
                }
            }
        };
        self.set_waiting(None);
        if let Some(a) = &self.adaptive {
            a.last_sent.store(admitted_at, Ordering::SeqCst);
        }
        if kind == RequestKind::Poll {
            if let Some(k) = &self.keep_alive {
                k.polls.fetch_add(1, Ordering::Relaxed);
            }
        }
        let unlimited = self.with_limiter(|l| {
            // With a shared budget the request is in the log already (see above).
            if !logged {
                l.record(admitted_at);
            }
            l.is_unlimited()
        });
        drop(turn);
        let mut sent_at = admitted_at;
        if let (Some(store), false) = (&self.store, unlimited) {
            // The send time is durable before the request goes: a run killed right
            // after a burst must not let the next run burst again (SPEC §4.4).
            // Concurrent requests share the flush (group commit).
            let persisted = store.record_sent(self.provider, admitted_at);
            let synced = match persisted {
                Ok(()) => store.sync().await,
                Err(e) => Err(e),
            };
            if let Err(e) = synced {
                tracing::warn!(provider = %self.provider, "could not record a request time: {e}");
            }
            // The flush took a moment; the window counts from when the request leaves.
            sent_at = self.clock.now_ms();
            if sent_at != admitted_at {
                self.with_limiter(|l| l.postpone(admitted_at, sent_at));
            }
        }
        if urgent {
            self.urgent_waiting.fetch_sub(1, Ordering::SeqCst);
            self.urgent_done.notify_waiters();
        }
        self.stats.admitted.fetch_add(1, Ordering::Relaxed);
        self.stats
            .waited_ms
            .fetch_add(sent_at.saturating_sub(started), Ordering::Relaxed);
    }

    fn is_halted(&self) -> bool {
        self.halted.load(Ordering::SeqCst)
    }

    fn answered(&self, healthy: bool) {
        // Any status is an answer: the host is reachable.
        self.unreachable_since.store(0, Ordering::SeqCst);
        self.note_answer(healthy);
    }

    fn unanswered(&self, why: &str) {
        let _ = self.unreachable_since.compare_exchange(
            0,
            self.clock.now_ms(),
            Ordering::SeqCst,
            Ordering::SeqCst,
        );
        if let Ok(mut last) = self.last_unanswered.lock() {
            *last = why.to_string();
        }
        self.note_answer(false);
    }

    fn back_off(&self, wait: Duration) {
        self.pause(wait, true);
    }
}

impl ProviderGate {
    /// Holds every request for `wait`; `share` also writes it to the credential's
    /// budget file.
    fn pause(&self, wait: Duration, share: bool) {
        if let Some(a) = &self.adaptive {
            a.adjust(false, self.clock.now_ms());
        }
        let until = self.clock.now_ms() + wait.as_millis() as u64;
        self.paused_until.fetch_max(until, Ordering::SeqCst);
        // The provider's "not before" holds for the credential: every process using
        // it, and this one after a restart, must wait it out too.
        if let Some(b) = self.shared.as_ref().filter(|_| share) {
            let kept = b.reserve(self.clock.now_ms()).and_then(|mut r| {
                if r.state.not_before_ms < until {
                    r.state.not_before_ms = until;
                    r.commit()
                } else {
                    Ok(())
                }
            });
            if let Err(e) = kept {
                tracing::warn!(provider = %self.provider, "could not share a Retry-After: {e}");
            }
        }
        self.stats.backoffs.fetch_add(1, Ordering::Relaxed);
        tracing::debug!(provider = %self.provider, wait_ms = wait.as_millis() as u64, "provider asked to slow down");
    }
}

/// Shared handle type the engine keeps per provider.
pub type SharedGate = Arc<ProviderGate>;

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(s: &str) -> RateSpec {
        s.parse().unwrap()
    }

    /// Drives the limiter as fast as it allows and returns the send times.
    fn drive(l: &mut SlidingLimiter, n: usize) -> Vec<u64> {
        let mut now = 0;
        let mut out = Vec::new();
        for _ in 0..n {
            now = l.next_free(now);
            l.record(now);
            out.push(now);
        }
        out
    }

    fn max_in_any_window(times: &[u64], w: u64) -> usize {
        times
            .iter()
            .map(|&start| {
                times
                    .iter()
                    .filter(|&&t| t >= start && t < start + w)
                    .count()
            })
            .max()
            .unwrap_or(0)
    }

    #[test]
    fn every_window_holds_at_once_and_the_burst_is_used() {
        let mut l = SlidingLimiter::new(&[spec("100/1m"), spec("100/5m")], Duration::ZERO);
        let times = drive(&mut l, 350);
        assert!(max_in_any_window(&times, 60_000) <= 100);
        assert!(max_in_any_window(&times, 300_000) <= 100);
        // The first 100 go at once; then one 5-minute window (plus 1 % margin) per 100.
        assert_eq!(times[99], 0);
        assert_eq!(times[100], 303_000);
        assert_eq!(times[300], 3 * 303_000);
    }

    #[test]
    fn the_margin_widens_each_window() {
        let mut l = SlidingLimiter::new(&[spec("10/1s")], Duration::from_millis(30));
        let times = drive(&mut l, 11);
        assert_eq!(times[10], 1_030);
    }

    #[test]
    fn replayed_history_delays_the_next_request() {
        let mut l = SlidingLimiter::new(&[spec("3/10s")], Duration::ZERO);
        for t in [1_000, 2_000, 3_000] {
            l.record(t);
        }
        assert_eq!(l.next_free(4_000), 11_100);
        assert_eq!(l.next_free(20_000), 20_000);
        assert_eq!(l.sent_within(4_000, 10_000), 3);
    }

    #[test]
    fn out_of_order_records_stay_sorted() {
        let mut l = SlidingLimiter::new(&[spec("2/1s")], Duration::ZERO);
        l.record(500);
        l.record(100);
        assert_eq!(l.next_free(600), 1_110);
    }

    /// Evidence for choosing a sliding log over governor (see the module comment):
    /// with the burst that never breaks "10 in any 1 s" (burst 1, interval 100 ms),
    /// GCRA needs 0.9 s for 10 requests the provider would take at once, so a run of
    /// k windows' worth takes k windows instead of k − 1.
    #[test]
    fn governor_gcra_cannot_use_a_window_in_full() {
        use governor::clock::{Clock, FakeRelativeClock};
        use governor::{Quota, RateLimiter};
        use std::num::NonZeroU32;

        let clock = FakeRelativeClock::default();
        // Burst 10 at 10 per second: the documented trap, 19 in one second.
        let loose = RateLimiter::direct_with_clock(
            Quota::per_second(NonZeroU32::new(10).unwrap()),
            clock.clone(),
        );
        let mut admitted = 0;
        for _ in 0..1000 {
            if loose.check().is_ok() {
                admitted += 1;
            } else {
                clock.advance(Duration::from_millis(10));
            }
            if clock.now() >= governor::nanos::Nanos::from(Duration::from_millis(999)) {
                break;
            }
        }
        assert!(
            admitted > 10,
            "burst 10 admitted {admitted} within one second"
        );

        // Burst 1: safe, but the 10th request waits 900 ms.
        let clock = FakeRelativeClock::default();
        let strict = RateLimiter::direct_with_clock(
            Quota::with_period(Duration::from_millis(100))
                .unwrap()
                .allow_burst(NonZeroU32::new(1).unwrap()),
            clock.clone(),
        );
        let mut sent = Vec::new();
        while sent.len() < 10 {
            if strict.check().is_ok() {
                sent.push(clock.now());
            } else {
                clock.advance(Duration::from_millis(1));
            }
        }
        assert_eq!(Duration::from(sent[9]), Duration::from_millis(900));

        // The sliding log sends all ten at once and never more than ten a second.
        let mut l = SlidingLimiter::new(&[spec("10/1s")], Duration::ZERO);
        let times = drive(&mut l, 10);
        assert_eq!(times[9], 0);
    }

    #[test]
    fn an_outage_trips_the_breaker_and_an_answer_resets_it() {
        let gate = ProviderGate::new(ProviderKind::Topaz, &[], Duration::ZERO, None);
        for _ in 0..OUTAGE_THRESHOLD - 1 {
            gate.answered(false);
        }
        assert!(!gate.excuses_failures());
        gate.answered(false);
        assert!(gate.excuses_failures());
        assert!(gate.paused_for_ms() > 4_000);
        gate.answered(true);
        assert!(!gate.excuses_failures());
        let impatient = ProviderGate::new(ProviderKind::Topaz, &[], Duration::ZERO, None)
            .with_outage_patience(Duration::ZERO);
        for _ in 0..OUTAGE_THRESHOLD {
            impatient.answered(false);
        }
        assert!(
            !impatient.excuses_failures(),
            "past its patience an outage counts again"
        );
    }

    #[test]
    fn unreachable_lasts_until_any_answer() {
        use crate::api::RequestGate;
        let gate = ProviderGate::new(ProviderKind::Topaz, &[], Duration::ZERO, None);
        assert!(gate.unreachable_since().is_none());
        gate.unanswered("cannot connect to 127.0.0.1:9: connection refused");
        let (since, why) = gate.unreachable_since().expect("unreachable");
        gate.unanswered("cannot connect to 127.0.0.1:9: connection refused (again)");
        let (later, why2) = gate.unreachable_since().expect("still");
        assert_eq!(since, later, "the first failure dates it");
        assert!(why.contains("127.0.0.1:9") && why2.ends_with("(again)"));
        // A 5xx is an answer: the host is there, only unwell.
        gate.answered(false);
        assert!(gate.unreachable_since().is_none());
    }

    #[tokio::test]
    async fn a_back_off_holds_every_request() {
        let gate = ProviderGate::new(ProviderKind::Topaz, &[spec("100/1s")], Duration::ZERO, None);
        gate.back_off(Duration::from_millis(300));
        let t = Instant::now();
        gate.admit(RequestKind::Poll).await;
        assert!(
            t.elapsed() >= Duration::from_millis(290),
            "{:?}",
            t.elapsed()
        );
    }

    #[test]
    fn the_reserve_counts_until_old_sends_leave_the_window() {
        let mut l = SlidingLimiter::new(&[spec("10/1s")], Duration::ZERO);
        for _ in 0..5 {
            l.record(0);
        }
        // Nothing to keep alive: five more fit.
        assert!(l.fits_with_reserve(100, |_| 0));
        // Two tasks polled every 200 ms until each has had 3 polls: at τ = 0 that is
        // 5 + 1 + 2, but just before the first sends leave (τ = 900) it is
        // 5 + 1 + 2 × 3 = 12 > 10.
        let reserve = |tasks: usize| move |tau: u64| tasks * ((tau / 200 + 1).min(3) as usize);
        assert!(!l.fits_with_reserve(100, reserve(2)));
        // One task: 5 + 1 + 3 = 9.
        assert!(l.fits_with_reserve(100, reserve(1)));
        // Once the old sends have left, two tasks fit again.
        assert!(l.fits_with_reserve(1_000, reserve(2)));
    }

    #[test]
    fn keep_alive_budget_grows_with_the_tasks_to_keep() {
        let gate = ProviderGate::new(
            ProviderKind::Perfect,
            &[spec("20/10s")],
            Duration::ZERO,
            None,
        )
        .with_keep_alive(Duration::from_secs(10), Duration::from_secs(2));
        // Gap 2 s, prior 6 polls per task: within 10 s each task needs up to 6.
        assert!(gate.keep_alive_fits(3));
        assert!(!gate.keep_alive_fits(4), "1 + 4 × 6 > 20");
        let plain = ProviderGate::new(ProviderKind::Topaz, &[spec("20/10s")], Duration::ZERO, None);
        assert!(plain.keep_alive_fits(1_000), "no keep-alive, no reserve");
    }

    #[tokio::test]
    async fn new_work_waits_for_the_polls_of_live_tasks_but_polls_do_not() {
        let gate = ProviderGate::new(
            ProviderKind::Perfect,
            &[spec("20/1s")],
            Duration::ZERO,
            None,
        )
        .with_keep_alive(Duration::from_millis(400), Duration::from_millis(100));
        gate.set_live_tasks(1);
        // The accepted task and the one a submission may start, polled every 100 ms
        // up to 6 times (the prior) within the window: 12 polls to keep room for, so
        // 8 requests fit (7 sent + 1 + 12 = 20) and the 9th must wait.
        for _ in 0..8 {
            gate.admit(RequestKind::Submit).await;
        }
        let blocked =
            tokio::time::timeout(Duration::from_millis(150), gate.admit(RequestKind::Submit)).await;
        assert!(blocked.is_err(), "a submission must wait for the reserve");
        let t = Instant::now();
        gate.admit(RequestKind::Poll).await;
        assert!(t.elapsed() < Duration::from_millis(50), "polls go first");
    }

    #[test]
    fn adaptive_rate_halves_once_per_event_and_creeps_back() {
        let gate = ProviderGate::new(ProviderKind::Dzine, &[spec("10/1s")], Duration::ZERO, None)
            .with_adaptive_rate();
        // 10 per 1 s, plus the 1 % window margin.
        let full = gate.adaptive_rate_per_sec().unwrap();
        assert!((full - 10.0 / 1.01).abs() < 1e-9, "{full}");
        let close = |a: f64, b: f64| (a - b).abs() < 1e-9;
        gate.back_off(Duration::ZERO);
        assert!(close(gate.adaptive_rate_per_sec().unwrap(), full / 2.0));
        // More trouble right after is the same event (requests already in flight).
        gate.answered(false);
        assert!(close(gate.adaptive_rate_per_sec().unwrap(), full / 2.0));
        // Trouble after the cooldown halves again.
        let a = gate.adaptive.as_ref().unwrap();
        let later = a.last_decrease.load(Ordering::SeqCst) + DECREASE_COOLDOWN_MS;
        a.adjust(false, later);
        assert!(close(gate.adaptive_rate_per_sec().unwrap(), full / 4.0));
        // +1 % of the ceiling per healthy answer.
        for _ in 0..25 {
            gate.answered(true);
        }
        assert!(close(gate.adaptive_rate_per_sec().unwrap(), full / 2.0));
        for _ in 0..1000 {
            gate.answered(true);
        }
        assert!(
            close(gate.adaptive_rate_per_sec().unwrap(), full),
            "never above the limit"
        );
    }

    #[tokio::test]
    async fn a_slowed_gate_spaces_its_requests() {
        let gate = ProviderGate::new(ProviderKind::Dzine, &[spec("100/1s")], Duration::ZERO, None)
            .with_adaptive_rate();
        let a = gate.adaptive.as_ref().unwrap();
        for event in 1..=4 {
            a.adjust(false, event * DECREASE_COOLDOWN_MS);
        }
        // 100/s halved four times (four events a cooldown apart): 6.25/s, one
        // request every 160 ms.
        let t = Instant::now();
        for _ in 0..3 {
            gate.admit(RequestKind::Query).await;
        }
        let e = t.elapsed();
        assert!(e >= Duration::from_millis(300), "{e:?}");
    }
}
