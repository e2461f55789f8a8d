//! The rate budget of one credential, shared by every pixbatch process of the user.
//!
//! A provider counts requests per credential (per key, per account), not per pixbatch
//! database: two databases run one after the other, or at once, with the same key
//! share one window. So the send log and the "not before" of the last Retry-After live
//! in a state file per (provider, API base URL, credential fingerprint) under the
//! user's state directory, and every request is reserved in that file, under an OS
//! file lock, before it is sent. Any number of databases and processes on one host
//! then stay inside one window; a run killed right after a 429 finds its Retry-After
//! there when it starts again.
//!
//! The file never holds the key: its name is a truncated SHA-256 of provider, base URL
//! and credential; its content is the provider, the base URL, send times and the
//! not-before instant (see `docs/operations.md`, "Rate budget").
//!
//! Crash safety: the data file is replaced whole (write a temporary file, fsync,
//! rename) while the lock is held, so a kill at any point leaves the old or the new
//! content, never half of one. The lock lives in a separate `.lock` file because a
//! rename replaces the data file's inode (a lock on it would be lost). The kernel
//! drops the lock of a killed process.
//!
//! A file that cannot be parsed (edited by hand, a disk fault) must not panic and must
//! not let a burst through: it is read as "the window was full when the file was last
//! written" — nothing is sent until one longest window after its modification time —
//! with one warning; the next reservation rewrites it whole.

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

use fs4::fs_std::FileExt;
use serde::{Deserialize, Serialize};
use sha2::Digest;

use crate::model::ProviderKind;
use crate::providers::Credentials;

/// The user's state directory: `$PIXBATCH_STATE_DIR`, else `$XDG_STATE_HOME/pixbatch`,
/// else `~/.local/state/pixbatch`. None when none of them is set (no home).
pub fn state_dir(env: &dyn Fn(&str) -> Option<String>) -> Option<PathBuf> {
    let set = |name: &str| env(name).filter(|v| !v.trim().is_empty());
    if let Some(dir) = set("PIXBATCH_STATE_DIR") {
        return Some(PathBuf::from(dir));
    }
    if let Some(dir) = set("XDG_STATE_HOME") {
        return Some(PathBuf::from(dir).join("pixbatch"));
    }
    set("HOME").map(|home| PathBuf::from(home).join(".local/state/pixbatch"))
}

/// The state directory from the process environment.
pub fn default_state_dir() -> Option<PathBuf> {
    state_dir(&|name| std::env::var(name).ok())
}

/// The file name (without extension) for a credential: the provider's name and 128
/// bits of SHA-256 over provider, base URL and the credential's identity (the API key,
/// or Perfect's client id). Never the key itself. The base URL is part of it so tests
/// with the same made-up key against two simulators do not share a window.
pub fn budget_name(provider: ProviderKind, base_url: &str, credentials: &Credentials) -> String {
    let identity = credentials
        .api_key
        .as_deref()
        .or(credentials.client_id.as_deref())
        .unwrap_or("");
    let mut h = sha2::Sha256::new();
    h.update(b"pixbatch rate budget v1\n");
    h.update(provider.name().as_bytes());
    h.update(b"\n");
    h.update(base_url.trim_end_matches('/').as_bytes());
    h.update(b"\n");
    h.update(identity.as_bytes());
    let digest = h.finalize();
    format!("{}-{}", provider.name(), hex::encode(&digest[..16]))
}

/// What the state file holds.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct BudgetState {
    /// The format; readers refuse (treat as garbage) anything else.
    pub version: u32,
    /// For the person who opens the file: which provider and endpoint it counts.
    pub provider: String,
    pub base_url: String,
    /// No request before this instant (Unix ms): the latest Retry-After.
    pub not_before_ms: u64,
    /// How far back send times are kept (ms), the longest window any writer uses, so
    /// a process with a shorter window does not prune what another one still counts.
    pub keep_ms: u64,
    /// How many of the newest send times are kept: the largest COUNT of any writer's
    /// limits (a limit of N per window only ever looks at the N-th newest send).
    pub keep_count: usize,
    /// Send times (Unix ms), oldest first.
    pub sent_ms: Vec<u64>,
    /// Read from a file that could not be parsed (the wait is the conservative
    /// reading, not a Retry-After). Never written.
    #[serde(skip)]
    pub unreadable: bool,
}

const VERSION: u32 = 1;

impl BudgetState {
    /// Drops what no limit can count any more at `now`.
    fn prune(&mut self, now: u64) {
        self.sent_ms.sort_unstable();
        let horizon = now.saturating_sub(self.keep_ms);
        self.sent_ms.retain(|&t| t >= horizon);
        let excess = self.sent_ms.len().saturating_sub(self.keep_count.max(1));
        self.sent_ms.drain(..excess);
    }
}

/// One credential's state file and its lock.
#[derive(Debug)]
pub struct SharedBudget {
    data: PathBuf,
    lock: PathBuf,
    provider: ProviderKind,
    base_url: String,
    /// This process's longest window and largest count (merged into the file).
    keep_ms: u64,
    keep_count: usize,
    /// One warning per process for an unreadable file, not one per request.
    warned: AtomicBool,
    /// fsync every write (see the module comment: off, a process crash cannot lose
    /// a renamed file; only the micro-benchmark turns it on, for comparison).
    fsync: bool,
}

/// The file locked and read; written back by [`Reservation::commit`], unlocked on drop.
pub struct Reservation<'a> {
    budget: &'a SharedBudget,
    _lock: LockedFile,
    pub state: BudgetState,
}

struct LockedFile(File);

impl Drop for LockedFile {
    fn drop(&mut self) {
        let _ = FileExt::unlock(&self.0);
    }
}

impl SharedBudget {
    /// Opens (creating the directory if needed) the budget file of a credential in
    /// `dir`. `keep_ms`/`keep_count` are this process's longest window and largest
    /// limit count. Fails only when the directory or lock file cannot be made.
    pub fn open(
        dir: &Path,
        provider: ProviderKind,
        base_url: &str,
        credentials: &Credentials,
        keep_ms: u64,
        keep_count: usize,
    ) -> Result<SharedBudget, String> {
        create_private_dir(dir).map_err(|e| format!("state directory {}: {e}", dir.display()))?;
        let name = budget_name(provider, base_url, credentials);
        let budget = SharedBudget {
            data: dir.join(format!("{name}.json")),
            lock: dir.join(format!("{name}.lock")),
            provider,
            base_url: base_url.trim_end_matches('/').to_string(),
            keep_ms,
            keep_count,
            warned: AtomicBool::new(false),
            fsync: false,
        };
        // Fail now, at start, rather than on every request.
        budget.open_lock_file()?;
        Ok(budget)
    }

    pub fn path(&self) -> &Path {
        &self.data
    }

    fn open_lock_file(&self) -> Result<File, String> {
        let mut o = OpenOptions::new();
        o.read(true).write(true).create(true).truncate(false);
        #[cfg(unix)]
        {
            use std::os::unix::fs::OpenOptionsExt;
            o.mode(0o600);
        }
        o.open(&self.lock)
            .map_err(|e| format!("rate budget lock {}: {e}", self.lock.display()))
    }

    /// Locks the file (waiting for another process that holds it: holds last only as
    /// long as one read and one write) and reads its state as of `now`.
    pub fn reserve(&self, now: u64) -> Result<Reservation<'_>, String> {
        let file = self.open_lock_file()?;
        FileExt::lock_exclusive(&file)
            .map_err(|e| format!("rate budget lock {}: {e}", self.lock.display()))?;
        let lock = LockedFile(file);
        let mut state = self.read(now);
        state.keep_ms = state.keep_ms.max(self.keep_ms);
        state.keep_count = state.keep_count.max(self.keep_count);
        state.prune(now);
        Ok(Reservation {
            budget: self,
            _lock: lock,
            state,
        })
    }

    fn read(&self, now: u64) -> BudgetState {
        let mut text = Vec::new();
        let opened = File::open(&self.data);
        let mut file = match opened {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return BudgetState::default(),
            Err(e) => return self.unreadable(now, None, &e.to_string()),
        };
        let modified = file
            .metadata()
            .and_then(|m| m.modified())
            .ok()
            .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
            .map(|d| d.as_millis() as u64);
        if let Err(e) = file.read_to_end(&mut text) {
            return self.unreadable(now, modified, &e.to_string());
        }
        match serde_json::from_slice::<BudgetState>(&text) {
            Ok(s) if s.version == VERSION => s,
            Ok(s) => self.unreadable(now, modified, &format!("unknown version {}", s.version)),
            Err(e) => self.unreadable(now, modified, &e.to_string()),
        }
    }

    /// The conservative reading of a file that cannot be read: the window was full
    /// when it was last written.
    fn unreadable(&self, now: u64, modified: Option<u64>, why: &str) -> BudgetState {
        let written = modified.unwrap_or(now).min(now);
        let not_before_ms = written + self.keep_ms;
        if !self.warned.swap(true, Ordering::Relaxed) {
            tracing::warn!(
                provider = %self.provider,
                "the rate budget file {} cannot be read ({why}); treating its window as full: \
                 no request before {} ms from now, then the file is rewritten",
                self.data.display(),
                not_before_ms.saturating_sub(now)
            );
        }
        BudgetState {
            not_before_ms,
            unreadable: true,
            ..BudgetState::default()
        }
    }
}

impl Reservation<'_> {
    /// Writes the state back whole (temporary file, fsync, rename), still locked.
    pub fn commit(mut self) -> Result<(), String> {
        let b = self.budget;
        self.state.version = VERSION;
        self.state.provider = b.provider.name().to_string();
        self.state.base_url = b.base_url.clone();
        let body = serde_json::to_vec(&self.state).map_err(|e| e.to_string())?;
        let tmp = b.data.with_extension("json.tmp");
        let written = (|| -> std::io::Result<()> {
            let mut o = OpenOptions::new();
            o.write(true).create(true).truncate(true);
            #[cfg(unix)]
            {
                use std::os::unix::fs::OpenOptionsExt;
                o.mode(0o600);
            }
            let mut f = o.open(&tmp)?;
            f.write_all(&body)?;
            if b.fsync {
                f.sync_data()?;
            }
            std::fs::rename(&tmp, &b.data)
        })();
        written.map_err(|e| format!("rate budget file {}: {e}", b.data.display()))
    }
}

fn create_private_dir(dir: &Path) -> std::io::Result<()> {
    let mut builder = std::fs::DirBuilder::new();
    builder.recursive(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::DirBuilderExt;
        builder.mode(0o700);
    }
    builder.create(dir)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(k: &str) -> Credentials {
        Credentials {
            api_key: Some(k.to_string()),
            ..Credentials::default()
        }
    }

    #[test]
    fn the_state_dir_follows_the_variables_in_order() {
        let env = |vars: &'static [(&'static str, &'static str)]| {
            move |name: &str| {
                vars.iter()
                    .find(|(n, _)| *n == name)
                    .map(|(_, v)| v.to_string())
            }
        };
        let all = env(&[
            ("PIXBATCH_STATE_DIR", "/s"),
            ("XDG_STATE_HOME", "/x"),
            ("HOME", "/h"),
        ]);
        assert_eq!(state_dir(&all), Some(PathBuf::from("/s")));
        let xdg = env(&[("XDG_STATE_HOME", "/x"), ("HOME", "/h")]);
        assert_eq!(state_dir(&xdg), Some(PathBuf::from("/x/pixbatch")));
        let home = env(&[("HOME", "/h"), ("PIXBATCH_STATE_DIR", "")]);
        assert_eq!(
            state_dir(&home),
            Some(PathBuf::from("/h/.local/state/pixbatch"))
        );
        assert_eq!(state_dir(&env(&[])), None);
    }

    #[test]
    fn the_name_depends_on_provider_url_and_key_but_never_shows_the_key() {
        let a = budget_name(
            ProviderKind::Topaz,
            "http://h:1/topaz",
            &key("secret-key-1"),
        );
        assert_eq!(
            a,
            budget_name(
                ProviderKind::Topaz,
                "http://h:1/topaz/",
                &key("secret-key-1")
            )
        );
        assert!(!a.contains("secret"));
        assert!(a.starts_with("topaz-"));
        assert_eq!(a.len(), "topaz-".len() + 32);
        for other in [
            budget_name(
                ProviderKind::Topaz,
                "http://h:2/topaz",
                &key("secret-key-1"),
            ),
            budget_name(
                ProviderKind::Topaz,
                "http://h:1/topaz",
                &key("secret-key-2"),
            ),
            budget_name(
                ProviderKind::Photio,
                "http://h:1/topaz",
                &key("secret-key-1"),
            ),
        ] {
            assert_ne!(a, other);
        }
    }

    #[test]
    fn a_reservation_survives_and_is_pruned_to_what_a_limit_can_count() {
        let dir = tempfile::tempdir().unwrap();
        let b =
            SharedBudget::open(dir.path(), ProviderKind::Topaz, "u", &key("k1"), 1_000, 3).unwrap();
        for t in [100, 200, 300, 400, 1_500] {
            let mut r = b.reserve(t).unwrap();
            r.state.sent_ms.push(t);
            r.commit().unwrap();
        }
        let r = b.reserve(1_600).unwrap();
        // At 1.6 s a 1 s window reaches back to 0.6 s: only 1500 is left.
        assert_eq!(r.state.sent_ms, vec![1_500]);
        drop(r);
        let text = std::fs::read_to_string(b.path()).unwrap();
        assert!(!text.contains("k1"), "{text}");
        // Another process (another handle) with a longer window keeps more, and the
        // file remembers the longer horizon for everyone.
        let long = SharedBudget::open(dir.path(), ProviderKind::Topaz, "u", &key("k1"), 10_000, 2)
            .unwrap();
        let mut r = long.reserve(1_700).unwrap();
        r.state.sent_ms.extend([1_600, 1_700]);
        r.commit().unwrap();
        let r = b.reserve(1_800).unwrap();
        assert_eq!(r.state.keep_ms, 10_000);
        assert_eq!(r.state.sent_ms, vec![1_500, 1_600, 1_700]);
    }

    #[test]
    fn a_garbage_file_is_a_full_window_not_a_panic() {
        let dir = tempfile::tempdir().unwrap();
        let b = SharedBudget::open(dir.path(), ProviderKind::Topaz, "u", &key("k"), 60_000, 10)
            .unwrap();
        std::fs::write(b.path(), b"{\"version\":1,\"sent_ms\":[1,2,").unwrap();
        let now = crate::model::now_ms();
        let r = b.reserve(now).unwrap();
        assert!(r.state.sent_ms.is_empty());
        // Written just now: wait (about) one whole window from now.
        assert!(
            r.state.not_before_ms + 5_000 >= now + 60_000,
            "{:?}",
            r.state
        );
        r.commit().unwrap();
        let r = b.reserve(now).unwrap();
        assert!(r.state.not_before_ms >= now + 55_000, "the wait is kept");
        drop(r);
        // Written long ago: no wait at all.
        std::fs::write(b.path(), b"garbage").unwrap();
        let r = b.reserve(now + 3_600_000).unwrap();
        assert!(r.state.not_before_ms < now + 3_600_000);
    }

    /// The cost of one reservation (lock, read, write, fsync, rename), the price every
    /// request pays. Run with `cargo test --lib budget -- --ignored --nocapture`.
    #[test]
    #[ignore]
    fn bench_reservation_cost() {
        let dir = tempfile::tempdir().unwrap();
        let b = SharedBudget::open(
            dir.path(),
            ProviderKind::Perfect,
            "u",
            &key("k"),
            303_000,
            100,
        )
        .unwrap();
        let mut b = b;
        for fsync in [false, true] {
            b.fsync = fsync;
            let n = if fsync { 300 } else { 3_000 };
            let start = std::time::Instant::now();
            for i in 0..n {
                let now = 1_000_000 + i * 10;
                let mut r = b.reserve(now).unwrap();
                r.state.sent_ms.push(now);
                r.commit().unwrap();
            }
            let per = start.elapsed() / n as u32;
            println!("one reservation with 100 send times kept, fsync {fsync}: {per:?}");
        }
        let start = std::time::Instant::now();
        for i in 0..3_000 {
            drop(b.reserve(1_000_000 + i).unwrap());
        }
        println!("lock and read only: {:?}", start.elapsed() / 3_000);
    }
}
