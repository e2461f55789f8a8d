//! Presigned URLs, as the providers' storage hands them out (Topaz's downloads,
//! Perfect's uploads and results, Dzine's CDN): `?expires=<unix ms>&sig=<hex>`, the
//! signature a keyed SHA-256 over what the URL may do, so a client cannot forge or
//! stretch one, and S3-like XML refusals when it is wrong or late.

use axum::body::Bytes;
use axum::extract::Request;
use axum::http::StatusCode;
use sha2::{Digest, Sha256};

use super::{header_str, unix_ms, Reply, Shared};

/// The signature of a URL of `scope` (the provider's storage) allowing `what` (a
/// method, a slot …) on `id` until `expires_ms`.
pub(crate) fn signature(s: &Shared, scope: &str, what: &str, id: &str, expires_ms: u64) -> String {
    hex::encode(
        Sha256::new()
            .chain_update(s.secret)
            .chain_update(scope.as_bytes())
            .chain_update(b"\n")
            .chain_update(what.as_bytes())
            .chain_update(b"\n")
            .chain_update(id.as_bytes())
            .chain_update(b"\n")
            .chain_update(expires_ms.to_string().as_bytes())
            .finalize(),
    )
}

/// Checks `expires` and `sig` of a presigned URL; the S3-like refusal otherwise.
pub(crate) fn check(
    s: &Shared,
    req: &Request,
    scope: &str,
    what: &str,
    id: &str,
) -> Result<(), Reply> {
    let mut expires = None;
    let mut sig = None;
    for (k, v) in url::form_urlencoded::parse(req.uri().query().unwrap_or("").as_bytes()) {
        match k.as_ref() {
            "expires" => expires = v.parse::<u64>().ok(),
            "sig" => sig = Some(v.into_owned()),
            _ => {}
        }
    }
    let (Some(expires), Some(sig)) = (expires, sig) else {
        return Err(xml_err(
            StatusCode::FORBIDDEN,
            "AccessDenied",
            "Query-string authentication requires the expires and sig parameters",
        ));
    };
    if sig != signature(s, scope, what, id, expires) {
        return Err(xml_err(
            StatusCode::FORBIDDEN,
            "SignatureDoesNotMatch",
            "The request signature we calculated does not match the signature you provided.",
        ));
    }
    if unix_ms() > expires {
        return Err(xml_err(
            StatusCode::FORBIDDEN,
            "AccessDenied",
            "Request has expired",
        ));
    }
    Ok(())
}

/// An S3-style XML error, as object storage answers.
pub(crate) fn xml_err(status: StatusCode, code: &str, message: &str) -> Reply {
    let body = format!(
        "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<Error><Code>{code}</Code><Message>{message}</Message></Error>"
    );
    Reply::bytes(status, "application/xml", Bytes::from(body))
}

/// `Host` of the request if it looks like one, else the listening address: where
/// the URLs handed out should point.
pub(crate) fn public_host(s: &Shared, req: &Request) -> String {
    header_str(req.headers(), "host")
        .filter(|h| {
            !h.is_empty()
                && h.len() <= 255
                && h.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b".-:[]".contains(&b))
        })
        .map_or_else(|| s.local_addr.to_string(), str::to_string)
}
