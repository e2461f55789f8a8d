//! One step of one job: the state machine.
//!
//! ```text
//! queued ─▶ preparing ─▶ submitting ─▶ submitted ─▶ polling ─▶ downloading ─▶ done
//!   ▲           │            │  ▲          │           │            │
//!   └─retry-wait◀┴────────────┘  └reconcile │           │            │
//!                                          └───────────┴─▶ failed / cancelled
//! ```
//!
//! Each function loads nothing itself: it gets the job, talks to the provider
//! through the adapter, and writes the job's next version. The order of "write, make
//! durable, then act" is the point of this module:
//! - the intent to submit (`Submitting` + submit key) is durable before the paid
//!   request goes out;
//! - the remote id is written and synced as soon as it is known;
//! - `Done` is written only after every output file is renamed into place, and is
//!   durable before the provider's copy is deleted (`cleanup`).

use std::path::Path;
use std::time::Duration;

use crate::api::ProviderError;
use crate::download::{self, DownloadError};
use crate::engine::retry::backoff_delay;
use crate::engine::Lane;
use crate::model::{now_ms, EventKind, Job, JobEvent, JobState, OutputFile, PendingOutput};
use crate::providers::{JobContext, OutputData, PollOutcome, Reconciliation, SubmitOutcome};
use crate::store::{Store, StoreError};

/// What a step needs besides the job.
pub(crate) struct StepEnv<'a> {
    pub lane: &'a Lane,
    pub store: &'a Store,
    pub out_dir: &'a Path,
    pub max_download_bytes: u64,
    pub spend: &'a crate::engine::spend::SpendGate,
    /// Where a step that cannot go on (no space left) asks the run to stop.
    pub halt: &'a std::sync::Mutex<Option<String>>,
}

/// The disk is full: retrying only spins, so ask the run to stop with the reason.
fn halt_out_of_space(env: &StepEnv<'_>, job: &Job, error: &DownloadError) {
    let reason = format!(
        "job {}: the disk is full: {error}; free some space and run again: the next run carries on",
        job.id()
    );
    tracing::error!("{reason}");
    if let Ok(mut h) = env.halt.lock() {
        h.get_or_insert(reason);
    }
}

/// Which part of the life an error happened in: it decides where the job goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Prepare,
    Submit,
    Reconcile,
    Poll,
    Download,
}

/// More `prepare` stages than any provider has (Dzine's face swap has four).
const MAX_PREPARE_STAGES: usize = 16;

/// After an unknown outcome, ask the provider this soon.
const RECONCILE_AFTER: Duration = Duration::from_secs(1);

fn grace_ms(env: &StepEnv<'_>) -> u64 {
    env.lane.config.reconcile_grace.as_millis() as u64
}

/// Runs the next step of job `id`. Only store errors come back: everything the
/// provider or the network does is recorded on the job.
pub(crate) async fn run(env: &StepEnv<'_>, id: &str) -> Result<(), StoreError> {
    let Some(job) = env.store.get(id)? else {
        return Ok(());
    };
    match job.state {
        JobState::Queued | JobState::RetryWait | JobState::Preparing => {
            prepare_and_submit(env, job).await
        }
        JobState::Submitting => reconcile(env, job).await,
        JobState::Submitted | JobState::Polling => poll(env, job).await,
        JobState::Downloading => download(env, job).await,
        JobState::Done | JobState::Failed | JobState::Cancelled => Ok(()),
    }
}

fn context(job: &Job) -> JobContext<'_> {
    JobContext {
        spec: &job.spec,
        submit_key: job.submit_key(),
        submission: job.submissions.max(1),
        prepared: &job.prepared,
    }
}

fn event(
    env: &StepEnv<'_>,
    job: &Job,
    kind: EventKind,
    message: impl Into<String>,
) -> Result<(), StoreError> {
    let message = message.into();
    tracing::debug!(job = %job.id(), event = kind.name(), "{message}");
    env.store.add_event(
        job.id(),
        &JobEvent {
            at_ms: now_ms(),
            kind,
            message,
        },
    )
}

fn save(env: &StepEnv<'_>, job: &mut Job) -> Result<(), StoreError> {
    job.updated_ms = now_ms();
    if !job.outputs.is_empty() {
        // Where the files are, for `report` and `show` (which are not told `--out`).
        job.out_dir = Some(env.out_dir.to_string_lossy().into_owned());
    }
    env.store.save(job)
}

/// The record of an output just written at `rel`, with its pixel size read from
/// the file's header (reports show it; nothing is decoded).
fn output_file(env: &StepEnv<'_>, index: usize, rel: &Path, w: download::Written) -> OutputFile {
    let dims = crate::providers::util::dimensions_of_file(&env.out_dir.join(rel));
    OutputFile {
        index: index as u32,
        path: rel.to_string_lossy().into_owned(),
        size: w.size,
        sha256: w.sha256,
        width: dims.map(|d| d.0),
        height: dims.map(|d| d.1),
    }
}

async fn prepare_and_submit(env: &StepEnv<'_>, mut job: Job) -> Result<(), StoreError> {
    // The spend cap: a refused job stays as it is, for a later run.
    if !env.spend.admit(env.lane, env.store, &job).await? {
        return Ok(());
    }
    let now = now_ms();
    job.started_ms.get_or_insert(now);
    if job.submissions == 0 {
        job.submissions = 1;
    }
    // Saved with the first stage's refs, or with the intent to submit: a crash before
    // either leaves the job where it was, which repeats the same stage anyway (and a
    // save less per job for providers with nothing to prepare).
    job.state = JobState::Preparing;
    // Stage by stage: each stage's refs are durable before the next stage starts, so
    // a crash repeats at most the stage it interrupted. The bound only guards against
    // an adapter that never says it is done.
    for stage in 0.. {
        if stage == MAX_PREPARE_STAGES {
            return fail(env, job, "preparation did not finish (adapter bug)".into()).await;
        }
        match env
            .lane
            .adapter
            .prepare(&env.lane.api, &context(&job))
            .await
        {
            Ok(prepared) => {
                let changed = !prepared.refs.is_empty();
                for (k, v) in prepared.refs {
                    match job.prepared.iter_mut().find(|(key, _)| *key == k) {
                        Some(slot) => slot.1 = v,
                        None => job.prepared.push((k, v)),
                    }
                }
                if prepared.done {
                    break;
                }
                if changed {
                    save(env, &mut job)?;
                }
            }
            Err(e) => return on_error(env, job, e, Phase::Prepare).await,
        }
    }
    // The intent to submit, with its idempotency key, is durable before the paid
    // request goes out (SPEC §4.1). A crash from here on leads to `reconcile`.
    job.state = JobState::Submitting;
    job.submit_intent_ms = now_ms();
    job.due_ms = now_ms() + RECONCILE_AFTER.as_millis() as u64;
    save(env, &mut job)?;
    env.store.sync().await?;
    submit(env, job).await
}

async fn submit(env: &StepEnv<'_>, mut job: Job) -> Result<(), StoreError> {
    crate::failpoint::hit("after-submit-intent");
    let outcome = env.lane.adapter.submit(&env.lane.api, &context(&job)).await;
    if outcome.is_ok() {
        crate::failpoint::hit("after-submit-sent");
    }
    match outcome {
        Ok(SubmitOutcome::Accepted {
            remote_id,
            first_poll_after,
        }) => {
            event(
                env,
                &job,
                EventKind::Submitted,
                format!("accepted as {remote_id}"),
            )?;
            job.remote_id = Some(remote_id);
            job.state = JobState::Submitted;
            let wait = env
                .lane
                .poll_wait(first_poll_after.unwrap_or(env.lane.config.poll_interval));
            job.due_ms = now_ms() + wait.as_millis() as u64;
            save(env, &mut job)?;
            // The remote id is recorded as soon as it is known.
            env.store.sync().await
        }
        Ok(SubmitOutcome::Finished { remote_id, outputs }) => {
            event(
                env,
                &job,
                EventKind::Submitted,
                match &remote_id {
                    Some(r) => format!("answered at once ({r})"),
                    None => "answered at once".to_string(),
                },
            )?;
            job.remote_id = remote_id;
            job.pending_outputs.clear();
            job.outputs.clear();
            let count = outputs.len();
            let mut write_error = None;
            for (index, output) in outputs.into_iter().enumerate() {
                match output {
                    OutputData::Pending(p) => job.pending_outputs.push(p),
                    OutputData::Bytes { data, ext } => {
                        job.pending_outputs
                            .push(PendingOutput::Inline { ext: ext.clone() });
                        let rel = download::output_relative_path(&job.spec, index, count, &ext);
                        env.lane.metrics.downloaded(data.len() as u64);
                        let owner = download::Owner {
                            job: job.id(),
                            recorded: None,
                        };
                        match download::write_bytes(&env.out_dir.join(&rel), owner, &data) {
                            Ok(w) => job.outputs.push(output_file(env, index, &rel, w)),
                            Err(e) => {
                                write_error = Some(e);
                                break;
                            }
                        }
                    }
                }
            }
            if let Some(e) = write_error {
                if let DownloadError::Taken { .. } = e {
                    return refuse_taken(env, job, e).await;
                }
                if e.is_out_of_space() {
                    halt_out_of_space(env, &job, &e);
                }
                // The answer was paid for and is gone: only a new submission brings it back.
                return lose_remote(env, job, &format!("could not write the result: {e}"), true)
                    .await;
            }
            job.state = JobState::Downloading;
            job.due_ms = now_ms();
            save(env, &mut job)?;
            download(env, job).await
        }
        Err(e) => on_error(env, job, e, Phase::Submit).await,
    }
}

/// A submission's outcome is unknown (crash or lost answer): ask the provider.
async fn reconcile(env: &StepEnv<'_>, mut job: Job) -> Result<(), StoreError> {
    let answer = env
        .lane
        .adapter
        .reconcile(&env.lane.api, &context(&job))
        .await;
    match answer {
        Ok(Reconciliation::Found { remote_id }) => {
            event(
                env,
                &job,
                EventKind::Reconciled,
                format!(
                    "submission {} was accepted as {remote_id}; polling it",
                    job.submit_key()
                ),
            )?;
            job.remote_id = Some(remote_id);
            job.state = JobState::Submitted;
            job.due_ms = now_ms();
            save(env, &mut job)?;
            env.store.sync().await?;
            poll(env, job).await
        }
        Ok(Reconciliation::NotSubmitted) if now_ms() < job.submit_intent_ms + grace_ms(env) => {
            // Too soon to believe: a request sent just before a crash may still be
            // on its way. Ask again once the grace period is over.
            job.due_ms = job.submit_intent_ms + grace_ms(env);
            save(env, &mut job)
        }
        Ok(Reconciliation::NotSubmitted) => {
            job.submit_intent_ms = now_ms();
            event(
                env,
                &job,
                EventKind::Reconciled,
                format!(
                    "submission {} never arrived; sending it again",
                    job.submit_key()
                ),
            )?;
            // The new intent time is durable before the request: a run killed after
            // sending it must wait out the grace from this send, not the first one.
            save(env, &mut job)?;
            env.store.sync().await?;
            submit(env, job).await
        }
        Ok(Reconciliation::Unknowable) => {
            let old_key = job.submit_key();
            job.possible_duplicates += 1;
            job.submissions += 1;
            job.submit_intent_ms = now_ms();
            env.spend.note_resubmission(env.store, &job)?;
            event(
                env,
                &job,
                EventKind::PossibleDuplicate,
                format!(
                    "the outcome of submission {old_key} cannot be known from {}; submitting again as {} (the provider may charge twice)",
                    job.spec.provider,
                    job.submit_key()
                ),
            )?;
            save(env, &mut job)?;
            env.store.sync().await?;
            submit(env, job).await
        }
        Err(e) => on_error(env, job, e, Phase::Reconcile).await,
    }
}

async fn poll(env: &StepEnv<'_>, mut job: Job) -> Result<(), StoreError> {
    let Some(remote) = job.remote_id.clone() else {
        return lose_remote(env, job, "no remote id recorded", false).await;
    };
    let outcome = env
        .lane
        .adapter
        .poll(&env.lane.api, &context(&job), &remote)
        .await;
    let outcome = early_not_found(env, &job, outcome);
    if !matches!(outcome, Ok(PollOutcome::Running { .. }) | Err(_)) {
        env.lane.gate.task_left_polling();
    }
    match outcome {
        Ok(PollOutcome::Running { next_poll }) => {
            job.state = JobState::Polling;
            let wait = env
                .lane
                .poll_wait(next_poll.unwrap_or(env.lane.config.poll_interval));
            job.due_ms = now_ms() + wait.as_millis() as u64;
            save(env, &mut job)
        }
        Ok(PollOutcome::Succeeded(outputs)) => {
            if outputs.is_empty() {
                return fail(
                    env,
                    job,
                    "the provider reported success but returned no result".into(),
                )
                .await;
            }
            job.pending_outputs = outputs;
            job.state = JobState::Downloading;
            job.due_ms = now_ms();
            save(env, &mut job)?;
            download(env, job).await
        }
        Ok(PollOutcome::Failed {
            reason,
            permanent: true,
        }) => {
            let reason = format!("{} task {remote} failed: {reason}", job.spec.provider);
            fail(env, job, reason).await
        }
        Ok(PollOutcome::Failed {
            reason,
            permanent: false,
        }) => {
            // The task failed on the provider's side; a new one may succeed.
            job.submissions += 1;
            job.remote_id = None;
            let e = ProviderError::transient(format!("task {remote} failed: {reason}"));
            on_error(env, job, e, Phase::Submit).await
        }
        Ok(PollOutcome::Lost { reason, charged }) => lose_remote(env, job, &reason, charged).await,
        Ok(PollOutcome::Cancelled) => {
            job.state = JobState::Cancelled;
            job.finished_ms = Some(now_ms());
            job.error = Some(format!("task {remote} was cancelled at the provider"));
            event(env, &job, EventKind::Cancelled, "cancelled at the provider")?;
            save(env, &mut job)
        }
        Err(e) => on_error(env, job, e, Phase::Poll).await,
    }
}

/// How soon a task that does not show yet is looked at again: well inside Perfect's
/// 10 s keep-alive, and the 1 s a live Dzine client polled at.
const EARLY_RETRY: Duration = Duration::from_secs(1);

/// A "lost" answer within the provider's early window after the submission was sent
/// (`Lane::early_not_found`) means "accepted, not visible yet" (live APIs answer so:
/// docs/providers.md, "live evidence"): poll again instead. Counted from the
/// submission time recorded in the job, so a restart mid-window keeps only what is
/// left of it, and a task still missing after the window is lost as before.
fn early_not_found(
    env: &StepEnv<'_>,
    job: &Job,
    outcome: Result<PollOutcome, ProviderError>,
) -> Result<PollOutcome, ProviderError> {
    let Ok(PollOutcome::Lost { reason, .. }) = &outcome else {
        return outcome;
    };
    let Some(window) = env.lane.early_not_found else {
        return outcome;
    };
    let until = job
        .submit_intent_ms
        .saturating_add(window.as_millis() as u64);
    if job.submit_intent_ms == 0 || now_ms() >= until {
        return outcome;
    }
    tracing::debug!(job = %job.id(), "{reason}: within {} ms of the submission, polling again", window.as_millis());
    Ok(PollOutcome::Running {
        next_poll: Some(EARLY_RETRY),
    })
}

async fn download(env: &StepEnv<'_>, mut job: Job) -> Result<(), StoreError> {
    let count = job.pending_outputs.len();
    if count == 0 {
        return fail(env, job, "nothing to download".into()).await;
    }
    for index in 0..count {
        let pending = job.pending_outputs[index].clone();
        // The hash this job recorded for the file: that file is its own to replace.
        let mut recorded = None;
        if let Some(pos) = job.outputs.iter().position(|o| o.index as usize == index) {
            let o = &job.outputs[pos];
            // A file already in place with the recorded hash is not fetched again.
            if download::already_in_place(&env.out_dir.join(&o.path), o.size, &o.sha256) {
                continue;
            }
            recorded = Some(job.outputs.remove(pos).sha256);
        }
        let owner = download::Owner {
            job: job.id(),
            recorded: recorded.as_deref(),
        };
        let fetched = match &pending {
            PendingOutput::Inline { .. } => {
                return lose_remote(
                    env,
                    job,
                    "an inline result is missing from the output folder",
                    true,
                )
                .await;
            }
            PendingOutput::Url { url, ext } => {
                let rel = download::output_relative_path(&job.spec, index, count, ext);
                let fetched = fetch_one(env, url, &rel, owner).await;
                if let (
                    Err(DownloadError::Status {
                        expired: true,
                        status,
                    }),
                    Some(_),
                ) = (&fetched, &job.remote_id)
                {
                    // Result links expire (Perfect's after 2 hours): the task's
                    // status hands out fresh ones. Counted as an attempt so a link
                    // that never works ends the job instead of looping.
                    return relink(env, job, *status).await;
                }
                fetched.map(|w| (rel, w))
            }
            PendingOutput::Provider { key, ext } => {
                let remote = job.remote_id.clone().unwrap_or_default();
                let rel = download::output_relative_path(&job.spec, index, count, ext);
                let mut result = None;
                // A presigned link can expire between the poll and the fetch: one
                // fresh link is worth asking for before counting an attempt.
                for _ in 0..2 {
                    let url = match env
                        .lane
                        .adapter
                        .output_url(&env.lane.api, &remote, key)
                        .await
                    {
                        Ok(u) => u,
                        Err(e) => return on_error(env, job, e, Phase::Download).await,
                    };
                    let r = fetch_one(env, &url, &rel, owner).await;
                    let expired = matches!(r, Err(DownloadError::Status { expired: true, .. }));
                    result = Some(r);
                    if !expired {
                        break;
                    }
                }
                let fetched = result
                    .unwrap_or_else(|| Err(DownloadError::Interrupted("no attempt made".into())));
                fetched.map(|w| (rel, w))
            }
        };
        match fetched {
            Ok((rel, w)) => {
                job.outputs.push(output_file(env, index, &rel, w));
                // The last one is saved by `finish`, with `done`.
                if index + 1 < count {
                    save(env, &mut job)?;
                }
            }
            Err(e @ DownloadError::Taken { .. }) => return refuse_taken(env, job, e).await,
            Err(e) if e.is_out_of_space() => {
                // Not the job's fault, and no retry will fix it: keep the job where
                // it is (the next run downloads again) and stop the run.
                halt_out_of_space(env, &job, &e);
                event(env, &job, EventKind::Retry, e.to_string())?;
                job.error = Some(e.to_string());
                job.due_ms = now_ms();
                return save(env, &mut job);
            }
            Err(e) => {
                let err = match e {
                    DownloadError::TooLarge(_) | DownloadError::BadUrl(_) => {
                        ProviderError::permanent(e.to_string())
                    }
                    DownloadError::Status { status: 429, .. } => ProviderError::Transient {
                        reason: e.to_string(),
                        retry_after: None,
                        rate_limited: true,
                    },
                    other => ProviderError::transient(other.to_string()),
                };
                return on_error(env, job, err, Phase::Download).await;
            }
        }
    }
    finish(env, job).await
}

/// A result link answered as expired: poll the task again for fresh links.
async fn relink(env: &StepEnv<'_>, mut job: Job, status: u16) -> Result<(), StoreError> {
    job.attempts += 1;
    if job.attempts >= env.lane.config.max_attempts {
        let reason = format!(
            "gave up after {} attempts: result link answered HTTP {status} (expired?)",
            job.attempts
        );
        return fail(env, job, reason).await;
    }
    event(
        env,
        &job,
        EventKind::Retry,
        format!("result link answered HTTP {status}; asking the provider for fresh links"),
    )?;
    job.state = JobState::Polling;
    job.due_ms = now_ms();
    save(env, &mut job)
}

/// A result's file name holds another job's file (or one no job of ours wrote): the
/// job fails, naming that job, and its paid result stays in the side file.
async fn refuse_taken(env: &StepEnv<'_>, job: Job, e: DownloadError) -> Result<(), StoreError> {
    let DownloadError::Taken { path, kept, by } = e else {
        return fail(env, job, e.to_string()).await;
    };
    let rel_of = |p: &str| {
        Path::new(p)
            .strip_prefix(env.out_dir)
            .map(|r| r.to_string_lossy().into_owned())
            .unwrap_or_else(|_| p.to_string())
    };
    let (rel, kept_rel) = (rel_of(&path), rel_of(&kept));
    let by = match by {
        Some(other) => Some(other),
        // Not placed by this process: does another job of the database record it?
        None => owner_in_store(env, job.id(), &rel)?,
    };
    let whose = match &by {
        Some(other) => match env.store.get(other)? {
            Some(o) => format!("job {other:?}'s result (from {})", o.origin),
            None => format!("job {other:?}'s result"),
        },
        None => {
            "a file no job of this database wrote (another database's run, or put there by hand)"
                .to_string()
        }
    };
    // The side file is not recorded as an output: a `retry` (once the name is free)
    // fetches the result into its own name again.
    let reason = format!(
        "output {rel} is already there, {whose}: not replaced; this job's result is kept as {kept_rel} (give the job another `output`, or move the file, then `pixbatch retry` it)"
    );
    fail(env, job, reason).await
}

/// The job other than `me` whose recorded outputs include `rel`, if any. A scan, but
/// only when a result finds its name taken.
fn owner_in_store(env: &StepEnv<'_>, me: &str, rel: &str) -> Result<Option<String>, StoreError> {
    for other in env.store.all_jobs() {
        let other = other?;
        if other.id() != me && other.outputs.iter().any(|o| o.path == rel) {
            return Ok(Some(other.id().to_string()));
        }
    }
    Ok(None)
}

async fn fetch_one(
    env: &StepEnv<'_>,
    url: &str,
    rel: &Path,
    owner: download::Owner<'_>,
) -> Result<download::Written, DownloadError> {
    download::fetch(
        env.lane.api.client(),
        url,
        &env.out_dir.join(rel),
        owner,
        env.max_download_bytes,
        &|n| env.lane.metrics.downloaded(n),
    )
    .await
}

async fn finish(env: &StepEnv<'_>, mut job: Job) -> Result<(), StoreError> {
    job.outputs.sort_by_key(|o| o.index);
    job.state = JobState::Done;
    job.error = None;
    job.due_ms = 0;
    job.finished_ms = Some(now_ms());
    let files: Vec<&str> = job.outputs.iter().map(|o| o.path.as_str()).collect();
    event(
        env,
        &job,
        EventKind::Done,
        format!("done: {}", files.join(", ")),
    )?;
    save(env, &mut job)?;
    // Done is durable before the provider's copy is deleted.
    env.store.sync().await?;
    env.lane.stats.record_done(env.lane.kind);
    env.lane.metrics.job_done();
    if let Some(remote) = &job.remote_id {
        if let Err(e) = env.lane.adapter.cleanup(&env.lane.api, remote).await {
            tracing::debug!(job = %job.id(), "cleanup of {remote} failed: {e}");
        }
    }
    Ok(())
}

async fn fail(env: &StepEnv<'_>, mut job: Job, reason: String) -> Result<(), StoreError> {
    // The log line names the provider itself: not "aithriving: failed: aithriving: …".
    let prefix = format!("{}: ", job.spec.provider);
    let shown = reason.strip_prefix(&prefix).unwrap_or(&reason);
    tracing::warn!(job = %job.id(), provider = %job.spec.provider, "failed: {shown}");
    for (index, p) in job.pending_outputs.iter().enumerate() {
        let ext = match p {
            PendingOutput::Url { ext, .. }
            | PendingOutput::Provider { ext, .. }
            | PendingOutput::Inline { ext } => ext,
        };
        let rel = download::output_relative_path(&job.spec, index, job.pending_outputs.len(), ext);
        download::remove_part(&env.out_dir.join(rel), job.id());
    }
    event(env, &job, EventKind::Failed, reason.clone())?;
    job.state = JobState::Failed;
    job.error = Some(reason);
    job.due_ms = 0;
    job.finished_ms = Some(now_ms());
    save(env, &mut job)?;
    env.lane.stats.record_failed(env.lane.kind);
    env.lane.metrics.job_failed();
    Ok(())
}

/// The provider no longer has the task (or its result): submit again, and record
/// that the earlier submission may have been charged.
async fn lose_remote(
    env: &StepEnv<'_>,
    mut job: Job,
    reason: &str,
    charged: bool,
) -> Result<(), StoreError> {
    event(env, &job, EventKind::RemoteLost, reason.to_string())?;
    if charged {
        job.possible_duplicates += 1;
        event(
            env,
            &job,
            EventKind::PossibleDuplicate,
            format!(
                "submission {} is lost; the next one may be charged again",
                job.submit_key()
            ),
        )?;
    }
    job.attempts += 1;
    if job.attempts >= env.lane.config.max_attempts {
        return fail(
            env,
            job,
            format!(
                "gave up after {} attempts: {reason}",
                env.lane.config.max_attempts
            ),
        )
        .await;
    }
    job.submissions += 1;
    job.remote_id = None;
    job.pending_outputs.clear();
    job.outputs.clear();
    job.state = JobState::RetryWait;
    job.due_ms = now_ms();
    save(env, &mut job)
}

/// The provider refused the credential: the same for every job, so the provider is
/// halted and this job goes back to where it was with no attempt used (see
/// [`put_back`]), for a run with a fixed key.
fn refused(env: &StepEnv<'_>, job: Job, reason: String, phase: Phase) -> Result<(), StoreError> {
    event(
        env,
        &job,
        EventKind::Note,
        format!(
            "credential refused: {reason}; {} halted, the job waits for a run with a fixed key (no attempt used)",
            job.spec.provider
        ),
    )?;
    put_back(env, job, reason.clone(), phase)?;
    env.lane
        .halt_with(crate::engine::halt::HaltReason::CredentialRefused {
            status: crate::engine::halt::refused_status(&reason),
            detail: reason,
        });
    Ok(())
}

/// A step of a provider halted meanwhile failed (or sent nothing): no attempt used.
fn halted(env: &StepEnv<'_>, job: Job, reason: String, phase: Phase) -> Result<(), StoreError> {
    event(
        env,
        &job,
        EventKind::Note,
        format!(
            "{reason} ({} is halted; the job waits for a later run, attempt not counted)",
            job.spec.provider
        ),
    )?;
    // The job's error says why it waits (the halt), not "not sent".
    let why = env.lane.halted().map(|h| h.to_string()).unwrap_or(reason);
    put_back(env, job, why, phase)
}

/// Back to where the job was, due at once for the next run: queued (or waiting to
/// retry) when nothing was accepted, else as it is.
fn put_back(
    env: &StepEnv<'_>,
    mut job: Job,
    reason: String,
    phase: Phase,
) -> Result<(), StoreError> {
    job.state = match phase {
        Phase::Prepare | Phase::Submit if job.attempts == 0 => JobState::Queued,
        Phase::Prepare | Phase::Submit => JobState::RetryWait,
        // The submission's outcome is still unknown: the next run asks again.
        Phase::Reconcile => JobState::Submitting,
        Phase::Poll | Phase::Download => job.state,
    };
    job.due_ms = now_ms();
    job.error = Some(reason);
    save(env, &mut job)
}

async fn on_error(
    env: &StepEnv<'_>,
    mut job: Job,
    error: ProviderError,
    phase: Phase,
) -> Result<(), StoreError> {
    match error {
        ProviderError::Permanent(reason) => fail(env, job, reason).await,
        ProviderError::Credential(reason) => refused(env, job, reason, phase),
        ProviderError::Lost(reason) => lose_remote(env, job, &reason, true).await,
        ProviderError::Unknown(reason) if phase == Phase::Submit => {
            // Not a retry: the provider may have the task. Ask it first.
            event(
                env,
                &job,
                EventKind::Note,
                format!(
                    "outcome of submission {} unknown ({reason}); asking the provider",
                    job.submit_key()
                ),
            )?;
            job.state = JobState::Submitting;
            job.due_ms = now_ms() + RECONCILE_AFTER.as_millis() as u64;
            save(env, &mut job)
        }
        ProviderError::Unknown(reason) => {
            let e = ProviderError::transient(reason);
            Box::pin(on_error(env, job, e, phase)).await
        }
        ProviderError::Transient {
            reason,
            retry_after,
            rate_limited,
        } => {
            if env.lane.halted().is_some() {
                // The provider was halted while this step was under way (its request
                // failed, or was never sent): the job waits for a later run as it is.
                return halted(env, job, reason, phase);
            }
            if rate_limited {
                // The provider's wait is not the job's fault: no attempt used up.
                event(env, &job, EventKind::RateLimited, reason.clone())?;
            } else if env.lane.gate.excuses_failures() {
                // Neither is an outage of the whole provider (up to its patience).
                event(
                    env,
                    &job,
                    EventKind::Retry,
                    format!("{reason} (the provider looks down; attempt not counted)"),
                )?;
            } else {
                job.attempts += 1;
                if job.attempts >= env.lane.config.max_attempts {
                    let reason = format!("gave up after {} attempts: {reason}", job.attempts);
                    return fail(env, job, reason).await;
                }
                event(
                    env,
                    &job,
                    EventKind::Retry,
                    format!("attempt {} failed: {reason}", job.attempts),
                )?;
            }
            env.lane.metrics.retry();
            let mut wait = backoff_delay(job.attempts.max(1), retry_after);
            if phase == Phase::Poll {
                // A provider that drops unpolled tasks must hear from us in time.
                wait = env.lane.poll_wait(wait);
            }
            job.due_ms = now_ms() + wait.as_millis() as u64;
            job.error = Some(reason);
            job.state = match phase {
                // Nothing was accepted: back to the queue, same submit key.
                Phase::Prepare | Phase::Submit => JobState::RetryWait,
                Phase::Reconcile => JobState::Submitting,
                Phase::Poll => {
                    if job.state == JobState::Submitted {
                        JobState::Submitted
                    } else {
                        JobState::Polling
                    }
                }
                Phase::Download => JobState::Downloading,
            };
            save(env, &mut job)
        }
    }
}
