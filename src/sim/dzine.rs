//! The simulated Dzine Developer API (`dzine.txt`), served under `/dzine/openapi/v1`,
//! with its CDN under `/dzine/_files` (uploads, detected images) and `/dzine/_cdn`
//! (results, signed links valid `link_ttl`).
//!
//! Every API answer is the envelope `{"code","msg","data"}` with HTTP 200, errors
//! included (NOTES.md); only rate limits (429), injected 5xx and unknown paths (404)
//! use other HTTP statuses. Auth is `Authorization: <key>` without `Bearer`.
//!
//! Tasks live in memory. Their status is a function of time since creation:
//! `waiting`, `in_queue`, `processing`, `uploading` (each a fifth of `task_duration`),
//! then done, spelled `succeeded`, `success` or `succeed` by turns (failures `failed`
//! or `error`), so clients meet every spelling. Every third task answers "not found"
//! (code 404) for the first half of `task_duration`, as Dzine does right after
//! creation. Task data is forgotten after twice `link_ttl` (2 hours by default, the
//! document's lifetime). Results are made at creation, so the bytes a task will serve
//! are fixed from the moment it is accepted (and charged).
//!
//! Triggers: `sim-fail` in a prompt ends the task failed; `sim-code:<n>` refuses the
//! creation with envelope code n; `sim-expire` makes the first task with that exact
//! prompt forgotten at once (as if two hours had passed); an image whose file name
//! contains `noface` has no face, `twofaces` has two (the right one larger).

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::Request;
use axum::http::{Method, StatusCode};
use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use serde_json::{json, Map, Value};
use sha2::{Digest, Sha256};

use super::form::{self, FormError};
use super::images::{self, Fit, Format};
use super::presign::{self, public_host};
use super::{header_str, key_ok, lock, unix_ms, Ctx, Reply, Route, Shared, SimConfig};

const API: &str = "/openapi/v1";
const FILES: &str = "/_files/";
const CDN: &str = "/_cdn/";

/// Tokens on the account at start.
pub(crate) const START_BALANCE: i64 = 10_000;
/// "This image must be under 10M in size."
const MAX_IMAGE_BYTES: usize = 10_000_000;
const MAX_PROMPT_CHARS: usize = 800;
const MAX_SEED: i64 = 2_147_483_647;

/// The document's one style, first in the list (base model S).
pub(crate) const STYLE_S: &str = "Style-7feccf2b-f2ad-43a6-89cb-354fb5d928d2";
/// A fixed base-model X style, second in the list (2 slots; refused for img2img).
pub(crate) const STYLE_X: &str = "Style-3a9f1c2e-5b7d-4e8a-9c01-2f6d8b4e7a15";
const STYLE_COUNT: usize = 120;

/// Business code of a style that cannot be used for img2img (NOTES.md).
const CODE_STYLE_NOT_FOR_IMG2IMG: i64 = 108_005;

// ---------------------------------------------------------------------------------------
// State

#[derive(Debug)]
struct Style {
    name: String,
    base_model: &'static str,
    code: String,
    txt2img: f64,
    img2img: f64,
}

#[derive(Debug, Clone)]
struct StoredFile {
    bytes: Bytes,
    name: String,
}

#[derive(Debug, Clone)]
struct Output {
    bytes: Bytes,
    sha256: String,
    format: Format,
}

impl Output {
    fn ext(&self) -> &'static str {
        match self.format {
            Format::Png => "png",
            Format::Jpeg => "jpg",
        }
    }
}

#[derive(Debug)]
struct Task {
    number: u64,
    created: Instant,
    request_key: Option<String>,
    /// One per slot; `None` for a disabled slot.
    outputs: Vec<Option<Output>>,
    /// Ends failed with this reason.
    fails: Option<String>,
    cost: i64,
    settled: bool,
    detail: Value,
}

/// Everything the simulated Dzine remembers.
#[derive(Debug)]
pub(crate) struct DzineState {
    tasks: Mutex<HashMap<String, Task>>,
    /// Task ids forgotten, with their request keys, so later polls still map to a job.
    forgotten: Mutex<HashMap<String, Option<String>>>,
    files: Mutex<HashMap<String, StoredFile>>,
    counter: AtomicU64,
    /// Tokens spent by settled tasks.
    spent: Mutex<i64>,
    /// Prompts whose `sim-expire` has fired.
    expired_prompts: Mutex<HashSet<String>>,
    styles: Vec<Style>,
    task_ttl: Duration,
}

impl DzineState {
    pub(crate) fn new(config: &SimConfig) -> Self {
        DzineState {
            tasks: Mutex::default(),
            forgotten: Mutex::default(),
            files: Mutex::default(),
            counter: AtomicU64::new(0),
            spent: Mutex::new(0),
            expired_prompts: Mutex::default(),
            styles: styles(),
            task_ttl: config.link_ttl.saturating_mul(2),
        }
    }

    fn style(&self, code: &str) -> Option<&Style> {
        self.styles.iter().find(|s| s.code == code)
    }

    /// Charges a succeeded task once, when it is first seen finished.
    fn settle(&self, task: &mut Task, d: Duration) {
        if !task.settled && task.fails.is_none() && task.created.elapsed() >= d {
            task.settled = true;
            *lock(&self.spent) += task.cost;
        }
    }

    /// Forgets tasks past their lifetime.
    fn sweep(&self, d: Duration) {
        let ttl = self.task_ttl;
        let mut tasks = lock(&self.tasks);
        let old: Vec<String> = tasks
            .iter()
            .filter(|(_, t)| t.created.elapsed() >= ttl)
            .map(|(id, _)| id.clone())
            .collect();
        for id in old {
            if let Some(mut t) = tasks.remove(&id) {
                self.settle(&mut t, d);
                lock(&self.forgotten).insert(id, t.request_key);
            }
        }
    }
}

fn styles() -> Vec<Style> {
    const WORDS: [&str; 12] = [
        "Watercolor",
        "Anime",
        "Cinematic",
        "Oil Paint",
        "Sketch",
        "Pixel",
        "Neon",
        "Clay",
        "Comic",
        "Photoreal",
        "Ink",
        "Pastel",
    ];
    (0..STYLE_COUNT)
        .map(|i| {
            let (name, base_model, code) = match i {
                0 => ("No Style v2".to_string(), "S", STYLE_S.to_string()),
                1 => ("Realistic X".to_string(), "X", STYLE_X.to_string()),
                _ => {
                    let d = Sha256::digest(format!("dzine-style-{i}").as_bytes());
                    let h = hex::encode(d);
                    let code = format!(
                        "Style-{}-{}-4{}-8{}-{}",
                        &h[0..8],
                        &h[8..12],
                        &h[13..16],
                        &h[17..20],
                        &h[20..32]
                    );
                    let model = if i % 4 == 3 { "X" } else { "S" };
                    (
                        format!("{} {}", WORDS[i % WORDS.len()], i / WORDS.len() + 1),
                        model,
                        code,
                    )
                }
            };
            Style {
                name,
                base_model,
                code,
                txt2img: (i % 11) as f64 / 10.0,
                img2img: ((i + 5) % 11) as f64 / 10.0,
            }
        })
        .collect()
}

/// What a client needs to talk to this simulator: nothing, any key works.
pub(crate) fn credentials(s: &Shared) -> serde_json::Value {
    let _ = &s.dzine;
    json!({})
}

// ---------------------------------------------------------------------------------------
// Routes, auth, error shapes

pub(crate) fn route(method: &Method, rest: &str) -> Route {
    if let Some(r) = rest.strip_prefix(FILES) {
        return match *method {
            Method::GET if !r.is_empty() => Route::api("file").unmetered(),
            _ => Route::api("unknown").unmetered(),
        };
    }
    if let Some(r) = rest.strip_prefix(CDN) {
        let task = r.split('/').next().unwrap_or("");
        return match *method {
            Method::GET if !task.is_empty() => Route::api("result").unmetered().image().about(task),
            _ => Route::api("unknown").unmetered(),
        };
    }
    let Some(p) = rest.strip_prefix(API) else {
        return Route::api("unknown");
    };
    let id_after = |prefix: &str| {
        p.strip_prefix(prefix)
            .filter(|id| !id.is_empty() && !id.contains('/'))
    };
    match (method.clone(), p) {
        (Method::GET, "/style/list") => Route::api("style_list"),
        (Method::GET, "/get_token_balance") => Route::api("token_balance"),
        (Method::POST, "/file/upload") => Route::api("file_upload"),
        (Method::POST, "/face_detect") => Route::api("face_detect"),
        (Method::POST, "/create_task_txt2img") => Route::api("txt2img"),
        (Method::POST, "/create_task_img2img") => Route::api("img2img"),
        (Method::POST, "/create_task_face_swap") => Route::api("face_swap"),
        (Method::POST, "/create_task_upscale") => Route::api("upscale"),
        (Method::GET, _) => {
            if let Some(id) = id_after("/get_task_progress/") {
                Route::api("task_progress").about(id)
            } else if let Some(id) = id_after("/get_task_detail/") {
                Route::api("task_detail").about(id)
            } else {
                Route::api("unknown")
            }
        }
        _ => Route::api("unknown"),
    }
}

pub(crate) fn request_key_hint(s: &Shared, route: &Route) -> Option<String> {
    let id = route.remote_id.as_deref()?;
    if let Some(t) = lock(&s.dzine.tasks).get(id) {
        return t.request_key.clone();
    }
    lock(&s.dzine.forgotten).get(id).cloned().flatten()
}

fn ok(data: Value) -> Reply {
    Reply::json(
        StatusCode::OK,
        &json!({"code": 200, "msg": "OK", "data": data}),
    )
}

/// An error the way Dzine answers one: HTTP 200, the code in the envelope.
fn refuse(code: i64, msg: &str) -> Reply {
    Reply::json(
        StatusCode::OK,
        &json!({"code": code, "msg": msg, "data": null}),
    )
}

fn bad(msg: &str) -> Reply {
    refuse(400, msg)
}

fn with_status(status: StatusCode, msg: &str) -> Reply {
    Reply::json(
        status,
        &json!({"code": status.as_u16(), "msg": msg, "data": null}),
    )
}

pub(crate) fn authorize(_s: &Shared, ctx: &Ctx, req: &Request) -> Result<(), Reply> {
    if !ctx.route.metered {
        // The CDN is public; result links carry their own signature.
        return Ok(());
    }
    match header_str(req.headers(), "authorization").map(str::trim) {
        Some(k) if k.starts_with("Bearer ") => Err(refuse(
            401,
            "Unauthorized: send the API key itself in Authorization, without Bearer",
        )),
        Some(k) if key_ok(k) => Ok(()),
        _ => Err(refuse(401, "Unauthorized: invalid API key")),
    }
}

pub(crate) fn too_many(_route: &Route) -> Reply {
    with_status(StatusCode::TOO_MANY_REQUESTS, "Too Many Requests")
}

pub(crate) fn server_error(_route: &Route, status: StatusCode) -> Reply {
    with_status(
        status,
        status.canonical_reason().unwrap_or("Internal Server Error"),
    )
}

// ---------------------------------------------------------------------------------------
// Handlers

pub(crate) async fn handle(s: &Arc<Shared>, ctx: &Ctx, req: Request) -> Reply {
    let d = s.config.task_duration;
    s.dzine.sweep(d);
    match ctx.route.endpoint {
        "style_list" => style_list(s, &req),
        "token_balance" => balance(s),
        "file_upload" => upload(s, req).await,
        "face_detect" => match json_body(s, req).await {
            Ok((body, host)) => face_detect(s, &host, &body).await,
            Err(r) => r,
        },
        "txt2img" | "img2img" | "face_swap" | "upscale" => {
            let endpoint = ctx.route.endpoint;
            match json_body(s, req).await {
                Ok((body, _)) => create(s, ctx, endpoint, &body).await,
                Err(r) => r,
            }
        }
        "task_progress" => progress(s, ctx, &req),
        "task_detail" => detail(s, ctx),
        "file" => file(s, &req),
        "result" => result(s, ctx, &req),
        _ => with_status(StatusCode::NOT_FOUND, "Not Found"),
    }
}

/// The request's JSON object and the host it was sent to (for URLs handed back).
async fn json_body(s: &Shared, req: Request) -> Result<(Map<String, Value>, String), Reply> {
    let host = public_host(s, &req);
    let bytes = form::read_body(req, s.config.max_body_bytes)
        .await
        .map_err(|e| match e {
            FormError::TooLarge => {
                with_status(StatusCode::PAYLOAD_TOO_LARGE, "Request Entity Too Large")
            }
            FormError::Malformed(m) => bad(&m),
        })?;
    match serde_json::from_slice::<Value>(&bytes) {
        Ok(Value::Object(m)) => Ok((m, host)),
        _ => Err(bad("the request body must be a JSON object")),
    }
}

fn query_pairs(req: &Request) -> HashMap<String, String> {
    url::form_urlencoded::parse(req.uri().query().unwrap_or("").as_bytes())
        .map(|(k, v)| (k.into_owned(), v.into_owned()))
        .collect()
}

fn style_list(s: &Shared, req: &Request) -> Reply {
    let q = query_pairs(req);
    let page_no = match q.get("page_no") {
        None => 0,
        Some(v) => match v.trim().parse::<usize>() {
            Ok(n) => n,
            Err(_) => return bad("page_no must be a non-negative integer"),
        },
    };
    let page_size = match q.get("page_size") {
        None => 50,
        Some(v) => match v.trim().parse::<usize>() {
            Ok(n) if (1..=100).contains(&n) => n,
            _ => return bad("page_size must be an integer from 1 to 100"),
        },
    };
    let list: Vec<Value> = s
        .dzine
        .styles
        .iter()
        .skip(page_no.saturating_mul(page_size))
        .take(page_size)
        .map(|st| {
            json!({
                "name": st.name,
                "base_model": st.base_model,
                "style_code": st.code,
                "cover_url": format!("https://static.dzine.invalid/style/{}.jpg", st.code),
                "style_intensity": {"img2img": st.img2img, "txt2img": st.txt2img},
            })
        })
        .collect();
    ok(json!({
        "page_no": page_no,
        "page_size": page_size,
        "total": s.dzine.styles.len(),
        "msg": "",
        "list": list,
    }))
}

fn balance(s: &Shared) -> Reply {
    let d = s.config.task_duration;
    {
        let mut tasks = lock(&s.dzine.tasks);
        for t in tasks.values_mut() {
            s.dzine.settle(t, d);
        }
    }
    let spent = *lock(&s.dzine.spent);
    ok(json!({"balance": START_BALANCE - spent}))
}

fn sanitize_name(name: &str) -> String {
    let base = name.rsplit(['/', '\\']).next().unwrap_or(name);
    let clean: String = base
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || "._-".contains(*c))
        .take(100)
        .collect();
    if clean.is_empty() || clean.starts_with('.') {
        format!("image{clean}")
    } else {
        clean
    }
}

/// Stores bytes on the simulated CDN and answers their URL.
fn store_file(s: &Shared, host: &str, bytes: Bytes, name: &str) -> String {
    let n = s.dzine.counter.fetch_add(1, Ordering::SeqCst);
    let id = format!("f{n:06}");
    let name = sanitize_name(name);
    let url = format!("http://{host}/dzine/_files/{id}/{name}");
    lock(&s.dzine.files).insert(id, StoredFile { bytes, name });
    url
}

async fn upload(s: &Shared, req: Request) -> Reply {
    let host = public_host(s, &req);
    let form = match form::read_multipart(req, &["file"]).await {
        Ok(f) => f,
        Err(FormError::TooLarge) => {
            return with_status(StatusCode::PAYLOAD_TOO_LARGE, "Request Entity Too Large")
        }
        Err(FormError::Malformed(m)) => return bad(&m),
    };
    let Some(part) = form.file("file") else {
        return bad("file is required (multipart field \"file\")");
    };
    if part.bytes.len() > MAX_IMAGE_BYTES {
        return bad("the image must be under 10M");
    }
    let probe = match images::probe(&part.bytes) {
        Ok(p) => p,
        Err(e) => return bad(&format!("file is not a supported image: {e}")),
    };
    let name = part
        .filename
        .clone()
        .unwrap_or_else(|| format!("upload.{}", probe.format.name()));
    let url = store_file(s, &host, part.bytes.clone(), &name);
    ok(json!({"file_path": url}))
}

/// An image named by an `images` entry or a URL field: its bytes and file name.
async fn load_image(s: &Shared, entry: &Value, what: &str) -> Result<(Bytes, String), Reply> {
    if let Some(data) = entry.get("base64_data").and_then(Value::as_str) {
        let Some(rest) = data.trim().strip_prefix("data:") else {
            return Err(bad(&format!(
                "{what}.base64_data must be a data URI (data:image/png;base64,…)"
            )));
        };
        let Some((_, b64)) = rest.split_once(";base64,") else {
            return Err(bad(&format!(
                "{what}.base64_data must be a base64 data URI (data:image/png;base64,…)"
            )));
        };
        let cleaned: String = b64.chars().filter(|c| !c.is_ascii_whitespace()).collect();
        let bytes = STANDARD
            .decode(cleaned.as_bytes())
            .map_err(|_| bad(&format!("{what}.base64_data is not valid base64")))?;
        if bytes.len() > MAX_IMAGE_BYTES {
            return Err(bad("the image must be under 10M"));
        }
        return Ok((Bytes::from(bytes), "image".to_string()));
    }
    if let Some(url) = entry.get("url").and_then(Value::as_str) {
        return fetch_url(s, url.trim(), what).await;
    }
    Err(bad(&format!("{what} needs base64_data or url")))
}

/// A URL's bytes: the simulated CDN's own files directly, other loopback URLs over
/// HTTP; the simulator fetches nothing else.
async fn fetch_url(s: &Shared, url: &str, what: &str) -> Result<(Bytes, String), Reply> {
    let parsed = url::Url::parse(url).map_err(|_| bad(&format!("{what} is not a valid URL")))?;
    let path = parsed.path().to_string();
    if let Some(rest) = path.strip_prefix("/dzine/_files/") {
        let id = rest.split('/').next().unwrap_or("");
        return lock(&s.dzine.files)
            .get(id)
            .map(|f| (f.bytes.clone(), f.name.clone()))
            .ok_or_else(|| bad(&format!("{what}: no such file {url}")));
    }
    if let Some(rest) = path.strip_prefix("/dzine/_cdn/") {
        let (task, slot) =
            parse_cdn_path(rest).ok_or_else(|| bad(&format!("{what}: no such file")))?;
        let tasks = lock(&s.dzine.tasks);
        return tasks
            .get(task)
            .and_then(|t| t.outputs.get(slot).cloned().flatten())
            .map(|o| (o.bytes.clone(), format!("{task}_{slot}.{}", o.ext())))
            .ok_or_else(|| bad(&format!("{what}: no such file")));
    }
    let loopback = match parsed.host() {
        Some(url::Host::Ipv4(ip)) => ip.is_loopback(),
        Some(url::Host::Ipv6(ip)) => ip.is_loopback(),
        Some(url::Host::Domain(d)) => d == "localhost",
        None => false,
    };
    if !loopback {
        return Err(bad(&format!(
            "{what}: the image URL could not be fetched (the simulator fetches loopback URLs only)"
        )));
    }
    let fetch_error = || bad(&format!("{what}: the image URL could not be fetched"));
    let resp = s.http.get(url).send().await.map_err(|_| fetch_error())?;
    if !resp.status().is_success() {
        return Err(fetch_error());
    }
    let bytes = resp.bytes().await.map_err(|_| fetch_error())?;
    if bytes.len() > MAX_IMAGE_BYTES {
        return Err(bad("the image must be under 10M"));
    }
    let name = path.rsplit('/').next().unwrap_or("image").to_string();
    Ok((bytes, name))
}

fn parse_cdn_path(rest: &str) -> Option<(&str, usize)> {
    let (task, file) = rest.split_once('/')?;
    let slot: usize = file.split('_').next()?.parse().ok()?;
    Some((task, slot.checked_sub(1)?))
}

/// The faces the simulator "detects": none when the file name says `noface`, two
/// (the left one smaller) for `twofaces`, else one, placed from the image's size
/// and a hash of its bytes.
fn faces_for(bytes: &[u8], name: &str, w: u32, h: u32) -> Vec<Value> {
    let lower = name.to_ascii_lowercase();
    let (w, h) = (f64::from(w), f64::from(h));
    let jitter = f64::from(Sha256::digest(bytes)[0]) / 255.0 * 0.05;
    let boxes: Vec<[f64; 4]> = if lower.contains("noface") {
        Vec::new()
    } else if lower.contains("twofaces") {
        vec![
            [0.05 * w, 0.2 * h, 0.35 * w, 0.5 * h],
            [0.45 * w, 0.15 * h, 0.95 * w, 0.75 * h],
        ]
    } else {
        vec![[
            (0.3 - jitter) * w,
            (0.2 + jitter) * h,
            (0.7 - jitter) * w,
            (0.7 + jitter) * h,
        ]]
    };
    boxes
        .into_iter()
        .map(|[x1, y1, x2, y2]| {
            let (bw, bh) = (x2 - x1, y2 - y1);
            let pt = |fx: f64, fy: f64| json!([x1 + fx * bw, y1 + fy * bh]);
            json!({
                "bbox": [x1, y1, x2, y2],
                "kps": [pt(0.3, 0.4), pt(0.7, 0.4), pt(0.5, 0.6), pt(0.35, 0.8), pt(0.65, 0.8)],
            })
        })
        .collect()
}

fn first_image(body: &Map<String, Value>) -> Result<&Value, Reply> {
    match body.get("images").and_then(Value::as_array) {
        Some(list) if list.len() == 1 => Ok(&list[0]),
        Some(list) if list.len() > 1 => Err(bad("images takes exactly one image")),
        _ => Err(bad(
            "images is required: [{\"base64_data\": …}] or [{\"url\": …}]",
        )),
    }
}

async fn face_detect(s: &Shared, host: &str, body: &Map<String, Value>) -> Reply {
    let entry = match first_image(body) {
        Ok(e) => e,
        Err(r) => return r,
    };
    let (bytes, name) = match load_image(s, entry, "images[0]").await {
        Ok(x) => x,
        Err(r) => return r,
    };
    let probe = match images::probe(&bytes) {
        Ok(p) => p,
        Err(e) => return bad(&format!("images[0] is not a supported image: {e}")),
    };
    let file_path = match entry.get("url").and_then(Value::as_str) {
        Some(u) => u.trim().to_string(),
        None => store_file(s, host, bytes.clone(), &name),
    };
    ok(json!({
        "file_path": file_path,
        "face_list": faces_for(&bytes, &name, probe.width, probe.height),
    }))
}

/// A value on the 0.1 grid from 0 to 1, or the default.
fn tenth(body: &Map<String, Value>, name: &str) -> Result<f64, Reply> {
    match body.get(name) {
        None | Some(Value::Null) => Ok(0.0),
        Some(v) => {
            let x = v.as_f64().filter(|x| (0.0..=1.0).contains(x));
            match x {
                Some(x) if ((x * 10.0).round() - x * 10.0).abs() < 1e-6 => Ok(x),
                _ => Err(bad(&format!(
                    "{name} must be one of 0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1"
                ))),
            }
        }
    }
}

fn int_in(body: &Map<String, Value>, name: &str, min: i64, max: i64) -> Result<Option<i64>, Reply> {
    match body.get(name) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => match v.as_i64() {
            Some(n) if (min..=max).contains(&n) => Ok(Some(n)),
            _ => Err(bad(&format!(
                "{name} must be an integer from {min} to {max}"
            ))),
        },
    }
}

fn prompt_of(body: &Map<String, Value>) -> Result<String, Reply> {
    match body.get("prompt").and_then(Value::as_str) {
        Some(p) if !p.trim().is_empty() => {
            if p.chars().count() > MAX_PROMPT_CHARS {
                Err(bad("prompt exceeds the maximum of 800 characters"))
            } else {
                Ok(p.to_string())
            }
        }
        _ => Err(bad("prompt is required")),
    }
}

fn slots_of(body: &Map<String, Value>, count: usize) -> Result<Vec<bool>, Reply> {
    match body.get("generate_slots") {
        None | Some(Value::Null) => Ok(vec![true; count]),
        Some(Value::Array(a)) if a.len() == count => a
            .iter()
            .map(|v| match v.as_i64() {
                Some(0) => Ok(false),
                Some(1) => Ok(true),
                _ => Err(bad("generate_slots values must be 0 or 1")),
            })
            .collect::<Result<Vec<_>, _>>()
            .and_then(|v| {
                if v.contains(&true) {
                    Ok(v)
                } else {
                    Err(bad("generate_slots must enable at least one slot"))
                }
            }),
        Some(_) => Err(bad(&format!(
            "generate_slots must be a list of {count} values (0 or 1) for this model"
        ))),
    }
}

/// The sim cannot encode WebP (the `image` crate is built with png and jpeg only):
/// a webp request is answered with PNG bytes at a `.png` URL.
fn output_format(body: &Map<String, Value>, upscale: bool) -> Result<Format, Reply> {
    let v = body.get("output_format").and_then(Value::as_str);
    match (upscale, v) {
        (false, None | Some("webp")) => Ok(Format::Png),
        (false, Some("jpeg")) => Ok(Format::Jpeg),
        (false, Some(_)) => Err(bad("output_format must be \"jpeg\" or \"webp\"")),
        (true, None | Some("png")) => Ok(Format::Png),
        (true, Some("jpg")) => Ok(Format::Jpeg),
        (true, Some(_)) => Err(bad("output_format must be \"jpg\" or \"png\"")),
    }
}

fn style_of<'a>(s: &'a Shared, body: &Map<String, Value>) -> Result<&'a Style, Reply> {
    match body.get("style_code").and_then(Value::as_str) {
        Some(code) if !code.trim().is_empty() => s
            .dzine
            .style(code.trim())
            .ok_or_else(|| bad("style_code is not a valid style code (see style/list)")),
        _ => Err(bad("style_code is required")),
    }
}

fn seed_from(body: &Map<String, Value>, text: &str) -> Result<u64, Reply> {
    Ok(match int_in(body, "seed", 1, MAX_SEED)? {
        Some(n) => n as u64,
        None => {
            let d = Sha256::digest(text.as_bytes());
            u64::from(u32::from_le_bytes([d[0], d[1], d[2], d[3]]))
        }
    })
}

fn decode(s: &Shared, bytes: &[u8], what: &str) -> Result<image::DynamicImage, Reply> {
    images::decode(bytes, s.config.max_pixels)
        .map_err(|e| bad(&format!("{what} is not a usable image: {e}")))
}

/// What a creation asks for, validated, and how to make its pictures.
enum Job {
    Txt2Img {
        w: u32,
        h: u32,
        seed: u64,
    },
    Img2Img {
        input: Bytes,
        tint: f64,
        seed: u64,
    },
    FaceSwap {
        source: Bytes,
        dest: Bytes,
        sbox: [f64; 4],
        dbox: [f64; 4],
    },
    Upscale {
        input: Bytes,
        factor: f64,
    },
}

fn bbox_of(body: &Map<String, Value>, name: &str) -> Result<[f64; 4], Reply> {
    let err = || {
        bad(&format!(
            "{name} must be {{\"bbox\": [x1,y1,x2,y2], \"kps\": [[x,y], …]}}"
        ))
    };
    let c = body.get(name).ok_or_else(err)?;
    let bbox: Vec<f64> = c
        .get("bbox")
        .and_then(Value::as_array)
        .ok_or_else(err)?
        .iter()
        .map(|v| v.as_f64().ok_or_else(err))
        .collect::<Result<_, _>>()?;
    let kps = c.get("kps").and_then(Value::as_array).ok_or_else(err)?;
    if kps.is_empty()
        || !kps.iter().all(|p| {
            p.as_array()
                .is_some_and(|xy| xy.len() == 2 && xy.iter().all(Value::is_number))
        })
    {
        return Err(err());
    }
    let b: [f64; 4] = bbox.try_into().map_err(|_| err())?;
    if !(b[0] < b[2] && b[1] < b[3]) {
        return Err(err());
    }
    Ok(b)
}

fn in_image(b: &[f64; 4], w: u32, h: u32) -> bool {
    b[0] >= 0.0 && b[1] >= 0.0 && b[2] <= f64::from(w) + 0.5 && b[3] <= f64::from(h) + 0.5
}

async fn create(
    s: &Arc<Shared>,
    ctx: &Ctx,
    endpoint: &'static str,
    body: &Map<String, Value>,
) -> Reply {
    match create_inner(s, ctx, endpoint, body).await {
        Ok(r) | Err(r) => r,
    }
}

async fn create_inner(
    s: &Arc<Shared>,
    ctx: &Ctx,
    endpoint: &'static str,
    body: &Map<String, Value>,
) -> Result<Reply, Reply> {
    let mut prompt = String::new();
    let (job, slot_count, format, cost_each) = match endpoint {
        "txt2img" | "img2img" => {
            prompt = prompt_of(body)?;
            if let Some(code) = prompt
                .split("sim-code:")
                .nth(1)
                .and_then(|r| r.split(|c: char| !c.is_ascii_digit()).next())
                .and_then(|n| n.parse::<i64>().ok())
            {
                return Err(refuse(code, &format!("simulated error code {code}")));
            }
            let style = style_of(s, body)?;
            let si = tenth(body, "style_intensity")?;
            let quality = int_in(body, "quality_mode", 0, 1)?.unwrap_or(0);
            let seed = seed_from(body, &prompt)?;
            let count = if style.base_model == "X" { 2 } else { 4 };
            let format = output_format(body, false)?;
            let job = if endpoint == "txt2img" {
                let h = int_in(body, "target_h", 128, 1536)?
                    .ok_or_else(|| bad("target_h is required (128 to 1536)"))?;
                let w = int_in(body, "target_w", 128, 1536)?.unwrap_or(h);
                Job::Txt2Img {
                    w: w as u32,
                    h: h as u32,
                    seed,
                }
            } else {
                if style.base_model == "X" {
                    return Err(refuse(
                        CODE_STYLE_NOT_FOR_IMG2IMG,
                        "This style is not supported for img2img",
                    ));
                }
                tenth(body, "structure_match")?;
                int_in(body, "color_match", 0, 1)?;
                int_in(body, "face_match", 0, 1)?;
                let (input, _) = load_image(s, first_image(body)?, "images[0]").await?;
                decode(s, &input, "images[0]")?;
                Job::Img2Img {
                    input,
                    tint: 0.1 + 0.5 * si,
                    seed,
                }
            };
            (job, count, format, if quality == 1 { 2 } else { 1 })
        }
        "face_swap" => {
            let url = |name: &str| -> Result<String, Reply> {
                body.get(name)
                    .and_then(Value::as_str)
                    .map(str::trim)
                    .filter(|u| u.starts_with("http://") || u.starts_with("https://"))
                    .map(str::to_string)
                    .ok_or_else(|| bad(&format!("{name} is required (an image URL)")))
            };
            let (source, _) = fetch_url(s, &url("source_face_image")?, "source_face_image").await?;
            let (dest, _) = fetch_url(s, &url("dest_face_image")?, "dest_face_image").await?;
            let sbox = bbox_of(body, "source_face_coordinate")?;
            let dbox = bbox_of(body, "dest_face_coordinate")?;
            let sp = images::probe(&source).map_err(|e| bad(&format!("source_face_image: {e}")))?;
            let dp = images::probe(&dest).map_err(|e| bad(&format!("dest_face_image: {e}")))?;
            if !in_image(&sbox, sp.width, sp.height) {
                return Err(bad("source_face_coordinate lies outside the source image"));
            }
            if !in_image(&dbox, dp.width, dp.height) {
                return Err(bad(
                    "dest_face_coordinate lies outside the destination image",
                ));
            }
            (
                Job::FaceSwap {
                    source,
                    dest,
                    sbox,
                    dbox,
                },
                4,
                output_format(body, false)?,
                1,
            )
        }
        _ => {
            let factor = match body.get("upscaling_resize") {
                None | Some(Value::Null) => 2.0,
                Some(v) => v
                    .as_f64()
                    .filter(|f| [1.5, 2.0, 3.0, 4.0].contains(f))
                    .ok_or_else(|| bad("upscaling_resize must be 1.5, 2, 3 or 4"))?,
            };
            let (input, _) = load_image(s, first_image(body)?, "images[0]").await?;
            let p = images::probe(&input).map_err(|e| bad(&format!("images[0]: {e}")))?;
            let out_px =
                (f64::from(p.width) * factor).round() * (f64::from(p.height) * factor).round();
            if out_px > s.config.max_pixels as f64 {
                return Err(bad(
                    "the upscaled image would exceed the simulator's pixel limit",
                ));
            }
            (
                Job::Upscale { input, factor },
                1,
                output_format(body, true)?,
                2,
            )
        }
    };
    let slots = if endpoint == "upscale" {
        vec![true]
    } else {
        slots_of(body, slot_count)?
    };

    let max_pixels = s.config.max_pixels;
    let enabled = slots.clone();
    let outputs = s
        .cpu(move || make_outputs(job, &enabled, format, max_pixels))
        .await
        .map_err(|e| bad(&e))?;

    let number = s.dzine.counter.fetch_add(1, Ordering::SeqCst);
    let task_id = format!(
        "{endpoint}_{}_{number:09}_S2_2_{}",
        113_101_237_258u64,
        slots.len()
    );
    let fails = prompt
        .contains("sim-fail")
        .then(|| "simulated failure (the prompt asked for it with sim-fail)".to_string());
    let mut detail = body.clone();
    detail.remove("images");
    let images = outputs.iter().filter(|o| o.is_some()).count() as i64;
    let task = Task {
        number,
        created: Instant::now(),
        request_key: ctx.request_key.clone(),
        outputs,
        fails,
        cost: images * cost_each,
        settled: false,
        detail: Value::Object(detail),
    };
    let expire_now =
        prompt.contains("sim-expire") && lock(&s.dzine.expired_prompts).insert(prompt.clone());
    if expire_now {
        lock(&s.dzine.forgotten).insert(task_id.clone(), task.request_key.clone());
    } else {
        lock(&s.dzine.tasks).insert(task_id.clone(), task);
    }
    Ok(ok(json!({"task_id": task_id}))
        .charged()
        .remote(&task_id)
        .key(ctx.request_key.clone()))
}

fn make_outputs(
    job: Job,
    slots: &[bool],
    format: Format,
    max_pixels: u64,
) -> Result<Vec<Option<Output>>, String> {
    let base: Option<image::DynamicImage> = match &job {
        Job::Img2Img { input, .. } | Job::Upscale { input, .. } => {
            Some(images::decode(input, max_pixels)?)
        }
        Job::FaceSwap {
            source,
            dest,
            sbox,
            dbox,
        } => {
            let src = images::decode(source, max_pixels)?;
            let mut dst = images::decode(dest, max_pixels)?.to_rgba8();
            let clamp = |v: f64, max: u32| v.round().clamp(0.0, f64::from(max)) as u32;
            let (sx, sy) = (clamp(sbox[0], src.width()), clamp(sbox[1], src.height()));
            let sw = clamp(sbox[2], src.width()).saturating_sub(sx).max(1);
            let sh = clamp(sbox[3], src.height()).saturating_sub(sy).max(1);
            let (dx, dy) = (clamp(dbox[0], dst.width()), clamp(dbox[1], dst.height()));
            let dw = clamp(dbox[2], dst.width()).saturating_sub(dx).max(1);
            let dh = clamp(dbox[3], dst.height()).saturating_sub(dy).max(1);
            let face = image::DynamicImage::ImageRgba8(src.crop_imm(sx, sy, sw, sh).to_rgba8());
            let fitted = images::fit(&face, dw, dh, Fit::Stretch);
            image::imageops::overlay(&mut dst, &fitted, i64::from(dx), i64::from(dy));
            Some(image::DynamicImage::ImageRgba8(dst))
        }
        Job::Txt2Img { .. } => None,
    };
    slots
        .iter()
        .enumerate()
        .map(|(i, on)| {
            if !on {
                return Ok(None);
            }
            let img = match (&job, &base) {
                (Job::Txt2Img { w, h, seed }, _) => {
                    images::generate(*w, *h, seed.wrapping_add(i as u64 * 7919))
                }
                (Job::Upscale { factor, .. }, Some(b)) => {
                    let w = (f64::from(b.width()) * factor).round().max(1.0) as u32;
                    let h = (f64::from(b.height()) * factor).round().max(1.0) as u32;
                    images::fit(b, w, h, Fit::Stretch)
                }
                (Job::Img2Img { tint, seed, .. }, Some(b)) => {
                    let mut img = images::fit(b, b.width(), b.height(), Fit::Stretch);
                    let d = Sha256::digest((seed.wrapping_add(i as u64)).to_le_bytes());
                    images::tint(&mut img, [d[0], d[1], d[2]], *tint);
                    img
                }
                (Job::FaceSwap { .. }, Some(b)) => {
                    let mut img = b.to_rgba8();
                    images::tint(
                        &mut img,
                        [40 * i as u8, 0, 255 - 40 * i as u8],
                        0.05 * i as f64,
                    );
                    img
                }
                _ => return Err("no input image".to_string()),
            };
            let bytes = images::encode(&img, format)?;
            Ok(Some(Output {
                sha256: images::sha256_hex(&bytes),
                bytes: Bytes::from(bytes),
                format,
            }))
        })
        .collect()
}

fn signature(s: &Shared, task: &str, slot: usize, expires_ms: u64) -> String {
    presign::signature(s, "dzine-cdn", &slot.to_string(), task, expires_ms)
}

fn not_found_task(id: &str) -> Reply {
    refuse(404, &format!("task {id} not found"))
}

fn progress(s: &Shared, ctx: &Ctx, req: &Request) -> Reply {
    let id = ctx.route.remote_id.clone().unwrap_or_default();
    let host = public_host(s, req);
    let d = s.config.task_duration;
    let mut tasks = lock(&s.dzine.tasks);
    let Some(t) = tasks.get_mut(&id) else {
        return not_found_task(&id);
    };
    let age = t.created.elapsed();
    // Right after creation some tasks are not visible yet (NOTES.md); with
    // `--dzine-early-404-ms` every task, for that long (a live client needed ten 1 s
    // polls).
    let early = s.config.dzine_early_404;
    let hidden = if early.is_zero() {
        t.number % 3 == 1 && age < d / 2
    } else {
        age < early
    };
    if hidden {
        return not_found_task(&id);
    }
    s.dzine.settle(t, d);
    let fifth = d / 5;
    let (status, done) = if age >= d {
        match &t.fails {
            Some(_) => (["failed", "error"][(t.number % 2) as usize], true),
            None => (
                ["succeeded", "success", "succeed"][(t.number % 3) as usize],
                true,
            ),
        }
    } else if age < fifth {
        ("waiting", false)
    } else if age < fifth * 2 {
        ("in_queue", false)
    } else if age < fifth * 3 {
        ("processing", false)
    } else {
        ("uploading", false)
    };
    let expires = unix_ms() + s.config.link_ttl.as_millis() as u64;
    let slots: Vec<String> = t
        .outputs
        .iter()
        .enumerate()
        .map(|(i, o)| match o {
            Some(o) if done && t.fails.is_none() => format!(
                "http://{host}/dzine/_cdn/{id}/{}_output.{}?expires={expires}&sig={}",
                i + 1,
                o.ext(),
                signature(s, &id, i, expires)
            ),
            _ => String::new(),
        })
        .collect();
    let reason = if done {
        t.fails.clone().unwrap_or_default()
    } else {
        String::new()
    };
    let key = t.request_key.clone();
    ok(json!({
        "task_id": id,
        "status": status,
        "error_reason": reason,
        "generate_result_slots": slots,
    }))
    .remote(&id)
    .key(key)
}

fn detail(s: &Shared, ctx: &Ctx) -> Reply {
    let id = ctx.route.remote_id.clone().unwrap_or_default();
    let tasks = lock(&s.dzine.tasks);
    match tasks.get(&id) {
        Some(t) => ok(json!({"task_detail": t.detail})).remote(&id),
        None => not_found_task(&id),
    }
}

fn file(s: &Shared, req: &Request) -> Reply {
    let path = req.uri().path();
    let id = path
        .strip_prefix("/dzine/_files/")
        .and_then(|r| r.split('/').next())
        .unwrap_or("");
    match lock(&s.dzine.files).get(id) {
        Some(f) => {
            let ct = images::probe(&f.bytes)
                .map_or("application/octet-stream", |p| p.format.content_type());
            Reply::bytes(StatusCode::OK, ct, f.bytes.clone())
        }
        None => Reply::bytes(
            StatusCode::NOT_FOUND,
            "text/plain",
            Bytes::from_static(b"Not Found"),
        ),
    }
}

fn result(s: &Shared, ctx: &Ctx, req: &Request) -> Reply {
    let denied = |msg: &'static str| {
        Reply::bytes(
            StatusCode::FORBIDDEN,
            "text/plain",
            Bytes::from_static(msg.as_bytes()),
        )
    };
    let not_found = || {
        Reply::bytes(
            StatusCode::NOT_FOUND,
            "text/plain",
            Bytes::from_static(b"Not Found"),
        )
    };
    let rest = req.uri().path().strip_prefix("/dzine/_cdn/").unwrap_or("");
    let Some((task, slot)) = parse_cdn_path(rest) else {
        return not_found();
    };
    let q = query_pairs(req);
    let (Some(expires), Some(sig)) = (
        q.get("expires").and_then(|e| e.parse::<u64>().ok()),
        q.get("sig"),
    ) else {
        return denied("Access Denied");
    };
    if *sig != signature(s, task, slot, expires) {
        return denied("Access Denied: bad signature");
    }
    if unix_ms() > expires {
        return denied("Access Denied: link expired");
    }
    let tasks = lock(&s.dzine.tasks);
    let Some(t) = tasks.get(task) else {
        return not_found();
    };
    let key = t.request_key.clone();
    match t.outputs.get(slot).cloned().flatten() {
        Some(o) => Reply::bytes(StatusCode::OK, o.format.content_type(), o.bytes.clone())
            .sha(o.sha256.clone())
            .remote(ctx.route.remote_id.as_deref().unwrap_or(task))
            .key(key),
        None => not_found(),
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use super::super::testutil::*;
    use super::*;
    use crate::rate::RateSpec;

    async fn post(base: &str, path: &str, key: &str, body: Value) -> (u16, Value) {
        let r = client()
            .post(format!("{base}/dzine/openapi/v1{path}"))
            .header("authorization", key)
            .json(&body)
            .send()
            .await
            .unwrap();
        (r.status().as_u16(), r.json().await.unwrap_or(Value::Null))
    }

    async fn get(base: &str, path: &str) -> (u16, Value) {
        let r = client()
            .get(format!("{base}/dzine/openapi/v1{path}"))
            .header("authorization", "k")
            .send()
            .await
            .unwrap();
        (r.status().as_u16(), r.json().await.unwrap_or(Value::Null))
    }

    fn txt(extra: Value) -> Value {
        let mut b = json!({"prompt": "a fox", "style_code": STYLE_S, "target_h": 128, "generate_slots": [1, 0, 0, 0]});
        if let (Some(o), Some(e)) = (b.as_object_mut(), extra.as_object()) {
            o.extend(e.clone());
        }
        b
    }

    #[tokio::test]
    async fn envelopes_auth_and_validation() {
        let (h, base) = start(config()).await;
        for key in ["invalid-key", "Bearer k", ""] {
            let (status, v) = post(&base, "/create_task_txt2img", key, txt(json!({}))).await;
            assert_eq!((status, v["code"].as_i64()), (200, Some(401)), "{key}: {v}");
        }
        for (extra, needle) in [
            (json!({"style_intensity": 0.25}), "style_intensity"),
            (json!({"target_h": 1600}), "target_h"),
            (json!({"prompt": "x".repeat(801)}), "800"),
            (json!({"style_code": "Style-nope"}), "style_code"),
            (json!({"generate_slots": [1, 1]}), "generate_slots"),
            (json!({"seed": 0}), "seed"),
            (json!({"output_format": "png"}), "output_format"),
        ] {
            let (status, v) = post(&base, "/create_task_txt2img", "k", txt(extra.clone())).await;
            assert_eq!(status, 200);
            assert_eq!(v["code"], 400, "{extra}: {v}");
            assert!(v["msg"].as_str().unwrap().contains(needle), "{extra}: {v}");
        }
        let img = json!({"prompt": "p", "style_code": STYLE_S, "images": [{"base64_data": "iVBORw0KGgo="}]});
        let (_, v) = post(&base, "/create_task_img2img", "k", img).await;
        assert!(v["msg"].as_str().unwrap().contains("data URI"), "{v}");
        let (_, v) = post(
            &base,
            "/create_task_txt2img",
            "k",
            txt(json!({"style_code": STYLE_X, "generate_slots": [1, 1]})),
        )
        .await;
        assert_eq!(v["code"], 200, "an X style takes 2 slots: {v}");
        let (status, _) = get(&base, "/nowhere").await;
        assert_eq!(status, 404);
        assert!(ledger(&base).await.iter().filter(|e| e.charged).count() == 1);
        h.shutdown().await.unwrap();
    }

    #[tokio::test]
    async fn spellings_vary_and_new_tasks_may_be_unseen() {
        // Long enough that the "unseen" window outlasts six creations on a busy machine.
        let (h, base) = start(SimConfig {
            task_duration: Duration::from_millis(600),
            ..config()
        })
        .await;
        let mut ids = Vec::new();
        for _ in 0..6 {
            let (_, v) = post(&base, "/create_task_txt2img", "k", txt(json!({}))).await;
            ids.push(v["data"]["task_id"].as_str().unwrap().to_string());
        }
        let early: Vec<i64> = {
            let mut out = Vec::new();
            for id in &ids {
                out.push(
                    get(&base, &format!("/get_task_progress/{id}")).await.1["code"]
                        .as_i64()
                        .unwrap(),
                );
            }
            out
        };
        assert!(early.contains(&404) && early.contains(&200), "{early:?}");
        tokio::time::sleep(Duration::from_millis(650)).await;
        let mut spellings = BTreeSet::new();
        for id in &ids {
            let (_, v) = get(&base, &format!("/get_task_progress/{id}")).await;
            assert_eq!(v["code"], 200, "{v}");
            spellings.insert(v["data"]["status"].as_str().unwrap().to_string());
            let slots = v["data"]["generate_result_slots"].as_array().unwrap();
            assert_eq!(slots.len(), 4);
            assert!(slots[0].as_str().unwrap().contains("/dzine/_cdn/"));
            assert_eq!(slots[1], "");
        }
        let want: BTreeSet<String> = ["succeeded", "success", "succeed"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        assert_eq!(spellings, want);
        let (_, v) = get(&base, "/get_task_progress/txt2img_unknown").await;
        assert_eq!(v["code"], 404);
        h.shutdown().await.unwrap();
    }

    #[tokio::test]
    async fn the_rate_limit_answers_429_in_the_envelope() {
        let mut c = config();
        c.limits
            .insert("dzine".into(), vec!["1/1s".parse::<RateSpec>().unwrap()]);
        let (h, base) = start(c).await;
        let (first, _) = get(&base, "/get_token_balance").await;
        let (second, v) = get(&base, "/get_token_balance").await;
        assert_eq!((first, second), (200, 429));
        assert_eq!(v["code"], 429, "{v}");
        assert!(ledger(&base).await.iter().any(|e| e.violation));
        h.shutdown().await.unwrap();
    }
}
