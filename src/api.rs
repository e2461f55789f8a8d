//! The one door every provider request goes through.
//!
//! A provider adapter builds a `reqwest::RequestBuilder` and hands it to
//! [`Api::send`] with the request's [`RequestKind`]. `Api` asks the engine's
//! [`RequestGate`] for admission (rate limits, polls first), sends, and turns the
//! transport's answer into a [`ProviderError`] the engine can act on. The adapter never
//! sees the limiter, and the engine never sees a provider's URL or JSON.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use reqwest::{RequestBuilder, Response, StatusCode};

/// What a request is for. It decides its priority at the gate and how an unknown
/// outcome is treated.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RequestKind {
    /// Obtain or renew credentials.
    Auth,
    /// Upload an input / create a file slot (not charged).
    Upload,
    /// The paid request. Its outcome, when the answer is lost, is unknown: it goes to
    /// reconciliation, never to a blind retry.
    Submit,
    /// Ask for the state of an accepted task. Keeps tasks alive: goes first.
    Poll,
    /// Ask for a fresh download link of a finished task.
    Link,
    /// Housekeeping after a job is done (delete a status, cancel).
    Cleanup,
    /// Read-only queries (styles, balances, estimates, status lists).
    Query,
}

impl RequestKind {
    pub const ALL: [RequestKind; 7] = [
        RequestKind::Auth,
        RequestKind::Upload,
        RequestKind::Submit,
        RequestKind::Poll,
        RequestKind::Link,
        RequestKind::Cleanup,
        RequestKind::Query,
    ];

    /// The `kind` label of the request metrics.
    pub fn name(self) -> &'static str {
        match self {
            RequestKind::Auth => "auth",
            RequestKind::Upload => "upload",
            RequestKind::Submit => "submit",
            RequestKind::Poll => "poll",
            RequestKind::Link => "link",
            RequestKind::Cleanup => "cleanup",
            RequestKind::Query => "query",
        }
    }

    /// The position in [`RequestKind::ALL`].
    pub fn index(self) -> usize {
        self as usize
    }

    /// Requests that keep already-paid work moving go before new submissions.
    pub fn is_urgent(self) -> bool {
        matches!(
            self,
            RequestKind::Poll | RequestKind::Link | RequestKind::Cleanup
        )
    }
}

/// Admission control for one provider's API host, implemented by the engine.
#[async_trait]
pub trait RequestGate: Send + Sync {
    /// Waits until one more request of `kind` may go out without breaking any of the
    /// provider's rate limits, and counts it as sent.
    async fn admit(&self, kind: RequestKind);
    /// The provider said "too many requests": hold every request for `wait`.
    fn back_off(&self, wait: Duration);
    /// How a request ended: `healthy` when the provider answered (any status but
    /// 5xx), not when it failed with 5xx or no answer. Lets the engine tell a
    /// provider outage from a job's own trouble.
    fn answered(&self, _healthy: bool) {}
    /// A request got no answer at all (connect refused, DNS, timeout, reset); `why`
    /// names the host. Counts as an unhealthy answer for the outage breaker, and
    /// lets the engine halt a provider that stays unreachable.
    fn unanswered(&self, _why: &str) {
        self.answered(false);
    }
    /// The engine halted the provider: nothing more is sent.
    fn is_halted(&self) -> bool {
        false
    }
}

/// A gate that admits everything at once (for tools like `styles` and for tests).
pub struct OpenGate;

#[async_trait]
impl RequestGate for OpenGate {
    async fn admit(&self, _kind: RequestKind) {}
    fn back_off(&self, _wait: Duration) {}
}

/// How a request failed, in the terms the engine decides on.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ProviderError {
    /// The provider refused the job for good (bad parameter, NSFW, no face, auth,
    /// payment …). The job fails with this reason.
    #[error("{0}")]
    Permanent(String),
    /// The request did not take effect and may be tried again later.
    #[error("{reason}")]
    Transient {
        reason: String,
        /// The provider's `Retry-After`, if it gave one.
        retry_after: Option<Duration>,
        /// A 429: does not use up one of the job's attempts.
        rate_limited: bool,
    },
    /// A paid request was sent but its answer was lost: it may or may not have been
    /// accepted (and charged).
    #[error("outcome unknown: {0}")]
    Unknown(String),
    /// The provider no longer knows the remote task (expired, dropped).
    #[error("remote task lost: {0}")]
    Lost(String),
    /// The provider refused the credential (401/403, or its own "bad key" code). Not
    /// the job's fault and the same for every job: the engine halts the provider and
    /// keeps its jobs, with no attempt used, for a run with a fixed key.
    #[error("{0}")]
    Credential(String),
}

impl ProviderError {
    pub fn transient(reason: impl Into<String>) -> Self {
        ProviderError::Transient {
            reason: reason.into(),
            retry_after: None,
            rate_limited: false,
        }
    }

    pub fn permanent(reason: impl Into<String>) -> Self {
        ProviderError::Permanent(reason.into())
    }

    /// A refused credential; `reason` should name the variable to fix.
    pub fn credential(reason: impl Into<String>) -> Self {
        ProviderError::Credential(reason.into())
    }

    /// A malformed answer. For a submission it means the outcome is unknown (the
    /// provider may have accepted it); otherwise asking again is safe.
    pub fn bad_answer(kind: RequestKind, reason: impl Into<String>) -> Self {
        let reason = reason.into();
        if kind == RequestKind::Submit {
            ProviderError::Unknown(reason)
        } else {
            ProviderError::transient(reason)
        }
    }
}

/// The HTTP client for one provider: its base URL, a shared `reqwest::Client`, and
/// the engine's gate.
#[derive(Clone)]
pub struct Api {
    base_url: String,
    client: reqwest::Client,
    gate: Arc<dyn RequestGate>,
    /// The run's counters for this provider (none outside a run).
    metrics: Option<Arc<crate::metrics::ProviderMetrics>>,
}

impl Api {
    pub fn new(base_url: &str, client: reqwest::Client, gate: Arc<dyn RequestGate>) -> Api {
        Api {
            base_url: base_url.trim_end_matches('/').to_string(),
            client,
            gate,
            metrics: None,
        }
    }

    /// Counts this provider's requests, statuses and gate waits into `metrics`.
    pub fn with_metrics(mut self, metrics: Arc<crate::metrics::ProviderMetrics>) -> Api {
        self.metrics = Some(metrics);
        self
    }

    /// `base_url` joined with `path` (which starts with `/`).
    pub fn url(&self, path: &str) -> String {
        format!("{}{}", self.base_url, path)
    }

    pub fn base_url(&self) -> &str {
        &self.base_url
    }

    /// For providers that say "too many requests" inside a 200 answer (an error code
    /// in the body): holds every request to the host, as an HTTP 429 does, and slows
    /// an adaptive gate. The adapter still returns a rate-limited `Transient`.
    pub fn slow_down(&self, retry_after: Option<Duration>) {
        if let Some(m) = &self.metrics {
            m.rate_limited();
        }
        self.gate
            .back_off(retry_after.unwrap_or(Duration::from_secs(1)));
    }

    /// The client, for requests that do not go to the provider's API host (presigned
    /// uploads and downloads) and so are not rate limited.
    pub fn client(&self) -> &reqwest::Client {
        &self.client
    }

    /// Admits, sends and classifies one request to the provider's API host.
    ///
    /// Returns the response for any status below 400 and for 4xx answers other than
    /// 429 (the adapter reads the provider's own error body). 429 and 5xx become
    /// `Transient`; transport failures become `Transient`, or `Unknown` for a
    /// submission that may have reached the provider.
    pub async fn send(
        &self,
        kind: RequestKind,
        request: RequestBuilder,
    ) -> Result<Response, ProviderError> {
        {
            let _waiting = self.metrics.as_deref().map(|m| m.waiting());
            self.gate.admit(kind).await;
        }
        if self.gate.is_halted() {
            // Definitely not sent: safe for a submission to keep its key.
            return Err(ProviderError::transient(
                "not sent: the provider was halted (see the run's message)",
            ));
        }
        let response = match request.send().await {
            Ok(r) => r,
            Err(e) => {
                if let Some(m) = &self.metrics {
                    m.request(kind, None);
                }
                let error = classify_transport_error(kind, &e);
                self.gate.unanswered(&error.to_string());
                return Err(error);
            }
        };
        let status = response.status();
        if let Some(m) = &self.metrics {
            m.request(kind, Some(status.as_u16()));
            if status == StatusCode::TOO_MANY_REQUESTS {
                m.rate_limited();
            }
        }
        self.gate.answered(!status.is_server_error());
        if status == StatusCode::TOO_MANY_REQUESTS {
            let retry_after = retry_after(&response);
            // Every request to this host waits, not only this job's: the limit is the
            // host's. Without a Retry-After a short pause still spreads the herd.
            self.gate
                .back_off(retry_after.unwrap_or(Duration::from_secs(1)));
            return Err(ProviderError::Transient {
                reason: format!("HTTP 429 Too Many Requests{}", body_excerpt(response).await),
                retry_after,
                rate_limited: true,
            });
        }
        if status.is_server_error() {
            let retry_after = retry_after(&response);
            let gateway = matches!(status.as_u16(), 502 | 504);
            let reason = format!("HTTP {}{}", status, body_excerpt(response).await);
            // A gateway error may hide a request the backend did accept.
            if kind == RequestKind::Submit && gateway {
                return Err(ProviderError::Unknown(reason));
            }
            return Err(ProviderError::Transient {
                reason,
                retry_after,
                rate_limited: false,
            });
        }
        Ok(response)
    }

    /// Reads a whole (small) answer body, mapping a broken body to the error its
    /// request kind implies.
    pub async fn read_bytes(
        kind: RequestKind,
        response: Response,
        limit: u64,
    ) -> Result<bytes::Bytes, ProviderError> {
        if let Some(len) = response.content_length() {
            if len > limit {
                return Err(ProviderError::bad_answer(
                    kind,
                    format!("answer of {len} bytes is larger than the {limit}-byte limit"),
                ));
            }
        }
        let mut out = Vec::new();
        let mut stream = response.bytes_stream();
        use futures_util::StreamExt;
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.map_err(|e| {
                ProviderError::bad_answer(kind, format!("answer cut off: {}", error_chain(&e)))
            })?;
            if out.len() as u64 + chunk.len() as u64 > limit {
                return Err(ProviderError::bad_answer(
                    kind,
                    format!("answer larger than the {limit}-byte limit"),
                ));
            }
            out.extend_from_slice(&chunk);
        }
        Ok(out.into())
    }

    /// Reads and parses a JSON answer (at most `limit` bytes).
    pub async fn read_json<T: serde::de::DeserializeOwned>(
        kind: RequestKind,
        response: Response,
        limit: u64,
    ) -> Result<T, ProviderError> {
        let status = response.status();
        let body = Self::read_bytes(kind, response, limit).await?;
        serde_json::from_slice(&body).map_err(|e| {
            ProviderError::bad_answer(
                kind,
                format!("unexpected answer (HTTP {status}): {e}: {}", excerpt(&body)),
            )
        })
    }
}

/// The largest JSON answer any adapter reads into memory (base64 images included).
pub const MAX_JSON_ANSWER: u64 = 256 * 1024 * 1024;

fn classify_transport_error(kind: RequestKind, e: &reqwest::Error) -> ProviderError {
    let reason = error_chain(e);
    // A connect error means nothing reached the provider: safe to send again. Said
    // as such, with the host and port: "the provider looks down" alone does not tell
    // a wrong base URL from an outage.
    if e.is_connect() {
        return ProviderError::transient(format!(
            "request failed: cannot connect to {}: {}",
            e.url()
                .map(host_port)
                .unwrap_or_else(|| "the provider".into()),
            connect_cause(&reason)
        ));
    }
    if kind != RequestKind::Submit {
        ProviderError::transient(format!("request failed: {reason}"))
    } else {
        ProviderError::Unknown(format!("request failed after it was sent: {reason}"))
    }
}

/// `host:port` of a URL (the scheme's port when it names none).
pub fn host_port(url: &reqwest::Url) -> String {
    let host = url.host_str().unwrap_or("?");
    match url.port_or_known_default() {
        Some(p) => format!("{host}:{p}"),
        None => host.to_string(),
    }
}

/// The cause of a connect error in a few words, then the chain for the curious.
fn connect_cause(chain: &str) -> String {
    let lower = chain.to_ascii_lowercase();
    let short = if lower.contains("connection refused") {
        "connection refused"
    } else if lower.contains("dns error") || lower.contains("failed to lookup") {
        "the host name does not resolve"
    } else if lower.contains("timed out") || lower.contains("timeout") {
        "connect timed out"
    } else if lower.contains("unreachable") {
        "network unreachable"
    } else {
        return chain.to_string();
    };
    // The URL reqwest puts in front is left out: the host and port say it.
    let tail = chain
        .rsplit(": ")
        .next()
        .filter(|t| !t.eq_ignore_ascii_case(short))
        .map(|t| format!(" ({t})"))
        .unwrap_or_default();
    format!("{short}{tail}")
}

/// The error and its sources, joined: reqwest's top-level message alone says little.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut source = e.source();
    while let Some(inner) = source {
        let text = inner.to_string();
        if !s.contains(&text) {
            s.push_str(": ");
            s.push_str(&text);
        }
        source = inner.source();
    }
    s
}

/// `Retry-After` in either of its forms: delta-seconds or an HTTP date.
pub fn retry_after(response: &Response) -> Option<Duration> {
    let value = response
        .headers()
        .get(reqwest::header::RETRY_AFTER)?
        .to_str()
        .ok()?;
    parse_retry_after(value, std::time::SystemTime::now())
}

pub fn parse_retry_after(value: &str, now: std::time::SystemTime) -> Option<Duration> {
    let value = value.trim();
    if let Ok(secs) = value.parse::<u64>() {
        return Some(Duration::from_secs(secs.min(24 * 3600)));
    }
    if let Ok(secs) = value.parse::<f64>() {
        if secs.is_finite() && secs >= 0.0 {
            return Some(Duration::from_secs_f64(secs.min(24.0 * 3600.0)));
        }
    }
    let when = httpdate::parse_http_date(value).ok()?;
    Some(when.duration_since(now).unwrap_or(Duration::ZERO))
}

async fn body_excerpt(response: Response) -> String {
    match tokio::time::timeout(Duration::from_secs(5), response.bytes()).await {
        Ok(Ok(b)) if !b.is_empty() => format!(": {}", excerpt(&b)),
        _ => String::new(),
    }
}

/// The first 300 characters of a body, printable, for error messages.
pub fn excerpt(body: &[u8]) -> String {
    let text = String::from_utf8_lossy(body);
    let mut s: String = text
        .chars()
        .filter(|c| !c.is_control() || *c == ' ')
        .take(300)
        .collect();
    if text.chars().count() > 300 {
        s.push('…');
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::SystemTime;

    #[test]
    fn retry_after_takes_seconds_and_http_dates() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000_000);
        assert_eq!(parse_retry_after("7", now), Some(Duration::from_secs(7)));
        assert_eq!(parse_retry_after(" 0 ", now), Some(Duration::ZERO));
        let later = httpdate::fmt_http_date(now + Duration::from_secs(30));
        assert_eq!(
            parse_retry_after(&later, now),
            Some(Duration::from_secs(30))
        );
        let earlier = httpdate::fmt_http_date(now - Duration::from_secs(30));
        assert_eq!(parse_retry_after(&earlier, now), Some(Duration::ZERO));
        assert_eq!(parse_retry_after("soon", now), None);
        assert_eq!(parse_retry_after("-3", now), None);
    }

    #[test]
    fn a_garbled_submission_answer_is_an_unknown_outcome() {
        assert!(matches!(
            ProviderError::bad_answer(RequestKind::Submit, "x"),
            ProviderError::Unknown(_)
        ));
        assert!(matches!(
            ProviderError::bad_answer(RequestKind::Poll, "x"),
            ProviderError::Transient { .. }
        ));
    }
}
