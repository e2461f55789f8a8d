//! AIThriving image-to-image (`aithriving.txt`):
//! `POST /aithriving/api/generate/basic/imageToImage`, multipart, synchronous.
//!
//! Failures of the request itself come back as HTTP 200 with `{"code":-1,"message":...}`
//! (the document's "failure callback"); only auth (401), limits (429), an oversized body
//! (413) and injected faults use other HTTP statuses.

use std::sync::Arc;

use axum::extract::Request;
use axum::http::{Method, StatusCode};
use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

use super::form::{self, parse, Form, FormError};
use super::images::{self, Fit, Format};
use super::{header_str, key_ok, Ctx, Reply, Route, Shared};

const PATH: &str = "/api/generate/basic/imageToImage";

const CLIP_GUIDANCE_PRESETS: [&str; 7] = [
    "FAST_BLUE",
    "FAST_GREEN",
    "NONE",
    "SIMPLE",
    "SLOW",
    "SLOWER",
    "SLOWEST",
];
const SAMPLERS: [&str; 10] = [
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
const STYLE_PRESETS: [&str; 17] = [
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
/// Seeds are 32-bit, as in the Stability API this wraps.
const MAX_SEED: i64 = 4_294_967_295;

pub(crate) fn route(method: &Method, rest: &str) -> Route {
    match (method.clone(), rest) {
        (Method::POST, PATH) => Route::api("image_to_image").image(),
        _ => Route::api("unknown"),
    }
}

fn failure(message: &str) -> Reply {
    Reply::json(StatusCode::OK, &json!({"code": -1, "message": message}))
}

fn with_status(status: StatusCode, message: &str) -> Reply {
    Reply::json(status, &json!({"code": -1, "message": message}))
}

pub(crate) fn too_many() -> Reply {
    with_status(StatusCode::TOO_MANY_REQUESTS, "Too Many Requests")
}

pub(crate) fn server_error(status: StatusCode) -> Reply {
    with_status(
        status,
        status.canonical_reason().unwrap_or("Internal Server Error"),
    )
}

pub(crate) fn authorize(req: &Request) -> Result<(), Reply> {
    match header_str(req.headers(), "authorization") {
        Some(k) if k.starts_with("Bearer ") => Err(with_status(
            StatusCode::UNAUTHORIZED,
            "Unauthorized: send the API key itself in Authorization, without Bearer",
        )),
        Some(k) if key_ok(k) => Ok(()),
        _ => Err(with_status(
            StatusCode::UNAUTHORIZED,
            "Unauthorized: invalid or missing API key",
        )),
    }
}

pub(crate) async fn handle(s: &Arc<Shared>, ctx: &Ctx, req: Request) -> Reply {
    if ctx.route.endpoint != "image_to_image" {
        let status = if req.uri().path().strip_prefix("/aithriving") == Some(PATH) {
            StatusCode::METHOD_NOT_ALLOWED
        } else {
            StatusCode::NOT_FOUND
        };
        return with_status(status, status.canonical_reason().unwrap_or("Not Found"));
    }
    match image_to_image(s, ctx, req).await {
        Ok(r) | Err(r) => r,
    }
}

#[derive(Debug)]
struct Params {
    prompt: String,
    width: u32,
    height: u32,
    image_strength: f64,
    seed: Option<u64>,
    style_preset: Option<String>,
}

fn parse_params(form: &Form) -> Result<Params, Reply> {
    let text = |name: &str| form.text(name).map_err(|m| failure(&m));
    let prompt = match text("prompt")? {
        Some(p) if !p.trim().is_empty() => p.to_string(),
        _ => return Err(failure("prompt is required")),
    };
    let size = |name: &str| -> Result<u32, Reply> {
        let msg = format!(
            "{name} is required and must be an integer between 320 and 1536 in steps of 64"
        );
        let v = text(name)?.ok_or_else(|| failure(&msg))?;
        match parse::int_in(v, 320, 1536) {
            Some(n) if n % 64 == 0 => Ok(n as u32),
            _ => Err(failure(&msg)),
        }
    };
    let width = size("width")?;
    let height = size("height")?;
    let image_strength = match text("image_strength")? {
        None => 0.35,
        Some(v) => parse::dec_in(v, 0.0, 1.0)
            .ok_or_else(|| failure("image_strength must be a number in [0, 1]"))?,
    };
    if let Some(v) = text("cfg_scale")? {
        parse::int_in(v, 0, 35)
            .ok_or_else(|| failure("cfg_scale must be an integer in [0, 35]"))?;
    }
    if let Some(v) = text("steps")? {
        parse::int_in(v, 10, 50).ok_or_else(|| failure("steps must be an integer in [10, 50]"))?;
    }
    let seed = match text("seed")? {
        None => None,
        Some(v) => {
            let n = parse::int_in(v, 0, MAX_SEED)
                .ok_or_else(|| failure("seed must be an integer in [0, 4294967295]"))?;
            (n > 0).then_some(n as u64)
        }
    };
    let one_of = |name: &str, allowed: &[&str]| -> Result<Option<String>, Reply> {
        match text(name)? {
            None => Ok(None),
            Some(v) if allowed.contains(&v) => Ok(Some(v.to_string())),
            Some(_) => Err(failure(&format!(
                "{name} must be one of: {}",
                allowed.join(", ")
            ))),
        }
    };
    one_of("clip_guidance_preset", &CLIP_GUIDANCE_PRESETS)?;
    one_of("sampler", &SAMPLERS)?;
    let style_preset = one_of("style_preset", &STYLE_PRESETS)?;
    Ok(Params {
        prompt,
        width,
        height,
        image_strength,
        seed,
        style_preset,
    })
}

/// Seed 0 or none: one derived from the input and the prompt, never 0.
fn derived_seed(image: &[u8], prompt: &str) -> u64 {
    let d = Sha256::new()
        .chain_update(image)
        .chain_update(prompt.as_bytes())
        .finalize();
    let n = u32::from_le_bytes([d[0], d[1], d[2], d[3]]);
    u64::from(n % 4_294_967_294) + 1
}

/// The tint colour: a hash of the prompt, the seed and the style.
fn tint_colour(p: &Params, seed: u64) -> [u8; 3] {
    let d = Sha256::new()
        .chain_update(p.prompt.as_bytes())
        .chain_update(seed.to_le_bytes())
        .chain_update(p.style_preset.as_deref().unwrap_or("").as_bytes())
        .finalize();
    [d[0], d[1], d[2]]
}

async fn image_to_image(s: &Arc<Shared>, ctx: &Ctx, req: Request) -> Result<Reply, Reply> {
    let form = form::read_multipart(req, &["init_image"])
        .await
        .map_err(|e| match e {
            FormError::TooLarge => {
                with_status(StatusCode::PAYLOAD_TOO_LARGE, "Request Entity Too Large")
            }
            other => failure(&other.message()),
        })?;
    let params = parse_params(&form)?;
    let image = form
        .file("init_image")
        .filter(|f| !f.bytes.is_empty())
        .ok_or_else(|| failure("init_image is required"))?;
    let probe = images::probe(&image.bytes)
        .map_err(|_| failure("init_image could not be decoded (PNG or JPEG expected)"))?;
    let max = s.config.max_pixels;
    if probe.pixels() > max {
        return Err(failure(&format!(
            "init_image of {}x{} exceeds the simulator limit of {max} pixels",
            probe.width, probe.height
        )));
    }
    if params.prompt.contains("sim-nsfw") {
        ctx.sync_processing(s).await;
        return Err(failure(
            "NSFW content detected in the generated image; try a different prompt",
        ));
    }
    let seed = params
        .seed
        .unwrap_or_else(|| derived_seed(&image.bytes, &params.prompt));
    let colour = tint_colour(&params, seed);
    let amount = 0.15 + 0.5 * (1.0 - params.image_strength);
    let (w, h) = (params.width, params.height);
    let bytes = image.bytes.clone();
    let png = s
        .cpu(move || {
            let img = images::decode(&bytes, max)?;
            let mut px = images::fit(&img, w, h, Fit::Stretch);
            images::tint(&mut px, colour, amount);
            images::encode(&px, Format::Png)
        })
        .await
        .map_err(|_| failure("init_image could not be decoded (PNG or JPEG expected)"))?;
    let sha = images::sha256_hex(&png);
    let body: Value = json!({
        "code": 0,
        "message": "success",
        "data": {"image": STANDARD.encode(&png), "seed": seed},
    });
    ctx.sync_processing(s).await;
    Ok(Reply::json(StatusCode::OK, &body).charged().sha(sha))
}

#[cfg(test)]
mod tests {
    use super::super::testutil::*;
    use super::*;
    use reqwest::multipart::{Form as MpForm, Part};

    fn url(base: &str) -> String {
        format!("{base}/aithriving{PATH}")
    }

    fn mp(image: &[u8], fields: &[(&str, &str)]) -> MpForm {
        let mut f = MpForm::new().part(
            "init_image",
            Part::bytes(image.to_vec()).file_name("init_image.png"),
        );
        for (k, v) in fields {
            f = f.text(k.to_string(), v.to_string());
        }
        f
    }

    async fn post(base: &str, auth: Option<&str>, form: MpForm) -> (u16, Value) {
        let mut r = client()
            .post(url(base))
            .header("X-Request-Id", "a~1")
            .multipart(form);
        if let Some(k) = auth {
            r = r.header("Authorization", k);
        }
        let r = r.send().await.unwrap();
        let st = r.status().as_u16();
        (st, r.json().await.unwrap())
    }

    #[tokio::test]
    async fn success_exact_size_deterministic() {
        let (_h, base) = start(config()).await;
        let img = images::sample_png(100, 60, 3);
        let fields = [
            ("prompt", "black hair"),
            ("width", "512"),
            ("height", "384"),
            ("steps", "20"),
        ];
        let (st, v) = post(&base, Some("key"), mp(&img, &fields)).await;
        assert_eq!(st, 200);
        assert_eq!(v["code"], 0);
        assert_eq!(v["message"], "success");
        let seed = v["data"]["seed"].as_u64().unwrap();
        assert!(seed > 0);
        let out = STANDARD
            .decode(v["data"]["image"].as_str().unwrap())
            .unwrap();
        let p = images::probe(&out).unwrap();
        assert_eq!((p.format, p.width, p.height), (Format::Png, 512, 384));
        // Same request again: same seed, same bytes.
        let (_, v2) = post(&base, Some("key"), mp(&img, &fields)).await;
        assert_eq!(v2, v);
        // Explicit seed is echoed; another prompt tints differently.
        let (_, v3) = post(
            &base,
            Some("key"),
            mp(
                &img,
                &[
                    ("prompt", "red hair"),
                    ("width", "512"),
                    ("height", "384"),
                    ("seed", "42"),
                ],
            ),
        )
        .await;
        assert_eq!(v3["data"]["seed"], 42);
        assert_ne!(v3["data"]["image"], v["data"]["image"]);
        let l = ledger(&base).await;
        assert!(l
            .iter()
            .all(|e| e.charged && e.endpoint == "image_to_image"));
        assert_eq!(
            l[0].output_sha256.as_deref(),
            Some(images::sha256_hex(&out).as_str())
        );
        assert_eq!(l[0].request_key.as_deref(), Some("a~1"));
    }

    #[tokio::test]
    async fn auth_failures() {
        let (_h, base) = start(config()).await;
        let img = images::sample_png(10, 10, 3);
        for auth in [None, Some(""), Some("invalid-key"), Some("Bearer key")] {
            let (st, v) = post(
                &base,
                auth,
                mp(
                    &img,
                    &[("prompt", "x"), ("width", "512"), ("height", "512")],
                ),
            )
            .await;
            assert_eq!(st, 401, "{auth:?}");
            assert_eq!(v["code"], -1);
        }
        assert!(ledger(&base).await.iter().all(|e| !e.charged));
    }

    #[tokio::test]
    async fn validation_failures_are_http_200_code_minus_one() {
        let (_h, base) = start(config()).await;
        let img = images::sample_png(10, 10, 3);
        let ok = [("prompt", "x"), ("width", "512"), ("height", "512")];
        let with = |k: &'static str, v: &'static str| {
            let mut f: Vec<(&str, &str)> = ok.iter().copied().filter(|(n, _)| *n != k).collect();
            f.push((k, v));
            f
        };
        let cases: Vec<(Vec<(&str, &str)>, &str)> = vec![
            (with("width", "300"), "width"),
            (with("height", "1600"), "height"),
            (with("width", "500"), "width"),
            (with("prompt", "  "), "prompt"),
            (
                ok.iter().copied().filter(|(n, _)| *n != "height").collect(),
                "height",
            ),
            (with("image_strength", "1.2"), "image_strength"),
            (with("cfg_scale", "36"), "cfg_scale"),
            (with("steps", "60"), "steps"),
            (with("seed", "-1"), "seed"),
            (with("sampler", "EULER"), "sampler"),
            (
                with("clip_guidance_preset", "fast_blue"),
                "clip_guidance_preset",
            ),
            (with("style_preset", "watercolour"), "style_preset"),
            (with("prompt", "sim-nsfw"), "NSFW"),
        ];
        for (fields, msg) in cases {
            let (st, v) = post(&base, Some("key"), mp(&img, &fields)).await;
            assert_eq!(st, 200, "{msg}");
            assert_eq!(v["code"], -1, "{msg}: {v}");
            assert!(v["message"].as_str().unwrap().contains(msg), "{msg}: {v}");
        }
        let (st, v) = post(&base, Some("key"), mp(b"nope", &ok)).await;
        assert_eq!((st, v["code"].clone()), (200, json!(-1)));
        let (st, v) = post(&base, Some("key"), MpForm::new().text("prompt", "x")).await;
        assert_eq!((st, v["code"].clone()), (200, json!(-1)));
        // Not multipart at all.
        let r = client()
            .post(url(&base))
            .header("Authorization", "key")
            .header("Content-Type", "multipart/form-data; boundary=Q")
            .body(&b"\xff\xfe garbage"[..])
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        assert_eq!(r.json::<Value>().await.unwrap()["code"], -1);
        assert!(ledger(&base).await.iter().all(|e| !e.charged));
    }

    #[tokio::test]
    async fn violations_have_no_retry_after() {
        let mut cfg = config();
        cfg.limits
            .insert("aithriving".into(), vec!["1/1s".parse().unwrap()]);
        let (_h, base) = start(cfg).await;
        let img = images::sample_png(10, 10, 3);
        let ok = [("prompt", "x"), ("width", "320"), ("height", "320")];
        let (st, _) = post(&base, Some("key"), mp(&img, &ok)).await;
        assert_eq!(st, 200);
        let (st, v) = post(&base, Some("key"), mp(&img, &ok)).await;
        assert_eq!(st, 429);
        assert_eq!(v["code"], -1);
        let l = ledger(&base).await;
        assert!(l[1].violation && l[1].retry_after_s.is_none() && !l[1].charged);
    }
}
