//! One process per database.
//!
//! sled locks its folder too, but its error ("could not acquire lock") names no one.
//! `<db>.lock` beside the database is held with an OS file lock (released by the
//! kernel when the process dies, even by kill -9) and says who holds it, so a second
//! `run` can say "another run (pid N) holds this database" and exit 3, and the
//! reading commands know to ask the running process over its socket instead.

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use fs4::fs_std::FileExt;

/// Who holds the lock, as written in the lock file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Holder {
    pub pid: u32,
    /// The command: `run`, `enqueue`, `status` …
    pub command: String,
}

impl Holder {
    /// Commands that hold a database for as long as there is work.
    pub fn is_long_lived(&self) -> bool {
        matches!(self.command.as_str(), "run" | "demo")
    }
}

impl std::fmt::Display for Holder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "pixbatch {} (pid {})", self.command, self.pid)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum LockError {
    #[error("another process holds the database {db}: {holder}")]
    Held { db: String, holder: Holder },
    #[error("another process holds the database {db} (lock file {lock})")]
    HeldUnknown { db: String, lock: String },
    #[error("lock file {path}: {message}")]
    Io { path: String, message: String },
}

/// Held for as long as the value lives.
pub struct DbLock {
    file: File,
    path: PathBuf,
}

pub fn lock_path(db: &Path) -> PathBuf {
    sibling(db, "lock")
}

/// The control socket of a running `run`.
pub fn socket_path(db: &Path) -> PathBuf {
    sibling(db, "sock")
}

fn sibling(db: &Path, ext: &str) -> PathBuf {
    let mut name = db
        .file_name()
        .map(|n| n.to_os_string())
        .unwrap_or_else(|| "pixbatch.db".into());
    name.push(".");
    name.push(ext);
    db.with_file_name(name)
}

impl DbLock {
    /// Takes the lock at once or says who has it.
    pub fn try_acquire(db: &Path, command: &str) -> Result<DbLock, LockError> {
        let path = lock_path(db);
        if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
            std::fs::create_dir_all(parent).map_err(|e| io(&path, e))?;
        }
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(|e| io(&path, e))?;
        match FileExt::try_lock_exclusive(&file) {
            Ok(true) => {}
            Ok(false) => return Err(held(db, &path, &mut file)),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                return Err(held(db, &path, &mut file))
            }
            Err(e) => return Err(io(&path, e)),
        }
        let stamp = format!("{} {}\n", std::process::id(), command);
        let written = file
            .set_len(0)
            .and_then(|_| file.seek(SeekFrom::Start(0)))
            .and_then(|_| file.write_all(stamp.as_bytes()))
            .and_then(|_| file.flush());
        written.map_err(|e| io(&path, e))?;
        Ok(DbLock { file, path })
    }

    /// Retries for up to `wait` while the holder is a short command (a reading
    /// command holds the lock only briefly) or has not written its name yet; gives
    /// up at once when a long-lived `run` or `demo` holds it.
    pub fn acquire_within(db: &Path, command: &str, wait: Duration) -> Result<DbLock, LockError> {
        let start = Instant::now();
        loop {
            match DbLock::try_acquire(db, command) {
                Err(LockError::Held { ref holder, .. })
                    if holder.is_long_lived() || start.elapsed() >= wait =>
                {
                    return DbLock::try_acquire(db, command);
                }
                Err(LockError::Held { .. } | LockError::HeldUnknown { .. })
                    if start.elapsed() < wait =>
                {
                    std::thread::sleep(Duration::from_millis(20));
                }
                other => return other,
            }
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for DbLock {
    fn drop(&mut self) {
        // An empty file while locked means "just taken or being let go": others wait
        // for it briefly instead of giving up.
        let _ = self.file.set_len(0);
        let _ = FileExt::unlock(&self.file);
    }
}

/// Who holds the lock of `db`, if anyone does right now.
pub fn current_holder(db: &Path) -> Option<Holder> {
    let path = lock_path(db);
    let mut file = File::open(&path).ok()?;
    read_holder(&mut file)
}

fn held(db: &Path, path: &Path, file: &mut File) -> LockError {
    match read_holder(file) {
        Some(holder) => LockError::Held {
            db: db.display().to_string(),
            holder,
        },
        None => LockError::HeldUnknown {
            db: db.display().to_string(),
            lock: path.display().to_string(),
        },
    }
}

fn read_holder(file: &mut File) -> Option<Holder> {
    let mut text = String::new();
    file.seek(SeekFrom::Start(0)).ok()?;
    file.read_to_string(&mut text).ok()?;
    let mut parts = text.split_whitespace();
    let pid = parts.next()?.parse().ok()?;
    let command = parts.next().unwrap_or("?").to_string();
    Some(Holder { pid, command })
}

fn io(path: &Path, e: std::io::Error) -> LockError {
    LockError::Io {
        path: path.display().to_string(),
        message: e.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_holder_is_told_who_has_it() {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("q.db");
        let first = DbLock::try_acquire(&db, "run").unwrap();
        match DbLock::try_acquire(&db, "run") {
            Err(LockError::Held { holder, .. }) => {
                assert_eq!(holder.pid, std::process::id());
                assert_eq!(holder.command, "run");
            }
            Err(e) => panic!("unexpected error: {e}"),
            Ok(_) => panic!("second lock granted"),
        }
        assert_eq!(current_holder(&db).map(|h| h.command), Some("run".into()));
        drop(first);
        assert!(DbLock::try_acquire(&db, "status").is_ok());
    }

    #[test]
    fn a_writer_waits_out_a_reader_but_not_a_run() {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("q.db");
        let reader = DbLock::try_acquire(&db, "status").unwrap();
        let release = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(200));
            drop(reader);
        });
        let t = Instant::now();
        let writer = DbLock::acquire_within(&db, "run", Duration::from_secs(5));
        assert!(writer.is_ok(), "the reader let go");
        assert!(t.elapsed() >= Duration::from_millis(150));
        release.join().unwrap();
        drop(writer);

        let _run = DbLock::try_acquire(&db, "run").unwrap();
        let t = Instant::now();
        assert!(matches!(
            DbLock::acquire_within(&db, "run", Duration::from_secs(5)),
            Err(LockError::Held { .. })
        ));
        assert!(
            t.elapsed() < Duration::from_secs(1),
            "a run is not waited for"
        );
    }
}
