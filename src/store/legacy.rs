//! Record layouts of earlier format versions, frozen, and their migration to the
//! current types. bincode is not self-describing: a record is read with exactly the
//! layout it was written with, so these types never change once released (see
//! `docs/RELIABILITY.md`, "Record format versions").
//!
//! Format 1 (pixbatch up to the reports change): `Job` without `out_dir`, its
//! `JobSpec` without `metadata`, its `OutputFile`s without `width`/`height`. Every
//! other record type is laid out the same in formats 1 and 2.

use serde::Deserialize;

use crate::model::{Job, JobSpec, JobState, Origin, OutputFile, PendingOutput, ProviderKind};

// `JobState` and `ProviderKind` are shared with the current types: both are
// append-only enums (bincode stores a variant's index), so old indices keep meaning.

#[derive(Deserialize)]
pub(super) struct JobV1 {
    spec: JobSpecV1,
    content_hash: [u8; 32],
    origin: OriginV1,
    state: JobState,
    due_ms: u64,
    attempts: u32,
    submissions: u32,
    prepared: Vec<(String, String)>,
    submit_intent_ms: u64,
    remote_id: Option<String>,
    pending_outputs: Vec<PendingOutputV1>,
    outputs: Vec<OutputFileV1>,
    error: Option<String>,
    possible_duplicates: u32,
    created_ms: u64,
    started_ms: Option<u64>,
    finished_ms: Option<u64>,
    updated_ms: u64,
}

#[derive(Deserialize)]
struct JobSpecV1 {
    id: String,
    provider: ProviderKind,
    operation: String,
    inputs: Vec<String>,
    prompt: Option<String>,
    params_json: String,
    output: Option<String>,
}

#[derive(Deserialize)]
struct OriginV1 {
    file: String,
    line: u64,
}

#[derive(Deserialize)]
struct OutputFileV1 {
    index: u32,
    path: String,
    size: u64,
    sha256: String,
}

#[derive(Deserialize)]
enum PendingOutputV1 {
    Url { url: String, ext: String },
    Provider { key: String, ext: String },
    Inline { ext: String },
}

impl From<JobV1> for Job {
    fn from(v: JobV1) -> Job {
        let s = v.spec;
        Job {
            spec: JobSpec {
                id: s.id,
                provider: s.provider,
                operation: s.operation,
                inputs: s.inputs,
                prompt: s.prompt,
                params_json: s.params_json,
                output: s.output,
                metadata: Vec::new(),
            },
            content_hash: v.content_hash,
            origin: Origin {
                file: v.origin.file,
                line: v.origin.line,
            },
            state: v.state,
            due_ms: v.due_ms,
            attempts: v.attempts,
            submissions: v.submissions,
            prepared: v.prepared,
            submit_intent_ms: v.submit_intent_ms,
            remote_id: v.remote_id,
            pending_outputs: v
                .pending_outputs
                .into_iter()
                .map(|p| match p {
                    PendingOutputV1::Url { url, ext } => PendingOutput::Url { url, ext },
                    PendingOutputV1::Provider { key, ext } => PendingOutput::Provider { key, ext },
                    PendingOutputV1::Inline { ext } => PendingOutput::Inline { ext },
                })
                .collect(),
            outputs: v
                .outputs
                .into_iter()
                .map(|o| OutputFile {
                    index: o.index,
                    path: o.path,
                    size: o.size,
                    sha256: o.sha256,
                    // Not recorded then: reports read the header when the file is found.
                    width: None,
                    height: None,
                })
                .collect(),
            error: v.error,
            possible_duplicates: v.possible_duplicates,
            created_ms: v.created_ms,
            started_ms: v.started_ms,
            finished_ms: v.finished_ms,
            updated_ms: v.updated_ms,
            // Unknown for jobs done before it was recorded: readers fall back to `--out`.
            out_dir: None,
        }
    }
}
