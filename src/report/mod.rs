//! `pixbatch report`: every job as CSV, JSON Lines (the rows of `query::JobRow`) or
//! a self-contained HTML gallery (`html`). The rows come from `query::answer`, from
//! the database or over a running run's control socket; rendering never writes to
//! the database.

pub mod html;
pub mod thumbnail;

use crate::query::{self, JobRow};

/// The CSV header, in column order.
pub const CSV_COLUMNS: [&str; 17] = [
    "id",
    "provider",
    "operation",
    "state",
    "inputs",
    "outputs",
    "sha256",
    "bytes",
    "remote_id",
    "attempts",
    "submissions",
    "possible_duplicates",
    "error",
    "origin",
    "created",
    "finished",
    "duration_s",
];

/// One CSV record, in the order of [`CSV_COLUMNS`].
pub fn csv_record(r: &JobRow) -> Vec<String> {
    vec![
        r.id.clone(),
        r.provider.to_string(),
        r.operation.clone(),
        r.state.to_string(),
        r.inputs.clone(),
        r.outputs.clone(),
        r.sha256.clone(),
        r.bytes.to_string(),
        r.remote_id.clone().unwrap_or_default(),
        r.attempts.to_string(),
        r.submissions.to_string(),
        r.possible_duplicates.to_string(),
        r.error.clone().unwrap_or_default(),
        r.origin.clone(),
        query::rfc3339(r.created_ms),
        r.finished_ms.map(query::rfc3339).unwrap_or_default(),
        r.duration_s.map(|d| format!("{d:.3}")).unwrap_or_default(),
    ]
}
