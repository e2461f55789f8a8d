//! Dzine Developer API (`https://papi.dzine.ai/openapi/v1`).
//!
//! Operations: `txt2img`, `img2img`, `face_swap` and `upscale`, each a paid
//! `POST /create_task_<op>` answered with a `task_id`, polled with
//! `GET /get_task_progress/{task_id}` until its `generate_result_slots` hold the result
//! URLs (one per enabled slot, `""` for the others: each non-empty slot is one output).
//!
//! Every answer is the envelope `{"code", "msg", "data"}`, HTTP 200 even on errors:
//! success is `code == 200` ([`read_envelope`]). The key goes in `Authorization`
//! without `Bearer`.
//!
//! Inputs: local files go inline as `base64_data` data URIs, http(s) inputs as `url`.
//! Face swap takes image URLs only, so it prepares in stages, each made durable by the
//! engine before the next: upload the source (local files only, `POST /file/upload`),
//! upload the destination, detect and select the source face, detect and select the
//! destination face (`POST /face_detect`). A crash repeats at most the stage it cut.
//!
//! The API offers no way to find a task by a client key, so a submission whose answer
//! was lost cannot be reconciled (the trait's default, `Unknowable`). Task data expires
//! after 2 hours: a task the API no longer finds is lost and may have been charged,
//! except within [`EARLY_NOT_FOUND`] of its creation, when the engine polls again
//! (a live client saw such 404s for up to ten 1 s polls).
//!
//! The choices where the document is vague are in `docs/providers/dzine.md`.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use reqwest::multipart::{Form, Part};
use reqwest::{Method, RequestBuilder, StatusCode};
use serde_json::{json, Map, Value};

use super::util::{self, ImageFormat, Params};
use super::{
    Api, Balance, JobContext, PollOutcome, Prepared, Provider, ProviderConfig, ProviderError,
    RequestKind, StyleEntry, StyleQuery, SubmitOutcome,
};
use crate::api::excerpt;
use crate::model::{JobSpec, PendingOutput, ProviderKind};

/// "Maximum of 800 characters."
pub const MAX_PROMPT_CHARS: usize = 800;
/// `target_h` / `target_w`: "between 128 and 1536 pixels".
pub const MIN_SIDE: i64 = 128;
pub const MAX_SIDE: i64 = 1536;
/// "1 to 2147483647 (INT32_MAX)".
pub const MAX_SEED: i64 = 2_147_483_647;
/// "This image must be under 10M in size": read as 10 MB (decimal, the stricter
/// reading), applied to the file's bytes before base64.
pub const MAX_INPUT_BYTES: u64 = 10_000_000;
/// `upscaling_resize`: "(1.5, 2, 3, 4)".
pub const UPSCALE_FACTORS: &[f64] = &[1.5, 2.0, 3.0, 4.0];
/// A freshly created task may answer "not found" for a while (NOTES.md): within this
/// long after its submission was sent, such an answer is taken as "still starting";
/// only after it does the task count as lost. A live client (MyStoryKid,
/// docs/providers.md "live evidence") needed up to ten 1-second polls, so the default
/// leaves half as much again on top. `early_not_found` in `[providers.dzine]`
/// overrides it.
pub const EARLY_NOT_FOUND: Duration = Duration::from_secs(15);
/// Envelope code of a style that cannot be used for img2img (NOTES.md).
pub const CODE_STYLE_NOT_FOR_IMG2IMG: i64 = 108_005;
/// JSON answers are small (URLs, ids, face lists, one page of styles).
const MAX_JSON: u64 = 4 * 1024 * 1024;
/// The style list's page size (the document's default).
const STYLE_PAGE_SIZE: usize = 50;
/// A bound on style pages, against a server that never says it is done.
const MAX_STYLE_PAGES: usize = 1000;

/// The prepare refs of a face swap.
pub const REF_SOURCE_IMAGE: &str = "source_image";
pub const REF_DEST_IMAGE: &str = "dest_image";
pub const REF_SOURCE_FACE: &str = "source_face";
pub const REF_DEST_FACE: &str = "dest_face";

// ---------------------------------------------------------------------------------
// Operations and parameters
// ---------------------------------------------------------------------------------

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Operation {
    Txt2Img,
    Img2Img,
    FaceSwap,
    Upscale,
}

const TXT2IMG_PARAMS: &[&str] = &[
    "prompt",
    "style_code",
    "style_intensity",
    "quality_mode",
    "seed",
    "target_h",
    "target_w",
    "generate_slots",
    "output_format",
    "base_model",
];
const IMG2IMG_PARAMS: &[&str] = &[
    "prompt",
    "style_code",
    "style_intensity",
    "structure_match",
    "quality_mode",
    "color_match",
    "seed",
    "face_match",
    "generate_slots",
    "output_format",
    "base_model",
];
const FACE_SWAP_PARAMS: &[&str] = &[
    "generate_slots",
    "output_format",
    "source_face_index",
    "dest_face_index",
];
const UPSCALE_PARAMS: &[&str] = &["upscaling_resize", "output_format"];

impl Operation {
    pub fn from_name(op: &str) -> Option<Operation> {
        match util::fold_operation(op).as_str() {
            "txt2img" | "text2img" | "text-to-image" => Some(Operation::Txt2Img),
            "img2img" | "image2image" | "image-to-image" => Some(Operation::Img2Img),
            "face-swap" | "faceswap" => Some(Operation::FaceSwap),
            "upscale" => Some(Operation::Upscale),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Operation::Txt2Img => "txt2img",
            Operation::Img2Img => "img2img",
            Operation::FaceSwap => "face_swap",
            Operation::Upscale => "upscale",
        }
    }

    pub fn path(self) -> &'static str {
        match self {
            Operation::Txt2Img => "/create_task_txt2img",
            Operation::Img2Img => "/create_task_img2img",
            Operation::FaceSwap => "/create_task_face_swap",
            Operation::Upscale => "/create_task_upscale",
        }
    }

    fn known_params(self) -> &'static [&'static str] {
        match self {
            Operation::Txt2Img => TXT2IMG_PARAMS,
            Operation::Img2Img => IMG2IMG_PARAMS,
            Operation::FaceSwap => FACE_SWAP_PARAMS,
            Operation::Upscale => UPSCALE_PARAMS,
        }
    }

    /// The extension of a result whose URL does not tell (the documented defaults:
    /// webp for the generators; upscale's text says png, its table jpg: png).
    fn default_ext(self) -> &'static str {
        match self {
            Operation::Upscale => "png",
            _ => "webp",
        }
    }
}

/// A job's request, checked against the document: everything but the images.
#[derive(Debug, Clone, PartialEq)]
pub struct Plan {
    pub op: Operation,
    /// The JSON fields to send besides `images` (and the face swap's image fields).
    pub body: Map<String, Value>,
    /// Extension of the results when their URLs do not tell.
    pub fallback_ext: &'static str,
    /// Which detected face to use (pixbatch's own parameters, never sent); `None`:
    /// the largest.
    pub source_face_index: Option<usize>,
    pub dest_face_index: Option<usize>,
}

/// A value on the document's 0.1 grid from 0 to 1 (`style_intensity`,
/// `structure_match`), rounded to one decimal so `0.30000000000000004` goes as `0.3`.
fn tenth(p: &mut Params<'_>, name: &str) -> Option<f64> {
    let x = p.number(name, 0.0, 1.0)?;
    let tenths = (x * 10.0).round();
    if (x * 10.0 - tenths).abs() > 1e-6 {
        p.errors.push(format!(
            "{name} must be one of 0, 0.1, 0.2, … 0.9, 1 (got {}; nearest allowed: {})",
            util::fmt_num(x),
            util::fmt_num(tenths / 10.0)
        ));
        return None;
    }
    Some(tenths / 10.0)
}

/// `generate_slots`: a list of 0/1, one per slot of the base model (4 for S, 2 for X).
fn slots(p: &mut Params<'_>, allowed_lens: &[usize]) -> Option<Vec<u8>> {
    let v = p.get("generate_slots")?;
    let parsed: Option<Value> = match v {
        Value::String(s) => serde_json::from_str(s).ok(),
        other => Some(other.clone()),
    };
    let list: Option<Vec<u8>> = parsed.as_ref().and_then(Value::as_array).and_then(|a| {
        a.iter()
            .map(|x| match x {
                Value::Number(n) if n.as_f64() == Some(0.0) => Some(0),
                Value::Number(n) if n.as_f64() == Some(1.0) => Some(1),
                Value::Bool(b) => Some(u8::from(*b)),
                _ => None,
            })
            .collect()
    });
    let lens = allowed_lens
        .iter()
        .map(|n| n.to_string())
        .collect::<Vec<_>>()
        .join(" or ");
    let Some(list) = list else {
        p.errors.push(format!(
            "generate_slots must be a list of {lens} values, each 0 or 1, e.g. [1,1,0,0] (got {})",
            util::show_value(v)
        ));
        return None;
    };
    if !allowed_lens.contains(&list.len()) {
        p.errors.push(format!(
            "generate_slots must have {lens} entries (4 slots for base model S, 2 for X; got {})",
            list.len()
        ));
        return None;
    }
    if !list.contains(&1) {
        p.errors.push(
            "generate_slots turns every slot off: at least one must be 1, or nothing is generated"
                .to_string(),
        );
        return None;
    }
    Some(list)
}

impl Plan {
    /// Reads the operation, prompt and parameters; every problem is listed.
    pub fn from_spec(spec: &JobSpec) -> Result<Plan, Vec<String>> {
        let Some(op) = Operation::from_name(&spec.operation) else {
            return Err(vec![format!(
                "unknown dzine operation {:?} (expected txt2img, img2img, face_swap or upscale)",
                spec.operation
            )]);
        };
        let map = spec.params();
        let mut p = Params::new(&map);
        p.reject_unknown("dzine", op.known_params());
        let mut body = Map::new();
        let generates = matches!(op, Operation::Txt2Img | Operation::Img2Img);

        let prompt = util::prompt_of(spec, &map);
        if generates {
            if p.has("prompt") && !matches!(p.get("prompt"), Some(Value::String(_))) {
                p.errors.push(format!(
                    "prompt must be a string (got {})",
                    p.get("prompt").map(util::show_value).unwrap_or_default()
                ));
            }
            match &prompt {
                None => p.errors.push(format!(
                    "dzine {} needs a prompt (the prompt column or params.prompt)",
                    op.name()
                )),
                Some(text) => match util::text(
                    "prompt",
                    &Value::String(text.clone()),
                    Some(MAX_PROMPT_CHARS),
                ) {
                    Ok(t) => {
                        body.insert("prompt".into(), Value::String(t));
                    }
                    Err(e) => p.errors.push(e),
                },
            }
            match p.get("style_code") {
                Some(Value::String(s)) if !s.trim().is_empty() => {
                    body.insert("style_code".into(), Value::String(s.trim().to_string()));
                }
                Some(other) => p.errors.push(format!(
                    "style_code must be a style code string (got {})",
                    util::show_value(other)
                )),
                None => p.errors.push(format!(
                    "dzine {} needs params.style_code (list them with `pixbatch styles dzine`)",
                    op.name()
                )),
            }
            if let Some(x) = tenth(&mut p, "style_intensity") {
                body.insert("style_intensity".into(), json!(x));
            }
            if let Some(q) = p.integer("quality_mode", 0, 1) {
                body.insert("quality_mode".into(), json!(q));
            }
            if let Some(s) = p.integer("seed", 1, MAX_SEED) {
                body.insert("seed".into(), json!(s));
            }
        } else if prompt.is_some() && spec.prompt.as_deref().is_some_and(|s| !s.trim().is_empty()) {
            p.errors.push(format!(
                "dzine {} does not use a prompt (the prompt column must be empty)",
                op.name()
            ));
        }

        let base_model = if generates {
            p.choice("base_model", &["S", "X"])
        } else {
            None
        };
        match op {
            Operation::Txt2Img => {
                match p.get("target_h") {
                    None => p.errors.push(
                        "dzine txt2img needs params.target_h (the output height, 128 to 1536)"
                            .into(),
                    ),
                    Some(_) => {
                        if let Some(h) = p.integer("target_h", MIN_SIDE, MAX_SIDE) {
                            body.insert("target_h".into(), json!(h));
                        }
                    }
                }
                if let Some(w) = p.integer("target_w", MIN_SIDE, MAX_SIDE) {
                    body.insert("target_w".into(), json!(w));
                }
            }
            Operation::Img2Img => {
                if let Some(x) = tenth(&mut p, "structure_match") {
                    body.insert("structure_match".into(), json!(x));
                }
                for name in ["color_match", "face_match"] {
                    if let Some(b) = p.boolean(name) {
                        body.insert(name.into(), json!(u8::from(b)));
                    }
                }
            }
            Operation::FaceSwap | Operation::Upscale => {}
        }

        if op != Operation::Upscale {
            // The model is known from the style, which only the style list tells; the
            // optional `base_model` says which one the user means.
            let lens: &[usize] = match (op, base_model) {
                (_, Some("X")) => &[2],
                (Operation::Txt2Img, None) => &[4, 2],
                _ => &[4],
            };
            if let Some(list) = slots(&mut p, lens) {
                body.insert("generate_slots".into(), json!(list));
            }
        }

        let mut fallback_ext = op.default_ext();
        match op {
            Operation::Upscale => {
                if let Some(v) = p.get("upscaling_resize") {
                    match util::number_in_range("upscaling_resize", v, 1.5, 4.0) {
                        Ok(x) if UPSCALE_FACTORS.contains(&x) => {
                            body.insert("upscaling_resize".into(), json!(x));
                        }
                        _ => p.errors.push(format!(
                            "upscaling_resize must be 1.5, 2, 3 or 4 (got {})",
                            util::show_value(v)
                        )),
                    }
                }
                if let Some(v) = p.get("output_format") {
                    match v.as_str().map(|s| s.trim().to_ascii_lowercase()).as_deref() {
                        Some("jpg" | "jpeg") => {
                            body.insert("output_format".into(), json!("jpg"));
                            fallback_ext = "jpg";
                        }
                        Some("png") => {
                            body.insert("output_format".into(), json!("png"));
                            fallback_ext = "png";
                        }
                        _ => p.errors.push(format!(
                            "output_format must be \"jpg\" or \"png\" for upscale (got {})",
                            util::show_value(v)
                        )),
                    }
                }
            }
            _ => {
                if let Some(v) = p.get("output_format") {
                    match v.as_str().map(|s| s.trim().to_ascii_lowercase()).as_deref() {
                        Some("jpg" | "jpeg") => {
                            body.insert("output_format".into(), json!("jpeg"));
                            fallback_ext = "jpg";
                        }
                        Some("webp") => {
                            body.insert("output_format".into(), json!("webp"));
                        }
                        _ => p.errors.push(format!(
                            "output_format must be \"jpeg\" or \"webp\" (got {})",
                            util::show_value(v)
                        )),
                    }
                }
            }
        }

        let (mut source_face_index, mut dest_face_index) = (None, None);
        if op == Operation::FaceSwap {
            source_face_index = p.integer("source_face_index", 0, 99).map(|i| i as usize);
            dest_face_index = p.integer("dest_face_index", 0, 99).map(|i| i as usize);
        }

        if !p.errors.is_empty() {
            return Err(p.errors);
        }
        Ok(Plan {
            op,
            body,
            fallback_ext,
            source_face_index,
            dest_face_index,
        })
    }
}

/// The input formats sent to Dzine (the document names none; these are the ones its
/// own examples and CDN use).
fn check_format(input: &str, format: Option<ImageFormat>) -> Option<String> {
    match format {
        Some(ImageFormat::Jpeg | ImageFormat::Png | ImageFormat::Webp) => None,
        Some(other) => Some(format!(
            "input {input}: dzine takes JPEG, PNG or WebP images, not {other}"
        )),
        None => Some(format!(
            "input {input} is not an image format pixbatch recognises"
        )),
    }
}

/// Checks one input of a face swap (path or URL).
fn check_input(input: &str, errors: &mut Vec<String>) {
    let input = input.trim();
    if util::is_url(input) {
        if url::Url::parse(input).map_or(true, |u| u.host_str().is_none_or(str::is_empty)) {
            errors.push(format!("input {input} is not a valid URL"));
        }
        return;
    }
    match util::inspect_local(input, MAX_INPUT_BYTES) {
        Ok(info) => errors.extend(check_format(input, info.format)),
        Err(e) => errors.push(e),
    }
}

/// Checks a Dzine job against the document before any request is made.
pub fn validate(spec: &JobSpec) -> Vec<String> {
    let mut errors = match Plan::from_spec(spec) {
        Ok(_) => Vec::new(),
        Err(e) => e,
    };
    let Some(op) = Operation::from_name(&spec.operation) else {
        return errors;
    };
    let inputs: Vec<&str> = spec
        .inputs
        .iter()
        .map(|s| s.trim())
        .filter(|s| !s.is_empty())
        .collect();
    match op {
        Operation::Txt2Img => {
            if !inputs.is_empty() {
                errors.push(
                    "dzine txt2img takes no input image (the input column must be empty)".into(),
                );
            }
        }
        Operation::Img2Img | Operation::Upscale => {
            if let Some(info) = util::check_single_input(spec, MAX_INPUT_BYTES, &mut errors) {
                if info.format.is_some() {
                    errors.extend(check_format(spec.inputs[0].trim(), info.format));
                }
            }
        }
        Operation::FaceSwap => {
            if inputs.len() != 2 {
                errors.push(format!(
                    "dzine face_swap takes two inputs, source|dest (the face to use, then the picture to put it in); got {}",
                    inputs.len()
                ));
            } else {
                for input in inputs {
                    check_input(input, &mut errors);
                }
            }
        }
    }
    errors
}

/// Rate-limited requests a typical job makes: the creation and about five polls
/// (default poll interval 2 s); a face swap adds an upload per local input and the
/// two face detections. Result downloads go to the CDN and are not counted.
pub fn requests_per_job(spec: &JobSpec) -> u32 {
    const POLLS: u32 = 5;
    match Operation::from_name(&spec.operation) {
        Some(Operation::FaceSwap) => {
            let uploads = spec
                .inputs
                .iter()
                .filter(|i| !i.trim().is_empty() && !util::is_url(i.trim()))
                .count() as u32;
            uploads + 2 + 1 + POLLS
        }
        Some(_) => 1 + POLLS,
        None => 1,
    }
}

// ---------------------------------------------------------------------------------
// Answers
// ---------------------------------------------------------------------------------

/// What an envelope said.
#[derive(Debug, Clone, PartialEq)]
pub enum Envelope {
    /// `code == 200`: the `data` (null when absent).
    Ok(Value),
    /// Any other code (or an HTTP error status without an envelope).
    Refused { code: i64, msg: String },
}

fn code_of(v: &Value) -> Option<i64> {
    match v {
        Value::Number(n) => n
            .as_i64()
            .or_else(|| n.as_f64().filter(|x| x.fract() == 0.0).map(|x| x as i64)),
        Value::String(s) => s.trim().parse().ok(),
        _ => None,
    }
}

/// Reads an answer: the envelope if there is one; an HTTP error status without one
/// is a refusal with that status as its code. `Err`: a 2xx answer that is no
/// envelope (garbage).
pub fn read_envelope(status: StatusCode, body: &[u8]) -> Result<Envelope, String> {
    let parsed: Option<Value> = serde_json::from_slice(body).ok();
    let code = parsed
        .as_ref()
        .and_then(|v| v.get("code"))
        .and_then(code_of);
    let msg = parsed
        .as_ref()
        .and_then(|v| v.get("msg"))
        .and_then(Value::as_str)
        .map(|m| excerpt(m.as_bytes()).trim().to_string())
        .filter(|m| !m.is_empty());
    if !status.is_success() {
        let msg = msg
            .or_else(|| util::error_message(body))
            .unwrap_or_else(|| {
                // A body of blanks and control characters says nothing: name the status.
                let e = excerpt(body).trim().to_string();
                if e.is_empty() {
                    status.canonical_reason().unwrap_or("error").to_string()
                } else {
                    e
                }
            });
        let code = match code {
            Some(c) if c != 200 => c,
            _ => i64::from(status.as_u16()),
        };
        return Ok(Envelope::Refused { code, msg });
    }
    match (parsed, code) {
        (Some(v), Some(200)) => Ok(Envelope::Ok(v.get("data").cloned().unwrap_or(Value::Null))),
        (Some(_), Some(code)) => Ok(Envelope::Refused {
            code,
            msg: msg.unwrap_or_else(|| format!("error code {code}")),
        }),
        _ => Err(format!("not a Dzine answer: {}", excerpt(body))),
    }
}

/// Whether a message reads as passing trouble (worth asking again).
fn reads_as_passing(msg: &str) -> bool {
    let m = msg.to_ascii_lowercase();
    [
        "busy",
        "try again",
        "timeout",
        "timed out",
        "overload",
        "unavailable",
        "too many",
        "later",
    ]
    .iter()
    .any(|w| m.contains(w))
}

/// Turns a refusal into the engine's terms. A refusal means the request took no
/// effect (no task was made), so nothing here is `Unknown`.
///
/// 401/403 and 402 (credentials, balance), other 4xx, and Dzine's 6-digit business
/// codes (108005 …: a parameter or style the API refuses) are permanent; 429 and 5xx
/// are transient; any other code is transient if its message reads as passing trouble,
/// else permanent (a refused request is not charged, but retrying a refusal for good
/// only delays the failure).
pub fn classify(code: i64, msg: &str) -> ProviderError {
    let reason = format!("dzine error {code}: {msg}");
    match code {
        429 => ProviderError::Transient {
            reason,
            retry_after: None,
            rate_limited: true,
        },
        500..=599 => ProviderError::transient(reason),
        401 | 403 => ProviderError::credential(format!("{reason} (check DZINE_API_KEY)")),
        400..=499 => ProviderError::permanent(reason),
        CODE_STYLE_NOT_FOR_IMG2IMG => ProviderError::permanent(format!(
            "{reason} (this style cannot be used for img2img; pick another with `pixbatch styles dzine`)"
        )),
        _ if reads_as_passing(msg) => ProviderError::transient(reason),
        _ => ProviderError::permanent(reason),
    }
}

/// [`classify`], and a "too many requests" inside an HTTP 200 envelope slows the whole
/// host down as an HTTP 429 would (the gate's pause and adaptive rate never see it
/// otherwise).
fn refusal(api: &Api, code: i64, msg: &str) -> ProviderError {
    let error = classify(code, msg);
    if let ProviderError::Transient {
        rate_limited: true,
        retry_after,
        ..
    } = &error
    {
        api.slow_down(*retry_after);
    }
    error
}

/// Whether a task status means done, failed or still going (NOTES.md: the document
/// shows both `succeeded` and `success`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TaskState {
    Done,
    Failed,
    Pending,
}

pub fn task_state(status: &str) -> TaskState {
    match status.trim().to_ascii_lowercase().as_str() {
        "succeeded" | "success" | "succeed" => TaskState::Done,
        "failed" | "error" => TaskState::Failed,
        _ => TaskState::Pending,
    }
}

/// The extension of a result URL's file name, if it names an image format.
fn ext_of_url(url: &str) -> Option<&'static str> {
    let path = url.split(['?', '#']).next().unwrap_or(url);
    let name = path.rsplit('/').next().unwrap_or(path);
    let (_, ext) = name.rsplit_once('.')?;
    match ext.to_ascii_lowercase().as_str() {
        "webp" => Some("webp"),
        "jpg" | "jpeg" => Some("jpg"),
        "png" => Some("png"),
        _ => None,
    }
}

/// Reads the `data` of a progress answer.
pub fn parse_progress(data: &Value, fallback_ext: &str) -> Result<PollOutcome, String> {
    let Some(status) = data.get("status").and_then(Value::as_str) else {
        return Err(format!(
            "progress answer without a status: {}",
            excerpt(data.to_string().as_bytes())
        ));
    };
    Ok(match task_state(status) {
        TaskState::Pending => PollOutcome::Running { next_poll: None },
        TaskState::Failed => {
            let reason = data
                .get("error_reason")
                .and_then(Value::as_str)
                .map(str::trim)
                .filter(|r| !r.is_empty())
                .map_or_else(
                    || format!("dzine reported the task as {status} without a reason"),
                    |r| excerpt(r.as_bytes()),
                );
            PollOutcome::Failed {
                reason,
                permanent: true,
            }
        }
        TaskState::Done => {
            let slots = data
                .get("generate_result_slots")
                .and_then(Value::as_array)
                .ok_or_else(|| {
                    format!(
                        "a finished task without generate_result_slots: {}",
                        excerpt(data.to_string().as_bytes())
                    )
                })?;
            let outputs: Vec<PendingOutput> = slots
                .iter()
                .filter_map(Value::as_str)
                .map(str::trim)
                // Empty slots were not asked for; anything but an http(s) link cannot
                // be fetched (and is not fetched: downloads take http(s) only).
                .filter(|u| util::is_url(u))
                .map(|url| PendingOutput::Url {
                    url: url.to_string(),
                    ext: ext_of_url(url).unwrap_or(fallback_ext).to_string(),
                })
                .collect();
            if outputs.is_empty() {
                PollOutcome::Failed {
                    reason: "dzine reported success but no result slot holds an http(s) link"
                        .into(),
                    permanent: true,
                }
            } else {
                PollOutcome::Succeeded(outputs)
            }
        }
    })
}

/// One face found by `face_detect`: what `create_task_face_swap` takes as a
/// coordinate, kept as the API gave it.
#[derive(Debug, Clone, PartialEq)]
pub struct Face {
    pub bbox: [f64; 4],
    pub kps: Vec<[f64; 2]>,
}

impl Face {
    fn area(&self) -> f64 {
        ((self.bbox[2] - self.bbox[0]) * (self.bbox[3] - self.bbox[1])).abs()
    }

    pub fn to_json(&self) -> Value {
        json!({"bbox": self.bbox, "kps": self.kps})
    }

    pub fn from_json(v: &Value) -> Option<Face> {
        let nums = |v: &Value| -> Option<Vec<f64>> {
            v.as_array()?
                .iter()
                .map(|x| x.as_f64().filter(|f| f.is_finite()))
                .collect()
        };
        let b = nums(v.get("bbox")?)?;
        let bbox: [f64; 4] = b.try_into().ok()?;
        let kps = v
            .get("kps")?
            .as_array()?
            .iter()
            .map(|p| nums(p).and_then(|p| <[f64; 2]>::try_from(p).ok()))
            .collect::<Option<Vec<_>>>()?;
        Some(Face { bbox, kps })
    }
}

/// Reads a `face_detect` answer's data: the faces and the image's `file_path`.
pub fn parse_faces(data: &Value) -> Result<(Vec<Face>, Option<String>), String> {
    let list = data
        .get("face_list")
        .and_then(Value::as_array)
        .ok_or_else(|| {
            format!(
                "face_detect answer without a face_list: {}",
                excerpt(data.to_string().as_bytes())
            )
        })?;
    let faces = list
        .iter()
        .map(|f| {
            Face::from_json(f).ok_or_else(|| {
                format!(
                    "face_detect answer with a malformed face: {}",
                    excerpt(f.to_string().as_bytes())
                )
            })
        })
        .collect::<Result<Vec<_>, _>>()?;
    let path = data
        .get("file_path")
        .and_then(Value::as_str)
        .map(str::trim)
        .filter(|p| util::is_url(p))
        .map(str::to_string);
    Ok((faces, path))
}

/// The face to swap: the one at `index` (the API's order), or the largest.
pub fn select_face(
    faces: &[Face],
    index: Option<usize>,
    which: &str,
    input: &str,
) -> Result<Face, ProviderError> {
    if faces.is_empty() {
        return Err(ProviderError::permanent(format!(
            "dzine found no face in the {which} image ({input})"
        )));
    }
    match index {
        Some(i) => faces.get(i).cloned().ok_or_else(|| {
            ProviderError::permanent(format!(
                "{which}_face_index {i} is out of range: dzine found {} face(s) in the {which} image ({input}), indexes 0 to {}",
                faces.len(),
                faces.len() - 1
            ))
        }),
        None => faces
            .iter()
            .max_by(|a, b| a.area().total_cmp(&b.area()))
            .cloned()
            .ok_or_else(|| ProviderError::permanent("no face")),
    }
}

/// Reads an upload answer's data: the uploaded file's `file_path` URL.
pub fn parse_upload(data: &Value) -> Result<String, ProviderError> {
    data.get("file_path")
        .and_then(Value::as_str)
        .map(str::trim)
        .filter(|p| util::is_url(p))
        .map(str::to_string)
        .ok_or_else(|| {
            ProviderError::transient(format!(
                "upload answer without a file_path URL: {}",
                excerpt(data.to_string().as_bytes())
            ))
        })
}

/// Reads a `create_task_*` answer's data: the `task_id` (text or number). Without
/// one the submission's outcome is unknown.
pub fn parse_task_id(data: &Value) -> Result<String, ProviderError> {
    match data.get("task_id") {
        Some(Value::String(s)) if !s.trim().is_empty() => Ok(s.trim().to_string()),
        Some(Value::Number(n)) => Ok(n.to_string()),
        _ => Err(ProviderError::bad_answer(
            RequestKind::Submit,
            format!(
                "accepted without a task_id: {}",
                excerpt(data.to_string().as_bytes())
            ),
        )),
    }
}

/// Reads a `get_token_balance` answer's data.
pub fn parse_balance(data: &Value) -> Result<Balance, ProviderError> {
    let amount = match data.get("balance") {
        Some(Value::Number(n)) => n.as_f64(),
        Some(Value::String(s)) => s.trim().parse().ok().filter(|x: &f64| x.is_finite()),
        _ => None,
    }
    .ok_or_else(|| {
        ProviderError::transient(format!(
            "balance answer without a balance: {}",
            excerpt(data.to_string().as_bytes())
        ))
    })?;
    Ok(Balance {
        amount,
        unit: "tokens".into(),
    })
}

/// One page of `style/list`: each style with its base model, how many the page
/// listed (entries without a code included), and the `total` if given.
#[derive(Debug, Clone, PartialEq)]
pub struct StylePage {
    pub styles: Vec<(String, StyleEntry)>,
    pub listed: usize,
    pub total: Option<u64>,
}

/// Reads a `style/list` answer's data; entries without a `style_code` are skipped.
pub fn parse_style_page(data: &Value) -> Result<StylePage, ProviderError> {
    let list = data.get("list").and_then(Value::as_array).ok_or_else(|| {
        ProviderError::transient(format!(
            "style list answer without a list: {}",
            excerpt(data.to_string().as_bytes())
        ))
    })?;
    let mut styles = Vec::new();
    for item in list {
        let Some(code) = item.get("style_code").and_then(Value::as_str) else {
            continue;
        };
        let base = item
            .get("base_model")
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_string();
        let mut detail = vec![("base_model".to_string(), base.clone())];
        if let Some(si) = item.get("style_intensity").and_then(Value::as_object) {
            for (k, v) in si {
                detail.push((format!("style_intensity.{k}"), v.to_string()));
            }
        }
        if let Some(c) = item.get("cover_url").and_then(Value::as_str) {
            detail.push(("cover_url".to_string(), c.to_string()));
        }
        let entry = StyleEntry {
            kind: "style",
            id: code.to_string(),
            title: item
                .get("name")
                .and_then(Value::as_str)
                .unwrap_or("")
                .to_string(),
            detail,
        };
        styles.push((base, entry));
    }
    Ok(StylePage {
        styles,
        listed: list.len(),
        total: data.get("total").and_then(Value::as_u64),
    })
}

// ---------------------------------------------------------------------------------
// The adapter
// ---------------------------------------------------------------------------------

pub fn build(config: &ProviderConfig) -> Result<Arc<dyn Provider>, String> {
    let key = config
        .credentials
        .api_key
        .clone()
        .filter(|k| !k.trim().is_empty())
        .ok_or_else(|| {
            "dzine: no API key (set DZINE_API_KEY or [providers.dzine] api_key in the config file)"
                .to_string()
        })?;
    let mut d = Dzine::new(key);
    d.early_not_found = config.early_not_found.unwrap_or(EARLY_NOT_FOUND);
    Ok(Arc::new(d))
}

pub struct Dzine {
    api_key: String,
    /// See [`EARLY_NOT_FOUND`]; the engine counts it from the submission time
    /// recorded in the job.
    early_not_found: Duration,
}

impl std::fmt::Debug for Dzine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Dzine")
            .field("api_key", &"<redacted>")
            .finish()
    }
}

impl Dzine {
    pub fn new(api_key: String) -> Dzine {
        Dzine {
            api_key: api_key.trim().to_string(),
            early_not_found: EARLY_NOT_FOUND,
        }
    }

    fn request(
        &self,
        api: &Api,
        method: Method,
        path: &str,
    ) -> Result<RequestBuilder, ProviderError> {
        let key = util::secret_header("DZINE_API_KEY", &self.api_key)?;
        Ok(api
            .client()
            .request(method, api.url(path))
            .header(reqwest::header::AUTHORIZATION, key))
    }

    /// Sends, reads the envelope and returns its `data`, or the refusal as an error.
    async fn call(
        &self,
        api: &Api,
        kind: RequestKind,
        request: RequestBuilder,
    ) -> Result<Value, ProviderError> {
        match self.call_raw(api, kind, request).await? {
            Envelope::Ok(data) => Ok(data),
            Envelope::Refused { code, msg } => Err(refusal(api, code, &msg)),
        }
    }

    async fn call_raw(
        &self,
        api: &Api,
        kind: RequestKind,
        request: RequestBuilder,
    ) -> Result<Envelope, ProviderError> {
        let response = api.send(kind, request).await?;
        let status = response.status();
        let body = Api::read_bytes(kind, response, MAX_JSON).await?;
        read_envelope(status, &body).map_err(|e| ProviderError::bad_answer(kind, e))
    }

    /// An image as the API's `images` entry: a URL as is, a file as a data URI.
    async fn image_entry(&self, api: &Api, source: &str) -> Result<Value, ProviderError> {
        if util::is_url(source) {
            return Ok(json!({"url": source}));
        }
        let input = util::load_input(api, source, MAX_INPUT_BYTES).await?;
        if let Some(problem) = check_format(source, input.format) {
            return Err(ProviderError::permanent(problem));
        }
        Ok(json!({"base64_data": format!(
            "data:{};base64,{}",
            input.mime(),
            util::encode_base64(&input.bytes)
        )}))
    }

    /// `POST /file/upload` (multipart `file`) → `data.file_path`. The part carries
    /// the local file's name.
    async fn upload(&self, api: &Api, path: &str) -> Result<String, ProviderError> {
        let input = util::load_input(api, path, MAX_INPUT_BYTES).await?;
        if let Some(problem) = check_format(path, input.format) {
            return Err(ProviderError::permanent(problem));
        }
        let name = std::path::Path::new(path)
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| format!("image.{}", input.ext()));
        let len = input.bytes.len() as u64;
        // A fresh form for every attempt: a sent body cannot be replayed.
        let part = Part::stream_with_length(reqwest::Body::from(input.bytes.clone()), len)
            .file_name(name)
            .mime_str(input.mime())
            .map_err(|e| ProviderError::permanent(format!("building the upload: {e}")))?;
        let request = self
            .request(api, Method::POST, "/file/upload")?
            .multipart(Form::new().part("file", part));
        let data = self.call(api, RequestKind::Upload, request).await?;
        parse_upload(&data)
    }

    /// `POST /face_detect` on an image URL, then the face selection. The ref keeps
    /// the face and the image URL to swap with (the detection's `file_path` when it
    /// gives one: the coordinates are relative to the image it saw).
    async fn detect(
        &self,
        api: &Api,
        image_url: &str,
        index: Option<usize>,
        which: &str,
        input: &str,
    ) -> Result<String, ProviderError> {
        let request = self
            .request(api, Method::POST, "/face_detect")?
            .json(&json!({"images": [{"url": image_url}]}));
        let data = self.call(api, RequestKind::Upload, request).await?;
        let (faces, file_path) =
            parse_faces(&data).map_err(|e| ProviderError::bad_answer(RequestKind::Upload, e))?;
        let face = select_face(&faces, index, which, input)?;
        let mut v = face.to_json();
        if let Some(obj) = v.as_object_mut() {
            obj.insert(
                "image".into(),
                Value::String(file_path.unwrap_or_else(|| image_url.to_string())),
            );
        }
        Ok(v.to_string())
    }

    fn face_ref(job: &JobContext<'_>, key: &str) -> Result<(Value, String), ProviderError> {
        let raw = job.prepared_get(key).ok_or_else(|| {
            ProviderError::permanent(format!("face swap submitted before its {key} was detected"))
        })?;
        let v: Value = serde_json::from_str(raw)
            .map_err(|e| ProviderError::permanent(format!("recorded {key} is unreadable: {e}")))?;
        let face = Face::from_json(&v)
            .ok_or_else(|| ProviderError::permanent(format!("recorded {key} is malformed")))?;
        let image = v
            .get("image")
            .and_then(Value::as_str)
            .map(str::to_string)
            .ok_or_else(|| ProviderError::permanent(format!("recorded {key} has no image")))?;
        Ok((face.to_json(), image))
    }
}

fn face_swap_inputs(spec: &JobSpec) -> Result<(&str, &str), ProviderError> {
    match spec.inputs.as_slice() {
        [s, d] if !s.trim().is_empty() && !d.trim().is_empty() => Ok((s.trim(), d.trim())),
        other => Err(ProviderError::permanent(format!(
            "dzine face_swap takes two inputs (source|dest), got {}",
            other.len()
        ))),
    }
}

#[async_trait]
impl Provider for Dzine {
    fn kind(&self) -> ProviderKind {
        ProviderKind::Dzine
    }

    async fn authenticate(&self, _api: &Api) -> Result<(), ProviderError> {
        util::secret_header("DZINE_API_KEY", &self.api_key).map(|_| ())
    }

    async fn prepare(&self, api: &Api, job: &JobContext<'_>) -> Result<Prepared, ProviderError> {
        let plan = Plan::from_spec(job.spec).map_err(|e| ProviderError::permanent(e.join("; ")))?;
        if plan.op != Operation::FaceSwap {
            return Ok(Prepared::done(Vec::new()));
        }
        let (source, dest) = face_swap_inputs(job.spec)?;
        // One stage per call, in this order; each ends with its ref made durable.
        for (key, input) in [(REF_SOURCE_IMAGE, source), (REF_DEST_IMAGE, dest)] {
            if job.prepared_get(key).is_none() {
                let url = if util::is_url(input) {
                    input.to_string()
                } else {
                    self.upload(api, input).await?
                };
                return Ok(Prepared::more(vec![(key.to_string(), url)]));
            }
        }
        let stages = [
            (
                REF_SOURCE_FACE,
                REF_SOURCE_IMAGE,
                plan.source_face_index,
                "source",
                source,
            ),
            (
                REF_DEST_FACE,
                REF_DEST_IMAGE,
                plan.dest_face_index,
                "dest",
                dest,
            ),
        ];
        for (i, (key, image_key, index, which, input)) in stages.into_iter().enumerate() {
            if job.prepared_get(key).is_none() {
                let url = job.prepared_get(image_key).unwrap_or_default().to_string();
                let face = self.detect(api, &url, index, which, input).await?;
                let refs = vec![(key.to_string(), face)];
                return Ok(if i == 0 {
                    Prepared::more(refs)
                } else {
                    Prepared::done(refs)
                });
            }
        }
        Ok(Prepared::done(Vec::new()))
    }

    async fn submit(
        &self,
        api: &Api,
        job: &JobContext<'_>,
    ) -> Result<SubmitOutcome, ProviderError> {
        let plan = Plan::from_spec(job.spec).map_err(|e| ProviderError::permanent(e.join("; ")))?;
        let mut body = plan.body.clone();
        match plan.op {
            Operation::Txt2Img => {}
            Operation::Img2Img | Operation::Upscale => {
                let source = util::single_input(job.spec)?;
                let entry = self.image_entry(api, source).await?;
                body.insert("images".into(), json!([entry]));
            }
            Operation::FaceSwap => {
                let (source_face, source_image) = Self::face_ref(job, REF_SOURCE_FACE)?;
                let (dest_face, dest_image) = Self::face_ref(job, REF_DEST_FACE)?;
                body.insert("source_face_image".into(), json!(source_image));
                body.insert("dest_face_image".into(), json!(dest_image));
                body.insert("source_face_coordinate".into(), source_face);
                body.insert("dest_face_coordinate".into(), dest_face);
            }
        }
        let request = self
            .request(api, Method::POST, plan.op.path())?
            .header("X-Request-Id", job.submit_key.as_str())
            .json(&Value::Object(body));
        let data = self.call(api, RequestKind::Submit, request).await?;
        let task_id = parse_task_id(&data)?;
        Ok(SubmitOutcome::Accepted {
            remote_id: task_id,
            first_poll_after: None,
        })
    }

    async fn poll(
        &self,
        api: &Api,
        job: &JobContext<'_>,
        remote_id: &str,
    ) -> Result<PollOutcome, ProviderError> {
        let path = format!(
            "/get_task_progress/{}",
            url::form_urlencoded::byte_serialize(remote_id.as_bytes()).collect::<String>()
        );
        let request = self.request(api, Method::GET, &path)?;
        match self.call_raw(api, RequestKind::Poll, request).await? {
            // Right after creation this is "not visible yet": the engine polls again
            // while `early_not_found` lasts from the submission (time-based, from the
            // job's record), and only after it is the task lost.
            Envelope::Refused { code: 404, msg } => {
                // Task data lives 2 hours; the task ran (and was billed) before that.
                Ok(PollOutcome::Lost {
                    reason: format!(
                        "dzine no longer finds task {remote_id} ({msg}); task data expires after 2 hours"
                    ),
                    charged: true,
                })
            }
            Envelope::Refused { code, msg } => Err(refusal(api, code, &msg)),
            Envelope::Ok(data) => {
                let fallback = Plan::from_spec(job.spec).map_or("webp", |p| p.fallback_ext);
                parse_progress(&data, fallback)
                    .map_err(|e| ProviderError::bad_answer(RequestKind::Poll, e))
            }
        }
    }

    fn early_not_found(&self) -> Option<Duration> {
        Some(self.early_not_found)
    }

    async fn styles(
        &self,
        api: &Api,
        query: &StyleQuery,
    ) -> Result<Vec<StyleEntry>, ProviderError> {
        let wanted = query
            .base_model
            .as_deref()
            .map(|m| m.trim().to_ascii_uppercase());
        let mut out = Vec::new();
        let mut seen = std::collections::HashSet::new();
        for page in 0..MAX_STYLE_PAGES {
            let request = self.request(
                api,
                Method::GET,
                &format!("/style/list?page_no={page}&page_size={STYLE_PAGE_SIZE}"),
            )?;
            let data = self.call(api, RequestKind::Query, request).await?;
            let page = parse_style_page(&data)?;
            let mut fresh = 0;
            for (base, entry) in page.styles {
                // A server numbering pages from 1 would hand page 1 twice: stop there.
                if !seen.insert(entry.id.clone()) {
                    continue;
                }
                fresh += 1;
                if wanted
                    .as_deref()
                    .is_some_and(|w| !base.eq_ignore_ascii_case(w))
                {
                    continue;
                }
                out.push(entry);
                if query.limit.is_some_and(|l| out.len() >= l) {
                    return Ok(out);
                }
            }
            if fresh == 0
                || page.listed < STYLE_PAGE_SIZE
                || page.total.is_some_and(|t| seen.len() as u64 >= t)
            {
                break;
            }
        }
        Ok(out)
    }

    async fn balance(&self, api: &Api) -> Result<Option<Balance>, ProviderError> {
        let request = self.request(api, Method::GET, "/get_token_balance")?;
        let data = self.call(api, RequestKind::Query, request).await?;
        parse_balance(&data).map(Some)
    }

    async fn check_access(&self, api: &Api) -> Result<String, ProviderError> {
        match self.balance(api).await? {
            Some(b) => Ok(format!("key accepted; balance {} {}", b.amount, b.unit)),
            None => Ok("key accepted".into()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The early-404 window is time-based and at least the 10 s a live client needed
    /// (ten 1 s polls, docs/providers.md "live evidence"); the config overrides it.
    #[test]
    fn early_404_window_default_and_override() {
        assert!(EARLY_NOT_FOUND >= Duration::from_secs(10));
        let mut c = crate::config::Config::load(None, &|_| None)
            .expect("config")
            .provider(ProviderKind::Dzine);
        c.credentials.api_key = Some("k".into());
        assert_eq!(
            build(&c).expect("build").early_not_found(),
            Some(EARLY_NOT_FOUND)
        );
        c.early_not_found = Some(Duration::from_secs(3));
        assert_eq!(
            build(&c).expect("build").early_not_found(),
            Some(Duration::from_secs(3))
        );
    }

    /// A "too many requests" in a 200 envelope pauses the host like an HTTP 429.
    #[test]
    fn an_enveloped_429_slows_the_gate() {
        use std::sync::atomic::{AtomicUsize, Ordering};
        #[derive(Default)]
        struct Counting(AtomicUsize);
        #[async_trait::async_trait]
        impl crate::api::RequestGate for Counting {
            async fn admit(&self, _kind: RequestKind) {}
            fn back_off(&self, _wait: std::time::Duration) {
                self.0.fetch_add(1, Ordering::SeqCst);
            }
        }
        let gate = std::sync::Arc::new(Counting::default());
        let api = Api::new("http://127.0.0.1:9", reqwest::Client::new(), gate.clone());
        assert!(matches!(
            refusal(&api, 429, "Too Many Requests"),
            ProviderError::Transient {
                rate_limited: true,
                ..
            }
        ));
        assert_eq!(gate.0.load(Ordering::SeqCst), 1);
        assert!(matches!(
            refusal(&api, 400, "bad"),
            ProviderError::Permanent(_)
        ));
        assert_eq!(
            gate.0.load(Ordering::SeqCst),
            1,
            "only rate limits slow the gate"
        );
    }

    fn spec(op: &str, inputs: &[&str], prompt: Option<&str>, params: Value) -> JobSpec {
        JobSpec {
            id: "d1".into(),
            provider: ProviderKind::Dzine,
            operation: op.into(),
            inputs: inputs.iter().map(|s| s.to_string()).collect(),
            prompt: prompt.map(str::to_string),
            params_json: params.to_string(),
            output: None,
            metadata: Vec::new(),
        }
    }

    fn has(errors: &[String], needle: &str) -> bool {
        errors.iter().any(|e| e.contains(needle))
    }

    fn txt(params: Value) -> Vec<String> {
        validate(&spec("txt2img", &[], Some("a fox"), params))
    }

    const STYLE: &str = "Style-7feccf2b-f2ad-43a6-89cb-354fb5d928d2";

    #[test]
    fn txt2img_limits() {
        assert_eq!(
            txt(json!({"style_code": STYLE, "target_h": 1024})),
            Vec::<String>::new()
        );
        let e = txt(json!({"style_code": STYLE, "target_h": 1600}));
        assert!(
            has(
                &e,
                "target_h must be an integer from 128 to 1536 (got 1600)"
            ),
            "{e:?}"
        );
        let e = txt(json!({"style_code": STYLE, "target_h": 512, "target_w": 127}));
        assert!(
            has(&e, "target_w must be an integer from 128 to 1536"),
            "{e:?}"
        );
        let e = txt(json!({"target_h": 512}));
        assert!(has(&e, "needs params.style_code"), "{e:?}");
        let e = txt(json!({"style_code": STYLE}));
        assert!(has(&e, "needs params.target_h"), "{e:?}");
        let e = txt(json!({"style_code": STYLE, "target_h": 512, "style_intensity": 0.35}));
        assert!(has(&e, "style_intensity must be one of 0, 0.1"), "{e:?}");
        assert!(has(&e, "nearest allowed: 0.4"), "{e:?}");
        let e = txt(json!({"style_code": STYLE, "target_h": 512, "style_intensity": 1.1}));
        assert!(
            has(&e, "style_intensity must be a number from 0 to 1"),
            "{e:?}"
        );
        let e = txt(json!({"style_code": STYLE, "target_h": 512, "seed": 0}));
        assert!(
            has(&e, "seed must be an integer from 1 to 2147483647"),
            "{e:?}"
        );
        let e = txt(json!({"style_code": STYLE, "target_h": 512, "seed": 2147483648u64}));
        assert!(has(&e, "seed must be"), "{e:?}");
        let e = txt(json!({"style_code": STYLE, "target_h": 512, "quality_mode": 2}));
        assert!(
            has(&e, "quality_mode must be an integer from 0 to 1"),
            "{e:?}"
        );
        let e = txt(json!({"style_code": STYLE, "target_h": 512, "output_format": "png"}));
        assert!(
            has(&e, "output_format must be \"jpeg\" or \"webp\""),
            "{e:?}"
        );
        let e = txt(json!({"style_code": STYLE, "target_h": 512, "stlye_intensity": 0.5}));
        assert!(
            has(
                &e,
                "unknown dzine parameter \"stlye_intensity\" (did you mean \"style_intensity\"?)"
            ),
            "{e:?}"
        );
        let e = validate(&spec(
            "txt2img",
            &[],
            Some(&"x".repeat(801)),
            json!({"style_code": STYLE, "target_h": 512}),
        ));
        assert!(
            has(&e, "prompt is 801 characters long; at most 800"),
            "{e:?}"
        );
        let e = validate(&spec(
            "txt2img",
            &[],
            None,
            json!({"style_code": STYLE, "target_h": 512}),
        ));
        assert!(has(&e, "needs a prompt"), "{e:?}");
        let e = validate(&spec(
            "txt2img",
            &["a.png"],
            Some("x"),
            json!({"style_code": STYLE, "target_h": 512}),
        ));
        assert!(has(&e, "takes no input image"), "{e:?}");
        let e = validate(&spec("txt2vid", &[], Some("x"), json!({})));
        assert!(has(&e, "unknown dzine operation"), "{e:?}");
    }

    #[test]
    fn the_plan_sends_exact_values() {
        let plan = Plan::from_spec(&spec(
            "txt2img",
            &[],
            Some("a fox"),
            json!({"style_code": STYLE, "target_h": "512", "style_intensity": 0.30000000000000004,
                   "generate_slots": [1, 0, 1, 0], "output_format": "JPG", "seed": 7}),
        ))
        .expect("plan");
        assert_eq!(plan.body["style_intensity"], json!(0.3));
        assert_eq!(plan.body["target_h"], json!(512));
        assert_eq!(plan.body["generate_slots"], json!([1, 0, 1, 0]));
        assert_eq!(plan.body["output_format"], json!("jpeg"));
        assert_eq!(plan.body["prompt"], json!("a fox"));
        assert_eq!(plan.fallback_ext, "jpg");
        assert!(
            !plan.body.contains_key("base_model"),
            "pixbatch's own parameter is not sent"
        );
    }

    #[test]
    fn slots_follow_the_base_model() {
        let base = |extra: Value| {
            let mut m = json!({"style_code": STYLE, "target_h": 512});
            if let (Some(o), Some(e)) = (m.as_object_mut(), extra.as_object()) {
                o.extend(e.clone());
            }
            txt(m)
        };
        assert!(base(json!({"generate_slots": [1, 1, 1, 1]})).is_empty());
        assert!(base(json!({"generate_slots": [1, 1]})).is_empty());
        assert!(base(json!({"generate_slots": "[0,1,0,0]"})).is_empty());
        let e = base(json!({"generate_slots": [1, 1, 1, 1], "base_model": "X"}));
        assert!(has(&e, "generate_slots must have 2 entries"), "{e:?}");
        let e = base(json!({"generate_slots": [1, 1], "base_model": "S"}));
        assert!(has(&e, "generate_slots must have 4 entries"), "{e:?}");
        let e = base(json!({"generate_slots": [0, 0, 0, 0]}));
        assert!(has(&e, "turns every slot off"), "{e:?}");
        let e = base(json!({"generate_slots": [2, 1, 1, 1]}));
        assert!(has(&e, "each 0 or 1"), "{e:?}");
        let e = base(json!({"generate_slots": [1, 1, 1]}));
        assert!(has(&e, "must have 4 or 2 entries"), "{e:?}");
    }

    #[test]
    fn inputs_of_img2img_upscale_and_face_swap() {
        let dir = tempfile::tempdir().expect("tempdir");
        let png = dir.path().join("a.png");
        std::fs::write(&png, crate::sim::images::sample_png(20, 20, 1)).expect("write");
        let p = png.to_str().expect("utf8");
        let img =
            |inputs: &[&str], params: Value| validate(&spec("img2img", inputs, Some("x"), params));
        assert!(img(&[p], json!({"style_code": STYLE, "structure_match": 0.8, "color_match": 1, "face_match": true})).is_empty());
        let e = img(&[p], json!({"style_code": STYLE, "structure_match": 0.85}));
        assert!(has(&e, "structure_match must be one of"), "{e:?}");
        let e = img(&["/nonexistent/x.png"], json!({"style_code": STYLE}));
        assert!(has(&e, "does not exist"), "{e:?}");
        let big = dir.path().join("big.png");
        std::fs::write(&big, vec![0u8; 10_000_001]).expect("write");
        let e = img(&[big.to_str().expect("utf8")], json!({"style_code": STYLE}));
        assert!(has(&e, "more than the 10 MB limit"), "{e:?}");
        let e = img(&[p], json!({"style_code": STYLE, "target_h": 512}));
        assert!(has(&e, "unknown dzine parameter \"target_h\""), "{e:?}");

        let up = |params: Value| validate(&spec("upscale", &[p], None, params));
        assert!(up(json!({"upscaling_resize": 1.5, "output_format": "png"})).is_empty());
        assert!(has(
            &up(json!({"upscaling_resize": 2.5})),
            "upscaling_resize must be 1.5, 2, 3 or 4 (got 2.5)"
        ));
        assert!(has(
            &up(json!({"output_format": "webp"})),
            "must be \"jpg\" or \"png\" for upscale"
        ));
        let e = validate(&spec("upscale", &[p], Some("sharper"), json!({})));
        assert!(has(&e, "does not use a prompt"), "{e:?}");

        let fs =
            |inputs: &[&str], params: Value| validate(&spec("face_swap", inputs, None, params));
        assert!(fs(
            &[p, "https://example.com/b.jpg"],
            json!({"source_face_index": 1})
        )
        .is_empty());
        assert!(has(&fs(&[p], json!({})), "takes two inputs"));
        assert!(has(
            &fs(&[p, p], json!({"dest_face_index": -1})),
            "dest_face_index must be an integer from 0"
        ));
        assert!(has(
            &fs(&[p, p], json!({"generate_slots": [1, 1]})),
            "must have 4 entries"
        ));
        let bad = dir.path().join("x.txt");
        std::fs::write(&bad, b"hello").expect("write");
        assert!(has(
            &fs(&[p, bad.to_str().expect("utf8")], json!({})),
            "not an image format"
        ));
    }

    #[test]
    fn requests_per_job_counts_the_face_swap_stages() {
        let fs = spec("face_swap", &["a.png", "https://x/b.png"], None, json!({}));
        assert_eq!(requests_per_job(&fs), 1 + 2 + 1 + 5);
        assert_eq!(
            requests_per_job(&spec("txt2img", &[], Some("x"), json!({}))),
            6
        );
    }

    /// Found by the `dzine` fuzz target: an error status whose body is only blanks
    /// and control characters gave a message of one space.
    #[test]
    fn blank_error_bodies_and_messages_name_the_status() {
        for body in [&b"\0\0 \0\0\0\0"[..], b"   ", b"\x01\x02"] {
            match read_envelope(StatusCode::BAD_GATEWAY, body) {
                Ok(Envelope::Refused { code: 502, msg }) => assert_eq!(msg, "Bad Gateway"),
                other => panic!("{body:?}: {other:?}"),
            }
        }
        match read_envelope(StatusCode::OK, br#"{"code":500,"msg":"\u0001 "}"#) {
            Ok(Envelope::Refused { code: 500, msg }) => assert_eq!(msg, "error code 500"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn envelopes_are_checked() {
        let ok = read_envelope(
            StatusCode::OK,
            br#"{"code":200,"msg":"OK","data":{"task_id":"t"}}"#,
        );
        assert_eq!(ok, Ok(Envelope::Ok(json!({"task_id": "t"}))));
        let refused = read_envelope(
            StatusCode::OK,
            br#"{"code":108005,"msg":"style not usable","data":null}"#,
        );
        assert_eq!(
            refused,
            Ok(Envelope::Refused {
                code: 108005,
                msg: "style not usable".into()
            })
        );
        let as_text = read_envelope(StatusCode::OK, br#"{"code":"401","msg":"bad key"}"#);
        assert_eq!(
            as_text,
            Ok(Envelope::Refused {
                code: 401,
                msg: "bad key".into()
            })
        );
        let http = read_envelope(StatusCode::NOT_FOUND, b"<html>nope</html>");
        assert!(
            matches!(http, Ok(Envelope::Refused { code: 404, .. })),
            "{http:?}"
        );
        let http = read_envelope(
            StatusCode::UNAUTHORIZED,
            br#"{"code":401,"msg":"Unauthorized"}"#,
        );
        assert_eq!(
            http,
            Ok(Envelope::Refused {
                code: 401,
                msg: "Unauthorized".into()
            })
        );
        for garbage in [
            &b"<html>"[..],
            b"",
            b"[]",
            br#"{"msg":"OK"}"#,
            br#"{"code":null}"#,
        ] {
            assert!(
                read_envelope(StatusCode::OK, garbage).is_err(),
                "{:?}",
                String::from_utf8_lossy(garbage)
            );
        }
    }

    #[test]
    fn codes_are_classified() {
        assert!(
            matches!(classify(108005, "x"), ProviderError::Permanent(m) if m.contains("img2img"))
        );
        assert!(
            matches!(classify(401, "x"), ProviderError::Credential(m) if m.contains("DZINE_API_KEY"))
        );
        assert!(matches!(
            classify(402, "no tokens"),
            ProviderError::Permanent(_)
        ));
        assert!(matches!(classify(400, "bad"), ProviderError::Permanent(_)));
        assert!(matches!(
            classify(429, "x"),
            ProviderError::Transient {
                rate_limited: true,
                ..
            }
        ));
        assert!(matches!(
            classify(503, "x"),
            ProviderError::Transient {
                rate_limited: false,
                ..
            }
        ));
        assert!(matches!(
            classify(100001, "server busy, try again"),
            ProviderError::Transient { .. }
        ));
        assert!(matches!(
            classify(100001, "prompt rejected"),
            ProviderError::Permanent(_)
        ));
        assert!(matches!(
            classify(-1, "timeout"),
            ProviderError::Transient { .. }
        ));
    }

    #[test]
    fn statuses_in_every_spelling() {
        for s in ["succeeded", "success", "SUCCEED"] {
            assert_eq!(task_state(s), TaskState::Done, "{s}");
        }
        for s in ["failed", "error"] {
            assert_eq!(task_state(s), TaskState::Failed, "{s}");
        }
        for s in [
            "waiting",
            "in_queue",
            "processing",
            "uploading",
            "something-new",
            "",
        ] {
            assert_eq!(task_state(s), TaskState::Pending, "{s}");
        }
    }

    #[test]
    fn progress_answers_become_outputs() {
        let data = json!({"task_id": "t", "status": "success", "error_reason": "",
            "generate_result_slots": ["", "https://cdn/x/2_output.webp", "https://cdn/x/3_output.JPG?sig=1", "", null]});
        match parse_progress(&data, "webp").expect("parse") {
            PollOutcome::Succeeded(outs) => {
                assert_eq!(outs.len(), 2);
                assert!(
                    matches!(&outs[0], PendingOutput::Url { url, ext } if url.ends_with("2_output.webp") && ext == "webp")
                );
                assert!(matches!(&outs[1], PendingOutput::Url { ext, .. } if ext == "jpg"));
            }
            other => panic!("{other:?}"),
        }
        let no_ext = json!({"status": "succeeded", "generate_result_slots": ["https://cdn/x/out"]});
        assert!(
            matches!(parse_progress(&no_ext, "png"), Ok(PollOutcome::Succeeded(o)) if matches!(&o[0], PendingOutput::Url { ext, .. } if ext == "png"))
        );
        let failed = json!({"status": "failed", "error_reason": "NSFW content", "generate_result_slots": ["", ""]});
        assert!(
            matches!(parse_progress(&failed, "webp"), Ok(PollOutcome::Failed { reason, permanent: true }) if reason == "NSFW content")
        );
        let failed = json!({"status": "error", "error_reason": ""});
        assert!(
            matches!(parse_progress(&failed, "webp"), Ok(PollOutcome::Failed { reason, .. }) if reason.contains("without a reason"))
        );
        let empty = json!({"status": "succeed", "generate_result_slots": ["", ""]});
        assert!(matches!(
            parse_progress(&empty, "webp"),
            Ok(PollOutcome::Failed { .. })
        ));
        let running = json!({"status": "in_queue", "generate_result_slots": ["", ""]});
        assert!(matches!(
            parse_progress(&running, "webp"),
            Ok(PollOutcome::Running { .. })
        ));
        assert!(parse_progress(&json!({"status": "success"}), "webp").is_err());
        assert!(parse_progress(&json!({"state": "success"}), "webp").is_err());
        assert!(parse_progress(&json!(null), "webp").is_err());
    }

    fn face(x1: f64, y1: f64, x2: f64, y2: f64) -> Value {
        json!({"bbox": [x1, y1, x2, y2], "kps": [[1.0, 2.0], [3.0, 4.0], [5.0, 6.0], [7.0, 8.0], [9.0, 10.0]]})
    }

    #[test]
    fn faces_are_read_and_selected() {
        let data = json!({"file_path": "https://cdn/f.webp", "face_list": [face(0.0, 0.0, 10.0, 10.0), face(20.0, 20.0, 60.0, 70.0), face(0.0, 0.0, 5.0, 5.0)]});
        let (faces, path) = parse_faces(&data).expect("faces");
        assert_eq!(path.as_deref(), Some("https://cdn/f.webp"));
        assert_eq!(faces.len(), 3);
        assert_eq!(
            select_face(&faces, None, "source", "a.png")
                .expect("largest")
                .bbox,
            [20.0, 20.0, 60.0, 70.0]
        );
        assert_eq!(
            select_face(&faces, Some(2), "source", "a.png")
                .expect("index")
                .bbox,
            [0.0, 0.0, 5.0, 5.0]
        );
        let e = select_face(&faces, Some(3), "dest", "b.png").expect_err("range");
        assert_eq!(e, ProviderError::permanent("dest_face_index 3 is out of range: dzine found 3 face(s) in the dest image (b.png), indexes 0 to 2"));
        let e = select_face(&[], None, "source", "a.png").expect_err("none");
        assert_eq!(
            e,
            ProviderError::permanent("dzine found no face in the source image (a.png)")
        );
        let round = Face::from_json(&faces[1].to_json()).expect("round trip");
        assert_eq!(round, faces[1]);
        assert!(parse_faces(&json!({"face_list": [{"bbox": [1, 2, 3]}]})).is_err());
        assert!(
            parse_faces(&json!({"face_list": [{"bbox": [1, 2, 3, 4], "kps": [[1]]}]})).is_err()
        );
        assert!(parse_faces(&json!({})).is_err());
        assert_eq!(
            parse_faces(&json!({"face_list": []}))
                .expect("empty")
                .0
                .len(),
            0
        );
    }
}

/// The adapter against the built-in simulator (`crate::sim`).
#[cfg(test)]
mod sim_tests {
    use std::time::Duration;

    use super::*;

    async fn sim() -> (crate::sim::SimHandle, Api) {
        let (sim, api) = crate::providers::sim_api(
            crate::model::ProviderKind::Dzine,
            Duration::from_millis(100),
        )
        .await;
        (sim, api)
    }

    fn job(op: &str, inputs: Vec<String>, prompt: Option<&str>, params: Value) -> JobSpec {
        JobSpec {
            id: "d1".into(),
            provider: ProviderKind::Dzine,
            operation: op.into(),
            inputs,
            prompt: prompt.map(str::to_string),
            params_json: params.to_string(),
            output: None,
            metadata: Vec::new(),
        }
    }

    async fn poll_to_end(d: &Dzine, api: &Api, spec: &JobSpec, id: &str) -> PollOutcome {
        let ctx = JobContext {
            spec,
            submit_key: "d1~1".into(),
            submission: 1,
            prepared: &[],
        };
        let started = std::time::Instant::now();
        for _ in 0..100 {
            match d.poll(api, &ctx, id).await.expect("poll") {
                PollOutcome::Running { .. } => tokio::time::sleep(Duration::from_millis(40)).await,
                // As the engine does: "lost" inside the early window is "not yet".
                PollOutcome::Lost { .. } if started.elapsed() < d.early_not_found => {
                    tokio::time::sleep(Duration::from_millis(40)).await
                }
                other => return other,
            }
        }
        panic!("task {id} never finished")
    }

    #[tokio::test]
    async fn styles_follow_every_page_and_filter_by_model() {
        let (sim, api) = sim().await;
        let d = Dzine::new("k".into());
        let all = d
            .styles(&api, &StyleQuery::default())
            .await
            .expect("styles");
        assert_eq!(all.len(), 120, "all pages of 50");
        assert_eq!(all[0].id, "Style-7feccf2b-f2ad-43a6-89cb-354fb5d928d2");
        assert_eq!(all[0].title, "No Style v2");
        assert_eq!(
            all[0].detail[0],
            ("base_model".to_string(), "S".to_string())
        );
        let x = d
            .styles(
                &api,
                &StyleQuery {
                    base_model: Some("x".into()),
                    ..StyleQuery::default()
                },
            )
            .await
            .expect("x styles");
        assert!(!x.is_empty() && x.len() < all.len());
        assert!(x.iter().all(|e| e.detail[0].1 == "X"));
        let few = d
            .styles(
                &api,
                &StyleQuery {
                    limit: Some(7),
                    ..StyleQuery::default()
                },
            )
            .await
            .expect("limited");
        assert_eq!(few.len(), 7);
        let e = Dzine::new("invalid-key".into())
            .styles(&api, &StyleQuery::default())
            .await
            .expect_err("bad key");
        assert!(
            matches!(&e, ProviderError::Credential(m) if m.contains("401") && m.contains("DZINE_API_KEY")),
            "{e:?}"
        );
        let _ = sim.shutdown().await;
    }

    #[tokio::test]
    async fn the_balance_falls_as_tasks_succeed() {
        let (sim, api) = sim().await;
        let d = Dzine::new("k".into());
        let start = d.balance(&api).await.expect("balance").expect("some");
        assert_eq!(
            start,
            Balance {
                amount: 10_000.0,
                unit: "tokens".into()
            }
        );
        let spec = job(
            "txt2img",
            vec![],
            Some("a fox"),
            json!({"style_code": "Style-7feccf2b-f2ad-43a6-89cb-354fb5d928d2", "target_h": 128, "generate_slots": [1, 1, 0, 0]}),
        );
        let ctx = JobContext {
            spec: &spec,
            submit_key: "d1~1".into(),
            submission: 1,
            prepared: &[],
        };
        let SubmitOutcome::Accepted { remote_id, .. } = d.submit(&api, &ctx).await.expect("submit")
        else {
            panic!("not async")
        };
        match poll_to_end(&d, &api, &spec, &remote_id).await {
            PollOutcome::Succeeded(outs) => assert_eq!(outs.len(), 2),
            other => panic!("{other:?}"),
        }
        let after = d.balance(&api).await.expect("balance").expect("some");
        assert_eq!(after.amount, 9_998.0, "one token per image");
        let _ = sim.shutdown().await;
    }

    #[tokio::test]
    async fn face_swap_runs_its_stages_and_refuses_an_image_without_a_face() {
        let (sim, api) = sim().await;
        let d = Dzine::new("k".into());
        let dir = tempfile::tempdir().expect("tempdir");
        let write = |name: &str| {
            let p = dir.path().join(name);
            std::fs::write(&p, crate::sim::images::sample_png(80, 100, 3)).expect("write");
            p.to_string_lossy().into_owned()
        };
        let (src, dst, none) = (write("me.png"), write("twofaces.png"), write("noface.png"));

        let spec = job(
            "face_swap",
            vec![src.clone(), dst],
            None,
            json!({"generate_slots": [1, 0, 0, 1]}),
        );
        let mut refs: Vec<(String, String)> = Vec::new();
        let mut stages = 0;
        loop {
            let ctx = JobContext {
                spec: &spec,
                submit_key: "d1~1".into(),
                submission: 1,
                prepared: &refs,
            };
            let p = d.prepare(&api, &ctx).await.expect("prepare");
            stages += 1;
            assert_eq!(p.refs.len(), 1, "one ref per stage");
            refs.extend(p.refs);
            if p.done {
                break;
            }
        }
        assert_eq!(stages, 4);
        let dest_face: Value = serde_json::from_str(&refs[3].1).expect("json ref");
        // Two faces in the destination: the larger (right) one is chosen by default.
        assert!(
            dest_face["bbox"][0].as_f64().expect("x1") > 30.0,
            "{dest_face}"
        );
        let ctx = JobContext {
            spec: &spec,
            submit_key: "d1~1".into(),
            submission: 1,
            prepared: &refs,
        };
        let SubmitOutcome::Accepted { remote_id, .. } = d.submit(&api, &ctx).await.expect("submit")
        else {
            panic!("not async")
        };
        match poll_to_end(&d, &api, &spec, &remote_id).await {
            PollOutcome::Succeeded(outs) => assert_eq!(outs.len(), 2),
            other => panic!("{other:?}"),
        }

        let spec = job("face_swap", vec![src, none], None, json!({}));
        let mut refs: Vec<(String, String)> = Vec::new();
        let err = loop {
            let ctx = JobContext {
                spec: &spec,
                submit_key: "d1~1".into(),
                submission: 1,
                prepared: &refs,
            };
            match d.prepare(&api, &ctx).await {
                Ok(p) => refs.extend(p.refs),
                Err(e) => break e,
            }
        };
        assert!(
            matches!(&err, ProviderError::Permanent(m) if m.contains("no face in the dest image")),
            "{err:?}"
        );
        let _ = sim.shutdown().await;
    }

    #[tokio::test]
    async fn refusals_failures_and_lost_tasks() {
        let (sim, api) = sim().await;
        let d = Dzine::new("k".into());
        let style = "Style-7feccf2b-f2ad-43a6-89cb-354fb5d928d2";
        let submit = |prompt: &str| {
            job(
                "txt2img",
                vec![],
                Some(prompt),
                json!({"style_code": style, "target_h": 128, "generate_slots": [1, 0, 0, 0]}),
            )
        };

        let spec = submit("a fox sim-code:108005");
        let ctx = JobContext {
            spec: &spec,
            submit_key: "d1~1".into(),
            submission: 1,
            prepared: &[],
        };
        let e = d.submit(&api, &ctx).await.expect_err("code");
        assert!(
            matches!(&e, ProviderError::Permanent(m) if m.contains("108005")),
            "{e:?}"
        );

        let spec = submit("a fox sim-fail");
        let ctx = JobContext {
            spec: &spec,
            submit_key: "d1~1".into(),
            submission: 1,
            prepared: &[],
        };
        let SubmitOutcome::Accepted { remote_id, .. } = d.submit(&api, &ctx).await.expect("submit")
        else {
            panic!()
        };
        assert!(
            matches!(poll_to_end(&d, &api, &spec, &remote_id).await, PollOutcome::Failed { reason, permanent: true } if reason.contains("simulated failure"))
        );

        let spec = submit("a fox sim-expire");
        let ctx = JobContext {
            spec: &spec,
            submit_key: "d1~1".into(),
            submission: 1,
            prepared: &[],
        };
        let SubmitOutcome::Accepted { remote_id, .. } = d.submit(&api, &ctx).await.expect("submit")
        else {
            panic!()
        };
        // A 404 is "lost" to the adapter; the engine applies the early window
        // (`early_not_found`, engine::step).
        assert_eq!(d.early_not_found(), Some(EARLY_NOT_FOUND));
        assert!(matches!(
            d.poll(&api, &ctx, &remote_id).await,
            Ok(PollOutcome::Lost { charged: true, .. })
        ));
        // The same prompt again lives: the trigger fires once.
        let SubmitOutcome::Accepted { remote_id, .. } = d.submit(&api, &ctx).await.expect("submit")
        else {
            panic!()
        };
        assert!(matches!(
            poll_to_end(&d, &api, &spec, &remote_id).await,
            PollOutcome::Succeeded(_)
        ));

        // An X style cannot be used for img2img (108005), permanent.
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path().join("in.png");
        std::fs::write(&p, crate::sim::images::sample_png(40, 40, 1)).expect("write");
        let spec = job(
            "img2img",
            vec![p.to_string_lossy().into_owned()],
            Some("x"),
            json!({"style_code": "Style-3a9f1c2e-5b7d-4e8a-9c01-2f6d8b4e7a15", "base_model": "X", "generate_slots": [1, 1]}),
        );
        assert!(validate(&spec).is_empty(), "{:?}", validate(&spec));
        let ctx = JobContext {
            spec: &spec,
            submit_key: "d1~1".into(),
            submission: 1,
            prepared: &[],
        };
        let e = d.submit(&api, &ctx).await.expect_err("108005");
        assert!(
            matches!(&e, ProviderError::Permanent(m) if m.contains("108005")),
            "{e:?}"
        );
        let _ = sim.shutdown().await;
    }
}
