//! `pixbatch verify`: every done job's files against the database, and every file
//! under the output folder against the jobs that wrote it.
//!
//! Three kinds of problem: a recorded output that is not there (missing), one whose
//! bytes no longer hash to the recorded SHA-256 (changed), and a file under the output
//! folder that no job of the database records (foreign: a result kept aside because
//! its name was taken, another database's result, a leftover `.part`, or something
//! put there by hand). Earlier versions' files (`--update`) are not foreign; only the
//! current version of a job is checked for missing and changed files, since the old
//! ones are the user's to keep or delete.
//!
//! The caller holds the database (no run writes meanwhile); this reads every job
//! once and every file under the folder once.

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::model::JobState;
use crate::store::{Store, StoreError};

#[derive(Debug, thiserror::Error)]
pub enum VerifyError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("reading the output folder {path}: {message}")]
    Walk { path: String, message: String },
}

/// What is wrong with one file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "problem", rename_all = "snake_case")]
pub enum Problem {
    Missing,
    Changed {
        recorded_sha256: String,
        /// The file's SHA-256, or why it could not be read.
        file_sha256: String,
    },
    Foreign,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Finding {
    /// The job that records the file (none for a foreign file).
    pub job: Option<String>,
    /// The file, as the output folder joined with its recorded path.
    pub path: String,
    #[serde(flatten)]
    pub problem: Problem,
}

impl std::fmt::Display for Finding {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let job = self.job.as_deref().unwrap_or("-");
        match &self.problem {
            Problem::Missing => write!(f, "{job}: {}: missing", self.path),
            Problem::Changed {
                recorded_sha256,
                file_sha256,
            } => write!(
                f,
                "{job}: {}: changed (sha256 recorded {recorded_sha256}, file {file_sha256})",
                self.path
            ),
            Problem::Foreign => write!(f, "{job}: {}: foreign file", self.path),
        }
    }
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct Verified {
    pub done_jobs: u64,
    /// Recorded outputs of done jobs that were hashed.
    pub files_checked: u64,
    /// Files found under the output folders.
    pub files_found: u64,
    /// The output folders looked at (each job's recorded one, or `--out`).
    pub folders: Vec<String>,
    pub problems: Vec<Finding>,
}

impl Verified {
    pub fn ok(&self) -> bool {
        self.problems.is_empty()
    }

    pub fn count(&self, kind: fn(&Problem) -> bool) -> usize {
        self.problems.iter().filter(|p| kind(&p.problem)).count()
    }
}

/// A path as people want to read it: relative to the current folder when under it.
fn shown(path: &Path) -> String {
    std::env::current_dir()
        .ok()
        .and_then(|cwd| path.strip_prefix(cwd).ok().map(Path::to_path_buf))
        .unwrap_or_else(|| path.to_path_buf())
        .display()
        .to_string()
}

/// Where a job's files are: under `out_override` (`verify --out`) if given, else
/// under the folder the job recorded when it wrote them, else under `default_out`
/// (jobs written before folders were recorded).
fn job_root(out_override: Option<&Path>, recorded: Option<&str>, default_out: &Path) -> PathBuf {
    let root = out_override
        .map(Path::to_path_buf)
        .or_else(|| recorded.map(PathBuf::from))
        .unwrap_or_else(|| default_out.to_path_buf());
    std::path::absolute(&root).unwrap_or(root)
}

/// Checks `store`'s done jobs against their output folders (see [`job_root`]), and
/// every such folder against every job. Paths starting with one of `skip` (the
/// database's own files, when they sit inside an output folder) are not looked at.
pub fn verify(
    store: &Store,
    out_override: Option<&Path>,
    default_out: &Path,
    skip: &[PathBuf],
) -> Result<Verified, VerifyError> {
    let mut v = Verified::default();
    // Every recorded file, by its full path; and every folder files were written to.
    let mut known: HashSet<PathBuf> = HashSet::new();
    let mut roots: std::collections::BTreeSet<PathBuf> = Default::default();
    if let Some(o) = out_override {
        roots.insert(job_root(Some(o), None, default_out));
    }
    for job in store.all_jobs() {
        let job = job?;
        let root = job_root(out_override, job.out_dir.as_deref(), default_out);
        let done = job.state == JobState::Done;
        if done {
            v.done_jobs += 1;
        }
        if !job.outputs.is_empty() {
            roots.insert(root.clone());
        }
        for o in &job.outputs {
            let path = root.join(&o.path);
            known.insert(path.clone());
            if !done {
                continue;
            }
            v.files_checked += 1;
            let shown = shown(&path);
            let problem = match std::fs::symlink_metadata(&path) {
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Some(Problem::Missing),
                Err(e) => Some(Problem::Changed {
                    recorded_sha256: o.sha256.clone(),
                    file_sha256: format!("unreadable: {e}"),
                }),
                Ok(_) => match crate::download::file_sha256(&path) {
                    Some(h) if h == o.sha256 => None,
                    found => Some(Problem::Changed {
                        recorded_sha256: o.sha256.clone(),
                        file_sha256: found.unwrap_or_else(|| "unreadable".into()),
                    }),
                },
            };
            if let Some(problem) = problem {
                v.problems.push(Finding {
                    job: Some(job.id().to_string()),
                    path: shown,
                    problem,
                });
            }
        }
    }
    for job in store.all_versions() {
        let job = job?;
        let root = job_root(out_override, job.out_dir.as_deref(), default_out);
        for o in job.outputs {
            known.insert(root.join(o.path));
        }
    }
    if roots.is_empty() {
        roots.insert(job_root(None, None, default_out));
    }
    let skip: Vec<PathBuf> = skip
        .iter()
        .map(|p| std::path::absolute(p).unwrap_or_else(|_| p.clone()))
        .collect();
    for root in &roots {
        let mut files = Vec::new();
        if root.exists() {
            walk(root, Path::new(""), &skip, &mut files)?;
        }
        files.sort();
        for rel in files {
            v.files_found += 1;
            let path = root.join(&rel);
            if !known.contains(&path) {
                v.problems.push(Finding {
                    job: None,
                    path: shown(&path),
                    problem: Problem::Foreign,
                });
            }
        }
    }
    v.folders = roots.iter().map(|r| shown(r)).collect();
    Ok(v)
}

/// Every entry under `root/rel` that is not a folder, as `/`-joined relative paths
/// (the way outputs are recorded). Symbolic links are not followed.
fn walk(
    root: &Path,
    rel: &Path,
    skip: &[PathBuf],
    files: &mut Vec<String>,
) -> Result<(), VerifyError> {
    let dir = root.join(rel);
    let walk_err = |e: std::io::Error| VerifyError::Walk {
        path: dir.display().to_string(),
        message: e.to_string(),
    };
    for entry in std::fs::read_dir(&dir).map_err(walk_err)? {
        let entry = entry.map_err(walk_err)?;
        let path = entry.path();
        let abs = std::path::absolute(&path).unwrap_or_else(|_| path.clone());
        if skip.iter().any(|s| {
            abs.as_os_str()
                .as_encoded_bytes()
                .starts_with(s.as_os_str().as_encoded_bytes())
        }) {
            continue;
        }
        let child = rel.join(entry.file_name());
        if entry.file_type().map_err(walk_err)?.is_dir() {
            walk(root, &child, skip, files)?;
        } else {
            let parts: Vec<String> = child
                .components()
                .map(|c| c.as_os_str().to_string_lossy().into_owned())
                .collect();
            files.push(parts.join("/"));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Job, JobSpec, Origin, OutputFile, ProviderKind};
    use crate::store::StoreOptions;

    fn job(id: &str, state: JobState, files: &[(&str, &[u8])]) -> Job {
        let spec = JobSpec {
            id: id.into(),
            provider: ProviderKind::Topaz,
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
                file: "m.csv".into(),
                line: 2,
            },
            1,
        );
        j.state = state;
        for (i, (path, bytes)) in files.iter().enumerate() {
            j.outputs.push(OutputFile {
                index: i as u32,
                path: path.to_string(),
                size: bytes.len() as u64,
                sha256: hex::encode(<sha2::Sha256 as sha2::Digest>::digest(bytes)),
                width: None,
                height: None,
            });
        }
        j
    }

    #[test]
    fn earlier_versions_files_are_known_not_foreign() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("out");
        std::fs::create_dir_all(&out).unwrap();
        let store = Store::open(&dir.path().join("db"), &StoreOptions::default()).unwrap();
        store
            .insert_new(&[job("a", JobState::Done, &[("a.png", b"v1")])])
            .unwrap();
        let v2 = job("a", JobState::Done, &[("a.v2.png", b"v2")]);
        assert!(store.replace_with_version(&v2, 1).unwrap());
        std::fs::write(out.join("a.png"), b"v1").unwrap();
        std::fs::write(out.join("a.v2.png"), b"v2").unwrap();
        let v = verify(&store, Some(&out), &out, &[]).unwrap();
        assert!(v.ok(), "{:?}", v.problems);
        // The old version's file may go (it is the user's to keep); the current may not.
        std::fs::remove_file(out.join("a.png")).unwrap();
        assert!(verify(&store, Some(&out), &out, &[]).unwrap().ok());
        std::fs::remove_file(out.join("a.v2.png")).unwrap();
        let v = verify(&store, Some(&out), &out, &[]).unwrap();
        assert_eq!(v.problems.len(), 1);
        assert_eq!(v.problems[0].problem, Problem::Missing);
    }

    #[test]
    fn finds_missing_changed_and_foreign_files() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("out");
        std::fs::create_dir_all(out.join("d")).unwrap();
        let db = dir.path().join("db");
        let store = Store::open(&db, &StoreOptions::default()).unwrap();
        store
            .insert_new(&[
                job(
                    "a",
                    JobState::Done,
                    &[("a.png", b"aa"), ("d/a_1.png", b"a1")],
                ),
                job("b", JobState::Done, &[("b.png", b"bb")]),
                job("c", JobState::Done, &[("c.png", b"cc")]),
                // Not done: its file is known, not checked.
                job("f", JobState::Failed, &[("f.png", b"ff")]),
            ])
            .unwrap();
        std::fs::write(out.join("a.png"), b"aa").unwrap();
        std::fs::write(out.join("d/a_1.png"), b"a1").unwrap();
        std::fs::write(out.join("b.png"), b"changed").unwrap();
        std::fs::write(out.join("f.png"), b"whatever").unwrap();
        let v = verify(&store, Some(&out), &out, &[]).unwrap();
        let lines: Vec<String> = v.problems.iter().map(|p| p.to_string()).collect();
        let o = out.display();
        assert_eq!(lines.len(), 2, "{lines:?}");
        assert!(lines[0].starts_with(&format!(
            "b: {o}/b.png: changed (sha256 recorded {}",
            hex::encode(<sha2::Sha256 as sha2::Digest>::digest(b"bb"))
        )));
        assert_eq!(lines[1], format!("c: {o}/c.png: missing"));
        std::fs::write(out.join("c.png"), b"cc").unwrap();
        std::fs::write(out.join("b.png"), b"bb").unwrap();
        assert!(verify(&store, Some(&out), &out, &[]).unwrap().ok());
        std::fs::write(out.join("d/stray.png.part"), b"x").unwrap();
        let v = verify(&store, Some(&out), &out, &[]).unwrap();
        assert_eq!(
            v.problems,
            vec![Finding {
                job: None,
                path: format!("{o}/d/stray.png.part"),
                problem: Problem::Foreign
            }]
        );
        assert_eq!((v.done_jobs, v.files_checked, v.files_found), (3, 4, 6));
        // The database's own files inside the folder are skipped when named.
        let inside = Store::open(&out.join("pixbatch.db"), &StoreOptions::default()).unwrap();
        drop(inside);
        std::fs::remove_file(out.join("d/stray.png.part")).unwrap();
        assert!(verify(&store, Some(&out), &out, &[out.join("pixbatch.db")])
            .unwrap()
            .ok());
    }
}
