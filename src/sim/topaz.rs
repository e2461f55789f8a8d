//! Topaz Image API (`topaz.txt`), served under `/topaz/image/v1`, with its presigned file
//! host under `/topaz/_files`.
//!
//! Tasks live in memory. Their status is a function of time since submission: `Pending`
//! for the first fifth of `task_duration`, then `Processing` with rising progress, then
//! `Completed` (or `Failed` when the prompt asked for it with `sim-fail`), unless
//! cancelled first. The output image is made at submission, so the bytes a task will
//! serve are fixed from the moment it is accepted.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::Request;
use axum::http::{header, HeaderName, Method, StatusCode};
use serde_json::{json, Map, Value};

use super::form::{self, parse, Form};
use super::images::{self, Fit, Format};
use super::presign::{self, public_host, xml_err};
use super::{header_str, key_ok, lock, unix_ms, Ctx, Reply, Route, Shared};

/// Keys starting with this go in `Authorization: Bearer` (topaz.txt, "Uncommon").
pub(crate) const LEGACY_PREFIX: &str = "eyJhbGciOiJSUzI1NiIsInR5cCI6IkpXVCJ9.eyJtYWNoaW5lX2lkIjoi";

const API: &str = "/image/v1";
const FILES: &str = "/_files/";

/// The models the current reference pages list per route (docs/providers.md, "Topaz
/// live evidence"); any other model is refused with 400, before any charge, as the
/// live API does.
const ENHANCE_MODELS: [&str; 6] = [
    "Standard V2",
    "Low Resolution V2",
    "CGI",
    "High Fidelity V2",
    "Text Refine",
    "Upscale High Fidelity V3",
];
const GEN_MODELS: [&str; 11] = [
    "Redefine",
    "Recovery",
    "Recovery V2",
    "Standard MAX",
    "Wonder",
    "Wonder 2",
    "Wonder 3",
    "Wonder 3.5",
    "Recover 3",
    "Bloom 2",
    "Bloom Realism",
];

/// Output limits per endpoint (topaz.txt), in pixels.
const SYNC_MAX_PIXELS: u64 = 96_000_000;
const ASYNC_MAX_PIXELS: u64 = 512_000_000;
const GEN_MAX_PIXELS: u64 = 256_000_000;
const RECOVERY_MAX_INPUT_PIXELS: u64 = 16_000_000;
/// One credit per started block of this many output pixels (enhance); gen costs 4x.
const PIXELS_PER_CREDIT: u64 = 24_000_000;
const GEN_CREDIT_FACTOR: u64 = 4;

const X_PROCESS_ID: HeaderName = HeaderName::from_static("x-process-id");
const X_ETA: HeaderName = HeaderName::from_static("x-eta");

// ---------------------------------------------------------------------------------------
// State

#[derive(Default)]
pub(crate) struct TopazState {
    tasks: Mutex<HashMap<String, Task>>,
    /// Request keys of deleted tasks, so later requests about them still map to a job.
    deleted: Mutex<HashMap<String, Option<String>>>,
    /// Creation order for `GET /status`.
    next_order: AtomicU64,
    /// Credits of every accepted submission, for `GET /account/v1/credits/balance`.
    spent: AtomicU64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Status {
    Pending,
    Processing,
    Completed,
    Cancelled,
    Failed,
}

impl Status {
    fn name(self) -> &'static str {
        match self {
            Status::Pending => "Pending",
            Status::Processing => "Processing",
            Status::Completed => "Completed",
            Status::Cancelled => "Cancelled",
            Status::Failed => "Failed",
        }
    }

    fn finished(self) -> bool {
        !matches!(self, Status::Pending | Status::Processing)
    }
}

#[derive(Debug)]
struct Output {
    bytes: Bytes,
    sha256: String,
    format: Format,
}

#[derive(Debug)]
struct Task {
    order: u64,
    process_id: String,
    request_key: Option<String>,
    filename: String,
    input_format: &'static str,
    input_width: u32,
    input_height: u32,
    output_format: String,
    output_width: u32,
    output_height: u32,
    model: String,
    /// The URL Topaz was asked to fetch the input from, instead of an uploaded file.
    source_url: Option<String>,
    face_enhancement: bool,
    crop_to_fill: bool,
    options_json: Option<String>,
    sync: bool,
    category: &'static str,
    credits: u64,
    created: Instant,
    created_unix_ms: u64,
    /// (when, progress at that moment)
    cancelled: Option<(u64, u8)>,
    /// Ends `Failed` instead of `Completed` (prompt contained `sim-fail`).
    fails: bool,
    output: Arc<Output>,
}

impl Task {
    /// Status, progress and modification time (Unix ms) at `now`.
    fn state(&self, now: Instant, d: Duration) -> (Status, u8, u64) {
        if let Some((at, progress)) = self.cancelled {
            return (Status::Cancelled, progress, at);
        }
        let elapsed = now.saturating_duration_since(self.created);
        let d_ms = d.as_millis() as u64;
        if elapsed >= d {
            let status = if self.fails {
                Status::Failed
            } else {
                Status::Completed
            };
            return (status, 100, self.created_unix_ms + d_ms);
        }
        if elapsed < d / 5 {
            return (Status::Pending, 0, self.created_unix_ms);
        }
        let pct = (elapsed.as_secs_f64() / d.as_secs_f64() * 100.0) as u8;
        (
            Status::Processing,
            pct.clamp(1, 99),
            self.created_unix_ms + d_ms / 5,
        )
    }

    fn eta(&self, d: Duration) -> u64 {
        (self.created_unix_ms + d.as_millis() as u64).div_ceil(1000)
    }

    fn json(&self, now: Instant, d: Duration) -> Value {
        let (status, progress, modified) = self.state(now, d);
        let mut m = Map::new();
        m.insert("process_id".into(), json!(self.process_id));
        m.insert("filename".into(), json!(self.filename));
        if let Some(u) = &self.source_url {
            m.insert("source_url".into(), json!(u));
        }
        m.insert("input_format".into(), json!(self.input_format));
        m.insert("input_height".into(), json!(self.input_height));
        m.insert("input_width".into(), json!(self.input_width));
        m.insert("output_format".into(), json!(self.output_format));
        m.insert("output_height".into(), json!(self.output_height));
        m.insert("output_width".into(), json!(self.output_width));
        m.insert("model".into(), json!(self.model));
        m.insert("face_enhancement".into(), json!(self.face_enhancement));
        m.insert("crop_to_fill".into(), json!(self.crop_to_fill));
        if let Some(o) = &self.options_json {
            m.insert("options_json".into(), json!(o));
        }
        m.insert("sync".into(), json!(self.sync));
        m.insert("status".into(), json!(status.name()));
        m.insert("progress".into(), json!(progress));
        m.insert("eta".into(), json!(self.eta(d)));
        m.insert("creation_time".into(), json!(self.created_unix_ms / 1000));
        m.insert("modification_time".into(), json!(modified / 1000));
        m.insert("credits".into(), json!(self.credits));
        // Newer API versions add fields; clients must ignore what they do not know.
        m.insert("category".into(), json!(self.category));
        Value::Object(m)
    }
}

// ---------------------------------------------------------------------------------------
// Routing, auth, error shapes

pub(crate) fn route(method: &Method, rest: &str) -> Route {
    if let Some(id) = rest.strip_prefix(FILES) {
        if !id.is_empty() && !id.contains('/') {
            return match *method {
                Method::GET => Route::api("file").unmetered().image().about(id),
                Method::HEAD => Route::api("file_head").unmetered().about(id),
                _ => Route::api("unknown").unmetered().about(id),
            };
        }
        return Route::api("unknown").unmetered();
    }
    // The Account API, beside the Image API on the same host.
    if rest == "/account/v1/credits/balance" {
        return match *method {
            Method::GET => Route::api("credits_balance"),
            _ => Route::api("unknown"),
        };
    }
    let Some(p) = rest.strip_prefix(API) else {
        return Route::api("unknown");
    };
    match (method.clone(), p) {
        (Method::POST, "/enhance") => return Route::api("enhance_sync").image(),
        (Method::POST, "/enhance/async") => return Route::api("enhance_async"),
        (Method::POST, "/enhance-gen/async") => return Route::api("enhance_gen_async"),
        (Method::POST, "/sharpen") => return Route::api("sharpen_sync").image(),
        (Method::POST, "/sharpen/async") => return Route::api("sharpen_async"),
        (Method::POST, "/sharpen-gen/async") => return Route::api("sharpen_gen_async"),
        (Method::POST, "/denoise") => return Route::api("denoise_sync").image(),
        (Method::POST, "/denoise/async") => return Route::api("denoise_async"),
        (Method::POST, "/restore-gen/async") => return Route::api("restore_gen_async"),
        (Method::POST, "/lighting") => return Route::api("lighting_sync").image(),
        (Method::POST, "/lighting/async") => return Route::api("lighting_async"),
        (Method::GET, "/status") => return Route::api("status_all"),
        (Method::POST, "/estimate") => return Route::api("estimate"),
        (Method::POST, "/estimate-gen") => return Route::api("estimate_gen"),
        _ => {}
    }
    let id_after = |prefix: &str| {
        p.strip_prefix(prefix)
            .filter(|id| !id.is_empty() && !id.contains('/'))
    };
    if let Some(id) = id_after("/status/") {
        return match *method {
            Method::GET => Route::api("status").about(id),
            Method::DELETE => Route::api("status_delete").about(id),
            _ => Route::api("unknown").about(id),
        };
    }
    if let Some(id) = id_after("/download/") {
        if *method == Method::GET {
            return Route::api("download").about(id);
        }
        return Route::api("unknown").about(id);
    }
    if let Some(id) = id_after("/cancel/") {
        if *method == Method::DELETE {
            return Route::api("cancel").about(id);
        }
        return Route::api("unknown").about(id);
    }
    Route::api("unknown")
}

/// A known API path asked with the wrong method.
fn known_api_path(rest: &str) -> bool {
    let Some(p) = rest.strip_prefix(API) else {
        return false;
    };
    matches!(
        p,
        "/enhance"
            | "/enhance/async"
            | "/enhance-gen/async"
            | "/sharpen"
            | "/sharpen/async"
            | "/sharpen-gen/async"
            | "/denoise"
            | "/denoise/async"
            | "/restore-gen/async"
            | "/lighting"
            | "/lighting/async"
            | "/status"
            | "/estimate"
            | "/estimate-gen"
    ) || ["/status/", "/download/", "/cancel/"].iter().any(|pre| {
        p.strip_prefix(pre)
            .is_some_and(|id| !id.is_empty() && !id.contains('/'))
    })
}

pub(crate) fn request_key_hint(s: &Shared, route: &Route) -> Option<String> {
    let id = route.remote_id.as_deref()?;
    if let Some(t) = lock(&s.topaz.tasks).get(id) {
        return t.request_key.clone();
    }
    lock(&s.topaz.deleted).get(id).cloned().flatten()
}

fn err(status: StatusCode, message: &str) -> Reply {
    Reply::json(
        status,
        &json!({"code": status.as_u16(), "message": message}),
    )
}

fn bad(message: &str) -> Reply {
    err(StatusCode::BAD_REQUEST, message)
}

fn unauthorized() -> Reply {
    err(StatusCode::UNAUTHORIZED, "Unauthorized")
}

pub(crate) fn too_many(route: &Route) -> Reply {
    if !route.metered {
        return xml_err(
            StatusCode::TOO_MANY_REQUESTS,
            "SlowDown",
            "Please reduce your request rate.",
        );
    }
    err(StatusCode::TOO_MANY_REQUESTS, "Too Many Requests")
}

pub(crate) fn server_error(route: &Route, status: StatusCode) -> Reply {
    if !route.metered {
        return match status {
            StatusCode::SERVICE_UNAVAILABLE => xml_err(
                status,
                "ServiceUnavailable",
                "Service is unable to handle request.",
            ),
            _ => xml_err(
                status,
                "InternalError",
                "We encountered an internal error. Please try again.",
            ),
        };
    }
    match status {
        StatusCode::SERVICE_UNAVAILABLE => err(status, "Service Unavailable"),
        _ => err(
            status,
            "An internal server error occurred. Please try again later. If the problem persists, please contact support.",
        ),
    }
}

pub(crate) fn authorize(s: &Shared, ctx: &Ctx, req: &Request) -> Result<(), Reply> {
    if !ctx.route.metered {
        // The file host: the signature is the credential.
        return match ctx.route.endpoint {
            "file" => check_presigned(s, ctx, req, "GET"),
            "file_head" => check_presigned(s, ctx, req, "HEAD"),
            _ => Ok(()),
        };
    }
    let headers = req.headers();
    if let Some(v) = headers.get("x-api-key") {
        let ok = v
            .to_str()
            .is_ok_and(|k| key_ok(k) && !k.starts_with(LEGACY_PREFIX));
        return if ok { Ok(()) } else { Err(unauthorized()) };
    }
    if let Some(key) = header_str(headers, "authorization").and_then(|a| a.strip_prefix("Bearer "))
    {
        if key.starts_with(LEGACY_PREFIX) && key_ok(key) {
            return Ok(());
        }
    }
    Err(unauthorized())
}

fn check_presigned(s: &Shared, ctx: &Ctx, req: &Request, method: &str) -> Result<(), Reply> {
    let id = ctx.route.remote_id.as_deref().unwrap_or("");
    presign::check(s, req, "topaz", method, id)
}

// ---------------------------------------------------------------------------------------
// Handlers

pub(crate) async fn handle(s: &Arc<Shared>, ctx: &Ctx, req: Request) -> Reply {
    match ctx.route.endpoint {
        "enhance_sync" => submit(s, ctx, req, Kind::Sync).await,
        "enhance_async" => submit(s, ctx, req, Kind::Async).await,
        "enhance_gen_async" => submit(s, ctx, req, Kind::Gen).await,
        "sharpen_sync" => submit_filter(s, ctx, req, Kind::Sync, "sharpen-sync").await,
        "sharpen_async" => submit_filter(s, ctx, req, Kind::Async, "sharpen").await,
        "sharpen_gen_async" => submit_filter(s, ctx, req, Kind::Gen, "sharpen-gen").await,
        "denoise_sync" => submit_filter(s, ctx, req, Kind::Sync, "denoise-sync").await,
        "denoise_async" => submit_filter(s, ctx, req, Kind::Async, "denoise").await,
        "restore_gen_async" => submit_filter(s, ctx, req, Kind::Gen, "restore-gen").await,
        "lighting_sync" => submit_filter(s, ctx, req, Kind::Sync, "lighting-sync").await,
        "lighting_async" => submit_filter(s, ctx, req, Kind::Async, "lighting").await,
        "status_all" => status_all(s, &req),
        "credits_balance" => credits_balance(s),
        "status" => with_task(s, ctx, |t, now, d| {
            Reply::json(StatusCode::OK, &t.json(now, d))
        }),
        "status_delete" => delete_status(s, ctx),
        "download" => download(s, ctx, &req),
        "cancel" => cancel(s, ctx),
        "estimate" => estimate(s, req, false).await,
        "estimate_gen" => estimate(s, req, true).await,
        "file" | "file_head" => file(s, ctx, &req),
        _ => {
            let rest = req.uri().path().strip_prefix("/topaz").unwrap_or_default();
            if !ctx.route.metered {
                if ctx.route.remote_id.is_some() {
                    return xml_err(
                        StatusCode::METHOD_NOT_ALLOWED,
                        "MethodNotAllowed",
                        "The specified method is not allowed against this resource.",
                    );
                }
                return xml_err(
                    StatusCode::NOT_FOUND,
                    "NoSuchKey",
                    "The specified key does not exist.",
                );
            }
            if known_api_path(rest) {
                err(StatusCode::METHOD_NOT_ALLOWED, "Method Not Allowed")
            } else {
                err(StatusCode::NOT_FOUND, "Not Found")
            }
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Sync,
    Async,
    Gen,
}

/// The validated parameters common to submissions and estimates.
#[derive(Debug)]
struct Params {
    model: String,
    output_width: Option<u32>,
    output_height: Option<u32>,
    /// As asked (`jpeg`, `jpg`, `png`), echoed in the status.
    output_format: String,
    format: Format,
    crop_to_fill: bool,
    face_enhancement: bool,
    options_json: Option<String>,
    /// The raw prompt (only `Redefine` uses it; the simulator reads `sim-fail` from it).
    prompt: Option<String>,
    /// Sharpen, denoise, restore, lighting: the output keeps the input's size.
    same_size: bool,
    /// What the status calls the task (`Enhance`, `Sharpen` …).
    category: &'static str,
}

fn text<'a>(form: &'a Form, name: &str) -> Result<Option<&'a str>, Reply> {
    form.text(name).map_err(|m| bad(&m))
}

fn parse_params(form: &Form, gen: bool) -> Result<Params, Reply> {
    let models: &[&str] = if gen { &GEN_MODELS } else { &ENHANCE_MODELS };
    let model = match text(form, "model")? {
        None => models[0].to_string(),
        Some(m) if models.contains(&m) => m.to_string(),
        Some(m) => {
            return Err(bad(&format!(
                "Invalid model {:?}. Valid models for this endpoint: {}.",
                truncate_chars(m, 64),
                models.join(", ")
            )))
        }
    };
    let dim = |name: &str, what: &str| -> Result<Option<u32>, Reply> {
        match text(form, name)? {
            None => Ok(None),
            Some(v) => parse::int_in(v, 1, 32000)
                .map(|n| Some(n as u32))
                .ok_or_else(|| bad(&format!("Invalid output {what}."))),
        }
    };
    let output_height = dim("output_height", "height")?;
    let output_width = dim("output_width", "width")?;
    let (output_format, format) = match text(form, "output_format")? {
        None => ("jpeg".to_string(), Format::Jpeg),
        Some(f @ ("jpeg" | "jpg")) => (f.to_string(), Format::Jpeg),
        Some("png") => ("png".to_string(), Format::Png),
        Some("tiff" | "tif") => {
            return Err(bad(
                "Invalid output format: the simulator does not produce tiff (use jpeg or png).",
            ))
        }
        Some(_) => {
            return Err(bad(
                "Invalid output format. Valid formats: jpeg, jpg, png, tiff, tif.",
            ))
        }
    };
    let flag = |name: &str, default: bool| -> Result<bool, Reply> {
        match text(form, name)? {
            None => Ok(default),
            Some(v) => parse::boolean(v)
                .ok_or_else(|| bad(&format!("Invalid {name}: expected true or false."))),
        }
    };
    let crop_to_fill = flag("crop_to_fill", false)?;
    let face_enhancement = flag("face_enhancement", true)?;
    let decimal = |name: &str| -> Result<(), Reply> {
        match text(form, name)? {
            Some(v) if parse::dec_in(v, 0.0, 1.0).is_none() => Err(bad(&format!(
                "Invalid {name}: expected a decimal from 0 to 1."
            ))),
            _ => Ok(()),
        }
    };
    for name in [
        "face_enhancement_strength",
        "face_enhancement_creativity",
        "denoise",
        "sharpen",
        "fix_compression",
    ] {
        decimal(name)?;
    }
    // "required if face_enhancement=true" (the model pages): only when asked for
    // explicitly, since face enhancement is on by default.
    if text(form, "face_enhancement")?.is_some()
        && face_enhancement
        && text(form, "face_enhancement_strength")?.is_none()
    {
        return Err(bad(
            "face_enhancement_strength is required when face_enhancement is true.",
        ));
    }
    if let Some(v) = text(form, "strength")? {
        if parse::dec_in(v, 0.01, 1.0).is_none() {
            return Err(bad("Invalid strength: expected a decimal from 0.01 to 1."));
        }
    }
    if let Some(v) = text(form, "subject_detection")? {
        if !["foreground", "background", "all"].contains(&v) {
            return Err(bad(
                "Invalid subject_detection: expected foreground, background or all.",
            ));
        }
    }
    if let Some(v) = text(form, "autoprompt")? {
        if parse::boolean(v).is_none() {
            return Err(bad("Invalid autoprompt: expected true or false."));
        }
    }
    if let Some(v) = text(form, "detail")? {
        if parse::boolean(v).is_none() && parse::dec_in(v, 0.0, 1.0).is_none() {
            return Err(bad(
                "Invalid detail: expected true, false or a decimal from 0 to 1.",
            ));
        }
    }
    let integer = |name: &str, max: i64| -> Result<(), Reply> {
        match text(form, name)? {
            Some(v) if parse::int_in(v, 1, max).is_none() => Err(bad(&format!(
                "Invalid {name}: expected an integer from 1 to {max}."
            ))),
            _ => Ok(()),
        }
    };
    // 1-9 on the current enhance-gen route, 1-4 on Bloom Realism (the model pages).
    integer("creativity", if model == "Bloom Realism" { 4 } else { 9 })?;
    integer("texture", 5)?;
    let prompt = text(form, "prompt")?.map(str::to_string);
    if prompt.as_ref().is_some_and(|p| p.chars().count() > 1024) {
        return Err(bad("Invalid prompt: at most 1024 characters."));
    }
    let options_json = match text(form, "options_json")? {
        None => None,
        Some(raw) => Some(parse_options_json(raw)?),
    };
    Ok(Params {
        model,
        output_width,
        output_height,
        output_format,
        format,
        crop_to_fill,
        face_enhancement,
        options_json,
        prompt,
        same_size: false,
        category: if gen { "Enhance Generative" } else { "Enhance" },
    })
}

/// The parameters of a sharpen, denoise, restore or lighting submission. The models
/// and ranges are the model pages' (olereon/GigaUp `available_models.md`), the same
/// tables the client checks against; an unknown model is refused with 400.
fn parse_filter_params(form: &Form, op: &str) -> Result<Params, Reply> {
    let endpoint = crate::providers::topaz::Endpoint::from_operation(op)
        .ok_or_else(|| bad("Unknown endpoint."))?;
    let (models, settings) = endpoint.filter().ok_or_else(|| bad("Unknown endpoint."))?;
    let model = match text(form, "model")? {
        None => endpoint.default_model().to_string(),
        Some(m) if models.iter().any(|(n, _)| *n == m) => m.to_string(),
        Some(m) => {
            let names: Vec<&str> = models.iter().map(|(n, _)| *n).collect();
            return Err(bad(&format!(
                "Invalid model {:?}. Valid models for this endpoint: {}.",
                truncate_chars(m, 64),
                names.join(", ")
            )));
        }
    };
    for (name, kind) in settings {
        let Some(v) = text(form, name)? else { continue };
        use crate::providers::topaz::Setting;
        let ok = match kind {
            Setting::Number(lo, hi) => parse::dec_in(v, *lo, *hi).is_some(),
            Setting::Integer(lo, hi) => parse::int_in(v, *lo, *hi).is_some(),
            Setting::Boolean => parse::boolean(v).is_some(),
        };
        if !ok {
            return Err(bad(&format!("Invalid {name}.")));
        }
    }
    let (output_format, format) = match text(form, "output_format")? {
        None => ("jpeg".to_string(), Format::Jpeg),
        Some(f @ ("jpeg" | "jpg")) => (f.to_string(), Format::Jpeg),
        Some("png") => ("png".to_string(), Format::Png),
        Some(_) => return Err(bad(
            "Invalid output format. Valid formats: jpeg, jpg, png (the simulator writes no tiff).",
        )),
    };
    let category = match op.split('-').next().unwrap_or(op) {
        "sharpen" => "Sharpen",
        "denoise" => "Denoise",
        "restore" => "Restore",
        _ => "Lighting",
    };
    Ok(Params {
        model,
        output_width: None,
        output_height: None,
        output_format,
        format,
        crop_to_fill: false,
        face_enhancement: false,
        options_json: None,
        prompt: None,
        same_size: true,
        category,
    })
}

/// Fetches a `source_url` input (loopback only: the simulator reaches nothing else),
/// capped at the body limit. The answer is a 400, as Topaz's for a URL it cannot read.
async fn fetch_source(s: &Shared, raw: &str) -> Result<Bytes, Reply> {
    let url = url::Url::parse(raw).map_err(|_| bad("Invalid source_url."))?;
    let loopback = match url.host() {
        Some(url::Host::Domain(d)) => d.eq_ignore_ascii_case("localhost"),
        Some(url::Host::Ipv4(ip)) => ip.is_loopback(),
        Some(url::Host::Ipv6(ip)) => ip.is_loopback(),
        None => false,
    };
    if !loopback {
        return Err(bad(
            "source_url must point at a loopback address (the simulator fetches nothing else).",
        ));
    }
    let mut resp = s
        .http
        .get(url)
        .send()
        .await
        .map_err(|e| bad(&format!("Could not fetch source_url: {e}")))?;
    if !resp.status().is_success() {
        return Err(bad(&format!(
            "Could not fetch source_url: HTTP {}",
            resp.status().as_u16()
        )));
    }
    let limit = s.config.max_body_bytes;
    let mut buf = Vec::new();
    loop {
        match resp.chunk().await {
            Ok(Some(c)) => {
                if buf.len() + c.len() > limit {
                    return Err(bad("The image at source_url is too large."));
                }
                buf.extend_from_slice(&c);
            }
            Ok(None) => return Ok(Bytes::from(buf)),
            Err(e) => return Err(bad(&format!("Could not fetch source_url: {e}"))),
        }
    }
}

/// `options_json` is a string in the schema and an object in the example: accept the JSON
/// text of an object, or a JSON string holding one. Echoed back compact.
fn parse_options_json(raw: &str) -> Result<String, Reply> {
    let invalid = || bad("Invalid options_json: expected a JSON object.");
    let v: Value = serde_json::from_str(raw).map_err(|_| invalid())?;
    let obj = match v {
        Value::Object(_) => v,
        Value::String(inner) => match serde_json::from_str::<Value>(&inner) {
            Ok(o @ Value::Object(_)) => o,
            _ => return Err(invalid()),
        },
        _ => return Err(invalid()),
    };
    Ok(obj.to_string())
}

fn truncate_chars(s: &str, n: usize) -> String {
    s.chars().take(n).collect()
}

/// The output size and how to fit the input into it.
fn output_dims(p: &Params, in_w: u32, in_h: u32) -> Result<(u32, u32, Fit), Reply> {
    let (iw, ih) = (u64::from(in_w.max(1)), u64::from(in_h.max(1)));
    let prop = |num: u64, den: u64, given: u32| ((num * u64::from(given) + den / 2) / den).max(1);
    let (w, h, fit) = match (p.output_width, p.output_height) {
        (Some(w), Some(h)) => (
            u64::from(w),
            u64::from(h),
            if p.crop_to_fill {
                Fit::Crop
            } else {
                Fit::Letterbox
            },
        ),
        (Some(w), None) => (u64::from(w), prop(ih, iw, w), Fit::Stretch),
        (None, Some(h)) => (prop(iw, ih, h), u64::from(h), Fit::Stretch),
        (None, None) => (iw * 2, ih * 2, Fit::Stretch),
    };
    if w > 32000 {
        return Err(bad("Invalid output width."));
    }
    if h > 32000 {
        return Err(bad("Invalid output height."));
    }
    Ok((w as u32, h as u32, fit))
}

fn credits_for(gen: bool, out_pixels: u64) -> u64 {
    let units = out_pixels.div_ceil(PIXELS_PER_CREDIT).max(1);
    if gen {
        units * GEN_CREDIT_FACTOR
    } else {
        units
    }
}

/// `jobid~3.png` -> `jobid~3` (also dropping any directory part).
fn stem(filename: &str) -> Option<String> {
    let base = filename.rsplit(['/', '\\']).next().unwrap_or(filename);
    let stem = match base.rsplit_once('.') {
        Some((s, _)) if !s.is_empty() => s,
        _ => base,
    };
    (!stem.is_empty()).then(|| stem.to_string())
}

async fn submit(s: &Arc<Shared>, ctx: &Ctx, req: Request, kind: Kind) -> Reply {
    submit_as(s, ctx, req, kind, None).await
}

async fn submit_filter(s: &Arc<Shared>, ctx: &Ctx, req: Request, kind: Kind, op: &str) -> Reply {
    submit_as(s, ctx, req, kind, Some(op)).await
}

async fn submit_as(
    s: &Arc<Shared>,
    ctx: &Ctx,
    req: Request,
    kind: Kind,
    filter: Option<&str>,
) -> Reply {
    let form = match form::read_multipart(req, &["image"]).await {
        Ok(f) => f,
        Err(e) => return err(e.status(), &e.message()),
    };
    let parsed = match filter {
        Some(op) => parse_filter_params(&form, op),
        None => parse_params(&form, kind == Kind::Gen),
    };
    let params = match parsed {
        Ok(p) => p,
        Err(r) => return r,
    };
    let source_url = match text(&form, "source_url") {
        Ok(u) => u.map(str::to_string),
        Err(r) => return r,
    };
    // Exactly one of `image` and `source_url` (the OpenAPI document's rule; the
    // simulator has no `source_id`). A URL is fetched by the simulator itself, as
    // Topaz does: the client never downloads it.
    let (image_bytes, filename) = match (form.file("image"), &source_url) {
        (Some(_), Some(_)) => {
            return bad("Provide exactly one of image, source_id or source_url.");
        }
        (Some(image), None) => (
            image.bytes.clone(),
            image
                .filename
                .clone()
                .filter(|f| !f.is_empty())
                .unwrap_or_else(|| "image".to_string()),
        ),
        (None, Some(url)) => match fetch_source(s, url).await {
            Ok(bytes) => {
                let name = url::Url::parse(url)
                    .ok()
                    .and_then(|u| {
                        u.path_segments()
                            .and_then(|mut p| p.next_back().map(str::to_string))
                    })
                    .filter(|n| !n.is_empty())
                    .unwrap_or_else(|| "image".to_string());
                (bytes, name)
            }
            Err(r) => return r.key(ctx.request_key.clone()),
        },
        (None, None) => {
            return bad("No image provided: the multipart field `image` is required.");
        }
    };
    let request_key = ctx.request_key.clone().or_else(|| stem(&filename));
    let unsupported = || {
        err(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "Image could not be decoded to a supported image type.",
        )
        .key(request_key.clone())
    };
    let Ok(probe) = images::probe(&image_bytes) else {
        return unsupported();
    };
    if probe.width == 0 || probe.height == 0 {
        return err(
            StatusCode::UNPROCESSABLE_ENTITY,
            "Image has invalid dimensions (width or height is zero).",
        )
        .key(request_key);
    }
    let max = s.config.max_pixels;
    if probe.pixels() > max {
        return bad(&format!(
            "Input image of {}x{} exceeds the simulator limit of {max} pixels.",
            probe.width, probe.height
        ))
        .key(request_key);
    }
    if params.model == "Recovery" && probe.pixels() > RECOVERY_MAX_INPUT_PIXELS {
        return bad("The Recovery model accepts input images of at most 16 megapixels.")
            .key(request_key);
    }
    let dims = if params.same_size {
        Ok((probe.width, probe.height, Fit::Stretch))
    } else {
        output_dims(&params, probe.width, probe.height)
    };
    let (ow, oh, fit) = match dims {
        Ok(d) => d,
        Err(r) => return r.key(request_key),
    };
    let out_pixels = u64::from(ow) * u64::from(oh);
    let (endpoint_max, mp) = match kind {
        Kind::Sync => (SYNC_MAX_PIXELS, 96),
        Kind::Async => (ASYNC_MAX_PIXELS, 512),
        Kind::Gen => (GEN_MAX_PIXELS, 256),
    };
    if out_pixels > endpoint_max {
        return bad(&format!(
            "Output dimensions of {ow}x{oh} exceed the maximum of {mp} megapixels for this endpoint."
        ))
        .key(request_key);
    }
    if out_pixels > max {
        return bad(&format!(
            "Output dimensions of {ow}x{oh} exceed the simulator limit of {max} pixels."
        ))
        .key(request_key);
    }

    let bytes = image_bytes.clone();
    let decoded = s.cpu(move || images::decode(&bytes, max)).await;
    let Ok(decoded) = decoded else {
        return unsupported();
    };
    let format = params.format;
    let pad = s.config.result_bytes;
    let encoded = s
        .cpu(move || {
            images::encode(&images::fit(&decoded, ow, oh, fit), format)
                .map(|b| images::pad_to(b, format, pad))
        })
        .await;
    let encoded = match encoded {
        Ok(b) => b,
        Err(e) => {
            return err(
                StatusCode::INTERNAL_SERVER_ERROR,
                &format!("simulator: {e}"),
            )
            .key(request_key)
        }
    };
    let output = Arc::new(Output {
        sha256: images::sha256_hex(&encoded),
        bytes: Bytes::from(encoded),
        format,
    });

    let process_id = s.new_uuid();
    let task = Task {
        order: s.topaz.next_order.fetch_add(1, Ordering::SeqCst),
        process_id: process_id.clone(),
        request_key: request_key.clone(),
        filename,
        input_format: probe.format.name(),
        input_width: probe.width,
        input_height: probe.height,
        output_format: params.output_format.clone(),
        output_width: ow,
        output_height: oh,
        model: params.model.clone(),
        source_url: source_url.clone(),
        face_enhancement: params.face_enhancement,
        crop_to_fill: params.crop_to_fill,
        options_json: params.options_json.clone(),
        sync: kind == Kind::Sync,
        category: params.category,
        credits: credits_for(kind == Kind::Gen, out_pixels),
        created: ctx.arrived,
        created_unix_ms: ctx.arrived_unix_ms,
        cancelled: None,
        fails: kind != Kind::Sync
            && params
                .prompt
                .as_deref()
                .is_some_and(|p| p.contains("sim-fail")),
        output: output.clone(),
    };
    let eta = task.eta(s.config.task_duration);
    s.topaz.spent.fetch_add(task.credits, Ordering::SeqCst);
    lock(&s.topaz.tasks).insert(process_id.clone(), task);

    let reply = if kind == Kind::Sync {
        ctx.sync_processing(s).await;
        Reply::bytes(StatusCode::OK, format.content_type(), output.bytes.clone())
            .sha(output.sha256.clone())
    } else {
        Reply::json(
            StatusCode::OK,
            &json!({"process_id": process_id, "eta": eta}),
        )
    };
    reply
        .header(X_PROCESS_ID, &process_id)
        .header(X_ETA, &eta.to_string())
        .charged()
        .remote(&process_id)
        .key(request_key)
}

/// Validate the path id, find the task, and answer from it.
fn with_task(
    s: &Shared,
    ctx: &Ctx,
    f: impl FnOnce(&mut Task, Instant, Duration) -> Reply,
) -> Reply {
    let id = ctx.route.remote_id.as_deref().unwrap_or("");
    if uuid::Uuid::parse_str(id).is_err() {
        return bad("Invalid process ID. Please ensure it is a valid UUID.");
    }
    let mut tasks = lock(&s.topaz.tasks);
    match tasks.get_mut(id) {
        Some(t) => f(t, Instant::now(), s.config.task_duration),
        None => err(
            StatusCode::NOT_FOUND,
            "An image with the given process ID was not found.",
        ),
    }
}

/// Every account starts with this many credits.
pub(crate) const START_CREDITS: u64 = 10_000;

/// `GET /account/v1/credits/balance` (the Account API reference): what is left of
/// [`START_CREDITS`] after every accepted submission's credits. Nothing is reserved.
fn credits_balance(s: &Shared) -> Reply {
    let available = START_CREDITS.saturating_sub(s.topaz.spent.load(Ordering::SeqCst));
    Reply::json(
        StatusCode::OK,
        &json!({
            "available_credits": available,
            "reserved_credits": 0,
            "total_credits": available,
        }),
    )
}

/// `GET /status`: every status as a plain array, or with `paginated=true` one page of
/// `limit` (1–100, default 50) from `cursor`, as `{"statuses": [...], "next_cursor",
/// "has_next_page"}` (the reference names the two metadata fields; the array's key
/// is the simulator's choice). The cursor is opaque to clients: here, the `order` of
/// the page's first task.
fn status_all(s: &Shared, req: &Request) -> Reply {
    let mut paginated = false;
    let mut limit = 50usize;
    let mut cursor: Option<u64> = None;
    if let Some(q) = req.uri().query() {
        for (k, v) in url::form_urlencoded::parse(q.as_bytes()) {
            match k.as_ref() {
                "paginated" => paginated = parse::boolean(&v).unwrap_or(false),
                "limit" => match v.parse::<usize>() {
                    Ok(n @ 1..=100) => limit = n,
                    _ => return bad("Invalid limit: expected an integer from 1 to 100."),
                },
                "cursor" => match v.strip_prefix('c').and_then(|n| n.parse::<u64>().ok()) {
                    Some(n) => cursor = Some(n),
                    None => return bad("Invalid cursor."),
                },
                _ => {}
            }
        }
    }
    let now = Instant::now();
    let d = s.config.task_duration;
    let tasks = lock(&s.topaz.tasks);
    let mut all: Vec<&Task> = tasks.values().collect();
    all.sort_by_key(|t| t.order);
    if !paginated {
        let list: Vec<Value> = all.iter().map(|t| t.json(now, d)).collect();
        return Reply::json(StatusCode::OK, &Value::Array(list));
    }
    let from = cursor.unwrap_or(0);
    let mut rest = all.into_iter().filter(|t| t.order >= from);
    let page: Vec<Value> = rest.by_ref().take(limit).map(|t| t.json(now, d)).collect();
    let next = rest.next().map(|t| format!("c{}", t.order));
    Reply::json(
        StatusCode::OK,
        &json!({
            "statuses": page,
            "next_cursor": next,
            "has_next_page": next.is_some(),
        }),
    )
}

fn delete_status(s: &Shared, ctx: &Ctx) -> Reply {
    let id = ctx.route.remote_id.clone().unwrap_or_default();
    let mut deleted = false;
    let reply = with_task(s, ctx, |t, now, d| {
        if t.state(now, d).0.finished() {
            deleted = true;
            Reply::empty(StatusCode::NO_CONTENT)
        } else {
            err(
                StatusCode::CONFLICT,
                "The process cannot be deleted as it has not finished.",
            )
        }
    });
    if deleted {
        let removed = lock(&s.topaz.tasks).remove(&id);
        if let Some(t) = removed {
            lock(&s.topaz.deleted).insert(id, t.request_key);
        }
    }
    reply
}

fn cancel(s: &Shared, ctx: &Ctx) -> Reply {
    with_task(s, ctx, |t, now, d| {
        let (status, progress, _) = t.state(now, d);
        if status.finished() {
            return err(
                StatusCode::CONFLICT,
                "The process cannot be cancelled as it is not in a cancellable state.",
            );
        }
        t.cancelled = Some((unix_ms(), progress));
        Reply::empty(StatusCode::NO_CONTENT)
    })
}

fn download(s: &Shared, ctx: &Ctx, req: &Request) -> Reply {
    let host = public_host(s, req);
    let ttl = s.config.link_ttl.as_millis() as u64;
    with_task(s, ctx, |t, now, d| {
        match t.state(now, d).0 {
            Status::Completed => {}
            Status::Pending | Status::Processing => return err(
                StatusCode::CONFLICT,
                "The image is not ready for download yet; poll the status until it is Completed.",
            ),
            Status::Cancelled | Status::Failed => {
                return err(
                    StatusCode::CONFLICT,
                    "The process did not complete, so there is no image to download.",
                )
            }
        }
        let expires = unix_ms() + ttl;
        let url = |method: &str| {
            format!(
                "http://{host}/topaz/_files/{}?expires={expires}&sig={}",
                t.process_id,
                presign::signature(s, "topaz", method, &t.process_id, expires)
            )
        };
        Reply::json(
            StatusCode::OK,
            &json!({
                "download_url": url("GET"),
                "head_url": url("HEAD"),
                "expiry": expires / 1000,
            }),
        )
        .remote(&t.process_id)
        .key(t.request_key.clone())
    })
}

fn file(s: &Shared, ctx: &Ctx, req: &Request) -> Reply {
    let id = ctx.route.remote_id.as_deref().unwrap_or("");
    let no_key = || {
        xml_err(
            StatusCode::NOT_FOUND,
            "NoSuchKey",
            "The specified key does not exist.",
        )
    };
    let (output, modified_ms, key) = {
        let tasks = lock(&s.topaz.tasks);
        let Some(t) = tasks.get(id) else {
            return no_key();
        };
        let (status, _, modified) = t.state(Instant::now(), s.config.task_duration);
        if status != Status::Completed {
            return no_key();
        }
        (t.output.clone(), modified, t.request_key.clone())
    };
    let len = output.bytes.len();
    let last_modified =
        httpdate::fmt_http_date(std::time::UNIX_EPOCH + Duration::from_millis(modified_ms));
    let etag = format!("\"{}\"", &output.sha256[..32]);
    let base = |r: Reply| {
        r.header(header::ETAG, &etag)
            .header(header::LAST_MODIFIED, &last_modified)
            .header(header::ACCEPT_RANGES, "bytes")
            .remote(id)
            .key(key.clone())
    };
    let is_get = ctx.route.endpoint == "file";
    let range = if is_get {
        header_str(req.headers(), "range").map(|r| parse_range(r, len))
    } else {
        None
    };
    let reply = match range {
        Some(RangeAnswer::Part(a, b)) => base(
            Reply::bytes(
                StatusCode::PARTIAL_CONTENT,
                output.format.content_type(),
                output.bytes.slice(a..=b),
            )
            .header(header::CONTENT_RANGE, &format!("bytes {a}-{b}/{len}")),
        ),
        Some(RangeAnswer::Unsatisfiable) => {
            return base(xml_err(
                StatusCode::RANGE_NOT_SATISFIABLE,
                "InvalidRange",
                "The requested range is not satisfiable",
            ))
            .header(header::CONTENT_RANGE, &format!("bytes */{len}"));
        }
        Some(RangeAnswer::Whole) | None => base(Reply::bytes(
            StatusCode::OK,
            output.format.content_type(),
            output.bytes.clone(),
        )),
    };
    if is_get {
        reply.sha(output.sha256.clone())
    } else {
        reply
    }
}

enum RangeAnswer {
    Whole,
    Part(usize, usize),
    Unsatisfiable,
}

/// One `bytes=` range; anything else (several ranges, other units, garbage) is ignored
/// and the whole file served, as S3 does.
fn parse_range(h: &str, len: usize) -> RangeAnswer {
    let Some(spec) = h.trim().strip_prefix("bytes=") else {
        return RangeAnswer::Whole;
    };
    if spec.contains(',') {
        return RangeAnswer::Whole;
    }
    let Some((a, b)) = spec.split_once('-') else {
        return RangeAnswer::Whole;
    };
    let (a, b) = (a.trim(), b.trim());
    if len == 0 {
        return RangeAnswer::Unsatisfiable;
    }
    let last = len - 1;
    match (a.parse::<usize>().ok(), b.parse::<usize>().ok()) {
        (Some(a), _) if a > last => RangeAnswer::Unsatisfiable,
        (Some(a), Some(b)) if b >= a => RangeAnswer::Part(a, b.min(last)),
        (Some(_), Some(_)) => RangeAnswer::Whole,
        (Some(a), None) if b.is_empty() => RangeAnswer::Part(a, last),
        (None, Some(n)) if a.is_empty() => {
            if n == 0 {
                RangeAnswer::Unsatisfiable
            } else {
                RangeAnswer::Part(len.saturating_sub(n), last)
            }
        }
        _ => RangeAnswer::Whole,
    }
}

async fn estimate(s: &Shared, req: Request, gen: bool) -> Reply {
    let form = match form::read_any_form(req, s.config.max_body_bytes).await {
        Ok(f) => f,
        Err(e) => return err(e.status(), &e.message()),
    };
    let resolution = |name: &str| -> Result<u32, Reply> {
        text(&form, name)?
            .and_then(|v| parse::int_in(v, 1, 32000))
            .map(|n| n as u32)
            .ok_or_else(|| bad("Please provide a valid input resolution."))
    };
    let (in_h, in_w) = match (resolution("input_height"), resolution("input_width")) {
        (Ok(h), Ok(w)) => (h, w),
        (Err(r), _) | (_, Err(r)) => return r,
    };
    let params = match parse_params(&form, gen) {
        Ok(p) => p,
        Err(r) => return r,
    };
    let (ow, oh, _) = match output_dims(&params, in_w, in_h) {
        Ok(d) => d,
        Err(r) => return r,
    };
    let credits = credits_for(gen, u64::from(ow) * u64::from(oh));
    let duration = s.config.task_duration.as_millis().div_ceil(1000) as u64;
    Reply::json(
        StatusCode::OK,
        &json!({"duration": duration, "credits": credits}),
    )
}

#[cfg(test)]
mod tests {
    use super::super::testutil::*;
    use super::super::{images, LedgerEntry, SimConfig};
    use super::*;
    use reqwest::multipart::{Form as MpForm, Part};

    const KEY: &str = "test-key";

    fn mp(image: &[u8], filename: &str, fields: &[(&str, &str)]) -> MpForm {
        let mut f = MpForm::new().part(
            "image",
            Part::bytes(image.to_vec())
                .file_name(filename.to_string())
                .mime_str("image/png")
                .unwrap(),
        );
        for (k, v) in fields {
            f = f.text(k.to_string(), v.to_string());
        }
        f
    }

    fn api(base: &str, path: &str) -> String {
        format!("{base}/topaz/image/v1{path}")
    }

    async fn submit_async(
        base: &str,
        key: &str,
        img: &[u8],
        fields: &[(&str, &str)],
    ) -> reqwest::Response {
        client()
            .post(api(base, "/enhance/async"))
            .header("X-API-Key", KEY)
            .header("X-Request-Id", key)
            .multipart(mp(img, &format!("{key}.png"), fields))
            .send()
            .await
            .unwrap()
    }

    async fn get_json(url: &str) -> (u16, Value) {
        let r = client()
            .get(url)
            .header("X-API-Key", KEY)
            .send()
            .await
            .unwrap();
        let st = r.status().as_u16();
        let v = r.json::<Value>().await.unwrap_or(Value::Null);
        (st, v)
    }

    fn entries_for<'a>(l: &'a [LedgerEntry], endpoint: &str) -> Vec<&'a LedgerEntry> {
        l.iter().filter(|e| e.endpoint == endpoint).collect()
    }

    #[tokio::test]
    async fn async_full_cycle() {
        // Long enough that a loaded machine (a status answer can take 200 ms when
        // every core is busy) still sees each of the three statuses.
        let (h, base) = start(SimConfig {
            task_duration: Duration::from_millis(1500),
            ..config()
        })
        .await;
        let img = images::sample_png(60, 40, 1);
        let r = submit_async(
            &base,
            "job1~1",
            &img,
            &[("model", "Standard V2"), ("denoise", "0.3")],
        )
        .await;
        assert_eq!(r.status(), 200);
        let hdr_pid = r.headers()["x-process-id"].to_str().unwrap().to_string();
        assert!(r.headers().contains_key("x-eta"));
        let v: Value = r.json().await.unwrap();
        let pid = v["process_id"].as_str().unwrap().to_string();
        assert_eq!(pid, hdr_pid);
        assert!(v["eta"].as_u64().unwrap() > 1_600_000_000);

        // Download too early: 409.
        let (st, _) = get_json(&api(&base, &format!("/download/{pid}"))).await;
        assert_eq!(st, 409);
        // Delete too early: 409.
        let r = client()
            .delete(api(&base, &format!("/status/{pid}")))
            .header("X-API-Key", KEY)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 409);

        let mut seen = Vec::new();
        let mut last_progress = 0;
        loop {
            let (st, v) = get_json(&api(&base, &format!("/status/{pid}"))).await;
            assert_eq!(st, 200);
            for f in [
                "process_id",
                "filename",
                "input_format",
                "input_height",
                "input_width",
                "output_format",
                "output_height",
                "output_width",
                "model",
                "face_enhancement",
                "crop_to_fill",
                "sync",
                "status",
                "progress",
                "eta",
                "creation_time",
                "modification_time",
                "credits",
            ] {
                assert!(v.get(f).is_some(), "missing {f} in {v}");
            }
            assert_eq!(v["filename"], "job1~1.png");
            assert_eq!(v["input_format"], "png");
            assert_eq!(
                (v["input_width"].as_u64(), v["input_height"].as_u64()),
                (Some(60), Some(40))
            );
            assert_eq!(
                (v["output_width"].as_u64(), v["output_height"].as_u64()),
                (Some(120), Some(80))
            );
            assert_eq!(v["sync"], false);
            let progress = v["progress"].as_u64().unwrap();
            assert!(progress >= last_progress);
            last_progress = progress;
            let status = v["status"].as_str().unwrap().to_string();
            if seen.last() != Some(&status) {
                seen.push(status.clone());
            }
            if status == "Completed" {
                assert_eq!(progress, 100);
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(seen, ["Pending", "Processing", "Completed"]);

        let (st, all) = get_json(&api(&base, "/status")).await;
        assert_eq!(st, 200);
        assert_eq!(all.as_array().unwrap().len(), 1);

        let (st, dl) = get_json(&api(&base, &format!("/download/{pid}"))).await;
        assert_eq!(st, 200);
        let url = dl["download_url"].as_str().unwrap();
        let head_url = dl["head_url"].as_str().unwrap();
        assert!(dl["expiry"].as_u64().unwrap() > 1_600_000_000);
        // No API key needed on the file host.
        let r = client().get(url).send().await.unwrap();
        assert_eq!(r.status(), 200);
        assert_eq!(r.headers()["content-type"], "image/jpeg");
        let len: usize = r.headers()["content-length"]
            .to_str()
            .unwrap()
            .parse()
            .unwrap();
        let bytes = r.bytes().await.unwrap();
        assert_eq!(bytes.len(), len);
        let p = images::probe(&bytes).unwrap();
        assert_eq!((p.format, p.width, p.height), (Format::Jpeg, 120, 80));
        let r = client().head(head_url).send().await.unwrap();
        assert_eq!(r.status(), 200);
        assert_eq!(
            r.headers()["content-length"].to_str().unwrap(),
            len.to_string()
        );
        // The GET URL's signature does not cover HEAD.
        let r = client().head(url).send().await.unwrap();
        assert_eq!(r.status(), 403);
        // Range.
        let r = client()
            .get(url)
            .header("Range", "bytes=10-19")
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 206);
        assert_eq!(&r.bytes().await.unwrap()[..], &bytes[10..20]);

        let r = client()
            .delete(api(&base, &format!("/status/{pid}")))
            .header("X-API-Key", KEY)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 204);
        let (st, _) = get_json(&api(&base, &format!("/status/{pid}"))).await;
        assert_eq!(st, 404);

        let l = ledger(&base).await;
        let sub = entries_for(&l, "enhance_async");
        assert_eq!(sub.len(), 1);
        assert!(sub[0].charged);
        assert_eq!(sub[0].remote_id.as_deref(), Some(pid.as_str()));
        let files = entries_for(&l, "file");
        assert!(files.iter().all(|e| !e.metered));
        assert_eq!(
            files[0].output_sha256.as_deref(),
            Some(images::sha256_hex(&bytes).as_str())
        );
        // Every entry about the job maps back to it.
        for e in l.iter().filter(|e| e.endpoint != "status_all") {
            assert_eq!(e.request_key.as_deref(), Some("job1~1"), "{e:?}");
        }
        assert_eq!(l.iter().filter(|e| e.charged).count(), 1);
        assert!(l.windows(2).all(|w| w[0].seq < w[1].seq));
        h.shutdown().await.unwrap();
    }

    #[tokio::test]
    async fn sync_enhance_and_recovery_through_status() {
        let (_h, base) = start(config()).await;
        let img = images::sample_jpeg(50, 20, 2);
        let t0 = Instant::now();
        let r = client()
            .post(api(&base, "/enhance"))
            .header("X-API-Key", KEY)
            .header("X-Request-Id", "s~1")
            .multipart(mp(
                &img,
                "s~1.jpg",
                &[("output_width", "100"), ("output_format", "png")],
            ))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        assert!(t0.elapsed() >= Duration::from_millis(100));
        assert_eq!(r.headers()["content-type"], "image/png");
        let pid = r.headers()["x-process-id"].to_str().unwrap().to_string();
        let bytes = r.bytes().await.unwrap();
        let p = images::probe(&bytes).unwrap();
        assert_eq!((p.format, p.width, p.height), (Format::Png, 100, 40));

        let (_, v) = get_json(&api(&base, &format!("/status/{pid}"))).await;
        assert_eq!(v["sync"], true);
        assert_eq!(v["status"], "Completed");
        assert_eq!(v["output_format"], "png");
        let (st, dl) = get_json(&api(&base, &format!("/download/{pid}"))).await;
        assert_eq!(st, 200);
        let again = client()
            .get(dl["download_url"].as_str().unwrap())
            .send()
            .await
            .unwrap()
            .bytes()
            .await
            .unwrap();
        assert_eq!(again, bytes);

        // Same input, same parameters: same bytes.
        let r = client()
            .post(api(&base, "/enhance"))
            .header("X-API-Key", KEY)
            .multipart(mp(
                &img,
                "other.jpg",
                &[("output_width", "100"), ("output_format", "png")],
            ))
            .send()
            .await
            .unwrap();
        assert_eq!(r.bytes().await.unwrap(), bytes);

        let l = ledger(&base).await;
        let e = entries_for(&l, "enhance_sync");
        assert_eq!(
            e[0].output_sha256.as_deref(),
            Some(images::sha256_hex(&bytes).as_str())
        );
        assert_eq!(e[0].request_key.as_deref(), Some("s~1"));
        // Without X-Request-Id the filename stem is the key.
        assert_eq!(e[1].request_key.as_deref(), Some("other"));
        assert!(e.iter().all(|e| e.charged));
    }

    #[tokio::test]
    async fn expired_link_then_fresh_link() {
        let (_h, base) = start(SimConfig {
            link_ttl: Duration::from_millis(150),
            task_duration: Duration::from_millis(10),
            ..config()
        })
        .await;
        let r = submit_async(&base, "e~1", &images::sample_png(8, 8, 3), &[]).await;
        let pid = r.json::<Value>().await.unwrap()["process_id"]
            .as_str()
            .unwrap()
            .to_string();
        tokio::time::sleep(Duration::from_millis(30)).await;
        let (_, dl) = get_json(&api(&base, &format!("/download/{pid}"))).await;
        let url = dl["download_url"].as_str().unwrap().to_string();
        tokio::time::sleep(Duration::from_millis(250)).await;
        let r = client().get(&url).send().await.unwrap();
        assert_eq!(r.status(), 403);
        assert!(r.text().await.unwrap().contains("expired"));
        // Tampering is refused too.
        let r = client()
            .get(url.replace("sig=", "sig=0"))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 403);
        let (st, dl) = get_json(&api(&base, &format!("/download/{pid}"))).await;
        assert_eq!(st, 200);
        let r = client()
            .get(dl["download_url"].as_str().unwrap())
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        assert!(!r.bytes().await.unwrap().is_empty());
    }

    #[tokio::test]
    async fn cancel_and_conflicts() {
        let (_h, base) = start(SimConfig {
            task_duration: Duration::from_secs(5),
            ..config()
        })
        .await;
        let r = submit_async(&base, "c~1", &images::sample_png(8, 8, 4), &[]).await;
        let pid = r.json::<Value>().await.unwrap()["process_id"]
            .as_str()
            .unwrap()
            .to_string();
        let cancel = || async {
            client()
                .delete(api(&base, &format!("/cancel/{pid}")))
                .header("X-API-Key", KEY)
                .send()
                .await
                .unwrap()
                .status()
        };
        assert_eq!(cancel().await, 204);
        let (_, v) = get_json(&api(&base, &format!("/status/{pid}"))).await;
        assert_eq!(v["status"], "Cancelled");
        assert_eq!(cancel().await, 409);
        let (st, _) = get_json(&api(&base, &format!("/download/{pid}"))).await;
        assert_eq!(st, 409);
        let r = client()
            .delete(api(&base, &format!("/cancel/{}", uuid::Uuid::nil())))
            .header("X-API-Key", KEY)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 404);
        let r = client()
            .delete(api(&base, "/cancel/not-a-uuid"))
            .header("X-API-Key", KEY)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 400);
        let r = client()
            .delete(api(&base, &format!("/status/{pid}")))
            .header("X-API-Key", KEY)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 204);
        let l = ledger(&base).await;
        let c = entries_for(&l, "cancel");
        assert_eq!(c[0].request_key.as_deref(), Some("c~1"));
        assert_eq!(c[0].remote_id.as_deref(), Some(pid.as_str()));
    }

    #[tokio::test]
    async fn sim_fail_ends_failed() {
        let (_h, base) = start(SimConfig {
            task_duration: Duration::from_millis(20),
            ..config()
        })
        .await;
        let r = client()
            .post(api(&base, "/enhance-gen/async"))
            .header("X-API-Key", KEY)
            .multipart(mp(
                &images::sample_png(8, 8, 4),
                "f~1.png",
                &[("model", "Redefine"), ("prompt", "sim-fail please")],
            ))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        let pid = r.json::<Value>().await.unwrap()["process_id"]
            .as_str()
            .unwrap()
            .to_string();
        tokio::time::sleep(Duration::from_millis(50)).await;
        let (_, v) = get_json(&api(&base, &format!("/status/{pid}"))).await;
        assert_eq!(v["status"], "Failed");
        assert_eq!(v["model"], "Redefine");
        assert_eq!(v["category"], "Enhance Generative");
    }

    #[tokio::test]
    async fn auth_rules() {
        let (_h, base) = start(config()).await;
        let url = api(&base, "/status");
        let c = client();
        let r = c.get(&url).send().await.unwrap();
        assert_eq!(r.status(), 401);
        assert_eq!(
            r.json::<Value>().await.unwrap(),
            json!({"code": 401, "message": "Unauthorized"})
        );
        for req in [
            c.get(&url).header("X-API-Key", "invalid-key"),
            c.get(&url).header("X-API-Key", ""),
            c.get(&url).header("Authorization", "Bearer ordinary-key"),
            c.get(&url)
                .header("X-API-Key", format!("{LEGACY_PREFIX}abc")),
            c.get(&url).header("Authorization", LEGACY_PREFIX),
        ] {
            assert_eq!(req.send().await.unwrap().status(), 401);
        }
        let r = c
            .get(&url)
            .header("Authorization", format!("Bearer {LEGACY_PREFIX}abc"))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        let r = c.get(&url).header("X-API-Key", KEY).send().await.unwrap();
        assert_eq!(r.status(), 200);
        // An unauthenticated submission is not charged.
        let r = c
            .post(api(&base, "/enhance/async"))
            .multipart(mp(&images::sample_png(8, 8, 1), "a.png", &[]))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 401);
        assert!(ledger(&base).await.iter().all(|e| !e.charged));
    }

    #[tokio::test]
    async fn validation_failures() {
        let (_h, base) = start(config()).await;
        let img = images::sample_png(16, 16, 5);
        let send = |path: &'static str, form: MpForm| {
            let base = base.clone();
            async move {
                let r = client()
                    .post(api(&base, path))
                    .header("X-API-Key", KEY)
                    .multipart(form)
                    .send()
                    .await
                    .unwrap();
                let st = r.status().as_u16();
                (st, r.json::<Value>().await.unwrap())
            }
        };
        let cases: Vec<(&'static str, MpForm, u16, &str)> = vec![
            (
                "/enhance/async",
                mp(&img, "a.png", &[("model", "Redefine")]),
                400,
                "Invalid model",
            ),
            (
                "/enhance-gen/async",
                mp(&img, "a.png", &[("model", "Standard V2")]),
                400,
                "Invalid model",
            ),
            (
                "/enhance-gen/async",
                mp(
                    &img,
                    "a.png",
                    &[("model", "Redefine"), ("creativity", "10")],
                ),
                400,
                "creativity",
            ),
            (
                "/enhance-gen/async",
                mp(&img, "a.png", &[("texture", "0")]),
                400,
                "texture",
            ),
            (
                "/enhance/async",
                mp(&img, "a.png", &[("output_height", "0")]),
                400,
                "Invalid output height.",
            ),
            (
                "/enhance/async",
                mp(&img, "a.png", &[("output_width", "32001")]),
                400,
                "Invalid output width.",
            ),
            (
                "/enhance/async",
                mp(&img, "a.png", &[("output_width", "12.5")]),
                400,
                "Invalid output width.",
            ),
            (
                "/enhance/async",
                mp(&img, "a.png", &[("output_format", "tiff")]),
                400,
                "tiff",
            ),
            (
                "/enhance/async",
                mp(&img, "a.png", &[("output_format", "gif")]),
                400,
                "format",
            ),
            (
                "/enhance/async",
                mp(&img, "a.png", &[("crop_to_fill", "maybe")]),
                400,
                "crop_to_fill",
            ),
            (
                "/enhance/async",
                mp(&img, "a.png", &[("face_enhancement_creativity", "1.5")]),
                400,
                "face_enhancement_creativity",
            ),
            (
                "/enhance/async",
                mp(&img, "a.png", &[("denoise", "-0.1")]),
                400,
                "denoise",
            ),
            (
                "/enhance/async",
                mp(&img, "a.png", &[("options_json", "[1]")]),
                400,
                "options_json",
            ),
            (
                "/enhance-gen/async",
                mp(&img, "a.png", &[("prompt", &"x".repeat(1025))]),
                400,
                "prompt",
            ),
            (
                "/enhance/async",
                mp(b"not an image", "a.png", &[]),
                415,
                "Image could not be decoded to a supported image type.",
            ),
            (
                "/enhance/async",
                MpForm::new().text("model", "CGI"),
                400,
                "image",
            ),
            // 20000 x 20000 from a 16 x 16 square: 400 MP, above the sync limit of 96.
            (
                "/enhance",
                mp(&img, "a.png", &[("output_width", "20000")]),
                400,
                "96 megapixels",
            ),
            // Allowed by Topaz (async <= 512 MP) but not by the simulator.
            (
                "/enhance/async",
                mp(&img, "a.png", &[("output_width", "8000")]),
                400,
                "simulator limit",
            ),
        ];
        for (path, form, want, msg) in cases {
            let (st, v) = send(path, form).await;
            assert_eq!(st, want, "{path} {msg}: {v}");
            assert_eq!(v["code"], want, "{v}");
            assert!(v["message"].as_str().unwrap().contains(msg), "{msg}: {v}");
        }
        // options_json as an object or as a string holding one.
        for oj in [r#"{"creativity": 90}"#, r#""{\"creativity\": 90}""#] {
            let r = submit_async(&base, "o~1", &img, &[("options_json", oj)]).await;
            assert_eq!(r.status(), 200);
            let pid = r.json::<Value>().await.unwrap()["process_id"]
                .as_str()
                .unwrap()
                .to_string();
            let (_, v) = get_json(&api(&base, &format!("/status/{pid}"))).await;
            assert_eq!(v["options_json"], r#"{"creativity":90}"#);
        }
        let l = ledger(&base).await;
        assert_eq!(l.iter().filter(|e| e.charged).count(), 2);
    }

    #[tokio::test]
    async fn garbage_bodies_do_not_panic() {
        let (_h, base) = start(config()).await;
        let c = client();
        let bodies: Vec<(&str, Vec<u8>)> = vec![
            ("multipart/form-data; boundary=XYZ", b"--XYZ\r\nContent-Disposition: form-data; name=\"image\"\r\n\r\n\xff\xfe".to_vec()),
            ("multipart/form-data", b"garbage".to_vec()),
            ("application/json", b"{}".to_vec()),
            ("multipart/form-data; boundary=XYZ", b"--XYZ\r\nContent-Disposition: form-data; name=\"model\"\r\n\r\n\xff\xfe\xfd\r\n--XYZ--\r\n".to_vec()),
        ];
        for (ct, body) in bodies {
            let r = c
                .post(api(&base, "/enhance/async"))
                .header("X-API-Key", KEY)
                .header("Content-Type", ct)
                .body(body)
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), 400, "{ct}");
            let v: Value = r.json().await.unwrap();
            assert_eq!(v["code"], 400);
        }
        let r = c
            .get(api(&base, "/enhance/async"))
            .header("X-API-Key", KEY)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 405);
        let r = c
            .get(api(&base, "/nothing"))
            .header("X-API-Key", KEY)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 404);
        let r = c
            .get(format!("{base}/topaz/_files/x"))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 403);
    }

    #[tokio::test]
    async fn rate_limit_violation_has_retry_after() {
        let mut cfg = config();
        cfg.limits
            .insert("topaz".into(), vec!["2/1s".parse().unwrap()]);
        let (_h, base) = start(cfg).await;
        let url = api(&base, "/status");
        let mut statuses = Vec::new();
        let mut retry_after = None;
        for _ in 0..3 {
            let r = client()
                .get(&url)
                .header("X-API-Key", KEY)
                .send()
                .await
                .unwrap();
            statuses.push(r.status().as_u16());
            if r.status() == 429 {
                retry_after = r
                    .headers()
                    .get("retry-after")
                    .map(|v| v.to_str().unwrap().to_string());
                assert_eq!(r.json::<Value>().await.unwrap()["code"], 429);
            }
        }
        assert_eq!(statuses, [200, 200, 429]);
        assert_eq!(retry_after.as_deref(), Some("1"));
        let l = ledger(&base).await;
        assert!(l[2].violation);
        assert_eq!(l[2].retry_after_s, Some(1));
        assert_eq!(l[2].fault, None);
        assert!(!l[0].violation);
        assert_eq!(stats(&base).await.violations["topaz"], 1);
        // Presigned downloads do not count, and after the window there is room again.
        tokio::time::sleep(Duration::from_millis(1000)).await;
        let r = client()
            .get(&url)
            .header("X-API-Key", KEY)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
    }

    #[tokio::test]
    async fn reset_on_paid_submission_still_charges() {
        let mut cfg = config();
        cfg.chaos.rate_reset = 1.0;
        let (_h, base) = start(cfg).await;
        let img = images::sample_png(8, 8, 6);
        for i in 0..6 {
            let key = format!("r~{i}");
            let res = client()
                .post(api(&base, "/enhance/async"))
                .header("X-API-Key", KEY)
                .header("X-Request-Id", &key)
                .multipart(mp(&img, &format!("{key}.png"), &[]))
                .send()
                .await;
            // Either no answer at all, or a head whose body breaks off.
            match res {
                Err(_) => {}
                Ok(r) => assert!(r.bytes().await.is_err(), "body should break"),
            }
        }
        let l = ledger(&base).await;
        assert_eq!(l.len(), 6);
        assert!(l
            .iter()
            .all(|e| e.charged && e.fault.as_deref() == Some("reset") && e.status == 200));
        assert!(l.iter().all(|e| e.remote_id.is_some()));
        let keys: Vec<_> = l.iter().filter_map(|e| e.request_key.clone()).collect();
        assert_eq!(keys, (0..6).map(|i| format!("r~{i}")).collect::<Vec<_>>());
    }

    #[tokio::test]
    async fn injected_faults() {
        // 429 with a configured Retry-After, before the handler: nothing charged.
        let mut cfg = config();
        cfg.chaos.rate_429 = 1.0;
        cfg.chaos.retry_after_secs = Some(3);
        let (_h, base) = start(cfg).await;
        let r = submit_async(&base, "f~1", &images::sample_png(8, 8, 6), &[]).await;
        assert_eq!(r.status(), 429);
        assert_eq!(r.headers()["retry-after"], "3");
        let l = ledger(&base).await;
        assert_eq!(l[0].fault.as_deref(), Some("429"));
        assert!(!l[0].violation && !l[0].charged);
        assert_eq!(l[0].retry_after_s, Some(3));

        let mut cfg = config();
        cfg.chaos.rate_5xx = 1.0;
        let (_h, base) = start(cfg).await;
        for _ in 0..5 {
            let r = submit_async(&base, "f~2", &images::sample_png(8, 8, 6), &[]).await;
            assert!([500, 502, 503].contains(&r.status().as_u16()));
        }
        let st = stats(&base).await;
        assert_eq!(st.faults["5xx"], 5);
        assert_eq!(st.charges["topaz"], 0);

        let mut cfg = config();
        cfg.chaos.rate_slow = 1.0;
        cfg.chaos.slow = Duration::from_millis(300);
        let (_h, base) = start(cfg).await;
        let t0 = Instant::now();
        let (st, _) = get_json(&api(&base, "/status")).await;
        assert_eq!(st, 200);
        assert!(t0.elapsed() >= Duration::from_millis(300));
        assert_eq!(ledger(&base).await[0].fault.as_deref(), Some("slow"));
    }

    #[tokio::test]
    async fn truncated_downloads() {
        let mut cfg = config();
        cfg.chaos.rate_truncate = 1.0;
        let (_h, base) = start(cfg).await;
        let img = images::sample_png(40, 40, 8);
        let r = client()
            .post(api(&base, "/enhance"))
            .header("X-API-Key", KEY)
            .multipart(mp(&img, "t~1.png", &[]))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        let declared: usize = r.headers()["content-length"]
            .to_str()
            .unwrap()
            .parse()
            .unwrap();
        let pid = r.headers()["x-process-id"].to_str().unwrap().to_string();
        assert!(r.bytes().await.is_err());
        // Status and download links are not image-bearing: untouched.
        let (st, dl) = get_json(&api(&base, &format!("/download/{pid}"))).await;
        assert_eq!(st, 200);
        let r = client()
            .get(dl["download_url"].as_str().unwrap())
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        assert!(r.bytes().await.is_err());
        let l = ledger(&base).await;
        let sync = entries_for(&l, "enhance_sync")[0];
        assert_eq!(sync.fault.as_deref(), Some("truncate"));
        assert!(sync.charged);
        let file = entries_for(&l, "file")[0];
        assert_eq!(file.fault.as_deref(), Some("truncate"));
        assert_eq!(file.output_sha256, sync.output_sha256);
        assert!(declared > 0);
        assert_eq!(entries_for(&l, "download")[0].fault, None);
    }

    #[tokio::test]
    async fn estimates() {
        let (_h, base) = start(config()).await;
        let c = client();
        let post = |path: &'static str, form: MpForm| {
            c.post(api(&base, path))
                .header("X-API-Key", KEY)
                .multipart(form)
                .send()
        };
        let r = post(
            "/estimate",
            MpForm::new()
                .text("input_width", "1000")
                .text("input_height", "500")
                .text("output_width", "8000"),
        )
        .await
        .unwrap();
        assert_eq!(r.status(), 200);
        // 8000 x 4000 = 32 MP -> 2 credits; duration = ceil(0.1 s) = 1.
        assert_eq!(
            r.json::<Value>().await.unwrap(),
            json!({"duration": 1, "credits": 2})
        );
        let r = post(
            "/estimate-gen",
            MpForm::new()
                .text("input_width", "1000")
                .text("input_height", "500")
                .text("model", "Recovery"),
        )
        .await
        .unwrap();
        assert_eq!(r.json::<Value>().await.unwrap()["credits"], 4);
        let r = post("/estimate", MpForm::new().text("input_width", "1000"))
            .await
            .unwrap();
        assert_eq!(r.status(), 400);
        assert_eq!(
            r.json::<Value>().await.unwrap()["message"],
            "Please provide a valid input resolution."
        );
        // urlencoded works as well.
        let r = c
            .post(api(&base, "/estimate"))
            .header("X-API-Key", KEY)
            .header("Content-Type", "application/x-www-form-urlencoded")
            .body("input_width=10&input_height=10&model=CGI")
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        assert!(ledger(&base).await.iter().all(|e| !e.charged && e.metered));
    }

    #[test]
    fn range_parsing() {
        assert!(matches!(
            parse_range("bytes=0-9", 100),
            RangeAnswer::Part(0, 9)
        ));
        assert!(matches!(
            parse_range("bytes=90-", 100),
            RangeAnswer::Part(90, 99)
        ));
        assert!(matches!(
            parse_range("bytes=-10", 100),
            RangeAnswer::Part(90, 99)
        ));
        assert!(matches!(
            parse_range("bytes=50-500", 100),
            RangeAnswer::Part(50, 99)
        ));
        assert!(matches!(
            parse_range("bytes=100-", 100),
            RangeAnswer::Unsatisfiable
        ));
        assert!(matches!(
            parse_range("bytes=0-1,5-6", 100),
            RangeAnswer::Whole
        ));
        assert!(matches!(parse_range("items=0-1", 100), RangeAnswer::Whole));
        assert!(matches!(parse_range("bytes=x-y", 100), RangeAnswer::Whole));
    }

    #[test]
    fn stems_and_dims() {
        assert_eq!(stem("job~3.png").as_deref(), Some("job~3"));
        assert_eq!(stem("dir/job.v2.jpg").as_deref(), Some("job.v2"));
        assert_eq!(stem("noext").as_deref(), Some("noext"));
        assert_eq!(stem(".png").as_deref(), Some(".png"));
        let p = parse_params(&Form::from_pairs(&[("output_height", "100")]), false).unwrap();
        assert_eq!(output_dims(&p, 300, 200).unwrap().0, 150);
        let p = parse_params(&Form::from_pairs(&[]), false).unwrap();
        let (w, h, _) = output_dims(&p, 30, 20).unwrap();
        assert_eq!((w, h), (60, 40));
        assert_eq!(credits_for(false, 1), 1);
        assert_eq!(credits_for(false, 24_000_001), 2);
        assert_eq!(credits_for(true, 1), 4);
    }
}
