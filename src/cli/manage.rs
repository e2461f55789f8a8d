//! `retry` and `cancel`: commands that change jobs outside a run.

use super::*;
use crate::model::Job;

pub(super) fn cmd_retry(db: &Path, args: &RetryArgs) -> Result<i32, Fail> {
    let filter = RetryFilter::from_args(args, now_ms())?;
    let _lock = lock_for_writing(db, "retry")?;
    let store = open_store(db)?;
    let mut n = 0;
    let mut consider = |job: Job| -> Result<(), Fail> {
        if !filter.matches(&job) {
            return Ok(());
        }
        if args.dry_run {
            println!(
                "{}\t{}\t{}\t{}",
                job.id(),
                job.spec.provider,
                job.state,
                job.error.as_deref().unwrap_or("")
            );
            n += 1;
        } else if requeue(&store, job, "`pixbatch retry`")? {
            n += 1;
        }
        Ok(())
    };
    if args.job_ids.is_empty() {
        for state in &filter.states {
            let ids: Vec<String> = store
                .ids_in_state(*state, filter.provider)
                .collect::<Result<_, _>>()?;
            for id in ids {
                if let Some(job) = store.get(&id)? {
                    consider(job)?;
                }
            }
        }
    } else {
        for id in &args.job_ids {
            match store.get(id)? {
                None => eprintln!("pixbatch: no job with id {id:?}"),
                Some(job) if !job.state.is_terminal() || job.state == JobState::Done => {
                    eprintln!(
                        "pixbatch: {id} is {}, not failed or cancelled; left as it is",
                        job.state
                    )
                }
                Some(job) => consider(job)?,
            }
        }
    }
    if args.dry_run {
        eprintln!("pixbatch: {n} job(s) would be requeued (--dry-run: nothing changed)");
        return Ok(EXIT_OK);
    }
    store.flush()?;
    println!("{n} job(s) requeued");
    Ok(EXIT_OK)
}

/// Which jobs `retry` takes: every given condition holds.
#[derive(Debug)]
pub(super) struct RetryFilter {
    pub states: Vec<JobState>,
    pub provider: Option<ProviderKind>,
    /// Lower-cased.
    pub error: Option<String>,
    pub since_ms: Option<u64>,
}

impl RetryFilter {
    pub fn from_args(args: &RetryArgs, now: u64) -> Result<RetryFilter, Fail> {
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
        Ok(RetryFilter {
            states,
            provider: args.provider,
            error: args.error.as_ref().map(|e| e.to_lowercase()),
            since_ms,
        })
    }

    pub fn matches(&self, job: &Job) -> bool {
        self.states.contains(&job.state)
            && self.provider.is_none_or(|p| p == job.spec.provider)
            && self.error.as_ref().is_none_or(|needle| {
                job.error
                    .as_ref()
                    .is_some_and(|e| e.to_lowercase().contains(needle.as_str()))
            })
            && self
                .since_ms
                .is_none_or(|t| job.finished_ms.unwrap_or(job.updated_ms) >= t)
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
pub(super) async fn cmd_cancel(db: &Path, config: &Config, ids: &[String]) -> Result<i32, Fail> {
    match DbLock::acquire_within(db, "cancel", Duration::from_secs(5)) {
        Ok(lock) => cancel_directly(db, config, ids, lock).await,
        Err(e @ (LockError::Held { .. } | LockError::HeldUnknown { .. })) => {
            cancel_through_run(db, ids, e)
        }
        Err(e) => Err(lock_fail(e)),
    }
}

fn cancel_through_run(db: &Path, ids: &[String], held: LockError) -> Result<i32, Fail> {
    let query = Query::Cancel { ids: ids.to_vec() };
    let mut n = 0;
    let asked = crate::control::ask(&lock::socket_path(db), &query, &mut |v| {
        let answer: query::CancelAnswer = serde_json::from_value(v)
            .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))?;
        if answer.cancelled {
            n += 1;
            println!("{}: {}", answer.id, answer.message);
        } else {
            eprintln!("pixbatch: {}: {}", answer.id, answer.message);
        }
        Ok(())
    });
    match asked {
        Ok(()) => {
            eprintln!("pixbatch: {n} job(s) cancelled by the running process");
            Ok(EXIT_OK)
        }
        Err(query::QueryError::Io(e))
            if matches!(
                e.kind(),
                std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused
            ) =>
        {
            Err(Fail(
                EXIT_LOCKED,
                format!("{held}, and it does not take requests on its control socket ({e})"),
            ))
        }
        Err(e) => Err(Fail(EXIT_ERROR, e.to_string())),
    }
}

async fn cancel_directly(
    db: &Path,
    config: &Config,
    ids: &[String],
    _lock: DbLock,
) -> Result<i32, Fail> {
    let store = open_store(db)?;
    let mut n = 0;
    for id in ids {
        let Some(job) = store.get(id)? else {
            eprintln!("pixbatch: no job with id {id:?}");
            continue;
        };
        let pc = config.provider(job.spec.provider);
        let mut remote = None;
        if job.remote_id.is_some() && job.state.has_remote_task() {
            match crate::providers::build(&pc) {
                Ok(adapter) => {
                    let gate = Arc::new(
                        engine::limiter::ProviderGate::new(
                            job.spec.provider,
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
            println!("{id}: {}", answer.message);
            n += 1;
        } else {
            eprintln!("pixbatch: {id} is {}", answer.message);
        }
    }
    store.flush()?;
    eprintln!("pixbatch: {n} job(s) cancelled");
    Ok(EXIT_OK)
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
            RetryFilter::from_args(&a, 10_000).map_err(|Fail(_, m)| m)
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
