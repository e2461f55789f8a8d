//! `retry` and `cancel`: commands that change jobs outside a run.

use super::*;
use crate::model::Job;

/// What `retry` or `cancel` did, for people (lines) and scripts (`--json`). A
/// named job that is unknown, or that was left as it is, makes the command exit 1:
/// a cron script must not take "nothing happened" for success.
#[derive(Debug, Default, serde::Serialize)]
pub(super) struct Changes {
    pub command: &'static str,
    pub dry_run: bool,
    /// The jobs changed (or, with --dry-run, that would be).
    pub changed: Vec<Changed>,
    /// Named jobs this command cannot change (a state it does not take, or the
    /// provider's refusal), with the reason: these make the exit 1.
    pub skipped: Vec<Skipped>,
    /// Named jobs the filters (--provider, --error, --since) left out, as asked.
    pub left_out: Vec<Skipped>,
    /// Named ids no job has.
    pub unknown: Vec<String>,
}

#[derive(Debug, serde::Serialize)]
pub(super) struct Changed {
    pub id: String,
    pub provider: ProviderKind,
    /// The state the job was in before.
    pub state: JobState,
    pub message: String,
}

#[derive(Debug, serde::Serialize)]
pub(super) struct Skipped {
    pub id: String,
    pub reason: String,
}

impl Changes {
    fn new(command: &'static str, dry_run: bool) -> Changes {
        Changes {
            command,
            dry_run,
            ..Default::default()
        }
    }

    fn code(&self) -> i32 {
        if self.unknown.is_empty() && self.skipped.is_empty() {
            EXIT_OK
        } else {
            EXIT_ERROR
        }
    }

    /// Prints what happened (`done` is "requeued" or "cancelled") and gives the
    /// exit code.
    fn finish(&self, json: bool, done: &str) -> Result<i32, Fail> {
        let stdout = std::io::stdout();
        let mut out = stdout.lock();
        if json {
            writeln!(out, "{}", serde_json::to_string_pretty(self)?)?;
            return Ok(self.code());
        }
        for c in &self.changed {
            writeln!(out, "{}\t{}\t{}\t{}", c.id, c.provider, c.state, c.message)?;
        }
        for s in self.skipped.iter().chain(&self.left_out) {
            eprintln!("pixbatch: {}: {}", s.id, s.reason);
        }
        for id in &self.unknown {
            eprintln!("pixbatch: {id}: no such job");
        }
        let n = self.changed.len();
        if self.dry_run {
            eprintln!("pixbatch: {n} job(s) would be {done} (--dry-run: nothing changed)");
        } else if self.command == "retry" {
            // On stdout since the first release: scripts read it.
            writeln!(out, "{n} job(s) {done}")?;
        } else {
            eprintln!("pixbatch: {n} job(s) {done}");
        }
        if !self.unknown.is_empty() {
            eprintln!(
                "pixbatch: {} id(s) match no job (exit 1)",
                self.unknown.len()
            );
        }
        Ok(self.code())
    }
}

/// The jobs a selection names: the filtered states' jobs, or the named ids (the
/// filters apply to them too; unknown ones and ones the filter leaves out are
/// reported).
fn select(
    store: &Store,
    filter: &JobFilter,
    ids: &[String],
    changes: &mut Changes,
) -> Result<Vec<Job>, Fail> {
    let mut jobs = Vec::new();
    if ids.is_empty() {
        for state in &filter.states {
            let found: Vec<String> = store
                .ids_in_state(*state, filter.provider)
                .collect::<Result<_, _>>()?;
            for id in found {
                if let Some(job) = store.get(&id)? {
                    if filter.matches(&job) {
                        jobs.push(job);
                    }
                }
            }
        }
        return Ok(jobs);
    }
    for id in ids {
        match store.get(id)? {
            None => changes.unknown.push(id.clone()),
            Some(job) if filter.matches(&job) => jobs.push(job),
            Some(job) => {
                let left = Skipped {
                    id: id.clone(),
                    reason: filter.why_not(&job),
                };
                if filter.states.contains(&job.state) {
                    changes.left_out.push(left);
                } else {
                    changes.skipped.push(left);
                }
            }
        }
    }
    Ok(jobs)
}

pub(super) fn cmd_retry(db: &Path, args: &RetryArgs) -> Result<i32, Fail> {
    let filter = JobFilter::for_retry(args, now_ms())?;
    if !db.exists() {
        return Err(super::inspect::no_database(db));
    }
    let _lock = lock_for_writing(db, "retry")?;
    let store = open_store(db)?;
    let mut changes = Changes::new("retry", args.dry_run);
    for job in select(&store, &filter, &args.job_ids, &mut changes)? {
        let changed = Changed {
            id: job.id().to_string(),
            provider: job.spec.provider,
            state: job.state,
            message: job.error.clone().unwrap_or_default(),
        };
        if args.dry_run || requeue(&store, job, "`pixbatch retry`")? {
            changes.changed.push(changed);
        }
    }
    if !args.dry_run {
        store.flush()?;
    }
    changes.finish(args.json, "requeued")
}

/// Which jobs `retry` or `cancel` takes: every given condition holds.
#[derive(Debug)]
pub(super) struct JobFilter {
    pub states: Vec<JobState>,
    pub provider: Option<ProviderKind>,
    /// Lower-cased.
    pub error: Option<String>,
    pub since_ms: Option<u64>,
}

impl JobFilter {
    pub fn for_retry(args: &RetryArgs, now: u64) -> Result<JobFilter, Fail> {
        let mut states = args.state.clone();
        if args.failed {
            states.push(JobState::Failed);
        }
        if let Some(bad) = states
            .iter()
            .find(|s| !matches!(s, JobState::Failed | JobState::Cancelled))
        {
            return Err(Fail(
                EXIT_ERROR,
                format!("retry takes failed or cancelled jobs, not {bad} ones"),
            ));
        }
        let any_filter = args.provider.is_some() || args.error.is_some() || args.since.is_some();
        if states.is_empty() && args.job_ids.is_empty() && !any_filter {
            return Err(Fail(
                EXIT_ERROR,
                "say which jobs: --failed, --state, --provider, --error, --since or JOB_ID..."
                    .into(),
            ));
        }
        let explicit = !states.is_empty();
        if !explicit {
            // Filters alone pick among the failed jobs; ids may be either.
            states.push(JobState::Failed);
            if !args.job_ids.is_empty() {
                states.push(JobState::Cancelled);
            }
        }
        states.sort();
        states.dedup();
        let since_ms = match &args.since {
            Some(t) => Some(parse_since(t, now).map_err(|e| Fail(EXIT_ERROR, e))?),
            None => None,
        };
        Ok(JobFilter {
            states,
            provider: args.provider,
            error: args.error.as_ref().map(|e| e.to_lowercase()),
            since_ms,
        })
    }

    /// `cancel`: unfinished jobs (every unfinished state unless `--state` says
    /// which), with the same filters as `retry`.
    pub fn for_cancel(args: &CancelArgs, now: u64) -> Result<JobFilter, Fail> {
        let mut states = args.state.clone();
        if let Some(bad) = states.iter().find(|s| s.is_terminal()) {
            return Err(Fail(
                EXIT_ERROR,
                format!("cancel takes unfinished jobs, not {bad} ones"),
            ));
        }
        let any_filter = args.provider.is_some() || args.error.is_some() || args.since.is_some();
        if states.is_empty() && args.job_ids.is_empty() && !any_filter {
            return Err(Fail(
                EXIT_ERROR,
                "say which jobs: --state, --provider, --error, --since or JOB_ID...".into(),
            ));
        }
        if states.is_empty() {
            states = JobState::ALL
                .into_iter()
                .filter(|s| !s.is_terminal())
                .collect();
        }
        states.sort();
        states.dedup();
        let since_ms = match &args.since {
            Some(t) => Some(parse_since(t, now).map_err(|e| Fail(EXIT_ERROR, e))?),
            None => None,
        };
        Ok(JobFilter {
            states,
            provider: args.provider,
            error: args.error.as_ref().map(|e| e.to_lowercase()),
            since_ms,
        })
    }

    /// Why a named job is left out, for the person who named it.
    pub fn why_not(&self, job: &Job) -> String {
        if !self.states.contains(&job.state) {
            let wanted: Vec<&str> = self.states.iter().map(|s| s.name()).collect();
            return format!(
                "is {}, not {}; left as it is",
                job.state,
                wanted.join(" or ")
            );
        }
        if self.provider.is_some_and(|p| p != job.spec.provider) {
            return format!("is a {} job; left as it is", job.spec.provider);
        }
        if self.error.is_some() {
            return "its error does not match --error; left as it is".into();
        }
        "it last changed before --since; left as it is".into()
    }

    pub fn matches(&self, job: &Job) -> bool {
        let changed_ms = job.finished_ms.unwrap_or(job.updated_ms);
        self.matches_parts(
            job.state,
            job.spec.provider,
            job.error.as_deref(),
            changed_ms,
        )
    }

    /// [`JobFilter::matches`] on a row from a running process (rows carry no
    /// `updated_ms`: an unfinished job counts from its creation).
    pub fn matches_row(&self, r: &JobRow) -> bool {
        let changed_ms = r.finished_ms.unwrap_or(r.created_ms);
        self.matches_parts(r.state, r.provider, r.error.as_deref(), changed_ms)
    }

    fn matches_parts(
        &self,
        state: JobState,
        provider: ProviderKind,
        error: Option<&str>,
        changed_ms: u64,
    ) -> bool {
        self.states.contains(&state)
            && self.provider.is_none_or(|p| p == provider)
            && self.error.as_ref().is_none_or(|needle| {
                error.is_some_and(|e| e.to_lowercase().contains(needle.as_str()))
            })
            && self.since_ms.is_none_or(|t| changed_ms >= t)
    }
}

/// `--since`: an RFC 3339 time, a date (UTC midnight), or a duration before `now`.
pub(super) fn parse_since(text: &str, now_ms: u64) -> Result<u64, String> {
    let t = text.trim();
    let as_time = humantime::parse_rfc3339_weak(t)
        .or_else(|_| humantime::parse_rfc3339_weak(&format!("{t}T00:00:00")))
        .ok()
        .and_then(|st| st.duration_since(std::time::UNIX_EPOCH).ok());
    if let Some(d) = as_time {
        return Ok(d.as_millis() as u64);
    }
    let ago = humantime::parse_duration(t).map_err(|_| {
        format!("--since {t:?}: expected a time (2025-05-01T22:00:00Z), a date (2025-05-01) or a duration ago (2h, 30m)")
    })?;
    Ok(now_ms.saturating_sub(ago.as_millis() as u64))
}

/// Puts a failed or cancelled job back in the queue (`why` goes in its history).
/// Returns false when the job is in another state.
pub(super) fn requeue(store: &Store, mut job: Job, why: &str) -> Result<bool, Fail> {
    if !matches!(job.state, JobState::Failed | JobState::Cancelled) {
        return Ok(false);
    }
    let remote_finished = job.remote_id.is_some() && !job.pending_outputs.is_empty();
    job.attempts = 0;
    job.error = None;
    job.finished_ms = None;
    job.due_ms = 0;
    if remote_finished {
        // The provider finished the task: fetch its results again rather than pay again.
        job.state = JobState::Downloading;
    } else {
        if job.remote_id.take().is_some() {
            job.submissions += 1;
        }
        job.pending_outputs.clear();
        job.state = JobState::Queued;
    }
    job.updated_ms = now_ms();
    store.save(&job)?;
    store.add_event(
        job.id(),
        &JobEvent {
            at_ms: now_ms(),
            kind: EventKind::Requeued,
            message: format!("requeued by {why} as {}", job.state),
        },
    )?;
    Ok(true)
}

/// Cancels jobs: directly when no run holds the database, else through the run's
/// control socket, so the running process cancels them (and their remote tasks)
/// itself.
pub(super) async fn cmd_cancel(db: &Path, config: &Config, args: &CancelArgs) -> Result<i32, Fail> {
    let filter = JobFilter::for_cancel(args, now_ms())?;
    if !db.exists() {
        return Err(super::inspect::no_database(db));
    }
    let mut changes = Changes::new("cancel", args.dry_run);
    match DbLock::acquire_within(db, "cancel", Duration::from_secs(5)) {
        Ok(lock) => cancel_directly(db, config, &filter, args, lock, &mut changes).await?,
        Err(e @ (LockError::Held { .. } | LockError::HeldUnknown { .. })) => {
            cancel_through_run(db, &filter, args, e, &mut changes)?
        }
        Err(e) => return Err(lock_fail(e)),
    }
    changes.finish(args.json, "cancelled")
}

/// Picks the jobs from the run's answers (a `list` per state), then asks the run to
/// cancel them: no other process may write its database.
fn cancel_through_run(
    db: &Path,
    filter: &JobFilter,
    args: &CancelArgs,
    held: LockError,
    changes: &mut Changes,
) -> Result<(), Fail> {
    let socket = lock::socket_path(db);
    let unreachable = |e: query::QueryError| match e {
        query::QueryError::Io(e)
            if matches!(
                e.kind(),
                std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused
            ) =>
        {
            Fail(
                EXIT_LOCKED,
                format!("{held}, and it does not take requests on its control socket ({e})"),
            )
        }
        e => Fail::from(e),
    };
    let mut rows: Vec<JobRow> = Vec::new();
    let list = Query::List {
        state: None,
        provider: filter.provider,
        manifest: None,
        limit: None,
    };
    crate::control::ask(&socket, &list, &mut |v| {
        if let Ok(row) = serde_json::from_value::<JobRow>(v) {
            rows.push(row);
        }
        Ok(())
    })
    .map_err(unreachable)?;
    let matches = |r: &JobRow| filter.matches_row(r);
    let mut chosen: Vec<&JobRow> = Vec::new();
    if args.job_ids.is_empty() {
        chosen.extend(rows.iter().filter(|r| matches(r)));
    } else {
        for id in &args.job_ids {
            match rows.iter().find(|r| &r.id == id) {
                None => changes.unknown.push(id.clone()),
                Some(r) if matches(r) => chosen.push(r),
                Some(r) if filter.states.contains(&r.state) => changes.left_out.push(Skipped {
                    id: id.clone(),
                    reason: "the filters leave it out; left as it is".into(),
                }),
                Some(r) => changes.skipped.push(Skipped {
                    id: id.clone(),
                    reason: format!("is {}; left as it is", r.state),
                }),
            }
        }
    }
    if args.dry_run {
        for r in chosen {
            changes.changed.push(Changed {
                id: r.id.clone(),
                provider: r.provider,
                state: r.state,
                message: "would be cancelled by the running process".into(),
            });
        }
        return Ok(());
    }
    let ids: Vec<String> = chosen.iter().map(|r| r.id.clone()).collect();
    if ids.is_empty() {
        return Ok(());
    }
    let before: std::collections::HashMap<&str, &JobRow> =
        chosen.iter().map(|r| (r.id.as_str(), *r)).collect();
    let query = Query::Cancel { ids: ids.clone() };
    crate::control::ask(&socket, &query, &mut |v| {
        let answer: query::CancelAnswer = serde_json::from_value(v)
            .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))?;
        match before.get(answer.id.as_str()) {
            Some(r) if answer.cancelled => changes.changed.push(Changed {
                id: answer.id,
                provider: r.provider,
                state: r.state,
                message: answer.message,
            }),
            _ => changes.skipped.push(Skipped {
                id: answer.id,
                reason: answer.message,
            }),
        }
        Ok(())
    })
    .map_err(unreachable)
}

async fn cancel_directly(
    db: &Path,
    config: &Config,
    filter: &JobFilter,
    args: &CancelArgs,
    _lock: DbLock,
    changes: &mut Changes,
) -> Result<(), Fail> {
    let store = open_store(db)?;
    for job in select(&store, filter, &args.job_ids, changes)? {
        let id = job.id().to_string();
        let (provider, state) = (job.spec.provider, job.state);
        if args.dry_run {
            changes.changed.push(Changed {
                id,
                provider,
                state,
                message: "would be cancelled".into(),
            });
            continue;
        }
        let pc = config.provider(provider);
        let mut remote = None;
        if job.remote_id.is_some() && job.state.has_remote_task() {
            match crate::providers::build(&pc) {
                Ok(adapter) => {
                    let gate = Arc::new(
                        engine::limiter::ProviderGate::new(
                            provider,
                            &pc.rate_limits,
                            config.engine.rate_margin,
                            Some(store.clone()),
                        )
                        .with_shared_budget_in(
                            config.engine.state_dir.as_deref(),
                            &pc.base_url,
                            &pc.credentials,
                        ),
                    );
                    let client = engine::http_client(&pc).map_err(|e| Fail(EXIT_ERROR, e))?;
                    let api = crate::api::Api::new(&pc.base_url, client, gate);
                    remote = Some((adapter, api));
                }
                Err(e) => eprintln!("pixbatch: {id}: the remote task cannot be cancelled: {e}"),
            }
        }
        let answer = engine::cancel::cancel_job(
            &store,
            job,
            remote.as_ref().map(|(a, api)| (a.as_ref(), api)),
            "`pixbatch cancel`",
        )
        .await?;
        if answer.cancelled {
            changes.changed.push(Changed {
                id,
                provider,
                state,
                message: answer.message,
            });
        } else {
            changes.skipped.push(Skipped {
                id,
                reason: answer.message,
            });
        }
    }
    store.flush()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{JobSpec, Origin};

    fn job(state: JobState, provider: ProviderKind, error: &str, finished_ms: u64) -> Job {
        let spec = JobSpec {
            id: "x".into(),
            provider,
            operation: "enhance".into(),
            inputs: vec![],
            prompt: None,
            params_json: "{}".into(),
            output: None,
            metadata: Vec::new(),
        };
        let mut j = Job::new(
            spec,
            Origin {
                file: "m".into(),
                line: 2,
            },
            0,
        );
        j.state = state;
        j.error = Some(error.into());
        j.finished_ms = Some(finished_ms);
        j
    }

    #[test]
    fn since_reads_times_dates_and_durations() {
        let now = 1_700_000_000_000;
        assert_eq!(parse_since("2h", now), Ok(now - 7_200_000));
        assert_eq!(parse_since("2023-11-14", now), Ok(1_699_920_000_000));
        assert_eq!(
            parse_since("2023-11-14T22:13:20Z", now),
            Ok(1_700_000_000_000)
        );
        assert!(parse_since("yesterday-ish", now).is_err());
    }

    #[test]
    fn retry_filters_combine() {
        let args = |f: &dyn Fn(&mut RetryArgs)| {
            let mut a = RetryArgs::default();
            f(&mut a);
            JobFilter::for_retry(&a, 10_000).map_err(|Fail(_, m)| m)
        };
        assert!(args(&|_| {}).is_err(), "no selector at all");
        assert!(args(&|a| a.state = vec![JobState::Done]).is_err());
        let f = args(&|a| {
            a.error = Some("NSFW".into());
            a.provider = Some(ProviderKind::Aithriving);
            a.since = Some("5s".into());
        })
        .unwrap();
        assert_eq!(f.states, vec![JobState::Failed]);
        assert!(f.matches(&job(
            JobState::Failed,
            ProviderKind::Aithriving,
            "nsfw content",
            6_000
        )));
        assert!(!f.matches(&job(
            JobState::Failed,
            ProviderKind::Aithriving,
            "nsfw content",
            4_000
        )));
        assert!(!f.matches(&job(JobState::Failed, ProviderKind::Photio, "nsfw", 6_000)));
        assert!(!f.matches(&job(
            JobState::Cancelled,
            ProviderKind::Aithriving,
            "nsfw",
            6_000
        )));
        assert!(!f.matches(&job(
            JobState::Failed,
            ProviderKind::Aithriving,
            "timeout",
            6_000
        )));
        let ids = args(&|a| a.job_ids = vec!["x".into()]).unwrap();
        assert!(ids.matches(&job(JobState::Cancelled, ProviderKind::Topaz, "", 0)));
    }
}
