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
pub use crate::config::ProviderConfig;
use crate::model::{JobSpec, PendingOutput, ProviderKind};

pub mod aithriving;
pub mod dzine;
pub mod perfect;
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
    /// Which submission of the job this is (1 for the first; the `n` of the
    /// submit key). Providers with a numeric idempotency field (Perfect's
    /// `request_id`) derive it from this: the same number on every retry of one
    /// submission, a new one when the job must be submitted again.
    pub submission: u32,
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
    /// `charged`: the task may have been billed (it may have finished before it was
    /// forgotten), so a new submission may charge twice and is recorded as such.
    Lost {
        reason: String,
        charged: bool,
    },
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

/// What one call of [`Provider::prepare`] did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Prepared {
    /// Refs to record on the job (uploaded file ids, detected faces …). A ref with a
    /// key already recorded replaces it.
    pub refs: Vec<(String, String)>,
    /// `false`: more stages remain; the engine makes these refs durable and calls
    /// `prepare` again with them, so a crash never repeats a finished stage.
    pub done: bool,
}

impl Prepared {
    /// The last (or only) stage.
    pub fn done(refs: Vec<(String, String)>) -> Self {
        Prepared { refs, done: true }
    }

    /// A stage after which more remain.
    pub fn more(refs: Vec<(String, String)>) -> Self {
        Prepared { refs, done: false }
    }
}

/// What `pixbatch styles` asks a provider for.
#[derive(Debug, Clone, Default)]
pub struct StyleQuery {
    /// The feature or operation whose styles are wanted (Perfect: `hair-style` …).
    pub feature: Option<String>,
    /// A style group to list the styles of (Perfect); without it, the groups.
    pub group: Option<String>,
    /// Dzine's base model filter (`S` or `X`).
    pub base_model: Option<String>,
    /// Stop after this many entries (all pages are fetched otherwise).
    pub limit: Option<usize>,
}

/// One line of a style listing.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct StyleEntry {
    /// `group` or `style`.
    pub kind: &'static str,
    /// The id or code to put in a manifest's params, exactly as the provider gave it
    /// (ids above 2^53 stay exact: they are kept as text).
    pub id: String,
    pub title: String,
    /// Anything else worth showing (base model, thumbnail URL, group id …).
    pub detail: Vec<(String, String)>,
}

/// An account's remaining credit.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Balance {
    pub amount: f64,
    /// What the amount counts (`tokens`, `credits` …).
    pub unit: String,
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

    /// Uploads inputs or does other unpaid preparation, one stage per call; returns
    /// refs to record. Called with the refs recorded so far (empty on the first
    /// call), so a resumed job does not redo finished stages.
    async fn prepare(&self, _api: &Api, _job: &JobContext<'_>) -> Result<Prepared, ProviderError> {
        Ok(Prepared::done(Vec::new()))
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

    /// How long after a submission was sent a poll's `PollOutcome::Lost` is taken as
    /// "accepted, not visible yet" and polled again (live APIs answer "no such task"
    /// for a while after creation: Perfect's `InvalidTaskId`, Dzine's 404;
    /// docs/providers.md, "live evidence"). The engine counts it from the submission
    /// time recorded in the job, so a restart mid-window keeps what is left of it.
    /// `None`: a lost task is lost at once. `early_not_found` in the config overrides.
    fn early_not_found(&self) -> Option<Duration> {
        None
    }

    /// How long an accepted task may go unpolled before the provider drops it
    /// (Perfect: 10 s). The engine then never lets a poll come later than this and
    /// admits a new submission only while the rate limits leave room for the polls
    /// of every task in flight.
    fn keep_alive(&self) -> Option<Duration> {
        None
    }

    /// Lists the styles (or style groups) users can name in a manifest.
    async fn styles(
        &self,
        _api: &Api,
        _query: &StyleQuery,
    ) -> Result<Vec<StyleEntry>, ProviderError> {
        Err(ProviderError::permanent(format!(
            "{} has no style list",
            self.kind()
        )))
    }

    /// The account's remaining credit, where the provider's API tells it.
    async fn balance(&self, _api: &Api) -> Result<Option<Balance>, ProviderError> {
        Ok(None)
    }

    /// Whether [`Provider::estimate_cost`] asks the provider (Topaz's `/estimate`).
    fn can_estimate(&self) -> bool {
        false
    }

    /// What `spec` would cost, in [`cost_unit`], as the provider estimates it (one
    /// request; `Ok(None)` when the provider cannot tell).
    async fn estimate_cost(
        &self,
        _api: &Api,
        _spec: &JobSpec,
    ) -> Result<Option<f64>, ProviderError> {
        Ok(None)
    }

    /// The cheapest request that proves the base URL and the credentials work
    /// (`pixbatch doctor`): an auth call, a balance or a status list. Says what it saw.
    async fn check_access(&self, api: &Api) -> Result<String, ProviderError> {
        self.authenticate(api).await?;
        Ok("credentials present (no request made)".into())
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

/// Builds the adapter for `config.kind`, or says why it cannot (missing
/// credentials). Adapters read only what is theirs: credentials and, for Perfect,
/// the operation → slug overrides.
pub fn build(config: &ProviderConfig) -> Result<Arc<dyn Provider>, String> {
    let kind = config.kind;
    let credentials = &config.credentials;
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
        ProviderKind::Perfect => perfect::build(config),
        ProviderKind::Dzine => dzine::build(config),
    }
}

/// Checks a job against its provider's documented limits before any request is made.
/// Returns every problem found (empty when the job is valid).
pub fn validate(spec: &JobSpec) -> Vec<String> {
    check(spec).errors
}

/// What a provider's manifest check found for one row.
///
/// `errors` refuse the row: a value the provider documents as wrong (out of range,
/// wrong format, too large). `warnings` let it pass: a model or parameter pixbatch
/// does not know, which the live API may well accept (providers add models faster
/// than pixbatch is released). `strict_params = true` for the provider turns the
/// warnings into errors ([`Findings::strict`]).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Findings {
    pub errors: Vec<String>,
    pub warnings: Vec<String>,
}

impl Findings {
    pub fn errors(errors: Vec<String>) -> Findings {
        Findings {
            errors,
            warnings: Vec::new(),
        }
    }

    /// The warnings become errors, each saying why it is one now.
    pub fn strict(mut self, kind: ProviderKind) -> Findings {
        for w in std::mem::take(&mut self.warnings) {
            self.errors
                .push(format!("{w} (refused: strict_params = true for {kind})"));
        }
        self
    }
}

/// Checks a job against its provider's documented limits before any request, with
/// the warnings kept apart (see [`Findings`]). Providers without warnings yet report
/// their [`validate`] errors only.
pub fn check(spec: &JobSpec) -> Findings {
    match spec.provider {
        ProviderKind::Topaz => topaz::check(spec),
        ProviderKind::Photio => Findings::errors(photio::validate(spec)),
        ProviderKind::Aithriving => Findings::errors(aithriving::validate(spec)),
        ProviderKind::Perfect => Findings::errors(perfect::validate(spec)),
        ProviderKind::Dzine => Findings::errors(dzine::validate(spec)),
    }
}

/// How many rate-limited requests a job typically needs, for `validate`'s plan.
pub fn requests_per_job(spec: &JobSpec) -> u32 {
    match spec.provider {
        ProviderKind::Topaz => topaz::requests_per_job(spec),
        ProviderKind::Photio | ProviderKind::Aithriving => 1,
        ProviderKind::Perfect => perfect::requests_per_job(spec),
        ProviderKind::Dzine => dzine::requests_per_job(spec),
    }
}

/// What a provider's prices count (`pixbatch validate`, `--max-credits`).
pub fn cost_unit(kind: ProviderKind) -> &'static str {
    match kind {
        ProviderKind::Dzine => "tokens",
        _ => "credits",
    }
}

/// The most a job can cost by its provider's document, where the document says so
/// and no API tells (AIThriving: "0.4-2 credits per successful result").
/// What a job costs by the provider's published price tables, exactly, with no
/// request (Topaz: credits per output megapixel). `None` where no table settles it.
pub fn table_cost(spec: &JobSpec) -> Option<f64> {
    match spec.provider {
        ProviderKind::Topaz => topaz::table_credits(spec),
        _ => None,
    }
}

pub fn documented_max_cost(spec: &JobSpec) -> Option<f64> {
    match spec.provider {
        ProviderKind::Aithriving => Some(aithriving::MAX_CREDITS_PER_RESULT),
        _ => None,
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

/// For the adapters' own tests: an in-process simulator with no rate limits and an
/// unlimited `Api` at `kind`'s path on it.
#[cfg(test)]
pub(crate) async fn sim_api(
    kind: ProviderKind,
    task_duration: Duration,
) -> (crate::sim::SimHandle, Api) {
    let sim = crate::sim::spawn(crate::sim::SimConfig {
        task_duration,
        limits: Default::default(),
        ..Default::default()
    })
    .await
    .expect("sim");
    let api = Api::new(
        &format!("{}{}", sim.base_url(), sim_base_path(kind)),
        reqwest::Client::new(),
        Arc::new(crate::api::OpenGate),
    );
    (sim, api)
}
