//! The domain types every module shares: what a job asks for (`JobSpec`), where it is
//! in its life (`JobState`, `Job`), and what it produced (`OutputFile`).
//!
//! These are plain data. How they are stored lives in `store`, how they move in
//! `engine`; the provider adapters only ever see a `JobSpec` plus the few fields of a
//! `Job` they need (see `providers::JobContext`).

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// The providers pixbatch knows. The order is the on-disk order (index keys use
/// `as u8`), so new providers are only ever appended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ProviderKind {
    Dzine,
    Perfect,
    Topaz,
    Photio,
    Aithriving,
}

impl ProviderKind {
    pub const ALL: [ProviderKind; 5] = [
        ProviderKind::Dzine,
        ProviderKind::Perfect,
        ProviderKind::Topaz,
        ProviderKind::Photio,
        ProviderKind::Aithriving,
    ];

    pub fn name(self) -> &'static str {
        match self {
            ProviderKind::Dzine => "dzine",
            ProviderKind::Perfect => "perfect",
            ProviderKind::Topaz => "topaz",
            ProviderKind::Photio => "photio",
            ProviderKind::Aithriving => "aithriving",
        }
    }

    pub fn index(self) -> u8 {
        self as u8
    }

    pub fn from_index(i: u8) -> Option<ProviderKind> {
        ProviderKind::ALL.get(i as usize).copied()
    }
}

impl fmt::Display for ProviderKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // `pad` so width and alignment work in tables.
        f.pad(self.name())
    }
}

impl FromStr for ProviderKind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let lower = s.trim().to_ascii_lowercase();
        ProviderKind::ALL
            .into_iter()
            .find(|p| p.name() == lower)
            .ok_or_else(|| {
                format!("unknown provider {s:?} (expected one of dzine, perfect, topaz, photio, aithriving)")
            })
    }
}

/// Where a job is in its life. The discriminants are stored in index keys: never
/// renumber, only append.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum JobState {
    /// Enqueued, nothing sent yet.
    Queued = 0,
    /// Inputs are being uploaded / pre-processed (no charge yet). Refs already made
    /// are kept in `Job::prepared` so a restart does not redo them.
    Preparing = 1,
    /// The intent to submit is durable; the outcome of the paid request is not yet
    /// known. After a crash a job found here is reconciled, never blindly resent.
    Submitting = 2,
    /// The provider accepted the task; its id is in `Job::remote`.
    Submitted = 3,
    /// The remote task was seen running at least once.
    Polling = 4,
    /// The provider finished; outputs are being fetched into place.
    Downloading = 5,
    /// A transient error; runnable again at `Job::due_ms`.
    RetryWait = 6,
    Done = 7,
    Failed = 8,
    Cancelled = 9,
}

impl JobState {
    pub const ALL: [JobState; 10] = [
        JobState::Queued,
        JobState::Preparing,
        JobState::Submitting,
        JobState::Submitted,
        JobState::Polling,
        JobState::Downloading,
        JobState::RetryWait,
        JobState::Done,
        JobState::Failed,
        JobState::Cancelled,
    ];

    pub fn name(self) -> &'static str {
        match self {
            JobState::Queued => "queued",
            JobState::Preparing => "preparing",
            JobState::Submitting => "submitting",
            JobState::Submitted => "submitted",
            JobState::Polling => "polling",
            JobState::Downloading => "downloading",
            JobState::RetryWait => "retry-wait",
            JobState::Done => "done",
            JobState::Failed => "failed",
            JobState::Cancelled => "cancelled",
        }
    }

    pub fn index(self) -> u8 {
        self as u8
    }

    pub fn from_index(i: u8) -> Option<JobState> {
        JobState::ALL.get(i as usize).copied()
    }

    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            JobState::Done | JobState::Failed | JobState::Cancelled
        )
    }

    /// A remote task exists at the provider (it may be charged and must be polled).
    pub fn has_remote_task(self) -> bool {
        matches!(
            self,
            JobState::Submitted | JobState::Polling | JobState::Downloading
        )
    }
}

impl fmt::Display for JobState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // `pad` so width and alignment work in tables.
        f.pad(self.name())
    }
}

impl FromStr for JobState {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let lower = s.trim().to_ascii_lowercase().replace('_', "-");
        JobState::ALL
            .into_iter()
            .find(|st| st.name() == lower || (lower == "retry" && *st == JobState::RetryWait))
            .ok_or_else(|| {
                let names: Vec<_> = JobState::ALL.iter().map(|s| s.name()).collect();
                format!("unknown state {s:?} (expected one of {})", names.join(", "))
            })
    }
}

/// What one manifest row asks for, after validation. Everything here is derived from
/// the manifest alone, so the same row always gives the same spec (and the same
/// content hash, which is what makes enqueueing idempotent).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobSpec {
    pub id: String,
    pub provider: ProviderKind,
    pub operation: String,
    /// Local paths (absolute, resolved against the manifest's folder) or http(s) URLs.
    pub inputs: Vec<String>,
    pub prompt: Option<String>,
    /// The provider's own parameters as a JSON object, stored as text: bincode cannot
    /// encode `serde_json::Value` (it needs `deserialize_any`).
    pub params_json: String,
    /// Output folder (ends with `/`) or file stem, relative to the output directory.
    pub output: Option<String>,
    /// The manifest's other columns (`sku`, `notes` …), name and value in column
    /// order: the user's own bookkeeping, carried into every report. Not part of the
    /// content hash: a note changed later must not make a paid job "different".
    pub metadata: Vec<(String, String)>,
}

impl JobSpec {
    pub fn params(&self) -> serde_json::Map<String, serde_json::Value> {
        match serde_json::from_str::<serde_json::Value>(&self.params_json) {
            Ok(serde_json::Value::Object(m)) => m,
            _ => serde_json::Map::new(),
        }
    }

    /// SHA-256 over a canonical encoding of the spec's content (not its id), used to
    /// tell "the same row again" from "another row with the same id".
    pub fn content_hash(&self) -> [u8; 32] {
        use sha2::{Digest, Sha256};
        let mut h = Sha256::new();
        let mut field = |b: &[u8]| {
            h.update((b.len() as u64).to_be_bytes());
            h.update(b);
        };
        field(self.provider.name().as_bytes());
        field(self.operation.as_bytes());
        field(&(self.inputs.len() as u64).to_be_bytes());
        for i in &self.inputs {
            field(i.as_bytes());
        }
        field(self.prompt.as_deref().unwrap_or("\u{0}none").as_bytes());
        field(canonical_json(&self.params_json).as_bytes());
        field(self.output.as_deref().unwrap_or("\u{0}none").as_bytes());
        h.finalize().into()
    }
}

/// Re-serialises a JSON text with sorted keys so `{"a":1,"b":2}` and `{"b":2, "a":1}`
/// hash the same.
pub fn canonical_json(text: &str) -> String {
    match serde_json::from_str::<serde_json::Value>(text) {
        // serde_json's Map is a BTreeMap without the preserve_order feature: sorted.
        Ok(v) => v.to_string(),
        Err(_) => text.to_string(),
    }
}

/// Where a manifest row came from, so errors can name `FILE:LINE`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Origin {
    pub file: String,
    pub line: u64,
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.file, self.line)
    }
}

/// One finished output file. Kept in the job record so a re-run can tell a file in
/// place from one that must be fetched again.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OutputFile {
    /// Which of the provider's results this is (0-based).
    pub index: u32,
    /// Path relative to the output directory.
    pub path: String,
    pub size: u64,
    pub sha256: String,
    /// The picture's size in pixels, read from its header when it was written (None:
    /// not a format whose header pixbatch reads).
    pub width: Option<u32>,
    pub height: Option<u32>,
}

/// An output the provider has announced but that is not yet in place.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum PendingOutput {
    /// A plain URL (may expire).
    Url { url: String, ext: String },
    /// Something only the provider knows how to turn into a URL at download time
    /// (Topaz's `/download/{id}` hands out a fresh presigned link each time).
    Provider { key: String, ext: String },
    /// Delivered inside the submission's answer and written at once; there is
    /// nothing to fetch again if the file is lost.
    Inline { ext: String },
}

/// What happened to a job, kept in the events tree and shown by `show`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobEvent {
    pub at_ms: u64,
    pub kind: EventKind,
    pub message: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum EventKind {
    Enqueued,
    Submitted,
    /// A transient error; the job will be retried.
    Retry,
    /// A request answered 429; does not use up an attempt.
    RateLimited,
    /// The job was submitted again although an earlier submission may have been
    /// accepted (and charged) by the provider.
    PossibleDuplicate,
    /// An unknown submission outcome was settled by asking the provider.
    Reconciled,
    /// The provider no longer knows the remote task; it was submitted again.
    RemoteLost,
    Downloaded,
    Done,
    Failed,
    Cancelled,
    Requeued,
    Note,
}

impl EventKind {
    pub fn name(self) -> &'static str {
        match self {
            EventKind::Enqueued => "enqueued",
            EventKind::Submitted => "submitted",
            EventKind::Retry => "retry",
            EventKind::RateLimited => "rate-limited",
            EventKind::PossibleDuplicate => "possible-duplicate-charge",
            EventKind::Reconciled => "reconciled",
            EventKind::RemoteLost => "remote-lost",
            EventKind::Downloaded => "downloaded",
            EventKind::Done => "done",
            EventKind::Failed => "failed",
            EventKind::Cancelled => "cancelled",
            EventKind::Requeued => "requeued",
            EventKind::Note => "note",
        }
    }
}

/// A job as stored: the spec plus its progress.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Job {
    pub spec: JobSpec,
    pub content_hash: [u8; 32],
    pub origin: Origin,
    pub state: JobState,
    /// When the job may next be worked on (ms since the Unix epoch). Part of the
    /// state index key, so "what is due" is a range scan.
    pub due_ms: u64,
    /// Failed attempts that count against `max_attempts` (429s do not count).
    pub attempts: u32,
    /// How many submissions were started; the idempotency key of the current one is
    /// derived from it (`submit_key`).
    pub submissions: u32,
    /// Refs made while preparing (uploaded file ids, detected faces …), key/value.
    pub prepared: Vec<(String, String)>,
    /// When the current submission's intent was recorded (ms; 0 = none). A
    /// submission sent by a process that died may still be on its way to the
    /// provider: "not found" is only believed once this is old enough.
    pub submit_intent_ms: u64,
    /// The provider's id for the accepted remote task.
    pub remote_id: Option<String>,
    pub pending_outputs: Vec<PendingOutput>,
    pub outputs: Vec<OutputFile>,
    pub error: Option<String>,
    /// Submissions that may have been charged twice (see `EventKind::PossibleDuplicate`).
    pub possible_duplicates: u32,
    pub created_ms: u64,
    pub started_ms: Option<u64>,
    pub finished_ms: Option<u64>,
    pub updated_ms: u64,
    /// The output folder (absolute) the job's files were written under, so `report`
    /// and `show` find them without being told `--out` again.
    pub out_dir: Option<String>,
}

impl Job {
    pub fn new(spec: JobSpec, origin: Origin, now_ms: u64) -> Job {
        let content_hash = spec.content_hash();
        Job {
            spec,
            content_hash,
            origin,
            state: JobState::Queued,
            due_ms: 0,
            attempts: 0,
            submissions: 0,
            prepared: Vec::new(),
            submit_intent_ms: 0,
            remote_id: None,
            pending_outputs: Vec::new(),
            outputs: Vec::new(),
            error: None,
            possible_duplicates: 0,
            created_ms: now_ms,
            started_ms: None,
            finished_ms: None,
            updated_ms: now_ms,
            out_dir: None,
        }
    }

    pub fn id(&self) -> &str {
        &self.spec.id
    }

    /// The idempotency key of the current submission: `<job id>~<n>`. `~` cannot
    /// occur in a job id, so the key splits back unambiguously. Sent as
    /// `X-Request-Id`, used as the Topaz file name and hashed into Perfect's
    /// `request_id`.
    pub fn submit_key(&self) -> String {
        format!("{}~{}", self.spec.id, self.submissions)
    }

    pub fn prepared_get(&self, key: &str) -> Option<&str> {
        self.prepared
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }
}

/// Milliseconds since the Unix epoch (wall clock, as stored in records).
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Is this a valid job id: 1–128 of letters, digits, `-`, `_`, `.`, and not `.`/`..`?
pub fn valid_job_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 128
        && id != "."
        && id != ".."
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.')
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> JobSpec {
        JobSpec {
            id: "a".into(),
            provider: ProviderKind::Topaz,
            operation: "enhance".into(),
            inputs: vec!["/x.png".into()],
            prompt: None,
            params_json: r#"{"b":2,"a":1}"#.into(),
            output: None,
            metadata: Vec::new(),
        }
    }

    #[test]
    fn content_hash_ignores_key_order_and_id_but_not_content() {
        let a = spec();
        let mut b = spec();
        b.params_json = r#"{ "a": 1, "b": 2 }"#.into();
        b.id = "other".into();
        assert_eq!(a.content_hash(), b.content_hash());
        let mut c = spec();
        c.prompt = Some("".into());
        assert_ne!(a.content_hash(), c.content_hash());
        let mut d = spec();
        d.inputs = vec!["/x.pn".into(), "g".into()];
        assert_ne!(a.content_hash(), d.content_hash());
    }

    #[test]
    fn job_ids_are_restricted() {
        assert!(valid_job_id("img-001_a.b"));
        for bad in ["", ".", "..", "a/b", "a~1", "a b", "ü", &"x".repeat(129)] {
            assert!(!valid_job_id(bad), "{bad:?}");
        }
    }

    #[test]
    fn states_and_providers_round_trip_through_their_index_and_name() {
        for s in JobState::ALL {
            assert_eq!(JobState::from_index(s.index()), Some(s));
            assert_eq!(s.name().parse::<JobState>(), Ok(s));
        }
        for p in ProviderKind::ALL {
            assert_eq!(ProviderKind::from_index(p.index()), Some(p));
            assert_eq!(p.name().parse::<ProviderKind>(), Ok(p));
        }
    }
}
