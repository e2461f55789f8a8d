//! Photio Upscale API (`POST https://api.photio.io/v1/inference/upscale`).
//!
//! Synchronous: one JSON request, header `X-Photio-Key`; the answer is
//! `{"status_code": <int>, "body": "<base64 image>"}` — with HTTP 200 even when
//! `status_code` says the request failed. The input is sent inside the request: a
//! local file as base64, an http(s) URL as it is (Photio fetches it).
//!
//! No task id, no reconciliation, no cancel: a lost answer is resubmitted (and
//! recorded as a possible duplicate charge by the engine).

use async_trait::async_trait;
use reqwest::StatusCode;
use serde_json::{Map, Value};

use super::util::{self, Params};
use super::{Api, JobContext, OutputData, Provider, ProviderError, RequestKind, SubmitOutcome};
use crate::api::{excerpt, MAX_JSON_ANSWER};
use crate::model::{JobSpec, ProviderKind};

/// "Our maximum output pixel size is limited by 4K": the long side of the result.
pub const MAX_OUTPUT_SIDE: u64 = 4096;
/// The document gives no input size limit. With the 4096-pixel output cap and a
/// factor of at least 2, no sensible input comes near this; it only keeps a stray
/// huge file out of memory (base64 grows it by a third).
pub const MAX_INPUT_BYTES: u64 = 64_000_000;

const KNOWN_PARAMS: &[&str] = &[
    "upscale_by",
    "prompt",
    "negative_prompt",
    "quality",
    "denoising_strength",
];
const QUALITIES: &[&str] = &["LOW", "MIDDLE", "HIGH"];

/// A checked Photio request, without the image.
#[derive(Debug, Clone, PartialEq)]
pub struct Plan {
    pub upscale_by: u32,
    /// The JSON body's fields other than `image`.
    pub fields: Map<String, Value>,
}

impl Plan {
    pub fn from_spec(spec: &JobSpec) -> Result<Plan, Vec<String>> {
        let op = util::fold_operation(&spec.operation);
        if op != "upscale" {
            return Err(vec![format!(
                "unknown photio operation {:?} (expected upscale)",
                spec.operation
            )]);
        }
        let map = spec.params();
        let mut p = Params::new(&map);
        p.reject_unknown("photio", KNOWN_PARAMS);
        let mut fields = Map::new();
        let upscale_by = match p.get("upscale_by") {
            None => 2,
            Some(v) => match util::integer_in_range("upscale_by", v, 2, 4) {
                Ok(n @ (2 | 4)) => n as u32,
                _ => {
                    p.errors.push(format!(
                        "upscale_by must be 2 or 4 (got {})",
                        util::show_value(v)
                    ));
                    2
                }
            },
        };
        fields.insert("upscale_by".into(), Value::from(upscale_by));
        // The prompt column wins over params.prompt.
        if p.has("prompt") && !matches!(p.get("prompt"), Some(Value::String(_))) {
            p.errors.push(format!(
                "prompt must be a string (got {})",
                p.get("prompt").map(util::show_value).unwrap_or_default()
            ));
        }
        if let Some(prompt) = util::prompt_of(spec, &map) {
            fields.insert("prompt".into(), Value::String(prompt));
        }
        if let Some(neg) = p.text("negative_prompt", None) {
            fields.insert("negative_prompt".into(), Value::String(neg));
        }
        if let Some(q) = p.choice("quality", QUALITIES) {
            fields.insert("quality".into(), Value::String(q.into()));
        }
        if let Some(d) = p.number("denoising_strength", 0.0, 1.0) {
            fields.insert("denoising_strength".into(), Value::from(d));
        }
        if !p.errors.is_empty() {
            return Err(p.errors);
        }
        Ok(Plan { upscale_by, fields })
    }

    /// The output limit, once the input's size is known.
    pub fn check_input(&self, dims: Option<(u32, u32)>) -> Option<String> {
        let (w, h) = dims?;
        let long = u64::from(w.max(h));
        let out = long * u64::from(self.upscale_by);
        (out > MAX_OUTPUT_SIDE).then(|| {
            let max_in = MAX_OUTPUT_SIDE / u64::from(self.upscale_by);
            format!(
                "photio outputs at most {MAX_OUTPUT_SIDE} pixels on the long side: {w}x{h} upscaled by {} is {}x{} \
                 (inputs up to {max_in} pixels on the long side fit)",
                self.upscale_by,
                u64::from(w) * u64::from(self.upscale_by),
                u64::from(h) * u64::from(self.upscale_by),
            )
        })
    }
}

/// Checks a Photio job against the document before any request is made.
pub fn validate(spec: &JobSpec) -> Vec<String> {
    let mut errors = Vec::new();
    let plan = match Plan::from_spec(spec) {
        Ok(p) => Some(p),
        Err(e) => {
            errors.extend(e);
            None
        }
    };
    let local = util::check_single_input(spec, MAX_INPUT_BYTES, &mut errors);
    if let (Some(plan), Some(info)) = (plan, local) {
        errors.extend(plan.check_input(info.dimensions));
    }
    errors
}

/// Reads an answer: the image on `status_code` 200, else the error it stands for
/// (401 a permanent credential error, other 4xx permanent, 5xx transient).
pub fn parse_answer(v: &Value) -> Result<OutputData, ProviderError> {
    let kind = RequestKind::Submit;
    let Some(obj) = v.as_object() else {
        return Err(ProviderError::bad_answer(
            kind,
            format!("unexpected answer: {}", excerpt(v.to_string().as_bytes())),
        ));
    };
    let code = match obj.get("status_code") {
        Some(Value::Number(n)) => n.as_i64(),
        Some(Value::String(s)) => s.trim().parse::<i64>().ok(),
        _ => None,
    };
    let body = obj.get("body");
    match code {
        Some(200) | None => {
            let Some(Value::String(b64)) = body else {
                return Err(ProviderError::bad_answer(
                    kind,
                    format!(
                        "answer without an image: {}",
                        excerpt(v.to_string().as_bytes())
                    ),
                ));
            };
            let (data, ext) = util::decode_image(kind, "the answer's body", b64)?;
            Ok(OutputData::Bytes {
                data,
                ext: ext.to_string(),
            })
        }
        Some(code) => {
            // On failure `body` holds a message (or nothing useful).
            let detail = match body {
                Some(Value::String(s)) if !s.trim().is_empty() => excerpt(s.trim().as_bytes()),
                Some(Value::Object(_)) => body.and_then(util::json_message).unwrap_or_default(),
                _ => util::json_message(v).unwrap_or_default(),
            };
            let mut reason = format!("photio status_code {code}");
            if !detail.is_empty() {
                reason.push_str(": ");
                reason.push_str(&detail);
            }
            Err(match code {
                401 | 403 => ProviderError::credential(format!("{reason} (check PHOTIO_API_KEY)")),
                408 | 429 | 500..=599 => ProviderError::transient(reason),
                400..=499 => ProviderError::permanent(reason),
                // An unexpected code says nothing definite about the charge.
                _ => ProviderError::bad_answer(kind, reason),
            })
        }
    }
}

/// Reads a successful answer's body ([`parse_answer`]).
pub fn read_answer(status: StatusCode, body: &[u8]) -> Result<OutputData, ProviderError> {
    let v = util::parse_json(RequestKind::Submit, status, body)?;
    parse_answer(&v)
}

/// An error answer. It may carry the usual `{"status_code", "body": "<message>"}`.
pub fn read_refusal(status: StatusCode, body: &[u8]) -> ProviderError {
    let mut e = match serde_json::from_slice::<Value>(body) {
        Ok(v @ Value::Object(_)) if matches!(v.get("body"), Some(Value::String(_))) => {
            let msg = v.get("body").and_then(Value::as_str).unwrap_or_default();
            util::classify_http_error(RequestKind::Submit, status, msg.as_bytes())
        }
        _ => util::classify_http_error(RequestKind::Submit, status, body),
    };
    if matches!(status.as_u16(), 401 | 403) {
        if let ProviderError::Permanent(reason) = &e {
            e = ProviderError::credential(format!("{reason} (check PHOTIO_API_KEY)"));
        }
    }
    e
}

/// The Photio adapter.
pub struct Photio {
    api_key: String,
}

impl std::fmt::Debug for Photio {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Photio")
            .field("api_key", &"<redacted>")
            .finish()
    }
}

impl Photio {
    pub fn new(api_key: String) -> Photio {
        Photio {
            api_key: api_key.trim().to_string(),
        }
    }
}

#[async_trait]
impl Provider for Photio {
    fn kind(&self) -> ProviderKind {
        ProviderKind::Photio
    }

    async fn authenticate(&self, _api: &Api) -> Result<(), ProviderError> {
        util::secret_header("PHOTIO_API_KEY", &self.api_key).map(|_| ())
    }

    /// The API has no free call: an upscale without an image is refused as invalid
    /// (400, nothing to charge) once the key passes, and with 401/403 when not.
    async fn check_access(&self, api: &Api) -> Result<String, ProviderError> {
        let key = util::secret_header("PHOTIO_API_KEY", &self.api_key)?;
        let request = api
            .client()
            .post(api.url("/inference/upscale"))
            .header("X-Photio-Key", key)
            .json(&serde_json::json!({}));
        let response = api.send(RequestKind::Query, request).await?;
        let status = response.status();
        if matches!(status.as_u16(), 401 | 403 | 404 | 405) {
            return Err(util::http_error(RequestKind::Query, response).await);
        }
        Ok(format!(
            "key accepted (an upscale without an image was answered HTTP {status}, not charged)"
        ))
    }

    async fn submit(
        &self,
        api: &Api,
        job: &JobContext<'_>,
    ) -> Result<SubmitOutcome, ProviderError> {
        let plan = Plan::from_spec(job.spec).map_err(|e| ProviderError::permanent(e.join("; ")))?;
        let source = util::single_input(job.spec)?;
        let image = if util::is_url(source) {
            // Photio fetches URLs itself.
            source.to_string()
        } else {
            let input = util::load_input(api, source, MAX_INPUT_BYTES).await?;
            if input.format.is_none() {
                return Err(ProviderError::permanent(format!(
                    "input {source} is not an image format pixbatch recognises"
                )));
            }
            if let Some(problem) = plan.check_input(input.dimensions()) {
                return Err(ProviderError::permanent(problem));
            }
            util::encode_base64(&input.bytes)
        };
        let mut body = plan.fields.clone();
        body.insert("image".into(), Value::String(image));
        let key = util::secret_header("PHOTIO_API_KEY", &self.api_key)?;
        let request = api
            .client()
            .post(api.url("/inference/upscale"))
            .header("X-Photio-Key", key)
            .header("X-Request-Id", job.submit_key.as_str())
            .json(&Value::Object(body));
        let response = api.send(RequestKind::Submit, request).await?;
        let status = response.status();
        if !status.is_success() {
            let body = util::read_error_body(response, 64 * 1024).await?;
            return Err(read_refusal(status, &body));
        }
        let body = Api::read_bytes(RequestKind::Submit, response, MAX_JSON_ANSWER).await?;
        let output = read_answer(status, &body)?;
        Ok(SubmitOutcome::Finished {
            remote_id: None,
            outputs: vec![output],
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn spec(inputs: &[&str], prompt: Option<&str>, params: Value) -> JobSpec {
        JobSpec {
            id: "p1".into(),
            provider: ProviderKind::Photio,
            operation: "upscale".into(),
            inputs: inputs.iter().map(|s| s.to_string()).collect(),
            prompt: prompt.map(str::to_string),
            params_json: params.to_string(),
            output: None,
            metadata: Vec::new(),
        }
    }

    fn png(w: u32, h: u32) -> Vec<u8> {
        let img = image::RgbImage::from_pixel(w, h, image::Rgb([1, 2, 3]));
        let mut out = std::io::Cursor::new(Vec::new());
        img.write_to(&mut out, image::ImageFormat::Png)
            .expect("encode png");
        out.into_inner()
    }

    fn has(errors: &[String], needle: &str) -> bool {
        errors.iter().any(|e| e.contains(needle))
    }

    #[test]
    fn validation_follows_the_document() {
        let url = "https://example.com/a.jpg";
        assert!(validate(&spec(&[url], None, json!({}))).is_empty());
        assert!(validate(&spec(
            &[url],
            None,
            json!({"upscale_by": "4", "quality": "high", "denoising_strength": "0.3"})
        ))
        .is_empty());
        let e = validate(&spec(&[url], None, json!({"upscale_by": 3})));
        assert!(has(&e, "upscale_by must be 2 or 4 (got 3)"), "{e:?}");
        let e = validate(&spec(&[url], None, json!({"quality": "ULTRA"})));
        assert!(
            has(&e, "quality must be one of \"LOW\", \"MIDDLE\" or \"HIGH\""),
            "{e:?}"
        );
        let e = validate(&spec(&[url], None, json!({"denoising_strength": 2})));
        assert!(
            has(
                &e,
                "denoising_strength must be a number from 0 to 1 (got 2)"
            ),
            "{e:?}"
        );
        let e = validate(&spec(&[url], None, json!({"scale": 2})));
        assert!(has(&e, "unknown photio parameter \"scale\""), "{e:?}");
        let mut s = spec(&[url], None, json!({}));
        s.operation = "enhance".into();
        assert!(has(&validate(&s), "unknown photio operation"));
        assert!(has(
            &validate(&spec(&[url, url], None, json!({}))),
            "exactly one input"
        ));
    }

    #[test]
    fn the_output_long_side_is_at_most_4096() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("in.png");
        std::fs::write(&path, png(1100, 300)).expect("write");
        let p = path.to_str().expect("utf8");
        assert!(validate(&spec(&[p], None, json!({"upscale_by": 2}))).is_empty());
        let e = validate(&spec(&[p], None, json!({"upscale_by": 4})));
        assert!(
            has(
                &e,
                "at most 4096 pixels on the long side: 1100x300 upscaled by 4 is 4400x1200"
            ),
            "{e:?}"
        );
        let plan = Plan::from_spec(&spec(&[p], None, json!({}))).expect("plan");
        assert!(plan.check_input(Some((2048, 100))).is_none());
        assert!(plan.check_input(Some((100, 2049))).is_some());
        assert!(plan.check_input(None).is_none());
    }

    #[test]
    fn the_prompt_column_wins() {
        let plan = Plan::from_spec(&spec(
            &["https://x/a.png"],
            Some("column"),
            json!({"prompt": "param"}),
        ))
        .expect("plan");
        assert_eq!(plan.fields.get("prompt"), Some(&json!("column")));
        let plan = Plan::from_spec(&spec(
            &["https://x/a.png"],
            None,
            json!({"prompt": "param"}),
        ))
        .expect("plan");
        assert_eq!(plan.fields.get("prompt"), Some(&json!("param")));
        assert_eq!(plan.fields.get("upscale_by"), Some(&json!(2)));
    }

    #[test]
    fn answers_are_read_and_errors_classified() {
        let img = png(4, 4);
        let ok = json!({"status_code": 200, "body": util::encode_base64(&img)});
        match parse_answer(&ok) {
            Ok(OutputData::Bytes { data, ext }) => {
                assert_eq!(data.as_ref(), img.as_slice());
                assert_eq!(ext, "png");
            }
            other => panic!("{other:?}"),
        }
        let e = parse_answer(&json!({"status_code": 401, "body": "invalid key"})).expect_err("401");
        assert!(
            matches!(&e, ProviderError::Credential(m) if m.contains("401") && m.contains("invalid key")),
            "{e:?}"
        );
        let e = parse_answer(&json!({"status_code": 422, "body": ""})).expect_err("422");
        assert!(matches!(e, ProviderError::Permanent(_)), "{e:?}");
        let e = parse_answer(&json!({"status_code": 500, "body": "GPU out of memory"}))
            .expect_err("500");
        assert!(matches!(e, ProviderError::Transient { .. }), "{e:?}");
        let e = parse_answer(&json!({"status_code": "503"})).expect_err("503");
        assert!(matches!(e, ProviderError::Transient { .. }), "{e:?}");
        // Garbage after a paid request: the outcome is unknown.
        for garbage in [
            json!({"status_code": 200, "body": "%%%"}),
            json!({"status_code": 200}),
            json!([1]),
            json!("x"),
        ] {
            assert!(
                matches!(parse_answer(&garbage), Err(ProviderError::Unknown(_))),
                "{garbage}"
            );
        }
    }
}

/// The adapter against a small local server speaking Photio's HTTP.
#[cfg(test)]
mod http_tests {
    use std::sync::{Arc, Mutex};

    use axum::extract::State;
    use axum::http::{HeaderMap, StatusCode as Code};
    use axum::response::{IntoResponse, Response};
    use axum::routing::post;
    use axum::{Json, Router};
    use serde_json::json;

    use super::*;
    use crate::api::OpenGate;

    type Shared = Arc<Mutex<Vec<(Option<String>, Option<String>, Value)>>>;

    fn png(w: u32, h: u32) -> Vec<u8> {
        let img = image::RgbImage::from_pixel(w, h, image::Rgb([1, 2, 3]));
        let mut out = std::io::Cursor::new(Vec::new());
        img.write_to(&mut out, image::ImageFormat::Png)
            .expect("encode png");
        out.into_inner()
    }

    async fn upscale(
        State(s): State<Shared>,
        headers: HeaderMap,
        Json(body): Json<Value>,
    ) -> Response {
        let header = |n: &str| {
            headers
                .get(n)
                .and_then(|v| v.to_str().ok())
                .map(str::to_string)
        };
        let key = header("x-photio-key");
        s.lock()
            .expect("lock")
            .push((key.clone(), header("x-request-id"), body.clone()));
        if key.as_deref() != Some("pk") {
            return (Code::UNAUTHORIZED, Json(json!({"message": "bad key"}))).into_response();
        }
        match body.get("image").and_then(Value::as_str) {
            Some("https://example.com/fail.png") => {
                Json(json!({"status_code": 500, "body": "busy"})).into_response()
            }
            Some("https://example.com/garbage.png") => "not json".into_response(),
            _ => Json(json!({"status_code": 200, "body": util::encode_base64(&png(8, 8))}))
                .into_response(),
        }
    }

    async fn server() -> (Api, Shared) {
        let state: Shared = Arc::default();
        let app = Router::new()
            .route("/photio/v1/inference/upscale", post(upscale))
            .with_state(state.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        let api = Api::new(
            &format!("http://{addr}/photio/v1"),
            reqwest::Client::new(),
            Arc::new(OpenGate),
        );
        (api, state)
    }

    fn job_spec(input: &str, params: Value) -> JobSpec {
        JobSpec {
            id: "p1".into(),
            provider: ProviderKind::Photio,
            operation: "upscale".into(),
            inputs: vec![input.into()],
            prompt: Some("a lighthouse".into()),
            params_json: params.to_string(),
            output: None,
            metadata: Vec::new(),
        }
    }

    #[tokio::test]
    async fn local_files_go_as_base64_and_urls_as_they_are() {
        let (api, seen) = server().await;
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("in.png");
        let input = png(10, 10);
        std::fs::write(&path, &input).expect("write");
        let spec = job_spec(
            &path.to_string_lossy(),
            json!({"upscale_by": 4, "quality": "middle"}),
        );
        let job = JobContext {
            spec: &spec,
            submit_key: "p1~1".into(),
            submission: 1,
            prepared: &[],
        };
        let photio = Photio::new("pk".into());
        match photio.submit(&api, &job).await.expect("submit") {
            SubmitOutcome::Finished {
                remote_id: None,
                outputs,
            } => match outputs.as_slice() {
                [OutputData::Bytes { ext, .. }] => assert_eq!(ext, "png"),
                other => panic!("{other:?}"),
            },
            other => panic!("{other:?}"),
        }
        let (key, request_id, body) = seen.lock().expect("lock")[0].clone();
        assert_eq!(key.as_deref(), Some("pk"));
        assert_eq!(request_id.as_deref(), Some("p1~1"));
        assert_eq!(body["image"], json!(util::encode_base64(&input)));
        assert_eq!(body["upscale_by"], json!(4));
        assert_eq!(body["quality"], json!("MIDDLE"));
        assert_eq!(body["prompt"], json!("a lighthouse"));

        let spec = job_spec("https://example.com/a.png", json!({}));
        let job = JobContext {
            spec: &spec,
            submit_key: "p1~2".into(),
            submission: 1,
            prepared: &[],
        };
        photio.submit(&api, &job).await.expect("url submit");
        assert_eq!(
            seen.lock().expect("lock")[1].2["image"],
            json!("https://example.com/a.png")
        );
    }

    #[tokio::test]
    async fn failures_are_classified() {
        let (api, _) = server().await;
        let run = |input: &'static str, key: &'static str| {
            let api = api.clone();
            async move {
                let spec = job_spec(input, json!({}));
                let job = JobContext {
                    spec: &spec,
                    submit_key: "p1~1".into(),
                    submission: 1,
                    prepared: &[],
                };
                Photio::new(key.into()).submit(&api, &job).await
            }
        };
        let e = run("https://example.com/a.png", "wrong")
            .await
            .expect_err("401");
        assert!(
            matches!(&e, ProviderError::Credential(m) if m.contains("401") && m.contains("PHOTIO_API_KEY")),
            "{e:?}"
        );
        let e = run("https://example.com/fail.png", "pk")
            .await
            .expect_err("500 in body");
        assert!(matches!(e, ProviderError::Transient { .. }), "{e:?}");
        let e = run("https://example.com/garbage.png", "pk")
            .await
            .expect_err("garbage");
        assert!(matches!(e, ProviderError::Unknown(_)), "{e:?}");
    }
}

/// The adapter against the built-in simulator (`crate::sim`).
#[cfg(test)]
mod sim_tests {
    use std::time::Duration;

    use serde_json::json;

    use super::*;

    fn png(w: u32, h: u32) -> Vec<u8> {
        let img = image::RgbImage::from_fn(w, h, |x, y| image::Rgb([x as u8, y as u8, 7]));
        let mut out = std::io::Cursor::new(Vec::new());
        img.write_to(&mut out, image::ImageFormat::Png)
            .expect("encode png");
        out.into_inner()
    }

    #[tokio::test]
    async fn upscale_against_the_simulator() {
        let (sim, api) = crate::providers::sim_api(
            crate::model::ProviderKind::Photio,
            Duration::from_millis(50),
        )
        .await;
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("in.png");
        std::fs::write(&path, png(60, 40)).expect("write");
        let spec = JobSpec {
            id: "p1".into(),
            provider: ProviderKind::Photio,
            operation: "upscale".into(),
            inputs: vec![path.to_string_lossy().into_owned()],
            prompt: None,
            params_json: json!({"upscale_by": 2, "quality": "HIGH"}).to_string(),
            output: None,
            metadata: Vec::new(),
        };
        assert!(validate(&spec).is_empty());
        let job = JobContext {
            spec: &spec,
            submit_key: "p1~1".into(),
            submission: 1,
            prepared: &[],
        };
        match Photio::new("sim-key".into())
            .submit(&api, &job)
            .await
            .expect("submit")
        {
            SubmitOutcome::Finished { outputs, .. } => match outputs.as_slice() {
                [OutputData::Bytes { data, .. }] => {
                    assert_eq!(util::dimensions_from_bytes(data), Some((120, 80)));
                }
                other => panic!("{other:?}"),
            },
            other => panic!("{other:?}"),
        }
        let e = Photio::new("invalid-key".into())
            .submit(&api, &job)
            .await
            .expect_err("bad key");
        assert!(
            matches!(&e, ProviderError::Credential(m) if m.contains("401")),
            "{e:?}"
        );
        let _ = sim.shutdown().await;
    }
}
