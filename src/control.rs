//! The running process answers reading commands over a Unix socket beside the
//! database (`<db>.sock`, mode 0600): sled lets one process open a database, so
//! `status`, `list`, `show` and `report` from another terminal ask the run instead
//! of opening it. One JSON `Query` line in, then [`Frame`] lines out: one
//! `{"row": ...}` per answer, and last either `{"end": {"rows": N}}` or
//! `{"failure": {"message": "..."}}`. A row is never read as an error, whatever it
//! holds (a job's `error` text is a row like any other), and an answer cut short
//! (the run killed mid-answer) is told apart from a complete one by the missing end.
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

/// One line of an answer on the control socket. Rows travel inside an envelope so
/// their content never decides how the client reads them: the reply to `list` used
/// to be bare rows, and a client that took any top-level `"error"` key for a failed
/// request stopped at the first failed job.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Frame {
    /// One answer: a status report, a job row, a job, a cancel answer.
    Row(serde_json::Value),
    /// The answer is complete; `rows` rows came before it.
    End { rows: u64 },
    /// The query failed; rows before it (if any) are a partial answer.
    Failure { message: String },
}

impl Frame {
    fn line(&self) -> String {
        // A Frame holds only JSON values and strings: encoding it cannot fail.
        let mut line = serde_json::to_string(self).unwrap_or_else(|e| {
            format!(r#"{{"failure":{{"message":"encoding an answer: {e}"}}}}"#)
        });
        line.push('\n');
        line
    }
}

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
            let failure = Frame::Failure {
                message: format!("bad query: {e}"),
            };
            write.write_all(failure.line().as_bytes()).await?;
            return write.shutdown().await;
        }
    };
    if let Query::Cancel { ids } = &query {
        // One answer per job, a failure included, so one busy job does not hide
        // what happened to the others.
        let mut rows = 0;
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
            let row = Frame::Row(serde_json::to_value(&answer)?);
            write.write_all(row.line().as_bytes()).await?;
            rows += 1;
        }
        write
            .write_all(Frame::End { rows }.line().as_bytes())
            .await?;
        return write.shutdown().await;
    }
    let info = matches!(query, Query::Status).then(|| live());
    // The store is synchronous; answer on a blocking thread and stream lines back.
    let (tx, mut rx) = tokio::sync::mpsc::channel::<String>(256);
    let worker = tokio::task::spawn_blocking(move || {
        let mut rows = 0u64;
        let mut emit = |v: serde_json::Value| -> std::io::Result<()> {
            rows += 1;
            tx.blocking_send(Frame::Row(v).line()).map_err(|_| {
                std::io::Error::new(std::io::ErrorKind::BrokenPipe, "reader went away")
            })
        };
        let last = match query::answer(&store, &query, info, &mut emit) {
            Ok(()) => Frame::End { rows },
            Err(e) => Frame::Failure {
                message: e.to_string(),
            },
        };
        let _ = tx.blocking_send(last.line());
    });
    while let Some(chunk) = rx.recv().await {
        write.write_all(chunk.as_bytes()).await?;
    }
    let _ = worker.await;
    write.shutdown().await
}

/// Asks the run serving `path`; calls `emit` for each row of the answer. Fails
/// with the run's message on a failure frame, and when the answer ends without its
/// end frame (the run went away mid-answer): a partial `list` is never taken for a
/// whole one.
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
    let mut received = 0u64;
    for line in reader.lines() {
        let line = line?;
        if line.trim().is_empty() {
            continue;
        }
        let frame: Frame = serde_json::from_str(&line).map_err(|e| {
            QueryError::Remote(format!(
                "the running process sent an answer this pixbatch cannot read \
                 (is it another version?): {e}"
            ))
        })?;
        match frame {
            Frame::Row(value) => {
                received += 1;
                emit(value)?;
            }
            Frame::End { rows } if rows == received => return Ok(()),
            Frame::End { rows } => {
                return Err(QueryError::Remote(format!(
                    "the running process announced {rows} rows but sent {received}"
                )))
            }
            Frame::Failure { message } => return Err(QueryError::Remote(message)),
        }
    }
    Err(QueryError::Remote(format!(
        "the running process stopped answering after {received} rows (did the run end?)"
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Serves one connection at a fresh socket with `reply` as the raw answer, and
    /// returns what `ask` made of it.
    fn ask_with_reply(reply: &'static str) -> (Vec<serde_json::Value>, Result<(), QueryError>) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("test.sock");
        let listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
        let server = std::thread::spawn(move || {
            use std::io::{BufRead, Write};
            let (stream, _) = listener.accept().unwrap();
            let mut line = String::new();
            std::io::BufReader::new(&stream)
                .read_line(&mut line)
                .unwrap();
            (&stream).write_all(reply.as_bytes()).unwrap();
        });
        let mut rows = Vec::new();
        let result = ask(&path, &Query::Status, &mut |v| {
            rows.push(v);
            Ok(())
        });
        server.join().unwrap();
        (rows, result)
    }

    #[test]
    fn a_row_with_an_error_field_is_a_row() {
        let (rows, result) = ask_with_reply(
            "{\"row\":{\"id\":\"a\",\"error\":\"refused\"}}\n{\"row\":{\"id\":\"b\"}}\n{\"end\":{\"rows\":2}}\n",
        );
        assert!(result.is_ok(), "{result:?}");
        assert_eq!(rows.len(), 2);
        assert_eq!(rows[0]["error"], "refused");
    }

    #[test]
    fn an_answer_without_its_end_is_an_error_not_a_short_list() {
        let (rows, result) = ask_with_reply("{\"row\":{\"id\":\"a\"}}\n");
        assert_eq!(rows.len(), 1);
        let err = result.unwrap_err().to_string();
        assert!(err.contains("stopped answering after 1 rows"), "{err}");
    }

    #[test]
    fn a_failure_frame_carries_the_message_and_a_wrong_count_is_caught() {
        let (_, result) =
            ask_with_reply("{\"failure\":{\"message\":\"no job with id \\\"x\\\"\"}}\n");
        assert!(result.unwrap_err().to_string().contains("no job with id"));
        let (_, result) = ask_with_reply("{\"row\":1}\n{\"end\":{\"rows\":2}}\n");
        assert!(result
            .unwrap_err()
            .to_string()
            .contains("announced 2 rows but sent 1"));
        let (_, result) = ask_with_reply("{\"id\":\"bare row from an older run\"}\n");
        assert!(result.unwrap_err().to_string().contains("another version"));
    }

    #[test]
    fn frames_round_trip() {
        for frame in [
            Frame::Row(serde_json::json!({"error": "x"})),
            Frame::End { rows: 3 },
            Frame::Failure {
                message: "boom".into(),
            },
        ] {
            let line = frame.line();
            assert!(line.ends_with('\n'));
            let back: Frame = serde_json::from_str(line.trim_end()).unwrap();
            assert_eq!(back, frame);
        }
    }
}
