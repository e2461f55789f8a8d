//! `pixbatch report`: every job as CSV, JSON Lines (the rows of `query::JobRow`) or
//! a self-contained HTML gallery (`html`). The rows come from `query::answer`, from
//! the database or over a running run's control socket; rendering never writes to
//! the database.
//!
//! A CSV report is also a manifest: its first columns are the manifest's own (`id`,
//! `provider`, `operation`, `input`, `prompt`, `params`, `output`, then the extra
//! columns the manifest had), and the manifest reader takes the report's other
//! columns ([`CSV_REPORT_COLUMNS`]) for what they are and ignores them. So
//! `report --format csv --state failed -o redo.csv` is a manifest of the failures.

pub mod html;
pub mod thumbnail;

use std::path::{Path, PathBuf};

use crate::query::{self, JobRow};

/// The columns a CSV report leads with: a manifest's.
pub const MANIFEST_COLUMNS: [&str; 7] = crate::manifest::COLUMNS;

/// The report's own columns, after the manifest's and the extra ones: the first 16
/// of `manifest::REPORT_ONLY_COLUMNS` (one list, so a manifest reader always reads
/// past what a CSV report adds; the other 3 are the JSON Lines spelling of times).
pub const CSV_REPORT_COLUMNS: &[&str] = crate::manifest::REPORT_ONLY_COLUMNS
    .as_slice()
    .split_at(16)
    .0;

/// The CSV header: the manifest columns, the extra columns `extra` (the jobs' own
/// metadata names, in the order first seen), then the report's columns.
pub fn csv_header(extra: &[String]) -> Vec<String> {
    let mut h: Vec<String> = MANIFEST_COLUMNS.iter().map(|s| s.to_string()).collect();
    h.extend(extra.iter().cloned());
    h.extend(CSV_REPORT_COLUMNS.iter().map(|s| s.to_string()));
    h
}

/// One CSV record, in the order of [`csv_header`]`(extra)`. Inputs, outputs, hashes
/// and pixel sizes are `|`-joined (as a manifest's `input`); params are JSON text.
pub fn csv_record(r: &JobRow, extra: &[String]) -> Vec<String> {
    let params = if r.params.is_empty() {
        String::new()
    } else {
        serde_json::Value::Object(r.params.clone()).to_string()
    };
    let mut rec = vec![
        r.id.clone(),
        r.provider.to_string(),
        r.operation.clone(),
        r.inputs.join("|"),
        r.prompt.clone().unwrap_or_default(),
        params,
        r.output.clone().unwrap_or_default(),
    ];
    for name in extra {
        rec.push(r.metadata.get(name).unwrap_or_default().to_string());
    }
    rec.extend([
        r.state.to_string(),
        r.outputs.join("|"),
        r.pixels
            .iter()
            .map(|p| p.as_deref().unwrap_or(""))
            .collect::<Vec<_>>()
            .join("|"),
        r.sha256.join("|"),
        r.bytes.to_string(),
        r.out_dir.clone().unwrap_or_default(),
        r.error.clone().unwrap_or_default(),
        r.attempts.to_string(),
        r.submissions.to_string(),
        r.possible_duplicates.to_string(),
        r.remote_id.clone().unwrap_or_default(),
        r.origin.clone(),
        query::rfc3339(r.created_ms),
        r.started_ms.map(query::rfc3339).unwrap_or_default(),
        r.finished_ms.map(query::rfc3339).unwrap_or_default(),
        r.duration_s.map(|d| format!("{d:.3}")).unwrap_or_default(),
    ]);
    rec
}

/// The folder a row's output paths are relative to: `--out` when given (the files
/// were moved, or the reader knows better), else the folder the run recorded, else
/// the default `out`.
pub fn out_dir_of(row: &JobRow, explicit: Option<&Path>) -> PathBuf {
    match (explicit, &row.out_dir) {
        (Some(p), _) => p.to_path_buf(),
        (None, Some(d)) => PathBuf::from(d),
        (None, None) => PathBuf::from("out"),
    }
}

/// Fills in what the record lacks and the files tell: pixel sizes of outputs done
/// before pixbatch recorded them (read from the headers, nothing decoded).
pub fn complete_row(row: &mut JobRow, explicit_out: Option<&Path>) {
    if row.pixels.len() < row.outputs.len() {
        row.pixels.resize(row.outputs.len(), None);
    }
    if row.pixels.iter().all(Option::is_some) {
        return;
    }
    let dir = out_dir_of(row, explicit_out);
    for (path, px) in row.outputs.iter().zip(row.pixels.iter_mut()) {
        if px.is_none() {
            *px = crate::providers::util::dimensions_of_file(&dir.join(path))
                .map(|(w, h)| format!("{w}x{h}"));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_report_columns_name_no_manifest_column_and_a_manifest_reads_past_them() {
        for &c in CSV_REPORT_COLUMNS {
            assert!(!MANIFEST_COLUMNS.contains(&c), "{c}");
            assert!(crate::manifest::REPORT_ONLY_COLUMNS.contains(&c), "{c}");
        }
    }
}
