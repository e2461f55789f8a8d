//! Photio Upscale API (`photio.txt`): `POST /photio/v1/inference/upscale`, synchronous,
//! JSON in, `{"status_code": N, "body": "<base64 PNG or message>"}` out, with the HTTP
//! status equal to `status_code`.

use std::sync::Arc;

use axum::extract::Request;
use axum::http::{Method, StatusCode};
use base64::engine::general_purpose::{STANDARD, STANDARD_NO_PAD, URL_SAFE, URL_SAFE_NO_PAD};
use base64::Engine;
use serde_json::{json, Value};

use super::form;
use super::images::{self, Fit, Format};
use super::{header_str, key_ok, Ctx, Reply, Route, Shared};

const MAX_OUTPUT_SIDE: u64 = 4096;
const QUALITIES: [&str; 3] = ["LOW", "MIDDLE", "HIGH"];

pub(crate) fn route(method: &Method, rest: &str) -> Route {
    match (method.clone(), rest) {
        (Method::POST, "/v1/inference/upscale") => Route::api("upscale").image(),
        _ => Route::api("unknown"),
    }
}

fn answer(status: StatusCode, body: &str) -> Reply {
    Reply::json(
        status,
        &json!({"status_code": status.as_u16(), "body": body}),
    )
}

fn bad(message: &str) -> Reply {
    answer(StatusCode::BAD_REQUEST, message)
}

pub(crate) fn too_many() -> Reply {
    answer(StatusCode::TOO_MANY_REQUESTS, "Too Many Requests")
}

pub(crate) fn server_error(status: StatusCode) -> Reply {
    answer(
        status,
        status.canonical_reason().unwrap_or("Internal Server Error"),
    )
}

pub(crate) fn authorize(req: &Request) -> Result<(), Reply> {
    match header_str(req.headers(), "x-photio-key") {
        Some(k) if key_ok(k) => Ok(()),
        _ => Err(answer(
            StatusCode::UNAUTHORIZED,
            "Unauthorized: invalid or missing X-Photio-Key",
        )),
    }
}

pub(crate) async fn handle(s: &Arc<Shared>, ctx: &Ctx, req: Request) -> Reply {
    if ctx.route.endpoint != "upscale" {
        let status = if req.uri().path() == "/photio/v1/inference/upscale" {
            StatusCode::METHOD_NOT_ALLOWED
        } else {
            StatusCode::NOT_FOUND
        };
        return answer(status, status.canonical_reason().unwrap_or("Not Found"));
    }
    match upscale(s, ctx, req).await {
        Ok(r) | Err(r) => r,
    }
}

/// The parsed request.
struct Upscale {
    image: String,
    factor: u32,
}

fn parse_request(v: &Value) -> Result<Upscale, Reply> {
    let Some(obj) = v.as_object() else {
        return Err(bad("request body must be a JSON object"));
    };
    let image = match obj.get("image") {
        Some(Value::String(s)) if !s.trim().is_empty() => s.clone(),
        Some(Value::String(_)) | None | Some(Value::Null) => return Err(bad("image is required")),
        Some(_) => return Err(bad("image must be a string (base64 or URL)")),
    };
    let factor = match obj.get("upscale_by") {
        None | Some(Value::Null) => 2,
        Some(v) => match v.as_u64() {
            Some(2) => 2,
            Some(4) => 4,
            _ => return Err(bad("upscale_by must be 2 or 4")),
        },
    };
    for name in ["prompt", "negative_prompt"] {
        match obj.get(name) {
            None | Some(Value::Null) | Some(Value::String(_)) => {}
            Some(_) => return Err(bad(&format!("{name} must be a string"))),
        }
    }
    match obj.get("quality") {
        None | Some(Value::Null) => {}
        Some(Value::String(q)) if QUALITIES.contains(&q.as_str()) => {}
        Some(_) => return Err(bad("quality must be one of LOW, MIDDLE, HIGH")),
    }
    match obj.get("denoising_strength") {
        None | Some(Value::Null) => {}
        Some(v) => match v.as_f64() {
            Some(d) if (0.0..=1.0).contains(&d) => {}
            _ => return Err(bad("denoising_strength must be a number from 0.0 to 1.0")),
        },
    }
    Ok(Upscale { image, factor })
}

/// Base64 in any of the common alphabets, with or without padding and line breaks.
fn decode_base64(s: &str) -> Option<Vec<u8>> {
    let clean: String = s.chars().filter(|c| !c.is_ascii_whitespace()).collect();
    [STANDARD, STANDARD_NO_PAD, URL_SAFE, URL_SAFE_NO_PAD]
        .iter()
        .find_map(|e| e.decode(clean.as_bytes()).ok())
}

/// The input image: a `data:` URI, a loopback http(s) URL, or bare base64.
async fn load_image(s: &Shared, image: &str) -> Result<Vec<u8>, Reply> {
    let trimmed = image.trim();
    let lower = trimmed.get(..8).unwrap_or(trimmed).to_ascii_lowercase();
    if lower.starts_with("http://") || lower.starts_with("https://") {
        return fetch(s, trimmed).await;
    }
    let payload = if lower.starts_with("data:") {
        match trimmed.split_once(',') {
            Some((meta, data)) if meta.to_ascii_lowercase().ends_with(";base64") => data,
            _ => return Err(bad("image data URI must be base64 encoded")),
        }
    } else {
        trimmed
    };
    decode_base64(payload).ok_or_else(|| bad("image is neither a valid URL nor valid base64"))
}

async fn fetch(s: &Shared, raw: &str) -> Result<Vec<u8>, Reply> {
    let url = url::Url::parse(raw).map_err(|_| bad("image URL is not a valid URL"))?;
    let loopback = match url.host() {
        Some(url::Host::Domain(d)) => d.eq_ignore_ascii_case("localhost"),
        Some(url::Host::Ipv4(ip)) => ip.is_loopback(),
        Some(url::Host::Ipv6(ip)) => ip.is_loopback(),
        None => false,
    };
    if !loopback {
        return Err(bad(
            "image URL must point at a loopback address (the simulator fetches nothing else)",
        ));
    }
    let resp = s
        .http
        .get(url)
        .send()
        .await
        .map_err(|e| bad(&format!("could not fetch the image URL: {e}")))?;
    if !resp.status().is_success() {
        return Err(bad(&format!(
            "could not fetch the image URL: HTTP {}",
            resp.status().as_u16()
        )));
    }
    let limit = s.config.max_body_bytes;
    if resp.content_length().is_some_and(|n| n > limit as u64) {
        return Err(bad("the image at the URL is too large"));
    }
    let mut resp = resp;
    let mut buf = Vec::new();
    loop {
        match resp.chunk().await {
            Ok(Some(c)) => {
                if buf.len() + c.len() > limit {
                    return Err(bad("the image at the URL is too large"));
                }
                buf.extend_from_slice(&c);
            }
            Ok(None) => return Ok(buf),
            Err(e) => return Err(bad(&format!("could not fetch the image URL: {e}"))),
        }
    }
}

async fn upscale(s: &Arc<Shared>, ctx: &Ctx, req: Request) -> Result<Reply, Reply> {
    let body = form::read_body(req, s.config.max_body_bytes)
        .await
        .map_err(|e| answer(e.status(), &e.message()))?;
    let v: Value =
        serde_json::from_slice(&body).map_err(|e| bad(&format!("invalid JSON body: {e}")))?;
    let up = parse_request(&v)?;
    let bytes = load_image(s, &up.image).await?;
    let probe =
        images::probe(&bytes).map_err(|e| bad(&format!("image could not be decoded: {e}")))?;
    if probe.width == 0 || probe.height == 0 {
        return Err(bad("image has a zero dimension"));
    }
    let (ow, oh) = (
        u64::from(probe.width) * u64::from(up.factor),
        u64::from(probe.height) * u64::from(up.factor),
    );
    if ow.max(oh) > MAX_OUTPUT_SIDE {
        return Err(bad("maximum output pixel size is limited by 4K"));
    }
    let max = s.config.max_pixels;
    let (ow, oh) = (ow as u32, oh as u32);
    let png = s
        .cpu(move || {
            let img = images::decode(&bytes, max)?;
            images::encode(&images::fit(&img, ow, oh, Fit::Stretch), Format::Png)
        })
        .await
        .map_err(|e| bad(&format!("image could not be decoded: {e}")))?;
    let sha = images::sha256_hex(&png);
    let body = STANDARD.encode(&png);
    ctx.sync_processing(s).await;
    Ok(
        Reply::json(StatusCode::OK, &json!({"status_code": 200, "body": body}))
            .charged()
            .sha(sha),
    )
}

#[cfg(test)]
mod tests {
    use super::super::testutil::*;
    use super::super::{images, SimConfig};
    use super::*;
    use std::time::Duration;

    fn url(base: &str) -> String {
        format!("{base}/photio/v1/inference/upscale")
    }

    async fn post(base: &str, key: Option<&str>, body: Value) -> (u16, Value) {
        let mut r = client()
            .post(url(base))
            .header("X-Request-Id", "p~1")
            .json(&body);
        if let Some(k) = key {
            r = r.header("X-Photio-Key", k);
        }
        let r = r.send().await.unwrap();
        let st = r.status().as_u16();
        (st, r.json().await.unwrap())
    }

    #[tokio::test]
    async fn upscale_success_is_deterministic_and_charged() {
        let (_h, base) = start(config()).await;
        let img = images::sample_png(64, 48, 1);
        let b64 = STANDARD.encode(&img);
        let (st, v) = post(
            &base,
            Some("k"),
            json!({"image": b64, "upscale_by": 2, "quality": "HIGH"}),
        )
        .await;
        assert_eq!(st, 200);
        assert_eq!(v["status_code"], 200);
        let out = STANDARD.decode(v["body"].as_str().unwrap()).unwrap();
        let p = images::probe(&out).unwrap();
        assert_eq!((p.format, p.width, p.height), (Format::Png, 128, 96));
        // A data URI, default factor 2: same bytes.
        let (_, v2) = post(
            &base,
            Some("k"),
            json!({"image": format!("data:image/png;base64,{b64}")}),
        )
        .await;
        assert_eq!(v2["body"], v["body"]);
        let (_, v4) = post(&base, Some("k"), json!({"image": b64, "upscale_by": 4})).await;
        let p4 = images::probe(&STANDARD.decode(v4["body"].as_str().unwrap()).unwrap()).unwrap();
        assert_eq!((p4.width, p4.height), (256, 192));
        let l = ledger(&base).await;
        assert_eq!(l.len(), 3);
        assert!(l
            .iter()
            .all(|e| e.charged && e.endpoint == "upscale" && e.metered));
        assert_eq!(
            l[0].output_sha256.as_deref(),
            Some(images::sha256_hex(&out).as_str())
        );
        assert_eq!(l[0].request_key.as_deref(), Some("p~1"));
    }

    #[tokio::test]
    async fn auth_and_validation() {
        let (_h, base) = start(config()).await;
        let b64 = STANDARD.encode(images::sample_png(16, 16, 1));
        for key in [None, Some(""), Some("invalid-x")] {
            let (st, v) = post(&base, key, json!({"image": b64})).await;
            assert_eq!(st, 401);
            assert_eq!(v["status_code"], 401);
        }
        let cases = [
            (json!({"image": b64, "upscale_by": 3}), "upscale_by"),
            (json!({"image": b64, "upscale_by": 2.5}), "upscale_by"),
            (json!({"image": b64, "upscale_by": "2"}), "upscale_by"),
            (json!({"image": b64, "quality": "ULTRA"}), "quality"),
            (
                json!({"image": b64, "denoising_strength": 1.5}),
                "denoising_strength",
            ),
            (json!({"image": b64, "prompt": 5}), "prompt"),
            (json!({"upscale_by": 2}), "image is required"),
            (json!({"image": "!!!not base64!!!"}), "base64"),
            (json!({"image": STANDARD.encode(b"hello")}), "decoded"),
            (json!({"image": "https://example.com/a.png"}), "loopback"),
            (json!([1, 2]), "JSON object"),
            (
                json!({"image": STANDARD.encode(images::sample_png(1100, 10, 1)), "upscale_by": 4}),
                "limited by 4K",
            ),
        ];
        for (body, msg) in cases {
            let (st, v) = post(&base, Some("k"), body.clone()).await;
            assert_eq!(st, 400, "{body}");
            assert_eq!(v["status_code"], 400);
            assert!(v["body"].as_str().unwrap().contains(msg), "{msg}: {v}");
        }
        let r = client()
            .post(url(&base))
            .header("X-Photio-Key", "k")
            .body(vec![0xff, 0xfe, 0x00])
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 400);
        assert!(ledger(&base).await.iter().all(|e| !e.charged));
    }

    #[tokio::test]
    async fn fetches_loopback_urls() {
        let img = images::sample_jpeg(20, 10, 9);
        let served = img.clone();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let app = axum::Router::new().route(
            "/img.jpg",
            axum::routing::get(move || {
                let b = served.clone();
                async move { b }
            }),
        );
        tokio::spawn(async move { axum::serve(listener, app).await });
        let (_h, base) = start(config()).await;
        let (st, v) = post(
            &base,
            Some("k"),
            json!({"image": format!("http://{addr}/img.jpg")}),
        )
        .await;
        assert_eq!(st, 200, "{v}");
        let p = images::probe(&STANDARD.decode(v["body"].as_str().unwrap()).unwrap()).unwrap();
        assert_eq!((p.width, p.height), (40, 20));
        let (st, _) = post(
            &base,
            Some("k"),
            json!({"image": format!("http://{addr}/missing.jpg")}),
        )
        .await;
        assert_eq!(st, 400);
    }

    #[tokio::test]
    async fn violations_have_no_retry_after() {
        let mut cfg = SimConfig {
            task_duration: Duration::ZERO,
            ..config()
        };
        cfg.limits
            .insert("photio".into(), vec!["1/1s".parse().unwrap()]);
        let (_h, base) = start(cfg).await;
        let b64 = STANDARD.encode(images::sample_png(8, 8, 1));
        let (st, _) = post(&base, Some("k"), json!({"image": b64})).await;
        assert_eq!(st, 200);
        let r = client()
            .post(url(&base))
            .header("X-Photio-Key", "k")
            .json(&json!({"image": b64}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 429);
        assert!(r.headers().get("retry-after").is_none());
        assert_eq!(r.json::<Value>().await.unwrap()["status_code"], 429);
        let l = ledger(&base).await;
        assert!(l[1].violation && !l[1].charged && l[1].retry_after_s.is_none());
    }

    #[tokio::test]
    async fn reset_after_charge() {
        let mut cfg = config();
        cfg.chaos.rate_reset = 1.0;
        let (_h, base) = start(cfg).await;
        let b64 = STANDARD.encode(images::sample_png(8, 8, 1));
        let res = client()
            .post(url(&base))
            .header("X-Photio-Key", "k")
            .json(&json!({"image": b64}))
            .send()
            .await;
        if let Ok(r) = res {
            assert!(r.bytes().await.is_err());
        }
        let l = ledger(&base).await;
        assert!(
            l[0].charged && l[0].fault.as_deref() == Some("reset") && l[0].output_sha256.is_some()
        );
    }
}
