//! The persistent queue, on sled.
//!
//! Trees:
//! - `jobs`: job id → versioned record (`FORMAT_VERSION` byte + bincode of `Job`).
//! - `index`: `state u8 | provider u8 | due_ms u64 BE | job id` → (). "The next due
//!   jobs of provider P in state S" is a prefix range scan, in due order.
//! - `counts`: `state u8 | provider u8` → u64 BE. Kept in the same transaction as the
//!   index, so `status` never scans the queue.
//! - `events`: `job id | 0x00 | seq u64 BE` → versioned `JobEvent` (attempts, errors,
//!   reconciliations, possible duplicate charges).
//! - `rate_log`: `provider u8 | sent_ms u64 BE | seq` → (): the send time of every
//!   request in the last window, so a restarted run does not burst past a limit.
//! - `spend`: submit key (`<job id>~<n>`) → `provider u8 | cost f64 BE` (NaN: not
//!   known when recorded): every submission started, so a spend cap holds across runs.
//! - `versions`: `job id | 0x00 | version u32 BE` → versioned `Job`: earlier versions of
//!   a job replaced by `enqueue --update`, kept for its history.
//! - `meta`: the database's format version.
//!
//! Writes land in sled's memory first. [`Store::sync`] makes everything written so
//! far durable; concurrent callers share one flush (group commit), so durability
//! costs one fsync per batch of state changes, not one per request.
//!
//! Nothing outside this module names sled.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use sled::transaction::{ConflictableTransactionError, TransactionError};
use sled::Transactional;
use tokio::sync::{watch, Notify};

use crate::model::{Job, JobEvent, JobState, ProviderKind};

/// The record format this build writes. Records carry it in their first byte; a
/// record with a higher number was written by a newer pixbatch and is refused, not
/// misread.
pub const FORMAT_VERSION: u8 = 1;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("database {path}: {message}")]
    Open { path: String, message: String },
    #[error("database error: {0}")]
    Sled(String),
    #[error("record {key} has format version {found}, newer than this pixbatch understands ({FORMAT_VERSION}); use a newer pixbatch")]
    NewerFormat { key: String, found: u8 },
    #[error("record {key} is corrupt: {reason}")]
    Corrupt { key: String, reason: String },
    #[error("could not make the database durable: {0}")]
    Flush(String),
}

impl From<sled::Error> for StoreError {
    fn from(e: sled::Error) -> Self {
        StoreError::Sled(e.to_string())
    }
}

pub type Result<T> = std::result::Result<T, StoreError>;

/// Settings for opening a database.
#[derive(Debug, Clone)]
pub struct StoreOptions {
    /// sled's page cache; its default (1 GiB) is far more than a queue needs.
    pub cache_bytes: u64,
}

impl Default for StoreOptions {
    fn default() -> Self {
        StoreOptions {
            cache_bytes: 64 * 1024 * 1024,
        }
    }
}

#[derive(Clone)]
pub struct Store {
    db: sled::Db,
    jobs: sled::Tree,
    index: sled::Tree,
    counts: sled::Tree,
    events: sled::Tree,
    rate_log: sled::Tree,
    /// See [`Store::record_spend`] (the spend ledger) and [`Store::replace_with_version`].
    spend: sled::Tree,
    versions: sled::Tree,
    group: Arc<GroupFlush>,
    /// `<db>/pixbatch-jobs`: the number of jobs the database held at its last
    /// blocking flush (jobs are never deleted), so an open can tell a log that sled
    /// silently cut short after damage.
    jobs_mark: Arc<std::path::PathBuf>,
}

const JOBS_MARK: &str = "pixbatch-jobs";

fn read_jobs_mark(path: &Path) -> Option<u64> {
    std::fs::read_to_string(path).ok()?.trim().parse().ok()
}

/// Group commit: callers take a ticket after their writes; one flush covers every
/// ticket taken before it started.
struct GroupFlush {
    tickets: AtomicU64,
    wake: Notify,
    /// (highest ticket made durable, highest ticket whose flush failed, that error)
    done: watch::Sender<(u64, u64, Option<String>)>,
    started: std::sync::Once,
}

impl Store {
    pub fn open(path: &Path, options: &StoreOptions) -> Result<Store> {
        let open_error = |message: String| StoreError::Open {
            path: path.display().to_string(),
            message,
        };
        if path.is_file() {
            return Err(open_error(
                "is a file, not a database folder (--db names a folder)".into(),
            ));
        }
        // sled writes `conf` first thing; a folder with files but without it is not a
        // database, and sled would quietly start an empty one among those files.
        let has_files = std::fs::read_dir(path).is_ok_and(|mut d| d.next().is_some());
        if has_files && !path.join("conf").exists() {
            return Err(open_error(
                "the folder holds files but no database (no sled `conf`); is --db right?".into(),
            ));
        }
        let existed = path.join("conf").exists();
        let db = sled::Config::new()
            .path(path)
            .cache_capacity(options.cache_bytes)
            .open()
            .map_err(|e| {
                open_error(match e {
                    sled::Error::Corruption { .. } => format!(
                        "the database is corrupt ({e}); restore a copy or start again with another --db"
                    ),
                    e => e.to_string(),
                })
            })?;
        let meta = db.open_tree("meta")?;
        match meta.get("format")? {
            // sled takes a damaged log for a torn tail and quietly drops what follows
            // the damage, everything at worst: a database that once had its format
            // (written and flushed at creation) and has lost it lost its records too.
            None if existed => {
                return Err(open_error(
                    "the database is damaged: sled recovered none of its records; restore a copy or start again with another --db".into(),
                ));
            }
            None => {
                meta.insert("format", &[FORMAT_VERSION])?;
                db.flush()?;
            }
            Some(v) => {
                let found = v.first().copied().unwrap_or(0);
                if found > FORMAT_VERSION {
                    return Err(StoreError::NewerFormat {
                        key: "database".into(),
                        found,
                    });
                }
            }
        }
        let jobs_mark = path.join(JOBS_MARK);
        let (done, _) = watch::channel((0, 0, None));
        let store = Store {
            jobs: db.open_tree("jobs")?,
            index: db.open_tree("index")?,
            counts: db.open_tree("counts")?,
            events: db.open_tree("events")?,
            rate_log: db.open_tree("rate_log")?,
            spend: db.open_tree("spend")?,
            versions: db.open_tree("versions")?,
            db,
            group: Arc::new(GroupFlush {
                tickets: AtomicU64::new(0),
                wake: Notify::new(),
                done,
                started: std::sync::Once::new(),
            }),
            jobs_mark: Arc::new(jobs_mark),
        };
        if let Some(marked) = read_jobs_mark(&store.jobs_mark) {
            let held = store.total_jobs()?;
            if held < marked {
                return Err(open_error(format!(
                    "the database is damaged: it holds {held} jobs but {marked} were enqueued into it (sled dropped the records after damage to its log); restore a copy or start again with another --db"
                )));
            }
        }
        Ok(store)
    }

    // ----- durability -------------------------------------------------------------

    /// Makes every write made before this call durable. Concurrent callers share one
    /// flush. Must be called inside a tokio runtime.
    pub async fn sync(&self) -> Result<()> {
        self.start_flusher();
        let ticket = self.group.tickets.fetch_add(1, Ordering::SeqCst) + 1;
        self.group.wake.notify_one();
        let mut rx = self.group.done.subscribe();
        loop {
            {
                let (durable, failed, err) = &*rx.borrow_and_update();
                if *durable >= ticket {
                    return Ok(());
                }
                if *failed >= ticket {
                    let e = err.clone().unwrap_or_default();
                    return Err(StoreError::Flush(e));
                }
            }
            if rx.changed().await.is_err() {
                return Err(StoreError::Flush("flusher stopped".into()));
            }
        }
    }

    fn start_flusher(&self) {
        self.group.started.call_once(|| {
            let group = Arc::clone(&self.group);
            let db = self.db.clone();
            tokio::spawn(async move {
                loop {
                    group.wake.notified().await;
                    // Everything written before a ticket was taken is in sled's memory;
                    // one flush now covers all tickets up to `target`.
                    let target = group.tickets.load(Ordering::SeqCst);
                    let result = db.flush_async().await;
                    match result {
                        Ok(_) => {
                            let failed = group.done.borrow().1;
                            group.done.send_replace((target, failed, None))
                        }
                        Err(e) => {
                            let durable = group.done.borrow().0;
                            group
                                .done
                                .send_replace((durable, target, Some(e.to_string())))
                        }
                    };
                }
            });
        });
    }

    /// Blocking flush, for code outside the async engine (enqueue, retry, cancel).
    pub fn flush(&self) -> Result<()> {
        self.db
            .flush()
            .map_err(|e| StoreError::Flush(e.to_string()))?;
        let held = self.total_jobs()?;
        if read_jobs_mark(&self.jobs_mark).is_none_or(|m| m < held) {
            let part = self.jobs_mark.with_extension("part");
            std::fs::write(&part, held.to_string())
                .and_then(|()| std::fs::rename(&part, &*self.jobs_mark))
                .map_err(|e| StoreError::Flush(format!("{}: {e}", self.jobs_mark.display())))?;
        }
        Ok(())
    }

    // ----- jobs ---------------------------------------------------------------------

    pub fn get(&self, id: &str) -> Result<Option<Job>> {
        match self.jobs.get(id.as_bytes())? {
            None => Ok(None),
            Some(bytes) => decode::<Job>(id, &bytes).map(Some),
        }
    }

    /// Inserts new jobs (ids known to be absent) in one atomic batch.
    pub fn insert_new(&self, jobs: &[Job]) -> Result<()> {
        let encoded: Vec<(Vec<u8>, Vec<u8>, Vec<u8>)> = jobs
            .iter()
            .map(|j| Ok((j.id().as_bytes().to_vec(), encode(j)?, index_key(j))))
            .collect::<Result<_>>()?;
        let mut added: BTreeMap<[u8; 2], u64> = BTreeMap::new();
        for j in jobs {
            *added
                .entry(count_key(j.state, j.spec.provider))
                .or_default() += 1;
        }
        let result =
            (&self.jobs, &self.index, &self.counts).transaction(|(jobs, index, counts)| {
                for (id, record, ikey) in &encoded {
                    jobs.insert(id.as_slice(), record.as_slice())?;
                    index.insert(ikey.as_slice(), &[] as &[u8])?;
                }
                for (ckey, n) in &added {
                    let old = counts.get(ckey)?.map(|v| read_u64(&v)).unwrap_or(0);
                    counts.insert(ckey, &(old + n).to_be_bytes())?;
                }
                Ok(())
            });
        tx_result(result)
    }

    /// Writes a job's new version, moving its index entry and state count in the
    /// same atomic transaction. Not yet durable: see [`Store::sync`].
    pub fn save(&self, job: &Job) -> Result<()> {
        // Test hook: a full or failing disk under the database (see `failpoint`).
        crate::failpoint::io("store-write").map_err(|e| StoreError::Sled(e.to_string()))?;
        let id = job.id().as_bytes().to_vec();
        let record = encode(job)?;
        let new_ikey = index_key(job);
        let new_ckey = count_key(job.state, job.spec.provider);
        let result =
            (&self.jobs, &self.index, &self.counts).transaction(|(jobs, index, counts)| {
                if let Some(old) = jobs.insert(id.as_slice(), record.as_slice())? {
                    let old_job: Job =
                        decode(job.id(), &old).map_err(ConflictableTransactionError::Abort)?;
                    let old_ikey = index_key(&old_job);
                    if old_ikey != new_ikey {
                        index.remove(old_ikey)?;
                    }
                    let old_ckey = count_key(old_job.state, old_job.spec.provider);
                    if old_ckey != new_ckey {
                        let n = counts.get(old_ckey)?.map(|v| read_u64(&v)).unwrap_or(0);
                        counts.insert(&old_ckey, &n.saturating_sub(1).to_be_bytes())?;
                        let m = counts.get(new_ckey)?.map(|v| read_u64(&v)).unwrap_or(0);
                        counts.insert(&new_ckey, &(m + 1).to_be_bytes())?;
                    }
                } else {
                    let m = counts.get(new_ckey)?.map(|v| read_u64(&v)).unwrap_or(0);
                    counts.insert(&new_ckey, &(m + 1).to_be_bytes())?;
                }
                index.insert(new_ikey.as_slice(), &[] as &[u8])?;
                Ok(())
            });
        tx_result(result)
    }

    /// Up to `limit` ids of `provider`'s jobs in `state` that are due at `now_ms`,
    /// earliest first.
    pub fn due(
        &self,
        state: JobState,
        provider: ProviderKind,
        now_ms: u64,
        limit: usize,
    ) -> Result<Vec<String>> {
        let prefix = [state.index(), provider.index()];
        let mut out = Vec::new();
        for item in self.index.scan_prefix(prefix) {
            let (key, _) = item?;
            let (due, id) = split_index_key(&key)?;
            if due > now_ms || out.len() >= limit {
                break;
            }
            out.push(id);
        }
        Ok(out)
    }

    /// The earliest due time among `provider`'s jobs in `state`.
    pub fn next_due(&self, state: JobState, provider: ProviderKind) -> Result<Option<u64>> {
        let prefix = [state.index(), provider.index()];
        match self.index.scan_prefix(prefix).next() {
            None => Ok(None),
            Some(item) => {
                let (key, _) = item?;
                Ok(Some(split_index_key(&key)?.0))
            }
        }
    }

    /// Ids of the jobs in `state` (all providers, or one), in provider then due order.
    pub fn ids_in_state(
        &self,
        state: JobState,
        provider: Option<ProviderKind>,
    ) -> impl Iterator<Item = Result<String>> + '_ {
        let prefix: Vec<u8> = match provider {
            Some(p) => vec![state.index(), p.index()],
            None => vec![state.index()],
        };
        self.index.scan_prefix(prefix).map(|item| {
            let (key, _) = item?;
            Ok(split_index_key(&key)?.1)
        })
    }

    /// Every job, in id order (for `list` and `report`; they may scan).
    pub fn all_jobs(&self) -> impl Iterator<Item = Result<Job>> + '_ {
        self.jobs.iter().map(|item| {
            let (key, value) = item?;
            decode::<Job>(&String::from_utf8_lossy(&key), &value)
        })
    }

    pub fn count(&self, state: JobState, provider: ProviderKind) -> Result<u64> {
        Ok(self
            .counts
            .get(count_key(state, provider))?
            .map(|v| read_u64(&v))
            .unwrap_or(0))
    }

    /// Jobs per (state, provider), without scanning the queue.
    pub fn counts(&self) -> Result<BTreeMap<(JobState, ProviderKind), u64>> {
        let mut out = BTreeMap::new();
        for item in self.counts.iter() {
            let (key, value) = item?;
            if key.len() != 2 {
                continue;
            }
            if let (Some(s), Some(p)) = (
                JobState::from_index(key[0]),
                ProviderKind::from_index(key[1]),
            ) {
                let n = read_u64(&value);
                if n > 0 {
                    out.insert((s, p), n);
                }
            }
        }
        Ok(out)
    }

    pub fn total_jobs(&self) -> Result<u64> {
        Ok(self.counts()?.values().sum())
    }

    // ----- events -------------------------------------------------------------------

    pub fn add_event(&self, job_id: &str, event: &JobEvent) -> Result<()> {
        let seq = self.db.generate_id()?;
        let mut key = job_id.as_bytes().to_vec();
        key.push(0);
        key.extend_from_slice(&seq.to_be_bytes());
        self.events.insert(key, encode(event)?)?;
        Ok(())
    }

    pub fn events(&self, job_id: &str) -> Result<Vec<JobEvent>> {
        let mut prefix = job_id.as_bytes().to_vec();
        prefix.push(0);
        self.events
            .scan_prefix(&prefix)
            .map(|item| {
                let (_, value) = item?;
                decode::<JobEvent>(job_id, &value)
            })
            .collect()
    }

    // ----- rate log -----------------------------------------------------------------
    // One key per request sent: `provider u8 | sent_ms u64 BE | seq u64 BE`. Written
    // as each request is admitted (a small insert, made durable by the next group
    // flush or sled's own 500 ms flush), pruned once older than the longest window.

    pub fn record_sent(&self, provider: ProviderKind, sent_ms: u64) -> Result<()> {
        let seq = self.db.generate_id()?;
        let mut key = Vec::with_capacity(17);
        key.push(provider.index());
        key.extend_from_slice(&sent_ms.to_be_bytes());
        key.extend_from_slice(&seq.to_be_bytes());
        self.rate_log.insert(key, &[] as &[u8])?;
        Ok(())
    }

    /// Send times (ms) of `provider`'s requests at or after `since_ms`, oldest first.
    pub fn sent_since(&self, provider: ProviderKind, since_ms: u64) -> Result<Vec<u64>> {
        let mut start = vec![provider.index()];
        start.extend_from_slice(&since_ms.to_be_bytes());
        let end = [provider.index() + 1];
        let mut out = Vec::new();
        for item in self.rate_log.range(start..end.to_vec()) {
            let (key, _) = item?;
            if key.len() >= 9 {
                let mut b = [0u8; 8];
                b.copy_from_slice(&key[1..9]);
                out.push(u64::from_be_bytes(b));
            }
        }
        Ok(out)
    }

    /// Forgets send times before `before_ms`.
    pub fn prune_sent(&self, provider: ProviderKind, before_ms: u64) -> Result<()> {
        let start = vec![provider.index()];
        let mut end = vec![provider.index()];
        end.extend_from_slice(&before_ms.to_be_bytes());
        let mut batch = sled::Batch::default();
        for item in self.rate_log.range(start..end) {
            let (key, _) = item?;
            batch.remove(key);
        }
        self.rate_log.apply_batch(batch)?;
        Ok(())
    }

    /// Bytes the database takes on disk.
    pub fn size_on_disk(&self) -> Result<u64> {
        Ok(self.db.size_on_disk()?)
    }
}

// ----- spend ledger and job versions ---------------------------------------------
// Kept apart from the queue's hot paths: one small insert per submission started, and
// a transaction per job replaced by `enqueue --update`.

/// One submission in the spend ledger.
#[derive(Debug, Clone, PartialEq)]
pub struct SpendEntry {
    /// The submission's key, `<job id>~<n>`.
    pub key: String,
    pub provider: ProviderKind,
    /// The estimated cost when it was recorded; `None` when nothing could tell it.
    pub cost: Option<f64>,
}

impl Store {
    /// Records that submission `key` of a `provider` job is being started, at `cost`.
    /// Returns false (and changes nothing) when the key is already recorded: a
    /// submission retried under the same key is counted once.
    pub fn record_spend(
        &self,
        key: &str,
        provider: ProviderKind,
        cost: Option<f64>,
    ) -> Result<bool> {
        let mut value = vec![provider.index()];
        value.extend_from_slice(&cost.unwrap_or(f64::NAN).to_be_bytes());
        let swapped =
            self.spend
                .compare_and_swap(key.as_bytes(), None as Option<&[u8]>, Some(value))?;
        Ok(swapped.is_ok())
    }

    pub fn spend_recorded(&self, key: &str) -> Result<bool> {
        Ok(self.spend.contains_key(key.as_bytes())?)
    }

    /// Every submission recorded, in key order.
    pub fn spend_entries(&self) -> impl Iterator<Item = Result<SpendEntry>> + '_ {
        self.spend.iter().map(|item| {
            let (key, value) = item?;
            let key = String::from_utf8_lossy(&key).into_owned();
            let provider = value.first().and_then(|&i| ProviderKind::from_index(i));
            match (provider, value.get(1..9)) {
                (Some(provider), Some(bytes)) => {
                    let mut b = [0u8; 8];
                    b.copy_from_slice(bytes);
                    let cost = f64::from_be_bytes(b);
                    Ok(SpendEntry {
                        key,
                        provider,
                        cost: (!cost.is_nan()).then_some(cost),
                    })
                }
                _ => Err(StoreError::Corrupt {
                    key,
                    reason: "spend record of the wrong shape".into(),
                }),
            }
        })
    }

    /// Earlier versions of job `id`, oldest first, with their numbers (1, 2, …).
    pub fn versions(&self, id: &str) -> Result<Vec<(u32, Job)>> {
        let mut prefix = id.as_bytes().to_vec();
        prefix.push(0);
        let mut out = Vec::new();
        for item in self.versions.scan_prefix(&prefix) {
            let (key, value) = item?;
            let mut n = [0u8; 4];
            match key.get(prefix.len()..) {
                Some(tail) if tail.len() == 4 => n.copy_from_slice(tail),
                _ => {
                    return Err(StoreError::Corrupt {
                        key: String::from_utf8_lossy(&key).into_owned(),
                        reason: "version key of the wrong shape".into(),
                    })
                }
            }
            out.push((u32::from_be_bytes(n), decode::<Job>(id, &value)?));
        }
        Ok(out)
    }

    /// Replaces job `new.id()` with `new`, keeping the record it replaces as version
    /// `old_version` — one transaction, so a crash leaves either both or neither.
    /// Returns false when there is no job with that id.
    pub fn replace_with_version(&self, new: &Job, old_version: u32) -> Result<bool> {
        let id = new.id().as_bytes().to_vec();
        let mut vkey = id.clone();
        vkey.push(0);
        vkey.extend_from_slice(&old_version.to_be_bytes());
        let record = encode(new)?;
        let new_ikey = index_key(new);
        let new_ckey = count_key(new.state, new.spec.provider);
        let result = (&self.jobs, &self.index, &self.counts, &self.versions).transaction(
            |(jobs, index, counts, versions)| {
                let Some(old) = jobs.get(id.as_slice())? else {
                    return Ok(false);
                };
                let old_job: Job =
                    decode(new.id(), &old).map_err(ConflictableTransactionError::Abort)?;
                versions.insert(vkey.as_slice(), old.clone())?;
                jobs.insert(id.as_slice(), record.as_slice())?;
                index.remove(index_key(&old_job))?;
                index.insert(new_ikey.as_slice(), &[] as &[u8])?;
                let old_ckey = count_key(old_job.state, old_job.spec.provider);
                if old_ckey != new_ckey {
                    let n = counts.get(old_ckey)?.map(|v| read_u64(&v)).unwrap_or(0);
                    counts.insert(&old_ckey, &n.saturating_sub(1).to_be_bytes())?;
                    let m = counts.get(new_ckey)?.map(|v| read_u64(&v)).unwrap_or(0);
                    counts.insert(&new_ckey, &(m + 1).to_be_bytes())?;
                }
                Ok(true)
            },
        );
        match result {
            Ok(replaced) => Ok(replaced),
            Err(TransactionError::Abort(e)) => Err(e),
            Err(TransactionError::Storage(e)) => Err(e.into()),
        }
    }
}

fn index_key(job: &Job) -> Vec<u8> {
    let id = job.id().as_bytes();
    let mut key = Vec::with_capacity(10 + id.len());
    key.push(job.state.index());
    key.push(job.spec.provider.index());
    key.extend_from_slice(&job.due_ms.to_be_bytes());
    key.extend_from_slice(id);
    key
}

fn split_index_key(key: &[u8]) -> Result<(u64, String)> {
    if key.len() < 10 {
        return Err(StoreError::Corrupt {
            key: format!("{key:?}"),
            reason: "index key too short".into(),
        });
    }
    let mut due = [0u8; 8];
    due.copy_from_slice(&key[2..10]);
    Ok((
        u64::from_be_bytes(due),
        String::from_utf8_lossy(&key[10..]).into_owned(),
    ))
}

fn count_key(state: JobState, provider: ProviderKind) -> [u8; 2] {
    [state.index(), provider.index()]
}

fn read_u64(v: &[u8]) -> u64 {
    let mut b = [0u8; 8];
    if v.len() == 8 {
        b.copy_from_slice(v);
    }
    u64::from_be_bytes(b)
}

fn bincode_config() -> bincode::config::Configuration {
    bincode::config::standard()
}

/// Version byte + bincode. See `docs/RELIABILITY.md` for why bincode is pinned.
fn encode<T: serde::Serialize>(value: &T) -> Result<Vec<u8>> {
    let mut out = vec![FORMAT_VERSION];
    let body = bincode::serde::encode_to_vec(value, bincode_config())
        .map_err(|e| StoreError::Sled(format!("encoding a record: {e}")))?;
    out.extend_from_slice(&body);
    Ok(out)
}

fn decode<T: serde::de::DeserializeOwned>(key: &str, bytes: &[u8]) -> Result<T> {
    let Some((&version, body)) = bytes.split_first() else {
        return Err(StoreError::Corrupt {
            key: key.into(),
            reason: "empty record".into(),
        });
    };
    match version {
        FORMAT_VERSION => bincode::serde::decode_from_slice(body, bincode_config())
            .map(|(v, _)| v)
            .map_err(|e| StoreError::Corrupt {
                key: key.into(),
                reason: e.to_string(),
            }),
        v if v > FORMAT_VERSION => Err(StoreError::NewerFormat {
            key: key.into(),
            found: v,
        }),
        v => Err(StoreError::Corrupt {
            key: key.into(),
            reason: format!("unknown format version {v}"),
        }),
    }
}

fn tx_result(r: std::result::Result<(), TransactionError<StoreError>>) -> Result<()> {
    match r {
        Ok(()) => Ok(()),
        Err(TransactionError::Abort(e)) => Err(e),
        Err(TransactionError::Storage(e)) => Err(e.into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{JobSpec, Origin};

    fn job(id: &str, provider: ProviderKind) -> Job {
        let spec = JobSpec {
            id: id.into(),
            provider,
            operation: "enhance".into(),
            inputs: vec!["/tmp/x.png".into()],
            prompt: None,
            params_json: "{}".into(),
            output: None,
        };
        Job::new(
            spec,
            Origin {
                file: "m.csv".into(),
                line: 2,
            },
            1,
        )
    }

    fn open() -> (tempfile::TempDir, Store) {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("db"), &StoreOptions::default()).unwrap();
        (dir, store)
    }

    #[test]
    fn index_and_counts_follow_state_changes() {
        let (_d, store) = open();
        store
            .insert_new(&[
                job("a", ProviderKind::Topaz),
                job("b", ProviderKind::Topaz),
                job("c", ProviderKind::Photio),
            ])
            .unwrap();
        assert_eq!(
            store.count(JobState::Queued, ProviderKind::Topaz).unwrap(),
            2
        );
        assert_eq!(
            store
                .due(JobState::Queued, ProviderKind::Topaz, 10, 10)
                .unwrap(),
            vec!["a", "b"]
        );

        let mut a = store.get("a").unwrap().unwrap();
        a.state = JobState::RetryWait;
        a.due_ms = 500;
        store.save(&a).unwrap();
        assert_eq!(
            store.count(JobState::Queued, ProviderKind::Topaz).unwrap(),
            1
        );
        assert_eq!(
            store
                .count(JobState::RetryWait, ProviderKind::Topaz)
                .unwrap(),
            1
        );
        assert!(store
            .due(JobState::RetryWait, ProviderKind::Topaz, 499, 10)
            .unwrap()
            .is_empty());
        assert_eq!(
            store
                .due(JobState::RetryWait, ProviderKind::Topaz, 500, 10)
                .unwrap(),
            vec!["a"]
        );
        assert_eq!(
            store
                .next_due(JobState::RetryWait, ProviderKind::Topaz)
                .unwrap(),
            Some(500)
        );
        // A due-time change in the same state moves the index entry, not the count.
        a.due_ms = 900;
        store.save(&a).unwrap();
        assert_eq!(store.ids_in_state(JobState::RetryWait, None).count(), 1);
        assert_eq!(
            store
                .count(JobState::RetryWait, ProviderKind::Topaz)
                .unwrap(),
            1
        );
        assert_eq!(store.total_jobs().unwrap(), 3);
    }

    #[test]
    fn records_of_a_newer_format_are_refused_not_misread() {
        let (_d, store) = open();
        store.insert_new(&[job("a", ProviderKind::Topaz)]).unwrap();
        let mut raw = store.jobs.get("a").unwrap().unwrap().to_vec();
        raw[0] = FORMAT_VERSION + 1;
        store.jobs.insert("a", raw).unwrap();
        assert!(
            matches!(store.get("a"), Err(StoreError::NewerFormat { found, .. }) if found == FORMAT_VERSION + 1)
        );
        store
            .jobs
            .insert("a", vec![FORMAT_VERSION, 0xff, 0xff])
            .unwrap();
        assert!(matches!(store.get("a"), Err(StoreError::Corrupt { .. })));
    }

    #[test]
    fn events_and_rate_log_round_trip() {
        let (_d, store) = open();
        let e = JobEvent {
            at_ms: 5,
            kind: crate::model::EventKind::Retry,
            message: "HTTP 500".into(),
        };
        store.add_event("a", &e).unwrap();
        store.add_event("ab", &e).unwrap();
        assert_eq!(store.events("a").unwrap(), vec![e]);
        for t in [1, 2, 2, 3] {
            store.record_sent(ProviderKind::Topaz, t).unwrap();
        }
        store.record_sent(ProviderKind::Photio, 2).unwrap();
        assert_eq!(
            store.sent_since(ProviderKind::Topaz, 2).unwrap(),
            vec![2, 2, 3]
        );
        store.prune_sent(ProviderKind::Topaz, 3).unwrap();
        assert_eq!(store.sent_since(ProviderKind::Topaz, 0).unwrap(), vec![3]);
        assert_eq!(store.sent_since(ProviderKind::Photio, 0).unwrap(), vec![2]);
    }

    #[tokio::test]
    async fn concurrent_syncs_share_flushes_and_all_return() {
        let (_d, store) = open();
        let mut tasks = Vec::new();
        for i in 0..50 {
            let s = store.clone();
            tasks.push(tokio::spawn(async move {
                s.insert_new(&[job(&format!("j{i}"), ProviderKind::Topaz)])
                    .unwrap();
                s.sync().await.unwrap();
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
        assert_eq!(
            store.count(JobState::Queued, ProviderKind::Topaz).unwrap(),
            50
        );
    }
}
