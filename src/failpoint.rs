//! Failpoints: a test hook that makes the process die, or an IO call fail, at a
//! chosen point in the code, so the crash and storage tests can hit the instants that
//! matter (right after the submit intent is durable, right after the paid request,
//! half way through a download, around the rename) instead of hoping a random kill
//! lands there.
//!
//! Set `PIXBATCH_FAILPOINTS` to a comma-separated list of `NAME[=ACTION][:N]`:
//! - `kill` (the default): the process SIGKILLs itself at the N-th hit (default 1),
//!   with no cleanup at all, like `kill -9` or a power cut for everything not yet
//!   synced;
//! - `enospc`, `eio`: every hit from the N-th on returns that OS error (a full disk,
//!   a failing one) to the caller, which handles it as it would the real thing.
//!
//! Examples: `PIXBATCH_FAILPOINTS=after-submit-intent:3`,
//! `PIXBATCH_FAILPOINTS=download-write=enospc`, `store-write=enospc:40`.
//!
//! The points are listed in [`POINTS`]. The variable is read once; when it is unset a
//! hit costs one atomic load. This is a test hook, not a user feature: nothing in a
//! normal run sets it, and an unknown name or action is reported once on stderr and
//! otherwise ignored, so a typo cannot change what a real run does.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;

/// The environment variable that arms failpoints.
pub const ENV: &str = "PIXBATCH_FAILPOINTS";

/// Every failpoint in the code, with where it sits.
pub const POINTS: &[(&str, &str)] = &[
    (
        "after-submit-intent",
        "the submit intent and key are durable; the paid request is not sent yet",
    ),
    (
        "after-submit-sent",
        "the paid request was sent and answered; the answer is not recorded yet",
    ),
    (
        "mid-download",
        "a result's .part file is partly written (stream) or written but not synced (inline)",
    ),
    (
        "before-rename",
        "a result's .part file is whole and synced, not yet renamed into place",
    ),
    (
        "mid-rename",
        "a result is renamed into place; the folder is not synced and the job does not record it yet",
    ),
    (
        "download-write",
        "each write of result bytes to a .part file (for enospc/eio)",
    ),
    (
        "store-write",
        "each job record written to the database (for enospc/eio)",
    ),
];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Action {
    Kill,
    Error(i32),
}

#[derive(Debug)]
struct Point {
    action: Action,
    /// The hit at which it fires (kill) or from which it fires (errors), from 1.
    at: u64,
    hits: AtomicU64,
}

fn armed() -> Option<&'static HashMap<String, Point>> {
    static ARMED: OnceLock<Option<HashMap<String, Point>>> = OnceLock::new();
    ARMED
        .get_or_init(|| {
            let spec = std::env::var(ENV).ok()?;
            let (points, problems) = parse(&spec);
            for p in problems {
                eprintln!("pixbatch: {ENV}: {p} (ignored)");
            }
            (!points.is_empty()).then_some(points)
        })
        .as_ref()
}

fn parse(spec: &str) -> (HashMap<String, Point>, Vec<String>) {
    let mut points = HashMap::new();
    let mut problems = Vec::new();
    for item in spec.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        let (head, at) = match item.rsplit_once(':') {
            Some((h, n)) => match n.parse::<u64>() {
                Ok(n) if n >= 1 => (h, n),
                _ => {
                    problems.push(format!("{item:?}: the count must be a number from 1"));
                    continue;
                }
            },
            None => (item, 1),
        };
        let (name, action) = head.split_once('=').unwrap_or((head, "kill"));
        let action = match action {
            "kill" => Action::Kill,
            "enospc" => Action::Error(libc::ENOSPC),
            "eio" => Action::Error(libc::EIO),
            other => {
                problems.push(format!(
                    "{item:?}: unknown action {other:?} (kill, enospc, eio)"
                ));
                continue;
            }
        };
        if !POINTS.iter().any(|(n, _)| *n == name) {
            problems.push(format!("{item:?}: unknown failpoint {name:?}"));
            continue;
        }
        points.insert(
            name.to_string(),
            Point {
                action,
                at,
                hits: AtomicU64::new(0),
            },
        );
    }
    (points, problems)
}

impl Point {
    /// Counts a hit; what it should do now.
    fn fire(&self) -> Option<Action> {
        let hit = self.hits.fetch_add(1, Ordering::SeqCst) + 1;
        match self.action {
            Action::Kill if hit == self.at => Some(Action::Kill),
            Action::Error(_) if hit >= self.at => Some(self.action),
            _ => None,
        }
    }
}

fn fire(name: &str) -> Option<Action> {
    armed()?.get(name)?.fire()
}

fn die(name: &str) -> ! {
    // Say which point fired (the crash tests count kills by point); stderr is
    // unbuffered, so the line is out before the signal.
    eprintln!("pixbatch: failpoint {name}: SIGKILL");
    unsafe {
        libc::raise(libc::SIGKILL);
    }
    // SIGKILL cannot be caught; this is only for the type checker.
    std::process::abort()
}

/// A point where the process may be told to die.
pub fn hit(name: &str) {
    if let Some(Action::Kill) = fire(name) {
        die(name);
    }
}

/// A point where an IO call may be told to fail (or the process to die).
pub fn io(name: &str) -> std::io::Result<()> {
    match fire(name) {
        Some(Action::Kill) => die(name),
        Some(Action::Error(code)) => Err(std::io::Error::from_raw_os_error(code)),
        None => Ok(()),
    }
}

/// Does this error mean the disk (or the user's quota) is full?
pub fn is_out_of_space(e: &std::io::Error) -> bool {
    matches!(e.raw_os_error(), Some(c) if c == libc::ENOSPC || c == libc::EDQUOT)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_points_actions_and_counts() {
        let (p, problems) = parse("after-submit-intent:3, download-write=enospc,store-write=eio:2");
        assert!(problems.is_empty(), "{problems:?}");
        assert_eq!(p["after-submit-intent"].action, Action::Kill);
        assert_eq!(p["after-submit-intent"].at, 3);
        assert_eq!(p["download-write"].action, Action::Error(libc::ENOSPC));
        assert_eq!(p["download-write"].at, 1);
        assert_eq!(p["store-write"].action, Action::Error(libc::EIO));
        assert_eq!(p["store-write"].at, 2);
    }

    #[test]
    fn typos_are_reported_and_ignored() {
        let (p, problems) =
            parse("no-such-point:1,mid-download=explode,mid-rename:0,before-rename");
        assert_eq!(problems.len(), 3, "{problems:?}");
        assert_eq!(p.len(), 1);
        assert!(p.contains_key("before-rename"));
    }

    #[test]
    fn kill_fires_once_at_its_hit_errors_from_theirs_on() {
        let (p, _) = parse("mid-download:3,download-write=enospc:2");
        let kills: Vec<_> = (0..5).map(|_| p["mid-download"].fire()).collect();
        assert_eq!(kills, [None, None, Some(Action::Kill), None, None]);
        let errors: Vec<_> = (0..4).map(|_| p["download-write"].fire()).collect();
        let enospc = Some(Action::Error(libc::ENOSPC));
        assert_eq!(errors, [None, enospc, enospc, enospc]);
    }

    #[test]
    fn disk_full_is_recognised() {
        assert!(is_out_of_space(&std::io::Error::from_raw_os_error(
            libc::ENOSPC
        )));
        assert!(!is_out_of_space(&std::io::Error::from_raw_os_error(
            libc::EIO
        )));
    }
}
