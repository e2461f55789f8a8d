//! Perfect Corp's S2S API v1.0 (`perfect.txt`; hosts and shapes in docs/providers/perfect.md).
//!
//! Every feature runs the same way: `POST /s2s/v1.0/file/<slug>` hands out file ids and
//! presigned upload URLs ([`Provider::prepare`]; the bytes go to storage with exactly
//! the headers given, outside the rate limits), `POST /s2s/v1.0/task/<slug>` runs the
//! task with an integer `request_id` ([`Provider::submit`]), and
//! `GET /s2s/v1.0/task/<slug>?task_id=…` is polled until `success` or `error`. A task
//! not polled for 10 s is dropped ([`Provider::keep_alive`]); a dropped task was never
//! charged (credits are consumed on success only), so it comes back as
//! `PollOutcome::Lost { charged: false }`.
//!
//! Perfect ignores a repeated `request_id` for the same files, so a submission whose
//! answer was lost is settled by sending the same request again
//! ([`Provider::reconcile`]).

mod auth;
pub mod features;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use reqwest::header::{HeaderName, HeaderValue, AUTHORIZATION, CONTENT_TYPE};
use reqwest::{Method, StatusCode};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

use super::util;
use super::{
    Api, Balance, JobContext, PollOutcome, Prepared, Provider, ProviderConfig, ProviderError,
    Reconciliation, RequestKind, StyleEntry, StyleQuery, SubmitOutcome,
};
use crate::api::excerpt;
use crate::model::{JobSpec, PendingOutput, ProviderKind};

pub use auth::{id_token, id_token_plaintext, parse_public_key};
pub use features::{feature, Feature, Kind, Plan, FEATURES};

/// "Note that the task will lose if no polling in 10 seconds."
pub const KEEP_ALIVE: Duration = Duration::from_secs(10);
/// A small JSON answer (auth, file, task, status, style page).
const MAX_SMALL_JSON: u64 = 2 * 1024 * 1024;
/// "Valid value should be between 1 and 20."
const STYLE_PAGE_SIZE: u32 = 20;
/// Guards against a server whose `next_token` never ends.
const MAX_STYLE_PAGES: usize = 500;

const API: &str = "/s2s/v1.0";

/// An `InvalidTaskId` within this long after the run was sent is taken as "the task
/// does not show yet", not as "lost": a live client (crishirt-perfect-corp) retries
/// it five times at its 2 s poll interval. `early_not_found` in `[providers.perfect]`
/// overrides it. The engine polls again meanwhile (every second, well inside the 10 s
/// keep-alive); docs/providers.md, "live evidence".
pub const EARLY_INVALID: Duration = Duration::from_secs(10);

/// Why `api_key` mode runs no job. The official YouCam-API clients send the console
/// API key as the Bearer value on the v2.x routes and on `/s2s/v1.0/client/credit`
/// only; no public client shows it on the v1.0 file and task routes pixbatch uses,
/// and the documented v1.0 flow takes an access token (docs/providers.md).
pub const API_KEY_REFUSAL: &str = "a console API key (PERFECT_API_KEY) is only taken by the credit endpoint and the v2.x routes; pixbatch runs the documented v1.0 routes, which need an access token: set PERFECT_CLIENT_ID (the console's API key) and PERFECT_CLIENT_SECRET (its secret key) instead (`pixbatch balance perfect` works with PERFECT_API_KEY alone)";
/// The account's credit batches (YouCam-API/skills `youcam_api.py`).
const CREDIT_PATH: &str = "/s2s/v1.0/client/credit";
/// Batches whose type starts so are spendable through the API (same source).
const SPENDABLE_PREFIX: &str = "Api";

/// Builds the adapter from the credentials: client id + secret key → `rsa` mode, else
/// an API key → `api_key` mode.
pub fn build(config: &ProviderConfig) -> Result<Arc<dyn Provider>, String> {
    let c = &config.credentials;
    let nonblank = |o: &Option<String>| {
        o.as_deref()
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(str::to_string)
    };
    let mode = match (nonblank(&c.client_id), nonblank(&c.client_secret), nonblank(&c.api_key)) {
        (Some(client_id), Some(secret), _) => auth::Mode::Rsa {
            key: auth::parse_public_key(&secret)?,
            client_id,
        },
        (_, _, Some(key)) => auth::Mode::ApiKey(key),
        (Some(_), None, None) => {
            return Err("perfect: PERFECT_CLIENT_ID is set but PERFECT_CLIENT_SECRET is not (set both, or PERFECT_API_KEY)".into())
        }
        (None, Some(_), None) => {
            return Err("perfect: PERFECT_CLIENT_SECRET is set but PERFECT_CLIENT_ID is not (set both, or PERFECT_API_KEY)".into())
        }
        (None, None, None) => {
            return Err("perfect: no credentials (set PERFECT_CLIENT_ID and PERFECT_CLIENT_SECRET, or PERFECT_API_KEY; or client_id/client_secret/api_key in [providers.perfect] of the config file)".into())
        }
    };
    let slugs = features::Slugs::new(&config.operations)?;
    Ok(Arc::new(Perfect {
        mode,
        slugs,
        keep_alive: config.keep_alive.unwrap_or(KEEP_ALIVE),
        early_invalid: config.early_not_found.unwrap_or(EARLY_INVALID),
        poll_interval: config.poll_interval,
        token: tokio::sync::Mutex::new(None),
        generation: AtomicU64::new(0),
    }))
}

pub fn validate(spec: &JobSpec) -> Vec<String> {
    features::validate(spec)
}

pub fn requests_per_job(spec: &JobSpec) -> u32 {
    features::requests_per_job(spec)
}

/// The `request_id` of a job's `submission`-th submission: the same number on every
/// retry of one submission, a new one for the next. 36 bits of the job id's hash above
/// 16 bits of the submission number: unique per job even where Perfect scopes
/// `request_id` to the account rather than to the files (text-to-image has no files),
/// and below 2^52 so no JSON reader rounds it.
pub fn request_id(job_id: &str, submission: u32) -> u64 {
    let h = Sha256::digest(job_id.as_bytes());
    let mut top = [0u8; 8];
    top.copy_from_slice(&h[..8]);
    let h36 = u64::from_be_bytes(top) >> 28;
    (h36 << 16) | u64::from(submission.saturating_sub(1) & 0xFFFF)
}

/// The documented engine error codes: (code, description, permanent).
pub const ERROR_CODES: &[(&str, &str, bool)] = &[
    (
        "exceed_max_filesize",
        "Input file size exceeds the maximum limit",
        true,
    ),
    ("invalid_parameter", "Invalid parameter value", true),
    ("error_download_image", "Download source image error", false),
    ("error_download_mask", "Download mask image error", false),
    ("error_decode_image", "Decode source image error", true),
    ("error_decode_mask", "Decode mask image error", true),
    (
        "error_nsfw_content_detected",
        "NSFW content detected in source image",
        true,
    ),
    ("error_no_face", "No face detected on source image", true),
    ("error_pose", "Failed to detect pose on source image", true),
    (
        "error_face_parsing",
        "Failed to do face segmentation on source image",
        true,
    ),
    ("error_inference", "Inference pipeline error", false),
    (
        "exceed_nsfw_retry_limits",
        "Exceed the retry limits to avoid generated NSFW image",
        false,
    ),
    ("error_upload", "Upload result image error", false),
    (
        "error_multiple_people",
        "Multiple people detected in the source image",
        true,
    ),
    (
        "error_no_shoulder",
        "Shoulders are not visible in the source image",
        true,
    ),
    (
        "error_large_face_angle",
        "The face angle in the uploaded image is too large",
        true,
    ),
    ("unknown_internal_error", "Others", false),
];

/// A task's `error` as (reason, permanent). Unknown codes: `error_decode_*` and the
/// face/pose family are the input's fault; anything else unknown may pass.
pub fn classify_engine_error(code: &str) -> (String, bool) {
    let code = code.trim();
    if let Some((c, desc, permanent)) = ERROR_CODES.iter().find(|(c, _, _)| *c == code) {
        return (format!("{c}: {desc}"), *permanent);
    }
    let permanent = code.starts_with("error_decode_") || code.starts_with("invalid_");
    if code.is_empty() {
        ("the task ended in error without a code".into(), false)
    } else {
        (format!("{code} (not in the document's list)"), permanent)
    }
}

/// The Perfect adapter.
pub struct Perfect {
    mode: auth::Mode,
    slugs: features::Slugs,
    keep_alive: Duration,
    /// See [`EARLY_INVALID`].
    early_invalid: Duration,
    /// The configured first look at a new task (capped by half the keep-alive).
    poll_interval: Duration,
    /// The current access token (rsa mode); held while one is being obtained, so a
    /// burst of requests makes one auth call.
    token: tokio::sync::Mutex<Option<auth::Token>>,
    generation: AtomicU64,
}

impl std::fmt::Debug for Perfect {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Perfect")
            .field("mode", &self.mode.name())
            .field("credentials", &"<redacted>")
            .finish()
    }
}

/// What one call to the API host came back with, before the adapter's reading.
struct Answer {
    result: Value,
}

impl Perfect {
    /// The Bearer value to send now, and the token generation it belongs to. A
    /// console API key goes only where `key_ok` (the credit endpoint): see
    /// [`API_KEY_REFUSAL`].
    async fn bearer(&self, api: &Api, key_ok: bool) -> Result<(HeaderValue, u64), ProviderError> {
        match &self.mode {
            auth::Mode::ApiKey(_) if !key_ok => Err(ProviderError::permanent(API_KEY_REFUSAL)),
            auth::Mode::ApiKey(key) => Ok((
                util::secret_header("PERFECT_API_KEY", &format!("Bearer {key}"))?,
                0,
            )),
            auth::Mode::Rsa { .. } => {
                let mut slot = self.token.lock().await;
                let token = match slot.as_ref() {
                    Some(t) if t.fresh(Instant::now()) => t.clone(),
                    _ => {
                        let t = self.obtain_token(api).await?;
                        *slot = Some(t.clone());
                        t
                    }
                };
                let value = util::secret_header(
                    "the Perfect access token",
                    &format!("Bearer {}", token.value),
                )?;
                Ok((value, token.generation))
            }
        }
    }

    /// Forgets the token of `generation` (a 401 answered it), unless renewed since.
    async fn drop_token(&self, generation: u64) {
        let mut slot = self.token.lock().await;
        if slot.as_ref().is_some_and(|t| t.generation == generation) {
            *slot = None;
        }
    }

    /// `POST /s2s/v1.0/client/auth`.
    async fn obtain_token(&self, api: &Api) -> Result<auth::Token, ProviderError> {
        let auth::Mode::Rsa { client_id, key } = &self.mode else {
            return Err(ProviderError::permanent(
                "perfect: no client id to authenticate with",
            ));
        };
        let id_token = auth::id_token(key, client_id, auth::unix_ms_now())
            .map_err(ProviderError::permanent)?;
        let request = api
            .client()
            .post(api.url(&format!("{API}/client/auth")))
            .json(&json!({"client_id": client_id, "id_token": id_token}));
        let response = api.send(RequestKind::Auth, request).await?;
        let status = response.status();
        if !status.is_success() {
            let body = util::read_prefix(response, 64 * 1024).await;
            let e = self.error_of(RequestKind::Auth, status, &body);
            return Err(match e {
                // Any refusal of the auth call is the credentials' fault.
                ProviderError::Permanent(r) | ProviderError::Credential(r) => {
                    // The hint once: `error_of` may have added it already.
                    let hint = self.mode.hint();
                    let hint = if r.contains(hint) {
                        String::new()
                    } else {
                        format!(" ({hint})")
                    };
                    ProviderError::credential(format!("the authentication was refused: {r}{hint}"))
                }
                other => other,
            });
        }
        let body = Api::read_bytes(RequestKind::Auth, response, MAX_SMALL_JSON).await?;
        let token = read_token(status, &body)?;
        tracing::debug!("perfect: obtained an access token");
        Ok(auth::Token {
            value: token,
            obtained: Instant::now(),
            generation: self.generation.fetch_add(1, Ordering::SeqCst) + 1,
        })
    }

    /// One request to the API host with the Bearer token; a 401 renews the token once
    /// and asks again (a 401 means the request was not taken, so this is safe for the
    /// paid run too). Returns the answer's `result`.
    async fn call(
        &self,
        api: &Api,
        kind: RequestKind,
        method: Method,
        path_and_query: &str,
        body: Option<&Value>,
    ) -> Result<Answer, ProviderError> {
        self.call_keyed(api, kind, method, path_and_query, body, None)
            .await
    }

    /// [`Perfect::call`] returning the whole answer, not only `result`: for the
    /// answers whose shape varies (the credit batches at the top level, style lists
    /// under `data` in some clients' reading). `key_ok`: a console API key may be sent.
    async fn call_whole(
        &self,
        api: &Api,
        kind: RequestKind,
        path_and_query: &str,
        key_ok: bool,
    ) -> Result<Value, ProviderError> {
        let (status, body) = self
            .send_authorized(api, kind, Method::GET, path_and_query, None, None, key_ok)
            .await?;
        read_answer(kind, status, &body, self.mode.hint())
    }

    /// [`Perfect::call`] with `X-Request-Id: <submit key>` (on runs: Perfect ignores
    /// it; the simulator's ledger attributes the task to its job with it).
    async fn call_keyed(
        &self,
        api: &Api,
        kind: RequestKind,
        method: Method,
        path_and_query: &str,
        body: Option<&Value>,
        request_key: Option<&str>,
    ) -> Result<Answer, ProviderError> {
        let (status, body) = self
            .send_authorized(api, kind, method, path_and_query, body, request_key, false)
            .await?;
        read_result(kind, status, &body, self.mode.hint()).map(|result| Answer { result })
    }

    /// Sends with the Bearer value; a 401 renews the token once. The 2xx answer's
    /// status and body.
    #[allow(clippy::too_many_arguments)]
    async fn send_authorized(
        &self,
        api: &Api,
        kind: RequestKind,
        method: Method,
        path_and_query: &str,
        body: Option<&Value>,
        request_key: Option<&str>,
        key_ok: bool,
    ) -> Result<(StatusCode, Vec<u8>), ProviderError> {
        for attempt in 0..2 {
            let (bearer, generation) = self.bearer(api, key_ok).await?;
            let mut request = api
                .client()
                .request(method.clone(), api.url(path_and_query))
                .header(AUTHORIZATION, bearer);
            if let Some(key) = request_key {
                request = request.header("X-Request-Id", key);
            }
            if let Some(b) = body {
                request = request.json(b);
            }
            let response = api.send(kind, request).await?;
            let status = response.status();
            if status == StatusCode::UNAUTHORIZED {
                let body = util::read_prefix(response, 64 * 1024).await;
                if attempt == 0 && matches!(self.mode, auth::Mode::Rsa { .. }) {
                    tracing::debug!("perfect: access token refused; renewing it");
                    self.drop_token(generation).await;
                    continue;
                }
                return Err(self.error_of(kind, status, &body));
            }
            if !status.is_success() {
                let body = util::read_error_body(response, 64 * 1024).await?;
                return Err(self.error_of(kind, status, &body));
            }
            let body = Api::read_bytes(kind, response, MAX_SMALL_JSON).await?;
            return Ok((status, body.to_vec()));
        }
        Err(ProviderError::permanent(format!(
            "perfect: the access token was refused twice in a row ({})",
            self.mode.hint()
        )))
    }

    fn error_of(&self, kind: RequestKind, status: StatusCode, body: &[u8]) -> ProviderError {
        error_answer(kind, status, body, self.mode.hint())
    }

    fn plan(&self, spec: &JobSpec) -> Result<Plan, ProviderError> {
        Plan::from_spec(spec).map_err(|e| ProviderError::permanent(e.join("; ")))
    }

    fn slug(&self, f: &Feature) -> String {
        self.slugs.of(f)
    }

    async fn run_task(&self, api: &Api, job: &JobContext<'_>) -> Result<String, ProviderError> {
        let plan = self.plan(job.spec)?;
        let mut files = Vec::new();
        for role in plan.feature.inputs {
            let id = job.prepared_get(role.ref_key).ok_or_else(|| {
                ProviderError::permanent(format!(
                    "perfect: the {} was not uploaded before the run (adapter bug)",
                    role.name
                ))
            })?;
            files.push((role.field, id.to_string()));
        }
        let rid = request_id(&job.spec.id, job.submission);
        let body = plan.run_body(rid, &files);
        let path = format!("{API}/task/{}", self.slug(plan.feature));
        let answer = self
            .call_keyed(
                api,
                RequestKind::Submit,
                Method::POST,
                &path,
                Some(&body),
                Some(&job.submit_key),
            )
            .await?;
        parse_task_id(&answer.result)
    }
}

/// An error answer: `{"status":401,"error":"Unauthorized","error_code":"InvalidAccessToken"}`.
/// `hint` says which credentials to check.
pub fn error_answer(
    kind: RequestKind,
    status: StatusCode,
    body: &[u8],
    hint: &str,
) -> ProviderError {
    let v: Option<Value> = serde_json::from_slice(body).ok();
    let field = |name: &str| {
        v.as_ref()
            .and_then(|v| {
                v.get(name)
                    .or_else(|| v.get("result").and_then(|r| r.get(name)))
            })
            .and_then(Value::as_str)
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(str::to_string)
    };
    let code = field("error_code");
    let message = field("error").or_else(|| field("message"));
    let mut reason = format!("HTTP {}", status.as_u16());
    if let Some(c) = &code {
        reason.push_str(&format!(" {c}"));
    }
    match &message {
        Some(m) => reason.push_str(&format!(": {}", excerpt(m.as_bytes()))),
        None if v.is_none() && !body.is_empty() => reason.push_str(&format!(": {}", excerpt(body))),
        None => {}
    }
    if code.as_deref() == Some("InvalidTaskId") {
        return ProviderError::Lost(format!("perfect no longer knows the task ({reason})"));
    }
    if let Some(c) = code
        .as_deref()
        .filter(|c| ERROR_CODES.iter().any(|(k, _, _)| k == c))
    {
        let (desc, permanent) = classify_engine_error(c);
        let reason = format!("{reason} ({desc})");
        return if permanent {
            ProviderError::permanent(reason)
        } else {
            ProviderError::transient(reason)
        };
    }
    match status.as_u16() {
        401 | 403 => ProviderError::credential(format!("{reason} ({})", hint)),
        _ => util::status_error(kind, status, reason),
    }
}

/// Reads the body of a 2xx answer from the API host and returns its `result` object.
/// Some gateways put an error (`"status": 4xx`) in a 200 answer's body.
pub fn read_result(
    kind: RequestKind,
    status: StatusCode,
    body: &[u8],
    hint: &str,
) -> Result<Value, ProviderError> {
    let v = read_answer(kind, status, body, hint)?;
    match v.get("result") {
        Some(result) if result.is_object() => Ok(result.clone()),
        _ => Err(ProviderError::bad_answer(
            kind,
            format!(
                "perfect: answer without a result object: {}",
                excerpt(v.to_string().as_bytes())
            ),
        )),
    }
}

/// Reads the body of a 2xx answer as a whole, turning an error put in a 200 answer's
/// body into that error.
pub fn read_answer(
    kind: RequestKind,
    status: StatusCode,
    body: &[u8],
    hint: &str,
) -> Result<Value, ProviderError> {
    let v = util::parse_json(kind, status, body)?;
    if let Some(inner) = v
        .get("status")
        .and_then(Value::as_u64)
        .filter(|s| *s >= 400)
    {
        let status = u16::try_from(inner)
            .ok()
            .and_then(|s| StatusCode::from_u16(s).ok())
            .unwrap_or(StatusCode::BAD_REQUEST);
        return Err(error_answer(kind, status, v.to_string().as_bytes(), hint));
    }
    Ok(v)
}

/// Reads the auth answer: `result.access_token`. The error names the fields found,
/// never their values (one of them might be the token).
pub fn read_token(status: StatusCode, body: &[u8]) -> Result<String, ProviderError> {
    let v = serde_json::from_slice::<Value>(body).map_err(|e| {
        ProviderError::transient(format!(
            "perfect: the auth answer (HTTP {status}) is not JSON: {e}"
        ))
    })?;
    v.get("result")
        .and_then(|r| r.get("access_token"))
        .and_then(Value::as_str)
        .map(str::trim)
        .filter(|t| !t.is_empty())
        .map(str::to_string)
        .ok_or_else(|| {
            ProviderError::transient(format!(
                "perfect: the auth answer has no result.access_token (fields: {})",
                field_names(&v)
            ))
        })
}

/// Reads a run answer's `result.task_id`. Without one, the outcome of the paid
/// request is unknown.
pub fn parse_task_id(result: &Value) -> Result<String, ProviderError> {
    id_text(result.get("task_id")).ok_or_else(|| {
        ProviderError::Unknown(format!(
            "perfect: the run answer has no task_id: {}",
            excerpt(result.to_string().as_bytes())
        ))
    })
}

/// An id as text: strings as they are, integers exactly (never through `f64`).
fn id_text(v: Option<&Value>) -> Option<String> {
    match v? {
        Value::String(s) if !s.trim().is_empty() => Some(s.trim().to_string()),
        Value::Number(n) if n.is_u64() || n.is_i64() => Some(n.to_string()),
        _ => None,
    }
}

/// The field names of an answer (of `result` too), or its JSON type: never a value.
/// At most a few names, each shortened: an answer may have any number of any size.
fn field_names(v: &Value) -> String {
    const SHOWN: usize = 12;
    let kind = |v: &Value| match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    };
    let names = |m: &serde_json::Map<String, Value>, nested: bool| -> String {
        let mut parts: Vec<String> = m
            .iter()
            .take(SHOWN)
            .map(|(k, inner)| {
                let k: String = k.chars().filter(|c| !c.is_control()).take(40).collect();
                match inner.as_object() {
                    Some(im) if nested && !im.is_empty() => format!("{k} {{{}}}", {
                        let mut sub: Vec<String> = im
                            .keys()
                            .take(SHOWN)
                            .map(|k| k.chars().filter(|c| !c.is_control()).take(40).collect())
                            .collect();
                        if im.len() > SHOWN {
                            sub.push(format!("… {} more", im.len() - SHOWN));
                        }
                        sub.join(", ")
                    }),
                    _ => k,
                }
            })
            .collect();
        if m.len() > SHOWN {
            parts.push(format!("… {} more", m.len() - SHOWN));
        }
        parts.join(", ")
    };
    match v.as_object() {
        Some(m) if !m.is_empty() => names(m, true),
        _ => kind(v).to_string(),
    }
}

/// A file create answer's `result.files[i]`: the id and where to put the bytes.
#[derive(Debug, Clone, PartialEq)]
pub struct UploadSlot {
    pub file_id: String,
    pub method: Method,
    pub url: String,
    pub headers: Vec<(String, String)>,
}

/// Reads `result.files` of a file create answer, expecting `count` entries.
pub fn parse_file_slots(result: &Value, count: usize) -> Result<Vec<UploadSlot>, String> {
    let files = result
        .get("files")
        .and_then(Value::as_array)
        .ok_or_else(|| {
            format!(
                "file answer without result.files: {}",
                excerpt(result.to_string().as_bytes())
            )
        })?;
    if files.len() != count {
        return Err(format!(
            "asked for {count} file(s), the answer has {}",
            files.len()
        ));
    }
    files
        .iter()
        .enumerate()
        .map(|(i, f)| {
            let file_id =
                id_text(f.get("file_id")).ok_or_else(|| format!("files[{i}] has no file_id"))?;
            let req = f
                .get("requests")
                .and_then(Value::as_array)
                .and_then(|r| r.first())
                .ok_or_else(|| format!("files[{i}] has no upload request"))?;
            let url = req
                .get("url")
                .and_then(Value::as_str)
                .filter(|u| util::is_url(u))
                .ok_or_else(|| format!("files[{i}].requests[0] has no http(s) url"))?
                .to_string();
            let method = match req.get("method").and_then(Value::as_str) {
                None => Method::PUT,
                Some(m) => {
                    Method::from_bytes(m.trim().to_ascii_uppercase().as_bytes()).map_err(|_| {
                        format!("files[{i}].requests[0].method {m:?} is not an HTTP method")
                    })?
                }
            };
            let mut headers = Vec::new();
            match req.get("headers") {
                None | Some(Value::Null) => {}
                Some(Value::Object(h)) => {
                    for (k, v) in h {
                        let v = match v {
                            Value::String(s) => s.clone(),
                            Value::Number(n) => n.to_string(),
                            other => {
                                return Err(format!("files[{i}] header {k} is not text: {other}"))
                            }
                        };
                        headers.push((k.clone(), v));
                    }
                }
                Some(other) => {
                    return Err(format!(
                        "files[{i}].requests[0].headers is not an object: {other}"
                    ))
                }
            }
            Ok(UploadSlot {
                file_id,
                method,
                url,
                headers,
            })
        })
        .collect()
}

/// Reads a status answer's `result`. `keep_alive` caps the next poll: the server's
/// `polling_interval` is honoured unless it would let the task be dropped.
pub fn parse_status(
    result: &Value,
    fallback_ext: &str,
    keep_alive: Duration,
) -> Result<PollOutcome, String> {
    let cap = keep_alive / 2;
    let next_poll = result
        .get("polling_interval")
        .and_then(Value::as_u64)
        .map(|ms| Duration::from_millis(ms).min(cap))
        .unwrap_or(cap.min(Duration::from_secs(2)));
    let status = result
        .get("status")
        .and_then(Value::as_str)
        .ok_or_else(|| {
            format!(
                "status answer without result.status: {}",
                excerpt(result.to_string().as_bytes())
            )
        })?;
    match status.trim().to_ascii_lowercase().as_str() {
        "success" => {
            let mut outputs = Vec::new();
            let results = result.get("results").and_then(Value::as_array);
            for r in results.into_iter().flatten() {
                for d in r
                    .get("data")
                    .and_then(Value::as_array)
                    .into_iter()
                    .flatten()
                {
                    let Some(url) = d
                        .get("url")
                        .and_then(Value::as_str)
                        .filter(|u| util::is_url(u))
                    else {
                        continue;
                    };
                    outputs.push(PendingOutput::Url {
                        url: url.to_string(),
                        ext: ext_of_url(url).unwrap_or(fallback_ext).to_string(),
                    });
                }
            }
            if outputs.is_empty() {
                return Err(format!(
                    "the task succeeded but the answer has no result URLs: {}",
                    excerpt(result.to_string().as_bytes())
                ));
            }
            Ok(PollOutcome::Succeeded(outputs))
        }
        "error" => {
            let code = result.get("error").and_then(Value::as_str).unwrap_or("");
            let (reason, permanent) = classify_engine_error(code);
            Ok(PollOutcome::Failed { reason, permanent })
        }
        "running" => Ok(PollOutcome::Running {
            next_poll: Some(next_poll),
        }),
        other => {
            tracing::debug!(
                status = other,
                "perfect: unknown task status, taken as running"
            );
            Ok(PollOutcome::Running {
                next_poll: Some(next_poll),
            })
        }
    }
}

/// A refused upload to the presigned storage. Always worth another try (a new slot
/// is asked for), and a "slow down" (429, or S3's 503 `SlowDown`) is the storage's
/// wait, not the job's failure: it uses up no attempt.
pub fn upload_refusal(
    role: &str,
    url: &str,
    status: StatusCode,
    retry_after: Option<Duration>,
    body: &[u8],
) -> ProviderError {
    let reason = format!(
        "perfect: uploading the {role} to {} answered HTTP {status}: {}",
        util::redact_url(url),
        excerpt(body)
    );
    let slow_down = status == StatusCode::TOO_MANY_REQUESTS
        || (status == StatusCode::SERVICE_UNAVAILABLE
            && String::from_utf8_lossy(body).contains("SlowDown"));
    ProviderError::Transient {
        reason,
        retry_after,
        rate_limited: slow_down,
    }
}

/// The image extension a result URL's path ends with, if it is one we know.
fn ext_of_url(url: &str) -> Option<&'static str> {
    let path = url.split(['?', '#']).next()?;
    let last = path.rsplit('/').next()?;
    let (_, ext) = last.rsplit_once('.')?;
    match ext.to_ascii_lowercase().as_str() {
        "jpg" | "jpeg" => Some("jpg"),
        "png" => Some("png"),
        "webp" => Some("webp"),
        _ => None,
    }
}

/// The name a file is created under: the input's own file name (it shows in Perfect's
/// console and support cases), or the role's name when it has none usable.
fn upload_name(source: &str, role: &str, ext: &str) -> String {
    let path = source.split(['?', '#']).next().unwrap_or(source);
    let base = path.rsplit(['/', '\\']).next().unwrap_or("").trim();
    if !base.is_empty() && base.len() <= 200 && !base.chars().any(char::is_control) {
        base.to_string()
    } else {
        format!("{role}.{ext}")
    }
}

fn encode_query(v: &str) -> String {
    url::form_urlencoded::byte_serialize(v.as_bytes()).collect()
}

#[async_trait]
impl Provider for Perfect {
    fn kind(&self) -> ProviderKind {
        ProviderKind::Perfect
    }

    /// rsa mode: obtains the first token now, so wrong credentials stop the run before
    /// any job is touched. api_key mode stops the run here, before any job is touched:
    /// see [`API_KEY_REFUSAL`].
    async fn authenticate(&self, api: &Api) -> Result<(), ProviderError> {
        self.bearer(api, false).await?;
        Ok(())
    }

    async fn prepare(&self, api: &Api, job: &JobContext<'_>) -> Result<Prepared, ProviderError> {
        let plan = self.plan(job.spec)?;
        let roles = plan.feature.inputs;
        if roles.iter().all(|r| job.prepared_get(r.ref_key).is_some()) {
            return Ok(Prepared::done(Vec::new()));
        }
        let sources: Vec<&str> = job
            .spec
            .inputs
            .iter()
            .map(|s| s.trim())
            .filter(|s| !s.is_empty())
            .collect();
        if sources.len() != roles.len() {
            return Err(ProviderError::permanent(format!(
                "perfect {} takes {} input image(s), got {}",
                plan.feature.operation,
                roles.len(),
                sources.len()
            )));
        }
        let mut inputs = Vec::new();
        let mut problems = Vec::new();
        for (role, source) in roles.iter().zip(&sources) {
            let input = util::load_input(api, source, features::MAX_INPUT_BYTES).await?;
            problems.extend(plan.check_input(role, source, input.format, input.dimensions()));
            inputs.push(input);
        }
        let dims: Vec<_> = inputs.iter().map(|i| i.dimensions()).collect();
        problems.extend(features::mask_size_problem(plan.feature, &dims));
        if !problems.is_empty() {
            return Err(ProviderError::permanent(problems.join("; ")));
        }

        // One file create for all inputs: the call takes an array.
        let files: Vec<Value> = roles
            .iter()
            .zip(&inputs)
            .zip(&sources)
            .map(|((role, input), source)| {
                json!({"content_type": input.mime(), "file_name": upload_name(source, role.name, input.ext())})
            })
            .collect();
        let path = format!("{API}/file/{}", self.slug(plan.feature));
        let answer = self
            .call(
                api,
                RequestKind::Upload,
                Method::POST,
                &path,
                Some(&json!({ "files": files })),
            )
            .await?;
        let slots = parse_file_slots(&answer.result, roles.len())
            .map_err(|e| ProviderError::transient(format!("perfect: {e}")))?;
        let mut refs = Vec::new();
        for ((role, input), slot) in roles.iter().zip(&inputs).zip(slots) {
            // Presigned storage, not the API host: outside the rate limits. Exactly the
            // headers given (the signature covers them), nothing of ours.
            let mut request = api.client().request(slot.method.clone(), &slot.url);
            for (k, v) in &slot.headers {
                let name = HeaderName::from_bytes(k.as_bytes()).map_err(|_| {
                    ProviderError::transient(format!(
                        "perfect: upload header name {k:?} is not valid"
                    ))
                })?;
                let value = HeaderValue::from_str(v).map_err(|_| {
                    ProviderError::transient(format!(
                        "perfect: upload header {k} has a value that is not valid"
                    ))
                })?;
                request = request.header(name, value);
            }
            if !slot
                .headers
                .iter()
                .any(|(k, _)| k.eq_ignore_ascii_case("content-type"))
            {
                request = request.header(CONTENT_TYPE, input.mime());
            }
            let response = request
                .body(input.bytes.clone())
                .send()
                .await
                .map_err(|e| {
                    ProviderError::transient(format!(
                        "perfect: uploading the {} to {} failed: {}",
                        role.name,
                        util::redact_url(&slot.url),
                        crate::api::error_chain(&e)
                    ))
                })?;
            if !response.status().is_success() {
                let status = response.status();
                let retry_after = crate::api::retry_after(&response);
                let body = util::read_prefix(response, 4096).await;
                return Err(upload_refusal(
                    role.name,
                    &slot.url,
                    status,
                    retry_after,
                    &body,
                ));
            }
            refs.push((role.ref_key.to_string(), slot.file_id));
        }
        Ok(Prepared::done(refs))
    }

    async fn submit(
        &self,
        api: &Api,
        job: &JobContext<'_>,
    ) -> Result<SubmitOutcome, ProviderError> {
        let task_id = self.run_task(api, job).await?;
        Ok(SubmitOutcome::Accepted {
            remote_id: task_id,
            // Half the keep-alive at most: the engine's scheduling slack must never let
            // the task drop before its first poll.
            first_poll_after: Some(self.poll_interval.min(self.keep_alive / 2)),
        })
    }

    /// The same run request again: Perfect answers a repeated `request_id` for the same
    /// files with the task it already has, without running or charging it twice.
    async fn reconcile(
        &self,
        api: &Api,
        job: &JobContext<'_>,
    ) -> Result<Reconciliation, ProviderError> {
        let remote_id = self.run_task(api, job).await?;
        Ok(Reconciliation::Found { remote_id })
    }

    async fn poll(
        &self,
        api: &Api,
        job: &JobContext<'_>,
        remote_id: &str,
    ) -> Result<PollOutcome, ProviderError> {
        let plan = self.plan(job.spec)?;
        let path = format!(
            "{API}/task/{}?task_id={}",
            self.slug(plan.feature),
            encode_query(remote_id)
        );
        match self
            .call(api, RequestKind::Poll, Method::GET, &path, None)
            .await
        {
            Ok(answer) => parse_status(&answer.result, plan.ext, self.keep_alive)
                .map_err(|e| ProviderError::transient(format!("perfect: {e}"))),
            // Dropped for lack of polls (or expired): never charged, since credits go
            // only on success.
            Err(ProviderError::Lost(reason)) => Ok(PollOutcome::Lost {
                reason,
                charged: false,
            }),
            Err(e) => Err(e),
        }
    }

    fn keep_alive(&self) -> Option<Duration> {
        Some(self.keep_alive)
    }

    fn early_not_found(&self) -> Option<Duration> {
        Some(self.early_invalid)
    }

    /// With the RSA key pair, the token request itself; with a console API key, the
    /// credit endpoint (the one v1.0 route that takes it) and then the refusal that a
    /// run would meet, so `doctor` does not pass a setup that cannot run jobs.
    async fn check_access(&self, api: &Api) -> Result<String, ProviderError> {
        if matches!(self.mode, auth::Mode::Rsa { .. }) {
            self.bearer(api, false).await?;
            return Ok("client id and key accepted (POST /client/auth gave a token)".into());
        }
        let b = self.balance(api).await?;
        let seen = b.map_or(String::new(), |b| {
            format!(" (balance {} {})", b.amount, b.unit)
        });
        Err(ProviderError::permanent(format!(
            "the API key was accepted by the credit endpoint{seen}, but {API_KEY_REFUSAL}"
        )))
    }

    /// `GET /s2s/v1.0/client/credit`: the spendable (`Api…`) batches summed.
    async fn balance(&self, api: &Api) -> Result<Option<Balance>, ProviderError> {
        let v = self
            .call_whole(api, RequestKind::Query, CREDIT_PATH, true)
            .await?;
        parse_credit(&v)
            .map(Some)
            .map_err(|e| ProviderError::bad_answer(RequestKind::Query, format!("perfect: {e}")))
    }

    async fn styles(
        &self,
        api: &Api,
        query: &StyleQuery,
    ) -> Result<Vec<StyleEntry>, ProviderError> {
        let Some(op) = query.feature.as_deref().filter(|f| !f.trim().is_empty()) else {
            return Err(ProviderError::permanent(format!(
                "perfect: name the feature whose styles to list (one of {})",
                styled_operations().join(", ")
            )));
        };
        let Some(f) = feature(op).filter(|f| matches!(f.kind, Kind::Styled | Kind::TextToImage))
        else {
            return Err(ProviderError::permanent(format!(
                "perfect: {op:?} has no styles (features with styles: {})",
                styled_operations().join(", ")
            )));
        };
        let slug = self.slug(f);
        let group = match query
            .group
            .as_deref()
            .map(str::trim)
            .filter(|g| !g.is_empty())
        {
            Some(g) => Some(
                features::id_value("the group", &Value::String(g.to_string()))
                    .map_err(ProviderError::permanent)?,
            ),
            None => None,
        };
        let limit = query.limit.unwrap_or(usize::MAX);
        let mut out = Vec::new();
        let mut token: Option<String> = None;
        let mut seen = std::collections::HashSet::new();
        for _ in 0..MAX_STYLE_PAGES {
            let mut path = match group {
                Some(g) => format!(
                    "{API}/task/style/{slug}?style_group_id={g}&page_size={STYLE_PAGE_SIZE}"
                ),
                None => format!("{API}/task/style-group/{slug}?page_size={STYLE_PAGE_SIZE}"),
            };
            if let Some(t) = &token {
                path.push_str(&format!("&starting_token={}", encode_query(t)));
            }
            let answer = self
                .call_whole(api, RequestKind::Query, &path, false)
                .await?;
            let (entries, next) = parse_style_page(&answer, group.is_some())
                .map_err(|e| ProviderError::permanent(format!("perfect: {op}: {e}")))?;
            for e in entries {
                if out.len() >= limit {
                    return Ok(out);
                }
                out.push(e);
            }
            match next {
                Some(t) if out.len() < limit && seen.insert(t.clone()) => token = Some(t),
                _ => return Ok(out),
            }
        }
        Ok(out)
    }
}

fn styled_operations() -> Vec<&'static str> {
    FEATURES
        .iter()
        .filter(|f| matches!(f.kind, Kind::Styled | Kind::TextToImage))
        .map(|f| f.operation)
        .collect()
}

/// Where the items of a style-group list may be: the document's `result.groups`, and
/// the `style_groups` / `data.style_groups` other live clients read (LIVE.md). Style
/// lists: `styles` under `result` or `data`.
const GROUP_FIELDS: &[&str] = &["groups", "style_groups"];
const STYLE_FIELDS: &[&str] = &["styles"];

/// One page of a style or style-group list (the whole answer), and the token of the
/// next page. An answer with none of the known lists is an error naming the fields it
/// has, so a changed shape is not shown as an empty list.
pub fn parse_style_page(
    answer: &Value,
    styles: bool,
) -> Result<(Vec<StyleEntry>, Option<String>), String> {
    let fields = if styles { STYLE_FIELDS } else { GROUP_FIELDS };
    // `result`, then `data`, then the answer itself (a bare page).
    let containers: Vec<(&str, &Value)> = [
        ("result.", answer.get("result")),
        ("data.", answer.get("data")),
        ("", Some(answer)),
    ]
    .into_iter()
    .filter_map(|(name, v)| v.filter(|v| v.is_object()).map(|v| (name, v)))
    .collect();
    let found = containers.iter().find_map(|(prefix, c)| {
        fields.iter().find_map(|f| {
            c.get(*f)
                .filter(|v| !v.is_null())
                .map(|v| (format!("{prefix}{f}"), *c, v))
        })
    });
    let Some((field, container, list)) = found else {
        let seen: Vec<String> = containers
            .iter()
            .map(|(prefix, c)| format!("{prefix}{{{}}}", field_names(c)))
            .collect();
        return Err(format!(
            "the answer has no {} list (looked for {}; found {})",
            if styles { "style" } else { "style-group" },
            fields.join(", "),
            seen.join(" ")
        ));
    };
    let Value::Array(items) = list else {
        return Err(format!(
            "{field} is not a list: {}",
            excerpt(list.to_string().as_bytes())
        ));
    };
    let mut out = Vec::new();
    for (i, item) in items.iter().enumerate() {
        let id =
            id_text(item.get("id")).ok_or_else(|| format!("{field}[{i}] has no integer id"))?;
        let info = item.get("info");
        let text = |name: &str| {
            info.and_then(|i| i.get(name))
                .or_else(|| item.get(name))
                .and_then(Value::as_str)
                .map(str::to_string)
        };
        let mut detail = Vec::new();
        if styles {
            if let Some(thumb) = text("thumb") {
                detail.push(("thumb".to_string(), thumb));
            }
        }
        out.push(StyleEntry {
            kind: if styles { "style" } else { "group" },
            id,
            title: text("title").or_else(|| text("name")).unwrap_or_default(),
            detail,
        });
    }
    let next = id_text(container.get("next_token"));
    Ok((out, next))
}

/// The credit answer (YouCam-API/skills `youcam_api.py`): batches `[{type, amount}]`
/// at the top level as `results`, or under `result` / `data` (read as well, since the
/// other answers of this API nest so). Only the `Api…` batch types are spendable
/// through the API; when no batch has such a type, every batch counts.
pub fn parse_credit(answer: &Value) -> Result<Balance, String> {
    let batches = [
        answer.get("results"),
        answer.get("result").and_then(|r| r.get("results")),
        answer.get("data").and_then(|r| r.get("results")),
        answer.get("result").filter(|r| r.is_array()),
        answer.get("data").filter(|r| r.is_array()),
    ]
    .into_iter()
    .flatten()
    .find_map(Value::as_array)
    .ok_or_else(|| {
        format!(
            "the credit answer has no list of batches (fields: {})",
            field_names(answer)
        )
    })?;
    let mut spendable = 0.0;
    let mut total = 0.0;
    let mut any_api = false;
    for (i, b) in batches.iter().enumerate() {
        let amount = b
            .get("amount")
            .and_then(Value::as_f64)
            .ok_or_else(|| format!("credit batch {i} has no numeric amount"))?;
        total += amount;
        if b.get("type")
            .and_then(Value::as_str)
            .is_some_and(|t| t.starts_with(SPENDABLE_PREFIX))
        {
            any_api = true;
            spendable += amount;
        }
    }
    Ok(Balance {
        amount: if any_api { spendable } else { total },
        unit: "credits".into(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::OpenGate;
    use crate::providers::Credentials;

    fn spec(op: &str, inputs: &[&str], prompt: Option<&str>, params: Value) -> JobSpec {
        JobSpec {
            id: "job-1".into(),
            provider: ProviderKind::Perfect,
            operation: op.into(),
            inputs: inputs.iter().map(|s| s.to_string()).collect(),
            prompt: prompt.map(str::to_string),
            params_json: params.to_string(),
            output: None,
            metadata: Vec::new(),
        }
    }

    #[test]
    fn request_ids_are_stable_per_submission_and_distinct_per_job() {
        let a1 = request_id("job-a", 1);
        assert_eq!(a1, request_id("job-a", 1), "the same on every retry");
        assert_eq!(
            request_id("job-a", 2),
            a1 + 1,
            "the next submission is the next number"
        );
        assert_ne!(a1, request_id("job-b", 1));
        assert!(a1 < 1 << 52, "exact in any JSON reader");
    }

    #[test]
    fn style_ids_above_2_pow_53_stay_exact() {
        let big: u64 = (1 << 53) + 1;
        let body = format!(r#"{{"style_group_id":{big},"style_id":"{}"}}"#, big + 2);
        let s = JobSpec {
            params_json: body,
            ..spec("hair-style", &["x.jpg"], None, json!({}))
        };
        let plan = Plan::from_spec(&s).unwrap();
        let run = plan.run_body(7, &[("src_ids", "f+1/2".into())]);
        let text = run.to_string();
        assert!(
            text.contains(&format!("\"style_group_id\":{big}")),
            "{text}"
        );
        assert!(
            text.contains(&format!("\"style_ids\":[{}]", big + 2)),
            "{text}"
        );
        assert!(text.contains("\"src_ids\":[\"f+1/2\"]"));
        assert!(text.contains("\"request_id\":7"));
        for bad in [json!(1.5), json!("12a"), json!(-3), json!(true)] {
            let s = spec(
                "wig",
                &["x.jpg"],
                None,
                json!({"style_group_id": 1, "style_id": bad}),
            );
            let e = Plan::from_spec(&s).unwrap_err().join("; ");
            assert!(e.contains("style_id must be a whole number id"), "{e}");
        }
    }

    #[test]
    fn plans_per_feature() {
        let p = Plan::from_spec(&spec("background_removal", &["a.png"], None, json!({}))).unwrap();
        assert_eq!(p.ext, "png");
        assert_eq!(
            p.run_body(0, &[("src_ids", "f".into())])["payload"]["actions"],
            json!([{"id": 0}])
        );
        let e = Plan::from_spec(&spec("photo-enhance", &["a.png"], None, json!({}))).unwrap_err();
        assert!(e[0].contains("scale is required"));
        let p = Plan::from_spec(&spec("enhance", &["a.png"], None, json!({"scale": "4"}))).unwrap();
        assert_eq!(p.action_params, Some(json!({"scale": 4})));
        let e = Plan::from_spec(&spec(
            "text-to-image",
            &[],
            None,
            json!({"style_group_id": 1, "style_id": 2}),
        ))
        .unwrap_err();
        assert!(e.join(";").contains("needs a prompt"));
        let t = Plan::from_spec(&spec(
            "text-to-image",
            &[],
            Some("a cat"),
            json!({"style_group_id": 1, "style_ids": [2]}),
        ))
        .unwrap();
        let body = t.run_body(1, &[]);
        assert!(body["payload"].get("file_sets").is_none());
        assert_eq!(body["payload"]["actions"][0]["params"]["prompt"], "a cat");
        let e = Plan::from_spec(&spec(
            "colorize",
            &["a.png"],
            Some("x"),
            json!({"colour": 1}),
        ))
        .unwrap_err();
        assert_eq!(e.len(), 2, "{e:?}");
        assert!(Plan::from_spec(&spec("teleport", &[], None, json!({}))).is_err());
    }

    #[test]
    fn validation_reads_local_files() {
        let dir = tempfile::tempdir().unwrap();
        let jpg = dir.path().join("f.jpg");
        let png = dir.path().join("m.png");
        std::fs::write(&jpg, crate::sim::images::sample_jpeg(1100, 600, 1)).unwrap();
        std::fs::write(&png, crate::sim::images::sample_png(40, 30, 1)).unwrap();
        let (j, p) = (jpg.to_str().unwrap(), png.to_str().unwrap());
        let e = validate(&spec(
            "hair-style",
            &[p],
            None,
            json!({"style_group_id": 1, "style_id": 2}),
        ));
        assert!(e.iter().any(|m| m.contains("takes JPEG")), "{e:?}");
        let e = validate(&spec(
            "hair-style",
            &[j],
            None,
            json!({"style_group_id": 1, "style_id": 2}),
        ));
        assert!(e.iter().any(|m| m.contains("at most 1024")), "{e:?}");
        assert!(validate(&spec("colorize", &[j], None, json!({}))).is_empty());
        let e = validate(&spec("object-removal", &[j, p], None, json!({})));
        assert!(e.iter().any(|m| m.contains("same size")), "{e:?}");
        let e = validate(&spec("makeup-transfer", &[j], None, json!({})));
        assert!(e[0].contains("source|reference"), "{e:?}");
    }

    #[test]
    fn engine_errors_are_classified() {
        assert_eq!(
            classify_engine_error("error_no_face"),
            (
                "error_no_face: No face detected on source image".into(),
                true
            )
        );
        assert!(!classify_engine_error("error_inference").1);
        assert!(!classify_engine_error("exceed_nsfw_retry_limits").1);
        assert!(classify_engine_error("error_decode_something_new").1);
        assert!(!classify_engine_error("").1);
    }

    #[test]
    fn status_answers_are_read_without_panics() {
        let ka = Duration::from_secs(10);
        let r = parse_status(
            &json!({"status": "running", "polling_interval": 9000}),
            "jpg",
            ka,
        )
        .unwrap();
        assert!(
            matches!(r, PollOutcome::Running { next_poll: Some(d) } if d == Duration::from_secs(5))
        );
        let r = parse_status(&json!({"status":"success","results":[{"id":0,"data":[{"url":"https://x/a.png?sig=1"},{"url":"https://x/b"}]}]}), "jpg", ka).unwrap();
        let PollOutcome::Succeeded(o) = r else {
            panic!("{r:?}")
        };
        assert!(matches!(&o[0], PendingOutput::Url { ext, .. } if ext == "png"));
        assert!(matches!(&o[1], PendingOutput::Url { ext, .. } if ext == "jpg"));
        let r = parse_status(&json!({"status":"error","error":"error_pose"}), "jpg", ka).unwrap();
        assert!(matches!(
            r,
            PollOutcome::Failed {
                permanent: true,
                ..
            }
        ));
        for garbage in [
            json!({}),
            json!({"status": 3}),
            json!({"status": "success", "results": "x"}),
            json!([1]),
        ] {
            assert!(parse_status(&garbage, "jpg", ka).is_err(), "{garbage}");
        }
        assert!(parse_file_slots(&json!({"files": [{"file_id": "a"}]}), 1)
            .unwrap_err()
            .contains("no upload request"));
        assert!(parse_file_slots(&json!({"files": []}), 1).is_err());
        let ok = parse_file_slots(&json!({"files": [{"file_id": "a+b/c", "requests": [{"method": "put", "url": "http://h/u", "headers": {"Content-Type": "image/png"}}]}]}), 1).unwrap();
        assert_eq!(ok[0].method, Method::PUT);
        assert_eq!(
            ok[0].headers,
            vec![("Content-Type".to_string(), "image/png".to_string())]
        );
        let (entries, next) = parse_style_page(&json!({"result": {"groups": [{"id": 9007199254740993u64, "info": {"title": "Short"}}], "next_token": 20}}), false).unwrap();
        assert_eq!(entries[0].id, "9007199254740993");
        assert_eq!(next.as_deref(), Some("20"));
        assert!(parse_style_page(&json!({"groups": [{"id": 1.5}]}), false).is_err());
    }

    fn config(credentials: Credentials) -> ProviderConfig {
        let mut c = crate::config::Config::load(None, &|_| None)
            .unwrap()
            .provider(ProviderKind::Perfect);
        c.credentials = credentials;
        c
    }

    /// The live-evidence defaults (docs/providers.md): an early `InvalidTaskId` is
    /// tolerated 10 s (crishirt: five retries at 2 s); a console key alone builds
    /// (for the balance) but refuses to authenticate a run, naming what to set.
    #[tokio::test]
    async fn early_window_default_and_api_key_refusal() {
        let p = build(&config(Credentials {
            api_key: Some("k".into()),
            ..Default::default()
        }))
        .unwrap();
        assert_eq!(p.early_not_found(), Some(Duration::from_secs(10)));
        let api = Api::new(
            "http://127.0.0.1:9",
            reqwest::Client::new(),
            Arc::new(OpenGate),
        );
        let e = p.authenticate(&api).await.expect_err("api_key runs no job");
        assert!(
            matches!(&e, ProviderError::Permanent(m) if m.contains("PERFECT_CLIENT_ID") && m.contains("PERFECT_CLIENT_SECRET")),
            "{e:?}"
        );
        let mut c = config(Credentials {
            api_key: Some("k".into()),
            ..Default::default()
        });
        c.early_not_found = Some(Duration::from_millis(1500));
        assert_eq!(
            build(&c).unwrap().early_not_found(),
            Some(Duration::from_millis(1500))
        );
    }

    #[test]
    fn credit_batches_sum_the_api_types() {
        let v = json!({"status": 200, "results": [
            {"type": "ApiSubscription", "amount": 120},
            {"type": "ApiTopUp", "amount": 30.5},
            {"type": "WebTrial", "amount": 25}
        ]});
        assert_eq!(parse_credit(&v).unwrap().amount, 150.5);
        let nested =
            json!({"status": 200, "result": {"results": [{"type": "Other", "amount": 7}]}});
        assert_eq!(
            parse_credit(&nested).unwrap().amount,
            7.0,
            "no Api type: all count"
        );
        let e = parse_credit(&json!({"status": 200, "result": {"credit": 5}})).unwrap_err();
        assert!(e.contains("result"), "{e}");
        assert!(parse_credit(&json!({"results": [{"type": "Api"}]})).is_err());
    }

    #[test]
    fn style_pages_in_every_shape_seen() {
        let item = json!([{"id": 9007199254740993u64, "info": {"title": "Short"}}]);
        for answer in [
            json!({"status": 200, "result": {"groups": item}}),
            json!({"status": 200, "result": {"style_groups": item}}),
            json!({"status": 200, "data": {"style_groups": item, "next_token": "20"}}),
            json!({"groups": item}),
        ] {
            let (entries, _) = parse_style_page(&answer, false).unwrap();
            assert_eq!(entries.len(), 1, "{answer}");
            assert_eq!(entries[0].id, "9007199254740993");
            assert_eq!(entries[0].title, "Short");
        }
        let (_, next) = parse_style_page(
            &json!({"data": {"style_groups": [], "next_token": "20"}}),
            false,
        )
        .unwrap();
        assert_eq!(next.as_deref(), Some("20"));
        // A known list that is empty is an empty page; no known list at all is an
        // error naming what the answer had, not a silent empty list.
        assert!(parse_style_page(&json!({"result": {"groups": []}}), false)
            .unwrap()
            .0
            .is_empty());
        let e = parse_style_page(&json!({"status": 200, "result": {"items": item}}), false)
            .unwrap_err();
        assert!(e.contains("style_groups") && e.contains("items"), "{e}");
    }

    #[test]
    fn build_names_the_variables() {
        let e = build(&config(Credentials::default())).err().unwrap();
        assert!(
            e.contains("PERFECT_CLIENT_ID") && e.contains("PERFECT_API_KEY"),
            "{e}"
        );
        let e = build(&config(Credentials {
            client_id: Some("id".into()),
            ..Default::default()
        }))
        .err()
        .unwrap();
        assert!(e.contains("PERFECT_CLIENT_SECRET"), "{e}");
        assert!(build(&config(Credentials {
            api_key: Some("k".into()),
            ..Default::default()
        }))
        .is_ok());
        let mut c = config(Credentials {
            api_key: Some("k".into()),
            ..Default::default()
        });
        c.operations.insert("nothing".into(), "x".into());
        assert!(build(&c).err().unwrap().contains("unknown operation"));
    }

    #[tokio::test]
    async fn styles_follow_every_page_against_the_simulator() {
        let sim = crate::sim::spawn(crate::sim::SimConfig {
            limits: Default::default(),
            ..Default::default()
        })
        .await
        .unwrap();
        let creds = &sim.credentials()["perfect"];
        let adapter = build(&config(Credentials {
            client_id: creds["PERFECT_CLIENT_ID"].as_str().map(str::to_string),
            client_secret: creds["PERFECT_CLIENT_SECRET"].as_str().map(str::to_string),
            api_key: None,
        }))
        .unwrap();
        let client = reqwest::Client::builder().no_proxy().build().unwrap();
        let api = Api::new(
            &format!("{}/perfect", sim.base_url()),
            client,
            Arc::new(OpenGate),
        );
        adapter.authenticate(&api).await.unwrap();
        let q = StyleQuery {
            feature: Some("hair-style".into()),
            ..Default::default()
        };
        let groups = adapter.styles(&api, &q).await.unwrap();
        assert_eq!(groups.len(), 25, "two pages of groups");
        assert!(groups.iter().all(|g| g.kind == "group"));
        assert_eq!(groups[0].id, "9007199254740993");
        let q = StyleQuery {
            group: Some(groups[3].id.clone()),
            limit: Some(21),
            ..q
        };
        let styles = adapter.styles(&api, &q).await.unwrap();
        assert_eq!(styles.len(), 21, "the limit stops the second page");
        assert_eq!(styles[0].id, (9007199254740993u64 + 3000 + 1).to_string());
        assert!(styles[0].detail.iter().any(|(k, _)| k == "thumb"));
        let none = StyleQuery {
            feature: Some("colorize".into()),
            ..Default::default()
        };
        assert!(adapter.styles(&api, &none).await.is_err());
        sim.shutdown().await.unwrap();
    }
}
