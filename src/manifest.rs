//! The manifest reader: turns a CSV, JSON-array or JSON-Lines manifest into validated
//! [`JobSpec`]s, one row at a time.
//!
//! * Format: `.csv` is CSV; `.json` is a JSON array (or JSON Lines when it starts with
//!   `{`); `.jsonl`/`.ndjson` is JSON Lines (or a JSON array when it starts with `[`);
//!   anything else is sniffed from its first non-whitespace byte: `[` JSON array, `{`
//!   JSON Lines, else CSV. A UTF-8 BOM is skipped.
//! * Streaming: nothing holds the whole file, and no row larger than
//!   [`MAX_ROW_BYTES`] is held either (it becomes a row error). CSV records are read by
//!   a small state machine that follows the `csv` crate's default dialect exactly (a
//!   property test checks it against `csv::Reader`) but caps a record's size and knows
//!   the line it starts on; JSON Lines are read line by line; a JSON array is scanned
//!   for the byte span of each top-level element (tracking strings, escapes, nesting
//!   and lines), and each element is parsed on its own with `serde_json`.
//! * Columns / keys: `id`, `provider`, `operation`, `input`, `prompt`, `params`,
//!   `output` (trimmed, case-insensitive). Unknown ones are an error naming them: a
//!   typo must not silently drop a parameter of a paid request.
//! * Every row gives either a spec (generic checks here, then
//!   [`providers::validate`]) or one [`RowError`] per problem, all on the row's
//!   starting line.
//!
//! Duplicates across rows (and across manifests of one command) are the caller's to
//! check, with [`DuplicateTracker`].

use std::collections::HashMap;
use std::fmt;
use std::fs::File;
use std::io::{self, BufRead, BufReader, Chain, Cursor, Read};
use std::path::{Path, PathBuf};
use std::str::FromStr;

use serde::de::{self, Deserialize, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde_json::{Map, Value};
use sha2::{Digest, Sha256};

use crate::model::{valid_job_id, JobSpec, Origin, ProviderKind};
use crate::providers;

/// The largest row (CSV record, JSON Lines line, JSON array element) accepted, in bytes.
pub const MAX_ROW_BYTES: usize = 1 << 20;

/// Longest accepted `output` value and path component, in bytes.
const MAX_OUTPUT_BYTES: usize = 1024;
const MAX_OUTPUT_COMPONENT_BYTES: usize = 200;

const READ_BUFFER: usize = 64 * 1024;
const BOM: [u8; 3] = [0xEF, 0xBB, 0xBF];

/// The column names, in their documented order.
pub const COLUMNS: [&str; 7] = [
    "id",
    "provider",
    "operation",
    "input",
    "prompt",
    "params",
    "output",
];

/// A problem with one row, at `FILE:LINE` (the line the row starts on).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RowError {
    pub origin: Origin,
    pub reason: String,
}

impl fmt::Display for RowError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.origin, self.reason)
    }
}

impl std::error::Error for RowError {}

/// A problem with a manifest as a whole: it cannot be read, or it is not a manifest
/// (bad header, not a JSON array, truncated …). Rows already handed to the callback
/// before such an error stay handed; callers treat the manifest as invalid.
#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    #[error("{}: {source}", path.display())]
    Io { path: PathBuf, source: io::Error },
    #[error("{}: {reason}", path.display())]
    Format { path: PathBuf, reason: String },
}

/// The three manifest formats.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ManifestFormat {
    Csv,
    JsonArray,
    JsonLines,
}

/// What [`DuplicateTracker::check`] says about a good row.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RowStatus {
    /// The first row with this id.
    New,
    /// The same id with the same content was seen before: the same job again, neither
    /// a second job nor an error.
    Repeat,
}

/// Reads one manifest, calling `on_row` for every data row in file order.
///
/// A good row gives one `Ok((origin, spec))`. A bad row gives one `Err` per problem
/// found (all on the row's line), so a row may produce several calls; the returned
/// count is the number of data rows seen (blank rows and the CSV header not counted).
/// `origin.file` is `path` as given.
pub fn read_manifest(
    path: &Path,
    on_row: &mut dyn FnMut(Result<(Origin, JobSpec), RowError>),
) -> Result<u64, ManifestError> {
    read_checked(path, &providers::check, on_row, &mut |_| {})
}

/// [`read_manifest`] that also reports each row's warnings (a model or parameter the
/// provider's check does not know: the row still passes) to `on_warning`, unless
/// `strict` says so for the row's provider (`strict_params = true`): then they are
/// row errors like any other.
pub fn read_manifest_warning(
    path: &Path,
    strict: &dyn Fn(ProviderKind) -> bool,
    on_row: &mut dyn FnMut(Result<(Origin, JobSpec), RowError>),
    on_warning: &mut dyn FnMut(RowError),
) -> Result<u64, ManifestError> {
    let check = |spec: &JobSpec| {
        let found = providers::check(spec);
        if strict(spec.provider) {
            found.strict(spec.provider)
        } else {
            found
        }
    };
    read_checked(path, &check, on_row, on_warning)
}

/// Decides a manifest's format from its extension, sniffing the content where the
/// extension does not settle it.
pub fn detect_format(path: &Path) -> Result<ManifestFormat, ManifestError> {
    let ext = path
        .extension()
        .and_then(|e| e.to_str())
        .map(|e| e.to_ascii_lowercase());
    if ext.as_deref() == Some("csv") {
        return Ok(ManifestFormat::Csv);
    }
    let first = first_non_ws_byte(path)?;
    Ok(format_for(ext.as_deref(), first))
}

/// The format for a (lower-case) extension and the first byte that is not
/// whitespace (after a BOM).
fn format_for(ext: Option<&str>, first: Option<u8>) -> ManifestFormat {
    match (ext, first) {
        (Some("csv"), _) => ManifestFormat::Csv,
        (Some("json"), Some(b'{')) => ManifestFormat::JsonLines,
        (Some("json"), _) => ManifestFormat::JsonArray,
        (Some("jsonl" | "ndjson"), Some(b'[')) => ManifestFormat::JsonArray,
        (Some("jsonl" | "ndjson"), _) => ManifestFormat::JsonLines,
        (_, Some(b'[')) => ManifestFormat::JsonArray,
        (_, Some(b'{')) => ManifestFormat::JsonLines,
        _ => ManifestFormat::Csv,
    }
}

/// [`read_manifest`] of a manifest held in memory, as if it were the file `name` with
/// relative inputs resolved against `base` (the fuzz targets and property tests read
/// through this; the format is chosen from `name`'s extension and the content, as
/// for a file).
pub fn read_manifest_bytes(
    name: &Path,
    bytes: &[u8],
    base: &Path,
    on_row: &mut dyn FnMut(Result<(Origin, JobSpec), RowError>),
) -> Result<u64, ManifestError> {
    let ext = name
        .extension()
        .and_then(|e| e.to_str())
        .map(|e| e.to_ascii_lowercase());
    let bytes = bytes.strip_prefix(&BOM[..]).unwrap_or(bytes);
    check_encoding(name, bytes)?;
    let first = bytes.iter().copied().find(|b| !b.is_ascii_whitespace());
    let mut ctx = Ctx {
        path: name,
        file: name.display().to_string(),
        base: base.to_path_buf(),
        check: &providers::check,
        on_row,
        on_warning: &mut |_| {},
        rows: 0,
    };
    match format_for(ext.as_deref(), first) {
        ManifestFormat::Csv => read_csv(bytes, &mut ctx)?,
        ManifestFormat::JsonArray => read_json_array(bytes, &mut ctx)?,
        ManifestFormat::JsonLines => read_json_lines(bytes, &mut ctx)?,
    }
    Ok(ctx.rows)
}

/// Refuses a UTF-16 or UTF-32 manifest (a spreadsheet's "Unicode text") with a clear
/// message, rather than one error per garbled column name: its byte-order mark, or
/// the NUL bytes between ASCII characters, give it away.
fn check_encoding(path: &Path, head: &[u8]) -> Result<(), ManifestError> {
    let utf32 = head.starts_with(&[0xFF, 0xFE, 0, 0]) || head.starts_with(&[0, 0, 0xFE, 0xFF]);
    let utf16_bom = head.starts_with(&[0xFF, 0xFE]) || head.starts_with(&[0xFE, 0xFF]);
    let utf16_bare = head.len() >= 4
        && ((head[0] != 0 && head[1] == 0 && head[2] != 0 && head[3] == 0)
            || (head[0] == 0 && head[1] != 0 && head[2] == 0 && head[3] != 0));
    let wide = if utf32 {
        Some("UTF-32")
    } else if utf16_bom || utf16_bare {
        Some("UTF-16")
    } else {
        None
    };
    match wide {
        Some(enc) => Err(ManifestError::Format {
            path: path.to_path_buf(),
            reason: format!(
                "the manifest looks {enc}-encoded; save it as UTF-8 (CSV UTF-8 in a spreadsheet)"
            ),
        }),
        None => Ok(()),
    }
}

/// [`read_manifest`] with the provider check passed in (tests use their own).
#[cfg(test)]
fn read_with(
    path: &Path,
    validate: &dyn Fn(&JobSpec) -> Vec<String>,
    on_row: &mut dyn FnMut(Result<(Origin, JobSpec), RowError>),
) -> Result<u64, ManifestError> {
    let check = |spec: &JobSpec| providers::Findings::errors(validate(spec));
    read_checked(path, &check, on_row, &mut |_| {})
}

fn read_checked(
    path: &Path,
    check: &dyn Fn(&JobSpec) -> providers::Findings,
    on_row: &mut dyn FnMut(Result<(Origin, JobSpec), RowError>),
    on_warning: &mut dyn FnMut(RowError),
) -> Result<u64, ManifestError> {
    let io_err = |source| ManifestError::Io {
        path: path.to_path_buf(),
        source,
    };
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let base = std::path::absolute(dir).map_err(io_err)?;
    let mut head = Vec::with_capacity(7);
    File::open(path)
        .and_then(|f| f.take(7).read_to_end(&mut head))
        .map_err(io_err)?;
    check_encoding(path, head.strip_prefix(&BOM[..]).unwrap_or(&head))?;
    let format = detect_format(path)?;
    let reader = open_skipping_bom(path)?;
    let mut ctx = Ctx {
        path,
        file: path.display().to_string(),
        base,
        check,
        on_row,
        on_warning,
        rows: 0,
    };
    match format {
        ManifestFormat::Csv => read_csv(reader, &mut ctx)?,
        ManifestFormat::JsonArray => read_json_array(reader, &mut ctx)?,
        ManifestFormat::JsonLines => read_json_lines(reader, &mut ctx)?,
    }
    Ok(ctx.rows)
}

type Source = BufReader<Chain<Cursor<Vec<u8>>, File>>;

/// Opens `path` for buffered reading, past a leading UTF-8 BOM if there is one.
fn open_skipping_bom(path: &Path) -> Result<Source, ManifestError> {
    let io_err = |source| ManifestError::Io {
        path: path.to_path_buf(),
        source,
    };
    let mut file = File::open(path).map_err(io_err)?;
    let mut head = [0u8; 3];
    let mut n = 0;
    while n < head.len() {
        match file.read(&mut head[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(io_err(e)),
        }
    }
    let prefix = if n == 3 && head == BOM {
        Vec::new()
    } else {
        head[..n].to_vec()
    };
    Ok(BufReader::with_capacity(
        READ_BUFFER,
        Cursor::new(prefix).chain(file),
    ))
}

fn first_non_ws_byte(path: &Path) -> Result<Option<u8>, ManifestError> {
    let mut r = open_skipping_bom(path)?;
    loop {
        let chunk = match r.fill_buf() {
            Ok(c) => c,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(source) => {
                return Err(ManifestError::Io {
                    path: path.to_path_buf(),
                    source,
                })
            }
        };
        if chunk.is_empty() {
            return Ok(None);
        }
        if let Some(&b) = chunk.iter().find(|b| !b.is_ascii_whitespace()) {
            return Ok(Some(b));
        }
        let n = chunk.len();
        r.consume(n);
    }
}

/// Per-manifest state shared by the three readers.
struct Ctx<'a> {
    path: &'a Path,
    /// The path as the user gave it, for `Origin`.
    file: String,
    /// The manifest's folder, absolute: relative inputs are resolved against it.
    base: PathBuf,
    check: &'a dyn Fn(&JobSpec) -> providers::Findings,
    on_row: &'a mut dyn FnMut(Result<(Origin, JobSpec), RowError>),
    on_warning: &'a mut dyn FnMut(RowError),
    rows: u64,
}

impl Ctx<'_> {
    fn origin(&self, line: u64) -> Origin {
        Origin {
            file: self.file.clone(),
            line,
        }
    }

    fn format_error(&self, reason: String) -> ManifestError {
        ManifestError::Format {
            path: self.path.to_path_buf(),
            reason,
        }
    }

    fn io_error(&self, source: io::Error) -> ManifestError {
        ManifestError::Io {
            path: self.path.to_path_buf(),
            source,
        }
    }

    /// One data row: checks it and reports the outcome.
    fn row(&mut self, line: u64, raw: Result<RawRow, Vec<String>>) {
        self.rows += 1;
        let spec = match raw.and_then(|r| build_spec(r, &self.base)) {
            Ok(spec) => spec,
            Err(problems) => return self.fail(line, problems),
        };
        let found = (self.check)(&spec);
        if found.errors.is_empty() {
            for reason in found.warnings {
                let origin = self.origin(line);
                (self.on_warning)(RowError { origin, reason });
            }
            let origin = self.origin(line);
            (self.on_row)(Ok((origin, spec)));
        } else {
            self.fail(line, found.errors);
        }
    }

    fn fail(&mut self, line: u64, mut problems: Vec<String>) {
        if problems.is_empty() {
            problems.push("invalid row".to_string());
        }
        for reason in problems {
            let origin = self.origin(line);
            (self.on_row)(Err(RowError { origin, reason }));
        }
    }
}

// ---------------------------------------------------------------------------------
// Columns and the generic row checks
// ---------------------------------------------------------------------------------

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Column {
    Id,
    Provider,
    Operation,
    Input,
    Prompt,
    Params,
    Output,
}

impl Column {
    const ALL: [Column; 7] = [
        Column::Id,
        Column::Provider,
        Column::Operation,
        Column::Input,
        Column::Prompt,
        Column::Params,
        Column::Output,
    ];

    fn name(self) -> &'static str {
        COLUMNS[self as usize]
    }

    /// Header names and JSON keys: trimmed, case-insensitive.
    fn parse(name: &str) -> Option<Column> {
        let lower = name.trim().to_lowercase();
        Column::ALL.into_iter().find(|c| c.name() == lower)
    }
}

/// The columns (JSON keys) a `pixbatch report` writes besides the manifest's own. A
/// manifest column of one of these names is taken for a report's and ignored: they
/// tell what became of a job, not what to do, and so a report is a manifest again
/// (`report --state failed -o redo.csv`, then `run redo.csv`). `*_ms` are the JSON
/// Lines report's spelling of the times.
pub const REPORT_ONLY_COLUMNS: [&str; 19] = [
    "state",
    "outputs",
    "pixels",
    "sha256",
    "bytes",
    "out_dir",
    "error",
    "attempts",
    "submissions",
    "possible_duplicates",
    "remote_id",
    "origin",
    "created",
    "started",
    "finished",
    "duration_s",
    "created_ms",
    "started_ms",
    "finished_ms",
];

/// What a header name (or JSON key) is.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Name {
    Known(Column),
    /// One of [`REPORT_ONLY_COLUMNS`]: read past.
    ReportOnly,
    /// The user's own column: kept as the job's metadata under this name.
    Extra(String),
}

/// Sorts a header name or key; a near-typo of a known column (`promt`) is an error
/// with the suggestion, never metadata: it would silently drop a parameter of a
/// paid request.
fn classify(kind: &str, name: &str) -> Result<Name, String> {
    if let Some(c) = Column::parse(name) {
        return Ok(Name::Known(c));
    }
    let lower = name.trim().to_lowercase();
    if REPORT_ONLY_COLUMNS.contains(&lower.as_str()) {
        return Ok(Name::ReportOnly);
    }
    if let Some(near) = near_typo(&lower) {
        return Err(format!(
            "unknown {kind} {:?}: did you mean {near}? (a {kind} of your own needs a name \
             less like one of {}; it is then kept as the job's metadata)",
            name.trim(),
            COLUMNS.join(", ")
        ));
    }
    Ok(Name::Extra(name.trim().to_string()))
}

/// The known column `name` is probably a misspelling of: one edit (or swap of two
/// neighbours) away for short names, two for names of 6 letters or more.
fn near_typo(name: &str) -> Option<&'static str> {
    COLUMNS
        .iter()
        .map(|c| (strsim::osa_distance(name, c), *c))
        .filter(|(d, c)| *d <= if c.len() >= 6 { 2 } else { 1 })
        .min_by_key(|(d, _)| *d)
        .map(|(_, c)| c)
}

#[derive(Debug, Default)]
enum RawInput {
    #[default]
    None,
    /// `a|b`, as in CSV.
    Joined(String),
    /// A JSON array of strings.
    List(Vec<String>),
}

#[derive(Debug, Default)]
enum RawParams {
    #[default]
    None,
    /// JSON text (CSV, or a JSON string value).
    Text(String),
    Object(Map<String, Value>),
}

/// A row's values as read, before any check.
#[derive(Debug, Default)]
struct RawRow {
    /// The extra columns with a value, in column order.
    metadata: Vec<(String, String)>,
    id: Option<String>,
    provider: Option<String>,
    operation: Option<String>,
    input: RawInput,
    prompt: Option<String>,
    params: RawParams,
    output: Option<String>,
}

impl RawRow {
    /// Sets a string-valued column (input and params are kept as text).
    fn set_text(&mut self, col: Column, value: String) {
        match col {
            Column::Id => self.id = Some(value),
            Column::Provider => self.provider = Some(value),
            Column::Operation => self.operation = Some(value),
            Column::Input => self.input = RawInput::Joined(value),
            Column::Prompt => self.prompt = Some(value),
            Column::Params => self.params = RawParams::Text(value),
            Column::Output => self.output = Some(value),
        }
    }
}

/// A user-given string for an error message: as is, or quoted and escaped when it
/// holds control characters or is empty.
fn show(s: &str) -> String {
    if s.is_empty() || s.chars().any(char::is_control) {
        format!("{s:?}")
    } else {
        s.to_string()
    }
}

/// The generic checks. Returns every problem found.
fn build_spec(raw: RawRow, base: &Path) -> Result<JobSpec, Vec<String>> {
    let mut errs = Vec::new();

    let provider = match raw.provider.as_deref().map(str::trim) {
        None | Some("") => {
            errs.push("missing provider".to_string());
            None
        }
        Some(p) => match ProviderKind::from_str(p) {
            Ok(kind) => Some(kind),
            Err(e) => {
                errs.push(e);
                None
            }
        },
    };

    let operation = raw.operation.as_deref().map(str::trim).unwrap_or("");
    if operation.is_empty() {
        errs.push("missing operation".to_string());
    }

    let id = raw.id.as_deref().map(str::trim).unwrap_or("");
    if !id.is_empty() && !valid_job_id(id) {
        errs.push(format!(
            "invalid id {id:?}: use 1 to 128 letters, digits, '-', '_' or '.'"
        ));
    }

    let inputs = check_inputs(raw.input, base, &mut errs);

    let prompt = raw.prompt.filter(|p| !p.is_empty());

    let params_json = match check_params(raw.params) {
        Ok(p) => p,
        Err(e) => {
            errs.push(e);
            String::new()
        }
    };

    let output = match check_output(raw.output.as_deref().unwrap_or("")) {
        Ok(o) => o,
        Err(e) => {
            errs.push(e);
            None
        }
    };

    let Some(provider) = provider else {
        return Err(errs);
    };
    if !errs.is_empty() {
        return Err(errs);
    }
    let mut spec = JobSpec {
        id: String::new(),
        provider,
        operation: operation.to_string(),
        inputs,
        prompt,
        params_json,
        output,
        metadata: raw.metadata,
    };
    spec.id = if id.is_empty() {
        derived_id(&spec)
    } else {
        id.to_string()
    };
    Ok(spec)
}

/// `r-` + the first 16 hex digits of the content hash: the same row, the same id.
fn derived_id(spec: &JobSpec) -> String {
    let hash = spec.content_hash();
    format!("r-{}", hex::encode(&hash[..8]))
}

fn check_inputs(raw: RawInput, base: &Path, errs: &mut Vec<String>) -> Vec<String> {
    let parts: Vec<String> = match raw {
        RawInput::None => Vec::new(),
        RawInput::Joined(s) if s.trim().is_empty() => Vec::new(),
        RawInput::Joined(s) => s.split('|').map(|p| p.trim().to_string()).collect(),
        RawInput::List(v) => v.into_iter().map(|p| p.trim().to_string()).collect(),
    };
    let mut out = Vec::with_capacity(parts.len());
    for (i, part) in parts.iter().enumerate() {
        let n = i + 1;
        if part.is_empty() {
            errs.push(format!("input {n} is empty"));
            continue;
        }
        match resolve_input(part, base) {
            Ok(s) => out.push(s),
            Err(e) => errs.push(format!("input {n} ({}): {e}", show(part))),
        }
    }
    out
}

/// Does this look like a URL (`scheme://…`, or any `http:`/`https:`)?
fn looks_like_url(s: &str) -> bool {
    let lower = s.get(..6).unwrap_or(s).to_ascii_lowercase();
    if lower.starts_with("http:") || lower.starts_with("https:") {
        return true;
    }
    match s.find("://") {
        Some(i) if i > 0 => {
            let scheme = &s[..i];
            scheme.starts_with(|c: char| c.is_ascii_alphabetic())
                && scheme
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '+' | '-' | '.'))
        }
        _ => false,
    }
}

/// An http(s) URL (normalised), or a local path made absolute against `base` that
/// names an existing regular file.
fn resolve_input(part: &str, base: &Path) -> Result<String, String> {
    if looks_like_url(part) {
        let url = url::Url::parse(part).map_err(|e| format!("not a valid URL: {e}"))?;
        match url.scheme() {
            "http" | "https" => {}
            other => {
                return Err(format!(
                    "unsupported URL scheme {other:?} (only http and https)"
                ))
            }
        }
        if url.host_str().is_none_or(str::is_empty) {
            return Err("the URL has no host".to_string());
        }
        return Ok(url.to_string());
    }
    let full = std::path::absolute(base.join(part)).map_err(|e| e.to_string())?;
    match std::fs::metadata(&full) {
        Ok(m) if m.is_file() => {}
        Ok(m) if m.is_dir() => return Err("is a folder, not a file".to_string()),
        Ok(_) => return Err("not a regular file".to_string()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Err("no such file".to_string()),
        Err(e) => return Err(e.to_string()),
    }
    full.to_str()
        .map(str::to_string)
        .ok_or_else(|| format!("the resolved path {} is not valid UTF-8", full.display()))
}

fn json_kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "true/false",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// The params as compact JSON object text (`{}` when empty).
fn check_params(raw: RawParams) -> Result<String, String> {
    let map = match raw {
        RawParams::None => Map::new(),
        RawParams::Object(m) => m,
        RawParams::Text(s) if s.trim().is_empty() => Map::new(),
        RawParams::Text(s) => match serde_json::from_str::<Value>(s.trim()) {
            Ok(Value::Object(m)) => m,
            Ok(v) => {
                return Err(format!(
                    "params is not a JSON object: got {}",
                    json_kind(&v)
                ))
            }
            Err(e) => return Err(format!("params is not a JSON object: {e}")),
        },
    };
    serde_json::to_string(&Value::Object(map)).map_err(|e| format!("params: {e}"))
}

/// A safe path relative to the output folder, or None when not given.
fn check_output(raw: &str) -> Result<Option<String>, String> {
    let o = raw.trim();
    if o.is_empty() {
        return Ok(None);
    }
    if o.chars().any(char::is_control) {
        return Err(format!("output {o:?} contains a control character"));
    }
    if o.contains('\\') {
        return Err(format!(
            "output {o} contains a backslash (use / between folders)"
        ));
    }
    if o.starts_with('/') {
        return Err(format!(
            "output {o} is an absolute path (give a path inside the output folder)"
        ));
    }
    let b = o.as_bytes();
    if b.len() >= 2 && b[0].is_ascii_alphabetic() && b[1] == b':' {
        return Err(format!("output {o} starts with a drive prefix"));
    }
    if o.split('/').any(|c| c == "..") {
        return Err(format!("output {o} escapes the output folder"));
    }
    if o.len() > MAX_OUTPUT_BYTES {
        return Err(format!("output is longer than {MAX_OUTPUT_BYTES} bytes"));
    }
    if o.split('/').any(|c| c.len() > MAX_OUTPUT_COMPONENT_BYTES) {
        return Err(format!(
            "output has a name longer than {MAX_OUTPUT_COMPONENT_BYTES} bytes"
        ));
    }
    Ok(Some(o.to_string()))
}

// ---------------------------------------------------------------------------------
// Line counting
// ---------------------------------------------------------------------------------

/// Tracks the 1-based line and byte column of the next byte. `\n`, `\r\n` and a lone
/// `\r` each end a line.
#[derive(Debug, Clone, Copy)]
struct LineCounter {
    line: u64,
    col: u64,
    prev_cr: bool,
}

impl LineCounter {
    fn new() -> Self {
        LineCounter {
            line: 1,
            col: 1,
            prev_cr: false,
        }
    }

    fn feed(&mut self, b: u8) {
        match b {
            b'\n' => {
                if !self.prev_cr {
                    self.line += 1;
                }
                self.col = 1;
                self.prev_cr = false;
            }
            b'\r' => {
                self.line += 1;
                self.col = 1;
                self.prev_cr = true;
            }
            _ => {
                self.col += 1;
                self.prev_cr = false;
            }
        }
    }
}

// ---------------------------------------------------------------------------------
// CSV
// ---------------------------------------------------------------------------------

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum CsvState {
    /// At the start of a field.
    FieldStart,
    /// In an unquoted field (or the unquoted rest of one).
    Unquoted,
    /// Inside quotes.
    Quoted,
    /// Just after a quote inside quotes: `""` is an escaped quote, anything else ends
    /// the quoted part.
    QuoteInQuoted,
}

struct CsvRecord {
    line: u64,
    oversize: bool,
    /// The file ended inside quotes.
    unterminated: bool,
}

/// Reads a CSV stream one record at a time, holding at most [`MAX_ROW_BYTES`] of it.
///
/// Follows the `csv` crate's default dialect exactly (a test checks it against
/// `csv::Reader`): `,` between fields, `"` quotes with `""` for a quote, a quote only
/// opens at the start of a field (after the closing quote the rest of the field is
/// literal), `\r`, `\n` or `\r\n` ends a record, empty lines are skipped. It is done
/// here rather than by `csv::Reader` because a record's size must be capped while it
/// is read and its starting line known; `csv::Reader` grows a record without bound.
struct CsvSplitter<R> {
    r: R,
    pos: LineCounter,
}

impl<R: BufRead> CsvSplitter<R> {
    /// The next non-empty record: its unescaped field bytes into `buf`, the end offset
    /// of each field into `ends`.
    fn next_record(
        &mut self,
        buf: &mut Vec<u8>,
        ends: &mut Vec<usize>,
        cap: usize,
    ) -> io::Result<Option<CsvRecord>> {
        buf.clear();
        ends.clear();
        let mut started = false;
        let mut line = 0;
        let mut raw_len = 0usize;
        let mut oversize = false;
        let mut st = CsvState::FieldStart;
        loop {
            let chunk = match self.r.fill_buf() {
                Ok(c) => c,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            };
            if chunk.is_empty() {
                if !started {
                    return Ok(None);
                }
                if !oversize {
                    ends.push(buf.len());
                }
                return Ok(Some(CsvRecord {
                    line,
                    oversize,
                    unterminated: st == CsvState::Quoted,
                }));
            }
            let mut used = 0;
            let mut done = false;
            for &b in chunk {
                used += 1;
                let term = b == b'\n' || b == b'\r';
                if !started {
                    if term {
                        self.pos.feed(b);
                        continue;
                    }
                    started = true;
                    line = self.pos.line;
                }
                self.pos.feed(b);
                // What the byte does: end the record, end a field, or add a byte.
                let (next, add, field_end) = match st {
                    CsvState::FieldStart | CsvState::Unquoted | CsvState::QuoteInQuoted if term => {
                        done = true;
                        break;
                    }
                    CsvState::FieldStart if b == b'"' => (CsvState::Quoted, None, false),
                    CsvState::FieldStart | CsvState::Unquoted | CsvState::QuoteInQuoted
                        if b == b',' =>
                    {
                        (CsvState::FieldStart, None, true)
                    }
                    CsvState::FieldStart | CsvState::Unquoted => {
                        (CsvState::Unquoted, Some(b), false)
                    }
                    CsvState::Quoted if b == b'"' => (CsvState::QuoteInQuoted, None, false),
                    CsvState::Quoted => (CsvState::Quoted, Some(b), false),
                    CsvState::QuoteInQuoted if b == b'"' => (CsvState::Quoted, Some(b'"'), false),
                    CsvState::QuoteInQuoted => (CsvState::Unquoted, Some(b), false),
                };
                st = next;
                raw_len += 1;
                if raw_len > cap {
                    oversize = true;
                }
                if oversize {
                    continue;
                }
                if let Some(byte) = add {
                    buf.push(byte);
                }
                if field_end {
                    ends.push(buf.len());
                }
            }
            self.r.consume(used);
            if done {
                if !oversize {
                    ends.push(buf.len());
                }
                return Ok(Some(CsvRecord {
                    line,
                    oversize,
                    unterminated: false,
                }));
            }
        }
    }
}

/// The fields of a record read by [`CsvSplitter::next_record`].
fn csv_fields<'a>(buf: &'a [u8], ends: &[usize]) -> Vec<&'a [u8]> {
    let mut start = 0;
    ends.iter()
        .map(|&end| {
            let field = buf.get(start..end).unwrap_or_default();
            start = end;
            field
        })
        .collect()
}

fn all_fields_empty(fields: &[&[u8]]) -> bool {
    fields.iter().all(|f| f.trim_ascii().is_empty())
}

/// The header: what each field is (None for an unnamed one, which must stay empty).
fn parse_csv_header(fields: &[&[u8]], line: u64) -> Result<Vec<Option<Name>>, String> {
    let mut cols: Vec<Option<Name>> = Vec::with_capacity(fields.len());
    let mut problems = Vec::new();
    for field in fields {
        let name = std::str::from_utf8(field)
            .map_err(|_| format!("line {line}: the header row is not valid UTF-8"))?
            .trim();
        if name.is_empty() {
            cols.push(None);
            continue;
        }
        let twice = |n: &Name| {
            cols.iter().flatten().any(|c| match (c, n) {
                (Name::Known(a), Name::Known(b)) => a == b,
                (Name::Extra(a), Name::Extra(b)) => a.to_lowercase() == b.to_lowercase(),
                _ => false,
            })
        };
        match classify("column", name) {
            Ok(n) if twice(&n) => {
                return Err(format!(
                    "line {line}: column {} appears twice",
                    name.to_lowercase()
                ));
            }
            Ok(n) => cols.push(Some(n)),
            Err(e) => problems.push(e),
        }
    }
    if !problems.is_empty() {
        return Err(format!("line {line}: {}", problems.join("; ")));
    }
    for required in [Column::Provider, Column::Operation] {
        if !cols.contains(&Some(Name::Known(required))) {
            return Err(format!(
                "line {line}: the header has no {} column (the columns are {})",
                required.name(),
                COLUMNS.join(", ")
            ));
        }
    }
    Ok(cols)
}

fn csv_row(header: &[Option<Name>], fields: &[&[u8]]) -> Result<RawRow, Vec<String>> {
    let mut raw = RawRow::default();
    let mut errs = Vec::new();
    let extra_values = fields
        .iter()
        .skip(header.len())
        .any(|f| !f.trim_ascii().is_empty());
    if fields.len() < header.len() || extra_values {
        errs.push(format!(
            "the row has {} fields but the header has {}",
            fields.len(),
            header.len()
        ));
        return Err(errs);
    }
    for (i, (field, col)) in fields.iter().zip(header).enumerate() {
        match col {
            Some(Name::Known(col)) => match std::str::from_utf8(field) {
                Ok(s) => raw.set_text(*col, s.to_string()),
                Err(_) => errs.push(format!("column {} is not valid UTF-8", col.name())),
            },
            Some(Name::ReportOnly) => {}
            Some(Name::Extra(name)) => match std::str::from_utf8(field) {
                Ok(s) if s.trim().is_empty() => {}
                Ok(s) => raw.metadata.push((name.clone(), s.to_string())),
                Err(_) => errs.push(format!("column {name} is not valid UTF-8")),
            },
            None if field.trim_ascii().is_empty() => {}
            None => errs.push(format!(
                "field {} has a value but its column has no name in the header",
                i + 1
            )),
        }
    }
    if errs.is_empty() {
        Ok(raw)
    } else {
        Err(errs)
    }
}

fn read_csv<R: BufRead>(reader: R, ctx: &mut Ctx<'_>) -> Result<(), ManifestError> {
    let mut split = CsvSplitter {
        r: reader,
        pos: LineCounter::new(),
    };
    let mut buf = Vec::new();
    let mut ends = Vec::new();
    let header = loop {
        let next = split
            .next_record(&mut buf, &mut ends, MAX_ROW_BYTES)
            .map_err(|e| ctx.io_error(e))?;
        let Some(rec) = next else {
            return Err(ctx.format_error(
                "no header row (a CSV manifest starts with a row of column names)".to_string(),
            ));
        };
        if rec.oversize {
            return Err(ctx.format_error(format!(
                "line {}: the header row is larger than {MAX_ROW_BYTES} bytes",
                rec.line
            )));
        }
        if rec.unterminated {
            return Err(ctx.format_error(format!(
                "line {}: a quoted field in the header is never closed",
                rec.line
            )));
        }
        let fields = csv_fields(&buf, &ends);
        if all_fields_empty(&fields) {
            continue;
        }
        break parse_csv_header(&fields, rec.line).map_err(|e| ctx.format_error(e))?;
    };
    while let Some(rec) = split
        .next_record(&mut buf, &mut ends, MAX_ROW_BYTES)
        .map_err(|e| ctx.io_error(e))?
    {
        if rec.oversize {
            ctx.row(
                rec.line,
                Err(vec![format!(
                    "the row is larger than {MAX_ROW_BYTES} bytes"
                )]),
            );
            continue;
        }
        if rec.unterminated {
            ctx.row(
                rec.line,
                Err(vec![
                    "a quoted field starting in this row is never closed".to_string()
                ]),
            );
            continue;
        }
        let fields = csv_fields(&buf, &ends);
        if all_fields_empty(&fields) {
            continue;
        }
        let row = csv_row(&header, &fields);
        ctx.row(rec.line, row);
    }
    Ok(())
}

// ---------------------------------------------------------------------------------
// JSON
// ---------------------------------------------------------------------------------

/// One JSON row as parsed: an object's entries in order (so duplicate keys are seen),
/// or what it was instead.
enum JsonElement {
    Object(Vec<(String, Value)>),
    Other(&'static str),
}

impl<'de> Deserialize<'de> for JsonElement {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = JsonElement;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<JsonElement, A::Error> {
                let mut entries = Vec::new();
                while let Some((k, v)) = map.next_entry::<String, Value>()? {
                    entries.push((k, v));
                }
                Ok(JsonElement::Object(entries))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<JsonElement, A::Error> {
                while seq.next_element::<IgnoredAny>()?.is_some() {}
                Ok(JsonElement::Other("an array"))
            }
            fn visit_unit<E: de::Error>(self) -> Result<JsonElement, E> {
                Ok(JsonElement::Other("null"))
            }
            fn visit_bool<E: de::Error>(self, _: bool) -> Result<JsonElement, E> {
                Ok(JsonElement::Other("true/false"))
            }
            fn visit_i64<E: de::Error>(self, _: i64) -> Result<JsonElement, E> {
                Ok(JsonElement::Other("a number"))
            }
            fn visit_u64<E: de::Error>(self, _: u64) -> Result<JsonElement, E> {
                Ok(JsonElement::Other("a number"))
            }
            fn visit_f64<E: de::Error>(self, _: f64) -> Result<JsonElement, E> {
                Ok(JsonElement::Other("a number"))
            }
            fn visit_str<E: de::Error>(self, _: &str) -> Result<JsonElement, E> {
                Ok(JsonElement::Other("a string"))
            }
        }
        d.deserialize_any(V)
    }
}

/// Stores one JSON value in its column, checking its type.
fn set_json_value(raw: &mut RawRow, col: Column, value: Value) -> Result<(), String> {
    match (col, value) {
        (_, Value::Null) => {}
        (Column::Input, Value::String(s)) => raw.input = RawInput::Joined(s),
        (Column::Input, Value::Array(items)) => {
            let mut list = Vec::with_capacity(items.len());
            for item in items {
                match item {
                    Value::String(s) => list.push(s),
                    other => {
                        return Err(format!(
                        "input must be a string or an array of strings, not an array holding {}",
                        json_kind(&other)
                    ))
                    }
                }
            }
            raw.input = RawInput::List(list);
        }
        (Column::Input, other) => {
            return Err(format!(
                "input must be a string or an array of strings, not {}",
                json_kind(&other)
            ))
        }
        (Column::Params, Value::Object(m)) => raw.params = RawParams::Object(m),
        (Column::Params, Value::String(s)) => raw.params = RawParams::Text(s),
        (Column::Params, other) => {
            return Err(format!(
                "params is not a JSON object: got {}",
                json_kind(&other)
            ))
        }
        (col, Value::String(s)) => raw.set_text(col, s),
        (col, other) => {
            return Err(format!(
                "{} must be a string, not {}",
                col.name(),
                json_kind(&other)
            ))
        }
    }
    Ok(())
}

/// Keeps a JSON row's own key as metadata: text as is, numbers and true/false as
/// written, nested values as JSON text; null is no value.
fn add_json_metadata(raw: &mut RawRow, key: String, value: Value, errs: &mut Vec<String>) {
    if raw
        .metadata
        .iter()
        .any(|(k, _)| k.to_lowercase() == key.to_lowercase())
    {
        errs.push(format!("key {key} is given twice"));
        return;
    }
    let text = match value {
        Value::Null => return,
        Value::String(s) => s,
        other => other.to_string(),
    };
    if !text.trim().is_empty() {
        raw.metadata.push((key, text));
    }
}

/// Parses one JSON row. `line`/`col` are where its first byte is, so parse errors can
/// name the real position.
fn json_row(bytes: &[u8], line: u64, col: u64) -> Result<RawRow, Vec<String>> {
    let entries = match serde_json::from_slice::<JsonElement>(bytes) {
        Ok(JsonElement::Object(entries)) => entries,
        Ok(JsonElement::Other(kind)) => {
            return Err(vec![format!("the row is not a JSON object (found {kind})")]);
        }
        Err(e) => {
            let full = e.to_string();
            let msg = match full.rfind(" at line ") {
                Some(i) => &full[..i],
                None => &full,
            };
            let (at_line, at_col) = if e.line() <= 1 {
                (line, col + e.column() as u64 - 1)
            } else {
                (line + e.line() as u64 - 1, e.column() as u64)
            };
            return Err(vec![format!(
                "invalid JSON at line {at_line} column {at_col}: {msg}"
            )]);
        }
    };
    let mut raw = RawRow::default();
    let mut errs = Vec::new();
    let mut unknown = Vec::new();
    let mut seen: Vec<Column> = Vec::new();
    for (key, value) in entries {
        let col = match classify("key", &key) {
            Ok(Name::Known(c)) => c,
            Ok(Name::ReportOnly) => continue,
            // A JSON Lines report's `metadata` object: the extra columns again.
            Ok(Name::Extra(k)) if k == "metadata" && value.is_object() => {
                if let Value::Object(m) = value {
                    for (k, v) in m {
                        add_json_metadata(&mut raw, k, v, &mut errs);
                    }
                }
                continue;
            }
            Ok(Name::Extra(k)) => {
                add_json_metadata(&mut raw, k, value, &mut errs);
                continue;
            }
            Err(e) => {
                unknown.push(e);
                continue;
            }
        };
        if seen.contains(&col) {
            errs.push(format!("key {} is given twice", col.name()));
            continue;
        }
        seen.push(col);
        if let Err(e) = set_json_value(&mut raw, col, value) {
            errs.push(e);
        }
    }
    if !unknown.is_empty() {
        errs.splice(0..0, unknown);
    }
    if errs.is_empty() {
        Ok(raw)
    } else {
        Err(errs)
    }
}

/// Reads one line (without `\n`) into `buf`, keeping at most `cap` bytes. None at the
/// end of the input; otherwise whether the line was longer than `cap`.
fn read_line_capped<R: BufRead>(
    r: &mut R,
    buf: &mut Vec<u8>,
    cap: usize,
) -> io::Result<Option<bool>> {
    buf.clear();
    let mut any = false;
    let mut oversize = false;
    loop {
        let chunk = match r.fill_buf() {
            Ok(c) => c,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        if chunk.is_empty() {
            return Ok(any.then_some(oversize));
        }
        any = true;
        let (take, done) = match chunk.iter().position(|&b| b == b'\n') {
            Some(i) => (i, true),
            None => (chunk.len(), false),
        };
        let room = cap.saturating_sub(buf.len());
        if take > room {
            oversize = true;
        }
        buf.extend_from_slice(&chunk[..take.min(room)]);
        r.consume(if done { take + 1 } else { take });
        if done {
            return Ok(Some(oversize));
        }
    }
}

fn read_json_lines<R: BufRead>(mut reader: R, ctx: &mut Ctx<'_>) -> Result<(), ManifestError> {
    let mut buf = Vec::new();
    let mut line = 0u64;
    while let Some(oversize) =
        read_line_capped(&mut reader, &mut buf, MAX_ROW_BYTES).map_err(|e| ctx.io_error(e))?
    {
        line += 1;
        if oversize {
            ctx.row(
                line,
                Err(vec![format!(
                    "the row is larger than {MAX_ROW_BYTES} bytes"
                )]),
            );
            continue;
        }
        let leading = buf.len() - buf.trim_ascii_start().len();
        let text = buf.trim_ascii();
        if text.is_empty() {
            continue;
        }
        let row = json_row(text, line, leading as u64 + 1);
        ctx.row(line, row);
    }
    Ok(())
}

struct JsonElementSpan {
    line: u64,
    col: u64,
    oversize: bool,
    /// The byte that ended it (`,` or the array's `]`), None at the end of the input.
    end: Option<u8>,
}

/// Finds the top-level elements of a JSON array in a stream, tracking strings,
/// escapes and nesting, and counting lines.
struct JsonArrayScanner<R> {
    r: R,
    pos: LineCounter,
}

impl<R: BufRead> JsonArrayScanner<R> {
    /// Skips whitespace; the next byte, not consumed.
    fn peek_non_ws(&mut self) -> io::Result<Option<u8>> {
        loop {
            let chunk = match self.r.fill_buf() {
                Ok(c) => c,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            };
            if chunk.is_empty() {
                return Ok(None);
            }
            let mut used = 0;
            let mut found = None;
            for &b in chunk {
                if b.is_ascii_whitespace() {
                    self.pos.feed(b);
                    used += 1;
                } else {
                    found = Some(b);
                    break;
                }
            }
            self.r.consume(used);
            if found.is_some() {
                return Ok(found);
            }
        }
    }

    /// Consumes one byte already seen by `peek_non_ws`.
    fn bump(&mut self, b: u8) {
        self.pos.feed(b);
        self.r.consume(1);
    }

    /// The next element's bytes (capped) into `buf`, up to and consuming the `,` or
    /// `]` after it.
    fn read_element(&mut self, buf: &mut Vec<u8>, cap: usize) -> io::Result<JsonElementSpan> {
        buf.clear();
        self.peek_non_ws()?;
        let (line, col) = (self.pos.line, self.pos.col);
        let mut depth: u64 = 0;
        let mut in_string = false;
        let mut escaped = false;
        let mut oversize = false;
        loop {
            let chunk = match self.r.fill_buf() {
                Ok(c) => c,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            };
            if chunk.is_empty() {
                return Ok(JsonElementSpan {
                    line,
                    col,
                    oversize,
                    end: None,
                });
            }
            let mut used = 0;
            let mut end = None;
            for &b in chunk {
                used += 1;
                if in_string {
                    if escaped {
                        escaped = false;
                    } else if b == b'\\' {
                        escaped = true;
                    } else if b == b'"' {
                        in_string = false;
                    }
                } else {
                    match b {
                        b'"' => in_string = true,
                        b'{' | b'[' => depth += 1,
                        b'}' | b']' if depth > 0 => depth -= 1,
                        b',' | b']' if depth == 0 => {
                            self.pos.feed(b);
                            end = Some(b);
                            break;
                        }
                        _ => {}
                    }
                }
                self.pos.feed(b);
                if buf.len() < cap {
                    buf.push(b);
                } else {
                    oversize = true;
                }
            }
            self.r.consume(used);
            if end.is_some() {
                return Ok(JsonElementSpan {
                    line,
                    col,
                    oversize,
                    end,
                });
            }
        }
    }
}

fn read_json_array<R: BufRead>(reader: R, ctx: &mut Ctx<'_>) -> Result<(), ManifestError> {
    let mut sc = JsonArrayScanner {
        r: reader,
        pos: LineCounter::new(),
    };
    match sc.peek_non_ws().map_err(|e| ctx.io_error(e))? {
        Some(b'[') => sc.bump(b'['),
        Some(_) => {
            return Err(ctx.format_error(format!(
                "line {}: expected a JSON array of objects ([{{…}}, …])",
                sc.pos.line
            )))
        }
        None => {
            return Err(ctx
                .format_error("the file is empty (expected a JSON array of objects)".to_string()))
        }
    }
    let mut buf = Vec::new();
    let mut elements = 0u64;
    loop {
        let span = sc
            .read_element(&mut buf, MAX_ROW_BYTES)
            .map_err(|e| ctx.io_error(e))?;
        let empty = !span.oversize && buf.trim_ascii().is_empty();
        match span.end {
            None if empty => {
                return Err(ctx.format_error(format!(
                    "line {}: the JSON array is not closed (the file ends early)",
                    span.line
                )))
            }
            None => {
                return Err(ctx.format_error(format!(
                    "line {}: the file ends inside this element (the JSON array is not closed)",
                    span.line
                )))
            }
            Some(b']') if empty && elements == 0 => break,
            // `[{…},]`: JSON allows no comma before the closing bracket.
            Some(b']') if empty => {
                return Err(ctx.format_error(format!(
                    "line {}: trailing comma before the closing ']' of the JSON array (remove it)",
                    span.line
                )))
            }
            Some(b',') if empty => {
                return Err(ctx.format_error(format!(
                    "line {}: two commas in a row in the JSON array (an element is missing)",
                    span.line
                )))
            }
            Some(_) if empty => {
                return Err(
                    ctx.format_error(format!("line {}: expected a JSON object here", span.line))
                )
            }
            Some(end) => {
                elements += 1;
                let row = if span.oversize {
                    Err(vec![format!(
                        "the row is larger than {MAX_ROW_BYTES} bytes"
                    )])
                } else {
                    json_row(buf.trim_ascii(), span.line, span.col)
                };
                ctx.row(span.line, row);
                if end == b']' {
                    break;
                }
            }
        }
    }
    if sc.peek_non_ws().map_err(|e| ctx.io_error(e))?.is_some() {
        return Err(ctx.format_error(format!(
            "line {}: unexpected data after the end of the JSON array",
            sc.pos.line
        )));
    }
    Ok(())
}

// ---------------------------------------------------------------------------------
// Duplicates
// ---------------------------------------------------------------------------------

/// The first row seen with an id, in 32 bytes: no strings kept.
#[derive(Debug, Clone, Copy)]
struct FirstSeen {
    content: u128,
    line: u64,
    file: u32,
}

/// Tells new ids from repeats and conflicts across every row of every manifest given
/// to one command. Keeps about 50 bytes per distinct id (a 128-bit hash of the id, the
/// first 128 bits of its content hash and where it was first seen), so a million rows
/// cost tens of megabytes, not their strings.
#[derive(Debug, Default)]
pub struct DuplicateTracker {
    files: Vec<String>,
    file_index: HashMap<String, u32>,
    seen: HashMap<u128, FirstSeen>,
}

fn hash128(bytes: &[u8]) -> u128 {
    let digest = Sha256::digest(bytes);
    let mut first = [0u8; 16];
    first.copy_from_slice(&digest[..16]);
    u128::from_be_bytes(first)
}

impl DuplicateTracker {
    pub fn new() -> Self {
        Self::default()
    }

    /// How many distinct ids have been seen.
    pub fn len(&self) -> usize {
        self.seen.len()
    }

    pub fn is_empty(&self) -> bool {
        self.seen.is_empty()
    }

    fn file_index(&mut self, file: &str) -> u32 {
        if let Some(&i) = self.file_index.get(file) {
            return i;
        }
        let i = u32::try_from(self.files.len()).unwrap_or(u32::MAX);
        self.files.push(file.to_string());
        self.file_index.insert(file.to_string(), i);
        i
    }

    /// Checks a good row's id: new, the same row again, or an id reused for other
    /// content (an error naming both lines).
    pub fn check(&mut self, origin: &Origin, spec: &JobSpec) -> Result<RowStatus, RowError> {
        let key = hash128(spec.id.as_bytes());
        let hash = spec.content_hash();
        let mut first = [0u8; 16];
        first.copy_from_slice(&hash[..16]);
        let content = u128::from_be_bytes(first);
        if let Some(prev) = self.seen.get(&key) {
            if prev.content == content {
                return Ok(RowStatus::Repeat);
            }
            let file = self
                .files
                .get(prev.file as usize)
                .map(String::as_str)
                .unwrap_or("?");
            return Err(RowError {
                origin: origin.clone(),
                reason: format!(
                    "id {:?} is already used by {file}:{} with different content",
                    spec.id, prev.line
                ),
            });
        }
        let file = self.file_index(&origin.file);
        self.seen.insert(
            key,
            FirstSeen {
                content,
                line: origin.line,
                file,
            },
        );
        Ok(RowStatus::New)
    }
}

// ---------------------------------------------------------------------------------
// Output collisions
// ---------------------------------------------------------------------------------

/// Who first claimed an output stem: a row (file index, line) or a job already in the
/// database (`file == FROM_DATABASE`, found by its id hash afterwards).
#[derive(Debug, Clone, Copy)]
struct Claim {
    owner: u128,
    line: u64,
    file: u32,
    /// A new version's name (`--update`), not the row's own.
    version: bool,
}

const FROM_DATABASE: u32 = u32::MAX;

/// Where an output collides.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Collision {
    /// With an earlier row: its `FILE:LINE`.
    Row(String),
    /// With a job in the database, known here only by the hash of its id
    /// ([`OutputTracker::owner_key`]); the caller names it.
    Database(u128),
}

/// A row whose output may land on a file another job writes.
#[derive(Debug, Clone)]
pub struct OutputConflict {
    pub with: Collision,
    /// The resolved path (folder/stem, without extension) both would write.
    pub path: String,
    /// The collision is through numbered outputs (`x` writing `x_1.png`).
    pub numbered: bool,
    /// The two differ only in letter case.
    pub case_only: bool,
    /// Either side is a new version's name.
    pub version: bool,
    /// The earlier claim is a new version's name (`--update`).
    pub theirs_version: bool,
    /// This row's path is the name of its new version.
    pub mine_version: bool,
}

impl OutputConflict {
    /// The reason for a row error, once the other side has a name (`FILE:LINE`, or
    /// `job "ID" in the database (from FILE:LINE)`).
    pub fn reason(&self, other: &str) -> String {
        let mut s = format!(
            "output {}{} resolves to the same file as {other}",
            self.path,
            if self.mine_version {
                " (the name of the row's new version)"
            } else {
                ""
            }
        );
        if self.numbered {
            s.push_str(
                " (numbered outputs: a job returning several images writes NAME_0, NAME_1 …)",
            );
        }
        if self.case_only {
            s.push_str(" (the names differ only in letter case: one file on macOS and Windows)");
        }
        s.push_str(
            "; give one of them another `output`, or one paid result would replace the other",
        );
        s
    }
}

/// Finds rows (across every manifest of one command, and against the jobs already in
/// the database) whose results would be written to the same file. Outputs are
/// compared as [`crate::download::output_stem`] resolves them — folder and stem,
/// before the extension the provider's answer brings, so `a` and `a/` and `./a`
/// cases all meet — with letter case folded (a folder on macOS or shared with
/// Windows is case-insensitive). A stem ending in `_<number>` also meets the stem
/// without it: a job returning several images writes `x_0.png`, `x_1.png` ….
///
/// Like [`DuplicateTracker`], keeps fixed-size entries only (hashes and lines).
#[derive(Debug, Default)]
pub struct OutputTracker {
    files: Vec<String>,
    file_index: HashMap<String, u32>,
    exact: HashMap<u128, Claim>,
    /// The stem without its `_<number>`, for stems that have one.
    numbered: HashMap<u128, Claim>,
    /// Folded key → hash of the stem as written, to tell case-only differences.
    spelled: HashMap<u128, u128>,
}

impl OutputTracker {
    pub fn new() -> Self {
        Self::default()
    }

    /// The key a job's id is known by in [`Collision::Database`].
    pub fn owner_key(id: &str) -> u128 {
        hash128(id.as_bytes())
    }

    fn file_index(&mut self, file: &str) -> u32 {
        if let Some(&i) = self.file_index.get(file) {
            return i;
        }
        let i = u32::try_from(self.files.len()).unwrap_or(u32::MAX - 1);
        self.files.push(file.to_string());
        self.file_index.insert(file.to_string(), i);
        i
    }

    /// A job already in the database (or an earlier version of one) owns its
    /// outputs' names. Collisions among those are not this check's to report.
    pub fn add_existing(&mut self, spec: &JobSpec) {
        let claim = Claim {
            owner: Self::owner_key(&spec.id),
            line: 0,
            file: FROM_DATABASE,
            version: false,
        };
        let (path, _) = stem_path(spec);
        let (exact, base) = stem_keys(&path);
        self.exact.entry(exact).or_insert(claim);
        if let Some(base) = base {
            self.numbered.entry(base).or_insert(claim);
        }
    }

    /// Claims the output names of a good, new row (`version`: the names a new
    /// version of the job would get). Err: the first claim it collides with.
    pub fn check(
        &mut self,
        origin: &Origin,
        spec: &JobSpec,
        version: bool,
    ) -> Result<(), OutputConflict> {
        let owner = Self::owner_key(&spec.id);
        let (path, spelled) = stem_path(spec);
        let (exact, base) = stem_keys(&path);
        let other = |c: &Claim| c.owner != owner;
        let found = match self.exact.get(&exact).filter(|c| other(c)) {
            Some(c) => Some((*c, false)),
            None => base
                .and_then(|b| self.exact.get(&b))
                .or_else(|| self.numbered.get(&exact))
                .filter(|c| other(c))
                .map(|c| (*c, true)),
        };
        if let Some((c, numbered)) = found {
            let with = if c.file == FROM_DATABASE {
                Collision::Database(c.owner)
            } else {
                let file = self
                    .files
                    .get(c.file as usize)
                    .map(String::as_str)
                    .unwrap_or("?");
                Collision::Row(format!("{file}:{}", c.line))
            };
            let case_only = !numbered
                && self
                    .spelled
                    .get(&exact)
                    .is_some_and(|s| *s != hash128(spelled.as_bytes()));
            return Err(OutputConflict {
                with,
                path: spelled,
                numbered,
                case_only,
                version: version || c.version,
                theirs_version: c.version,
                mine_version: version,
            });
        }
        let claim = Claim {
            owner,
            line: origin.line,
            file: self.file_index(&origin.file),
            version,
        };
        self.exact.entry(exact).or_insert(claim);
        self.spelled
            .entry(exact)
            .or_insert_with(|| hash128(spelled.as_bytes()));
        if let Some(base) = base {
            self.numbered.entry(base).or_insert(claim);
        }
        Ok(())
    }
}

/// A spec's output folder/stem, as a `/`-joined folded key and as written.
fn stem_path(spec: &JobSpec) -> (String, String) {
    let (dir, stem) = crate::download::output_stem(spec);
    let mut parts: Vec<String> = dir
        .components()
        .map(|c| c.as_os_str().to_string_lossy().into_owned())
        .collect();
    parts.push(stem);
    let spelled = parts.join("/");
    (spelled.to_lowercase(), spelled)
}

/// The hash of a folded stem path, and of the same without a `_<number>` ending.
fn stem_keys(path: &str) -> (u128, Option<u128>) {
    let base = path.rsplit_once('_').and_then(|(head, digits)| {
        (!digits.is_empty() && digits.bytes().all(|b| b.is_ascii_digit()))
            .then(|| hash128(head.as_bytes()))
    });
    (hash128(path.as_bytes()), base)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    type Row = Result<(Origin, JobSpec), RowError>;

    fn no_provider_checks(_: &JobSpec) -> Vec<String> {
        Vec::new()
    }

    /// Reads with the generic checks only (the provider modules are tested on their own).
    fn run(path: &Path) -> (Result<u64, ManifestError>, Vec<Row>) {
        let mut rows = Vec::new();
        let res = read_with(path, &no_provider_checks, &mut |r| rows.push(r));
        (res, rows)
    }

    fn oks(rows: &[Row]) -> Vec<(u64, JobSpec)> {
        rows.iter()
            .filter_map(|r| r.as_ref().ok())
            .map(|(o, s)| (o.line, s.clone()))
            .collect()
    }

    fn errs(rows: &[Row]) -> Vec<(u64, String)> {
        rows.iter()
            .filter_map(|r| r.as_ref().err())
            .map(|e| (e.origin.line, e.reason.clone()))
            .collect()
    }

    fn write(dir: &Path, name: &str, content: impl AsRef<[u8]>) -> PathBuf {
        let p = dir.join(name);
        if let Some(parent) = p.parent() {
            std::fs::create_dir_all(parent).unwrap();
        }
        std::fs::write(&p, content).unwrap();
        p
    }

    fn png(dir: &Path, name: &str) -> PathBuf {
        let p = dir.join(name);
        if let Some(parent) = p.parent() {
            std::fs::create_dir_all(parent).unwrap();
        }
        image::RgbImage::new(8, 8).save(&p).unwrap();
        p
    }

    fn abs(p: &Path) -> String {
        std::path::absolute(p)
            .unwrap()
            .to_str()
            .unwrap()
            .to_string()
    }

    /// One bad row of each format, to check a message the same way in all three.
    fn one_row_each_format(dir: &Path, fields: &[(&str, &str)]) -> Vec<(PathBuf, Vec<Row>)> {
        let header: Vec<&str> = fields.iter().map(|(k, _)| *k).collect();
        let values: Vec<String> = fields
            .iter()
            .map(|(_, v)| format!("\"{}\"", v.replace('"', "\"\"")))
            .collect();
        let csv = format!("{}\n{}\n", header.join(","), values.join(","));
        let obj: Map<String, Value> = fields
            .iter()
            .map(|(k, v)| (k.to_string(), Value::String(v.to_string())))
            .collect();
        let obj = Value::Object(obj).to_string();
        let mut out = Vec::new();
        for (name, content) in [
            ("m.csv", csv),
            ("m.json", format!("[\n{obj}\n]\n")),
            ("m.jsonl", format!("\n{obj}\n")),
        ] {
            let p = write(dir, name, content);
            let (res, rows) = run(&p);
            assert_eq!(res.unwrap(), 1, "{name}");
            out.push((p, rows));
        }
        out
    }

    fn assert_error_each_format(dir: &Path, fields: &[(&str, &str)], needle: &str) {
        for (p, rows) in one_row_each_format(dir, fields) {
            let e = errs(&rows);
            assert!(
                e.iter()
                    .any(|(line, msg)| *line == 2 && msg.contains(needle)),
                "{}: wanted {needle:?} on line 2, got {e:?}",
                p.display()
            );
            assert!(oks(&rows).is_empty());
        }
    }

    // --- CSV ------------------------------------------------------------------

    #[test]
    fn csv_happy_path_with_line_numbers() {
        let d = tempfile::tempdir().unwrap();
        let a = png(d.path(), "a.png");
        png(d.path(), "b.png");
        let p = write(
            d.path(),
            "jobs.csv",
            "id,provider,operation,input,prompt,params,output\n\
             \n\
             one,topaz,enhance,a.png,,\"{\"\"model\"\": \"\"Standard V2\"\"}\",out/\n\
             two,topaz,enhance,a.png | b.png,\"a prompt\nover two lines\",,\n\
             ,,,,,,\n\
             three,Topaz,enhance,a.png,,,x\n",
        );
        let (res, rows) = run(&p);
        assert_eq!(res.unwrap(), 3);
        assert_eq!(errs(&rows), vec![]);
        let ok = oks(&rows);
        assert_eq!(
            ok.iter().map(|(l, _)| *l).collect::<Vec<_>>(),
            vec![3, 4, 7]
        );
        let (_, one) = &ok[0];
        assert_eq!(one.id, "one");
        assert_eq!(one.provider, ProviderKind::Topaz);
        assert_eq!(one.operation, "enhance");
        assert_eq!(one.inputs, vec![abs(&a)]);
        assert_eq!(one.prompt, None);
        assert_eq!(one.params_json, r#"{"model":"Standard V2"}"#);
        assert_eq!(one.output.as_deref(), Some("out/"));
        let (_, two) = &ok[1];
        assert_eq!(two.inputs.len(), 2);
        assert!(two.inputs[1].ends_with("b.png"));
        assert_eq!(two.prompt.as_deref(), Some("a prompt\nover two lines"));
        assert_eq!(two.params_json, "{}");
        assert_eq!(two.output, None);
        assert_eq!(ok[2].1.provider, ProviderKind::Topaz);
        // The origin names the file as given.
        let first = rows[0].as_ref().unwrap();
        assert_eq!(first.0.file, p.display().to_string());
    }

    #[test]
    fn csv_crlf_bom_and_header_names_trimmed_case_insensitive() {
        let d = tempfile::tempdir().unwrap();
        png(d.path(), "a.png");
        let mut content = BOM.to_vec();
        content.extend_from_slice(
            b" ID , Provider ,OPERATION,Input\r\n\r\nx,topaz,enhance,a.png\r\ny,topaz,enhance,\"a.png\"\r\n",
        );
        let p = write(d.path(), "m.csv", content);
        let (res, rows) = run(&p);
        assert_eq!(res.unwrap(), 2);
        let ok = oks(&rows);
        assert_eq!(
            ok.iter()
                .map(|(l, s)| (*l, s.id.as_str()))
                .collect::<Vec<_>>(),
            vec![(3, "x"), (4, "y")]
        );
    }

    #[test]
    fn csv_unknown_and_duplicate_columns_are_file_errors() {
        let d = tempfile::tempdir().unwrap();
        let p = write(
            d.path(),
            "m.csv",
            "\nid,provider,operation,inptu,colour,Promt\n",
        );
        let e = run(&p).0.unwrap_err().to_string();
        assert!(e.contains("line 2"), "{e}");
        // Near-typos of known columns are refused with the suggestion; a name of the
        // user's own (colour) is not an error.
        assert!(e.contains("\"inptu\": did you mean input?"), "{e}");
        assert!(e.contains("\"Promt\": did you mean prompt?"), "{e}");
        assert!(!e.contains("colour"), "{e}");
        assert!(e.starts_with(&p.display().to_string()), "{e}");
        let p = write(d.path(), "m2.csv", "id,provider,operation,ID\n");
        let e = run(&p).0.unwrap_err().to_string();
        assert!(e.contains("column id appears twice"), "{e}");
        let p = write(d.path(), "m3.csv", "id,operation,input\n");
        let e = run(&p).0.unwrap_err().to_string();
        assert!(e.contains("no provider column"), "{e}");
        // A data row given without a header.
        let p = write(d.path(), "m4.csv", "topaz,enhance,a.png\n");
        assert!(matches!(run(&p).0, Err(ManifestError::Format { .. })));
    }

    #[test]
    fn csv_empty_header_only_and_unnamed_columns() {
        let d = tempfile::tempdir().unwrap();
        let p = write(d.path(), "empty.csv", "");
        assert!(matches!(run(&p).0, Err(ManifestError::Format { .. })));
        let p = write(d.path(), "blank.csv", "\n\r\n  \n");
        assert!(matches!(run(&p).0, Err(ManifestError::Format { .. })));
        let p = write(d.path(), "header.csv", "provider,operation\n");
        assert_eq!(run(&p).0.unwrap(), 0);
        // A trailing unnamed column (spreadsheet export) is fine while it is empty.
        let p = write(
            d.path(),
            "unnamed.csv",
            "provider,operation,\ntopaz,enhance,\ntopaz,enhance-gen,oops\n",
        );
        let (res, rows) = run(&p);
        assert_eq!(res.unwrap(), 2);
        assert_eq!(oks(&rows).len(), 1);
        assert_eq!(errs(&rows)[0].0, 3);
        assert!(errs(&rows)[0].1.contains("no name"));
    }

    #[test]
    fn csv_field_count_must_match_the_header() {
        let d = tempfile::tempdir().unwrap();
        let p = write(
            d.path(),
            "m.csv",
            "provider,operation,prompt\ntopaz,enhance\ntopaz,enhance,p,extra\ntopaz,enhance,p,,\n",
        );
        let (res, rows) = run(&p);
        assert_eq!(res.unwrap(), 3);
        let e = errs(&rows);
        assert_eq!(e.len(), 2, "{e:?}");
        assert_eq!(e[0].0, 2);
        assert!(e[0].1.contains("2 fields but the header has 3"), "{e:?}");
        assert_eq!(e[1].0, 3);
        assert_eq!(oks(&rows).len(), 1, "trailing empty fields are tolerated");
    }

    #[test]
    fn csv_quotes_follow_the_csv_crate() {
        let d = tempfile::tempdir().unwrap();
        // A quote inside an unquoted field is literal; `""` inside quotes is a quote;
        // a quoted field may hold commas and CR LF.
        let p = write(
            d.path(),
            "m.csv",
            "provider,operation,prompt\r\ntopaz,enhance,say \"hi\"\r\ntopaz,enhance,\"a, \"\"b\"\"\r\nc\"\r\ntopaz,enhance,end\r\n",
        );
        let (res, rows) = run(&p);
        assert_eq!(res.unwrap(), 3);
        let ok = oks(&rows);
        let got: Vec<(u64, Option<&str>)> =
            ok.iter().map(|(l, s)| (*l, s.prompt.as_deref())).collect();
        assert_eq!(
            got,
            vec![
                (2, Some("say \"hi\"")),
                (3, Some("a, \"b\"\r\nc")),
                (5, Some("end"))
            ]
        );
    }

    #[test]
    fn csv_unterminated_quote_is_a_row_error() {
        let d = tempfile::tempdir().unwrap();
        let p = write(
            d.path(),
            "m.csv",
            "provider,operation,prompt\ntopaz,enhance,ok\ntopaz,enhance,\"never closed\nmore\n",
        );
        let (res, rows) = run(&p);
        assert_eq!(res.unwrap(), 2);
        assert_eq!(oks(&rows).len(), 1);
        let e = errs(&rows);
        assert_eq!(e.len(), 1);
        assert_eq!(e[0].0, 3);
        assert!(e[0].1.contains("never closed"));
    }

    #[test]
    fn csv_invalid_utf8_is_a_row_error() {
        let d = tempfile::tempdir().unwrap();
        let p = write(
            d.path(),
            "m.csv",
            b"provider,operation,prompt\ntopaz,enhance,\xff\xfe\n".as_slice(),
        );
        let (res, rows) = run(&p);
        assert_eq!(res.unwrap(), 1);
        assert!(errs(&rows)[0].1.contains("prompt is not valid UTF-8"));
        let p = write(d.path(), "h.csv", b"provider,operation,\xff\n".as_slice());
        assert!(matches!(run(&p).0, Err(ManifestError::Format { .. })));
    }

    // --- JSON array --------------------------------------------------------------

    #[test]
    fn json_array_pretty_printed_with_line_numbers() {
        let d = tempfile::tempdir().unwrap();
        let a = png(d.path(), "a.png");
        let p = write(
            d.path(),
            "m.json",
            r#"[
  {
    "id": "one",
    "provider": "topaz",
    "operation": "enhance",
    "input": "a.png",
    "params": {"model": "Standard V2", "face_enhancement": true},
    "output": "x/"
  },

  {
    "provider": "topaz",
    "operation": "enhance",
    "input": ["a.png", "  a.png  "],
    "prompt": "with ] and } and , and \" inside",
    "params": "{\"b\": 2, \"a\": 1}"
  },
  {"id": "three", "provider": "topaz", "operation": "enhance", "prompt": null, "params": null}
]
"#,
        );
        let (res, rows) = run(&p);
        assert_eq!(res.unwrap(), 3);
        assert_eq!(errs(&rows), vec![]);
        let ok = oks(&rows);
        assert_eq!(
            ok.iter().map(|(l, _)| *l).collect::<Vec<_>>(),
            vec![2, 11, 18]
        );
        assert_eq!(ok[0].1.inputs, vec![abs(&a)]);
        assert_eq!(ok[0].1.output.as_deref(), Some("x/"));
        assert_eq!(ok[0].1.params()["model"], "Standard V2");
        assert_eq!(ok[1].1.inputs, vec![abs(&a), abs(&a)]);
        assert_eq!(
            ok[1].1.prompt.as_deref(),
            Some("with ] and } and , and \" inside")
        );
        assert_eq!(canonical_json(&ok[1].1.params_json), r#"{"a":1,"b":2}"#);
        assert!(ok[1].1.id.starts_with("r-"));
        assert_eq!(ok[2].1.prompt, None);
        assert_eq!(ok[2].1.params_json, "{}");
    }

    use crate::model::canonical_json;

    #[test]
    fn json_array_empty_and_bom() {
        let d = tempfile::tempdir().unwrap();
        let p = write(d.path(), "m.json", " [ \n ] \n");
        assert_eq!(run(&p).0.unwrap(), 0);
        let mut content = BOM.to_vec();
        content.extend_from_slice(b"[{\"provider\":\"topaz\",\"operation\":\"enhance\"}]");
        let p = write(d.path(), "bom.json", content);
        let (res, rows) = run(&p);
        assert_eq!(res.unwrap(), 1);
        assert_eq!(oks(&rows)[0].0, 1);
        let p = write(d.path(), "e.json", "  \n");
        assert!(matches!(run(&p).0, Err(ManifestError::Format { .. })));
        let p = write(d.path(), "s.json", "\"just a string\"");
        assert!(matches!(run(&p).0, Err(ManifestError::Format { .. })));
    }

    #[test]
    fn json_array_truncated_or_malformed_is_a_file_error() {
        let d = tempfile::tempdir().unwrap();
        let good = r#"{"provider":"topaz","operation":"enhance"}"#;
        for (name, content) in [
            ("open.json", "[".to_string()),
            ("mid.json", format!("[\n{good},\n{{\"provider\": \"to")),
            ("nocomma.json", format!("[{good},\n{good}")),
            ("string.json", "[{\"a\": \"unterminated".to_string()),
            ("trailing_comma.json", format!("[{good},]")),
            ("double_comma.json", format!("[{good},,{good}]")),
            ("after.json", format!("[{good}]\nextra")),
            ("two.json", format!("[{good}][{good}]")),
        ] {
            let p = write(d.path(), name, content);
            let (res, _) = run(&p);
            assert!(
                matches!(res, Err(ManifestError::Format { .. })),
                "{name}: {res:?}"
            );
        }
        let p = write(
            d.path(),
            "mid2.json",
            format!("[\n{good},\n{{\"provider\": \"to"),
        );
        let e = run(&p).0.unwrap_err().to_string();
        assert!(e.contains("line 3"), "{e}");
    }

    #[test]
    fn json_rows_check_types_keys_and_syntax() {
        let d = tempfile::tempdir().unwrap();
        let p = write(
            d.path(),
            "m.json",
            r#"[
{"provider": "topaz", "operation": "enhance", "id": 7},
{"provider": "topaz", "operation": "enhance", "prompt": true},
{"provider": "topaz", "operation": "enhance", "input": [1]},
{"provider": "topaz", "operation": "enhance", "input": {"a": 1}},
{"provider": "topaz", "operation": "enhance", "params": 5},
{"provider": "topaz", "operation": "enhance", "params": "[1, 2]"},
{"provider": "topaz", "operation": "enhance", "Provider": "topaz"},
{"provider": "topaz", "operation": "enhance", "colour": "red", "parms": {}},
"not an object",
{"provider": "topaz", "operation": "enhance", "prompt": "x" "y"},
{"provider": "topaz", "operation": "enhance"}
]"#,
        );
        let (res, rows) = run(&p);
        assert_eq!(res.unwrap(), 11);
        let e = errs(&rows);
        let expect = [
            (2, "id must be a string, not a number"),
            (3, "prompt must be a string, not true/false"),
            (4, "input must be a string or an array of strings"),
            (
                5,
                "input must be a string or an array of strings, not an object",
            ),
            (6, "params is not a JSON object: got a number"),
            (7, "params is not a JSON object: got an array"),
            (8, "key provider is given twice"),
            (9, "unknown key \"parms\": did you mean params?"),
            (10, "not a JSON object (found a string)"),
            (11, "invalid JSON at line 11 column 61"),
        ];
        assert_eq!(e.len(), expect.len(), "{e:?}");
        for ((line, msg), (want_line, want)) in e.iter().zip(expect) {
            assert_eq!(*line, want_line, "{msg}");
            assert!(msg.contains(want), "line {line}: {msg:?} lacks {want:?}");
        }
        assert_eq!(
            oks(&rows).iter().map(|(l, _)| *l).collect::<Vec<_>>(),
            vec![12]
        );
    }

    #[test]
    fn extra_columns_become_metadata_and_report_columns_are_read_past() {
        let d = tempfile::tempdir().unwrap();
        png(d.path(), "a.png");
        let p = write(
            d.path(),
            "m.csv",
            "id,provider,operation,input,SKU,notes,state,error,outputs,customer\n\
             a,topaz,enhance,a.png,A-1,\"big, blue\",failed,boom,a.jpg,\n\
             b,topaz,enhance,a.png,B-2,,done,,b.jpg,ACME\n",
        );
        let (res, rows) = run(&p);
        assert_eq!(res.unwrap(), 2);
        let ok = oks(&rows);
        assert_eq!(ok.len(), 2, "{:?}", errs(&rows));
        let meta = |i: usize| ok[i].1.metadata.clone();
        // Column order, names as written, empty values left out; the report's own
        // columns (state, error, outputs) are not metadata.
        assert_eq!(
            meta(0),
            vec![
                ("SKU".into(), "A-1".into()),
                ("notes".into(), "big, blue".into())
            ]
        );
        assert_eq!(
            meta(1),
            vec![
                ("SKU".into(), "B-2".into()),
                ("customer".into(), "ACME".into())
            ]
        );
        // Metadata is bookkeeping: it does not make a job different.
        let mut plain = ok[0].1.clone();
        plain.metadata.clear();
        assert_eq!(plain.content_hash(), ok[0].1.content_hash());

        let p = write(
            d.path(),
            "m.jsonl",
            "{\"provider\":\"topaz\",\"operation\":\"enhance\",\"sku\":7,\"tags\":[\"x\"],\"state\":\"done\",\"metadata\":{\"notes\":\"n\"},\"gone\":null}\n",
        );
        let (res, rows) = run(&p);
        assert_eq!(res.unwrap(), 1);
        let ok = oks(&rows);
        assert_eq!(ok.len(), 1, "{:?}", errs(&rows));
        assert_eq!(
            ok[0].1.metadata,
            vec![
                ("sku".into(), "7".into()),
                ("tags".into(), "[\"x\"]".into()),
                ("notes".into(), "n".into())
            ]
        );

        let p = write(d.path(), "m2.csv", "provider,operation,sku,SKU\n");
        let e = run(&p).0.unwrap_err().to_string();
        assert!(e.contains("column sku appears twice"), "{e}");
    }

    // --- JSON Lines ----------------------------------------------------------------

    #[test]
    fn jsonl_happy_path_blank_lines_and_bom() {
        let d = tempfile::tempdir().unwrap();
        let a = png(d.path(), "a.png");
        let mut content = BOM.to_vec();
        content.extend_from_slice(
            b"{\"id\":\"a\",\"provider\":\"topaz\",\"operation\":\"enhance\",\"input\":\"a.png\"}\r\n\
              \n   \n\
              {\"id\":\"b\",\"provider\":\"topaz\",\"operation\":\"enhance\",\"params\":{\"x\":[1,2]}}\n\
              \t{\"id\":\"c\",\"provider\":\"topaz\",\"operation\":\"enhance\",\"params\":\"{\\\"y\\\":1}\"}",
        );
        let p = write(d.path(), "m.jsonl", content);
        let (res, rows) = run(&p);
        assert_eq!(res.unwrap(), 3);
        assert_eq!(errs(&rows), vec![]);
        let ok = oks(&rows);
        let got: Vec<(u64, &str)> = ok.iter().map(|(l, s)| (*l, s.id.as_str())).collect();
        assert_eq!(got, vec![(1, "a"), (4, "b"), (5, "c")]);
        assert_eq!(ok[0].1.inputs, vec![abs(&a)]);
        assert_eq!(ok[1].1.params_json, r#"{"x":[1,2]}"#);
        assert_eq!(ok[2].1.params_json, r#"{"y":1}"#);
    }

    #[test]
    fn jsonl_bad_lines_are_row_errors_with_positions() {
        let d = tempfile::tempdir().unwrap();
        let p = write(
            d.path(),
            "m.ndjson",
            "{\"provider\":\"topaz\",\"operation\":\"enhance\"}\n  {\"provider\": topaz}\n[1]\n{\"provider\":\"topaz\",\"operation\":\"enhance\"} {}\n",
        );
        let (res, rows) = run(&p);
        assert_eq!(res.unwrap(), 4);
        let e = errs(&rows);
        assert_eq!(e.len(), 3, "{e:?}");
        assert_eq!(e[0].0, 2);
        assert!(
            e[0].1.starts_with("invalid JSON at line 2 column 17"),
            "{e:?}"
        );
        assert_eq!(e[1].0, 3);
        assert!(e[1].1.contains("found an array"));
        assert_eq!(e[2].0, 4);
        assert!(e[2].1.contains("trailing characters"), "{e:?}");
    }

    // --- format detection ------------------------------------------------------

    #[test]
    fn format_is_chosen_by_extension_then_sniffed() {
        let d = tempfile::tempdir().unwrap();
        let row = r#"{"provider":"topaz","operation":"enhance"}"#;
        let cases = [
            (
                "a.csv",
                "provider,operation\n".to_string(),
                ManifestFormat::Csv,
            ),
            ("a.CSV", "[".to_string(), ManifestFormat::Csv),
            ("a.json", format!("[{row}]"), ManifestFormat::JsonArray),
            ("a.json", format!("{row}\n"), ManifestFormat::JsonLines),
            ("a.jsonl", format!("{row}\n"), ManifestFormat::JsonLines),
            (
                "a.ndjson",
                format!("\n\n{row}\n"),
                ManifestFormat::JsonLines,
            ),
            ("a.jsonl", format!("[{row}]"), ManifestFormat::JsonArray),
            ("a.txt", format!("  \n[{row}]"), ManifestFormat::JsonArray),
            ("manifest", row.to_string(), ManifestFormat::JsonLines),
            (
                "manifest",
                "provider,operation\n".to_string(),
                ManifestFormat::Csv,
            ),
        ];
        for (name, content, want) in cases {
            let p = write(d.path(), name, &content);
            assert_eq!(detect_format(&p).unwrap(), want, "{name}: {content}");
        }
        let mut bom = BOM.to_vec();
        bom.extend_from_slice(format!("[{row}]").as_bytes());
        let p = write(d.path(), "bom", bom);
        assert_eq!(detect_format(&p).unwrap(), ManifestFormat::JsonArray);
    }

    #[test]
    fn unreadable_manifest_is_an_io_error() {
        let d = tempfile::tempdir().unwrap();
        let missing = d.path().join("nope.csv");
        let e = run(&missing).0.unwrap_err();
        assert!(matches!(e, ManifestError::Io { .. }));
        assert!(e.to_string().starts_with(&missing.display().to_string()));
        let (res, _) = run(d.path());
        assert!(matches!(res, Err(ManifestError::Io { .. })), "{res:?}");
    }

    // --- generic checks in all three formats -------------------------------------

    #[test]
    fn provider_and_operation_are_required_and_known() {
        let d = tempfile::tempdir().unwrap();
        assert_error_each_format(
            d.path(),
            &[("provider", ""), ("operation", "enhance")],
            "missing provider",
        );
        assert_error_each_format(
            d.path(),
            &[("provider", "topas"), ("operation", "enhance")],
            "unknown provider \"topas\"",
        );
        assert_error_each_format(
            d.path(),
            &[("provider", "topaz"), ("operation", "  ")],
            "missing operation",
        );
        // Keys left out of a JSON row entirely.
        let p = write(
            d.path(),
            "k.jsonl",
            "{\"operation\":\"enhance\"}\n{\"provider\":\"dzine\"}\n",
        );
        let (_, rows) = run(&p);
        assert_eq!(
            errs(&rows),
            vec![
                (1, "missing provider".to_string()),
                (2, "missing operation".to_string())
            ]
        );
    }

    #[test]
    fn ids_are_checked() {
        let d = tempfile::tempdir().unwrap();
        for bad in ["a b", "a/b", "..", "x~1", &"x".repeat(129)] {
            assert_error_each_format(
                d.path(),
                &[("id", bad), ("provider", "topaz"), ("operation", "enhance")],
                "invalid id",
            );
        }
        for (_, rows) in one_row_each_format(
            d.path(),
            &[
                ("id", " ok-1_a.B "),
                ("provider", "topaz"),
                ("operation", "enhance"),
            ],
        ) {
            assert_eq!(oks(&rows)[0].1.id, "ok-1_a.B");
        }
    }

    #[test]
    fn all_generic_problems_of_a_row_are_reported() {
        let d = tempfile::tempdir().unwrap();
        for (_, rows) in one_row_each_format(
            d.path(),
            &[
                ("id", "a b"),
                ("provider", "nope"),
                ("operation", ""),
                ("input", "x.png"),
                ("params", "[]"),
                ("output", "../o"),
            ],
        ) {
            let e = errs(&rows);
            assert_eq!(e.len(), 6, "{e:?}");
            assert!(e.iter().all(|(l, _)| *l == 2));
        }
    }

    #[test]
    fn missing_input_files_are_named_with_their_position() {
        let d = tempfile::tempdir().unwrap();
        png(d.path(), "a.png");
        std::fs::create_dir(d.path().join("folder")).unwrap();
        assert_error_each_format(
            d.path(),
            &[
                ("provider", "topaz"),
                ("operation", "enhance"),
                ("input", "a.png|b.png"),
            ],
            "input 2 (b.png): no such file",
        );
        assert_error_each_format(
            d.path(),
            &[
                ("provider", "topaz"),
                ("operation", "enhance"),
                ("input", "folder"),
            ],
            "input 1 (folder): is a folder",
        );
        assert_error_each_format(
            d.path(),
            &[
                ("provider", "topaz"),
                ("operation", "enhance"),
                ("input", "a.png||a.png"),
            ],
            "input 2 is empty",
        );
    }

    #[test]
    fn relative_inputs_resolve_against_the_manifest_folder() {
        let d = tempfile::tempdir().unwrap();
        let img = png(d.path(), "sub/pics/a.png");
        let other = png(d.path(), "b.png");
        let p = write(
            d.path(),
            "sub/m.csv",
            format!(
                "provider,operation,input\ntopaz,enhance,pics/a.png\ntopaz,enhance,../b.png\ntopaz,enhance,{}\n",
                other.display()
            ),
        );
        let (res, rows) = run(&p);
        assert_eq!(res.unwrap(), 3);
        assert_eq!(errs(&rows), vec![]);
        let ok = oks(&rows);
        assert_eq!(ok[0].1.inputs, vec![abs(&img)]);
        assert!(Path::new(&ok[1].1.inputs[0]).is_absolute());
        assert_eq!(
            std::fs::canonicalize(&ok[1].1.inputs[0]).unwrap(),
            std::fs::canonicalize(&other).unwrap()
        );
        assert_eq!(ok[2].1.inputs, vec![abs(&other)]);
        // The current directory plays no part: the same names do not exist there.
        assert!(!Path::new("pics/a.png").exists());
    }

    #[test]
    fn url_inputs_are_accepted_and_checked() {
        let d = tempfile::tempdir().unwrap();
        let img = png(d.path(), "a.png");
        let (_, rows) = &one_row_each_format(
            d.path(),
            &[
                ("provider", "topaz"),
                ("operation", "enhance"),
                ("input", " https://EXAMPLE.com/x.png?sig=a%20b | a.png "),
            ],
        )[0];
        assert_eq!(
            oks(rows)[0].1.inputs,
            vec!["https://example.com/x.png?sig=a%20b".to_string(), abs(&img)]
        );
        for (bad, want) in [
            ("ftp://example.com/a.png", "unsupported URL scheme"),
            ("http://", "not a valid URL"),
            ("https://exa mple.com/a.png", "not a valid URL"),
        ] {
            assert_error_each_format(
                d.path(),
                &[
                    ("provider", "topaz"),
                    ("operation", "enhance"),
                    ("input", bad),
                ],
                want,
            );
        }
    }

    #[test]
    fn params_must_be_an_object() {
        let d = tempfile::tempdir().unwrap();
        for bad in ["[1]", "5", "null", "{\"a\":", "nope"] {
            assert_error_each_format(
                d.path(),
                &[
                    ("provider", "topaz"),
                    ("operation", "enhance"),
                    ("params", bad),
                ],
                "params is not a JSON object",
            );
        }
        for (_, rows) in one_row_each_format(
            d.path(),
            &[
                ("provider", "topaz"),
                ("operation", "enhance"),
                ("params", " { \"b\" : 2 , \"a\" : {\"c\": null} } "),
            ],
        ) {
            assert_eq!(
                canonical_json(&oks(&rows)[0].1.params_json),
                r#"{"a":{"c":null},"b":2}"#
            );
            assert!(!oks(&rows)[0].1.params_json.contains(' '));
        }
    }

    #[test]
    fn outputs_must_stay_inside_the_output_folder() {
        let d = tempfile::tempdir().unwrap();
        let long = "x".repeat(201);
        let too_long = vec!["y"; 600].join("/");
        for (bad, want) in [
            ("../x", "output ../x escapes the output folder"),
            ("a/../../b", "output a/../../b escapes the output folder"),
            ("a/..", "escapes the output folder"),
            ("/abs", "output /abs is an absolute path"),
            ("/", "absolute path"),
            ("C:/x", "drive prefix"),
            ("c:x", "drive prefix"),
            ("a\\b", "backslash"),
            ("a\u{0}b", "control character"),
            ("a\nb", "control character"),
            (long.as_str(), "longer than 200 bytes"),
            (too_long.as_str(), "longer than 1024 bytes"),
        ] {
            assert_error_each_format(
                d.path(),
                &[
                    ("provider", "topaz"),
                    ("operation", "enhance"),
                    ("output", bad),
                ],
                want,
            );
        }
        for (good, kept) in [
            ("out/", "out/"),
            (" a/b/c ", "a/b/c"),
            ("a..b/x", "a..b/x"),
            ("", ""),
        ] {
            for (_, rows) in one_row_each_format(
                d.path(),
                &[
                    ("provider", "topaz"),
                    ("operation", "enhance"),
                    ("output", good),
                ],
            ) {
                let o = oks(&rows);
                assert_eq!(o[0].1.output.as_deref().unwrap_or(""), kept);
            }
        }
    }

    #[test]
    fn nul_in_a_csv_output_field_is_rejected() {
        let d = tempfile::tempdir().unwrap();
        let p = write(
            d.path(),
            "m.csv",
            b"provider,operation,output\ntopaz,enhance,a\x00b\n".as_slice(),
        );
        let (_, rows) = run(&p);
        assert!(errs(&rows)[0].1.contains("control character"));
    }

    // --- derived ids and duplicates -------------------------------------------------

    #[test]
    fn derived_ids_are_stable_across_runs_and_formats() {
        let d = tempfile::tempdir().unwrap();
        png(d.path(), "a.png");
        let fields = [
            ("provider", "topaz"),
            ("operation", "enhance"),
            ("input", "a.png|https://example.com/b.png"),
            ("prompt", "p"),
            ("params", "{\"b\":1,\"a\":[1,2]}"),
            ("output", "o/"),
        ];
        let first: Vec<String> = one_row_each_format(d.path(), &fields)
            .iter()
            .map(|(_, rows)| oks(rows)[0].1.id.clone())
            .collect();
        assert!(
            first[0].starts_with("r-") && first[0].len() == 18,
            "{first:?}"
        );
        assert!(valid_job_id(&first[0]));
        assert!(first.iter().all(|id| *id == first[0]), "{first:?}");
        let again: Vec<String> = one_row_each_format(d.path(), &fields)
            .iter()
            .map(|(_, rows)| oks(rows)[0].1.id.clone())
            .collect();
        assert_eq!(first, again);
        // Any change of content changes the id.
        let mut changed = fields;
        changed[3] = ("prompt", "q");
        let other = &one_row_each_format(d.path(), &changed)[0].1;
        assert_ne!(oks(other)[0].1.id, first[0]);
    }

    #[test]
    fn derived_id_is_fixed_for_a_known_row() {
        // Guards against an accidental change of the content hash: the same manifest
        // must give the same ids in every version, or re-runs would enqueue twice.
        let d = tempfile::tempdir().unwrap();
        let p = write(
            d.path(),
            "m.csv",
            "provider,operation,input,params\ntopaz,enhance,https://example.com/a.png,\"{\"\"model\"\":\"\"Standard V2\"\"}\"\n",
        );
        let (_, rows) = run(&p);
        assert_eq!(oks(&rows)[0].1.id, "r-5177677383686561");
    }

    #[test]
    fn duplicate_tracker_tells_repeats_from_conflicts() {
        let d = tempfile::tempdir().unwrap();
        let p1 = write(
            d.path(),
            "one.csv",
            "id,provider,operation,prompt\nx,topaz,enhance,p\n,topaz,enhance,same\n,topaz,enhance,same\nx,topaz,enhance,p\n",
        );
        let p2 = write(
            d.path(),
            "two.jsonl",
            "{\"id\":\"x\",\"provider\":\"topaz\",\"operation\":\"enhance\",\"prompt\":\"p\"}\n\
             {\"id\":\"x\",\"provider\":\"topaz\",\"operation\":\"enhance\",\"prompt\":\"other\"}\n",
        );
        let mut tracker = DuplicateTracker::new();
        assert!(tracker.is_empty());
        let mut outcomes = Vec::new();
        for p in [&p1, &p2] {
            let mut rows = Vec::new();
            read_with(p, &no_provider_checks, &mut |r| rows.push(r)).unwrap();
            for r in rows {
                let (origin, spec) = r.unwrap();
                outcomes.push(tracker.check(&origin, &spec).map_err(|e| e.to_string()));
            }
        }
        let f1 = p1.display().to_string();
        let f2 = p2.display().to_string();
        assert_eq!(
            outcomes,
            vec![
                Ok(RowStatus::New),
                Ok(RowStatus::New),
                Ok(RowStatus::Repeat),
                Ok(RowStatus::Repeat),
                Ok(RowStatus::Repeat),
                Err(format!(
                    "{f2}:2: id \"x\" is already used by {f1}:2 with different content"
                )),
            ]
        );
        assert_eq!(tracker.len(), 2);
    }

    fn out_spec(id: &str, output: Option<&str>) -> JobSpec {
        JobSpec {
            id: id.into(),
            provider: ProviderKind::Topaz,
            operation: "enhance".into(),
            inputs: vec![],
            prompt: None,
            params_json: "{}".into(),
            output: output.map(str::to_string),
            metadata: Vec::new(),
        }
    }

    fn at(file: &str, line: u64) -> Origin {
        Origin {
            file: file.into(),
            line,
        }
    }

    #[test]
    fn output_tracker_finds_rows_that_write_one_file() {
        // (id, output, Some(other line) when it must collide)
        type Rows<'a> = &'a [(&'a str, Option<&'a str>)];
        // (other line, numbered, case only) when the rows must collide.
        type Want = Option<(u64, bool, bool)>;
        let cases: &[(Rows, Want)] = &[
            (
                &[("a", Some("x")), ("b", Some("x"))],
                Some((2, false, false)),
            ),
            (
                &[("a", Some("d/")), ("b", Some("d/a"))],
                Some((2, false, false)),
            ),
            (&[("a", None), ("b", Some("./a"))], Some((2, false, false))),
            (
                &[("a", Some("d//x")), ("b", Some("d/x"))],
                Some((2, false, false)),
            ),
            (
                &[("a", Some("X")), ("b", Some("x"))],
                Some((2, false, true)),
            ),
            // Numbered outputs, either order.
            (
                &[("a", Some("x")), ("b", Some("x_1"))],
                Some((2, true, false)),
            ),
            (
                &[("b", Some("x_1")), ("a", Some("x"))],
                Some((2, true, false)),
            ),
            // Not the same file.
            (&[("a", Some("x")), ("b", Some("y"))], None),
            (&[("a", Some("d/x")), ("b", Some("e/x"))], None),
            (&[("a", Some("x")), ("b", Some("x_v"))], None),
            (&[("a", Some("x")), ("b", Some("x.png"))], None),
            (&[("a", Some("d_1/x")), ("b", Some("d"))], None),
            // Two rows of one job (a repeat) are one claim.
            (&[("a", Some("x")), ("a", Some("x"))], None),
        ];
        for (rows, want) in cases {
            let mut t = OutputTracker::new();
            let mut got = None;
            for (i, (id, output)) in rows.iter().enumerate() {
                if let Err(c) = t.check(&at("m.csv", i as u64 + 2), &out_spec(id, *output), false) {
                    let Collision::Row(with) = &c.with else {
                        panic!("{c:?}")
                    };
                    assert_eq!(with, "m.csv:2", "{rows:?}");
                    assert!(c.reason("X").contains("resolves to the same file as X"));
                    got = Some((2, c.numbered, c.case_only));
                }
            }
            assert_eq!(got, *want, "{rows:?}");
        }
    }

    #[test]
    fn output_tracker_knows_the_database_and_versions() {
        let mut t = OutputTracker::new();
        t.add_existing(&out_spec("old", Some("pics/")));
        // The job itself again (same id) is not a collision; another id is.
        assert!(t
            .check(&at("m.csv", 2), &out_spec("old", Some("pics/")), false)
            .is_ok());
        let c = t
            .check(&at("m.csv", 3), &out_spec("new", Some("pics/old")), false)
            .unwrap_err();
        assert_eq!(c.with, Collision::Database(OutputTracker::owner_key("old")));
        // A new version's name is flagged as one.
        assert!(t
            .check(&at("m.csv", 4), &out_spec("v", Some("v.v2")), true)
            .is_ok());
        let c = t
            .check(&at("m.csv", 5), &out_spec("w", Some("v.v2")), false)
            .unwrap_err();
        assert!(c.version);
        assert_eq!(c.with, Collision::Row("m.csv:4".into()));
    }

    #[test]
    fn duplicate_tracker_entries_stay_small() {
        assert!(std::mem::size_of::<(u128, FirstSeen)>() <= 48);
    }

    // --- size cap -------------------------------------------------------------------

    #[test]
    fn rows_over_the_size_cap_are_row_errors_and_reading_goes_on() {
        let d = tempfile::tempdir().unwrap();
        let big = "x".repeat(MAX_ROW_BYTES + 10);
        let good = r#"{"provider":"topaz","operation":"enhance"}"#;
        let cases = [
            (
                "m.csv",
                format!("provider,operation,prompt\ntopaz,enhance,{big}\ntopaz,enhance,ok\n"),
                2u64,
                3u64,
            ),
            (
                "q.csv",
                format!("provider,operation,prompt\ntopaz,enhance,\"{big}\n\"\ntopaz,enhance,ok\n"),
                2,
                4,
            ),
            (
                "m.jsonl",
                format!("{{\"prompt\":\"{big}\"}}\n{good}\n"),
                1,
                2,
            ),
            (
                "m.json",
                format!("[\n{{\"prompt\":\"{big}\"}},\n{good}]"),
                2,
                3,
            ),
        ];
        for (name, content, bad_line, good_line) in cases {
            let p = write(d.path(), name, content);
            let (res, rows) = run(&p);
            assert_eq!(res.unwrap(), 2, "{name}");
            let e = errs(&rows);
            assert_eq!(e.len(), 1, "{name}");
            assert_eq!(e[0].0, bad_line, "{name}");
            assert!(e[0].1.contains("larger than"), "{name}: {e:?}");
            assert_eq!(
                oks(&rows).iter().map(|(l, _)| *l).collect::<Vec<_>>(),
                vec![good_line],
                "{name}"
            );
        }
        // An oversized CSV header is a file error.
        let p = write(d.path(), "h.csv", format!("provider,operation,{big}\n"));
        assert!(matches!(run(&p).0, Err(ManifestError::Format { .. })));
    }

    #[test]
    fn deep_nesting_does_not_overflow_the_stack() {
        let d = tempfile::tempdir().unwrap();
        let deep = format!("{}{}", "[".repeat(200_000), "]".repeat(200_000));
        let obj = format!("{{\"params\":{{\"a\":{deep}}}}}");
        let p = write(d.path(), "m.jsonl", format!("{obj}\n"));
        let (res, rows) = run(&p);
        assert_eq!(res.unwrap(), 1);
        assert_eq!(errs(&rows).len(), 1);
        let p = write(d.path(), "m.json", format!("[{obj}, {deep}]"));
        let (res, rows) = run(&p);
        assert_eq!(res.unwrap(), 2);
        assert_eq!(errs(&rows).len(), 2);
    }

    // --- provider checks and the public entry point ------------------------------------

    #[test]
    fn every_provider_message_is_its_own_row_error() {
        let d = tempfile::tempdir().unwrap();
        let p = write(d.path(), "m.csv", "provider,operation\ntopaz,enhance\n");
        let two = |_: &JobSpec| vec!["first problem".to_string(), "second problem".to_string()];
        let mut rows = Vec::new();
        let n = read_with(&p, &two, &mut |r| rows.push(r)).unwrap();
        assert_eq!(n, 1);
        assert_eq!(
            rows.iter()
                .map(|r| r.as_ref().unwrap_err().to_string())
                .collect::<Vec<_>>(),
            vec![
                format!("{}:2: first problem", p.display()),
                format!("{}:2: second problem", p.display())
            ]
        );
    }

    #[test]
    fn read_manifest_runs_the_provider_checks() {
        let d = tempfile::tempdir().unwrap();
        png(d.path(), "a.png");
        let p = write(
            d.path(),
            "m.csv",
            "id,provider,operation,input\ngood,topaz,enhance,a.png\n,dzine,txt2img,\n,nope,x,\n,topaz,no-such-operation,a.png\n",
        );
        let mut rows = Vec::new();
        let n = read_manifest(&p, &mut |r| rows.push(r)).unwrap();
        assert_eq!(n, 4);
        // The providers' own rules are tested in their modules; here only that their
        // verdicts arrive on the right lines.
        let ok = oks(&rows);
        assert_eq!(ok.len(), 1, "{rows:?}");
        assert_eq!((ok[0].0, ok[0].1.id.as_str()), (2, "good"));
        let e = errs(&rows);
        assert!(
            e.iter().any(|(l, _)| *l == 3),
            "a txt2img without a prompt is invalid: {e:?}"
        );
        assert!(e
            .iter()
            .any(|(l, m)| *l == 4 && m.starts_with("unknown provider \"nope\"")));
        assert!(e.iter().any(|(l, _)| *l == 5), "{e:?}");
        assert!(e.iter().all(|(l, _)| (3..=5).contains(l)));
    }

    // --- fixtures --------------------------------------------------------------------

    fn fixture(name: &str) -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures/manifests")
            .join(name)
    }

    fn read_real(path: &Path) -> Vec<Row> {
        let mut rows = Vec::new();
        read_manifest(path, &mut |r| rows.push(r)).unwrap();
        rows
    }

    #[test]
    fn fixture_good_manifests_agree_across_formats() {
        let img = abs(&fixture("img/small.png"));
        let mut specs = Vec::new();
        for (name, lines) in [
            ("good.csv", [3, 4, 5]),
            ("good.json", [2, 10, 15]),
            ("good.jsonl", [1, 3, 4]),
        ] {
            let rows = read_real(&fixture(name));
            assert_eq!(errs(&rows), vec![], "{name}");
            let ok = oks(&rows);
            assert_eq!(
                ok.iter().map(|(l, _)| *l).collect::<Vec<_>>(),
                lines,
                "{name}"
            );
            assert_eq!(ok[0].1.id, "portrait-1");
            assert_eq!(ok[0].1.inputs, vec![img.clone()]);
            assert_eq!(
                ok[2].1.inputs,
                vec!["https://example.com/photos/a.jpg".to_string()]
            );
            specs.push(ok.into_iter().map(|(_, s)| s).collect::<Vec<_>>());
        }
        for other in &specs[1..] {
            for (a, b) in specs[0].iter().zip(other) {
                assert_eq!(a.id, b.id);
                assert_eq!(a.content_hash(), b.content_hash());
            }
        }
    }

    #[test]
    fn a_relative_manifest_path_is_kept_in_origins_and_inputs_made_absolute() {
        // Unit tests run in the package folder.
        let rel = Path::new("tests/fixtures/manifests/good.csv");
        let rows = read_real(rel);
        let (origin, spec) = rows[0].as_ref().unwrap();
        assert_eq!(origin.file, "tests/fixtures/manifests/good.csv");
        assert_eq!(spec.inputs, vec![abs(&fixture("img/small.png"))]);
        assert!(Path::new(&spec.inputs[0]).is_absolute());
    }

    #[test]
    fn fixture_bad_manifest_reports_every_bad_line() {
        let path = fixture("bad.csv");
        let rows = read_real(&path);
        let bad_lines: Vec<u64> = errs(&rows).iter().map(|(l, _)| *l).collect();
        assert_eq!(bad_lines, vec![3, 4, 5, 6, 7, 8], "{rows:?}");
        let e = errs(&rows);
        assert_eq!(e[0].1, "missing provider");
        assert!(e[1].1.starts_with("invalid id \"bad id\""));
        assert_eq!(e[2].1, "input 1 (img/missing.png): no such file");
        assert!(e[3].1.starts_with("params is not a JSON object"));
        assert_eq!(e[4].1, "output ../escape escapes the output folder");
        assert!(e[5].1.starts_with("params is not a JSON object"));
        let mut tracker = DuplicateTracker::new();
        let verdicts: Vec<(u64, Result<RowStatus, String>)> = rows
            .into_iter()
            .filter_map(Result::ok)
            .map(|(o, s)| (o.line, tracker.check(&o, &s).map_err(|e| e.to_string())))
            .collect();
        let file = path.display();
        assert_eq!(
            verdicts,
            vec![
                (2, Ok(RowStatus::New)),
                (10, Ok(RowStatus::New)),
                (11, Ok(RowStatus::Repeat)),
                (
                    12,
                    Err(format!(
                        "{file}:12: id \"ok-1\" is already used by {file}:2 with different content"
                    ))
                ),
            ]
        );
    }

    // --- never panics ---------------------------------------------------------------------

    fn read_all_formats(bytes: &[u8]) {
        let d = tempfile::tempdir().unwrap();
        for name in ["m.csv", "m.json", "m.jsonl", "m"] {
            let p = write(d.path(), name, bytes);
            let mut count = 0u64;
            let res = read_manifest(&p, &mut |_| count += 1);
            if let Ok(rows) = res {
                assert!(count >= rows);
            }
        }
    }

    /// Every non-empty record as `CsvSplitter` reads it.
    fn split_all(bytes: &[u8]) -> Vec<Vec<Vec<u8>>> {
        let mut split = CsvSplitter {
            r: bytes,
            pos: LineCounter::new(),
        };
        let (mut buf, mut ends) = (Vec::new(), Vec::new());
        let mut out = Vec::new();
        while let Some(rec) = split
            .next_record(&mut buf, &mut ends, MAX_ROW_BYTES)
            .unwrap()
        {
            assert!(!rec.oversize);
            out.push(
                csv_fields(&buf, &ends)
                    .into_iter()
                    .map(<[u8]>::to_vec)
                    .collect(),
            );
        }
        out
    }

    /// The same through `csv::Reader` (default dialect, no header).
    fn csv_crate_all(bytes: &[u8]) -> Vec<Vec<Vec<u8>>> {
        let mut rdr = csv::ReaderBuilder::new()
            .has_headers(false)
            .flexible(true)
            .from_reader(bytes);
        rdr.byte_records()
            .map(|r| r.unwrap().iter().map(<[u8]>::to_vec).collect())
            .collect()
    }

    #[test]
    fn csv_splitter_agrees_with_the_csv_crate_on_known_cases() {
        for text in [
            "a,b\nc,d",
            "\"a\"\"b\",c\r\n\r\nd",
            "x\"y\",\"q\"z\"w,\"\"",
            ",,\n\n,\r\r\n\"multi\nline\r\nfield\"\n",
            "\"open",
            "\"\"\"\"",
        ] {
            assert_eq!(
                split_all(text.as_bytes()),
                csv_crate_all(text.as_bytes()),
                "{text:?}"
            );
        }
    }

    #[test]
    fn csv_splitter_reports_start_lines() {
        let text = b"\n\na,\"b\nc\"\r\n\rd\ne";
        let mut split = CsvSplitter {
            r: &text[..],
            pos: LineCounter::new(),
        };
        let (mut buf, mut ends) = (Vec::new(), Vec::new());
        let mut lines = Vec::new();
        while let Some(rec) = split
            .next_record(&mut buf, &mut ends, MAX_ROW_BYTES)
            .unwrap()
        {
            lines.push(rec.line);
        }
        assert_eq!(lines, vec![3, 6, 7]);
    }

    proptest! {
        #[test]
        fn csv_splitter_agrees_with_the_csv_crate(s in "[a\",\r\n ]{0,60}") {
            prop_assert_eq!(split_all(s.as_bytes()), csv_crate_all(s.as_bytes()));
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 200, ..ProptestConfig::default() })]

        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..400)) {
            read_all_formats(&bytes);
        }

        #[test]
        fn arbitrary_structured_text_never_panics(s in "[\\[\\]{}\",:|\\\\\r\n a-z0-9./\u{feff}]{0,300}") {
            read_all_formats(s.as_bytes());
        }

        #[test]
        fn arbitrary_manifest_like_text_never_panics(
            rows in proptest::collection::vec(
                proptest::collection::vec("[a-z.|/\" ,\n{}\\[\\]:]{0,12}|topaz|enhance|id|provider|operation|input|params|output", 0..8),
                0..6,
            )
        ) {
            let csv: Vec<String> = rows.iter().map(|r| r.join(",")).collect();
            read_all_formats(csv.join("\n").as_bytes());
            let jsonl: Vec<String> = rows
                .iter()
                .map(|r| {
                    let pairs: Vec<String> = r.chunks(2).map(|kv| format!("{:?}:{:?}", kv[0], kv.get(1).map(String::as_str).unwrap_or(""))).collect();
                    format!("{{{}}}", pairs.join(","))
                })
                .collect();
            read_all_formats(jsonl.join("\n").as_bytes());
            read_all_formats(format!("[{}]", jsonl.join(",\n")).as_bytes());
        }
    }
}
