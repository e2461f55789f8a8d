//! Helpers the adapters share: loading an input (local file or URL), recognising image
//! formats and reading dimensions from a header, checking manifest parameters with
//! clear messages, decoding base64 answers, and turning a provider's HTTP error into a
//! [`ProviderError`].
//!
//! Nothing here panics on what comes from a file or the network.

use std::io::{Read, Seek, SeekFrom};
use std::path::Path;
use std::time::Duration;

use base64::engine::general_purpose::{GeneralPurpose, GeneralPurposeConfig};
use base64::engine::{DecodePaddingMode, Engine};
use bytes::Bytes;
use futures_util::StreamExt;
use reqwest::{Response, StatusCode};
use serde_json::{Map, Value};

use crate::api::{error_chain, excerpt, ProviderError, RequestKind};
use crate::model::JobSpec;

use super::Api;

// ---------------------------------------------------------------------------------
// Image formats
// ---------------------------------------------------------------------------------

/// An image format recognised from its first bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ImageFormat {
    Jpeg,
    Png,
    Tiff,
    Webp,
    Gif,
    Bmp,
}

impl ImageFormat {
    /// Recognises a format from magic bytes (the file name is never trusted).
    pub fn sniff(bytes: &[u8]) -> Option<ImageFormat> {
        if bytes.starts_with(&[0xFF, 0xD8, 0xFF]) {
            Some(ImageFormat::Jpeg)
        } else if bytes.starts_with(b"\x89PNG\r\n\x1a\n") {
            Some(ImageFormat::Png)
        } else if bytes.starts_with(b"II*\0")
            || bytes.starts_with(b"MM\0*")
            || bytes.starts_with(b"II+\0")
            || bytes.starts_with(b"MM\0+")
        {
            Some(ImageFormat::Tiff)
        } else if bytes.len() >= 12 && &bytes[..4] == b"RIFF" && &bytes[8..12] == b"WEBP" {
            Some(ImageFormat::Webp)
        } else if bytes.starts_with(b"GIF87a") || bytes.starts_with(b"GIF89a") {
            Some(ImageFormat::Gif)
        } else if bytes.starts_with(b"BM") && bytes.len() >= 26 {
            Some(ImageFormat::Bmp)
        } else {
            None
        }
    }

    /// The file extension used for files of this format.
    pub fn ext(self) -> &'static str {
        match self {
            ImageFormat::Jpeg => "jpg",
            ImageFormat::Png => "png",
            ImageFormat::Tiff => "tiff",
            ImageFormat::Webp => "webp",
            ImageFormat::Gif => "gif",
            ImageFormat::Bmp => "bmp",
        }
    }

    pub fn mime(self) -> &'static str {
        match self {
            ImageFormat::Jpeg => "image/jpeg",
            ImageFormat::Png => "image/png",
            ImageFormat::Tiff => "image/tiff",
            ImageFormat::Webp => "image/webp",
            ImageFormat::Gif => "image/gif",
            ImageFormat::Bmp => "image/bmp",
        }
    }

    /// The name used in messages.
    pub fn name(self) -> &'static str {
        match self {
            ImageFormat::Jpeg => "JPEG",
            ImageFormat::Png => "PNG",
            ImageFormat::Tiff => "TIFF",
            ImageFormat::Webp => "WebP",
            ImageFormat::Gif => "GIF",
            ImageFormat::Bmp => "BMP",
        }
    }

    /// The format a `Content-Type` names, if it is an image type we know.
    pub fn from_mime(mime: &str) -> Option<ImageFormat> {
        let essence = mime
            .split(';')
            .next()
            .unwrap_or("")
            .trim()
            .to_ascii_lowercase();
        match essence.as_str() {
            "image/jpeg" | "image/jpg" | "image/pjpeg" => Some(ImageFormat::Jpeg),
            "image/png" => Some(ImageFormat::Png),
            "image/tiff" | "image/tif" => Some(ImageFormat::Tiff),
            "image/webp" => Some(ImageFormat::Webp),
            "image/gif" => Some(ImageFormat::Gif),
            "image/bmp" => Some(ImageFormat::Bmp),
            _ => None,
        }
    }
}

impl std::fmt::Display for ImageFormat {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Width and height from an image header held in memory, if the format is readable.
pub fn dimensions_from_bytes(bytes: &[u8]) -> Option<(u32, u32)> {
    if ImageFormat::sniff(bytes) == Some(ImageFormat::Tiff) {
        return tiff_dimensions(&mut std::io::Cursor::new(bytes));
    }
    image::ImageReader::new(std::io::Cursor::new(bytes))
        .with_guessed_format()
        .ok()?
        .into_dimensions()
        .ok()
        .filter(|&(w, h)| w > 0 && h > 0)
}

/// Width and height of a local image, read from its header only.
pub fn dimensions_of_file(path: &Path) -> Option<(u32, u32)> {
    let mut head = [0u8; 16];
    let n = {
        let mut f = std::fs::File::open(path).ok()?;
        read_up_to(&mut f, &mut head).ok()?
    };
    if ImageFormat::sniff(&head[..n]) == Some(ImageFormat::Tiff) {
        let f = std::fs::File::open(path).ok()?;
        return tiff_dimensions(&mut std::io::BufReader::new(f));
    }
    image::ImageReader::open(path)
        .ok()?
        .with_guessed_format()
        .ok()?
        .into_dimensions()
        .ok()
        .filter(|&(w, h)| w > 0 && h > 0)
}

/// Width and height from a PNG's first 24 bytes (signature, then the IHDR chunk).
fn png_dimensions(head: &[u8]) -> Option<(u32, u32)> {
    if head.len() < 24 || &head[..8] != b"\x89PNG\r\n\x1a\n" || &head[12..16] != b"IHDR" {
        return None;
    }
    let w = u32::from_be_bytes([head[16], head[17], head[18], head[19]]);
    let h = u32::from_be_bytes([head[20], head[21], head[22], head[23]]);
    (w > 0 && h > 0).then_some((w, h))
}

fn read_up_to(r: &mut impl Read, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut filled = 0;
    while filled < buf.len() {
        match r.read(&mut buf[filled..]) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(filled)
}

/// ImageWidth (256) and ImageLength (257) from the first IFD of a classic TIFF (the
/// image crate is built without its TIFF decoder). BigTIFF answers `None`.
fn tiff_dimensions(r: &mut (impl Read + Seek)) -> Option<(u32, u32)> {
    let mut header = [0u8; 8];
    r.read_exact(&mut header).ok()?;
    let le = match &header[..2] {
        b"II" => true,
        b"MM" => false,
        _ => return None,
    };
    let u16_at = |b: &[u8]| {
        let a = [b[0], b[1]];
        if le {
            u16::from_le_bytes(a)
        } else {
            u16::from_be_bytes(a)
        }
    };
    let u32_at = |b: &[u8]| {
        let a = [b[0], b[1], b[2], b[3]];
        if le {
            u32::from_le_bytes(a)
        } else {
            u32::from_be_bytes(a)
        }
    };
    if u16_at(&header[2..4]) != 42 {
        return None;
    }
    r.seek(SeekFrom::Start(u64::from(u32_at(&header[4..8]))))
        .ok()?;
    let mut count = [0u8; 2];
    r.read_exact(&mut count).ok()?;
    let (mut width, mut height) = (None, None);
    for _ in 0..u16_at(&count).min(1024) {
        let mut e = [0u8; 12];
        r.read_exact(&mut e).ok()?;
        let tag = u16_at(&e[0..2]);
        let value = match u16_at(&e[2..4]) {
            3 => u32::from(u16_at(&e[8..10])), // SHORT
            4 => u32_at(&e[8..12]),            // LONG
            _ => continue,
        };
        match tag {
            256 => width = Some(value),
            257 => height = Some(value),
            _ => {}
        }
        if let (Some(w), Some(h)) = (width, height) {
            return (w > 0 && h > 0).then_some((w, h));
        }
    }
    None
}

// ---------------------------------------------------------------------------------
// Inputs
// ---------------------------------------------------------------------------------

/// Whether a manifest input is a URL (`http://` or `https://`) rather than a path.
pub fn is_url(input: &str) -> bool {
    let lower = input.get(..8).unwrap_or(input).to_ascii_lowercase();
    lower.starts_with("http://") || lower.starts_with("https://")
}

/// An input image loaded into memory.
#[derive(Debug, Clone)]
pub struct Input {
    pub bytes: Bytes,
    /// `None` when the bytes are no image format we recognise.
    pub format: Option<ImageFormat>,
}

impl Input {
    pub fn dimensions(&self) -> Option<(u32, u32)> {
        dimensions_from_bytes(&self.bytes)
    }

    /// The extension of the real format (`bin` if unknown).
    pub fn ext(&self) -> &'static str {
        self.format.map_or("bin", ImageFormat::ext)
    }

    pub fn mime(&self) -> &'static str {
        self.format
            .map_or("application/octet-stream", ImageFormat::mime)
    }
}

/// Loads an input: a local path is read (at most `limit` bytes), an http(s) URL is
/// fetched with the plain client (not the provider's rate-limited door: the input's
/// host is not the provider's API), streamed with the same cap.
///
/// Errors are `Permanent` when asking again cannot help (missing file, too large,
/// 404) and `Transient` otherwise. Nothing has been paid for yet, so never `Unknown`.
pub async fn load_input(api: &Api, source: &str, limit: u64) -> Result<Input, ProviderError> {
    let bytes = if is_url(source) {
        fetch_url(api.client(), source, limit).await?
    } else {
        read_local(source, limit).await?
    };
    let format = ImageFormat::sniff(&bytes);
    Ok(Input { bytes, format })
}

async fn read_local(path: &str, limit: u64) -> Result<Bytes, ProviderError> {
    let io_error = |e: std::io::Error| {
        use std::io::ErrorKind::*;
        let reason = format!("input {path}: {e}");
        match e.kind() {
            NotFound | PermissionDenied | IsADirectory | InvalidInput | InvalidData => {
                ProviderError::permanent(reason)
            }
            _ => ProviderError::transient(reason),
        }
    };
    let meta = tokio::fs::metadata(path).await.map_err(io_error)?;
    if !meta.is_file() {
        return Err(ProviderError::permanent(format!(
            "input {path}: not a file"
        )));
    }
    if meta.len() > limit {
        return Err(ProviderError::permanent(format!(
            "input {path}: {} is larger than the {} limit",
            human_bytes(meta.len()),
            human_bytes(limit)
        )));
    }
    let data = tokio::fs::read(path).await.map_err(io_error)?;
    if data.len() as u64 > limit {
        return Err(ProviderError::permanent(format!(
            "input {path}: larger than the {} limit",
            human_bytes(limit)
        )));
    }
    Ok(Bytes::from(data))
}

/// How long an input download may stall between two chunks.
const INPUT_READ_STALL: Duration = Duration::from_secs(60);

async fn fetch_url(
    client: &reqwest::Client,
    url: &str,
    limit: u64,
) -> Result<Bytes, ProviderError> {
    let shown = redact_url(url);
    let response = client
        .get(url)
        .send()
        .await
        .map_err(|e| ProviderError::transient(format!("input {shown}: {}", error_chain(&e))))?;
    let status = response.status();
    if !status.is_success() {
        let reason = format!("input {shown}: HTTP {status}");
        return Err(match status.as_u16() {
            408 | 425 | 429 | 500..=599 => ProviderError::Transient {
                reason,
                retry_after: crate::api::retry_after(&response),
                rate_limited: status == StatusCode::TOO_MANY_REQUESTS,
            },
            _ => ProviderError::permanent(reason),
        });
    }
    let too_large = || {
        ProviderError::permanent(format!(
            "input {shown}: larger than the {} limit",
            human_bytes(limit)
        ))
    };
    if response.content_length().is_some_and(|len| len > limit) {
        return Err(too_large());
    }
    let mut out = Vec::with_capacity(response.content_length().unwrap_or(0).min(limit) as usize);
    let mut stream = response.bytes_stream();
    loop {
        let next = tokio::time::timeout(INPUT_READ_STALL, stream.next())
            .await
            .map_err(|_| ProviderError::transient(format!("input {shown}: download stalled")))?;
        let Some(chunk) = next else { break };
        let chunk = chunk.map_err(|e| {
            ProviderError::transient(format!(
                "input {shown}: download cut off: {}",
                error_chain(&e)
            ))
        })?;
        if out.len() as u64 + chunk.len() as u64 > limit {
            return Err(too_large());
        }
        out.extend_from_slice(&chunk);
    }
    if out.is_empty() {
        return Err(ProviderError::permanent(format!(
            "input {shown}: empty answer"
        )));
    }
    Ok(Bytes::from(out))
}

/// A URL without what may be a credential: the query string (presigned URLs carry
/// their signature there), a user name and password, and the fragment.
pub fn redact_url(url: &str) -> String {
    let (base, had_query) = match url.split_once(['?', '#']) {
        Some((base, _)) => (base, true),
        None => (url, false),
    };
    let base = match url::Url::parse(base) {
        Ok(mut u) if !u.username().is_empty() || u.password().is_some() => {
            let _ = u.set_username("");
            let _ = u.set_password(None);
            u.to_string()
        }
        _ => base.to_string(),
    };
    if had_query {
        format!("{base}?…")
    } else {
        base
    }
}

/// What validation can learn about a local input without reading all of it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalImage {
    pub size: u64,
    pub format: Option<ImageFormat>,
    pub dimensions: Option<(u32, u32)>,
}

/// Checks a local input for validation: it exists, is a file, is at most `limit`
/// bytes; returns its format and dimensions when its header tells them.
pub fn inspect_local(path: &str, limit: u64) -> Result<LocalImage, String> {
    let meta = std::fs::metadata(path).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => format!("input {path} does not exist"),
        _ => format!("input {path}: {e}"),
    })?;
    if !meta.is_file() {
        return Err(format!("input {path} is not a file"));
    }
    if meta.len() == 0 {
        return Err(format!("input {path} is empty"));
    }
    if meta.len() > limit {
        return Err(format!(
            "input {path} is {}, more than the {} limit",
            human_bytes(meta.len()),
            human_bytes(limit)
        ));
    }
    let mut head = [0u8; 32];
    let n = std::fs::File::open(path)
        .and_then(|mut f| read_up_to(&mut f, &mut head))
        .map_err(|e| format!("input {path}: {e}"))?;
    let format = ImageFormat::sniff(&head[..n]);
    // A PNG's size is in the header just read: no second open (a million-row
    // manifest checks a million files).
    let dimensions = png_dimensions(&head[..n])
        .or_else(|| format.and_then(|_| dimensions_of_file(Path::new(path))));
    Ok(LocalImage {
        size: meta.len(),
        format,
        dimensions,
    })
}

/// Checks the input count and, for local inputs, the file itself. Returns the local
/// image info when there is exactly one input and it is a readable local file.
pub fn check_single_input(
    spec: &JobSpec,
    limit: u64,
    errors: &mut Vec<String>,
) -> Option<LocalImage> {
    match spec.inputs.len() {
        1 => {}
        0 => {
            errors.push(format!(
                "{} needs one input image (the input column is empty)",
                spec.operation
            ));
            return None;
        }
        n => {
            errors.push(format!(
                "{} takes exactly one input image, got {n}",
                spec.operation
            ));
            return None;
        }
    }
    let input = spec.inputs[0].trim();
    if input.is_empty() {
        errors.push(format!(
            "{} needs one input image (the input column is empty)",
            spec.operation
        ));
        return None;
    }
    if is_url(input) {
        if url::Url::parse(input).map_or(true, |u| u.host_str().is_none_or(str::is_empty)) {
            errors.push(format!("input {input} is not a valid URL"));
        }
        return None;
    }
    match inspect_local(input, limit) {
        Ok(info) => {
            if info.format.is_none() {
                errors.push(format!(
                    "input {input} is not an image format pixbatch recognises"
                ));
            }
            Some(info)
        }
        Err(e) => {
            errors.push(e);
            None
        }
    }
}

/// `12.3 MB`-style sizes for messages (decimal units, as providers state limits).
pub fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 4] = ["KB", "MB", "GB", "TB"];
    if n < 1000 {
        return format!("{n} bytes");
    }
    let mut value = n as f64;
    let mut unit = "";
    for u in UNITS {
        value /= 1000.0;
        unit = u;
        if value < 1000.0 {
            break;
        }
    }
    let text = format!("{value:.1}");
    format!("{} {unit}", text.trim_end_matches(".0"))
}

// ---------------------------------------------------------------------------------
// Parameters
// ---------------------------------------------------------------------------------

/// A parameter value as shown in messages: strings quoted, the rest as JSON.
pub fn show_value(v: &Value) -> String {
    match v {
        Value::String(s) => format!("{s:?}"),
        other => {
            let text = other.to_string();
            if text.chars().count() > 60 {
                format!("{}…", text.chars().take(60).collect::<String>())
            } else {
                text
            }
        }
    }
}

fn as_f64(v: &Value) -> Option<f64> {
    match v {
        Value::Number(n) => n.as_f64(),
        Value::String(s) => s.trim().parse::<f64>().ok(),
        _ => None,
    }
    .filter(|x| x.is_finite())
}

/// A number in `[min, max]`; numbers given as strings (`"0.5"`) are accepted.
pub fn number_in_range(name: &str, v: &Value, min: f64, max: f64) -> Result<f64, String> {
    match as_f64(v) {
        Some(x) if x >= min && x <= max => Ok(x),
        Some(_) => Err(format!(
            "{name} must be a number from {} to {} (got {})",
            fmt_num(min),
            fmt_num(max),
            show_value(v)
        )),
        None => Err(format!(
            "{name} must be a number from {} to {} (got {}, not a number)",
            fmt_num(min),
            fmt_num(max),
            show_value(v)
        )),
    }
}

/// An integer in `[min, max]`; `"3"` and `3.0` are accepted, `3.5` is not.
pub fn integer_in_range(name: &str, v: &Value, min: i64, max: i64) -> Result<i64, String> {
    let int = match v {
        Value::Number(n) => n
            .as_i64()
            .or_else(|| n.as_f64().filter(|x| x.fract() == 0.0).map(|x| x as i64)),
        Value::String(s) => {
            let s = s.trim();
            s.parse::<i64>().ok().or_else(|| {
                s.parse::<f64>()
                    .ok()
                    .filter(|x| x.is_finite() && x.fract() == 0.0)
                    .map(|x| x as i64)
            })
        }
        _ => None,
    };
    let range = if max == i64::MAX {
        format!("an integer of at least {min}")
    } else {
        format!("an integer from {min} to {max}")
    };
    match int {
        Some(i) if i >= min && i <= max => Ok(i),
        Some(_) => Err(format!("{name} must be {range} (got {})", show_value(v))),
        None => Err(format!(
            "{name} must be {range} (got {}, not an integer)",
            show_value(v)
        )),
    }
}

/// One of `allowed`, compared without regard to case, spaces or `_`/`-`; returns the
/// spelling the provider documents.
pub fn one_of(name: &str, v: &Value, allowed: &[&'static str]) -> Result<&'static str, String> {
    let fold = |s: &str| -> String {
        s.chars()
            .filter(|c| !c.is_whitespace() && *c != '_' && *c != '-')
            .flat_map(char::to_lowercase)
            .collect()
    };
    if let Value::String(s) = v {
        if let Some(exact) = allowed.iter().find(|a| **a == s.trim()) {
            return Ok(exact);
        }
        let wanted = fold(s);
        if let Some(found) = allowed.iter().find(|a| fold(a) == wanted) {
            return Ok(found);
        }
    }
    Err(format!(
        "{name} must be one of {} (got {})",
        list(allowed),
        show_value(v)
    ))
}

/// A boolean: `true`/`false`, also `"true"`, `"false"`, `"yes"`, `"no"`, `1`, `0`.
pub fn boolean(name: &str, v: &Value) -> Result<bool, String> {
    let b = match v {
        Value::Bool(b) => Some(*b),
        Value::Number(n) => match n.as_f64() {
            Some(1.0) => Some(true),
            Some(0.0) => Some(false),
            _ => None,
        },
        Value::String(s) => match s.trim().to_ascii_lowercase().as_str() {
            "true" | "yes" | "1" => Some(true),
            "false" | "no" | "0" => Some(false),
            _ => None,
        },
        _ => None,
    };
    b.ok_or_else(|| format!("{name} must be true or false (got {})", show_value(v)))
}

/// A string (numbers are taken as their text) of at most `max_chars` characters.
pub fn text(name: &str, v: &Value, max_chars: Option<usize>) -> Result<String, String> {
    let s = match v {
        Value::String(s) => s.clone(),
        Value::Number(n) => n.to_string(),
        Value::Bool(b) => b.to_string(),
        _ => return Err(format!("{name} must be a string (got {})", show_value(v))),
    };
    if let Some(max) = max_chars {
        let n = s.chars().count();
        if n > max {
            return Err(format!(
                "{name} is {n} characters long; at most {max} are allowed"
            ));
        }
    }
    Ok(s)
}

/// `"a", "b" or "c"`.
pub fn list(items: &[&str]) -> String {
    let quoted: Vec<String> = items.iter().map(|s| format!("{s:?}")).collect();
    match quoted.split_last() {
        None => String::new(),
        Some((last, [])) => last.clone(),
        Some((last, rest)) => format!("{} or {last}", rest.join(", ")),
    }
}

/// Formats a number without a needless `.0`.
pub fn fmt_num(x: f64) -> String {
    if x.fract() == 0.0 && x.abs() < 1e15 {
        format!("{}", x as i64)
    } else {
        format!("{x}")
    }
}

/// The closest of `candidates` to a misspelt `name`, if close enough to suggest.
pub fn suggest<'a>(name: &str, candidates: &[&'a str]) -> Option<&'a str> {
    let name = name.to_ascii_lowercase();
    candidates
        .iter()
        .map(|c| (edit_distance(&name, &c.to_ascii_lowercase()), *c))
        .filter(|(d, c)| *d <= 2.max(c.len() / 4))
        .min_by_key(|(d, _)| *d)
        .map(|(_, c)| c)
}

fn edit_distance(a: &str, b: &str) -> usize {
    let a: Vec<char> = a.chars().collect();
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.iter().enumerate() {
        let mut cur = vec![i + 1];
        for (j, cb) in b.iter().enumerate() {
            let cost = usize::from(ca != cb);
            cur.push((prev[j] + cost).min(prev[j + 1] + 1).min(cur[j] + 1));
        }
        prev = cur;
    }
    prev[b.len()]
}

/// Reads a job's parameters, collecting every problem rather than stopping at the
/// first, so `validate` can list them all. Absent and `null` values are "not given".
pub struct Params<'a> {
    map: &'a Map<String, Value>,
    pub errors: Vec<String>,
}

impl<'a> Params<'a> {
    pub fn new(map: &'a Map<String, Value>) -> Params<'a> {
        Params {
            map,
            errors: Vec::new(),
        }
    }

    /// The raw value, if given (`null` counts as not given).
    pub fn get(&self, name: &str) -> Option<&'a Value> {
        self.map.get(name).filter(|v| !v.is_null())
    }

    pub fn has(&self, name: &str) -> bool {
        self.get(name).is_some()
    }

    /// Reports every parameter whose name is not in `known`, suggesting the closest.
    pub fn reject_unknown(&mut self, provider: &str, known: &[&str]) {
        let mut errors = Vec::new();
        for name in self.map.keys() {
            if known.contains(&name.as_str()) {
                continue;
            }
            let mut msg = format!("unknown {provider} parameter {name:?}");
            match suggest(name, known) {
                Some(s) => msg.push_str(&format!(" (did you mean {s:?}?)")),
                None => msg.push_str(&format!("; known parameters: {}", known.join(", "))),
            }
            errors.push(msg);
        }
        self.errors.extend(errors);
    }

    fn take<T>(
        &mut self,
        name: &str,
        check: impl FnOnce(&Value) -> Result<T, String>,
    ) -> Option<T> {
        let v = self.get(name)?;
        match check(v) {
            Ok(x) => Some(x),
            Err(e) => {
                self.errors.push(e);
                None
            }
        }
    }

    pub fn number(&mut self, name: &str, min: f64, max: f64) -> Option<f64> {
        self.take(name, |v| number_in_range(name, v, min, max))
    }

    pub fn integer(&mut self, name: &str, min: i64, max: i64) -> Option<i64> {
        self.take(name, |v| integer_in_range(name, v, min, max))
    }

    pub fn choice(&mut self, name: &str, allowed: &[&'static str]) -> Option<&'static str> {
        self.take(name, |v| one_of(name, v, allowed))
    }

    pub fn boolean(&mut self, name: &str) -> Option<bool> {
        self.take(name, |v| boolean(name, v))
    }

    pub fn text(&mut self, name: &str, max_chars: Option<usize>) -> Option<String> {
        self.take(name, |v| text(name, v, max_chars))
    }
}

/// The prompt of a job: the prompt column when it is not blank, else the `prompt`
/// parameter (when it is a non-blank string). The column wins if both are given.
pub fn prompt_of(spec: &JobSpec, params: &Map<String, Value>) -> Option<String> {
    if let Some(p) = spec.prompt.as_deref().filter(|p| !p.trim().is_empty()) {
        return Some(p.to_string());
    }
    match params.get("prompt") {
        Some(Value::String(s)) if !s.trim().is_empty() => Some(s.clone()),
        _ => None,
    }
}

/// The operation name folded for comparison: lower case, `_` as `-`.
pub fn fold_operation(op: &str) -> String {
    op.trim().to_ascii_lowercase().replace('_', "-")
}

// ---------------------------------------------------------------------------------
// Base64
// ---------------------------------------------------------------------------------

const LENIENT: GeneralPurposeConfig = GeneralPurposeConfig::new()
    .with_decode_padding_mode(DecodePaddingMode::Indifferent)
    .with_decode_allow_trailing_bits(true);
const STANDARD_LENIENT: GeneralPurpose = GeneralPurpose::new(&base64::alphabet::STANDARD, LENIENT);
const URL_SAFE_LENIENT: GeneralPurpose = GeneralPurpose::new(&base64::alphabet::URL_SAFE, LENIENT);

/// Standard base64 with padding, for request bodies.
pub fn encode_base64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

/// Decodes base64 from an answer: a `data:…;base64,` prefix, line breaks, missing
/// padding and the URL-safe alphabet are all tolerated. A failure is a bad answer of
/// `kind` (for a submission: outcome unknown).
pub fn decode_base64(kind: RequestKind, what: &str, text: &str) -> Result<Vec<u8>, ProviderError> {
    let body = match text.trim_start().strip_prefix("data:") {
        Some(rest) => match rest.split_once(',') {
            Some((_, data)) => data,
            None => rest,
        },
        None => text,
    };
    let cleaned: Vec<u8> = body.bytes().filter(|b| !b.is_ascii_whitespace()).collect();
    if cleaned.is_empty() {
        return Err(ProviderError::bad_answer(kind, format!("{what} is empty")));
    }
    STANDARD_LENIENT
        .decode(&cleaned)
        .or_else(|_| URL_SAFE_LENIENT.decode(&cleaned))
        .map_err(|e| {
            ProviderError::bad_answer(
                kind,
                format!("{what} is not valid base64 ({e}): {}", excerpt(&cleaned)),
            )
        })
}

/// Decodes a base64 image and checks it is one: returns the bytes and the extension of
/// the real format.
pub fn decode_image(
    kind: RequestKind,
    what: &str,
    text: &str,
) -> Result<(Bytes, &'static str), ProviderError> {
    let data = decode_base64(kind, what, text)?;
    match ImageFormat::sniff(&data) {
        Some(f) => Ok((Bytes::from(data), f.ext())),
        None => Err(ProviderError::bad_answer(
            kind,
            format!(
                "{what} decodes to {} that are no known image format",
                human_bytes(data.len() as u64)
            ),
        )),
    }
}

// ---------------------------------------------------------------------------------
// HTTP errors
// ---------------------------------------------------------------------------------

/// The human-readable message in a provider's JSON error body, if any.
pub fn error_message(body: &[u8]) -> Option<String> {
    let v: Value = serde_json::from_slice(body).ok()?;
    json_message(&v)
}

/// The first non-empty string among the usual message fields of a JSON value.
pub fn json_message(v: &Value) -> Option<String> {
    const FIELDS: [&str; 8] = [
        "message",
        "msg",
        "error_message",
        "detail",
        "error_description",
        "reason",
        "error",
        "failure_reason",
    ];
    let obj = v.as_object()?;
    for f in FIELDS {
        match obj.get(f) {
            Some(Value::String(s)) if !s.trim().is_empty() => {
                return Some(excerpt(s.trim().as_bytes()))
            }
            Some(inner @ Value::Object(_)) => {
                if let Some(m) = json_message(inner) {
                    return Some(m);
                }
            }
            _ => {}
        }
    }
    None
}

/// Classifies an error answer (a status `Api::send` passed through: below 400, or a
/// 4xx other than 429). 408/409/423/425 may pass; other 4xx are the provider's refusal
/// and fail the job. Anything below 400 that is not a success is a bad answer.
pub fn classify_http_error(kind: RequestKind, status: StatusCode, body: &[u8]) -> ProviderError {
    let detail = error_message(body).unwrap_or_else(|| excerpt(body));
    let mut reason = format!("HTTP {status}");
    if !detail.is_empty() {
        reason.push_str(": ");
        reason.push_str(&detail);
    }
    status_error(kind, status, reason)
}

/// The error an answer's status means, with `reason` (its words): 408/409/423/425,
/// 429 and 5xx may pass; other 4xx are the provider's refusal; anything else that is
/// not a success is a bad answer.
pub fn status_error(kind: RequestKind, status: StatusCode, reason: String) -> ProviderError {
    match status.as_u16() {
        408 | 409 | 423 | 425 | 429 | 500..=599 => ProviderError::transient(reason),
        400..=499 => ProviderError::permanent(reason),
        _ => ProviderError::bad_answer(kind, format!("unexpected answer {reason}")),
    }
}

/// Parses a JSON answer body, as [`Api::read_json`] does, for the adapters' pure
/// readers (bytes in, a result out: what the property tests and fuzz targets drive).
pub fn parse_json(
    kind: RequestKind,
    status: StatusCode,
    body: &[u8],
) -> Result<Value, ProviderError> {
    serde_json::from_slice(body).map_err(|e| {
        ProviderError::bad_answer(
            kind,
            format!("unexpected answer (HTTP {status}): {e}: {}", excerpt(body)),
        )
    })
}

/// Reads (a bounded prefix of) an error answer and classifies it.
pub async fn http_error(kind: RequestKind, response: Response) -> ProviderError {
    let status = response.status();
    match read_error_body(response, 64 * 1024).await {
        Ok(body) => classify_http_error(kind, status, &body),
        Err(e) => e,
    }
}

/// At most `limit` bytes of an error answer's body. A body that breaks off (or
/// stalls) is an incomplete answer: its status refused the request, but whether for
/// good cannot be told without the reason, so it is a transient error, never a
/// permanent failure of the job (found by the soak: a reset in the middle of
/// Perfect's "InvalidTaskId" answer failed the job with a bare "HTTP 400").
pub async fn read_error_body(response: Response, limit: usize) -> Result<Vec<u8>, ProviderError> {
    let status = response.status();
    let mut out = Vec::new();
    let mut stream = response.bytes_stream();
    let read = async {
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.map_err(|e| e.to_string())?;
            let room = limit.saturating_sub(out.len());
            out.extend_from_slice(&chunk[..chunk.len().min(room)]);
            if out.len() >= limit {
                break;
            }
        }
        Ok::<(), String>(())
    };
    let cut = match tokio::time::timeout(Duration::from_secs(10), read).await {
        Ok(Ok(())) => return Ok(out),
        Ok(Err(e)) => e,
        Err(_) => "no more of it within 10 s".to_string(),
    };
    Err(ProviderError::transient(format!(
        "HTTP {status} answer cut off before its reason ({cut})"
    )))
}

/// At most `limit` bytes of a body, within a few seconds; whatever arrived on error.
pub async fn read_prefix(response: Response, limit: usize) -> Vec<u8> {
    let mut out = Vec::new();
    let mut stream = response.bytes_stream();
    let read = async {
        while let Some(Ok(chunk)) = stream.next().await {
            let room = limit.saturating_sub(out.len());
            out.extend_from_slice(&chunk[..chunk.len().min(room)]);
            if out.len() >= limit {
                break;
            }
        }
    };
    let _ = tokio::time::timeout(Duration::from_secs(10), read).await;
    out
}

/// Reads a whole body of at most `limit` bytes; `Ok(None)` when it is longer (the
/// caller decides what an oversized answer means). A broken body is a bad answer.
pub async fn read_limited(
    kind: RequestKind,
    response: Response,
    limit: u64,
) -> Result<Option<Bytes>, ProviderError> {
    if response.content_length().is_some_and(|len| len > limit) {
        return Ok(None);
    }
    let mut out = Vec::new();
    let mut stream = response.bytes_stream();
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(|e| {
            ProviderError::bad_answer(kind, format!("answer cut off: {}", error_chain(&e)))
        })?;
        if out.len() as u64 + chunk.len() as u64 > limit {
            return Ok(None);
        }
        out.extend_from_slice(&chunk);
    }
    Ok(Some(Bytes::from(out)))
}

/// A response header as text.
pub fn header_str(response: &Response, name: &str) -> Option<String> {
    response
        .headers()
        .get(name)
        .and_then(|v| v.to_str().ok())
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
}

/// A secret as a header value that `Debug` output and logs never show.
/// The one input of a single-input operation.
pub fn single_input(spec: &JobSpec) -> Result<&str, ProviderError> {
    match spec.inputs.as_slice() {
        [one] if !one.trim().is_empty() => Ok(one.trim()),
        other => Err(ProviderError::permanent(format!(
            "{} takes exactly one input image, got {}",
            spec.provider,
            other.len()
        ))),
    }
}

pub fn secret_header(
    what: &str,
    value: &str,
) -> Result<reqwest::header::HeaderValue, ProviderError> {
    let mut v = reqwest::header::HeaderValue::from_str(value.trim()).map_err(|_| {
        ProviderError::permanent(format!(
            "{what} contains characters not allowed in an HTTP header"
        ))
    })?;
    v.set_sensitive(true);
    Ok(v)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn png_size_from_the_header_matches_the_decoder() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/examples/images/tiny.png");
        let bytes = std::fs::read(path).unwrap();
        assert_eq!(png_dimensions(&bytes[..32]), Some((64, 48)));
        assert_eq!(
            png_dimensions(&bytes[..32]),
            dimensions_of_file(Path::new(path))
        );
        assert_eq!(
            inspect_local(path, 1 << 20).unwrap().dimensions,
            Some((64, 48))
        );
        assert_eq!(png_dimensions(&bytes[..20]), None);
        assert_eq!(png_dimensions(b"GIF89a..................."), None);
    }

    #[test]
    fn sniffs_formats_from_magic_bytes() {
        assert_eq!(
            ImageFormat::sniff(&[0xFF, 0xD8, 0xFF, 0xE0]),
            Some(ImageFormat::Jpeg)
        );
        assert_eq!(
            ImageFormat::sniff(b"\x89PNG\r\n\x1a\n...."),
            Some(ImageFormat::Png)
        );
        assert_eq!(
            ImageFormat::sniff(b"II*\0\x08\0\0\0"),
            Some(ImageFormat::Tiff)
        );
        assert_eq!(
            ImageFormat::sniff(b"MM\0*\0\0\0\x08"),
            Some(ImageFormat::Tiff)
        );
        assert_eq!(
            ImageFormat::sniff(b"RIFF\0\0\0\0WEBPVP8 "),
            Some(ImageFormat::Webp)
        );
        assert_eq!(ImageFormat::sniff(b"GIF89a"), Some(ImageFormat::Gif));
        assert_eq!(ImageFormat::sniff(b"<html>"), None);
        assert_eq!(ImageFormat::sniff(b""), None);
        assert_eq!(ImageFormat::Jpeg.ext(), "jpg");
        assert_eq!(ImageFormat::Tiff.mime(), "image/tiff");
        assert_eq!(
            ImageFormat::from_mime("image/PNG; charset=x"),
            Some(ImageFormat::Png)
        );
    }

    pub(crate) fn png(w: u32, h: u32) -> Vec<u8> {
        let img = image::RgbImage::from_pixel(w, h, image::Rgb([10, 20, 30]));
        let mut out = std::io::Cursor::new(Vec::new());
        img.write_to(&mut out, image::ImageFormat::Png)
            .expect("encode png");
        out.into_inner()
    }

    fn tiff(w: u32, h: u32, little_endian: bool) -> Vec<u8> {
        // Header + one IFD with ImageWidth (SHORT) and ImageLength (LONG).
        let mut b = Vec::new();
        type Enc = (fn(u16) -> [u8; 2], fn(u32) -> [u8; 4]);
        let (u16b, u32b): Enc = if little_endian {
            (u16::to_le_bytes, u32::to_le_bytes)
        } else {
            (u16::to_be_bytes, u32::to_be_bytes)
        };
        b.extend_from_slice(if little_endian { b"II" } else { b"MM" });
        b.extend_from_slice(&u16b(42));
        b.extend_from_slice(&u32b(8));
        b.extend_from_slice(&u16b(3));
        // a tag that is skipped
        b.extend_from_slice(&u16b(254));
        b.extend_from_slice(&u16b(4));
        b.extend_from_slice(&u32b(1));
        b.extend_from_slice(&u32b(0));
        b.extend_from_slice(&u16b(256));
        b.extend_from_slice(&u16b(3));
        b.extend_from_slice(&u32b(1));
        b.extend_from_slice(&u16b(w as u16));
        b.extend_from_slice(&[0, 0]);
        b.extend_from_slice(&u16b(257));
        b.extend_from_slice(&u16b(4));
        b.extend_from_slice(&u32b(1));
        b.extend_from_slice(&u32b(h));
        b
    }

    #[test]
    fn reads_dimensions_from_headers() {
        assert_eq!(dimensions_from_bytes(&png(7, 5)), Some((7, 5)));
        assert_eq!(
            dimensions_from_bytes(&tiff(640, 480, true)),
            Some((640, 480))
        );
        assert_eq!(
            dimensions_from_bytes(&tiff(640, 70000, false)),
            Some((640, 70000))
        );
        assert_eq!(dimensions_from_bytes(b"II*\0\xff\xff\xff\xff"), None);
        assert_eq!(dimensions_from_bytes(b"garbage"), None);
        assert_eq!(dimensions_from_bytes(&png(7, 5)[..20]), None);

        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path().join("a.png");
        std::fs::write(&p, png(33, 12)).expect("write");
        assert_eq!(dimensions_of_file(&p), Some((33, 12)));
        let t = dir.path().join("a.tif");
        std::fs::write(&t, tiff(100, 200, false)).expect("write");
        assert_eq!(dimensions_of_file(&t), Some((100, 200)));
        let info = inspect_local(t.to_str().expect("utf8"), 1000).expect("inspect");
        assert_eq!(info.format, Some(ImageFormat::Tiff));
        assert_eq!(info.dimensions, Some((100, 200)));
        let err = inspect_local(t.to_str().expect("utf8"), 10).expect_err("too large");
        assert!(err.contains("limit"), "{err}");
        let err = inspect_local("/nonexistent/x.png", 10).expect_err("missing");
        assert!(err.contains("does not exist"), "{err}");
    }

    #[test]
    fn param_getters_name_the_parameter_value_and_range() {
        assert_eq!(number_in_range("denoise", &json!("0.5"), 0.0, 1.0), Ok(0.5));
        assert_eq!(number_in_range("denoise", &json!(1), 0.0, 1.0), Ok(1.0));
        let e = number_in_range("denoise", &json!(1.5), 0.0, 1.0).expect_err("range");
        assert_eq!(e, "denoise must be a number from 0 to 1 (got 1.5)");
        let e = number_in_range("denoise", &json!("lots"), 0.0, 1.0).expect_err("nan");
        assert!(e.contains("\"lots\"") && e.contains("not a number"), "{e}");
        assert!(number_in_range("denoise", &json!("NaN"), 0.0, 1.0).is_err());

        assert_eq!(integer_in_range("creativity", &json!("3"), 1, 6), Ok(3));
        assert_eq!(integer_in_range("creativity", &json!(3.0), 1, 6), Ok(3));
        let e = integer_in_range("creativity", &json!(7), 1, 6).expect_err("range");
        assert_eq!(e, "creativity must be an integer from 1 to 6 (got 7)");
        let e = integer_in_range("creativity", &json!(2.5), 1, 6).expect_err("fraction");
        assert!(e.contains("not an integer"), "{e}");
        let e = integer_in_range("seed", &json!(-1), 0, i64::MAX).expect_err("negative");
        assert_eq!(e, "seed must be an integer of at least 0 (got -1)");

        assert_eq!(
            one_of("quality", &json!("high"), &["LOW", "MIDDLE", "HIGH"]),
            Ok("HIGH")
        );
        assert_eq!(
            one_of("model", &json!("standard v2"), &["Standard V2", "CGI"]),
            Ok("Standard V2")
        );
        let e = one_of("quality", &json!("ultra"), &["LOW", "MIDDLE", "HIGH"]).expect_err("enum");
        assert_eq!(
            e,
            "quality must be one of \"LOW\", \"MIDDLE\" or \"HIGH\" (got \"ultra\")"
        );
        assert!(one_of("quality", &json!(3), &["LOW"]).is_err());

        assert_eq!(boolean("crop_to_fill", &json!("true")), Ok(true));
        assert_eq!(boolean("crop_to_fill", &json!(0)), Ok(false));
        let e = boolean("crop_to_fill", &json!("maybe")).expect_err("bool");
        assert_eq!(e, "crop_to_fill must be true or false (got \"maybe\")");

        assert!(text("prompt", &json!("x".repeat(11)), Some(10)).is_err());
        assert_eq!(
            text("prompt", &json!("abc"), Some(10)),
            Ok("abc".to_string())
        );
    }

    #[test]
    fn params_collects_every_problem_and_suggests_names() {
        let map = json!({"creativty": 3, "texture": 0, "denoise": null, "sharpen": "0.2"});
        let map = map.as_object().expect("object");
        let mut p = Params::new(map);
        p.reject_unknown("topaz", &["creativity", "texture", "denoise", "sharpen"]);
        assert_eq!(p.integer("texture", 1, 5), None);
        assert_eq!(p.number("denoise", 0.0, 1.0), None);
        assert_eq!(p.number("sharpen", 0.0, 1.0), Some(0.2));
        assert_eq!(p.errors.len(), 2, "{:?}", p.errors);
        assert!(
            p.errors[0].contains("did you mean \"creativity\""),
            "{:?}",
            p.errors
        );
        assert!(p.errors[1].contains("texture must be an integer from 1 to 5 (got 0)"));
    }

    #[test]
    fn base64_is_decoded_leniently_and_garbage_is_a_bad_answer() {
        let data = png(2, 2);
        let b64 = encode_base64(&data);
        assert_eq!(
            decode_base64(RequestKind::Submit, "x", &b64).expect("plain"),
            data
        );
        let wrapped = format!("data:image/png;base64,{}\n{}", &b64[..10], &b64[10..]);
        assert_eq!(
            decode_base64(RequestKind::Submit, "x", &wrapped).expect("data uri"),
            data
        );
        let unpadded = b64.trim_end_matches('=');
        assert_eq!(
            decode_base64(RequestKind::Submit, "x", unpadded).expect("no pad"),
            data
        );
        let (bytes, ext) = decode_image(RequestKind::Submit, "x", &b64).expect("image");
        assert_eq!((bytes.len(), ext), (data.len(), "png"));
        assert!(matches!(
            decode_base64(RequestKind::Submit, "x", "@@@not base64@@@"),
            Err(ProviderError::Unknown(_))
        ));
        assert!(matches!(
            decode_base64(RequestKind::Poll, "x", ""),
            Err(ProviderError::Transient { .. })
        ));
        assert!(matches!(
            decode_image(RequestKind::Submit, "x", &encode_base64(b"hello world")),
            Err(ProviderError::Unknown(_))
        ));
    }

    #[test]
    fn http_errors_carry_the_providers_message() {
        let e = classify_http_error(
            RequestKind::Submit,
            StatusCode::PAYMENT_REQUIRED,
            br#"{"code":402,"message":"Insufficient funds."}"#,
        );
        assert_eq!(
            e,
            ProviderError::permanent("HTTP 402 Payment Required: Insufficient funds.")
        );
        let e = classify_http_error(RequestKind::Poll, StatusCode::BAD_REQUEST, b"plain text");
        assert_eq!(
            e,
            ProviderError::permanent("HTTP 400 Bad Request: plain text")
        );
        assert!(matches!(
            classify_http_error(RequestKind::Link, StatusCode::CONFLICT, b""),
            ProviderError::Transient { .. }
        ));
        assert!(matches!(
            classify_http_error(RequestKind::Submit, StatusCode::FOUND, b""),
            ProviderError::Unknown(_)
        ));
        let long = "x".repeat(5000);
        let ProviderError::Permanent(m) = classify_http_error(
            RequestKind::Submit,
            StatusCode::BAD_REQUEST,
            long.as_bytes(),
        ) else {
            panic!("not permanent")
        };
        assert!(m.len() < 400);
        assert_eq!(
            error_message(br#"{"error":{"message":"nested"}}"#).as_deref(),
            Some("nested")
        );
    }

    #[test]
    fn small_helpers() {
        assert!(is_url("HTTPS://example.com/a.png"));
        assert!(is_url("http://x"));
        assert!(!is_url("/tmp/http://x"));
        assert!(!is_url("C:\\x.png"));
        assert_eq!(human_bytes(999), "999 bytes");
        assert_eq!(human_bytes(500_000_000), "500 MB");
        assert_eq!(human_bytes(1_500_000), "1.5 MB");
        assert_eq!(list(&["a"]), "\"a\"");
        assert_eq!(
            suggest("ouput_width", &["output_width", "output_height"]),
            Some("output_width")
        );
        assert_eq!(suggest("zzzzzz", &["output_width"]), None);
        assert_eq!(redact_url("https://h/p?X-Amz-Signature=s"), "https://h/p?…");
        assert_eq!(fold_operation(" Enhance_Gen "), "enhance-gen");
    }
}

#[cfg(test)]
mod cut_answers {
    use super::*;

    fn answer(status: u16, parts: Vec<std::io::Result<&'static [u8]>>) -> Response {
        let stream = futures_util::stream::iter(
            parts
                .into_iter()
                .map(|p| p.map(Bytes::from_static))
                .collect::<Vec<_>>(),
        );
        let http = axum::http::Response::builder()
            .status(status)
            .body(reqwest::Body::wrap_stream(stream))
            .unwrap();
        Response::from(http)
    }

    #[tokio::test]
    async fn an_error_answer_cut_off_is_transient_not_a_refusal() {
        let whole = answer(400, vec![Ok(br#"{"error":"bad size"}"#)]);
        let e = http_error(RequestKind::Submit, whole).await;
        assert!(
            matches!(&e, ProviderError::Permanent(r) if r.contains("bad size")),
            "{e:?}"
        );
        let cut = answer(
            400,
            vec![Ok(br#"{"error_co"#), Err(std::io::Error::other("reset"))],
        );
        let e = http_error(RequestKind::Submit, cut).await;
        assert!(
            matches!(&e, ProviderError::Transient { reason, .. } if reason.contains("cut off")),
            "{e:?}"
        );
    }
}
