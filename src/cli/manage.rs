//! `retry` and `cancel`: commands that change jobs outside a run.

use super::*;

pub(super) fn cmd_retry(db: &Path, failed: bool, ids: &[String]) -> Result<i32, Fail> {
    if !failed && ids.is_empty() {
        return Err(Fail(
            EXIT_ERROR,
            "say which jobs: --failed or JOB_ID...".into(),
        ));
    }
    let _lock = lock_for_writing(db, "retry")?;
    let store = open_store(db)?;
    let targets: Vec<String> = if failed {
        store
            .ids_in_state(JobState::Failed, None)
            .collect::<Result<_, _>>()
            .map_err(|e| Fail(EXIT_ERROR, e.to_string()))?
    } else {
        ids.to_vec()
    };
    let mut n = 0;
    for id in &targets {
        let Some(mut job) = store.get(id)? else {
            eprintln!("pixbatch: no job with id {id:?}");
            continue;
        };
        if !matches!(job.state, JobState::Failed | JobState::Cancelled) {
            eprintln!(
                "pixbatch: {id} is {}, not failed or cancelled; left as it is",
                job.state
            );
            continue;
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
            id,
            &JobEvent {
                at_ms: now_ms(),
                kind: EventKind::Requeued,
                message: format!("requeued by `pixbatch retry` as {}", job.state),
            },
        )?;
        n += 1;
    }
    store.flush()?;
    println!("{n} job(s) requeued");
    Ok(EXIT_OK)
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
                    let gate = Arc::new(engine::limiter::ProviderGate::new(
                        job.spec.provider,
                        &pc.rate_limits,
                        config.engine.rate_margin,
                        Some(store.clone()),
                    ));
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
