//! Getting result files into place, whole or not at all.
//!
//! Every file is written to `<final>.<job>.part`, flushed to disk (`sync_all`),
//! checked against the announced length, put in place under the final name, and the
//! folder is synced so the rename survives a power cut. The `.part` name is derived
//! from the final one and the job (a hash of its id), so a crash leaves at most one
//! per output and job, the next attempt overwrites it, and two jobs never write into
//! one `.part`. The SHA-256 is computed while streaming, of the bytes written.
//!
//! No paid result replaces another job's ([`put_in_place`]): a final name that is
//! already there is replaced only when the file is this job's own (recorded by it,
//! or put there by it in this process); when another job placed it, or no one we
//! know of did, the new result is kept beside it (`NAME.kept-<job>.EXT`) and the
//! download ends in [`DownloadError::Taken`].

use std::io::Write;
use std::path::{Component, Path, PathBuf};

use futures_util::StreamExt;
use sha2::{Digest, Sha256};

use crate::api::error_chain;
use crate::failpoint;
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
    /// The final name holds a file that is not this job's (`by`: the job that put
    /// it there, when this process knows). The result is whole at `kept`.
    #[error("{path} is already there ({}); this result is kept as {kept}", by.as_deref().map(|j| format!("written by job {j:?}")).unwrap_or_else(|| "not written by this job".into()))]
    Taken {
        path: String,
        kept: String,
        by: Option<String>,
    },
    /// Writing the file failed (disk full, permissions …). `out_of_space`: the disk
    /// or the quota is full, which no retry of this job will fix.
    #[error("writing {path}: {message}")]
    Io {
        path: String,
        message: String,
        out_of_space: bool,
    },
}

impl DownloadError {
    /// The disk (or quota) is full: the run should stop rather than retry.
    pub fn is_out_of_space(&self) -> bool {
        matches!(
            self,
            DownloadError::Io {
                out_of_space: true,
                ..
            }
        )
    }
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
        out_of_space: failpoint::is_out_of_space(&e),
    }
}

/// Which job a file is written for, and what it may replace.
#[derive(Debug, Clone, Copy)]
pub struct Owner<'a> {
    pub job: &'a str,
    /// The SHA-256 the job recorded for the file at the final name (an earlier
    /// attempt of its own): a file still with that hash may be replaced.
    pub recorded: Option<&'a str>,
}

pub fn part_path(dest: &Path, job: &str) -> PathBuf {
    let mut name = dest
        .file_name()
        .map(|n| n.to_os_string())
        .unwrap_or_default();
    name.push(format!(
        ".{}.part",
        &hex::encode(Sha256::digest(job.as_bytes()))[..8]
    ));
    dest.with_file_name(name)
}

/// Streams `url` into `dest` through its `.part` file; `received` hears of every
/// chunk as it arrives (the run's byte counter).
pub async fn fetch(
    client: &reqwest::Client,
    url: &str,
    dest: &Path,
    owner: Owner<'_>,
    max_bytes: u64,
    received: &(dyn Fn(u64) + Sync),
) -> Result<Written, DownloadError> {
    let shown = crate::providers::util::redact_url(url);
    let parsed =
        url::Url::parse(url).map_err(|e| DownloadError::BadUrl(format!("{shown}: {e}")))?;
    if !matches!(parsed.scheme(), "http" | "https") {
        return Err(DownloadError::BadUrl(format!(
            "{shown}: only http(s) URLs are fetched"
        )));
    }
    // Every provider documents https result links; a plain one to another machine
    // could be altered on the way (as the provider URLs, only loopback may be http).
    if parsed.scheme() == "http" && !crate::config::is_loopback(&parsed) {
        return Err(DownloadError::BadUrl(format!(
            "{shown}: plain http to a host that is not loopback; result links must be https"
        )));
    }
    let response = client.get(parsed).send().await.map_err(|e| {
        if e.is_redirect() {
            DownloadError::BadUrl(format!("{shown}: {}", error_chain(&e)))
        } else {
            DownloadError::Interrupted(error_chain(&e))
        }
    })?;
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
    let part = part_path(dest, owner.job);
    let mut file = std::fs::File::create(&part).map_err(|e| io_err(&part, e))?;
    let mut hasher = Sha256::new();
    let mut size: u64 = 0;
    let mut started_writeback: u64 = 0;
    let mut stream = response.bytes_stream();
    let result: Result<(), DownloadError> = async {
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.map_err(|e| DownloadError::Interrupted(error_chain(&e)))?;
            size += chunk.len() as u64;
            received(chunk.len() as u64);
            if size > max_bytes {
                return Err(DownloadError::TooLarge(format!(
                    "more than the {max_bytes}-byte limit"
                )));
            }
            hasher.update(&chunk);
            failpoint::io("download-write")
                .and_then(|()| file.write_all(&chunk))
                .map_err(|e| io_err(&part, e))?;
            if size == chunk.len() as u64 {
                failpoint::hit("mid-download");
            }
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
    let sha256 = hex::encode(hasher.finalize());
    // The two fsyncs (file, then folder after the rename) wait for the disk: on a
    // blocking thread, so the async workers keep serving the other jobs meanwhile.
    let dest_owned = dest.to_path_buf();
    let job = owner.job.to_string();
    let recorded = owner.recorded.map(str::to_string);
    let hash = sha256.clone();
    let synced = tokio::task::spawn_blocking(move || {
        let r = file.sync_all().map_err(|e| io_err(&part, e));
        drop(file);
        match r {
            Ok(()) => {
                failpoint::hit("before-rename");
                let owner = Owner {
                    job: &job,
                    recorded: recorded.as_deref(),
                };
                put_in_place(&part, &dest_owned, owner, &hash)
            }
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
    Ok(Written { size, sha256 })
}

/// How the HTTP clients follow redirects: at most 10, and never to plain http on
/// another machine from https or from loopback (that would undo the https-only rule
/// for result links and provider URLs behind the caller's back).
pub fn redirect_policy() -> reqwest::redirect::Policy {
    reqwest::redirect::Policy::custom(|attempt| {
        // A chain that began on plain http to another machine (an input URL the user
        // gave) may go on so; one that began on https or on loopback may not.
        let began_plain_remote = attempt
            .previous()
            .first()
            .is_some_and(|u| u.scheme() == "http" && !crate::config::is_loopback(u));
        let downgrade = attempt.url().scheme() == "http"
            && !crate::config::is_loopback(attempt.url())
            && !began_plain_remote;
        if downgrade {
            let to = crate::providers::util::redact_url(attempt.url().as_str());
            attempt.error(format!(
                "refusing a redirect from https to plain http ({to})"
            ))
        } else if attempt.previous().len() >= 10 {
            attempt.error("more than 10 redirects")
        } else {
            attempt.follow()
        }
    })
}

/// Writes bytes the provider returned inline (base64 answers) the same way.
pub fn write_bytes(dest: &Path, owner: Owner<'_>, data: &[u8]) -> Result<Written, DownloadError> {
    if let Some(parent) = dest.parent() {
        std::fs::create_dir_all(parent).map_err(|e| io_err(parent, e))?;
    }
    let part = part_path(dest, owner.job);
    let result = (|| {
        let mut file = std::fs::File::create(&part)?;
        failpoint::io("download-write")?;
        file.write_all(data)?;
        failpoint::hit("mid-download");
        file.sync_all()
    })();
    if let Err(e) = result {
        let _ = std::fs::remove_file(&part);
        return Err(io_err(&part, e));
    }
    failpoint::hit("before-rename");
    let sha256 = hex::encode(Sha256::digest(data));
    put_in_place(&part, dest, owner, &sha256)?;
    Ok(Written {
        size: data.len() as u64,
        sha256,
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

/// Final names this process has put a file at, with the job it was for: a job's
/// own earlier file (before a lost task was submitted again, say) may be replaced,
/// another job's never. One placement at a time, so two jobs of the run cannot both
/// find a name free.
static PLACED: std::sync::Mutex<Option<std::collections::HashMap<PathBuf, String>>> =
    std::sync::Mutex::new(None);

/// Which job of this process put a file at `dest`, if one did.
pub fn placed_by(dest: &Path) -> Option<String> {
    let placed = PLACED.lock().unwrap_or_else(|p| p.into_inner());
    placed.as_ref().and_then(|m| m.get(dest).cloned())
}

/// Puts the synced `part` (whose bytes hash to `sha256`) at `dest`, unless `dest`
/// holds a file that is not `owner`'s: then `part` becomes the side file and the
/// answer is [`DownloadError::Taken`]. A file with the same bytes already there is
/// left as it is (a rerun after a crash between the rename and the record).
fn put_in_place(
    part: &Path,
    dest: &Path,
    owner: Owner<'_>,
    sha256: &str,
) -> Result<(), DownloadError> {
    let mut placed = PLACED.lock().unwrap_or_else(|p| p.into_inner());
    let placed = placed.get_or_insert_with(Default::default);
    let by = placed.get(dest).cloned();
    let result = match std::fs::symlink_metadata(dest) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => place_new(part, dest),
        Err(e) => Err(e),
        Ok(_) => {
            let there = file_sha256(dest);
            let other = by.as_deref().filter(|j| *j != owner.job);
            let own = by.as_deref() == Some(owner.job)
                || (owner.recorded.is_some() && there.as_deref() == owner.recorded);
            if other.is_none() && there.as_deref() == Some(sha256) {
                // The very bytes are there already: nothing is replaced.
                std::fs::remove_file(part)
            } else if other.is_none() && own {
                std::fs::rename(part, dest)
            } else {
                let kept = keep_aside(part, dest, owner.job).map_err(|e| io_err(dest, e))?;
                return Err(DownloadError::Taken {
                    path: dest.display().to_string(),
                    kept: kept.display().to_string(),
                    by: other.map(str::to_string),
                });
            }
        }
    };
    result.map_err(|e| {
        let _ = std::fs::remove_file(part);
        io_err(dest, e)
    })?;
    placed.insert(dest.to_path_buf(), owner.job.to_string());
    failpoint::hit("mid-rename");
    sync_parent(dest);
    Ok(())
}

/// Moves `part` to `dest` only if nothing is there: a hard link fails on an existing
/// name, so another process's file that appears meanwhile is not replaced either. A
/// file system without hard links gets a plain rename (this process's own jobs are
/// kept apart by [`PLACED`]'s lock).
fn place_new(part: &Path, dest: &Path) -> std::io::Result<()> {
    match std::fs::hard_link(part, dest) {
        Ok(()) => std::fs::remove_file(part),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Err(e),
        Err(_) => std::fs::rename(part, dest),
    }
}

/// Renames `part` to a free `NAME.kept-<job>[-N].EXT` beside `dest`.
fn keep_aside(part: &Path, dest: &Path, job: &str) -> std::io::Result<PathBuf> {
    let stem = dest
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    let ext = dest
        .extension()
        .map(|e| format!(".{}", e.to_string_lossy()))
        .unwrap_or_default();
    let mut tag: String = sanitize_component(job).chars().take(24).collect();
    tag = tag.replace('.', "_");
    for n in 1..1000 {
        let suffix = if n == 1 {
            String::new()
        } else {
            format!("-{n}")
        };
        let side = dest.with_file_name(format!("{stem}.kept-{tag}{suffix}{ext}"));
        match place_new(part, &side) {
            Ok(()) => {
                sync_parent(&side);
                return Ok(side);
            }
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(e),
        }
    }
    Err(std::io::Error::other("no free name for the kept result"))
}

/// Makes a rename in `path`'s folder durable.
fn sync_parent(path: &Path) {
    if let Some(parent) = path.parent() {
        if let Ok(dir) = std::fs::File::open(parent) {
            let _ = dir.sync_all();
        }
    }
}

/// The SHA-256 of a file's bytes, or None when it cannot be read.
pub fn file_sha256(path: &Path) -> Option<String> {
    let mut f = std::fs::File::open(path).ok()?;
    let mut h = Sha256::new();
    std::io::copy(&mut f, &mut h).ok()?;
    Some(hex::encode(h.finalize()))
}

/// Is the file at `path` the one recorded (same size and SHA-256)?
pub fn already_in_place(path: &Path, size: u64, sha256: &str) -> bool {
    let Ok(meta) = std::fs::metadata(path) else {
        return false;
    };
    if meta.len() != size {
        return false;
    }
    file_sha256(path).as_deref() == Some(sha256)
}

/// Removes a leftover `.part` of `dest` for `job`, if any (and one of the
/// `<final>.part` kind earlier versions left).
pub fn remove_part(dest: &Path, job: &str) {
    let _ = std::fs::remove_file(part_path(dest, job));
    let mut old = dest.as_os_str().to_os_string();
    old.push(".part");
    let _ = std::fs::remove_file(old);
}

/// The path, relative to the output folder, of output `index` of `count` of a job.
///
/// `output` empty: `<job id>.<ext>`; ending in `/`: `<output>/<job id>.<ext>`;
/// otherwise a file stem: `<output>.<ext>`. Several outputs get `_<index>` before
/// the extension. Components that could leave the output folder are dropped: the
/// manifest reader refuses them already, this is the second lock.
pub fn output_relative_path(spec: &JobSpec, index: usize, count: usize, ext: &str) -> PathBuf {
    let (dir, stem) = output_stem(spec);
    // An extension comes from the provider's answer: keep it short and plain.
    let ext: String = ext
        .trim_start_matches('.')
        .chars()
        .filter(char::is_ascii_alphanumeric)
        .take(16)
        .collect();
    let ext = if ext.is_empty() {
        "bin".to_string()
    } else {
        ext
    };
    let name = if count > 1 {
        format!("{stem}_{index}.{ext}")
    } else {
        format!("{stem}.{ext}")
    };
    dir.join(name)
}

/// The folder (relative to the output folder) and file stem a job's outputs get,
/// before the `_<index>` of numbered outputs and the extension the provider's answer
/// brings. Two jobs with the same folder and stem may write the same file: the
/// manifest checks compare these ([`crate::manifest::OutputTracker`]).
pub fn output_stem(spec: &JobSpec) -> (PathBuf, String) {
    let id = sanitize_component(&spec.id);
    match spec
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
    }
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

/// The longest file or folder name written, in bytes: below the 255 of common file
/// systems, with room for the `_<index>.<ext>` and `.<job>.part` suffixes.
pub const MAX_NAME_BYTES: usize = 200;

/// One path component made safe: no separators or control characters, never `.` or
/// `..`, never a name Windows reserves (the folder may be shared with Windows), and
/// at most [`MAX_NAME_BYTES`]: a longer name keeps its start and ends with a hash of
/// the whole, so two long names stay two files and a rerun finds the same one.
fn sanitize_component(s: &str) -> String {
    let cleaned: String = s
        .chars()
        .filter(|c| !c.is_control() && *c != '/' && *c != '\\')
        .collect();
    if cleaned.is_empty() || cleaned == "." || cleaned == ".." {
        return "_".into();
    }
    let cleaned = if is_windows_reserved(&cleaned) {
        format!("_{cleaned}")
    } else {
        cleaned
    };
    if cleaned.len() <= MAX_NAME_BYTES {
        return cleaned;
    }
    let hash = hex::encode(&Sha256::digest(s.as_bytes())[..8]);
    let mut cut = MAX_NAME_BYTES - hash.len() - 1;
    while !cleaned.is_char_boundary(cut) {
        cut -= 1;
    }
    format!("{}-{hash}", &cleaned[..cut])
}

/// `CON`, `PRN`, `AUX`, `NUL`, `COM1`…`COM9`, `LPT1`…`LPT9`, with any extension.
fn is_windows_reserved(name: &str) -> bool {
    let stem = name.split('.').next().unwrap_or(name).trim_end();
    let upper = stem.to_ascii_uppercase();
    matches!(upper.as_str(), "CON" | "PRN" | "AUX" | "NUL")
        || ((upper.starts_with("COM") || upper.starts_with("LPT"))
            && upper.len() == 4
            && matches!(upper.as_bytes()[3], b'1'..=b'9'))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::ProviderKind;

    const OWNER: Owner<'static> = Owner {
        job: "j",
        recorded: None,
    };

    fn spec(id: &str, output: Option<&str>) -> JobSpec {
        JobSpec {
            id: id.into(),
            provider: ProviderKind::Topaz,
            operation: "enhance".into(),
            inputs: vec![],
            prompt: None,
            params_json: "{}".into(),
            output: output.map(Into::into),
            metadata: Vec::new(),
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

    /// Lexically inside the folder: relative, only normal components, each a name a
    /// file system takes, with no NUL or control character.
    fn assert_contained(p: &Path, what: &str) {
        assert!(p.is_relative(), "{what}: {p:?}");
        assert!(p.components().count() >= 1, "{what}: {p:?}");
        for c in p.components() {
            let Component::Normal(name) = c else {
                panic!("{what}: {p:?} has the component {c:?}");
            };
            let name = name.to_string_lossy();
            assert!(name.len() <= 255, "{what}: a {}-byte name", name.len());
            assert!(name != "." && name != "..", "{what}: {p:?}");
            assert!(!name.chars().any(char::is_control), "{what}: {p:?}");
        }
    }

    #[test]
    fn long_names_are_shortened_with_a_hash_and_stay_distinct() {
        let long_a = "a".repeat(300);
        let long_b = format!("{}b", "a".repeat(299));
        let pa = output_relative_path(&spec("x", Some(&long_a)), 0, 1, "png");
        let pb = output_relative_path(&spec("x", Some(&long_b)), 0, 1, "png");
        assert_contained(&pa, "long a");
        assert_contained(&pb, "long b");
        assert_ne!(pa, pb, "two long names must not collide");
        // Stable: a rerun finds the same file.
        assert_eq!(
            pa,
            output_relative_path(&spec("x", Some(&long_a)), 0, 1, "png")
        );
        // Multi-byte characters are cut on a character boundary.
        let wide = "é".repeat(200) + "/" + &"日".repeat(150);
        let p = output_relative_path(&spec("x", Some(&wide)), 3, 5, "webp");
        assert_contained(&p, "wide");
        assert_eq!(p.components().count(), 2);
        assert!(p.to_string_lossy().ends_with("_3.webp"), "{p:?}");
        // A 255-byte single name still has room for its suffixes.
        let p = output_relative_path(&spec("x", Some(&"z".repeat(255))), 12, 20, "jpeg");
        let name = p.file_name().unwrap().to_string_lossy().into_owned();
        assert!(name.len() + ".0123abcd.part".len() <= 255, "{name}");
    }

    #[test]
    fn windows_reserved_names_are_prefixed() {
        for (out, want) in [
            ("CON", "_CON.png"),
            ("x/nul", "x/_nul.png"),
            ("com1.tar", "_com1.tar.png"),
            ("LPT9", "_LPT9.png"),
            ("COM0", "COM0.png"),
            ("console", "console.png"),
            ("aux/", "_aux/j.png"),
        ] {
            assert_eq!(
                output_relative_path(&spec("j", Some(out)), 0, 1, "png"),
                PathBuf::from(want),
                "{out}"
            );
        }
    }

    #[test]
    fn odd_extensions_are_reduced_to_plain_ones() {
        for (ext, want) in [
            ("../../x", "x"),
            ("", "bin"),
            (".jpg", "jpg"),
            ("p/n\\g", "png"),
            ("\0", "bin"),
            ("j\0pg", "jpg"),
        ] {
            assert_eq!(
                output_relative_path(&spec("j", None), 0, 1, ext),
                PathBuf::from(format!("j.{want}")),
                "{ext:?}"
            );
        }
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(300))]

        /// Whatever the id, output and extension (the manifest's checks aside), the
        /// path stays inside the output folder and every name is one a file system
        /// takes.
        #[test]
        fn no_output_path_leaves_the_folder(
            id in "(\\PC|[./\\\\\0:]){0,300}",
            output in proptest::option::of("(\\PC|[./\\\\\0:~]|\\.\\.|/){0,400}"),
            ext in "(\\PC|[./\\\\\0]){0,40}",
            index in 0usize..100,
            count in 1usize..100,
        ) {
            let p = output_relative_path(&spec(&id, output.as_deref()), index, count, &ext);
            assert_contained(&p, &format!("{id:?} {output:?} {ext:?}"));
            let out = Path::new("/srv/out");
            proptest::prop_assert!(out.join(&p).starts_with(out));
        }
    }

    /// A loopback server answering each connection with the next raw response.
    async fn raw_server(responses: Vec<Vec<u8>>) -> String {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            for response in responses {
                let Ok((mut sock, _)) = listener.accept().await else {
                    return;
                };
                let mut head = Vec::new();
                let mut byte = [0u8; 1];
                while !head.ends_with(b"\r\n\r\n") {
                    if sock.read(&mut byte).await.unwrap_or(0) == 0 {
                        break;
                    }
                    head.push(byte[0]);
                }
                let _ = sock.write_all(&response).await;
                let _ = sock.shutdown().await;
            }
        });
        format!("http://{addr}")
    }

    fn answer(headers: &str, body: &[u8]) -> Vec<u8> {
        let mut r = format!("HTTP/1.1 200 OK\r\n{headers}\r\n").into_bytes();
        r.extend_from_slice(body);
        r
    }

    fn chunked(body: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        for c in body.chunks(700) {
            out.extend_from_slice(format!("{:x}\r\n", c.len()).as_bytes());
            out.extend_from_slice(c);
            out.extend_from_slice(b"\r\n");
        }
        out.extend_from_slice(b"0\r\n\r\n");
        out
    }

    fn client() -> reqwest::Client {
        reqwest::Client::builder()
            .redirect(redirect_policy())
            .connect_timeout(std::time::Duration::from_secs(2))
            .build()
            .unwrap()
    }

    fn nothing_left(dir: &Path) {
        let left: Vec<_> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert!(left.is_empty(), "left behind: {left:?}");
    }

    /// The cap holds however the server announces the body: chunked, delimited by the
    /// connection's end, announced too large, or announced smaller than it is; the
    /// partial file is removed and the error says why.
    #[tokio::test]
    async fn the_size_cap_holds_whatever_the_length_header_says() {
        let big = vec![7u8; 5000];
        let cap = 1000;
        let cases: Vec<(&str, Vec<u8>)> = vec![
            (
                "chunked",
                answer("Transfer-Encoding: chunked\r\n", &chunked(&big)),
            ),
            ("until close", answer("Connection: close\r\n", &big)),
            (
                "announced too large",
                answer("Content-Length: 5000\r\n", &big),
            ),
        ];
        for (what, response) in cases {
            let dir = tempfile::tempdir().unwrap();
            let dest = dir.path().join("r.png");
            let base = raw_server(vec![response]).await;
            let e = fetch(
                &client(),
                &format!("{base}/r.png"),
                &dest,
                OWNER,
                cap,
                &|_| {},
            )
            .await
            .unwrap_err();
            assert!(
                matches!(&e, DownloadError::TooLarge(m) if m.contains("1000-byte limit")),
                "{what}: {e}"
            );
            nothing_left(dir.path());
        }

        // Announced smaller than sent: only the announced bytes are read.
        let dir = tempfile::tempdir().unwrap();
        let dest = dir.path().join("r.png");
        let base = raw_server(vec![answer("Content-Length: 10\r\n", &big)]).await;
        let w = fetch(
            &client(),
            &format!("{base}/r.png"),
            &dest,
            OWNER,
            cap,
            &|_| {},
        )
        .await
        .unwrap();
        assert_eq!(w.size, 10);
        assert_eq!(std::fs::metadata(&dest).unwrap().len(), 10);

        // Announced larger than sent: cut off, nothing kept.
        let dir = tempfile::tempdir().unwrap();
        let dest = dir.path().join("r.png");
        let base = raw_server(vec![answer("Content-Length: 900\r\n", &big[..300])]).await;
        let e = fetch(
            &client(),
            &format!("{base}/r.png"),
            &dest,
            OWNER,
            cap,
            &|_| {},
        )
        .await
        .unwrap_err();
        assert!(matches!(e, DownloadError::Interrupted(_)), "{e}");
        nothing_left(dir.path());

        // Exactly the cap is fine.
        let dir = tempfile::tempdir().unwrap();
        let dest = dir.path().join("r.png");
        let base = raw_server(vec![answer(
            "Transfer-Encoding: chunked\r\n",
            &chunked(&big[..1000]),
        )])
        .await;
        let w = fetch(
            &client(),
            &format!("{base}/r.png"),
            &dest,
            OWNER,
            cap,
            &|_| {},
        )
        .await
        .unwrap();
        assert_eq!(w.size, 1000);
    }

    #[tokio::test]
    async fn only_https_or_loopback_http_is_fetched() {
        let dir = tempfile::tempdir().unwrap();
        let dest = dir.path().join("r.png");
        for url in [
            "file:///etc/passwd",
            "ftp://127.0.0.1/x.png",
            "data:image/png;base64,AAAA",
            "not a url",
            "//example.com/x.png",
            "http://192.0.2.1/x.png?X-Amz-Signature=secret-sig",
            "http://user:hunter2@example.com/x.png",
            "http://127.0.0.1.nip.io/x.png",
        ] {
            let e = fetch(&client(), url, &dest, OWNER, 1000, &|_| {})
                .await
                .unwrap_err();
            assert!(matches!(e, DownloadError::BadUrl(_)), "{url}: {e}");
            let msg = e.to_string();
            assert!(
                !msg.contains("secret-sig") && !msg.contains("hunter2"),
                "{msg}"
            );
        }
        nothing_left(dir.path());

        // A redirect from loopback to plain http elsewhere is refused before any
        // connection is made (192.0.2.1 is a documentation address: it would hang).
        let base = raw_server(vec![
            b"HTTP/1.1 302 Found\r\nLocation: http://192.0.2.1/x.png\r\nContent-Length: 0\r\n\r\n"
                .to_vec(),
        ])
        .await;
        let e = fetch(
            &client(),
            &format!("{base}/r.png"),
            &dest,
            OWNER,
            1000,
            &|_| {},
        )
        .await
        .unwrap_err();
        assert!(
            matches!(&e, DownloadError::BadUrl(m) if m.contains("refusing a redirect")),
            "{e}"
        );
        nothing_left(dir.path());
    }

    #[test]
    fn a_result_never_replaces_another_jobs_file() {
        let dir = tempfile::tempdir().unwrap();
        let dest = dir.path().join("x.png");
        let owner = |job| Owner {
            job,
            recorded: None,
        };
        let a = write_bytes(&dest, owner("a"), b"first").unwrap();
        // Another job of this process: refused, its bytes kept beside, the file intact.
        let e = write_bytes(&dest, owner("b"), b"second").unwrap_err();
        let DownloadError::Taken { kept, by, .. } = &e else {
            panic!("{e}")
        };
        assert_eq!(by.as_deref(), Some("a"));
        assert_eq!(std::fs::read(&dest).unwrap(), b"first");
        assert_eq!(std::fs::read(kept).unwrap(), b"second");
        assert!(kept.ends_with("x.kept-b.png"), "{kept}");
        // Even with the same bytes, and a second time (a free side name).
        let e = write_bytes(&dest, owner("b"), b"first").unwrap_err();
        assert!(
            matches!(&e, DownloadError::Taken { kept, .. } if kept.ends_with("x.kept-b-2.png")),
            "{e}"
        );
        // The job that put it there may replace its own file (a resubmitted task).
        let a2 = write_bytes(&dest, owner("a"), b"again").unwrap();
        assert_ne!(a.sha256, a2.sha256);
        assert_eq!(file_sha256(&dest).as_deref(), Some(a2.sha256.as_str()));
        // A file no job of this process wrote: refused unless its bytes are the same
        // or it is the one the job recorded.
        let other = dir.path().join("y.png");
        std::fs::write(&other, b"by hand").unwrap();
        let e = write_bytes(&other, owner("c"), b"paid").unwrap_err();
        assert!(matches!(&e, DownloadError::Taken { by: None, .. }), "{e}");
        assert_eq!(std::fs::read(&other).unwrap(), b"by hand");
        let same = write_bytes(&other, owner("c"), b"by hand").unwrap();
        assert_eq!(file_sha256(&other), Some(same.sha256));
        let recorded = hex::encode(Sha256::digest(b"by hand"));
        let w = write_bytes(
            &other,
            Owner {
                job: "d",
                recorded: Some(&recorded),
            },
            b"newer",
        );
        // "c" put it there (same bytes): not "d"'s to replace.
        assert!(matches!(w, Err(DownloadError::Taken { by: Some(ref j), .. }) if j == "c"));
        let parts: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().ends_with(".part"))
            .collect();
        assert!(parts.is_empty(), "{parts:?}");
    }

    #[test]
    fn a_job_replaces_the_file_it_recorded() {
        let dir = tempfile::tempdir().unwrap();
        let dest = dir.path().join("r.png");
        std::fs::write(&dest, b"old attempt").unwrap();
        let recorded = hex::encode(Sha256::digest(b"old attempt"));
        let owner = Owner {
            job: "r",
            recorded: Some(&recorded),
        };
        let w = write_bytes(&dest, owner, b"new attempt").unwrap();
        assert_eq!(file_sha256(&dest), Some(w.sha256));
    }

    #[test]
    fn inline_bytes_land_whole_with_their_hash() {
        let dir = tempfile::tempdir().unwrap();
        let dest = dir.path().join("sub/a.png");
        let w = write_bytes(&dest, OWNER, b"hello").unwrap();
        assert_eq!(w.size, 5);
        assert_eq!(std::fs::read(&dest).unwrap(), b"hello");
        assert!(!part_path(&dest, OWNER.job).exists());
        assert!(already_in_place(&dest, 5, &w.sha256));
        assert!(!already_in_place(&dest, 5, "00"));
    }
}
