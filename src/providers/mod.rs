//! The provider adapters, one module per provider, all behind [`Provider`].
//!
//! An adapter knows its provider's paths, headers, JSON shapes, limits and errors. It
//! does not know about the store, the scheduler or the CLI: the engine hands it a
//! [`JobContext`] (what the job asks for and what earlier steps recorded) and an
//! [`Api`] (the rate-limited door to the provider's host), and acts on what the
//! adapter returns. Every step is one call, so the engine can make its outcome durable
//! before the next step depends on it.
//!
//! How the five providers map onto the steps is tabled in `docs/ARCHITECTURE.md`.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;

pub use crate::api::{Api, ProviderError, RequestKind};
use crate::model::{JobSpec, PendingOutput, ProviderKind};

pub mod aithriving;
pub mod photio;
pub mod topaz;
pub mod util;

/// What an adapter may read of a job.
#[derive(Debug, Clone)]
pub struct JobContext<'a> {
    pub spec: &'a JobSpec,
    /// The idempotency key of the current submission (`<job id>~<n>`), recorded before
    /// the submission is sent. Send it as `X-Request-Id`; providers with their own
    /// idempotency field derive it from this.
    pub submit_key: String,
    /// Refs recorded by `prepare` (uploaded file ids …).
    pub prepared: &'a [(String, String)],
}

impl JobContext<'_> {
    pub fn prepared_get(&self, key: &str) -> Option<&str> {
        self.prepared
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }
}

/// One result of a synchronous provider, or a pointer to one.
#[derive(Debug, Clone)]
pub enum OutputData {
    /// The result's bytes were in the answer (base64 or binary). Written to its file
    /// at once: such bytes are never kept in the database.
    Bytes { data: bytes::Bytes, ext: String },
    /// To be fetched.
    Pending(PendingOutput),
}

#[derive(Debug, Clone)]
pub enum SubmitOutcome {
    /// The provider accepted an asynchronous task.
    Accepted {
        remote_id: String,
        /// When to look first, if the provider says (else the configured poll interval).
        first_poll_after: Option<Duration>,
    },
    /// A synchronous provider answered with the results.
    Finished {
        remote_id: Option<String>,
        outputs: Vec<OutputData>,
    },
}

#[derive(Debug, Clone)]
pub enum PollOutcome {
    Running {
        next_poll: Option<Duration>,
    },
    Succeeded(Vec<PendingOutput>),
    /// The provider says the task failed; `permanent` when trying again cannot help.
    Failed {
        reason: String,
        permanent: bool,
    },
    /// The provider no longer knows the task (expired, dropped for lack of polls).
    Lost(String),
    /// Someone cancelled the task at the provider.
    Cancelled,
}

/// What the provider says about a submission whose answer was lost.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reconciliation {
    /// It was accepted: this is its remote task. Poll it; do not submit again.
    Found { remote_id: String },
    /// The provider can tell it never arrived: submitting again is safe.
    NotSubmitted,
    /// The provider offers no way to know. Submitting again may charge twice.
    Unknowable,
}

/// A provider's API, in the steps every provider can be mapped onto.
///
/// Default methods describe a provider without that step (no auth round trip, no
/// uploads, synchronous, no reconciliation, no cancel, nothing to clean up).
#[async_trait]
pub trait Provider: Send + Sync {
    fn kind(&self) -> ProviderKind;

    /// Obtains or checks credentials. Called once before the first request of a run;
    /// adapters with expiring tokens also renew them inside other calls.
    async fn authenticate(&self, _api: &Api) -> Result<(), ProviderError> {
        Ok(())
    }

    /// Uploads inputs or does other unpaid preparation; returns refs to record.
    /// Called with the refs recorded so far (empty on the first call), so a resumed
    /// job does not redo finished stages.
    async fn prepare(
        &self,
        _api: &Api,
        _job: &JobContext<'_>,
    ) -> Result<Vec<(String, String)>, ProviderError> {
        Ok(Vec::new())
    }

    /// The paid request.
    async fn submit(&self, api: &Api, job: &JobContext<'_>)
        -> Result<SubmitOutcome, ProviderError>;

    /// The state of an accepted task.
    async fn poll(
        &self,
        _api: &Api,
        _job: &JobContext<'_>,
        _remote_id: &str,
    ) -> Result<PollOutcome, ProviderError> {
        Err(ProviderError::permanent(format!(
            "{} has no asynchronous tasks",
            self.kind()
        )))
    }

    /// Turns `PendingOutput::Provider { key }` into a URL to download now.
    async fn output_url(
        &self,
        _api: &Api,
        _remote_id: &str,
        key: &str,
    ) -> Result<String, ProviderError> {
        Err(ProviderError::permanent(format!(
            "{} cannot resolve output {key}",
            self.kind()
        )))
    }

    /// Settles a submission whose answer was lost (`job.submit_key` is the one sent).
    async fn reconcile(
        &self,
        _api: &Api,
        _job: &JobContext<'_>,
    ) -> Result<Reconciliation, ProviderError> {
        Ok(Reconciliation::Unknowable)
    }

    /// Cancels a remote task; `Ok(false)` when the provider has no way to.
    async fn cancel(&self, _api: &Api, _remote_id: &str) -> Result<bool, ProviderError> {
        Ok(false)
    }

    /// Housekeeping once the job's outputs are durably in place (e.g. delete the
    /// remote status). Failures are logged, never fail the job.
    async fn cleanup(&self, _api: &Api, _remote_id: &str) -> Result<(), ProviderError> {
        Ok(())
    }
}

/// Credentials for one provider, from the environment or the config file. Never
/// written to the database, logs or reports (`Debug` redacts them).
#[derive(Clone, Default)]
pub struct Credentials {
    pub api_key: Option<String>,
    pub client_id: Option<String>,
    pub client_secret: Option<String>,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let r = |o: &Option<String>| if o.is_some() { "<redacted>" } else { "<unset>" };
        f.debug_struct("Credentials")
            .field("api_key", &r(&self.api_key))
            .field("client_id", &r(&self.client_id))
            .field("client_secret", &r(&self.client_secret))
            .finish()
    }
}

impl Credentials {
    /// Every secret value, so logs and error texts can be scrubbed of them.
    pub fn secrets(&self) -> Vec<String> {
        [&self.api_key, &self.client_id, &self.client_secret]
            .into_iter()
            .flatten()
            .filter(|s| s.len() >= 4)
            .cloned()
            .collect()
    }
}

/// Builds the adapter for `kind`, or says why it cannot (missing credentials, or a
/// provider this version does not implement yet).
pub fn build(kind: ProviderKind, credentials: &Credentials) -> Result<Arc<dyn Provider>, String> {
    let need_key = |var: &str| {
        credentials
            .api_key
            .clone()
            .filter(|k| !k.trim().is_empty())
            .ok_or_else(|| format!("{kind}: no API key (set {var} or [providers.{kind}] api_key in the config file)"))
    };
    match kind {
        ProviderKind::Topaz => Ok(Arc::new(topaz::Topaz::new(need_key("TOPAZ_API_KEY")?))),
        ProviderKind::Photio => Ok(Arc::new(photio::Photio::new(need_key("PHOTIO_API_KEY")?))),
        ProviderKind::Aithriving => Ok(Arc::new(aithriving::Aithriving::new(need_key(
            "AITHRIVING_API_KEY",
        )?))),
        ProviderKind::Dzine | ProviderKind::Perfect => Err(not_yet(kind)),
    }
}

fn not_yet(kind: ProviderKind) -> String {
    format!("{kind}: this version of pixbatch does not implement the {kind} provider yet")
}

/// Checks a job against its provider's documented limits before any request is made.
/// Returns every problem found (empty when the job is valid).
pub fn validate(spec: &JobSpec) -> Vec<String> {
    match spec.provider {
        ProviderKind::Topaz => topaz::validate(spec),
        ProviderKind::Photio => photio::validate(spec),
        ProviderKind::Aithriving => aithriving::validate(spec),
        ProviderKind::Dzine | ProviderKind::Perfect => vec![not_yet(spec.provider)],
    }
}

/// How many rate-limited requests a job typically needs, for `validate`'s plan.
pub fn requests_per_job(spec: &JobSpec) -> u32 {
    match spec.provider {
        ProviderKind::Topaz => topaz::requests_per_job(spec),
        ProviderKind::Photio | ProviderKind::Aithriving => 1,
        ProviderKind::Dzine | ProviderKind::Perfect => 0,
    }
}

/// The documented production base URL of each provider.
pub fn default_base_url(kind: ProviderKind) -> &'static str {
    match kind {
        ProviderKind::Dzine => "https://papi.dzine.ai/openapi/v1",
        ProviderKind::Perfect => "https://yce-api-01.makeupar.com",
        ProviderKind::Topaz => "https://api.topazlabs.com/image/v1",
        ProviderKind::Photio => "https://api.photio.io/v1",
        ProviderKind::Aithriving => "https://www.aithriving.com",
    }
}

/// The path prefix under which `pixbatch sim` serves each provider; with the
/// simulator at `http://127.0.0.1:PORT`, the base URL is that plus this.
pub fn sim_base_path(kind: ProviderKind) -> &'static str {
    match kind {
        ProviderKind::Dzine => "/dzine/openapi/v1",
        ProviderKind::Perfect => "/perfect",
        ProviderKind::Topaz => "/topaz/image/v1",
        ProviderKind::Photio => "/photio/v1",
        ProviderKind::Aithriving => "/aithriving",
    }
}
