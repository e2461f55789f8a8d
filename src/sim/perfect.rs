//! Perfect Corp's S2S API (`perfect.txt`), served under `/perfect/s2s/v1.0`, with its
//! presigned upload and result storage under `/perfect/_upload` and `/perfect/_results`
//! (not metered: they stand for S3, not the API host).
//!
//! * Auth: an RSA key pair made at start from the seed (1024-bit, like the document's
//!   example): `credentials()` hands out the client id and the Base64 X.509 public key.
//!   `POST /client/auth` decrypts the id token (PKCS#1 v1.5) and checks the client id
//!   and a timestamp within five minutes; tokens live `token_ttl`, then answer 401
//!   `InvalidAccessToken`. Any other Bearer value is taken as a console API key (the
//!   shared rule: not empty, not starting with `invalid`), accepted on
//!   `GET /client/credit` only (the routes the official clients send it to).
//! * Credit: `GET /client/credit` answers `results[{type, amount}]`; the
//!   `ApiSubscription` batch loses one credit per charged task.
//! * Chaos for live behaviour: `perfect_early_invalid` (new tasks answer
//!   `InvalidTaskId` that long), `perfect_style_shape` (where style lists put items).
//! * Files: `POST /file/<slug>` answers presigned PUT URLs that check the signature,
//!   the expiry and the headers handed out (exactly).
//! * Tasks: `POST /task/<slug>` validates files and parameters; the same files with the
//!   same `request_id` answer the task already made (never a second charge). A task
//!   runs `task_duration`, then succeeds or ends with the error its inputs asked for.
//!   A task not polled for `keep_alive` while running is dropped: polls answer 400
//!   `InvalidTaskId`. Finished tasks stay pollable and each poll signs fresh result
//!   URLs valid `link_ttl` (403 after).
//! * Charges: credits go on success, so the first poll that reports a task's success is
//!   the ledger entry marked `charged`, keyed by the `request_id`.
//!
//! Error triggers, for tests: an input file name containing one of the document's
//! error codes (`face_error_no_face.jpg`), or a text-to-image prompt containing
//! `sim-error:<code>`, ends the task with that code. Permanent codes always do;
//! transient ones (`error_inference`, `error_upload`, `error_download_*`,
//! `unknown_internal_error`, `exceed_nsfw_retry_limits`) only on the first run of those
//! files (or that prompt), so a retry succeeds.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use axum::body::Bytes;
use axum::extract::Request;
use axum::http::{header, Method, StatusCode};
use base64::Engine;
use image::{Rgba, RgbaImage};
use rsa::pkcs8::EncodePublicKey;
use rsa::{Pkcs1v15Encrypt, RsaPrivateKey};
use serde_json::{json, Map, Value};
use sha2::{Digest, Sha256};

use super::form;
use super::images::{self, Fit, Format};
use super::presign::{self, public_host, xml_err};
use super::{header_str, key_ok, lock, unix_ms, Ctx, Reply, Route, Shared, SimConfig};

const API: &str = "/s2s/v1.0";
const UPLOAD: &str = "/_upload/";
const RESULTS: &str = "/_results/";
/// Prefix of the access tokens this simulator issues: a Bearer value with it must be a
/// live token; anything else is judged as an API key.
const TOKEN_PREFIX: &str = "sim-at-";
/// How far an id token's timestamp may be from now.
const CLOCK_SKEW_MS: u64 = 5 * 60 * 1000;
/// "< 10MB".
const MAX_UPLOAD: usize = 10_000_000 - 1;
/// Styled features and text-to-image: groups and styles per group, enough for two
/// pages of 20 each.
const GROUPS: u64 = 25;
const STYLES_PER_GROUP: u64 = 23;
/// Above 2^53: a client that reads ids as `f64` sends a different id and is refused.
const ID_BASE: u64 = (1 << 53) + 1;

/// The slugs served, with the `file_sets` fields each takes and its output formats.
struct SimFeature {
    slug: &'static str,
    sets: &'static [&'static str],
    styled: bool,
    exts: &'static [&'static str],
}

const FEATURES: &[SimFeature] = &[
    SimFeature {
        slug: "hair-style",
        sets: &["src_ids"],
        styled: true,
        exts: &["jpg"],
    },
    SimFeature {
        slug: "wig",
        sets: &["src_ids"],
        styled: true,
        exts: &["jpg"],
    },
    SimFeature {
        slug: "hair-ext",
        sets: &["src_ids"],
        styled: true,
        exts: &["jpg"],
    },
    SimFeature {
        slug: "hair-bang",
        sets: &["src_ids"],
        styled: true,
        exts: &["jpg"],
    },
    SimFeature {
        slug: "hair-vol",
        sets: &["src_ids"],
        styled: true,
        exts: &["jpg"],
    },
    SimFeature {
        slug: "aging",
        sets: &["src_ids"],
        styled: false,
        exts: &["jpg"],
    },
    SimFeature {
        slug: "mu-trans-rec",
        sets: &["src_ids", "ref_ids"],
        styled: false,
        exts: &["jpg"],
    },
    SimFeature {
        slug: "obj-removal",
        sets: &["src_ids", "mask_ids"],
        styled: false,
        exts: &["jpg", "webp"],
    },
    SimFeature {
        slug: "colorize",
        sets: &["src_ids"],
        styled: false,
        exts: &["jpg", "webp"],
    },
    SimFeature {
        slug: "sod",
        sets: &["src_ids"],
        styled: false,
        exts: &["png", "webp"],
    },
    SimFeature {
        slug: "enhance",
        sets: &["src_ids"],
        styled: false,
        exts: &["jpg", "webp"],
    },
    SimFeature {
        slug: "text-to-image",
        sets: &[],
        styled: true,
        exts: &["jpg"],
    },
];

fn sim_feature(slug: &str) -> Option<(usize, &'static SimFeature)> {
    FEATURES.iter().enumerate().find(|(_, f)| f.slug == slug)
}

const ERROR_CODES: &[(&str, bool)] = &[
    ("exceed_max_filesize", true),
    ("invalid_parameter", true),
    ("error_download_image", false),
    ("error_download_mask", false),
    ("error_decode_image", true),
    ("error_decode_mask", true),
    ("error_nsfw_content_detected", true),
    ("error_no_face", true),
    ("error_pose", true),
    ("error_face_parsing", true),
    ("error_inference", false),
    ("exceed_nsfw_retry_limits", false),
    ("error_upload", false),
    ("error_multiple_people", true),
    ("error_no_shoulder", true),
    ("error_large_face_angle", true),
    ("unknown_internal_error", false),
];

/// The code named in `text`, longest match first (`error_decode_image` before any
/// shorter code it contains).
fn code_in(text: &str) -> Option<(&'static str, bool)> {
    let mut codes: Vec<&(&str, bool)> = ERROR_CODES.iter().collect();
    codes.sort_by_key(|(c, _)| std::cmp::Reverse(c.len()));
    codes.into_iter().find(|(c, _)| text.contains(c)).copied()
}

// ---------------------------------------------------------------------------------------
// State

pub(crate) struct PerfectState {
    client_id: String,
    /// `None` if key generation failed (then every auth answers 500).
    key: Option<RsaPrivateKey>,
    public_b64: String,
    /// Access token -> when it stops being valid.
    tokens: Mutex<HashMap<String, Instant>>,
    files: Mutex<HashMap<String, SimFile>>,
    /// Upload handle (in the presigned URL) -> file id.
    uploads: Mutex<HashMap<String, String>>,
    tasks: Mutex<HashMap<String, Task>>,
    /// Idempotency key (slug, files, request_id) -> task id.
    runs: Mutex<HashMap<String, String>>,
    /// Sets of files (or prompts) whose transient error has been served once.
    failed_once: Mutex<std::collections::HashSet<String>>,
    /// Result id -> (task id, output index).
    results: Mutex<HashMap<String, (String, usize)>>,
}

impl std::fmt::Debug for PerfectState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PerfectState")
            .field("client_id", &self.client_id)
            .finish()
    }
}

#[derive(Debug, Clone)]
struct SimFile {
    slug: String,
    file_name: String,
    content_type: String,
    bytes: Option<Bytes>,
}

#[derive(Debug)]
struct Output {
    id: String,
    bytes: Bytes,
    sha256: String,
    ext: &'static str,
    res_age: Option<u32>,
}

#[derive(Debug)]
struct Task {
    slug: String,
    /// What the ledger calls the task's entries: the client's `X-Request-Id` when it
    /// sends one (pixbatch sends its submit key), else the `request_id`.
    ledger_key: String,
    /// When the run was accepted: `--perfect-early-invalid-ms` counts from it.
    created: Instant,
    finish_at: Instant,
    last_contact: Instant,
    dropped: bool,
    error: Option<&'static str>,
    outputs: Vec<Arc<Output>>,
    charged: bool,
    custom_info: Option<Value>,
}

impl PerfectState {
    pub(crate) fn new(config: &SimConfig) -> Self {
        use rand_chacha::rand_core::SeedableRng;
        let seed: [u8; 32] = Sha256::new()
            .chain_update(b"pixbatch-sim-perfect-rsa")
            .chain_update(config.seed.to_le_bytes())
            .finalize()
            .into();
        let mut rng = rand_chacha::ChaCha20Rng::from_seed(seed);
        let key = RsaPrivateKey::new(&mut rng, 1024).ok();
        let public_b64 = key
            .as_ref()
            .and_then(|k| k.to_public_key().to_public_key_der().ok())
            .map(|der| base64::engine::general_purpose::STANDARD.encode(der.as_bytes()))
            .unwrap_or_default();
        let client_id = hex::encode(
            &Sha256::digest(format!("pixbatch-sim-perfect-client-{}", config.seed))[..16],
        );
        PerfectState {
            client_id,
            key,
            public_b64,
            tokens: Mutex::default(),
            files: Mutex::default(),
            uploads: Mutex::default(),
            tasks: Mutex::default(),
            runs: Mutex::default(),
            failed_once: Mutex::default(),
            results: Mutex::default(),
        }
    }
}

/// What a client needs to talk to this simulator (shown by `pixbatch sim` and
/// `/_sim/credentials`).
pub(crate) fn credentials(s: &Shared) -> serde_json::Value {
    json!({
        "PERFECT_CLIENT_ID": s.perfect.client_id,
        "PERFECT_CLIENT_SECRET": s.perfect.public_b64,
    })
}

/// An id in the document's shape (`SX9ALF1Z+KIiNa+…/LID`): Base64 with `+` and `/`,
/// so a client that does not URL-encode it is caught.
fn new_id(s: &Shared) -> String {
    let raw = Sha256::digest(s.new_uuid().as_bytes());
    let b64 = base64::engine::general_purpose::STANDARD_NO_PAD.encode(&raw[..30]);
    format!("{}+{}/{}", &b64[..8], &b64[8..20], &b64[20..])
}

// ---------------------------------------------------------------------------------------
// Routing, auth, error shapes

pub(crate) fn route(method: &Method, rest: &str) -> Route {
    if let Some(handle) = rest.strip_prefix(UPLOAD) {
        return Route::api("upload").unmetered().about(handle);
    }
    if let Some(name) = rest.strip_prefix(RESULTS) {
        return Route::api("result").unmetered().image().about(name);
    }
    let Some(p) = rest.strip_prefix(API) else {
        return Route::api("unknown");
    };
    let segs: Vec<&str> = p.trim_start_matches('/').split('/').collect();
    match (method.clone(), segs.as_slice()) {
        (Method::POST, ["client", "auth"]) => Route::api("auth"),
        (Method::GET, ["client", "credit"]) => Route::api("credit"),
        (Method::POST, ["file", _]) => Route::api("file"),
        (Method::GET, ["task", "style-group", _]) => Route::api("style_groups"),
        (Method::GET, ["task", "style", _]) => Route::api("styles"),
        (Method::POST, ["task", _]) => Route::api("task_run"),
        (Method::GET, ["task", _]) => Route::api("task_status"),
        _ => Route::api("unknown"),
    }
}

pub(crate) fn request_key_hint(_s: &Shared, _route: &Route) -> Option<String> {
    None
}

fn err(status: StatusCode, error_code: &str, message: &str) -> Reply {
    let reason = status.canonical_reason().unwrap_or("Error");
    let mut body = json!({"status": status.as_u16(), "error": reason, "error_code": error_code});
    if !message.is_empty() {
        body["message"] = json!(message);
    }
    Reply::json(status, &body)
}

fn invalid(message: &str) -> Reply {
    err(StatusCode::BAD_REQUEST, "invalid_parameter", message)
}

fn ok(result: Value) -> Reply {
    Reply::json(StatusCode::OK, &json!({"status": 200, "result": result}))
}

pub(crate) fn too_many(route: &Route) -> Reply {
    if !route.metered {
        return xml_err(
            StatusCode::TOO_MANY_REQUESTS,
            "SlowDown",
            "Please reduce your request rate.",
        );
    }
    err(StatusCode::TOO_MANY_REQUESTS, "TooManyRequests", "")
}

pub(crate) fn server_error(route: &Route, status: StatusCode) -> Reply {
    if !route.metered {
        return xml_err(
            status,
            "InternalError",
            "We encountered an internal error. Please try again.",
        );
    }
    err(status, "unknown_internal_error", "")
}

fn unauthorized() -> Reply {
    err(StatusCode::UNAUTHORIZED, "InvalidAccessToken", "")
}

pub(crate) fn authorize(s: &Shared, ctx: &Ctx, req: &Request) -> Result<(), Reply> {
    // Storage checks its signatures itself; auth needs no token.
    if !ctx.route.metered || ctx.route.endpoint == "auth" {
        return Ok(());
    }
    let Some(bearer) =
        header_str(req.headers(), "authorization").and_then(|a| a.strip_prefix("Bearer "))
    else {
        return Err(unauthorized());
    };
    let bearer = bearer.trim();
    if bearer.starts_with(TOKEN_PREFIX) {
        let live = lock(&s.perfect.tokens)
            .get(bearer)
            .is_some_and(|until| Instant::now() < *until);
        return if live { Ok(()) } else { Err(unauthorized()) };
    }
    if !key_ok(bearer) {
        return Err(unauthorized());
    }
    // A console API key: the official YouCam-API clients send it to the v2.x routes
    // and to the credit endpoint only; nobody shows it on the v1.0 file, task or
    // style routes, so the simulator takes it on the credit endpoint alone
    // (docs/providers.md, "live evidence").
    if ctx.route.endpoint == "credit" {
        Ok(())
    } else {
        Err(err(
            StatusCode::UNAUTHORIZED,
            "InvalidAccessToken",
            "v1.0 task routes take an access token from POST /s2s/v1.0/client/auth, not a console API key",
        ))
    }
}

/// What the credit batches start with (`ApiSubscription`); each charged task takes one.
pub(crate) const START_CREDITS: i64 = 10_000;

/// `GET /s2s/v1.0/client/credit`: the batches in the shape the official client reads
/// (top-level `results[{type, amount}]`; it spends the types starting `Api`). A
/// non-API batch is included so a client that sums every type is caught.
fn credit(s: &Shared) -> Reply {
    let spent = lock(&s.perfect.tasks)
        .values()
        .filter(|t| t.charged)
        .count() as i64;
    Reply::json(
        StatusCode::OK,
        &json!({"status": 200, "results": [
            {"type": "ApiSubscription", "amount": START_CREDITS - spent},
            {"type": "WebTrial", "amount": 25},
        ]}),
    )
}

fn slug_of(req: &Request) -> String {
    req.uri()
        .path()
        .rsplit('/')
        .next()
        .unwrap_or("")
        .to_string()
}

fn query_param(req: &Request, name: &str) -> Option<String> {
    url::form_urlencoded::parse(req.uri().query().unwrap_or("").as_bytes())
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.into_owned())
}

// ---------------------------------------------------------------------------------------
// Handlers

pub(crate) async fn handle(s: &Arc<Shared>, ctx: &Ctx, req: Request) -> Reply {
    match ctx.route.endpoint {
        "auth" => auth(s, req).await,
        "file" => file_create(s, req).await,
        "upload" => upload(s, ctx, req).await,
        "task_run" => run(s, ctx, req).await,
        "task_status" => status(s, &req),
        "result" => result_file(s, ctx, &req),
        "style_groups" => style_list(s, &req, false),
        "styles" => style_list(s, &req, true),
        "credit" => credit(s),
        _ => {
            if ctx.route.metered {
                err(StatusCode::NOT_FOUND, "NotFound", "no such path")
            } else {
                xml_err(
                    StatusCode::NOT_FOUND,
                    "NoSuchKey",
                    "The specified key does not exist.",
                )
            }
        }
    }
}

async fn json_body(s: &Shared, req: Request) -> Result<Value, Reply> {
    let body = form::read_body(req, s.config.max_body_bytes)
        .await
        .map_err(|e| err(e.status(), "invalid_parameter", &e.message()))?;
    serde_json::from_slice(&body).map_err(|e| invalid(&format!("the body is not JSON: {e}")))
}

async fn auth(s: &Shared, req: Request) -> Reply {
    let v = match json_body(s, req).await {
        Ok(v) => v,
        Err(r) => return r,
    };
    let refused = |code: &str, msg: &str| err(StatusCode::UNAUTHORIZED, code, msg);
    let (Some(client_id), Some(id_token)) = (
        v.get("client_id").and_then(Value::as_str),
        v.get("id_token").and_then(Value::as_str),
    ) else {
        return invalid("client_id and id_token are required strings");
    };
    if client_id != s.perfect.client_id {
        return refused("InvalidClientId", "unknown client_id");
    }
    let Some(key) = &s.perfect.key else {
        return err(
            StatusCode::INTERNAL_SERVER_ERROR,
            "unknown_internal_error",
            "simulator has no key",
        );
    };
    let Ok(sealed) = base64::engine::general_purpose::STANDARD.decode(id_token.trim()) else {
        return refused("InvalidIdToken", "id_token is not Base64");
    };
    let Ok(plain) = key.decrypt(Pkcs1v15Encrypt, &sealed) else {
        return refused(
            "InvalidIdToken",
            "id_token does not decrypt with this client's key",
        );
    };
    let plain = String::from_utf8_lossy(&plain).into_owned();
    let mut id = None;
    let mut ts = None;
    for (k, v) in url::form_urlencoded::parse(plain.as_bytes()) {
        match k.as_ref() {
            "client_id" => id = Some(v.into_owned()),
            "timestamp" => ts = v.parse::<u64>().ok(),
            _ => {}
        }
    }
    if id.as_deref() != Some(client_id) {
        return refused("InvalidIdToken", "id_token names another client_id");
    }
    let Some(ts) = ts else {
        return refused("InvalidIdToken", "id_token has no millisecond timestamp");
    };
    if unix_ms().abs_diff(ts) > CLOCK_SKEW_MS {
        return refused("InvalidIdToken", "id_token timestamp is too far from now");
    }
    let token = format!("{TOKEN_PREFIX}{}", s.new_uuid());
    lock(&s.perfect.tokens).insert(token.clone(), Instant::now() + s.config.token_ttl);
    ok(json!({"access_token": token}))
}

async fn file_create(s: &Shared, req: Request) -> Reply {
    let slug = slug_of(&req);
    let host = public_host(s, &req);
    let Some((_, f)) = sim_feature(&slug) else {
        return err(
            StatusCode::NOT_FOUND,
            "NotFound",
            &format!("no feature {slug:?}"),
        );
    };
    if f.sets.is_empty() {
        return err(
            StatusCode::NOT_FOUND,
            "NotFound",
            "this feature takes no files",
        );
    }
    let v = match json_body(s, req).await {
        Ok(v) => v,
        Err(r) => return r,
    };
    let Some(files) = v
        .get("files")
        .and_then(Value::as_array)
        .filter(|a| !a.is_empty() && a.len() <= 4)
    else {
        return invalid("files must be a list of 1 to 4 objects");
    };
    let mut allowed = vec!["image/jpg", "image/jpeg", "image/png"];
    if slug == "mu-trans-rec" {
        allowed.extend(["image/tiff", "image/gif"]);
    }
    let mut out = Vec::new();
    for (i, file) in files.iter().enumerate() {
        let ct = file
            .get("content_type")
            .and_then(Value::as_str)
            .unwrap_or("");
        if !allowed.contains(&ct) {
            return invalid(&format!(
                "files[{i}].content_type must be one of {allowed:?}"
            ));
        }
        let Some(name) = file
            .get("file_name")
            .and_then(Value::as_str)
            .filter(|n| !n.is_empty())
        else {
            return invalid(&format!("files[{i}].file_name is required"));
        };
        let file_id = new_id(s);
        let handle = s.new_uuid();
        let expires = unix_ms() + s.config.link_ttl.as_millis() as u64;
        let url = format!(
            "http://{host}/perfect{UPLOAD}{handle}?expires={expires}&sig={}",
            presign::signature(s, "perfect", "PUT", &handle, expires)
        );
        lock(&s.perfect.files).insert(
            file_id.clone(),
            SimFile {
                slug: slug.clone(),
                file_name: name.to_string(),
                content_type: ct.to_string(),
                bytes: None,
            },
        );
        lock(&s.perfect.uploads).insert(handle, file_id.clone());
        out.push(json!({
            "content_type": ct,
            "file_name": name,
            "file_id": file_id,
            "requests": [{
                "method": "PUT",
                "url": url,
                "headers": {"Content-Type": ct, "x-amz-server-side-encryption": "AES256"},
            }],
        }));
    }
    ok(json!({ "files": out }))
}

async fn upload(s: &Shared, ctx: &Ctx, req: Request) -> Reply {
    let handle = ctx.route.remote_id.clone().unwrap_or_default();
    if req.method() != Method::PUT {
        return xml_err(
            StatusCode::METHOD_NOT_ALLOWED,
            "MethodNotAllowed",
            "The specified method is not allowed against this resource.",
        );
    }
    if let Err(r) = presign::check(s, &req, "perfect", "PUT", &handle) {
        return r;
    }
    let Some(file_id) = lock(&s.perfect.uploads).get(&handle).cloned() else {
        return xml_err(
            StatusCode::NOT_FOUND,
            "NoSuchKey",
            "The specified key does not exist.",
        );
    };
    let Some(expected) = lock(&s.perfect.files)
        .get(&file_id)
        .map(|f| f.content_type.clone())
    else {
        return xml_err(
            StatusCode::NOT_FOUND,
            "NoSuchKey",
            "The specified key does not exist.",
        );
    };
    // The signature covers these headers: anything else is refused, like S3 does.
    if header_str(req.headers(), "content-type") != Some(expected.as_str())
        || header_str(req.headers(), "x-amz-server-side-encryption") != Some("AES256")
    {
        return xml_err(StatusCode::FORBIDDEN, "SignatureDoesNotMatch", "The headers sent do not match the signed headers (Content-Type, x-amz-server-side-encryption).");
    }
    let body = match form::read_body(req, s.config.max_body_bytes).await {
        Ok(b) => b,
        Err(e) => return xml_err(e.status(), "InvalidRequest", &e.message()),
    };
    if body.is_empty() {
        return xml_err(StatusCode::BAD_REQUEST, "InvalidRequest", "empty body");
    }
    if body.len() > MAX_UPLOAD {
        return xml_err(
            StatusCode::BAD_REQUEST,
            "EntityTooLarge",
            "Your proposed upload exceeds the maximum allowed size",
        );
    }
    let etag = format!("\"{}\"", &images::sha256_hex(&body)[..32]);
    if let Some(f) = lock(&s.perfect.files).get_mut(&file_id) {
        f.bytes = Some(body);
    }
    Reply::empty(StatusCode::OK)
        .header(header::ETAG, &etag)
        .remote(&file_id)
}

fn u64_of(v: Option<&Value>) -> Option<u64> {
    v?.as_u64()
}

/// Groups of a styled slug, and the styles of a group: deterministic, above 2^53.
fn group_id(slug_index: usize, i: u64) -> u64 {
    ID_BASE + 1_000_000 * slug_index as u64 + 1000 * i
}

fn style_valid(slug_index: usize, group: u64, style: u64) -> bool {
    (0..GROUPS).any(|i| group_id(slug_index, i) == group)
        && style > group
        && style - group <= STYLES_PER_GROUP
}

/// What a run asks for, checked.
struct RunSpec {
    request_id: u64,
    files: Vec<(String, SimFile)>,
    group: Option<u64>,
    style: Option<u64>,
    scale: u32,
    prompt: Option<String>,
    ext: &'static str,
}

fn parse_run(s: &Shared, slug_index: usize, f: &SimFeature, v: &Value) -> Result<RunSpec, Reply> {
    let Some(request_id) = v.get("request_id").and_then(Value::as_u64) else {
        return Err(invalid("request_id must be a non-negative integer"));
    };
    let payload = v
        .get("payload")
        .filter(|p| p.is_object())
        .ok_or_else(|| invalid("payload is required"))?;
    let mut files = Vec::new();
    if !f.sets.is_empty() {
        let sets = payload
            .get("file_sets")
            .filter(|p| p.is_object())
            .ok_or_else(|| invalid("payload.file_sets is required"))?;
        for field in f.sets {
            let ids = sets
                .get(*field)
                .and_then(Value::as_array)
                .ok_or_else(|| invalid(&format!("file_sets.{field} is required")))?;
            let [id] = ids.as_slice() else {
                return Err(invalid(&format!("file_sets.{field} takes exactly 1 file")));
            };
            let id = id
                .as_str()
                .ok_or_else(|| invalid(&format!("file_sets.{field} holds strings")))?;
            let file = lock(&s.perfect.files).get(id).cloned();
            match file {
                Some(sf) if sf.slug == f.slug && sf.bytes.is_some() => {
                    files.push((id.to_string(), sf))
                }
                Some(sf) if sf.bytes.is_none() => {
                    return Err(invalid(&format!("file {id} was never uploaded")))
                }
                Some(_) => {
                    return Err(invalid(&format!(
                        "file {id} was created for another feature"
                    )))
                }
                None => return Err(invalid(&format!("unknown file_id {id}"))),
            }
        }
    }
    let actions = payload
        .get("actions")
        .and_then(Value::as_array)
        .ok_or_else(|| invalid("payload.actions is required"))?;
    let [action] = actions.as_slice() else {
        return Err(invalid("actions: only accept 1 action"));
    };
    if u64_of(action.get("id")).is_none() {
        return Err(invalid("actions[0].id must be an integer"));
    }
    let params = action
        .get("params")
        .cloned()
        .unwrap_or(Value::Object(Map::new()));
    let mut spec = RunSpec {
        request_id,
        files,
        group: None,
        style: None,
        scale: 1,
        prompt: None,
        ext: f.exts[0],
    };
    if f.styled {
        let group = u64_of(params.get("style_group_id"))
            .ok_or_else(|| invalid("style_group_id must be an integer"))?;
        let style = match params
            .get("style_ids")
            .and_then(Value::as_array)
            .map(Vec::as_slice)
        {
            Some([one]) => one
                .as_u64()
                .ok_or_else(|| invalid("style_ids holds integers"))?,
            _ => return Err(invalid("style_ids: only accept 1 style")),
        };
        if !style_valid(slug_index, group, style) {
            return Err(invalid(&format!("no style {style} in style group {group}")));
        }
        spec.group = Some(group);
        spec.style = Some(style);
    }
    if f.slug == "enhance" {
        spec.scale = match params.get("scale").and_then(Value::as_u64) {
            Some(x @ (1 | 2 | 4)) => x as u32,
            _ => return Err(invalid("scale must be 1, 2 or 4")),
        };
    }
    if f.slug == "text-to-image" {
        let prompt = params
            .get("prompt")
            .and_then(Value::as_str)
            .filter(|p| !p.trim().is_empty());
        spec.prompt = Some(
            prompt
                .ok_or_else(|| invalid("prompt is required"))?
                .to_string(),
        );
    }
    if let Some(ext) = payload.get("output_ext") {
        let ext = ext.as_str().unwrap_or("");
        spec.ext = f
            .exts
            .iter()
            .find(|e| **e == ext)
            .copied()
            .ok_or_else(|| invalid(&format!("output_ext must be one of {:?}", f.exts)))?;
    }
    if spec.ext == "webp" {
        return Err(invalid(
            "simulator limit: webp output is not simulated (use jpg or png)",
        ));
    }
    Ok(spec)
}

async fn run(s: &Arc<Shared>, ctx: &Ctx, req: Request) -> Reply {
    let slug = slug_of(&req);
    let Some((slug_index, f)) = sim_feature(&slug) else {
        return err(
            StatusCode::NOT_FOUND,
            "NotFound",
            &format!("no feature {slug:?}"),
        );
    };
    let v = match json_body(s, req).await {
        Ok(v) => v,
        Err(r) => return r,
    };
    let spec = match parse_run(s, slug_index, f, &v) {
        Ok(x) => x,
        Err(r) => return r,
    };
    let key = Some(
        ctx.request_key
            .clone()
            .unwrap_or_else(|| spec.request_id.to_string()),
    );
    let ids: Vec<&str> = spec.files.iter().map(|(id, _)| id.as_str()).collect();
    let idem = format!("{slug}\n{}\n{}", ids.join(","), spec.request_id);
    // A repeated request_id for the same files is ignored: the task already made.
    if let Some(task_id) = lock(&s.perfect.runs).get(&idem).cloned() {
        return ok(json!({"task_id": task_id})).remote(&task_id).key(key);
    }

    let trigger_text = match &spec.prompt {
        Some(p) => p.to_string(),
        None => spec
            .files
            .iter()
            .map(|(_, f)| f.file_name.as_str())
            .collect::<Vec<_>>()
            .join("|"),
    };
    let error_text = match &spec.prompt {
        Some(p) => p.split("sim-error:").nth(1).unwrap_or(""),
        None => trigger_text.as_str(),
    };
    let mut error = code_in(error_text).and_then(|(code, permanent)| {
        let once = format!(
            "{slug}\n{}\n{}",
            ids.join(","),
            spec.prompt.as_deref().unwrap_or("")
        );
        (permanent || lock(&s.perfect.failed_once).insert(once)).then_some(code)
    });
    // `sim-drop-once`: the first task of these files is dropped at once, as if never
    // polled in time (deterministic lost-task tests).
    let drop_now = trigger_text.contains("sim-drop-once") && {
        let once = format!(
            "drop\n{slug}\n{}\n{}",
            ids.join(","),
            spec.prompt.as_deref().unwrap_or("")
        );
        lock(&s.perfect.failed_once).insert(once)
    };
    let mut outputs = Vec::new();
    let mut custom_info = None;
    if error.is_none() {
        match make_outputs(s, f, &spec).await {
            Ok((o, info)) => {
                outputs = o;
                custom_info = info;
            }
            Err(code) => error = Some(code),
        }
    }
    let task_id = new_id(s);
    let now = Instant::now();
    lock(&s.perfect.results).extend(
        outputs
            .iter()
            .enumerate()
            .map(|(i, o)| (o.id.clone(), (task_id.clone(), i))),
    );
    // Check-and-insert under one lock: two identical runs racing make one task.
    let mut runs = lock(&s.perfect.runs);
    if let Some(existing) = runs.get(&idem).cloned() {
        return ok(json!({"task_id": existing})).remote(&existing).key(key);
    }
    runs.insert(idem, task_id.clone());
    lock(&s.perfect.tasks).insert(
        task_id.clone(),
        Task {
            slug,
            ledger_key: key.clone().unwrap_or_default(),
            created: ctx.arrived,
            finish_at: ctx.arrived + s.config.task_duration,
            last_contact: now,
            dropped: drop_now,
            error,
            outputs,
            charged: false,
            custom_info,
        },
    );
    drop(runs);
    ok(json!({"task_id": task_id})).remote(&task_id).key(key)
}

/// One result: its bytes and, for aging, the age it shows.
type Made = (Vec<u8>, Option<u32>);

/// The result images, or the error code the engine would give.
async fn make_outputs(
    s: &Arc<Shared>,
    f: &'static SimFeature,
    spec: &RunSpec,
) -> Result<(Vec<Arc<Output>>, Option<Value>), &'static str> {
    let max = s.config.max_pixels;
    let format = if spec.ext == "png" {
        Format::Png
    } else {
        Format::Jpeg
    };
    let ext = spec.ext;
    let inputs: Vec<Bytes> = spec
        .files
        .iter()
        .filter_map(|(_, f)| f.bytes.clone())
        .collect();
    let seed = spec.style.unwrap_or(0);
    let scale = spec.scale;
    let prompt = spec.prompt.clone();
    let slug = f.slug;
    let made = s
        .cpu(move || -> Result<Vec<Made>, String> {
            if slug == "text-to-image" {
                let h = Sha256::digest(format!("{}\n{seed}", prompt.unwrap_or_default()));
                let mut b = [0u8; 8];
                b.copy_from_slice(&h[..8]);
                let img = images::generate(512, 512, u64::from_le_bytes(b));
                return Ok(vec![(images::encode(&img, format)?, None)]);
            }
            let src = images::decode(inputs.first().map_or(&[][..], |b| &b[..]), max)
                .map_err(|_| "error_decode_image".to_string())?;
            let (w, h) = (src.width(), src.height());
            let mut img = src.to_rgba8();
            match slug {
                "enhance" => {
                    let scale = u64::from(scale.max(1));
                    let (ow, oh) = (u64::from(w) * scale, u64::from(h) * scale);
                    if ow * oh > max {
                        return Err("exceed_max_filesize".into());
                    }
                    img = images::fit(&src, ow as u32, oh as u32, Fit::Stretch);
                }
                "aging" => {
                    let mut out = Vec::new();
                    for (age, amount) in [(20u32, 0.15), (50, 0.3), (65, 0.45)] {
                        let mut older = img.clone();
                        images::tint(&mut older, [200, 200, 200], amount);
                        out.push((images::encode(&older, format)?, Some(age)));
                    }
                    // The data list holds the upload too, in order of age.
                    let original = inputs.first().map(|b| b.to_vec()).unwrap_or_default();
                    out.insert(1, (original, Some(35)));
                    return Ok(out);
                }
                "mu-trans-rec" => {
                    let reference = images::decode(inputs.get(1).map_or(&[][..], |b| &b[..]), max)
                        .map_err(|_| "error_decode_image".to_string())?;
                    images::tint(&mut img, mean_rgb(&reference.to_rgba8()), 0.35);
                }
                "obj-removal" => {
                    let mask = images::decode(inputs.get(1).map_or(&[][..], |b| &b[..]), max)
                        .map_err(|_| "error_decode_mask".to_string())?
                        .to_luma8();
                    if mask.dimensions() != (w, h) {
                        return Err("invalid_parameter".into());
                    }
                    let fill = mean_rgb(&img);
                    for (x, y, px) in img.enumerate_pixels_mut() {
                        if mask.get_pixel(x, y).0[0] > 127 {
                            *px = Rgba([fill[0], fill[1], fill[2], 255]);
                        }
                    }
                }
                "colorize" => {
                    let grey = image::DynamicImage::ImageRgba8(img.clone()).to_luma8();
                    for (x, y, px) in img.enumerate_pixels_mut() {
                        let l = u16::from(grey.get_pixel(x, y).0[0]);
                        *px = Rgba([
                            (l * 9 / 10 + 25).min(255) as u8,
                            (l * 8 / 10 + 15) as u8,
                            (l * 6 / 10) as u8,
                            255,
                        ]);
                    }
                }
                "sod" => {
                    // Keep a centred ellipse as the "subject"; the rest goes transparent.
                    let (cx, cy) = (f64::from(w) / 2.0, f64::from(h) / 2.0);
                    for (x, y, px) in img.enumerate_pixels_mut() {
                        let dx = (f64::from(x) - cx) / cx.max(1.0);
                        let dy = (f64::from(y) - cy) / cy.max(1.0);
                        if dx * dx + dy * dy > 0.8 {
                            px.0[3] = 0;
                        }
                    }
                }
                _ => {
                    // The hair features: a colour per feature and style.
                    let h = Sha256::digest(format!("{slug}\n{seed}"));
                    images::tint(&mut img, [h[0], h[1], h[2]], 0.3);
                }
            }
            Ok(vec![(images::encode(&img, format)?, None)])
        })
        .await
        .map_err(|e| {
            if e.starts_with("error_") || e.starts_with("exceed_") || e.starts_with("invalid_") {
                ERROR_CODES
                    .iter()
                    .find(|(c, _)| *c == e)
                    .map_or("unknown_internal_error", |(c, _)| *c)
            } else {
                "error_inference"
            }
        })?;
    let custom_info = (slug == "aging").then(|| json!({"age": 35, "age_idx": 1, "age_min": 20, "age_max": 65, "num_of_photos": made.len()}));
    let outputs = made
        .into_iter()
        .map(|(bytes, res_age)| {
            let ext = if res_age == Some(35) {
                images::probe(&bytes).map_or(ext, |p| {
                    if p.format == Format::Png {
                        "png"
                    } else {
                        "jpg"
                    }
                })
            } else {
                ext
            };
            Arc::new(Output {
                id: s.new_uuid(),
                sha256: images::sha256_hex(&bytes),
                bytes: Bytes::from(bytes),
                ext,
                res_age,
            })
        })
        .collect();
    Ok((outputs, custom_info))
}

fn mean_rgb(img: &RgbaImage) -> [u8; 3] {
    let mut sum = [0u64; 3];
    let n = u64::from(img.width()) * u64::from(img.height());
    for px in img.pixels() {
        for (acc, c) in sum.iter_mut().zip(px.0) {
            *acc += u64::from(c);
        }
    }
    let n = n.max(1);
    [(sum[0] / n) as u8, (sum[1] / n) as u8, (sum[2] / n) as u8]
}

fn polling_interval_ms(s: &Shared) -> u64 {
    (s.config.keep_alive.as_millis() as u64 / 5).clamp(50, 2000)
}

fn status(s: &Shared, req: &Request) -> Reply {
    let slug = slug_of(req);
    let host = public_host(s, req);
    let Some(task_id) = query_param(req, "task_id") else {
        return invalid("task_id is required");
    };
    let now = Instant::now();
    let keep_alive = s.config.keep_alive;
    let mut tasks = lock(&s.perfect.tasks);
    let Some(t) = tasks.get_mut(&task_id).filter(|t| t.slug == slug) else {
        return err(StatusCode::BAD_REQUEST, "InvalidTaskId", "");
    };
    let key = Some(t.ledger_key.clone());
    // `--perfect-early-invalid-ms`: a new task does not show yet. The poll still
    // counts as contact (the server has the task; it only answers too early).
    if now < t.created + s.config.perfect_early_invalid {
        t.last_contact = now;
        return err(
            StatusCode::BAD_REQUEST,
            "InvalidTaskId",
            "the task is not visible yet",
        )
        .remote(&task_id)
        .key(key);
    }
    // Dropped if, while it was still running, the client went quiet for too long.
    let mut just_dropped = false;
    if !t.dropped && t.last_contact + keep_alive < now.min(t.finish_at) {
        t.dropped = true;
        just_dropped = true;
    }
    if t.dropped {
        let reply = err(
            StatusCode::BAD_REQUEST,
            "InvalidTaskId",
            "the task was dropped: not polled in time",
        )
        .remote(&task_id)
        .key(key);
        return if just_dropped { reply.dropped() } else { reply };
    }
    t.last_contact = now;
    let interval = polling_interval_ms(s);
    if now < t.finish_at {
        return ok(json!({"status": "running", "polling_interval": interval}))
            .remote(&task_id)
            .key(key);
    }
    if let Some(code) = t.error {
        return ok(json!({"status": "error", "error": code, "polling_interval": interval}))
            .remote(&task_id)
            .key(key);
    }
    let expires = unix_ms() + s.config.link_ttl.as_millis() as u64;
    let data: Vec<Value> = t
        .outputs
        .iter()
        .map(|o| {
            let url = format!(
                "http://{host}/perfect{RESULTS}{}.{}?expires={expires}&sig={}",
                o.id,
                o.ext,
                presign::signature(s, "perfect", "GET", &o.id, expires)
            );
            let mut d = json!({"url": url, "dst_id": format!("dst-{}", o.id)});
            if let Some(age) = o.res_age {
                d["res_age"] = json!(age);
            }
            d
        })
        .collect();
    let mut result = json!({"status": "success", "polling_interval": interval, "results": [{"id": 0, "data": data}]});
    if let Some(info) = &t.custom_info {
        result["custom_info"] = info.clone();
    }
    let reply = ok(result).remote(&task_id).key(key);
    // Credits are consumed when the result is made; recorded on the first answer
    // that shows it.
    if !t.charged {
        t.charged = true;
        reply.charged()
    } else {
        reply
    }
}

fn result_file(s: &Shared, ctx: &Ctx, req: &Request) -> Reply {
    let name = ctx.route.remote_id.clone().unwrap_or_default();
    let id = name.split('.').next().unwrap_or("").to_string();
    if req.method() != Method::GET {
        return xml_err(
            StatusCode::METHOD_NOT_ALLOWED,
            "MethodNotAllowed",
            "The specified method is not allowed against this resource.",
        );
    }
    if let Err(r) = presign::check(s, req, "perfect", "GET", &id) {
        return r;
    }
    let Some((task_id, index)) = lock(&s.perfect.results).get(&id).cloned() else {
        return xml_err(
            StatusCode::NOT_FOUND,
            "NoSuchKey",
            "The specified key does not exist.",
        );
    };
    let tasks = lock(&s.perfect.tasks);
    let Some((t, o)) = tasks
        .get(&task_id)
        .and_then(|t| Some((t, t.outputs.get(index)?.clone())))
    else {
        return xml_err(
            StatusCode::NOT_FOUND,
            "NoSuchKey",
            "The specified key does not exist.",
        );
    };
    let content_type = if o.ext == "png" {
        "image/png"
    } else {
        "image/jpeg"
    };
    Reply::bytes(StatusCode::OK, content_type, o.bytes.clone())
        .sha(o.sha256.clone())
        .remote(&task_id)
        .key(Some(t.ledger_key.clone()))
}

fn style_list(s: &Shared, req: &Request, styles: bool) -> Reply {
    let slug = slug_of(req);
    let Some((slug_index, f)) = sim_feature(&slug).filter(|(_, f)| f.styled) else {
        return err(
            StatusCode::NOT_FOUND,
            "NotFound",
            &format!("no styles for {slug:?}"),
        );
    };
    let page_size = match query_param(req, "page_size") {
        None => 20,
        Some(p) => match p.parse::<u64>() {
            Ok(n @ 1..=20) => n,
            _ => return invalid("page_size should be between 1 and 20"),
        },
    };
    let start = match query_param(req, "starting_token").filter(|t| !t.is_empty()) {
        None => 0,
        Some(t) => match t.parse::<u64>() {
            Ok(n) => n,
            Err(_) => return invalid("starting_token is not a token this server gave"),
        },
    };
    let (ids, group): (Vec<u64>, Option<u64>) = if styles {
        let Some(g) = query_param(req, "style_group_id").and_then(|g| g.parse::<u64>().ok()) else {
            return invalid("style_group_id must be an integer");
        };
        if !(0..GROUPS).any(|i| group_id(slug_index, i) == g) {
            return invalid(&format!("no style group {g}"));
        }
        ((1..=STYLES_PER_GROUP).map(|j| g + j).collect(), Some(g))
    } else {
        ((0..GROUPS).map(|i| group_id(slug_index, i)).collect(), None)
    };
    let page: Vec<Value> = ids
        .iter()
        .skip(start as usize)
        .take(page_size as usize)
        .map(|id| match group {
            Some(g) => json!({"id": id, "info": {"title": format!("{} style {}", f.slug, id - g), "thumb": format!("https://example.invalid/thumbs/{id}.jpg")}}),
            None => json!({"id": id, "info": {"title": format!("{} group {}", f.slug, (id - ID_BASE) % 1_000_000 / 1000)}}),
        })
        .collect();
    let next = start + page_size;
    let shape = s.config.perfect_style_shape;
    let field = match (styles, shape) {
        (true, _) => "styles",
        (false, super::StyleShape::Result) => "groups",
        (false, _) => "style_groups",
    };
    let mut result = json!({ field: page });
    if next < ids.len() as u64 {
        result["next_token"] = json!(next.to_string());
    }
    if shape == super::StyleShape::DataStyleGroups {
        return Reply::json(StatusCode::OK, &json!({"status": 200, "data": result}));
    }
    ok(result)
}

#[cfg(test)]
mod tests {
    use super::super::testutil::*;
    use super::*;
    use std::time::Duration;

    async fn token(c: &reqwest::Client, base: &str, creds: &Value) -> String {
        use rsa::pkcs8::DecodePublicKey;
        let id = creds["PERFECT_CLIENT_ID"].as_str().unwrap();
        let der = base64::engine::general_purpose::STANDARD
            .decode(creds["PERFECT_CLIENT_SECRET"].as_str().unwrap())
            .unwrap();
        let key = rsa::RsaPublicKey::from_public_key_der(&der).unwrap();
        let sealed = key
            .encrypt(
                &mut rsa::rand_core::OsRng,
                Pkcs1v15Encrypt,
                format!("client_id={id}&timestamp={}", unix_ms()).as_bytes(),
            )
            .unwrap();
        let v: Value = c
            .post(format!("{base}/perfect/s2s/v1.0/client/auth"))
            .json(&json!({"client_id": id, "id_token": base64::engine::general_purpose::STANDARD.encode(sealed)}))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        v["result"]["access_token"].as_str().unwrap().to_string()
    }

    /// Upload one PNG for colorize, run it with `request_id`; the task id.
    async fn colorize(
        c: &reqwest::Client,
        base: &str,
        bearer: &str,
        request_id: u64,
    ) -> (String, String) {
        let api = |p: &str| format!("{base}/perfect/s2s/v1.0{p}");
        let v: Value = c
            .post(api("/file/colorize"))
            .bearer_auth(bearer)
            .json(&json!({"files": [{"content_type": "image/png", "file_name": "a.png"}]}))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let f = &v["result"]["files"][0];
        let req = &f["requests"][0];
        let url = req["url"].as_str().unwrap();
        let png = images::sample_png(32, 24, 1);
        // Without the signed headers: refused.
        let r = c
            .put(url)
            .header("content-type", "image/png")
            .body(png.clone())
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 403);
        let mut put = c.put(url).body(png);
        for (k, v) in req["headers"].as_object().unwrap() {
            put = put.header(k.as_str(), v.as_str().unwrap());
        }
        assert_eq!(put.send().await.unwrap().status(), 200);
        let file_id = f["file_id"].as_str().unwrap().to_string();
        let body = json!({"request_id": request_id, "payload": {"file_sets": {"src_ids": [file_id]}, "actions": [{"id": 0}]}});
        let v: Value = c
            .post(api("/task/colorize"))
            .bearer_auth(bearer)
            .json(&body)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        (
            v["result"]["task_id"].as_str().unwrap().to_string(),
            file_id,
        )
    }

    #[tokio::test]
    async fn auth_idempotency_keep_alive_and_expiring_links() {
        let (h, base) = start(SimConfig {
            task_duration: Duration::from_millis(300),
            keep_alive: Duration::from_millis(150),
            link_ttl: Duration::from_millis(200),
            token_ttl: Duration::from_millis(1000),
            ..config()
        })
        .await;
        let c = client();
        let creds = h.credentials()["perfect"].clone();
        let poll = |bearer: String, task: String| {
            let c = c.clone();
            let enc: String = url::form_urlencoded::byte_serialize(task.as_bytes()).collect();
            let url = format!("{base}/perfect/s2s/v1.0/task/colorize?task_id={enc}");
            async move {
                let r = c.get(url).bearer_auth(bearer).send().await.unwrap();
                (r.status().as_u16(), r.json::<Value>().await.unwrap())
            }
        };
        let t = token(&c, &base, &creds).await;
        // An unencoded `+` in the query reads as a space: an unknown task.
        let (task, _) = colorize(&c, &base, &t, 5).await;
        assert!(task.contains('+') && task.contains('/'));
        let r = c
            .get(format!(
                "{base}/perfect/s2s/v1.0/task/colorize?task_id={task}"
            ))
            .bearer_auth(&t)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 400);

        // Polled every 100 ms: finishes, charged once, links expire, fresh on re-poll.
        let mut last = Value::Null;
        for _ in 0..6 {
            let (status, v) = poll(t.clone(), task.clone()).await;
            assert_eq!(status, 200, "{v}");
            last = v;
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert_eq!(last["result"]["status"], "success", "{last}");
        let url = last["result"]["results"][0]["data"][0]["url"]
            .as_str()
            .unwrap()
            .to_string();
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert_eq!(
            c.get(&url).send().await.unwrap().status(),
            403,
            "an expired link"
        );
        let t2 = token(&c, &base, &creds).await;
        assert_eq!(
            poll(t.clone(), task.clone()).await.0,
            401,
            "the first token is dead"
        );
        let (status, fresh) = poll(t2.clone(), task.clone()).await;
        assert_eq!(status, 200);
        let url = fresh["result"]["results"][0]["data"][0]["url"]
            .as_str()
            .unwrap();
        assert_eq!(c.get(url).send().await.unwrap().status(), 200);

        // Not polled within keep_alive while running: dropped.
        let (dropped, file_id) = colorize(&c, &base, &t2, 6).await;
        tokio::time::sleep(Duration::from_millis(250)).await;
        let (status, v) = poll(t2.clone(), dropped.clone()).await;
        assert_eq!(
            (status, v["error_code"].as_str()),
            (400, Some("InvalidTaskId"))
        );

        // The same file with the same request_id: the same task, no new one.
        let body = json!({"request_id": 6, "payload": {"file_sets": {"src_ids": [file_id]}, "actions": [{"id": 0}]}});
        let again: Value = c
            .post(format!("{base}/perfect/s2s/v1.0/task/colorize"))
            .bearer_auth(&t2)
            .json(&body)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert_eq!(again["result"]["task_id"], dropped.as_str());

        let l = ledger(&base).await;
        let charged: Vec<_> = l.iter().filter(|e| e.charged).collect();
        assert_eq!(charged.len(), 1);
        assert_eq!(charged[0].request_key.as_deref(), Some("5"));
        // A console API key: refused on the v1.0 task routes, taken by the credit
        // endpoint, whose ApiSubscription batch lost the one charged credit.
        assert_eq!(poll("some-api-key".into(), task.clone()).await.0, 401);
        assert_eq!(poll("invalid-key".into(), task.clone()).await.0, 401);
        let credit: Value = c
            .get(format!("{base}/perfect/s2s/v1.0/client/credit"))
            .bearer_auth("some-api-key")
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert_eq!(credit["results"][0]["type"], "ApiSubscription");
        assert_eq!(credit["results"][0]["amount"], START_CREDITS - 1);
        h.shutdown().await.unwrap();
    }
}
