//! The spend gate: what `run --max-credits` consults before a job's submission starts.
//!
//! Every submission started is written to the store's spend ledger under its submit
//! key (`<job id>~<n>`) with its estimated cost, before the paid request goes out
//! (the step's intent sync makes it durable with the intent). So the spend survives
//! restarts: a second run with the same cap counts what the first one started and
//! does not spend the cap again. A submission retried under the same key (a 5xx, a
//! crash between intent and answer) is counted once; a new key (the provider lost
//! the task, a task failed and is sent again, `retry` of a job the provider had
//! accepted) is counted again, as the provider may charge again. Counting starts at
//! the intent, not at the provider's charge: a submission the provider refuses is
//! counted too, so the figure errs on the high side.
//!
//! Once the next job would bring a provider's spend past its cap, that provider
//! starts no new work in this run; jobs already submitted are finished.
//!
//! Runs without a cap record their submissions too (at the configured or
//! documented price, or "unknown"), so a later capped run counts them; unknown
//! prices are then estimated like new jobs.

use std::collections::BTreeMap;
use std::sync::Mutex;

use crate::cost::{self, Estimator};
use crate::engine::Lane;
use crate::model::{Job, ProviderKind};
use crate::store::{Store, StoreError};

/// The caps of a run: one for every provider, or per provider.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Caps {
    pub all: Option<f64>,
    pub per_provider: BTreeMap<ProviderKind, f64>,
}

impl Caps {
    /// The cap of `kind`, in its own unit.
    pub fn of(&self, kind: ProviderKind) -> Option<f64> {
        self.per_provider.get(&kind).copied().or(self.all)
    }

    pub fn is_empty(&self) -> bool {
        self.all.is_none() && self.per_provider.is_empty()
    }

    /// Adds one `--max-credits` value: `N` (every provider) or `PROVIDER=N`.
    pub fn add(&mut self, text: &str) -> Result<(), String> {
        let number = |s: &str| -> Result<f64, String> {
            s.trim()
                .parse::<f64>()
                .ok()
                .filter(|n| n.is_finite() && *n >= 0.0)
                .ok_or_else(|| {
                    format!("--max-credits {text:?}: expected a number ≥ 0, or PROVIDER=NUMBER")
                })
        };
        match text.split_once('=') {
            Some((p, n)) => {
                let kind: ProviderKind = p.parse()?;
                self.per_provider.insert(kind, number(n)?);
            }
            None => self.all = Some(number(text)?),
        }
        Ok(())
    }
}

/// One provider's spend, for the summary.
#[derive(Debug, Clone, PartialEq)]
pub struct ProviderSpend {
    pub kind: ProviderKind,
    pub unit: &'static str,
    pub cap: Option<f64>,
    /// Estimated spend of every submission this database has started.
    pub spent: f64,
    /// Submissions recorded without a known price (runs without a cap).
    pub unknown: u64,
    /// Submissions started by this run, and their estimated cost.
    pub started_this_run: u64,
    pub spent_this_run: f64,
    /// Why new work stopped, when the cap stopped it.
    pub stopped: Option<String>,
    /// It stopped because a job's price is unknown, not because the cap was reached
    /// (the summary must not say "cap reached" then).
    pub price_unknown: bool,
}

#[derive(Default)]
struct State {
    spend: BTreeMap<ProviderKind, ProviderSpend>,
}

pub struct SpendGate {
    caps: Caps,
    /// `cost_per_job` per provider.
    configured: BTreeMap<ProviderKind, f64>,
    state: Mutex<State>,
    /// Estimates per provider (asked once per parameter set); a tokio lock, as an
    /// estimate is a request.
    estimators: tokio::sync::Mutex<BTreeMap<ProviderKind, Estimator>>,
    /// Estimates learned, for the dispatcher's decisions without waiting.
    known: Mutex<Known>,
    /// Whether `load` sums the ledger of earlier runs: needed for a cap and for
    /// `--on-finish`'s database totals, and skipped otherwise, because it reads one
    /// entry per submission ever made (a million at the sizes users run) before the
    /// first request.
    earlier_runs: bool,
}

#[derive(Default)]
struct Known {
    prices: std::collections::HashMap<cost::GroupKey, f64>,
    /// Groups whose estimate is being asked for.
    asking: std::collections::HashSet<cost::GroupKey>,
}

/// The dispatcher's answer for one job.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Admission {
    Go,
    /// The cap stopped the provider's new work.
    Stop,
    /// Its price is being asked for; look again soon.
    Wait,
}

enum Priced {
    Known(f64),
    Asking,
    Never(String),
}

impl SpendGate {
    pub fn new(caps: Caps, config: &crate::config::Config) -> SpendGate {
        let configured = config
            .providers
            .iter()
            .filter_map(|(k, pc)| pc.cost_per_job.map(|c| (*k, c)))
            .collect();
        SpendGate {
            earlier_runs: !caps.is_empty(),
            caps,
            configured,
            state: Mutex::default(),
            estimators: Default::default(),
            known: Mutex::default(),
        }
    }

    /// No cap: records, never refuses.
    pub fn uncapped(config: &crate::config::Config) -> SpendGate {
        SpendGate::new(Caps::default(), config)
    }

    /// Sums the earlier runs' spend at the start even without a cap (for a summary
    /// that reports the database's total).
    pub fn with_earlier_runs(mut self) -> SpendGate {
        self.earlier_runs = true;
        self
    }

    pub fn caps(&self) -> &Caps {
        &self.caps
    }

    /// Sums the ledger (before the first admission). For a capped provider,
    /// submissions recorded without a price are priced now, like new jobs.
    pub(crate) async fn load(
        &self,
        store: &Store,
        lanes: &BTreeMap<ProviderKind, std::sync::Arc<Lane>>,
    ) -> Result<(), StoreError> {
        if !self.earlier_runs {
            return Ok(());
        }
        let mut spent: BTreeMap<ProviderKind, f64> = BTreeMap::new();
        let mut unpriced: Vec<(ProviderKind, String)> = Vec::new();
        let mut unknown: BTreeMap<ProviderKind, u64> = BTreeMap::new();
        for entry in store.spend_entries() {
            let entry = entry?;
            match entry.cost {
                Some(c) => *spent.entry(entry.provider).or_default() += c,
                None if self.caps.of(entry.provider).is_some() => {
                    unpriced.push((entry.provider, entry.key))
                }
                None => *unknown.entry(entry.provider).or_default() += 1,
            }
        }
        let mut unpriceable: BTreeMap<ProviderKind, u64> = BTreeMap::new();
        for (kind, key) in unpriced {
            let id = key.rsplit_once('~').map(|(id, _)| id).unwrap_or(&key);
            let price = match (store.get(id)?, lanes.get(&kind)) {
                (Some(job), Some(lane)) => self.price(lane, &job).await.ok(),
                (Some(job), None) => self.fixed_price(&job),
                _ => None,
            };
            match price {
                Some(c) => *spent.entry(kind).or_default() += c,
                None => *unpriceable.entry(kind).or_default() += 1,
            }
        }
        let mut state = self.lock();
        for (kind, s) in spent {
            self.entry(&mut state, kind).spent += s;
        }
        for (kind, n) in unknown {
            self.entry(&mut state, kind).unknown += n;
        }
        for (kind, n) in unpriceable {
            let e = self.entry(&mut state, kind);
            e.unknown += n;
            e.stopped = Some(format!(
                "{n} earlier submission(s) have no known price, so the spend cannot be checked against the cap; set [providers.{kind}] cost_per_job"
            ));
        }
        Ok(())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn entry<'a>(&self, state: &'a mut State, kind: ProviderKind) -> &'a mut ProviderSpend {
        state.spend.entry(kind).or_insert_with(|| ProviderSpend {
            kind,
            unit: crate::providers::cost_unit(kind),
            cap: self.caps.of(kind),
            spent: 0.0,
            unknown: 0,
            started_this_run: 0,
            spent_this_run: 0.0,
            stopped: None,
            price_unknown: false,
        })
    }

    /// A price that needs no request: configured, or the document's maximum.
    fn fixed_price(&self, job: &Job) -> Option<f64> {
        let kind = job.spec.provider;
        self.configured
            .get(&kind)
            .copied()
            .or_else(|| crate::providers::documented_max_cost(&job.spec))
    }

    /// The job's price: configured, else the provider's estimate, else the document's.
    async fn price(&self, lane: &Lane, job: &Job) -> Result<f64, String> {
        if let Some(&c) = self.configured.get(&job.spec.provider) {
            return Ok(c);
        }
        if lane.adapter.can_estimate() {
            let key = cost::group_key(&job.spec);
            let mut estimators = self.estimators.lock().await;
            let est = estimators
                .entry(lane.kind)
                .or_insert_with(|| Estimator::new(lane.adapter.clone(), lane.api.clone()));
            return est.price(key, &job.spec).await;
        }
        crate::providers::documented_max_cost(&job.spec).ok_or_else(|| {
            format!(
                "{}'s API does not tell what a job costs; set [providers.{}] cost_per_job",
                lane.kind, lane.kind
            )
        })
    }

    /// Whether the cap has stopped new work for `kind`.
    pub fn is_stopped(&self, kind: ProviderKind) -> bool {
        self.lock()
            .spend
            .get(&kind)
            .is_some_and(|s| s.stopped.is_some())
    }

    /// Whether `kind` has a cap (its jobs are admitted by the dispatcher, in queue
    /// order, through [`SpendGate::admit_in_order`]).
    pub fn caps_provider(&self, kind: ProviderKind) -> bool {
        self.caps.of(kind).is_some()
    }

    /// The dispatcher's decision for job `id` of a capped provider, taken in queue
    /// order so the cap stops at the same job every time: the jobs before it fit,
    /// it does not. A price that needs the provider's estimate is asked for by a
    /// task of its own (the dispatcher never waits on the network); until it is
    /// known the answer is `Wait`.
    pub(crate) fn admit_in_order(
        self: &std::sync::Arc<Self>,
        lane: &std::sync::Arc<Lane>,
        store: &Store,
        id: &str,
    ) -> Result<Admission, StoreError> {
        let Some(job) = store.get(id)? else {
            return Ok(Admission::Go);
        };
        let kind = job.spec.provider;
        let key = next_submit_key(&job);
        if store.spend_recorded(&key)? {
            return Ok(Admission::Go);
        }
        let Some(cap) = self.caps.of(kind) else {
            return Ok(Admission::Go);
        };
        if self.is_stopped(kind) {
            return Ok(Admission::Stop);
        }
        let cost = match self.price_now(lane, &job) {
            Priced::Known(c) => c,
            Priced::Asking => return Ok(Admission::Wait),
            Priced::Never(reason) => {
                let mut state = self.lock();
                let e = self.entry(&mut state, kind);
                if e.stopped.is_none() {
                    e.stopped = Some(reason);
                    e.price_unknown = true;
                }
                return Ok(Admission::Stop);
            }
        };
        let mut state = self.lock();
        let entry = self.entry(&mut state, kind);
        // A small tolerance: prices like 0.4 do not add up exactly in binary.
        if entry.spent + cost > cap + 1e-9 {
            entry.stopped = Some(format!(
                "the next job, {}, at {} {}, would bring the estimated spend to {} of the {} {} allowed",
                job.id(),
                cost::amount(cost),
                entry.unit,
                cost::amount(entry.spent + cost),
                cost::amount(cap),
                entry.unit
            ));
            return Ok(Admission::Stop);
        }
        if store.record_spend(&key, kind, Some(cost))? {
            entry.spent += cost;
            entry.started_this_run += 1;
            entry.spent_this_run += cost;
        }
        Ok(Admission::Go)
    }

    /// A price without waiting: configured, a known estimate, or the document's.
    /// An estimate not yet known is asked for in the background.
    fn price_now(self: &std::sync::Arc<Self>, lane: &std::sync::Arc<Lane>, job: &Job) -> Priced {
        if let Some(&c) = self.configured.get(&job.spec.provider) {
            return Priced::Known(c);
        }
        if !lane.adapter.can_estimate() {
            return match crate::providers::documented_max_cost(&job.spec) {
                Some(c) => Priced::Known(c),
                None => Priced::Never(format!(
                    "{}'s API does not tell what a job costs; set [providers.{}] cost_per_job",
                    lane.kind, lane.kind
                )),
            };
        }
        let key = cost::group_key(&job.spec);
        {
            let mut known = self.known.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(c) = known.prices.get(&key) {
                return Priced::Known(*c);
            }
            if !known.asking.insert(key) {
                return Priced::Asking;
            }
        }
        let gate = self.clone();
        let lane = lane.clone();
        let spec = job.spec.clone();
        tokio::spawn(async move {
            let priced = {
                let mut estimators = gate.estimators.lock().await;
                let est = estimators
                    .entry(lane.kind)
                    .or_insert_with(|| Estimator::new(lane.adapter.clone(), lane.api.clone()));
                est.price(key, &spec).await
            };
            let mut known = gate.known.lock().unwrap_or_else(|p| p.into_inner());
            known.asking.remove(&key);
            match priced {
                Ok(c) => {
                    known.prices.insert(key, c);
                }
                Err(reason) => {
                    drop(known);
                    gate.stop(lane.kind, reason);
                }
            }
        });
        Priced::Asking
    }

    /// The step's check before a job's new work starts: records the submission of
    /// an uncapped provider; a capped provider's job must have been admitted by
    /// the dispatcher already (its key is recorded), else it waits for that.
    pub(crate) async fn admit(
        &self,
        _lane: &Lane,
        store: &Store,
        job: &Job,
    ) -> Result<bool, StoreError> {
        let kind = job.spec.provider;
        let key = next_submit_key(job);
        if store.spend_recorded(&key)? {
            return Ok(true);
        }
        if self.caps.of(kind).is_some() {
            return Ok(false);
        }
        let cost = self.fixed_price(job);
        if store.record_spend(&key, kind, cost)? {
            self.add(kind, cost);
        }
        Ok(true)
    }

    /// A submission started outside the gate (sent again after an outcome that
    /// cannot be known: a possible duplicate charge). Counted, never refused: the
    /// job is already under way.
    pub(crate) fn note_resubmission(&self, store: &Store, job: &Job) -> Result<(), StoreError> {
        let kind = job.spec.provider;
        let cost = self.fixed_price(job).or_else(|| {
            // The estimate of its group, if this run asked for it.
            let known = self.known.lock().unwrap_or_else(|p| p.into_inner());
            known.prices.get(&cost::group_key(&job.spec)).copied()
        });
        if store.record_spend(&job.submit_key(), kind, cost)? {
            self.add(kind, cost);
        }
        Ok(())
    }

    fn add(&self, kind: ProviderKind, cost: Option<f64>) {
        let mut state = self.lock();
        let e = self.entry(&mut state, kind);
        e.started_this_run += 1;
        match cost {
            Some(c) => {
                e.spent += c;
                e.spent_this_run += c;
            }
            None => e.unknown += 1,
        }
    }

    fn stop(&self, kind: ProviderKind, reason: String) {
        let mut state = self.lock();
        let e = self.entry(&mut state, kind);
        if e.stopped.is_none() {
            e.stopped = Some(reason);
        }
    }

    /// Every provider with a cap or a submission recorded.
    pub fn report(&self) -> Vec<ProviderSpend> {
        self.lock().spend.values().cloned().collect()
    }

    /// The providers whose new work the cap stopped.
    pub fn stopped(&self) -> Vec<ProviderSpend> {
        self.report()
            .into_iter()
            .filter(|s| s.stopped.is_some())
            .collect()
    }
}

/// Per provider, what the ledger holds: (estimated spend of the priced submissions,
/// priced submissions, submissions without a price).
pub fn ledger_totals(store: &Store) -> Result<BTreeMap<ProviderKind, (f64, u64, u64)>, StoreError> {
    let mut out: BTreeMap<ProviderKind, (f64, u64, u64)> = BTreeMap::new();
    for entry in store.spend_entries() {
        let entry = entry?;
        let t = out.entry(entry.provider).or_default();
        match entry.cost {
            Some(c) => {
                t.0 += c;
                t.1 += 1;
            }
            None => t.2 += 1,
        }
    }
    Ok(out)
}

/// The key the job's next submission will carry (`prepare_and_submit` makes the
/// first one `~1`).
pub fn next_submit_key(job: &Job) -> String {
    format!("{}~{}", job.id(), job.submissions.max(1))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::StoreOptions;

    #[test]
    fn the_ledger_counts_each_submit_key_once() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("db"), &StoreOptions::default()).unwrap();
        assert!(store
            .record_spend("a~1", ProviderKind::Topaz, Some(2.0))
            .unwrap());
        assert!(!store
            .record_spend("a~1", ProviderKind::Topaz, Some(9.0))
            .unwrap());
        assert!(store
            .record_spend("a~2", ProviderKind::Topaz, Some(0.5))
            .unwrap());
        assert!(store
            .record_spend("b~1", ProviderKind::Dzine, None)
            .unwrap());
        assert!(store.spend_recorded("a~2").unwrap());
        assert!(!store.spend_recorded("a~3").unwrap());
        let totals = ledger_totals(&store).unwrap();
        assert_eq!(totals[&ProviderKind::Topaz], (2.5, 2, 0));
        assert_eq!(totals[&ProviderKind::Dzine], (0.0, 0, 1));
    }

    #[test]
    fn caps_parse_for_all_or_one_provider() {
        let mut c = Caps::default();
        c.add("10").unwrap();
        c.add("topaz=2.5").unwrap();
        assert_eq!(c.of(ProviderKind::Topaz), Some(2.5));
        assert_eq!(c.of(ProviderKind::Dzine), Some(10.0));
        for bad in ["-1", "x", "nope=3", "topaz=", "inf"] {
            assert!(Caps::default().add(bad).is_err(), "{bad}");
        }
        let mut only = Caps::default();
        only.add("dzine=100").unwrap();
        assert_eq!(only.of(ProviderKind::Topaz), None);
    }
}
