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

pub(super) async fn cmd_cancel(db: &Path, config: &Config, ids: &[String]) -> Result<i32, Fail> {
    let _lock = lock_for_writing(db, "cancel")?;
    let store = open_store(db)?;
    let mut n = 0;
    for id in ids {
        let Some(mut job) = store.get(id)? else {
            eprintln!("pixbatch: no job with id {id:?}");
            continue;
        };
        if job.state.is_terminal() {
            eprintln!("pixbatch: {id} is already {}", job.state);
            continue;
        }
        let mut note = "cancelled by `pixbatch cancel`".to_string();
        if let (Some(remote), true) = (job.remote_id.clone(), job.state.has_remote_task()) {
            let pc = config.provider(job.spec.provider);
            match crate::providers::build(&pc) {
                Ok(adapter) => {
                    let gate = Arc::new(engine::limiter::ProviderGate::new(
                        job.spec.provider,
                        &pc.rate_limits,
                        config.engine.rate_margin,
                        Some(store.clone()),
                    ));
                    let api = crate::api::Api::new(&pc.base_url, reqwest::Client::new(), gate);
                    match adapter.cancel(&api, &remote).await {
                        Ok(true) => note.push_str(&format!("; remote task {remote} cancelled")),
                        Ok(false) => note.push_str(&format!(
                            "; remote task {remote} could not be cancelled at the provider"
                        )),
                        Err(e) => {
                            note.push_str(&format!("; cancelling remote task {remote} failed: {e}"))
                        }
                    }
                }
                Err(e) => note.push_str(&format!("; remote task {remote} left running: {e}")),
            }
        }
        job.state = JobState::Cancelled;
        job.finished_ms = Some(now_ms());
        job.updated_ms = now_ms();
        job.error = Some(note.clone());
        store.save(&job)?;
        store.add_event(
            id,
            &JobEvent {
                at_ms: now_ms(),
                kind: EventKind::Cancelled,
                message: note.clone(),
            },
        )?;
        println!("{id}: {note}");
        n += 1;
    }
    store.flush()?;
    eprintln!("pixbatch: {n} job(s) cancelled");
    Ok(EXIT_OK)
}
