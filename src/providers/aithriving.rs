//! AIThriving basic image-to-image (`POST https://www.aithriving.com/api/generate/basic/imageToImage`).
//!
//! Synchronous: one multipart request with the file field `init_image`; the answer is
//! `{"code": 0, "message": "success", "data": {"image": "<base64>", "seed": …}}`, or
//! `code -1` with the reason in `message`. The document's table names the header
//! `Authentication`, but its own example (and every client seen) sends
//! `Authorization: <key>` with no `Bearer`: that is what is sent (NOTES.md).
//!
//! No task id, no reconciliation, no cancel.

use async_trait::async_trait;
use reqwest::multipart::{Form, Part};
use serde_json::Value;

use super::util::{self, Params};
use super::{Api, JobContext, OutputData, Provider, ProviderError, RequestKind, SubmitOutcome};
use crate::api::{excerpt, MAX_JSON_ANSWER};
use crate::model::{JobSpec, ProviderKind};

/// Output sides: 320 to 1536 in steps of 64.
pub const MIN_SIDE: i64 = 320;
pub const MAX_SIDE: i64 = 1536;
pub const SIDE_STEP: i64 = 64;
/// The document gives no input size limit; this only keeps a stray huge file out of
/// memory (the result is at most 1536x1536).
pub const MAX_INPUT_BYTES: u64 = 50_000_000;
/// "The service uses 0.4-2 credits per successful result": the upper bound, for
/// cost previews and `--max-credits` (an img2img job has one result).
pub const MAX_CREDITS_PER_RESULT: f64 = 2.0;

const KNOWN_PARAMS: &[&str] = &[
    "prompt",
    "width",
    "height",
    "image_strength",
    "cfg_scale",
    "clip_guidance_preset",
    "sampler",
    "seed",
    "steps",
    "style_preset",
];
const CLIP_GUIDANCE_PRESETS: &[&str] = &[
    "FAST_BLUE",
    "FAST_GREEN",
    "NONE",
    "SIMPLE",
    "SLOW",
    "SLOWER",
    "SLOWEST",
];
const SAMPLERS: &[&str] = &[
    "DDIM",
    "DDPM",
    "K_DPMPP_2M",
    "K_DPMPP_2S_ANCESTRAL",
    "K_DPM_2",
    "K_DPM_2_ANCESTRAL",
    "K_EULER",
    "K_EULER_ANCESTRAL",
    "K_HEUN",
    "K_LMS",
];
const STYLE_PRESETS: &[&str] = &[
    "3d-model",
    "analog-film",
    "anime",
    "cinematic",
    "comic-book",
    "digital-art",
    "enhance",
    "fantasy-art",
    "isometric",
    "line-art",
    "low-poly",
    "modeling-compound",
    "neon-punk",
    "origami",
    "photographic",
    "pixel-art",
    "tile-texture",
];

/// Whether an operation name means image-to-image.
fn is_img2img(op: &str) -> bool {
    matches!(
        util::fold_operation(op).as_str(),
        "img2img" | "image-to-image" | "imagetoimage"
    )
}

/// A checked request: the form fields other than `init_image`, in order.
#[derive(Debug, Clone, PartialEq)]
pub struct Plan {
    pub fields: Vec<(&'static str, String)>,
}

impl Plan {
    pub fn from_spec(spec: &JobSpec) -> Result<Plan, Vec<String>> {
        if !is_img2img(&spec.operation) {
            return Err(vec![format!(
                "unknown aithriving operation {:?} (expected img2img)",
                spec.operation
            )]);
        }
        let map = spec.params();
        let mut p = Params::new(&map);
        p.reject_unknown("aithriving", KNOWN_PARAMS);
        let mut fields = Vec::new();

        if p.has("prompt") && !matches!(p.get("prompt"), Some(Value::String(_))) {
            p.errors.push(format!(
                "prompt must be a string (got {})",
                p.get("prompt").map(util::show_value).unwrap_or_default()
            ));
        }
        match util::prompt_of(spec, &map) {
            Some(prompt) => fields.push(("prompt", prompt)),
            None => p.errors.push(
                "aithriving img2img needs a prompt (the prompt column or params.prompt)".into(),
            ),
        }
        for name in ["width", "height"] {
            match p.get(name) {
                None => p.errors.push(format!(
                    "aithriving img2img needs params.{name} ({MIN_SIDE} to {MAX_SIDE} in steps of {SIDE_STEP})"
                )),
                Some(v) => match util::integer_in_range(name, v, MIN_SIDE, MAX_SIDE) {
                    Ok(n) if n % SIDE_STEP == 0 => fields.push((name, n.to_string())),
                    Ok(n) => {
                        let below = n / SIDE_STEP * SIDE_STEP;
                        p.errors.push(format!(
                            "{name} must be a multiple of {SIDE_STEP} from {MIN_SIDE} to {MAX_SIDE} (got {n}; \
                             nearest allowed: {} or {})",
                            below.max(MIN_SIDE),
                            (below + SIDE_STEP).min(MAX_SIDE)
                        ))
                    }
                    Err(e) => p.errors.push(format!("{e}; it must also be a multiple of {SIDE_STEP}")),
                },
            }
        }
        if let Some(x) = p.number("image_strength", 0.0, 1.0) {
            fields.push(("image_strength", util::fmt_num(x)));
        }
        if let Some(n) = p.integer("cfg_scale", 0, 35) {
            fields.push(("cfg_scale", n.to_string()));
        }
        if let Some(s) = p.choice("clip_guidance_preset", CLIP_GUIDANCE_PRESETS) {
            fields.push(("clip_guidance_preset", s.to_string()));
        }
        if let Some(s) = p.choice("sampler", SAMPLERS) {
            fields.push(("sampler", s.to_string()));
        }
        // "omit this option or use 0 for a random seed"; seeds are 32-bit.
        if let Some(n) = p.integer("seed", 0, i64::from(u32::MAX)) {
            fields.push(("seed", n.to_string()));
        }
        if let Some(n) = p.integer("steps", 10, 50) {
            fields.push(("steps", n.to_string()));
        }
        if let Some(s) = p.choice("style_preset", STYLE_PRESETS) {
            fields.push(("style_preset", s.to_string()));
        }
        if !p.errors.is_empty() {
            return Err(p.errors);
        }
        Ok(Plan { fields })
    }
}

/// Checks an AIThriving job against the document before any request is made.
pub fn validate(spec: &JobSpec) -> Vec<String> {
    let mut errors = Vec::new();
    if let Err(e) = Plan::from_spec(spec) {
        errors.extend(e);
    }
    util::check_single_input(spec, MAX_INPUT_BYTES, &mut errors);
    errors
}

/// Whether a failure message reads like a passing condition of the service rather
/// than a verdict on the request.
///
/// `code -1` carries no machine-readable reason, only `message`. Most failures are
/// about the request (NSFW prompt, unreadable image, bad parameter) and trying again
/// cannot help; but a service that is overloaded or timed out says so in words. The
/// document states failed results are not charged, so retrying such a failure costs
/// nothing but an attempt; treating it as permanent would fail a job that a later try
/// would finish. So: permanent by default, transient when the message names one of
/// these conditions.
pub fn looks_transient(message: &str) -> bool {
    const MARKERS: &[&str] = &[
        "timeout",
        "timed out",
        "time out",
        "busy",
        "try again",
        "retry",
        "internal",
        "overload",
        "unavailable",
        "temporar",
        "too many",
        "rate limit",
        "capacity",
        "queue is full",
        "server error",
        "network",
        "gateway",
    ];
    let lower = message.to_ascii_lowercase();
    MARKERS.iter().any(|m| lower.contains(m))
}

/// Reads an answer: the image on `code 0`; otherwise the failure `message` stands for.
pub fn parse_answer(v: &Value) -> Result<(OutputData, Option<i64>), ProviderError> {
    let kind = RequestKind::Submit;
    let shown = || excerpt(v.to_string().as_bytes());
    let Some(obj) = v.as_object() else {
        return Err(ProviderError::bad_answer(
            kind,
            format!("unexpected answer: {}", shown()),
        ));
    };
    let code = match obj.get("code") {
        Some(Value::Number(n)) => n.as_i64(),
        Some(Value::String(s)) => s.trim().parse::<i64>().ok(),
        _ => None,
    };
    let Some(code) = code else {
        return Err(ProviderError::bad_answer(
            kind,
            format!("answer without a code: {}", shown()),
        ));
    };
    if code == 0 {
        let data = obj.get("data");
        let Some(Value::String(b64)) = data.and_then(|d| d.get("image")) else {
            return Err(ProviderError::bad_answer(
                kind,
                format!("success without data.image: {}", shown()),
            ));
        };
        let (bytes, ext) = util::decode_image(kind, "data.image", b64)?;
        let seed = data.and_then(|d| d.get("seed")).and_then(Value::as_i64);
        return Ok((
            OutputData::Bytes {
                data: bytes,
                ext: ext.to_string(),
            },
            seed,
        ));
    }
    let message = match obj.get("message").or_else(|| obj.get("msg")) {
        Some(Value::String(s)) if !s.trim().is_empty() => excerpt(s.trim().as_bytes()),
        _ => format!("failed with code {code} and no message"),
    };
    let reason = format!("aithriving: {message}");
    Err(match code {
        401 | 403 => ProviderError::credential(format!("{reason} (check AITHRIVING_API_KEY)")),
        _ if looks_transient(&message) => ProviderError::transient(reason),
        _ => ProviderError::permanent(reason),
    })
}

/// Reads a successful answer's body ([`parse_answer`]).
pub fn read_answer(
    status: reqwest::StatusCode,
    body: &[u8],
) -> Result<(OutputData, Option<i64>), ProviderError> {
    let v = util::parse_json(RequestKind::Submit, status, body)?;
    parse_answer(&v)
}

/// An error answer, with a hint for credential problems.
pub fn read_refusal(status: reqwest::StatusCode, body: &[u8]) -> ProviderError {
    let mut e = util::classify_http_error(RequestKind::Submit, status, body);
    if matches!(status.as_u16(), 401 | 403) {
        if let ProviderError::Permanent(reason) = &e {
            e = ProviderError::credential(format!("{reason} (check AITHRIVING_API_KEY)"));
        }
    }
    e
}

/// The AIThriving adapter.
pub struct Aithriving {
    api_key: String,
}

impl std::fmt::Debug for Aithriving {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Aithriving")
            .field("api_key", &"<redacted>")
            .finish()
    }
}

impl Aithriving {
    pub fn new(api_key: String) -> Aithriving {
        Aithriving {
            api_key: api_key.trim().to_string(),
        }
    }
}

#[async_trait]
impl Provider for Aithriving {
    fn kind(&self) -> ProviderKind {
        ProviderKind::Aithriving
    }

    async fn authenticate(&self, _api: &Api) -> Result<(), ProviderError> {
        util::secret_header("AITHRIVING_API_KEY", &self.api_key).map(|_| ())
    }

    /// The API has no free call: an empty request is refused as incomplete (not
    /// charged: "You will not be charged for failed results") once the key passes,
    /// and with 401/403 when it does not.
    async fn check_access(&self, api: &Api) -> Result<String, ProviderError> {
        let key = util::secret_header("AITHRIVING_API_KEY", &self.api_key)?;
        let request = api
            .client()
            .post(api.url("/api/generate/basic/imageToImage"))
            .header(reqwest::header::AUTHORIZATION, key)
            .multipart(Form::new());
        let response = api.send(RequestKind::Query, request).await?;
        let status = response.status();
        if matches!(status.as_u16(), 401 | 403 | 404 | 405) {
            return Err(util::http_error(RequestKind::Query, response).await);
        }
        Ok(format!(
            "key accepted (an empty request was answered HTTP {status}, refused as incomplete, not charged)"
        ))
    }

    async fn submit(
        &self,
        api: &Api,
        job: &JobContext<'_>,
    ) -> Result<SubmitOutcome, ProviderError> {
        let plan = Plan::from_spec(job.spec).map_err(|e| ProviderError::permanent(e.join("; ")))?;
        let source = util::single_input(job.spec)?;
        // A URL is fetched first: the field is a file.
        let input = util::load_input(api, source, MAX_INPUT_BYTES).await?;
        if input.format.is_none() {
            return Err(ProviderError::permanent(format!(
                "input {} is not an image format pixbatch recognises",
                util::redact_url(source)
            )));
        }
        // A fresh form for every call.
        let len = input.bytes.len() as u64;
        let image = Part::stream_with_length(reqwest::Body::from(input.bytes.clone()), len)
            .file_name(format!("init_image.{}", input.ext()))
            .mime_str(input.mime())
            .map_err(|e| ProviderError::permanent(format!("building the request: {e}")))?;
        let mut form = Form::new();
        for (name, value) in &plan.fields {
            form = form.text(*name, value.clone());
        }
        let form = form.part("init_image", image);
        let key = util::secret_header("AITHRIVING_API_KEY", &self.api_key)?;
        let request = api
            .client()
            .post(api.url("/api/generate/basic/imageToImage"))
            .header(reqwest::header::AUTHORIZATION, key)
            .header("X-Request-Id", job.submit_key.as_str())
            .multipart(form);
        let response = api.send(RequestKind::Submit, request).await?;
        let status = response.status();
        if !status.is_success() {
            let body = util::read_prefix(response, 64 * 1024).await;
            return Err(read_refusal(status, &body));
        }
        let body = Api::read_bytes(RequestKind::Submit, response, MAX_JSON_ANSWER).await?;
        let (output, seed) = read_answer(status, &body)?;
        if let Some(seed) = seed {
            tracing::debug!(job = %job.spec.id, seed, "aithriving: generated");
        }
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

    fn spec(operation: &str, prompt: Option<&str>, params: Value) -> JobSpec {
        JobSpec {
            id: "a1".into(),
            provider: ProviderKind::Aithriving,
            operation: operation.into(),
            inputs: vec!["https://example.com/in.png".into()],
            prompt: prompt.map(str::to_string),
            params_json: params.to_string(),
            output: None,
            metadata: Vec::new(),
        }
    }

    fn errors_of(params: Value) -> Vec<String> {
        validate(&spec("img2img", Some("black hair"), params))
    }

    fn has(errors: &[String], needle: &str) -> bool {
        errors.iter().any(|e| e.contains(needle))
    }

    #[test]
    fn a_complete_job_is_valid_under_every_alias() {
        let params = json!({"width": 512, "height": "768", "image_strength": 0.35, "cfg_scale": 7, "steps": 20,
            "sampler": "k_euler", "style_preset": "Neon-Punk", "clip_guidance_preset": "FAST_BLUE", "seed": 0});
        for op in ["img2img", "image-to-image", "imageToImage", "IMG2IMG"] {
            assert_eq!(
                validate(&spec(op, Some("black hair"), params.clone())),
                Vec::<String>::new(),
                "{op}"
            );
        }
        let plan = Plan::from_spec(&spec("img2img", Some("black hair"), params)).expect("plan");
        assert!(plan.fields.contains(&("sampler", "K_EULER".into())));
        assert!(plan.fields.contains(&("style_preset", "neon-punk".into())));
        assert!(plan.fields.contains(&("prompt", "black hair".into())));
        assert!(plan.fields.contains(&("height", "768".into())));
        assert!(has(
            &validate(&spec(
                "txt2img",
                Some("x"),
                json!({"width": 512, "height": 512})
            )),
            "unknown aithriving operation"
        ));
    }

    #[test]
    fn sizes_must_be_multiples_of_64_within_range() {
        let e = errors_of(json!({"width": 300, "height": 512}));
        assert!(
            has(&e, "width must be an integer from 320 to 1536 (got 300)"),
            "{e:?}"
        );
        let e = errors_of(json!({"width": 1000, "height": 512}));
        assert!(has(&e, "width must be a multiple of 64 from 320 to 1536 (got 1000; nearest allowed: 960 or 1024)"), "{e:?}");
        let e = errors_of(json!({"width": 512, "height": 1600}));
        assert!(
            has(&e, "height must be an integer from 320 to 1536 (got 1600)"),
            "{e:?}"
        );
        let e = errors_of(json!({"width": 512}));
        assert!(has(&e, "needs params.height"), "{e:?}");
        assert!(errors_of(json!({"width": 320, "height": 1536})).is_empty());
    }

    #[test]
    fn the_prompt_is_required() {
        let e = validate(&spec("img2img", None, json!({"width": 512, "height": 512})));
        assert!(has(&e, "needs a prompt"), "{e:?}");
        let e = validate(&spec(
            "img2img",
            Some("  "),
            json!({"width": 512, "height": 512}),
        ));
        assert!(has(&e, "needs a prompt"), "{e:?}");
        assert!(validate(&spec(
            "img2img",
            None,
            json!({"width": 512, "height": 512, "prompt": "p"})
        ))
        .is_empty());
    }

    #[test]
    fn other_limits_and_enums() {
        let base = |extra: Value| {
            let mut m = json!({"width": 512, "height": 512});
            if let (Some(o), Some(e)) = (m.as_object_mut(), extra.as_object()) {
                o.extend(e.clone());
            }
            errors_of(m)
        };
        assert!(has(
            &base(json!({"image_strength": 1.5})),
            "image_strength must be a number from 0 to 1"
        ));
        assert!(has(
            &base(json!({"cfg_scale": 36})),
            "cfg_scale must be an integer from 0 to 35 (got 36)"
        ));
        assert!(has(&base(json!({"cfg_scale": 7.5})), "not an integer"));
        assert!(has(
            &base(json!({"steps": 9})),
            "steps must be an integer from 10 to 50 (got 9)"
        ));
        assert!(has(
            &base(json!({"steps": 51})),
            "steps must be an integer from 10 to 50"
        ));
        assert!(has(
            &base(json!({"seed": -1})),
            "seed must be an integer from 0 to 4294967295 (got -1)"
        ));
        assert!(has(
            &base(json!({"sampler": "EULER"})),
            "sampler must be one of"
        ));
        assert!(has(
            &base(json!({"style_preset": "watercolor"})),
            "style_preset must be one of"
        ));
        assert!(has(
            &base(json!({"clip_guidance_preset": "FAST"})),
            "clip_guidance_preset must be one of"
        ));
        assert!(has(
            &base(json!({"strenght": 1})),
            "unknown aithriving parameter \"strenght\""
        ));
    }

    #[test]
    fn answers_are_read_and_failures_classified() {
        let png = {
            let img = image::RgbImage::from_pixel(3, 3, image::Rgb([9, 9, 9]));
            let mut out = std::io::Cursor::new(Vec::new());
            img.write_to(&mut out, image::ImageFormat::Png)
                .expect("encode");
            out.into_inner()
        };
        let ok = json!({"code": 0, "message": "success", "data": {"image": util::encode_base64(&png), "seed": 1050625087}});
        match parse_answer(&ok) {
            Ok((OutputData::Bytes { data, ext }, seed)) => {
                assert_eq!(data.as_ref(), png.as_slice());
                assert_eq!(ext, "png");
                assert_eq!(seed, Some(1050625087));
            }
            other => panic!("{other:?}"),
        }
        let e = parse_answer(&json!({"code": -1, "message": "NSFW content detected"}))
            .expect_err("nsfw");
        assert_eq!(
            e,
            ProviderError::permanent("aithriving: NSFW content detected")
        );
        let e =
            parse_answer(&json!({"code": -1, "message": "Server busy, please try again later"}))
                .expect_err("busy");
        assert!(matches!(e, ProviderError::Transient { .. }), "{e:?}");
        let e = parse_answer(&json!({"code": "-1", "message": "Generation timeout"}))
            .expect_err("timeout");
        assert!(matches!(e, ProviderError::Transient { .. }), "{e:?}");
        let e = parse_answer(&json!({"code": -1})).expect_err("no message");
        assert!(matches!(e, ProviderError::Permanent(_)), "{e:?}");
        for garbage in [
            json!({"code": 0, "data": {}}),
            json!({"code": 0, "data": {"image": "!!!"}}),
            json!({"message": "success"}),
            json!([]),
            json!(null),
        ] {
            assert!(
                matches!(parse_answer(&garbage), Err(ProviderError::Unknown(_))),
                "{garbage}"
            );
        }
    }
}

/// The adapter against a small local server speaking AIThriving's HTTP.
#[cfg(test)]
mod http_tests {
    use std::sync::{Arc, Mutex};

    use axum::extract::{Multipart, State};
    use axum::http::HeaderMap;
    use axum::response::{IntoResponse, Response};
    use axum::routing::{get, post};
    use axum::{Json, Router};
    use serde_json::json;

    use super::*;
    use crate::api::OpenGate;

    #[derive(Debug, Default, Clone)]
    struct Seen {
        authorization: Option<String>,
        request_id: Option<String>,
        fields: Vec<(String, String)>,
        file: Option<(Option<String>, usize)>,
    }

    type Shared = Arc<Mutex<Seen>>;

    fn png(w: u32, h: u32) -> Vec<u8> {
        let img = image::RgbImage::from_pixel(w, h, image::Rgb([9, 9, 9]));
        let mut out = std::io::Cursor::new(Vec::new());
        img.write_to(&mut out, image::ImageFormat::Png)
            .expect("encode png");
        out.into_inner()
    }

    async fn img2img(State(s): State<Shared>, headers: HeaderMap, mut form: Multipart) -> Response {
        let header = |n: &str| {
            headers
                .get(n)
                .and_then(|v| v.to_str().ok())
                .map(str::to_string)
        };
        {
            let mut seen = s.lock().expect("lock");
            seen.authorization = header("authorization");
            seen.request_id = header("x-request-id");
        }
        let mut prompt = String::new();
        while let Ok(Some(field)) = form.next_field().await {
            let name = field.name().unwrap_or("").to_string();
            if name == "init_image" {
                let file_name = field.file_name().map(str::to_string);
                let len = field.bytes().await.map(|b| b.len()).unwrap_or(0);
                s.lock().expect("lock").file = Some((file_name, len));
            } else {
                let value = field.text().await.unwrap_or_default();
                if name == "prompt" {
                    prompt = value.clone();
                }
                s.lock().expect("lock").fields.push((name, value));
            }
        }
        match prompt.as_str() {
            "nsfw" => Json(json!({"code": -1, "message": "Prompt rejected by the safety filter"})).into_response(),
            "busy" => Json(json!({"code": -1, "message": "Server busy, try again later"})).into_response(),
            _ => Json(json!({"code": 0, "message": "success", "data": {"image": util::encode_base64(&png(64, 64)), "seed": 7}}))
                .into_response(),
        }
    }

    async fn input_png() -> Response {
        ([("Content-Type", "image/png")], png(16, 16)).into_response()
    }

    async fn server() -> (Api, Shared, String) {
        let state: Shared = Arc::default();
        let app = Router::new()
            .route("/aithriving/api/generate/basic/imageToImage", post(img2img))
            .route("/files/in.png", get(input_png))
            .with_state(state.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        let api = Api::new(
            &format!("http://{addr}/aithriving"),
            reqwest::Client::new(),
            Arc::new(OpenGate),
        );
        (api, state, format!("http://{addr}/files/in.png"))
    }

    fn job_spec(input: &str, prompt: &str) -> JobSpec {
        JobSpec {
            id: "a1".into(),
            provider: ProviderKind::Aithriving,
            operation: "imageToImage".into(),
            inputs: vec![input.into()],
            prompt: Some(prompt.into()),
            params_json:
                json!({"width": 512, "height": 576, "image_strength": 0.35, "steps": "20"})
                    .to_string(),
            output: None,
            metadata: Vec::new(),
        }
    }

    #[tokio::test]
    async fn a_url_input_is_fetched_and_sent_as_init_image() {
        let (api, seen, input_url) = server().await;
        let spec = job_spec(&input_url, "black hair");
        let job = JobContext {
            spec: &spec,
            submit_key: "a1~1".into(),
            submission: 1,
            prepared: &[],
        };
        match Aithriving::new("ak".into())
            .submit(&api, &job)
            .await
            .expect("submit")
        {
            SubmitOutcome::Finished { outputs, .. } => match outputs.as_slice() {
                [OutputData::Bytes { data, ext }] => {
                    assert_eq!(ext, "png");
                    assert_eq!(util::dimensions_from_bytes(data), Some((64, 64)));
                }
                other => panic!("{other:?}"),
            },
            other => panic!("{other:?}"),
        }
        let seen = seen.lock().expect("lock").clone();
        assert_eq!(seen.authorization.as_deref(), Some("ak"));
        assert_eq!(seen.request_id.as_deref(), Some("a1~1"));
        let (file_name, len) = seen.file.expect("init_image sent");
        assert_eq!(file_name.as_deref(), Some("init_image.png"));
        assert_eq!(len, png(16, 16).len());
        for (k, v) in [
            ("prompt", "black hair"),
            ("width", "512"),
            ("height", "576"),
            ("image_strength", "0.35"),
            ("steps", "20"),
        ] {
            assert!(
                seen.fields.contains(&(k.to_string(), v.to_string())),
                "{k}: {:?}",
                seen.fields
            );
        }
    }

    #[tokio::test]
    async fn failures_are_permanent_unless_they_read_as_passing() {
        let (api, _, input_url) = server().await;
        for (prompt, permanent) in [("nsfw", true), ("busy", false)] {
            let spec = job_spec(&input_url, prompt);
            let job = JobContext {
                spec: &spec,
                submit_key: "a1~1".into(),
                submission: 1,
                prepared: &[],
            };
            let e = Aithriving::new("ak".into())
                .submit(&api, &job)
                .await
                .expect_err(prompt);
            assert_eq!(
                matches!(e, ProviderError::Permanent(_)),
                permanent,
                "{prompt}: {e:?}"
            );
        }
        // An input URL that answers 404 fails the job before anything is paid.
        let spec = job_spec(&input_url.replace("in.png", "missing.png"), "x");
        let job = JobContext {
            spec: &spec,
            submit_key: "a1~1".into(),
            submission: 1,
            prepared: &[],
        };
        let e = Aithriving::new("ak".into())
            .submit(&api, &job)
            .await
            .expect_err("404");
        assert!(
            matches!(&e, ProviderError::Permanent(m) if m.contains("404")),
            "{e:?}"
        );
    }
}

/// The adapter against the built-in simulator (`crate::sim`).
#[cfg(test)]
mod sim_tests {
    use std::time::Duration;

    use serde_json::json;

    use super::*;

    #[tokio::test]
    async fn img2img_against_the_simulator() {
        let (sim, api) = crate::providers::sim_api(
            crate::model::ProviderKind::Aithriving,
            Duration::from_millis(50),
        )
        .await;
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("in.png");
        let img = image::RgbImage::from_pixel(50, 30, image::Rgb([90, 10, 10]));
        img.save(&path).expect("write png");
        let spec = JobSpec {
            id: "a1".into(),
            provider: ProviderKind::Aithriving,
            operation: "img2img".into(),
            inputs: vec![path.to_string_lossy().into_owned()],
            prompt: Some("black hair".into()),
            params_json: json!({"width": 512, "height": 384, "cfg_scale": 7, "steps": 20})
                .to_string(),
            output: None,
            metadata: Vec::new(),
        };
        assert!(validate(&spec).is_empty());
        let job = JobContext {
            spec: &spec,
            submit_key: "a1~1".into(),
            submission: 1,
            prepared: &[],
        };
        match Aithriving::new("sim-key".into())
            .submit(&api, &job)
            .await
            .expect("submit")
        {
            SubmitOutcome::Finished { outputs, .. } => match outputs.as_slice() {
                [OutputData::Bytes { data, .. }] => {
                    assert_eq!(util::dimensions_from_bytes(data), Some((512, 384)));
                }
                other => panic!("{other:?}"),
            },
            other => panic!("{other:?}"),
        }
        let e = Aithriving::new("invalid-key".into())
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
