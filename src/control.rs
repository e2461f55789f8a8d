//! The running process answers reading commands over a Unix socket beside the
//! database (`<db>.sock`, mode 0600): sled lets one process open a database, so
//! `status`, `list`, `show` and `report` from another terminal ask the run instead
//! of opening it. One JSON `Query` line in, JSON answer lines out, then the
//! connection closes; an error is a line `{"error": "..."}`.
//!
//! `cancel` is the one query that changes jobs: the run cancels them itself (see
//! `engine::cancel`), since no other process may write its database. Only the user
//! the run belongs to is answered (the peer's uid is checked), on top of the
//! socket's mode.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};

use crate::engine::cancel::Canceller;
use crate::query::{self, LiveInfo, Query, QueryError};
use crate::store::Store;

/// Serves queries until dropped (the task is aborted with the guard).
pub struct ControlServer {
    path: PathBuf,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for ControlServer {
    fn drop(&mut self) {
        self.task.abort();
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Starts answering at `path`. `live` is called for each `status` to add the run's
/// own figures; `canceller` answers `cancel` (without one, `cancel` is refused).
pub fn serve(
    path: &Path,
    store: Store,
    live: Arc<dyn Fn() -> LiveInfo + Send + Sync>,
    canceller: Option<Canceller>,
) -> std::io::Result<ControlServer> {
    // A socket left by a killed run is stale: we hold the database lock, so no one
    // else is serving it.
    let _ = std::fs::remove_file(path);
    let listener = UnixListener::bind(path)?;
    {
        use std::os::unix::fs::PermissionsExt;
        let _ = std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600));
    }
    let task = tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            if !same_user(&stream) {
                tracing::warn!("control socket: refused a connection from another user");
                continue;
            }
            let store = store.clone();
            let live = live.clone();
            let canceller = canceller.clone();
            tokio::spawn(async move {
                if let Err(e) = handle(stream, store, live, canceller).await {
                    tracing::debug!("control connection: {e}");
                }
            });
        }
    });
    Ok(ControlServer {
        path: path.to_path_buf(),
        task,
    })
}

/// Whether the peer runs as the user this process runs as.
fn same_user(stream: &UnixStream) -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    let me = unsafe { libc::geteuid() };
    stream.peer_cred().is_ok_and(|c| c.uid() == me)
}

async fn handle(
    stream: UnixStream,
    store: Store,
    live: Arc<dyn Fn() -> LiveInfo + Send + Sync>,
    canceller: Option<Canceller>,
) -> std::io::Result<()> {
    let (read, mut write) = stream.into_split();
    let mut line = String::new();
    // One query line, capped so a stray client cannot make the run buffer forever.
    let mut reader = BufReader::new(read.take(64 * 1024));
    reader.read_line(&mut line).await?;
    let query: Query = match serde_json::from_str(&line) {
        Ok(q) => q,
        Err(e) => {
            let msg = serde_json::json!({ "error": format!("bad query: {e}") });
            write.write_all(format!("{msg}\n").as_bytes()).await?;
            return Ok(());
        }
    };
    if let Query::Cancel { ids } = &query {
        // One answer per job, a failure included, so one busy job does not hide
        // what happened to the others.
        for id in ids {
            let answer = match &canceller {
                Some(c) => c.cancel(id).await,
                None => Err("this process does not cancel jobs".to_string()),
            };
            let answer = answer.unwrap_or_else(|message| query::CancelAnswer {
                id: id.clone(),
                cancelled: false,
                message,
            });
            let line = serde_json::to_string(&answer)?;
            write.write_all(format!("{line}\n").as_bytes()).await?;
        }
        return write.shutdown().await;
    }
    let info = matches!(query, Query::Status).then(|| live());
    // The store is synchronous; answer on a blocking thread and stream lines back.
    let (tx, mut rx) = tokio::sync::mpsc::channel::<String>(256);
    let worker = tokio::task::spawn_blocking(move || {
        let mut emit = |v: serde_json::Value| -> std::io::Result<()> {
            tx.blocking_send(format!("{v}\n")).map_err(|_| {
                std::io::Error::new(std::io::ErrorKind::BrokenPipe, "reader went away")
            })
        };
        if let Err(e) = query::answer(&store, &query, info, &mut emit) {
            let _ = tx.blocking_send(format!(
                "{}\n",
                serde_json::json!({ "error": e.to_string() })
            ));
        }
    });
    while let Some(chunk) = rx.recv().await {
        write.write_all(chunk.as_bytes()).await?;
    }
    let _ = worker.await;
    write.shutdown().await
}

/// Asks the run serving `path`; calls `emit` for each answer line.
pub fn ask(
    path: &Path,
    query: &Query,
    emit: &mut dyn FnMut(serde_json::Value) -> std::io::Result<()>,
) -> Result<(), QueryError> {
    use std::io::{BufRead, Write};
    let mut stream = std::os::unix::net::UnixStream::connect(path)?;
    let mut line = serde_json::to_string(query)?;
    line.push('\n');
    stream.write_all(line.as_bytes())?;
    let reader = std::io::BufReader::new(stream);
    for line in reader.lines() {
        let line = line?;
        if line.trim().is_empty() {
            continue;
        }
        let value: serde_json::Value = serde_json::from_str(&line)?;
        if let Some(err) = value.get("error").and_then(|e| e.as_str()) {
            return Err(QueryError::Remote(err.to_string()));
        }
        emit(value)?;
    }
    Ok(())
}
