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
//! - `saving`: job id → the index and count keys a save under way moves the job
//!   between (see below); empty whenever no save is under way.
//! - `meta`: the database's format version; `open` while a process has it open.
//!
//! Writes land in sled's memory first. [`Store::sync`] makes everything written so
//! far durable; concurrent callers share one flush (group commit), so durability
//! costs one fsync per batch of state changes, not one per request.
//!
//! A state change ([`Store::save`]) is a few single-key writes in a fixed order, not a
//! sled transaction: every sled transaction or batch writes out and syncs sled's
//! log buffer twice before it commits (`pin_log`), which made one transaction per
//! state change the engine's main cost (six small synchronous disk writes per job).
//! The order keeps a crash safe, because sled recovers a prefix of its log: a
//! `saving` entry names the keys the save moves between, then the new index entry is
//! written before the record (a record is never without its entry), then the old
//! entry goes, the counts follow, and the `saving` entry is removed. A crash in
//! between leaves the `saving` entry. The `meta` key `open` marks a database in use; a
//! database opened with the mark still set (the last user did not close it) is
//! repaired first ([`Store::repair`]): each interrupted save's job keeps the index
//! entry its record calls for, and the counts of the states involved are recounted
//! from the index.
//!
//! Nothing outside this module names sled.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use sled::transaction::{ConflictableTransactionError, TransactionError};
use sled::Transactional;
use tokio::sync::{watch, Notify};

use crate::model::{EventKind, Job, JobEvent, JobState, ProviderKind};

/// The record format this build writes. Records carry it in their first byte; a
/// record with a higher number was written by a newer pixbatch and is refused, not
/// misread; one with a lower number is read with its own frozen layout (`legacy`)
/// and migrated. 2: jobs gained `out_dir`, `JobSpec::metadata` and the outputs'
/// pixel sizes.
pub const FORMAT_VERSION: u8 = 2;

mod legacy;

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
    path: std::path::PathBuf,
    meta: sled::Tree,
    jobs: sled::Tree,
    index: sled::Tree,
    counts: sled::Tree,
    events: sled::Tree,
    rate_log: sled::Tree,
    /// See [`Store::record_spend`] (the spend ledger) and [`Store::replace_with_version`].
    spend: sled::Tree,
    versions: sled::Tree,
    /// `<db>/pixbatch-jobs`: the number of jobs the database held at its last
    /// blocking flush (jobs are never deleted), so an open can tell a log that sled
    /// silently cut short after damage.
    jobs_mark: Arc<std::path::PathBuf>,
    /// Saves under way: job id → the index and count keys the save moves between.
    saving: sled::Tree,
    /// Clears the `open` mark when the last clone goes.
    _closer: Arc<Closer>,
    group: Arc<GroupFlush>,
}

/// The `meta` key that is set while a process has the database open.
const OPEN_MARK: &str = "open";

/// Marks the database closed cleanly (and flushes) when the last `Store` clone is
/// dropped. A process that dies first leaves the mark, and the next open repairs.
struct Closer {
    db: sled::Db,
    meta: sled::Tree,
    #[cfg(test)]
    disarmed: std::sync::atomic::AtomicBool,
}

impl Drop for Closer {
    fn drop(&mut self) {
        #[cfg(test)]
        if self.disarmed.load(Ordering::SeqCst) {
            return;
        }
        // Everything written before is in the log ahead of this removal, so a crash
        // during the flush leaves either the mark or a consistent database.
        if self.meta.remove(OPEN_MARK).is_ok() {
            if let Err(e) = self.db.flush() {
                tracing::warn!("closing the database: {e}");
            }
        }
    }
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
                if found < FORMAT_VERSION {
                    // Old records stay as they are and are migrated as they are read;
                    // records written from now on are of this format, so an older
                    // pixbatch is told at open that the database is newer than it.
                    meta.insert("format", &[FORMAT_VERSION])?;
                }
            }
        }
        let jobs_mark = path.join(JOBS_MARK);
        let (done, _) = watch::channel((0, 0, None));
        let left_open = meta.get(OPEN_MARK)?.is_some();
        let store = Store {
            jobs: db.open_tree("jobs")?,
            index: db.open_tree("index")?,
            counts: db.open_tree("counts")?,
            events: db.open_tree("events")?,
            rate_log: db.open_tree("rate_log")?,
            spend: db.open_tree("spend")?,
            versions: db.open_tree("versions")?,
            saving: db.open_tree("saving")?,
            _closer: Arc::new(Closer {
                db: db.clone(),
                meta: meta.clone(),
                #[cfg(test)]
                disarmed: Default::default(),
            }),
            meta,
            db,
            path: path.to_path_buf(),
            group: Arc::new(GroupFlush {
                tickets: AtomicU64::new(0),
                wake: Notify::new(),
                done,
                started: std::sync::Once::new(),
            }),
            jobs_mark: Arc::new(jobs_mark),
        };
        if left_open {
            tracing::info!("the database was not closed cleanly; checking its index and counts");
            store.repair()?;
        }
        // After the repair: the count is read from the per-state counts it may fix.
        if let Some(marked) = read_jobs_mark(&store.jobs_mark) {
            let held = store.total_jobs()?;
            if held < marked {
                return Err(open_error(format!(
                    "the database is damaged: it holds {held} jobs but {marked} were enqueued into it (sled dropped the records after damage to its log); restore a copy or start again with another --db"
                )));
            }
        }
        // Written before anything else this process writes, so a crash leaves it set
        // whenever a later write survived.
        store.meta.insert(OPEN_MARK, &[1u8])?;
        Ok(store)
    }

    /// The database's folder.
    pub fn path(&self) -> std::path::PathBuf {
        self.path.clone()
    }

    /// Finishes what the saves under way when a process died left half done, from
    /// their `saving` entries and the records (the truth): each such job keeps exactly
    /// the index entry its record calls for, and the counts of the states those jobs
    /// moved between are recounted from the index. Costs a key scan of those states'
    /// index entries (all of them, at worst): well under a second at a million jobs.
    pub fn repair(&self) -> Result<()> {
        let mut prefixes: std::collections::BTreeSet<[u8; 2]> = Default::default();
        let mut n = 0u64;
        for item in self.saving.iter() {
            let (id_bytes, value) = item?;
            let id = String::from_utf8_lossy(&id_bytes).into_owned();
            let entry: SavingEntry = decode(&id, &value)?;
            let current = match self.jobs.get(&id_bytes)? {
                Some(bytes) => {
                    let job: Job = decode(&id, &bytes)?;
                    Some((index_key(&job), count_key(job.state, job.spec.provider)))
                }
                None => None,
            };
            for k in entry.old_index.iter().chain([&entry.new_index]) {
                if current.as_ref().map(|c| &c.0) != Some(k) {
                    self.index.remove(k.as_slice())?;
                }
            }
            if let Some((ikey, ckey)) = &current {
                self.index.insert(ikey.as_slice(), &[] as &[u8])?;
                prefixes.insert(*ckey);
            }
            prefixes.extend(entry.old_count);
            prefixes.insert(entry.new_count);
            self.saving.remove(&id_bytes)?;
            n += 1;
        }
        for ckey in &prefixes {
            let count = self.index.scan_prefix(ckey).keys().count() as u64;
            self.counts.insert(ckey, &count.to_be_bytes())?;
        }
        self.flush()?;
        if n > 0 {
            tracing::info!("finished {n} interrupted state changes");
        }
        Ok(())
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

    /// Writes a job's new version, moving its index entry and its state count. Not a
    /// transaction (see the module comment): the new index entry, then the record,
    /// then the old entry goes and the counts follow, so a crash at any point leaves
    /// the record findable, and the next open repairs the rest. Callers never save
    /// the same job concurrently (the dispatcher's claims see to it). Not yet
    /// durable: see [`Store::sync`].
    pub fn save(&self, job: &Job) -> Result<()> {
        // Test hook: a full or failing disk under the database (see `failpoint`).
        crate::failpoint::io("store-write").map_err(|e| StoreError::Sled(e.to_string()))?;
        let id = job.id();
        let record = encode(job)?;
        let new_ikey = index_key(job);
        let new_ckey = count_key(job.state, job.spec.provider);
        let old = match self.jobs.get(id.as_bytes())? {
            Some(bytes) => Some(decode::<Job>(id, &bytes)?),
            None => None,
        };
        let old_keys = old
            .as_ref()
            .map(|o| (index_key(o), count_key(o.state, o.spec.provider)));
        if old_keys.as_ref() == Some(&(new_ikey.clone(), new_ckey)) {
            // Same index entry, same count: one write, atomic on its own.
            self.jobs.insert(id.as_bytes(), record)?;
            return Ok(());
        }
        // What this save moves between, for `repair` should the process die half way.
        let entry = SavingEntry {
            old_index: old_keys.as_ref().map(|k| k.0.clone()),
            new_index: new_ikey.clone(),
            old_count: old_keys.as_ref().map(|k| k.1),
            new_count: new_ckey,
        };
        self.saving.insert(id.as_bytes(), encode(&entry)?)?;
        if old_keys.as_ref().map(|k| &k.0) != Some(&new_ikey) {
            self.index.insert(new_ikey.as_slice(), &[] as &[u8])?;
        }
        self.jobs.insert(id.as_bytes(), record)?;
        match old_keys {
            Some((old_ikey, old_ckey)) => {
                if old_ikey != new_ikey {
                    self.index.remove(old_ikey)?;
                }
                if old_ckey != new_ckey {
                    // Up first, then down: a reader in between sees one job too many,
                    // never a queue that looks finished while a job is still moving.
                    self.add_count(new_ckey, 1)?;
                    self.add_count(old_ckey, -1)?;
                }
            }
            None => self.add_count(new_ckey, 1)?,
        }
        self.saving.remove(id.as_bytes())?;
        Ok(())
    }

    fn add_count(&self, key: [u8; 2], delta: i64) -> Result<()> {
        self.counts.update_and_fetch(key, |old| {
            let n = old.map(read_u64).unwrap_or(0);
            let m = if delta < 0 {
                n.saturating_sub(delta.unsigned_abs())
            } else {
                n + delta as u64
            };
            Some(m.to_be_bytes().to_vec())
        })?;
        Ok(())
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

    /// A job's events, oldest first. The first, "enqueued from FILE:LINE", is not
    /// stored (a million of them made a tenth of the enqueue's cost): it is made from
    /// the record's origin and creation time. Databases that stored it keep theirs.
    pub fn events(&self, job_id: &str) -> Result<Vec<JobEvent>> {
        let mut prefix = job_id.as_bytes().to_vec();
        prefix.push(0);
        let mut events = self
            .events
            .scan_prefix(&prefix)
            .map(|item| {
                let (_, value) = item?;
                decode::<JobEvent>(job_id, &value)
            })
            .collect::<Result<Vec<_>>>()?;
        let stored = events.first().map(|e| e.kind) == Some(EventKind::Enqueued);
        if !stored {
            // After `--update` the record is the newest version, enqueued last; the
            // job's history begins with the first version's enqueue.
            let first = match self.versions(job_id)?.into_iter().next() {
                Some((_, v1)) => Some(v1),
                None => self.get(job_id)?,
            };
            if let Some(job) = first {
                events.insert(
                    0,
                    JobEvent {
                        at_ms: job.created_ms,
                        kind: EventKind::Enqueued,
                        message: format!("enqueued from {}", job.origin),
                    },
                );
            }
        }
        // In time order whatever the keys say (stable: same-ms events keep their
        // recorded order).
        events.sort_by_key(|e| e.at_ms);
        Ok(events)
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

    /// Bytes of live data: every key and value of every tree (a full scan, for
    /// benchmarks; compare with [`Store::size_on_disk`], which also counts the old
    /// versions sled's log keeps until it reuses their segments).
    pub fn live_bytes(&self) -> Result<u64> {
        let mut n = 0u64;
        for tree in [
            &self.jobs,
            &self.index,
            &self.counts,
            &self.events,
            &self.rate_log,
            &self.saving,
            &self.meta,
        ] {
            for item in tree.iter() {
                let (k, v) = item?;
                n += (k.len() + v.len()) as u64;
            }
        }
        Ok(n)
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

    /// Every earlier version of every job (`verify`, the output checks of an
    /// enqueue: their files stay on disk and keep their names).
    pub fn all_versions(&self) -> impl Iterator<Item = Result<Job>> + '_ {
        self.versions.iter().map(|item| {
            let (key, value) = item?;
            let id_end = key.iter().position(|b| *b == 0).unwrap_or(key.len());
            decode::<Job>(&String::from_utf8_lossy(&key[..id_end]), &value)
        })
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

/// A save under way (the `saving` tree): the keys it moves the job between.
#[derive(serde::Serialize, serde::Deserialize)]
struct SavingEntry {
    old_index: Option<Vec<u8>>,
    new_index: Vec<u8>,
    old_count: Option<[u8; 2]>,
    new_count: [u8; 2],
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

/// A type kept in versioned records, and how it reads a body of format 1.
trait Record: serde::de::DeserializeOwned {
    /// Types whose layout has not changed since format 1 read it as today's.
    fn from_v1(body: &[u8]) -> std::result::Result<Self, bincode::error::DecodeError> {
        bincode::serde::decode_from_slice(body, bincode_config()).map(|(v, _)| v)
    }
}

impl Record for JobEvent {}
impl Record for SavingEntry {}
impl Record for Job {
    fn from_v1(body: &[u8]) -> std::result::Result<Self, bincode::error::DecodeError> {
        bincode::serde::decode_from_slice::<legacy::JobV1, _>(body, bincode_config())
            .map(|(v, _)| v.into())
    }
}

fn decode<T: Record>(key: &str, bytes: &[u8]) -> Result<T> {
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
        1 => T::from_v1(body).map_err(|e| StoreError::Corrupt {
            key: key.into(),
            reason: format!("format 1 record: {e}"),
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
            metadata: Vec::new(),
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

    /// The writes of `save` up to a point, as a process that died there left them.
    fn save_cut_short(store: &Store, job: &Job, writes: usize) {
        let old = store.get(job.id()).unwrap().unwrap();
        let entry = SavingEntry {
            old_index: Some(index_key(&old)),
            new_index: index_key(job),
            old_count: Some(count_key(old.state, old.spec.provider)),
            new_count: count_key(job.state, job.spec.provider),
        };
        let steps: Vec<Box<dyn Fn()>> = vec![
            Box::new(|| {
                store
                    .saving
                    .insert(job.id(), encode(&entry).unwrap())
                    .unwrap();
            }),
            Box::new(|| {
                store.index.insert(index_key(job), &[] as &[u8]).unwrap();
            }),
            Box::new(|| {
                store.jobs.insert(job.id(), encode(job).unwrap()).unwrap();
            }),
            Box::new(|| {
                store.index.remove(index_key(&old)).unwrap();
            }),
            Box::new(|| store.add_count(entry.new_count, 1).unwrap()),
        ];
        for step in steps.iter().take(writes) {
            step();
        }
    }

    #[test]
    fn a_database_left_open_finishes_its_interrupted_saves() {
        for writes in 1..=5 {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("db");
            {
                let store = Store::open(&path, &StoreOptions::default()).unwrap();
                store
                    .insert_new(&[job("a", ProviderKind::Topaz), job("b", ProviderKind::Topaz)])
                    .unwrap();
                let mut a = store.get("a").unwrap().unwrap();
                a.state = JobState::Submitted;
                a.due_ms = 50;
                store.save(&a).unwrap();
                let mut b = store.get("b").unwrap().unwrap();
                b.state = JobState::Polling;
                b.due_ms = 60;
                save_cut_short(&store, &b, writes);
                // The process dies here: the open mark stays.
                store._closer.disarmed.store(true, Ordering::SeqCst);
            }
            let store = Store::open(&path, &StoreOptions::default()).unwrap();
            let b = store.get("b").unwrap().unwrap();
            let (q, p) = if writes >= 3 {
                assert_eq!(b.state, JobState::Polling, "after {writes} writes");
                (0, 1)
            } else {
                assert_eq!(b.state, JobState::Queued, "after {writes} writes");
                (1, 0)
            };
            let t = ProviderKind::Topaz;
            assert_eq!(
                store.count(JobState::Queued, t).unwrap(),
                q,
                "after {writes}"
            );
            assert_eq!(
                store.count(JobState::Polling, t).unwrap(),
                p,
                "after {writes}"
            );
            assert_eq!(
                store.count(JobState::Submitted, t).unwrap(),
                1,
                "after {writes}"
            );
            assert_eq!(store.ids_in_state(JobState::Queued, None).count() as u64, q);
            assert_eq!(
                store.ids_in_state(JobState::Polling, None).count() as u64,
                p
            );
            assert_eq!(
                store.due(JobState::Submitted, t, 50, 10).unwrap(),
                vec!["a"]
            );
            assert_eq!(store.saving.len(), 0);
            // Closed cleanly this time: nothing left to repair.
            drop(store);
            let store = Store::open(&path, &StoreOptions::default()).unwrap();
            assert_eq!(store.total_jobs().unwrap(), 2);
        }
    }

    #[test]
    fn completed_saves_leave_no_saving_entries() {
        let (_d, store) = open();
        store.insert_new(&[job("a", ProviderKind::Topaz)]).unwrap();
        let mut a = store.get("a").unwrap().unwrap();
        a.state = JobState::Done;
        store.save(&a).unwrap();
        a.error = Some("x".into());
        store.save(&a).unwrap();
        assert_eq!(store.saving.len(), 0);
        assert_eq!(store.count(JobState::Done, ProviderKind::Topaz).unwrap(), 1);
    }

    #[test]
    fn the_enqueue_event_is_derived_from_the_record() {
        let (_d, store) = open();
        store.insert_new(&[job("a", ProviderKind::Topaz)]).unwrap();
        let e = JobEvent {
            at_ms: 5,
            kind: crate::model::EventKind::Retry,
            message: "HTTP 500".into(),
        };
        store.add_event("a", &e).unwrap();
        let events = store.events("a").unwrap();
        assert_eq!(events.len(), 2);
        assert_eq!(events[0].kind, EventKind::Enqueued);
        assert_eq!(events[0].at_ms, 1);
        assert_eq!(events[0].message, "enqueued from m.csv:2");
        assert_eq!(events[1], e);
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

    /// A job record as pixbatch wrote it in format 1 (bytes from the release before
    /// format 2, made by its `encode`): it must keep decoding, migrated.
    const V1_JOB: &str = "01056f6c642d31030775707363616c6501092f696e2f612e706e67010561206361740b7b227363616c65223a327d0105636174732f455b843d26cf8da3d8b4f2789601ff632a3d5aefe7cb278ad2108107979d39a8056d2e6373760707000102010675706c6f616403752d39000104722d343202000a687474703a2f2f782f7903706e6702036a706701000e636174732f6f6c642d312e706e67fbd20440616261626162616261626162616261626162616261626162616261626162616261626162616261626162616261626162616261626162616261626162616261620000fd0068e5cf8b01000001fde86be5cf8b01000001fdd06fe5cf8b010000fdd06fe5cf8b010000";

    #[test]
    fn a_format_1_job_record_still_decodes_and_migrates() {
        let (_d, store) = open();
        let bytes = hex::decode(V1_JOB).unwrap();
        assert_eq!(bytes[0], 1);
        store.jobs.insert("old-1", bytes).unwrap();
        let job = store.get("old-1").unwrap().unwrap();
        assert_eq!(job.spec.id, "old-1");
        assert_eq!(job.spec.provider, ProviderKind::Photio);
        assert_eq!(job.spec.prompt.as_deref(), Some("a cat"));
        assert_eq!(job.spec.params_json, r#"{"scale":2}"#);
        assert_eq!(job.spec.output.as_deref(), Some("cats/"));
        assert!(job.spec.metadata.is_empty());
        assert_eq!(job.origin.to_string(), "m.csv:7");
        assert_eq!(job.state, JobState::Done);
        assert_eq!((job.attempts, job.submissions), (1, 2));
        assert_eq!(job.prepared, vec![("upload".into(), "u-9".into())]);
        assert_eq!(job.remote_id.as_deref(), Some("r-42"));
        assert_eq!(
            job.pending_outputs,
            vec![
                crate::model::PendingOutput::Url {
                    url: "http://x/y".into(),
                    ext: "png".into()
                },
                crate::model::PendingOutput::Inline { ext: "jpg".into() }
            ]
        );
        assert_eq!(job.outputs.len(), 1);
        assert_eq!(job.outputs[0].path, "cats/old-1.png");
        assert_eq!(job.outputs[0].size, 1234);
        assert_eq!(job.outputs[0].sha256, "ab".repeat(32));
        assert_eq!((job.outputs[0].width, job.outputs[0].height), (None, None));
        assert_eq!(job.finished_ms, Some(1_700_000_002_000));
        assert_eq!(job.updated_ms, 1_700_000_002_000);
        assert_eq!(job.out_dir, None);
        assert_eq!(job.content_hash, job.spec.content_hash());
        // Saved again, it is written in today's format and reads back the same.
        let mut job = job;
        job.out_dir = Some("/data/out".into());
        job.spec.metadata = vec![("sku".into(), "A-1".into())];
        store.save(&job).unwrap();
        let raw = store.jobs.get("old-1").unwrap().unwrap();
        assert_eq!(raw[0], FORMAT_VERSION);
        assert_eq!(store.get("old-1").unwrap().unwrap(), job);
    }

    #[test]
    fn a_format_1_database_opens_and_is_marked_format_2() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("db");
        {
            let store = Store::open(&path, &StoreOptions::default()).unwrap();
            store.meta.insert("format", &[1u8]).unwrap();
            store
                .jobs
                .insert("old-1", hex::decode(V1_JOB).unwrap())
                .unwrap();
        }
        let store = Store::open(&path, &StoreOptions::default()).unwrap();
        assert_eq!(
            store.meta.get("format").unwrap().unwrap().to_vec(),
            vec![FORMAT_VERSION]
        );
        let jobs: Vec<Job> = store.all_jobs().collect::<Result<_>>().unwrap();
        assert_eq!(jobs.len(), 1);
        assert_eq!(jobs[0].spec.id, "old-1");
    }
}
