//! The reading commands' answers (`status`, `list`, `show`, `report`), computed the
//! same way whether the database is opened directly or the answer comes from a
//! running `run` over its control socket (see `control`). Answers are JSON values,
//! one per line on the wire; `report` renders them for people.

use serde::{Deserialize, Serialize};

use crate::model::{now_ms, Job, JobEvent, JobState, ProviderKind};
use crate::store::{Store, StoreError};

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(tag = "cmd", rename_all = "snake_case")]
pub enum Query {
    Status,
    List {
        state: Option<JobState>,
        provider: Option<ProviderKind>,
        /// Only jobs from this manifest: the path as given to `run`/`enqueue`, or
        /// any path to the same file (`list --manifest`).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        manifest: Option<String>,
        /// Stop after this many rows (`list --limit`).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        limit: Option<u64>,
    },
    Show {
        id: String,
    },
    Report,
    /// Cancel jobs: only a running process answers it (over its control socket); the
    /// command itself cancels directly when no run holds the database.
    Cancel {
        ids: Vec<String>,
    },
}

/// What `cancel` did to one job (one answer line per job).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct CancelAnswer {
    pub id: String,
    /// False when the job was unknown or had already ended.
    pub cancelled: bool,
    /// What happened, including at the provider.
    pub message: String,
}

/// Live figures a running engine adds to `status`.
#[derive(Debug, Clone, Serialize, Deserialize, Default, PartialEq)]
pub struct LiveInfo {
    pub pid: u32,
    pub started_ms: u64,
    pub rate_per_sec: f64,
    pub finished_this_run: u64,
    /// Providers this run halted (credential missing or refused, unreachable):
    /// nothing more is sent to them, their jobs wait for a later run.
    #[serde(default)]
    pub halted: Vec<crate::engine::halt::ProviderHalt>,
    /// Per provider of the run: rate, what is left, its ETA and why it waits.
    #[serde(default)]
    pub providers: Vec<crate::wait::ProviderLive>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct StatusCount {
    pub state: JobState,
    pub provider: ProviderKind,
    pub count: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct StatusReport {
    pub total: u64,
    /// Per state, all providers.
    pub states: std::collections::BTreeMap<String, u64>,
    /// Per state and provider (non-zero only).
    pub counts: Vec<StatusCount>,
    /// Present while a run is working this database.
    pub running: Option<LiveInfo>,
    pub eta_secs: Option<u64>,
}

/// One row of `list` and `report`: the job's manifest row (so a report is a
/// manifest `run` accepts again) and what became of it. Lists are JSON arrays.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct JobRow {
    pub id: String,
    pub provider: ProviderKind,
    pub operation: String,
    pub state: JobState,
    /// Named as the manifest's column, so a JSON Lines report is a manifest too.
    #[serde(rename = "input")]
    pub inputs: Vec<String>,
    #[serde(default)]
    pub prompt: Option<String>,
    /// The provider's parameters, as the JSON object the manifest gave.
    #[serde(default)]
    pub params: serde_json::Map<String, serde_json::Value>,
    /// The manifest's `output` column (a folder or file stem), if it had one.
    #[serde(default)]
    pub output: Option<String>,
    /// The manifest's own extra columns, in column order.
    #[serde(default)]
    pub metadata: Metadata,
    /// Output files, relative to `out_dir`.
    pub outputs: Vec<String>,
    /// Their SHA-256, in the same order.
    pub sha256: Vec<String>,
    /// Their size in pixels, `WxH` (None: not known).
    #[serde(default)]
    pub pixels: Vec<Option<String>>,
    pub bytes: u64,
    /// The output folder the files were written under (None: done before pixbatch
    /// recorded it; readers fall back to `--out`).
    #[serde(default)]
    pub out_dir: Option<String>,
    pub remote_id: Option<String>,
    pub attempts: u32,
    pub submissions: u32,
    pub possible_duplicates: u32,
    pub error: Option<String>,
    pub origin: String,
    pub created_ms: u64,
    pub started_ms: Option<u64>,
    pub finished_ms: Option<u64>,
    pub duration_s: Option<f64>,
}

/// A job's extra manifest columns, name → value, in column order: a JSON object on
/// the wire (whose key order is kept).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Metadata(pub Vec<(String, String)>);

impl Metadata {
    pub fn get(&self, name: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
}

impl Serialize for Metadata {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        let mut map = s.serialize_map(Some(self.0.len()))?;
        for (k, v) in &self.0 {
            map.serialize_entry(k, v)?;
        }
        map.end()
    }
}

impl<'de> Deserialize<'de> for Metadata {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = Metadata;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("an object of strings")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut m: A,
            ) -> Result<Metadata, A::Error> {
                let mut out = Vec::new();
                while let Some((k, v)) = m.next_entry::<String, String>()? {
                    out.push((k, v));
                }
                Ok(Metadata(out))
            }
        }
        d.deserialize_map(V)
    }
}

/// `WxH` of an output whose size is known.
pub fn pixels(o: &crate::model::OutputFile) -> Option<String> {
    match (o.width, o.height) {
        (Some(w), Some(h)) => Some(format!("{w}x{h}")),
        _ => None,
    }
}

impl JobRow {
    pub fn from_job(job: &Job) -> JobRow {
        JobRow {
            id: job.id().to_string(),
            provider: job.spec.provider,
            operation: job.spec.operation.clone(),
            state: job.state,
            inputs: job.spec.inputs.clone(),
            prompt: job.spec.prompt.clone(),
            params: job.spec.params(),
            output: job.spec.output.clone(),
            metadata: Metadata(job.spec.metadata.clone()),
            outputs: job.outputs.iter().map(|o| o.path.clone()).collect(),
            sha256: job.outputs.iter().map(|o| o.sha256.clone()).collect(),
            pixels: job.outputs.iter().map(pixels).collect(),
            bytes: job.outputs.iter().map(|o| o.size).sum(),
            out_dir: job.out_dir.clone(),
            remote_id: job.remote_id.clone(),
            attempts: job.attempts,
            submissions: job.submissions,
            possible_duplicates: job.possible_duplicates,
            error: job.error.clone(),
            origin: job.origin.to_string(),
            created_ms: job.created_ms,
            started_ms: job.started_ms,
            finished_ms: job.finished_ms,
            duration_s: match (job.started_ms, job.finished_ms) {
                (Some(s), Some(f)) => Some(f.saturating_sub(s) as f64 / 1000.0),
                _ => None,
            },
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct JobDetail {
    pub row: JobRow,
    pub prompt: Option<String>,
    pub params: String,
    pub output: Option<String>,
    pub due_ms: u64,
    pub outputs: Vec<crate::model::OutputFile>,
    /// The output files' full paths: under the folder the run recorded (or `show
    /// --out`'s); empty when neither is known.
    #[serde(default)]
    pub files: Vec<String>,
    pub events: Vec<JobEvent>,
    /// Earlier versions replaced by `enqueue --update`, oldest first.
    #[serde(default)]
    pub versions: Vec<VersionRow>,
}

/// One earlier version of a job, as it was when replaced.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct VersionRow {
    pub version: u32,
    pub job: JobRow,
    pub prompt: Option<String>,
    pub params: String,
}

/// Which jobs came from one manifest: its origin is the path as given when it was
/// enqueued (maybe relative to another folder), so paths are compared as given and
/// then as the files they name (each distinct origin resolved once).
struct ManifestMatch {
    given: String,
    file: Option<std::path::PathBuf>,
    resolved: std::collections::HashMap<String, bool>,
}

impl ManifestMatch {
    fn new(given: &str) -> ManifestMatch {
        ManifestMatch {
            given: given.to_string(),
            file: std::fs::canonicalize(given).ok(),
            resolved: Default::default(),
        }
    }

    fn matches(&mut self, origin: &str) -> bool {
        if origin == self.given {
            return true;
        }
        let Some(file) = &self.file else {
            return false;
        };
        *self
            .resolved
            .entry(origin.to_string())
            .or_insert_with(|| std::fs::canonicalize(origin).is_ok_and(|o| &o == file))
    }
}

/// Answers `query` from `store`, handing each answer line to `emit`.
pub fn answer(
    store: &Store,
    query: &Query,
    live: Option<LiveInfo>,
    emit: &mut dyn FnMut(serde_json::Value) -> std::io::Result<()>,
) -> Result<(), QueryError> {
    match query {
        Query::Status => {
            let counts = store.counts()?;
            let mut states = std::collections::BTreeMap::new();
            let mut rows = Vec::new();
            let mut total = 0;
            for ((s, p), n) in counts {
                *states.entry(s.name().to_string()).or_insert(0) += n;
                total += n;
                rows.push(StatusCount {
                    state: s,
                    provider: p,
                    count: n,
                });
            }
            let remaining: u64 = rows
                .iter()
                .filter(|c| !c.state.is_terminal())
                .map(|c| c.count)
                .sum();
            let mut live = live;
            let eta_secs = match live.as_mut() {
                // Each provider's own rate and remaining work; the slowest sets it.
                Some(l) if !l.providers.is_empty() => {
                    for p in l.providers.iter_mut() {
                        if p.wait.is_none() {
                            p.wait = crate::wait::idle_backoff(store, p.provider, now_ms());
                        }
                        let left = rows
                            .iter()
                            .filter(|c| c.provider == p.provider && !c.state.is_terminal())
                            .map(|c| c.count)
                            .sum();
                        *p = p.clone().with_remaining(left);
                    }
                    crate::wait::total_eta(&l.providers)
                }
                Some(l) => crate::wait::eta(remaining, l.rate_per_sec),
                None => None,
            };
            let report = StatusReport {
                total,
                states,
                counts: rows,
                running: live,
                eta_secs,
            };
            emit(serde_json::to_value(report)?)?;
        }
        Query::List {
            state,
            provider,
            manifest,
            limit,
        } => {
            let mut from_manifest = manifest.as_deref().map(ManifestMatch::new);
            let limit = limit.unwrap_or(u64::MAX);
            let mut sent = 0u64;
            // Returns false once the limit is reached.
            let mut send = |job: &Job| -> Result<bool, QueryError> {
                if sent >= limit {
                    return Ok(false);
                }
                let wanted = provider.is_none_or(|p| p == job.spec.provider)
                    && from_manifest
                        .as_mut()
                        .is_none_or(|m| m.matches(&job.origin.file));
                if wanted {
                    emit(serde_json::to_value(JobRow::from_job(job))?)?;
                    sent += 1;
                }
                Ok(sent < limit)
            };
            match state {
                // The state index lists a state's jobs without scanning the queue.
                Some(s) => {
                    for id in store.ids_in_state(*s, *provider) {
                        if let Some(job) = store.get(&id?)? {
                            if !send(&job)? {
                                break;
                            }
                        }
                    }
                }
                None => {
                    for job in store.all_jobs() {
                        if !send(&job?)? {
                            break;
                        }
                    }
                }
            }
        }
        Query::Show { id } => {
            let job = store
                .get(id)?
                .ok_or_else(|| QueryError::NoSuchJob(id.clone()))?;
            let detail = JobDetail {
                row: JobRow::from_job(&job),
                prompt: job.spec.prompt.clone(),
                params: job.spec.params_json.clone(),
                output: job.spec.output.clone(),
                due_ms: job.due_ms,
                outputs: job.outputs.clone(),
                files: match &job.out_dir {
                    Some(d) => job
                        .outputs
                        .iter()
                        .map(|o| std::path::Path::new(d).join(&o.path).display().to_string())
                        .collect(),
                    None => Vec::new(),
                },
                events: store.events(id)?,
                versions: store
                    .versions(id)?
                    .into_iter()
                    .map(|(version, old)| VersionRow {
                        version,
                        job: JobRow::from_job(&old),
                        prompt: old.spec.prompt.clone(),
                        params: old.spec.params_json.clone(),
                    })
                    .collect(),
            };
            emit(serde_json::to_value(detail)?)?;
        }
        Query::Report => {
            for job in store.all_jobs() {
                emit(serde_json::to_value(JobRow::from_job(&job?))?)?;
            }
        }
        Query::Cancel { .. } => {
            return Err(QueryError::Remote(
                "cancel changes jobs: it is answered by a running process only".into(),
            ))
        }
    }
    Ok(())
}

#[derive(Debug, thiserror::Error)]
pub enum QueryError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("no job with id {0:?}")]
    NoSuchJob(String),
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("encoding an answer: {0}")]
    Json(#[from] serde_json::Error),
    #[error("{0}")]
    Remote(String),
}

/// "3 s", "2 min 5 s", "1 h 20 min" for people.
pub fn human_secs(secs: u64) -> String {
    match secs {
        s if s < 60 => format!("{s} s"),
        s if s < 3600 => format!("{} min {} s", s / 60, s % 60),
        s => format!("{} h {} min", s / 3600, (s % 3600) / 60),
    }
}

/// Milliseconds since the epoch as an RFC 3339 UTC time.
pub fn rfc3339(ms: u64) -> String {
    let t = std::time::UNIX_EPOCH + std::time::Duration::from_millis(ms);
    humantime::format_rfc3339_millis(t).to_string()
}

/// Age of a timestamp, for people.
pub fn ago(ms: u64) -> String {
    human_secs(now_ms().saturating_sub(ms) / 1000)
}
