//! `enqueue --update` / `run --update`: a manifest row whose id is in the database
//! with different content becomes a new version of that job.
//!
//! The version it replaces is kept whole in the store's `versions` tree (spec, state,
//! outputs with their SHA-256, timings) and its events stay with the job, so `show`
//! tells the job's history. Its files stay on disk: the new version writes to other
//! names — the row's file stem with `.vN` added (`img-001.v2.png`, or
//! `folder/stem.v2.png` for an `output` column) — so nothing a user may have kept is
//! overwritten. Its submission numbers continue from the old version's (the next
//! submit key is `<id>~<n+1>`): a provider that ignores a repeated request id
//! (Perfect) must not take the new version for a retry of the old one.
//!
//! A job with a task at the provider (submitting, submitted, polling, downloading)
//! is not replaced: that task may be paid for. Let the run finish it, or cancel it.
//!
//! This runs before the ordinary enqueue: `find` reads the manifests and lists the
//! rows to update (and the rows that cannot be), `apply` replaces those jobs; the
//! ordinary enqueue then finds them with the row's content and adds the rest.

use std::path::PathBuf;

use crate::intake::IntakeError;
use crate::manifest::{self, DuplicateTracker, OutputTracker, RowError, RowStatus};
use crate::model::{now_ms, EventKind, Job, JobEvent, JobSpec, JobState, Origin};
use crate::store::{Store, StoreError};

/// A row whose job is to be replaced by a new version.
#[derive(Debug, Clone)]
pub struct Update {
    pub origin: Origin,
    pub spec: JobSpec,
}

#[derive(Debug, Default)]
pub struct Found {
    pub updates: Vec<Update>,
    /// Rows whose job cannot be replaced now (a task at the provider).
    pub errors: Vec<RowError>,
    rows: std::collections::HashSet<(String, u64)>,
}

impl Found {
    /// Whether `origin` is a row this pass will update (so the ordinary check's
    /// "already in the database with different content" does not apply to it).
    pub fn is_update(&self, origin: &Origin) -> bool {
        self.rows.contains(&(origin.file.clone(), origin.line))
    }
}

/// Reads `paths` and lists the rows whose id is in `store` with other content.
/// Rows that are invalid or repeated are left to the ordinary check to report.
pub fn find(paths: &[PathBuf], store: &Store) -> Result<Found, IntakeError> {
    let mut found = Found::default();
    let mut tracker = DuplicateTracker::new();
    // The new versions' names must not meet another job's files either. Collisions
    // between two rows' own names are the ordinary check's to report, not this one's.
    let mut outputs = OutputTracker::new();
    // Read at the first row to check (none when every row is already queued).
    let mut claimed = false;
    let mut to_name = Vec::new();
    let mut failure: Option<StoreError> = None;
    for path in paths {
        let mut on_row = |row: Result<(Origin, JobSpec), RowError>| {
            if failure.is_some() {
                return;
            }
            let Ok((origin, spec)) = row else { return };
            if !matches!(tracker.check(&origin, &spec), Ok(RowStatus::New)) {
                return;
            }
            let mut claim = |outputs: &mut OutputTracker| {
                if !claimed {
                    claimed = true;
                    crate::intake::claim_existing(store, outputs)
                } else {
                    Ok(())
                }
            };
            let existing = match store.get(&spec.id) {
                Ok(Some(j)) => j,
                Ok(None) => {
                    if let Err(e) = claim(&mut outputs) {
                        failure = Some(e);
                        return;
                    }
                    if let Err(c) = outputs.check(&origin, &spec, false) {
                        if c.version {
                            crate::intake::push_conflict(
                                &mut found.errors,
                                &mut to_name,
                                origin,
                                c,
                            );
                        }
                    }
                    return;
                }
                Err(e) => {
                    failure = Some(e);
                    return;
                }
            };
            if existing.content_hash == spec.content_hash() {
                return;
            }
            let next = match store.versions(&spec.id) {
                Ok(v) => v.len() as u32 + 2,
                Err(e) => {
                    failure = Some(e);
                    return;
                }
            };
            if let Err(e) = claim(&mut outputs) {
                failure = Some(e);
                return;
            }
            let versioned = JobSpec {
                output: Some(versioned_output(&spec, next)),
                ..spec.clone()
            };
            if let Err(c) = outputs.check(&origin, &versioned, true) {
                // An update all the same: the ordinary "different content" error is
                // not this row's problem.
                found.rows.insert((origin.file.clone(), origin.line));
                crate::intake::push_conflict(&mut found.errors, &mut to_name, origin, c);
                return;
            }
            if existing.state == JobState::Submitting || existing.state.has_remote_task() {
                found.errors.push(RowError {
                    reason: format!(
                        "job {:?} is {} at {}: let `pixbatch run` finish it (or `pixbatch cancel` it) before updating it",
                        spec.id, existing.state, existing.spec.provider
                    ),
                    origin,
                });
                return;
            }
            found.rows.insert((origin.file.clone(), origin.line));
            found.updates.push(Update { origin, spec });
        };
        manifest::read_manifest(path, &mut on_row)?;
        if let Some(e) = failure.take() {
            return Err(e.into());
        }
    }
    crate::intake::name_conflicts(store, &mut found.errors, &to_name)?;
    Ok(found)
}

/// Replaces each job with its new version; returns how many were replaced.
pub fn apply(store: &Store, updates: &[Update]) -> Result<u64, StoreError> {
    let now = now_ms();
    let mut n = 0;
    for u in updates {
        let Some(old) = store.get(&u.spec.id)? else {
            continue;
        };
        let old_version = store.versions(&u.spec.id)?.len() as u32 + 1;
        let new_version = old_version + 1;
        let job = new_version_of(&old, u, new_version, now);
        if !store.replace_with_version(&job, old_version)? {
            continue;
        }
        let files: Vec<&str> = old.outputs.iter().map(|o| o.path.as_str()).collect();
        store.add_event(
            job.id(),
            &JobEvent {
                at_ms: now,
                kind: EventKind::Enqueued,
                message: format!(
                    "version {new_version} from {} replaces version {old_version} (from {}, {}{}); results go to {}; submissions continue at {}",
                    u.origin,
                    old.origin,
                    old.state,
                    if files.is_empty() {
                        String::new()
                    } else {
                        format!(", files kept: {}", files.join(", "))
                    },
                    job.spec.output.as_deref().unwrap_or(""),
                    crate::engine::spend::next_submit_key(&job),
                ),
            },
        )?;
        n += 1;
    }
    store.flush()?;
    Ok(n)
}

/// The new version's job: the row's spec with versioned output names, queued, its
/// content hash the row's (so the next plain enqueue sees "already queued").
pub fn new_version_of(old: &Job, update: &Update, version: u32, now: u64) -> Job {
    let mut spec = update.spec.clone();
    let row_hash = spec.content_hash();
    spec.output = Some(versioned_output(&update.spec, version));
    let mut job = Job::new(spec, update.origin.clone(), now);
    job.content_hash = row_hash;
    job.submissions = old.submissions + 1;
    job
}

/// The `output` of version `n` of a row: its file stem with `.vN` appended.
pub fn versioned_output(spec: &JobSpec, version: u32) -> String {
    let suffix = format!(".v{version}");
    match spec
        .output
        .as_deref()
        .map(str::trim)
        .filter(|o| !o.is_empty())
    {
        None => format!("{}{suffix}", spec.id),
        Some(o) if o.ends_with('/') => format!("{o}{}{suffix}", spec.id),
        Some(o) => format!("{o}{suffix}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{OutputFile, ProviderKind};
    use crate::store::StoreOptions;

    fn spec(id: &str, prompt: &str, output: Option<&str>) -> JobSpec {
        JobSpec {
            id: id.into(),
            provider: ProviderKind::Topaz,
            operation: "enhance".into(),
            inputs: vec!["/tmp/x.png".into()],
            prompt: Some(prompt.into()),
            params_json: "{}".into(),
            output: output.map(str::to_string),
            metadata: Vec::new(),
        }
    }

    fn origin(line: u64) -> Origin {
        Origin {
            file: "m.csv".into(),
            line,
        }
    }

    #[test]
    fn versioned_names_keep_the_folder_and_stem() {
        assert_eq!(versioned_output(&spec("a", "", None), 2), "a.v2");
        assert_eq!(versioned_output(&spec("a", "", Some("d/")), 3), "d/a.v3");
        assert_eq!(versioned_output(&spec("a", "", Some("d/x")), 2), "d/x.v2");
        let rel = crate::download::output_relative_path(
            &JobSpec {
                output: Some(versioned_output(&spec("a", "", Some("d/")), 2)),
                ..spec("a", "", Some("d/"))
            },
            0,
            1,
            "png",
        );
        assert_eq!(rel, std::path::PathBuf::from("d/a.v2.png"));
    }

    #[test]
    fn a_new_version_keeps_the_old_one_and_continues_the_submissions() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("db"), &StoreOptions::default()).unwrap();
        let mut old = Job::new(spec("a", "one", None), origin(2), 1);
        old.state = JobState::Done;
        old.submissions = 2;
        old.outputs.push(OutputFile {
            index: 0,
            path: "a.png".into(),
            size: 3,
            sha256: "abc".into(),
            width: None,
            height: None,
        });
        store.insert_new(std::slice::from_ref(&old)).unwrap();
        let update = Update {
            origin: origin(3),
            spec: spec("a", "two", None),
        };
        assert_eq!(apply(&store, std::slice::from_ref(&update)).unwrap(), 1);
        let now = store.get("a").unwrap().unwrap();
        assert_eq!(now.state, JobState::Queued);
        assert_eq!(now.submissions, 3);
        assert_eq!(now.content_hash, update.spec.content_hash());
        assert_eq!(now.spec.output.as_deref(), Some("a.v2"));
        let versions = store.versions("a").unwrap();
        assert_eq!(versions.len(), 1);
        assert_eq!(versions[0].0, 1);
        assert_eq!(versions[0].1, old);
        assert_eq!(store.count(JobState::Done, ProviderKind::Topaz).unwrap(), 0);
        assert_eq!(
            store.count(JobState::Queued, ProviderKind::Topaz).unwrap(),
            1
        );
        // A third version is numbered on.
        let third = Update {
            origin: origin(4),
            spec: spec("a", "three", None),
        };
        apply(&store, &[third]).unwrap();
        let versions = store.versions("a").unwrap();
        assert_eq!(versions.iter().map(|v| v.0).collect::<Vec<_>>(), vec![1, 2]);
        assert_eq!(
            store.get("a").unwrap().unwrap().spec.output.as_deref(),
            Some("a.v3")
        );
    }
}
