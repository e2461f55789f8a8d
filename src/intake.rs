//! From manifests to jobs: check every row, plan, and enqueue idempotently.
//!
//! One streaming pass over the files checks every row (its own validity, duplicates
//! across the manifests, conflicts with jobs already in the database) and counts the
//! plan; if any row is bad, nothing is written. The new jobs it finds go to a scratch
//! file beside the database (the spool) as they are checked, and only once every row
//! is known good are they read back and inserted in large batches, so the manifests
//! are read, parsed and validated (one file inspection per local input) once, not
//! twice. Memory stays small at a million rows: only the duplicate and output
//! trackers' fixed-size entries are kept. Outputs are checked against the database's
//! jobs (and earlier versions) too: one scan of it, at the first new row only.

use std::collections::BTreeMap;
use std::io::{BufReader, BufWriter, Read, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::config::Config;
use crate::manifest::{
    self, Collision, DuplicateTracker, ManifestError, OutputConflict, OutputTracker, RowError,
    RowStatus,
};
use crate::model::{now_ms, Job, JobSpec, Origin, ProviderKind};
use crate::store::{Store, StoreError};

#[derive(Debug, thiserror::Error)]
pub enum IntakeError {
    #[error(transparent)]
    Manifest(#[from] ManifestError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("enqueue scratch file {path}: {message}")]
    Spool { path: String, message: String },
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
    /// Rows that pass with a warning (a model or parameter pixbatch does not know;
    /// see [`crate::providers::Findings`]).
    pub warnings: Vec<RowError>,
}

/// Checks every row of `paths` (and against `store`, if given) and plans the work.
pub fn check(
    paths: &[PathBuf],
    store: Option<&Store>,
    config: &Config,
) -> Result<Checked, IntakeError> {
    check_into(paths, store, config, None)
}

/// [`check`], writing every new job to `spool` as well.
fn check_into(
    paths: &[PathBuf],
    store: Option<&Store>,
    config: &Config,
    mut spool: Option<&mut Spool>,
) -> Result<Checked, IntakeError> {
    let mut plan = Plan::default();
    let mut errors = Vec::new();
    let mut warnings = Vec::new();
    // Looked up once, not per row.
    let strict_kinds: Vec<ProviderKind> = ProviderKind::ALL
        .iter()
        .copied()
        .filter(|k| config.provider(*k).strict_params)
        .collect();
    let mut tracker = DuplicateTracker::new();
    let mut outputs = OutputTracker::new();
    // Rows whose output collides with a job in the database: named after the pass.
    let mut to_name: Vec<(usize, OutputConflict)> = Vec::new();
    let mut store_error = None;
    let mut spool_error = None;
    // An empty database holds none of the ids: no need to look each one up.
    let store = match store {
        Some(st) if st.total_jobs()? == 0 => None,
        other => other,
    };
    // The database's outputs are read at the first new row: a manifest run again
    // (every row already queued) costs no scan of the database.
    let mut claimed = false;
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
            if is_new {
                if let (Some(st), false) = (store, claimed) {
                    claimed = true;
                    if let Err(e) = claim_existing(st, &mut outputs) {
                        store_error.get_or_insert(e);
                        return;
                    }
                }
                if let Err(c) = outputs.check(&origin, &spec, false) {
                    push_conflict(&mut errors, &mut to_name, origin, c);
                    return;
                }
            }
            let p = plan.providers.entry(spec.provider).or_default();
            p.jobs += 1;
            if is_new {
                p.new_jobs += 1;
            }
            p.requests += crate::providers::requests_per_job(&spec) as u64;
            if is_new && errors.is_empty() && spool_error.is_none() {
                if let Some(spool) = spool.as_deref_mut() {
                    if let Err(e) = spool.push(&origin, &spec) {
                        spool_error = Some(e);
                    }
                }
            }
        };
        let strict = |kind: ProviderKind| strict_kinds.contains(&kind);
        manifest::read_manifest_warning(path, &strict, &mut on_row, &mut |w| warnings.push(w))?;
    }
    if let Some(e) = store_error {
        return Err(e.into());
    }
    if let Some(e) = spool_error {
        return Err(e);
    }
    if let Some(st) = store {
        name_conflicts(st, &mut errors, &to_name)?;
    }
    for (kind, p) in plan.providers.iter_mut() {
        p.least_time = least_time(p.requests, &config.provider(*kind).rate_limits);
    }
    Ok(Checked {
        plan,
        errors,
        warnings,
    })
}

/// Every job in the database, and every earlier version, owns its outputs' names.
pub(crate) fn claim_existing(store: &Store, outputs: &mut OutputTracker) -> Result<(), StoreError> {
    for job in store.all_jobs().chain(store.all_versions()) {
        outputs.add_existing(&job?.spec);
    }
    Ok(())
}

/// A row error for an output collision; one with a job in the database is named by
/// [`name_conflicts`] once the pass is over (the tracker keeps only hashes).
pub(crate) fn push_conflict(
    errors: &mut Vec<RowError>,
    to_name: &mut Vec<(usize, OutputConflict)>,
    origin: Origin,
    conflict: OutputConflict,
) {
    let reason = match &conflict.with {
        Collision::Row(at) if conflict.theirs_version => {
            conflict.reason(&format!("the new version (--update) of the row at {at}"))
        }
        Collision::Row(at) => conflict.reason(&format!("the row at {at}")),
        Collision::Database(_) => conflict.reason("a job in the database"),
    };
    if matches!(conflict.with, Collision::Database(_)) {
        to_name.push((errors.len(), conflict));
    }
    errors.push(RowError { origin, reason });
}

/// Puts the id and manifest line of the database's job into each collision with one.
pub(crate) fn name_conflicts(
    store: &Store,
    errors: &mut [RowError],
    to_name: &[(usize, OutputConflict)],
) -> Result<(), StoreError> {
    if to_name.is_empty() {
        return Ok(());
    }
    let wanted: std::collections::HashSet<u128> = to_name
        .iter()
        .filter_map(|(_, c)| match c.with {
            Collision::Database(k) => Some(k),
            Collision::Row(_) => None,
        })
        .collect();
    let mut names = std::collections::HashMap::new();
    for job in store.all_jobs() {
        let job = job?;
        let key = OutputTracker::owner_key(job.id());
        if wanted.contains(&key) {
            names.insert(
                key,
                format!("job {:?} in the database (from {})", job.id(), job.origin),
            );
        }
    }
    for job in store.all_versions() {
        let job = job?;
        let key = OutputTracker::owner_key(job.id());
        if wanted.contains(&key) && !names.contains_key(&key) {
            names.insert(
                key,
                format!(
                    "an earlier version of job {:?} in the database (from {})",
                    job.id(),
                    job.origin
                ),
            );
        }
    }
    for (i, c) in to_name {
        if let (Collision::Database(k), Some(e)) = (&c.with, errors.get_mut(*i)) {
            if let Some(name) = names.get(k) {
                e.reason = c.reason(name);
            }
        }
    }
    Ok(())
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
    /// Rows enqueued with a warning (see [`Checked::warnings`]).
    pub warnings: Vec<RowError>,
}

/// Jobs inserted per sled transaction: each transaction costs two small
/// synchronous log writes, so fewer, larger ones.
const INSERT_BATCH: usize = 10_000;

/// Checks, then (only if every row is good) adds the new jobs.
pub fn enqueue(
    paths: &[PathBuf],
    store: &Store,
    config: &Config,
) -> Result<Result<Enqueued, Vec<RowError>>, IntakeError> {
    let mut spool = Spool::create(&store.path())?;
    let checked = check_into(paths, Some(store), config, Some(&mut spool))?;
    if !checked.errors.is_empty() {
        return Ok(Err(checked.errors));
    }
    let now = now_ms();
    let mut batch: Vec<Job> = Vec::with_capacity(INSERT_BATCH);
    let mut added = 0u64;
    let mut reader = spool.read_back()?;
    while let Some((origin, spec)) = reader.next_job()? {
        batch.push(Job::new(spec, origin, now));
        if batch.len() >= INSERT_BATCH {
            store.insert_new(&batch)?;
            added += batch.len() as u64;
            batch.clear();
        }
    }
    if !batch.is_empty() {
        store.insert_new(&batch)?;
        added += batch.len() as u64;
    }
    store.flush()?;
    Ok(Ok(Enqueued {
        plan: checked.plan,
        added,
        warnings: checked.warnings,
    }))
}

/// The new jobs of one enqueue, length-prefixed bincode records in a scratch file
/// beside the database (not in a temp folder that may be memory-backed: a million
/// jobs take a few hundred MB). Removed when dropped.
struct Spool {
    path: PathBuf,
    out: Option<BufWriter<std::fs::File>>,
}

impl Spool {
    fn create(db: &Path) -> Result<Spool, IntakeError> {
        let mut name = db.file_name().map(|n| n.to_os_string()).unwrap_or_default();
        name.push(format!(".enqueue-{}.spool", std::process::id()));
        let path = db.with_file_name(name);
        let file = std::fs::File::create(&path).map_err(|e| spool_error(&path, e))?;
        Ok(Spool {
            out: Some(BufWriter::with_capacity(1 << 20, file)),
            path,
        })
    }

    fn push(&mut self, origin: &Origin, spec: &JobSpec) -> Result<(), IntakeError> {
        let record = bincode::serde::encode_to_vec((origin, spec), bincode::config::standard())
            .map_err(|e| spool_error(&self.path, e))?;
        let len = u32::try_from(record.len()).map_err(|e| spool_error(&self.path, e))?;
        if let Some(out) = &mut self.out {
            out.write_all(&len.to_le_bytes())
                .and_then(|_| out.write_all(&record))
                .map_err(|e| spool_error(&self.path, e))?;
        }
        Ok(())
    }

    fn read_back(&mut self) -> Result<SpoolReader<'_>, IntakeError> {
        if let Some(out) = self.out.take() {
            out.into_inner()
                .map_err(|e| spool_error(&self.path, e.error()))?;
        }
        let file = std::fs::File::open(&self.path).map_err(|e| spool_error(&self.path, e))?;
        Ok(SpoolReader {
            path: &self.path,
            input: BufReader::with_capacity(1 << 20, file),
            record: Vec::new(),
        })
    }
}

impl Drop for Spool {
    fn drop(&mut self) {
        self.out = None;
        let _ = std::fs::remove_file(&self.path);
    }
}

struct SpoolReader<'a> {
    path: &'a Path,
    input: BufReader<std::fs::File>,
    record: Vec<u8>,
}

impl SpoolReader<'_> {
    fn next_job(&mut self) -> Result<Option<(Origin, JobSpec)>, IntakeError> {
        let mut len = [0u8; 4];
        match self.input.read_exact(&mut len) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
            Err(e) => return Err(spool_error(self.path, e)),
        }
        self.record.resize(u32::from_le_bytes(len) as usize, 0);
        self.input
            .read_exact(&mut self.record)
            .map_err(|e| spool_error(self.path, e))?;
        let (job, _) = bincode::serde::decode_from_slice(&self.record, bincode::config::standard())
            .map_err(|e| spool_error(self.path, e))?;
        Ok(Some(job))
    }
}

fn spool_error(path: &Path, e: impl std::fmt::Display) -> IntakeError {
    IntakeError::Spool {
        path: path.display().to_string(),
        message: e.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::StoreOptions;

    #[test]
    fn enqueue_goes_through_the_spool_once_and_leaves_nothing_behind() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        std::fs::copy(
            concat!(env!("CARGO_MANIFEST_DIR"), "/examples/images/tiny.png"),
            d.join("a.png"),
        )
        .unwrap();
        std::fs::write(d.join("c.toml"), "").unwrap();
        let config = Config::load(Some(&d.join("c.toml")), &|_| None).unwrap();
        let good = d.join("good.csv");
        std::fs::write(
            &good,
            "id,provider,operation,input\nj1,topaz,enhance,a.png\nj2,topaz,enhance,a.png\nj1,topaz,enhance,a.png\n",
        )
        .unwrap();
        let bad = d.join("bad.csv");
        std::fs::write(
            &bad,
            "id,provider,operation,input\nj3,topaz,enhance,a.png\nj4,nope,enhance,a.png\n",
        )
        .unwrap();
        let store = Store::open(&d.join("db"), &StoreOptions::default()).unwrap();

        let done = enqueue(std::slice::from_ref(&good), &store, &config)
            .unwrap()
            .unwrap();
        assert_eq!((done.added, done.plan.repeats), (2, 1));
        assert!(store.get("j2").unwrap().is_some());
        let again = enqueue(&[good], &store, &config).unwrap().unwrap();
        assert_eq!((again.added, again.plan.already_queued), (0, 2));
        // A bad row anywhere: nothing from that command is added, not even good rows.
        let errors = enqueue(&[bad], &store, &config).unwrap().unwrap_err();
        assert_eq!(errors.len(), 1);
        assert!(store.get("j3").unwrap().is_none());
        assert_eq!(store.total_jobs().unwrap(), 2);
        let leftovers: Vec<_> = std::fs::read_dir(d)
            .unwrap()
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().contains("spool"))
            .collect();
        assert!(leftovers.is_empty(), "{leftovers:?}");
    }

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
