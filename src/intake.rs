//! From manifests to jobs: check every row, plan, and enqueue idempotently.
//!
//! Two passes over the files, both streaming. The first checks every row (its own
//! validity, duplicates across the manifests, conflicts with jobs already in the
//! database) and counts the plan; if any row is bad, nothing is written. The second
//! reads the files again and inserts the new jobs in batches. Memory stays small at
//! a million rows: only the duplicate tracker's fixed-size entries are kept.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use crate::config::Config;
use crate::manifest::{self, DuplicateTracker, ManifestError, RowError, RowStatus};
use crate::model::{now_ms, EventKind, Job, JobEvent, ProviderKind};
use crate::store::{Store, StoreError};

#[derive(Debug, thiserror::Error)]
pub enum IntakeError {
    #[error(transparent)]
    Manifest(#[from] ManifestError),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Per provider: what the manifests ask for.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ProviderPlan {
    pub jobs: u64,
    /// Jobs not yet in the database (what `enqueue` would add).
    pub new_jobs: u64,
    /// Rate-limited requests the jobs need (typical: polls vary with task time).
    pub requests: u64,
    /// The least time the configured limits allow for those requests.
    pub least_time: Duration,
}

#[derive(Debug, Clone, Default)]
pub struct Plan {
    pub rows: u64,
    /// Rows that repeat an earlier row exactly (not a second job).
    pub repeats: u64,
    /// Rows whose job is already in the database with the same content.
    pub already_queued: u64,
    pub providers: BTreeMap<ProviderKind, ProviderPlan>,
}

pub struct Checked {
    pub plan: Plan,
    pub errors: Vec<RowError>,
}

/// Checks every row of `paths` (and against `store`, if given) and plans the work.
pub fn check(
    paths: &[PathBuf],
    store: Option<&Store>,
    config: &Config,
) -> Result<Checked, IntakeError> {
    let mut plan = Plan::default();
    let mut errors = Vec::new();
    let mut tracker = DuplicateTracker::new();
    let mut store_error = None;
    for path in paths {
        let mut on_row = |row: Result<(crate::model::Origin, crate::model::JobSpec), RowError>| {
            plan.rows += 1;
            let (origin, spec) = match row {
                Ok(r) => r,
                Err(e) => {
                    errors.push(e);
                    return;
                }
            };
            match tracker.check(&origin, &spec) {
                Err(e) => {
                    errors.push(e);
                    return;
                }
                Ok(RowStatus::Repeat) => {
                    plan.repeats += 1;
                    return;
                }
                Ok(RowStatus::New) => {}
            }
            let mut is_new = true;
            if let Some(store) = store {
                match store.get(&spec.id) {
                    Ok(Some(existing)) => {
                        if existing.content_hash == spec.content_hash() {
                            is_new = false;
                            plan.already_queued += 1;
                        } else {
                            errors.push(RowError {
                                reason: format!(
                                    "id {:?} is already in the database from {} with different content",
                                    spec.id, existing.origin
                                ),
                                origin,
                            });
                            return;
                        }
                    }
                    Ok(None) => {}
                    Err(e) => {
                        store_error.get_or_insert(e);
                        return;
                    }
                }
            }
            let p = plan.providers.entry(spec.provider).or_default();
            p.jobs += 1;
            if is_new {
                p.new_jobs += 1;
            }
            p.requests += crate::providers::requests_per_job(&spec) as u64;
        };
        manifest::read_manifest(path, &mut on_row)?;
    }
    if let Some(e) = store_error {
        return Err(e.into());
    }
    for (kind, p) in plan.providers.iter_mut() {
        p.least_time = least_time(p.requests, &config.provider(*kind).rate_limits);
    }
    Ok(Checked { plan, errors })
}

/// The least time in which `requests` can be sent under every limit: with "N in any
/// window W" the best is bursts of N one window apart, so the last request goes at
/// ⌊(R−1)/N⌋·W. Several limits: the strictest.
pub fn least_time(requests: u64, limits: &[crate::rate::RateSpec]) -> Duration {
    if requests == 0 {
        return Duration::ZERO;
    }
    limits
        .iter()
        .map(|l| l.window * ((requests - 1) / l.count.max(1) as u64) as u32)
        .max()
        .unwrap_or(Duration::ZERO)
}

/// What `enqueue` did.
#[derive(Debug, Clone, Default)]
pub struct Enqueued {
    pub plan: Plan,
    pub added: u64,
}

/// Checks, then (only if every row is good) adds the new jobs.
pub fn enqueue(
    paths: &[PathBuf],
    store: &Store,
    config: &Config,
) -> Result<Result<Enqueued, Vec<RowError>>, IntakeError> {
    let checked = check(paths, Some(store), config)?;
    if !checked.errors.is_empty() {
        return Ok(Err(checked.errors));
    }
    let now = now_ms();
    let mut batch: Vec<Job> = Vec::with_capacity(1024);
    let mut added = 0u64;
    let mut tracker = DuplicateTracker::new();
    let mut failure: Option<StoreError> = None;
    let flush_batch = |batch: &mut Vec<Job>, added: &mut u64| -> Result<(), StoreError> {
        if batch.is_empty() {
            return Ok(());
        }
        store.insert_new(batch)?;
        for job in batch.iter() {
            store.add_event(
                job.id(),
                &JobEvent {
                    at_ms: now,
                    kind: EventKind::Enqueued,
                    message: format!("enqueued from {}", job.origin),
                },
            )?;
        }
        *added += batch.len() as u64;
        batch.clear();
        Ok(())
    };
    for path in paths {
        let mut on_row = |row: Result<(crate::model::Origin, crate::model::JobSpec), RowError>| {
            if failure.is_some() {
                return;
            }
            let Ok((origin, spec)) = row else { return };
            if !matches!(tracker.check(&origin, &spec), Ok(RowStatus::New)) {
                return;
            }
            match store.get(&spec.id) {
                Ok(Some(_)) => return,
                Ok(None) => {}
                Err(e) => {
                    failure = Some(e);
                    return;
                }
            }
            batch.push(Job::new(spec, origin, now));
            if batch.len() >= 1000 {
                if let Err(e) = flush_batch(&mut batch, &mut added) {
                    failure = Some(e);
                }
            }
        };
        manifest::read_manifest(path, &mut on_row)?;
        if let Some(e) = failure.take() {
            return Err(e.into());
        }
    }
    flush_batch(&mut batch, &mut added)?;
    store.flush()?;
    Ok(Ok(Enqueued {
        plan: checked.plan,
        added,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn least_time_uses_bursts_of_a_whole_window() {
        let l = |s: &str| s.parse::<crate::rate::RateSpec>().unwrap();
        assert_eq!(least_time(0, &[l("10/1s")]), Duration::ZERO);
        assert_eq!(least_time(10, &[l("10/1s")]), Duration::ZERO);
        assert_eq!(least_time(11, &[l("10/1s")]), Duration::from_secs(1));
        assert_eq!(
            least_time(1000, &[l("100/1m"), l("100/5m")]),
            Duration::from_secs(9 * 300)
        );
        assert_eq!(least_time(5, &[]), Duration::ZERO);
    }
}
