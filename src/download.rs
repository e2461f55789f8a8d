//! Getting result files into place, whole or not at all.
//!
//! Every file is written to `<final>.part`, flushed to disk (`sync_all`), checked
//! against the announced length, renamed over the final name, and the folder is
//! synced so the rename survives a power cut. The `.part` name is derived from the
//! final one, so a crash leaves at most one per output and the next attempt
//! overwrites it. The SHA-256 is computed while streaming.

use std::io::Write;
use std::path::{Component, Path, PathBuf};

use futures_util::StreamExt;
use sha2::{Digest, Sha256};

use crate::api::error_chain;
use crate::model::JobSpec;

#[derive(Debug, thiserror::Error)]
pub enum DownloadError {
    /// The server answered with an error status; `expired` when a fresh link may help.
    #[error("download answered HTTP {status}")]
    Status { status: u16, expired: bool },
    /// Cut off, reset, timed out: try again.
    #[error("download interrupted: {0}")]
    Interrupted(String),
    /// Larger than allowed.
    #[error("download refused: {0}")]
    TooLarge(String),
    /// The URL is not something we fetch.
    #[error("refusing to download {0}")]
    BadUrl(String),
    /// Writing the file failed (disk full, permissions …).
    #[error("writing {path}: {message}")]
    Io { path: String, message: String },
}

/// Size and SHA-256 of a file written into place.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Written {
    pub size: u64,
    pub sha256: String,
}

fn io_err(path: &Path, e: std::io::Error) -> DownloadError {
    DownloadError::Io {
        path: path.display().to_string(),
        message: e.to_string(),
    }
}

pub fn part_path(dest: &Path) -> PathBuf {
    let mut name = dest
        .file_name()
        .map(|n| n.to_os_string())
        .unwrap_or_default();
    name.push(".part");
    dest.with_file_name(name)
}

/// Streams `url` into `dest` through its `.part` file.
pub async fn fetch(
    client: &reqwest::Client,
    url: &str,
    dest: &Path,
    max_bytes: u64,
) -> Result<Written, DownloadError> {
    let parsed =
        url::Url::parse(url).map_err(|e| DownloadError::BadUrl(format!("{url:?}: {e}")))?;
    if !matches!(parsed.scheme(), "http" | "https") {
        return Err(DownloadError::BadUrl(format!(
            "{url:?}: only http(s) URLs are fetched"
        )));
    }
    let response = client
        .get(parsed)
        .send()
        .await
        .map_err(|e| DownloadError::Interrupted(error_chain(&e)))?;
    let status = response.status();
    if !status.is_success() {
        return Err(DownloadError::Status {
            status: status.as_u16(),
            // Presigned links answer 403 (or 410/400) once expired.
            expired: matches!(status.as_u16(), 400 | 401 | 403 | 404 | 410),
        });
    }
    let expected = response.content_length();
    if let Some(len) = expected {
        if len > max_bytes {
            return Err(DownloadError::TooLarge(format!(
                "{len} bytes announced, more than the {max_bytes}-byte limit"
            )));
        }
    }
    if let Some(parent) = dest.parent() {
        std::fs::create_dir_all(parent).map_err(|e| io_err(parent, e))?;
    }
    let part = part_path(dest);
    let mut file = std::fs::File::create(&part).map_err(|e| io_err(&part, e))?;
    let mut hasher = Sha256::new();
    let mut size: u64 = 0;
    let mut started_writeback: u64 = 0;
    let mut stream = response.bytes_stream();
    let result: Result<(), DownloadError> = async {
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.map_err(|e| DownloadError::Interrupted(error_chain(&e)))?;
            size += chunk.len() as u64;
            if size > max_bytes {
                return Err(DownloadError::TooLarge(format!(
                    "more than the {max_bytes}-byte limit"
                )));
            }
            hasher.update(&chunk);
            file.write_all(&chunk).map_err(|e| io_err(&part, e))?;
            if size >= started_writeback + WRITEBACK_STEP {
                start_writeback(&file, started_writeback, size - started_writeback);
                started_writeback = size;
            }
        }
        if let Some(len) = expected {
            if len != size {
                return Err(DownloadError::Interrupted(format!(
                    "got {size} of {len} bytes"
                )));
            }
        }
        if size == 0 {
            return Err(DownloadError::Interrupted("empty body".into()));
        }
        Ok(())
    }
    .await;
    if let Err(e) = result {
        drop(file);
        let _ = std::fs::remove_file(&part);
        return Err(e);
    }
    // The two fsyncs (file, then folder after the rename) wait for the disk: on a
    // blocking thread, so the async workers keep serving the other jobs meanwhile.
    let dest_owned = dest.to_path_buf();
    let synced = tokio::task::spawn_blocking(move || {
        let r = file.sync_all().map_err(|e| io_err(&part, e));
        drop(file);
        match r {
            Ok(()) => put_in_place(&part, &dest_owned),
            Err(e) => {
                let _ = std::fs::remove_file(&part);
                Err(e)
            }
        }
    })
    .await;
    match synced {
        Ok(r) => r?,
        Err(e) => return Err(DownloadError::Interrupted(format!("writing the file: {e}"))),
    }
    Ok(Written {
        size,
        sha256: hex::encode(hasher.finalize()),
    })
}

/// Writes bytes the provider returned inline (base64 answers) the same way.
pub fn write_bytes(dest: &Path, data: &[u8]) -> Result<Written, DownloadError> {
    if let Some(parent) = dest.parent() {
        std::fs::create_dir_all(parent).map_err(|e| io_err(parent, e))?;
    }
    let part = part_path(dest);
    let result = (|| {
        let mut file = std::fs::File::create(&part)?;
        file.write_all(data)?;
        file.sync_all()
    })();
    if let Err(e) = result {
        let _ = std::fs::remove_file(&part);
        return Err(io_err(&part, e));
    }
    put_in_place(&part, dest)?;
    Ok(Written {
        size: data.len() as u64,
        sha256: hex::encode(Sha256::digest(data)),
    })
}

/// Written bytes after which the disk is asked to start writing them out.
const WRITEBACK_STEP: u64 = 8 << 20;

/// Asks the kernel to start writing `len` bytes from `offset` to the disk now, without
/// waiting: the fsync at the end of a large download then finds most of the file
/// already written, instead of writing all of it after the last byte arrived.
fn start_writeback(file: &std::fs::File, offset: u64, len: u64) {
    #[cfg(target_os = "linux")]
    {
        use std::os::unix::io::AsRawFd;
        let (Ok(offset), Ok(len)) = (i64::try_from(offset), i64::try_from(len)) else {
            return;
        };
        // SAFETY: a plain syscall on an open file descriptor we own; a failure only
        // means the final fsync does all the work.
        unsafe {
            libc::sync_file_range(file.as_raw_fd(), offset, len, libc::SYNC_FILE_RANGE_WRITE);
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = (file, offset, len);
}

fn put_in_place(part: &Path, dest: &Path) -> Result<(), DownloadError> {
    std::fs::rename(part, dest).map_err(|e| {
        let _ = std::fs::remove_file(part);
        io_err(dest, e)
    })?;
    // Make the rename itself durable.
    if let Some(parent) = dest.parent() {
        if let Ok(dir) = std::fs::File::open(parent) {
            let _ = dir.sync_all();
        }
    }
    Ok(())
}

/// Is the file at `path` the one recorded (same size and SHA-256)?
pub fn already_in_place(path: &Path, size: u64, sha256: &str) -> bool {
    let Ok(meta) = std::fs::metadata(path) else {
        return false;
    };
    if meta.len() != size {
        return false;
    }
    let Ok(mut f) = std::fs::File::open(path) else {
        return false;
    };
    let mut h = Sha256::new();
    if std::io::copy(&mut f, &mut h).is_err() {
        return false;
    }
    hex::encode(h.finalize()) == sha256
}

/// Removes a leftover `.part` of `dest`, if any.
pub fn remove_part(dest: &Path) {
    let _ = std::fs::remove_file(part_path(dest));
}

/// The path, relative to the output folder, of output `index` of `count` of a job.
///
/// `output` empty: `<job id>.<ext>`; ending in `/`: `<output>/<job id>.<ext>`;
/// otherwise a file stem: `<output>.<ext>`. Several outputs get `_<index>` before
/// the extension. Components that could leave the output folder are dropped: the
/// manifest reader refuses them already, this is the second lock.
pub fn output_relative_path(spec: &JobSpec, index: usize, count: usize, ext: &str) -> PathBuf {
    let id = sanitize_component(&spec.id);
    let (dir, stem) = match spec
        .output
        .as_deref()
        .map(str::trim)
        .filter(|s| !s.is_empty())
    {
        None => (PathBuf::new(), id),
        Some(o) if o.ends_with('/') => (safe_relative(o), id),
        Some(o) => {
            let p = safe_relative(o);
            let stem = p
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_else(|| id.clone());
            (p.parent().map(Path::to_path_buf).unwrap_or_default(), stem)
        }
    };
    let ext = sanitize_component(ext.trim_start_matches('.'));
    let name = if count > 1 {
        format!("{stem}_{index}.{ext}")
    } else {
        format!("{stem}.{ext}")
    };
    dir.join(name)
}

fn safe_relative(s: &str) -> PathBuf {
    let mut out = PathBuf::new();
    for c in Path::new(s).components() {
        if let Component::Normal(part) = c {
            let part = sanitize_component(&part.to_string_lossy());
            if !part.is_empty() {
                out.push(part);
            }
        }
    }
    out
}

fn sanitize_component(s: &str) -> String {
    let cleaned: String = s
        .chars()
        .filter(|c| !c.is_control() && *c != '/' && *c != '\\')
        .take(200)
        .collect();
    if cleaned.is_empty() || cleaned == "." || cleaned == ".." {
        "_".into()
    } else {
        cleaned
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::ProviderKind;

    fn spec(id: &str, output: Option<&str>) -> JobSpec {
        JobSpec {
            id: id.into(),
            provider: ProviderKind::Topaz,
            operation: "enhance".into(),
            inputs: vec![],
            prompt: None,
            params_json: "{}".into(),
            output: output.map(Into::into),
        }
    }

    #[test]
    fn output_paths_never_leave_the_folder() {
        assert_eq!(
            output_relative_path(&spec("a", None), 0, 1, "jpg"),
            PathBuf::from("a.jpg")
        );
        assert_eq!(
            output_relative_path(&spec("a", None), 1, 3, "png"),
            PathBuf::from("a_1.png")
        );
        assert_eq!(
            output_relative_path(&spec("a", Some("x/y/")), 0, 1, "jpg"),
            PathBuf::from("x/y/a.jpg")
        );
        assert_eq!(
            output_relative_path(&spec("a", Some("x/pic")), 0, 1, "jpg"),
            PathBuf::from("x/pic.jpg")
        );
        for hostile in [
            "../../etc/passwd",
            "/etc/passwd",
            "a/../../b",
            "..",
            "x/\0y",
        ] {
            let p = output_relative_path(&spec("a", Some(hostile)), 0, 1, "jpg");
            assert!(p.is_relative(), "{hostile}: {p:?}");
            assert!(
                !p.components().any(|c| matches!(c, Component::ParentDir)),
                "{hostile}: {p:?}"
            );
            assert!(!p.to_string_lossy().contains('\0'));
        }
        let p = output_relative_path(&spec("..", None), 0, 1, "../x");
        assert_eq!(p.components().count(), 1, "{p:?}");
    }

    #[test]
    fn inline_bytes_land_whole_with_their_hash() {
        let dir = tempfile::tempdir().unwrap();
        let dest = dir.path().join("sub/a.png");
        let w = write_bytes(&dest, b"hello").unwrap();
        assert_eq!(w.size, 5);
        assert_eq!(std::fs::read(&dest).unwrap(), b"hello");
        assert!(!part_path(&dest).exists());
        assert!(already_in_place(&dest, 5, &w.sha256));
        assert!(!already_in_place(&dest, 5, "00"));
    }
}
