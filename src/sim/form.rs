//! Reading request bodies without trusting them: multipart and urlencoded forms into a
//! name -> value map, with every failure a reason string and never a panic.

use std::collections::{BTreeMap, BTreeSet};

use axum::body::Bytes;
use axum::extract::{FromRequest, Multipart, Request};
use axum::http::{header, StatusCode};

/// One uploaded file part.
#[derive(Debug, Clone)]
pub(crate) struct FilePart {
    pub(crate) filename: Option<String>,
    pub(crate) bytes: Bytes,
}

/// A parsed form. Later parts with the same name replace earlier ones.
#[derive(Debug, Default)]
pub(crate) struct Form {
    fields: BTreeMap<String, String>,
    files: BTreeMap<String, FilePart>,
    /// Text parts that were not UTF-8: an error only if the handler asks for them.
    not_utf8: BTreeSet<String>,
}

#[derive(Debug)]
pub(crate) enum FormError {
    /// The body is larger than the simulator accepts.
    TooLarge,
    /// The body is not a form of the expected kind, or is malformed.
    Malformed(String),
}

impl FormError {
    pub(crate) fn status(&self) -> StatusCode {
        match self {
            FormError::TooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            FormError::Malformed(_) => StatusCode::BAD_REQUEST,
        }
    }

    pub(crate) fn message(&self) -> String {
        match self {
            FormError::TooLarge => "Request Entity Too Large".to_string(),
            FormError::Malformed(m) => m.clone(),
        }
    }
}

impl Form {
    /// A text field: `Ok(None)` when absent, `Err` when present but not UTF-8.
    pub(crate) fn text(&self, name: &str) -> Result<Option<&str>, String> {
        if let Some(v) = self.fields.get(name) {
            return Ok(Some(v.as_str()));
        }
        if self.not_utf8.contains(name) {
            return Err(format!("field {name} is not valid UTF-8 text"));
        }
        Ok(None)
    }

    pub(crate) fn file(&self, name: &str) -> Option<&FilePart> {
        self.files.get(name)
    }

    #[cfg(test)]
    pub(crate) fn from_pairs(pairs: &[(&str, &str)]) -> Self {
        Form {
            fields: pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            ..Default::default()
        }
    }
}

fn content_type(req: &Request) -> String {
    req.headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_ascii_lowercase()
}

/// Read a `multipart/form-data` body. Parts named in `file_fields`, and parts that carry a
/// file name, are files; everything else is text.
pub(crate) async fn read_multipart(req: Request, file_fields: &[&str]) -> Result<Form, FormError> {
    if !content_type(&req).starts_with("multipart/form-data") {
        return Err(FormError::Malformed(
            "Expected a multipart/form-data body.".to_string(),
        ));
    }
    let mut mp = Multipart::from_request(req, &())
        .await
        .map_err(|e| FormError::Malformed(format!("Invalid multipart body: {}", e.body_text())))?;
    let mut form = Form::default();
    loop {
        let field = match mp.next_field().await {
            Ok(Some(f)) => f,
            Ok(None) => break,
            Err(e) => return Err(multipart_error(e)),
        };
        let name = field.name().unwrap_or("").to_string();
        let filename = field.file_name().map(str::to_string);
        let bytes = field.bytes().await.map_err(multipart_error)?;
        if name.is_empty() {
            continue;
        }
        if filename.is_some() || file_fields.contains(&name.as_str()) {
            form.fields.remove(&name);
            form.files.insert(name, FilePart { filename, bytes });
        } else {
            match String::from_utf8(bytes.to_vec()) {
                Ok(s) => {
                    form.not_utf8.remove(&name);
                    form.fields.insert(name, s);
                }
                Err(_) => {
                    form.fields.remove(&name);
                    form.not_utf8.insert(name);
                }
            }
        }
    }
    Ok(form)
}

fn multipart_error(e: axum::extract::multipart::MultipartError) -> FormError {
    if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
        FormError::TooLarge
    } else {
        FormError::Malformed(format!("Invalid multipart body: {}", e.body_text()))
    }
}

/// Read a form sent either as multipart or as `application/x-www-form-urlencoded`.
pub(crate) async fn read_any_form(req: Request, limit: usize) -> Result<Form, FormError> {
    let ct = content_type(&req);
    if ct.starts_with("multipart/form-data") {
        return read_multipart(req, &[]).await;
    }
    if !ct.starts_with("application/x-www-form-urlencoded") {
        return Err(FormError::Malformed(
            "Expected a multipart/form-data or application/x-www-form-urlencoded body.".to_string(),
        ));
    }
    let bytes = read_body(req, limit).await?;
    let mut form = Form::default();
    for (k, v) in url::form_urlencoded::parse(&bytes) {
        form.fields.insert(k.into_owned(), v.into_owned());
    }
    Ok(form)
}

/// Read a whole body up to `limit` bytes.
pub(crate) async fn read_body(req: Request, limit: usize) -> Result<Bytes, FormError> {
    use futures_util::StreamExt;
    let mut stream = req.into_body().into_data_stream();
    let mut buf = Vec::new();
    while let Some(chunk) = stream.next().await {
        let chunk = chunk
            .map_err(|e| FormError::Malformed(format!("could not read the request body: {e}")))?;
        if buf.len() + chunk.len() > limit {
            return Err(FormError::TooLarge);
        }
        buf.extend_from_slice(&chunk);
    }
    Ok(Bytes::from(buf))
}

/// Parse helpers shared by the providers' validators.
pub(crate) mod parse {
    /// A whole number in `min..=max`. Leading/trailing spaces are allowed, nothing else.
    pub(crate) fn int_in(v: &str, min: i64, max: i64) -> Option<i64> {
        let n: i64 = v.trim().parse().ok()?;
        (min..=max).contains(&n).then_some(n)
    }

    /// A finite decimal in `min..=max`.
    pub(crate) fn dec_in(v: &str, min: f64, max: f64) -> Option<f64> {
        let n: f64 = v.trim().parse().ok()?;
        (n.is_finite() && n >= min && n <= max).then_some(n)
    }

    /// `true`/`false` in any case, or `1`/`0`.
    pub(crate) fn boolean(v: &str) -> Option<bool> {
        match v.trim().to_ascii_lowercase().as_str() {
            "true" | "1" => Some(true),
            "false" | "0" => Some(false),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::parse::*;

    #[test]
    fn parsers_are_strict() {
        assert_eq!(int_in(" 12 ", 1, 32000), Some(12));
        assert_eq!(int_in("12.0", 1, 32000), None);
        assert_eq!(int_in("0", 1, 32000), None);
        assert_eq!(int_in("32001", 1, 32000), None);
        assert_eq!(int_in("", 1, 32000), None);
        assert_eq!(dec_in("0.5", 0.0, 1.0), Some(0.5));
        assert_eq!(dec_in("NaN", 0.0, 1.0), None);
        assert_eq!(dec_in("1.01", 0.0, 1.0), None);
        assert_eq!(boolean("True"), Some(true));
        assert_eq!(boolean("0"), Some(false));
        assert_eq!(boolean("yes"), None);
    }
}
