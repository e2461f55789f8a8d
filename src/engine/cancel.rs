//! `cancel`: a job ends `cancelled`, and its remote task is cancelled at the provider
//! where the provider offers a way (Topaz's `DELETE /cancel/{id}`; the other four
//! document none, so their tasks run to their end and are charged).
//!
//! Two callers: `pixbatch cancel` when no run holds the database (it builds the
//! adapter itself), and a running engine asked over its control socket
//! ([`Canceller`]). The running engine must not let a step write the job while it is
//! being cancelled, so the canceller claims the job the way the dispatcher claims it
//! for a step: while claimed, no step runs for it, and once cancelled it is terminal.

use std::collections::{BTreeMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::Notify;

use crate::api::Api;
use crate::engine::Lane;
use crate::model::{now_ms, EventKind, Job, JobEvent, JobState, ProviderKind};
use crate::providers::Provider;
use crate::query::CancelAnswer;
use crate::store::{Store, StoreError};

/// How long a cancel waits for a step that holds the job (a poll, a download).
pub const CLAIM_WAIT: Duration = Duration::from_secs(30);

/// Cancels the remote task of `job` where possible and records the job as
/// cancelled; `remote` is the adapter and its API when the provider is reachable.
/// The answer's message says what happened at the provider.
pub async fn cancel_job(
    store: &Store,
    mut job: Job,
    remote: Option<(&dyn Provider, &Api)>,
    by: &str,
) -> Result<CancelAnswer, StoreError> {
    let id = job.id().to_string();
    if job.state.is_terminal() {
        return Ok(CancelAnswer {
            id,
            cancelled: false,
            message: format!("already {}", job.state),
        });
    }
    let mut note = format!("cancelled by {by}");
    match (job.remote_id.clone(), job.state.has_remote_task()) {
        (Some(task), true) => match remote {
            Some((adapter, api)) => match adapter.cancel(api, &task).await {
                Ok(true) => note.push_str(&format!("; remote task {task} cancelled")),
                Ok(false) => note.push_str(&format!(
                    "; remote task {task} could not be cancelled at the provider ({} offers no cancel, or the task had ended)",
                    job.spec.provider
                )),
                Err(e) => note.push_str(&format!("; cancelling remote task {task} failed: {e}")),
            },
            None => note.push_str(&format!("; remote task {task} left running")),
        },
        _ if job.state == JobState::Submitting => note.push_str(
            "; a submission whose answer was lost may still run at the provider",
        ),
        _ => {}
    }
    job.state = JobState::Cancelled;
    job.finished_ms = Some(now_ms());
    job.updated_ms = now_ms();
    job.due_ms = 0;
    job.error = Some(note.clone());
    store.save(&job)?;
    store.add_event(
        &id,
        &JobEvent {
            at_ms: now_ms(),
            kind: EventKind::Cancelled,
            message: note.clone(),
        },
    )?;
    Ok(CancelAnswer {
        id,
        cancelled: true,
        message: note,
    })
}

/// Cancels jobs inside a running engine (asked over the control socket).
#[derive(Clone)]
pub struct Canceller {
    pub(crate) store: Store,
    pub(crate) lanes: BTreeMap<ProviderKind, Arc<Lane>>,
    /// The dispatcher's set of jobs a step is working on.
    pub(crate) claimed: Arc<Mutex<HashSet<String>>>,
    pub(crate) wake: Arc<Notify>,
}

impl Canceller {
    /// Cancels job `id`: waits (up to [`CLAIM_WAIT`]) until no step holds it, holds
    /// it meanwhile so none starts, cancels its remote task through the run's own
    /// rate-limited API, and records it as cancelled (synced).
    pub async fn cancel(&self, id: &str) -> Result<CancelAnswer, String> {
        let deadline = Instant::now() + CLAIM_WAIT;
        loop {
            let mine = self
                .claimed
                .lock()
                .map(|mut c| c.insert(id.to_string()))
                .unwrap_or(false);
            if mine {
                break;
            }
            if Instant::now() >= deadline {
                return Err(format!(
                    "job {id} is busy in a step for more than {} s; try again",
                    CLAIM_WAIT.as_secs()
                ));
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let result = self.cancel_claimed(id).await;
        if let Ok(mut c) = self.claimed.lock() {
            c.remove(id);
        }
        // The dispatcher re-counts: the run may be over now.
        self.wake.notify_one();
        result.map_err(|e| e.to_string())
    }

    async fn cancel_claimed(&self, id: &str) -> Result<CancelAnswer, StoreError> {
        let Some(job) = self.store.get(id)? else {
            return Ok(CancelAnswer {
                id: id.to_string(),
                cancelled: false,
                message: "no such job".into(),
            });
        };
        let lane = self.lanes.get(&job.spec.provider);
        let remote = lane.map(|l| (l.adapter.as_ref(), &l.api));
        let answer =
            cancel_job(&self.store, job, remote, "`pixbatch cancel` (during a run)").await?;
        self.store.sync().await?;
        if answer.cancelled {
            tracing::info!(job = %id, "{}", answer.message);
        }
        Ok(answer)
    }
}
