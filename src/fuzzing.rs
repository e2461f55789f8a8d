//! Entry points shared by the fuzz targets (`fuzz/`, cargo-fuzz) and the property
//! tests: each feeds one input to every reader of a kind (a provider's answers, the
//! manifest formats, image headers) and checks what must hold of the result. A panic
//! here, in a reader or in a check, is a finding.
//!
//! What is checked besides "no panic": an error has a message, and a bounded one (an
//! answer of hundreds of megabytes must not become an error of that size in the
//! database); what a reader accepts is well formed (result links are http(s) URLs,
//! inline results are images of the extension claimed, ids are not empty, a manifest
//! row error names a line of the file).

use std::path::Path;

use reqwest::StatusCode;
use serde_json::Value;

use crate::api::ProviderError;
use crate::model::{valid_job_id, PendingOutput};
use crate::providers::util::{self, ImageFormat};
use crate::providers::{
    aithriving, dzine, perfect, photio, topaz, OutputData, PollOutcome, Reconciliation,
    SubmitOutcome,
};

/// The longest error message any reader may produce.
pub const MAX_ERROR_CHARS: usize = 4096;

fn check_error(e: &ProviderError) {
    let text = e.to_string();
    assert!(!text.trim().is_empty(), "an error without a message: {e:?}");
    assert!(
        text.chars().count() <= MAX_ERROR_CHARS,
        "an error of {} characters",
        text.chars().count()
    );
}

fn check_message(text: &str) {
    assert!(!text.trim().is_empty(), "an empty message");
    assert!(
        text.chars().count() <= MAX_ERROR_CHARS,
        "a message of {} characters",
        text.chars().count()
    );
}

fn check<T>(r: &Result<T, ProviderError>) {
    if let Err(e) = r {
        check_error(e);
    }
}

/// A status from the first two bytes (100..=599), and the rest as the body.
fn split(data: &[u8]) -> (StatusCode, &[u8]) {
    match data {
        [a, b, rest @ ..] => {
            let n = 100 + (u16::from_be_bytes([*a, *b]) % 500);
            (StatusCode::from_u16(n).unwrap_or(StatusCode::OK), rest)
        }
        _ => (StatusCode::OK, data),
    }
}

fn check_ext(ext: &str) {
    assert!(
        !ext.is_empty() && ext.len() <= 5 && ext.bytes().all(|b| b.is_ascii_alphanumeric()),
        "odd extension {ext:?}"
    );
}

fn check_pending(outputs: &[PendingOutput]) {
    assert!(!outputs.is_empty(), "success without outputs");
    for o in outputs {
        match o {
            PendingOutput::Url { url, ext } => {
                assert!(
                    util::is_url(url),
                    "result link {url:?} is not an http(s) URL"
                );
                check_ext(ext);
            }
            PendingOutput::Provider { key, ext } => {
                assert!(!key.trim().is_empty(), "empty result key");
                check_ext(ext);
            }
            PendingOutput::Inline { ext } => check_ext(ext),
        }
    }
}

fn check_poll(r: &Result<PollOutcome, ProviderError>) {
    match r {
        Ok(PollOutcome::Succeeded(outputs)) => check_pending(outputs),
        Ok(PollOutcome::Failed { reason, .. }) | Ok(PollOutcome::Lost { reason, .. }) => {
            check_message(reason)
        }
        Ok(_) => {}
        Err(e) => check_error(e),
    }
}

fn check_inline(data: &[u8], ext: &str) {
    let format = ImageFormat::sniff(data).expect("accepted inline bytes that are no image");
    assert_eq!(format.ext(), ext, "the extension does not match the bytes");
}

fn check_submit(r: &Result<SubmitOutcome, ProviderError>) {
    match r {
        Ok(SubmitOutcome::Accepted { remote_id, .. }) => {
            assert!(!remote_id.trim().is_empty(), "accepted with an empty id")
        }
        Ok(SubmitOutcome::Finished { outputs, .. }) => {
            assert!(!outputs.is_empty(), "finished without outputs");
            for o in outputs {
                match o {
                    OutputData::Bytes { data, ext } => check_inline(data, ext),
                    OutputData::Pending(p) => check_pending(std::slice::from_ref(p)),
                }
            }
        }
        Err(e) => {
            check_error(e);
            // A garbled answer to a paid request is an unknown outcome, never a
            // refusal that would let the job be resubmitted blindly.
        }
    }
}

/// Every Topaz reader: the sync answer (with and without a content type), the
/// accepted answer, status, download link, status list, and the error answers.
pub fn topaz(data: &[u8]) {
    let (status, body) = split(data);
    let bytes = bytes::Bytes::copy_from_slice(body);
    check_submit(&topaz::read_sync_answer(
        Some("image/png"),
        bytes.clone(),
        None,
    ));
    check_submit(&topaz::read_sync_answer(None, bytes, Some("p-1".into())));
    check_submit(&topaz::read_accepted(body, None));
    check_submit(&topaz::read_accepted(body, Some("hdr".into())));
    check_poll(&topaz::read_status(status, body, "p-1", "jpg"));
    let link = topaz::read_download(status, body);
    check(&link);
    if let Ok(url) = link {
        assert!(util::is_url(&url), "download link {url:?}");
    }
    if let Err(e) = topaz::read_status_page(body) {
        check_error(&e);
    }
    match topaz::read_status_list(body, "job~1") {
        Ok(Reconciliation::Found { remote_id }) => assert!(!remote_id.trim().is_empty()),
        Ok(_) => {}
        Err(e) => check_error(&e),
    }
    check_error(&util::classify_http_error(
        crate::api::RequestKind::Poll,
        status,
        body,
    ));
}

/// Photio's answer and error readers.
pub fn photio(data: &[u8]) {
    let (status, body) = split(data);
    match photio::read_answer(status, body) {
        Ok(OutputData::Bytes { data, ext }) => check_inline(&data, &ext),
        Ok(OutputData::Pending(p)) => check_pending(&[p]),
        Err(e) => check_error(&e),
    }
    check_error(&photio::read_refusal(status, body));
}

/// AIThriving's answer and error readers.
pub fn aithriving(data: &[u8]) {
    let (status, body) = split(data);
    match aithriving::read_answer(status, body) {
        Ok((OutputData::Bytes { data, ext }, _)) => check_inline(&data, &ext),
        Ok((OutputData::Pending(p), _)) => check_pending(&[p]),
        Err(e) => check_error(&e),
    }
    check_error(&aithriving::read_refusal(status, body));
}

/// Dzine: the envelope, then every reader of an envelope's data.
pub fn dzine(data: &[u8]) {
    let (status, body) = split(data);
    let payload = match dzine::read_envelope(status, body) {
        Ok(dzine::Envelope::Ok(v)) => Some(v),
        Ok(dzine::Envelope::Refused { code, msg }) => {
            check_message(&msg);
            check_error(&dzine::classify(code, &msg));
            None
        }
        Err(e) => {
            check_message(&e);
            None
        }
    };
    // The data readers see the envelope's data, or the whole body as JSON.
    let Some(v) = payload.or_else(|| serde_json::from_slice::<Value>(body).ok()) else {
        return;
    };
    check_poll(&dzine::parse_progress(&v, "webp").map_err(ProviderError::transient));
    match dzine::parse_faces(&v) {
        Ok((faces, path)) => {
            if let Some(p) = path {
                assert!(util::is_url(&p));
            }
            for f in &faces {
                assert!(f.bbox.iter().all(|x| x.is_finite()));
                // What is stored as a ref reads back the same.
                assert_eq!(dzine::Face::from_json(&f.to_json()).as_ref(), Some(f));
            }
            for index in [None, Some(0), Some(3)] {
                check(&dzine::select_face(&faces, index, "source", "in.png"));
            }
        }
        Err(e) => check_message(&e),
    }
    if let Ok(p) = dzine::parse_upload(&v).inspect_err(check_error) {
        assert!(util::is_url(&p));
    }
    if let Ok(id) = dzine::parse_task_id(&v).inspect_err(check_error) {
        assert!(!id.trim().is_empty());
    }
    if let Ok(b) = dzine::parse_balance(&v).inspect_err(check_error) {
        assert!(b.amount.is_finite());
    }
    if let Ok(page) = dzine::parse_style_page(&v).inspect_err(check_error) {
        assert!(page.styles.len() <= page.listed);
    }
}

/// Perfect: the API host's answers (result, token, errors), then every reader of a
/// `result`.
pub fn perfect(data: &[u8]) {
    let (status, body) = split(data);
    let kind = crate::api::RequestKind::Poll;
    check_error(&perfect::error_answer(
        kind,
        status,
        body,
        "check the credentials",
    ));
    if let Ok(t) = perfect::read_token(status, body).inspect_err(check_error) {
        assert!(!t.trim().is_empty());
    }
    check_error(&perfect::upload_refusal(
        "source",
        "https://s3/x?sig",
        status,
        None,
        body,
    ));
    let result = perfect::read_result(kind, status, body, "check the credentials");
    check(&result);
    let Some(v) = result
        .ok()
        .or_else(|| serde_json::from_slice::<Value>(body).ok())
    else {
        return;
    };
    let keep_alive = std::time::Duration::from_secs(10);
    let polled = perfect::parse_status(&v, "jpg", keep_alive).map_err(ProviderError::transient);
    check_poll(&polled);
    if let Ok(PollOutcome::Running {
        next_poll: Some(wait),
    }) = polled
    {
        assert!(
            wait <= keep_alive / 2,
            "a poll later than the keep-alive allows"
        );
    }
    for count in [1, 2] {
        match perfect::parse_file_slots(&v, count) {
            Ok(slots) => {
                assert_eq!(slots.len(), count);
                for s in slots {
                    assert!(util::is_url(&s.url) && !s.file_id.trim().is_empty());
                }
            }
            Err(e) => check_message(&e),
        }
    }
    if let Ok(id) = perfect::parse_task_id(&v).inspect_err(check_error) {
        assert!(!id.trim().is_empty());
    }
    let (reason, _) = perfect::classify_engine_error(&String::from_utf8_lossy(body));
    assert!(!reason.is_empty());
}

/// The readers of image bytes and base64 text from the outside: format sniffing,
/// header dimensions (PNG, JPEG, WebP, TIFF …), base64 and data URIs.
pub fn images(data: &[u8]) {
    let format = ImageFormat::sniff(data);
    let _ = util::dimensions_from_bytes(data);
    if let Some(f) = format {
        check_ext(f.ext());
        assert!(ImageFormat::from_mime(f.mime()).is_some());
    }
    let text = String::from_utf8_lossy(data);
    let kind = crate::api::RequestKind::Submit;
    if let Ok(bytes) = util::decode_base64(kind, "data.image", &text).inspect_err(check_error) {
        // Whatever was decoded must be what the image check then sees.
        match util::decode_image(kind, "data.image", &text) {
            Ok((img, ext)) => {
                assert_eq!(img.as_ref(), &bytes[..]);
                check_inline(&img, ext);
            }
            Err(e) => {
                check_error(&e);
                assert!(ImageFormat::sniff(&bytes).is_none());
            }
        }
    }
    let _ = crate::api::excerpt(data);
    let _ = crate::api::parse_retry_after(&text, std::time::SystemTime::now());
    let _ = util::redact_url(&text);
}

/// A manifest in every format at once (by the file name's extension; no extension:
/// sniffed), with relative inputs under a folder that does not exist.
pub fn manifest(data: &[u8]) {
    let lines =
        data.split(|b| *b == b'\n').count() as u64 + data.split(|b| *b == b'\r').count() as u64;
    let base = Path::new("/nonexistent-pixbatch-fuzz");
    for name in ["m.csv", "m.json", "m.jsonl", "m"] {
        let name = Path::new(name);
        let mut errors = 0u64;
        let mut oks = 0u64;
        let read = crate::manifest::read_manifest_bytes(name, data, base, &mut |row| match row {
            Ok((origin, spec)) => {
                oks += 1;
                assert!(origin.line >= 1 && origin.line <= lines, "{origin}");
                assert!(valid_job_id(&spec.id), "accepted the id {:?}", spec.id);
                if let Some(o) = &spec.output {
                    assert!(!o.starts_with('/') && !o.split('/').any(|c| c == ".."));
                }
                assert!(
                    serde_json::from_str::<Value>(&spec.params_json).is_ok_and(|v| v.is_object())
                );
            }
            Err(e) => {
                errors += 1;
                assert!(e.origin.line >= 1 && e.origin.line <= lines, "{e}");
                assert_eq!(e.origin.file, name.display().to_string());
                check_message(&e.reason);
            }
        });
        match read {
            Ok(rows) => assert!(oks <= rows && (rows == 0 || oks + errors >= rows)),
            Err(e) => check_message(&e.to_string()),
        }
    }
}

#[cfg(test)]
mod tests {
    //! The same entry points under proptest, in `cargo test`: arbitrary bytes, and
    //! JSON built from the field names and values the readers look for (so the
    //! cases reach past "not JSON"). Case counts are modest to keep CI fast; the
    //! fuzz targets run the long searches.

    use super::*;
    use proptest::prelude::*;
    use serde_json::json;

    /// Field names the five providers' answers use.
    const KEYS: &[&str] = &[
        "status",
        "result",
        "results",
        "data",
        "url",
        "task_id",
        "process_id",
        "download_url",
        "code",
        "msg",
        "message",
        "body",
        "status_code",
        "image",
        "seed",
        "generate_result_slots",
        "face_list",
        "bbox",
        "kps",
        "file_path",
        "files",
        "file_id",
        "requests",
        "method",
        "headers",
        "polling_interval",
        "error",
        "error_code",
        "access_token",
        "list",
        "style_code",
        "total",
        "balance",
        "output_format",
        "filename",
        "creation_time",
        "error_reason",
        "detail",
    ];

    fn png() -> Vec<u8> {
        let img = image::RgbImage::from_pixel(2, 2, image::Rgb([1, 2, 3]));
        let mut out = std::io::Cursor::new(Vec::new());
        img.write_to(&mut out, image::ImageFormat::Png).unwrap();
        out.into_inner()
    }

    fn leaf() -> impl Strategy<Value = Value> {
        prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::Bool),
            any::<i64>().prop_map(|n| json!(n)),
            any::<u64>().prop_map(|n| json!(n)),
            any::<f64>().prop_map(|x| json!(x)),
            (200i64..=599).prop_map(|n| json!(n)),
            "\\PC{0,12}".prop_map(Value::String),
            prop::sample::select(vec![
                "success",
                "Completed",
                "failed",
                "error",
                "running",
                "Cancelled",
                "succeed",
                "https://cdn.example/r/a.png?sig=1",
                "http://127.0.0.1:1/x.webp",
                "ftp://x/y.png",
                "data:image/png;base64,",
                "error_no_face",
                "0",
                "200",
                "sim-at-token",
                "",
            ])
            .prop_map(|s| Value::String(s.to_string())),
            Just(Value::String(util::encode_base64(&png()))),
            Just(Value::String(format!(
                "data:image/png;base64,{}",
                util::encode_base64(&png())
            ))),
            Just(Value::String(util::encode_base64(
                b"GIF89a not an image we take"
            ))),
            Just(Value::String("!!!not base64!!!".into())),
        ]
    }

    fn arb_json() -> impl Strategy<Value = Value> {
        leaf().prop_recursive(5, 96, 8, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
                prop::collection::btree_map(
                    prop_oneof![
                        prop::sample::select(KEYS).prop_map(str::to_string),
                        "\\PC{0,6}"
                    ],
                    inner,
                    0..8
                )
                .prop_map(|m| Value::Object(m.into_iter().collect())),
            ]
        })
    }

    /// A status (two bytes) and a JSON body.
    fn answer() -> impl Strategy<Value = Vec<u8>> {
        (any::<u16>(), arb_json()).prop_map(|(status, v)| {
            let mut data = status.to_be_bytes().to_vec();
            data.extend_from_slice(v.to_string().as_bytes());
            data
        })
    }

    fn every_reader(data: &[u8]) {
        topaz(data);
        photio(data);
        aithriving(data);
        dzine(data);
        perfect(data);
        images(data);
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        #[test]
        fn arbitrary_bytes_never_panic_any_reader(data in prop::collection::vec(any::<u8>(), 0..600)) {
            every_reader(&data);
        }

        #[test]
        fn json_answers_of_every_shape_are_read_or_refused_cleanly(data in answer()) {
            every_reader(&data);
        }

        /// Success statuses with the envelopes the providers use around the value.
        #[test]
        fn enveloped_answers_are_read_or_refused_cleanly(v in arb_json(), code in prop::sample::select(vec![0i64, 200, 401, 429, 500, 108005])) {
            for wrapped in [
                json!({"code": code, "msg": "m", "data": v}),
                json!({"status": 200, "result": v}),
                json!({"status_code": code, "body": v}),
                json!({"code": code, "data": {"image": v}}),
            ] {
                let mut data = vec![0, 100]; // HTTP 200
                data.extend_from_slice(wrapped.to_string().as_bytes());
                every_reader(&data);
            }
        }

        #[test]
        fn base64_and_image_headers_never_panic(text in "(data:image/png;base64,)?[A-Za-z0-9+/=_\\- \n]{0,200}", raw in prop::collection::vec(any::<u8>(), 0..64)) {
            images(text.as_bytes());
            // Real magic bytes followed by garbage: a header reader must not trust it.
            for magic in [&b"\x89PNG\r\n\x1a\n"[..], b"\xff\xd8\xff", b"RIFF\0\0\0\0WEBPVP8 ", b"II*\0", b"MM\0*"] {
                let mut data = magic.to_vec();
                data.extend_from_slice(&raw);
                images(&data);
            }
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(128))]

        #[test]
        fn manifests_never_panic_and_errors_name_a_line(
            rows in prop::collection::vec(
                prop::collection::vec(
                    prop_oneof![
                        prop::sample::select(vec![
                            "id", "provider", "operation", "input", "prompt", "params", "output",
                            "topaz", "enhance", "photio", "upscale", "dzine", "txt2img", "perfect",
                            "../x", "/abs", "a\u{0}b", "\"q\"\"", "{\"a\":1}", "[1]", "https://x/a.png",
                            "\u{feff}", "é", "",
                        ]).prop_map(str::to_string),
                        "\\PC{0,10}",
                    ],
                    0..8,
                ),
                0..6,
            ),
            sep in prop::sample::select(vec!["\n", "\r\n", "\r"]),
        ) {
            let csv: Vec<String> = rows.iter().map(|r| r.join(",")).collect();
            manifest(csv.join(sep).as_bytes());
            let objects: Vec<String> = rows
                .iter()
                .map(|r| {
                    let pairs: Vec<String> = r
                        .chunks(2)
                        .map(|kv| format!("{:?}:{:?}", kv[0], kv.get(1).map(String::as_str).unwrap_or("")))
                        .collect();
                    format!("{{{}}}", pairs.join(","))
                })
                .collect();
            manifest(objects.join(sep).as_bytes());
            manifest(format!("[{}]", objects.join(&format!(",{sep}"))).as_bytes());
        }
    }

    /// Answers far larger than any real one, and deeply nested ones: bounded errors,
    /// no stack overflow.
    #[test]
    fn huge_and_deep_answers_give_bounded_errors() {
        let mut huge = vec![0u8, 100];
        huge.extend(std::iter::repeat_n(b'x', 2 << 20));
        every_reader(&huge);
        let mut long_string = vec![0u8, 100];
        long_string.extend_from_slice(
            format!("{{\"message\":\"{}\",\"code\":7}}", "y".repeat(1 << 20)).as_bytes(),
        );
        every_reader(&long_string);
        let mut many_keys = vec![0u8, 100];
        let fields: Vec<String> = (0..20_000).map(|i| format!("\"k{i}\":1")).collect();
        many_keys.extend_from_slice(format!("{{\"result\":{{{}}}}}", fields.join(",")).as_bytes());
        every_reader(&many_keys);
        for depth in [200usize, 100_000] {
            let mut deep = vec![0u8, 100];
            deep.extend(std::iter::repeat_n(b'[', depth));
            deep.extend(std::iter::repeat_n(b']', depth));
            every_reader(&deep);
            let nested = format!("{}1{}", "{\"data\":".repeat(depth), "}".repeat(depth));
            let mut data = vec![0u8, 100];
            data.extend_from_slice(nested.as_bytes());
            every_reader(&data);
        }
        let mut huge_csv = b"id,provider,operation,input\n".to_vec();
        huge_csv.extend(std::iter::repeat_n(b'a', 2 << 20));
        manifest(&huge_csv);
    }

    /// Encodings a spreadsheet may produce: UTF-16 (with or without a byte-order
    /// mark) and UTF-32 are refused with one clear error; Latin-1 bytes are a row
    /// error naming the line.
    #[test]
    fn odd_encodings_are_named() {
        let text = "id,provider,operation,input\nj,topaz,enhance,a.png\n";
        let utf16le: Vec<u8> = text.encode_utf16().flat_map(u16::to_le_bytes).collect();
        let utf16be: Vec<u8> = text.encode_utf16().flat_map(u16::to_be_bytes).collect();
        let with_bom = |bom: &[u8], body: &[u8]| [bom, body].concat();
        let utf32le: Vec<u8> = text
            .chars()
            .flat_map(|c| (c as u32).to_le_bytes())
            .collect();
        for (what, data) in [
            ("UTF-16", with_bom(&[0xFF, 0xFE], &utf16le)),
            ("UTF-16", with_bom(&[0xFE, 0xFF], &utf16be)),
            ("UTF-16", utf16le.clone()),
            ("UTF-16", utf16be.clone()),
            ("UTF-32", with_bom(&[0xFF, 0xFE, 0, 0], &utf32le)),
        ] {
            for name in ["m.csv", "m.json", "m"] {
                let mut rows = 0;
                let e = crate::manifest::read_manifest_bytes(
                    Path::new(name),
                    &data,
                    Path::new("/nonexistent"),
                    &mut |_| rows += 1,
                )
                .unwrap_err()
                .to_string();
                assert!(
                    e.contains(what) && e.contains("UTF-8") && e.contains(name),
                    "{e}"
                );
                assert_eq!(rows, 0);
            }
        }
        let latin1 = b"id,provider,operation,input,prompt\nj,topaz,enhance,a.png,caf\xe9\n";
        let mut errors = Vec::new();
        crate::manifest::read_manifest_bytes(
            Path::new("m.csv"),
            latin1,
            Path::new("/nonexistent"),
            &mut |r| {
                if let Err(e) = r {
                    errors.push(e.to_string());
                }
            },
        )
        .unwrap();
        assert!(
            errors
                .iter()
                .any(|e| e.starts_with("m.csv:2:") && e.contains("UTF-8")),
            "{errors:?}"
        );
    }
}
