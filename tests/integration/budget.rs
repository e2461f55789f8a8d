//! The rate budget belongs to the credential (issue 12, point 5): every pixbatch
//! process with the same key against the same provider URL shares one window and one
//! Retry-After through a state file under the user's state directory.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::common::*;

const TOPAZ_KEY: &str = "test-topaz-key-123";

fn topaz_jobs(dir: &Path, n: usize) {
    write_png(&dir.join("in/a.png"), 48, 32, 1);
    let mut csv = String::from("id,provider,operation,input,prompt,params\n");
    for i in 0..n {
        csv.push_str(&format!(
            "t{i},topaz,enhance,in/a.png,,\"{{\"\"output_width\"\":{}}}\"\n",
            64 + i
        ));
    }
    std::fs::write(dir.join("jobs.csv"), csv).unwrap();
}

/// `pixbatch run jobs.csv` in `dir`, with the budget files in `state`.
fn run_cmd(sim: &Sim, dir: &Path, state: &Path) -> Command {
    let mut cmd = pixbatch(dir);
    sim.env(&mut cmd);
    cmd.env("PIXBATCH_STATE_DIR", state);
    cmd.args(["run", "jobs.csv"]);
    cmd
}

fn budget_files(state: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(state)
        .map(|rd| rd.flatten().map(|e| e.path()).collect())
        .unwrap_or_default();
    files.retain(|p| p.extension().is_some_and(|e| e == "json"));
    files.sort();
    files
}

/// Two databases in two folders, the same key, the same simulator, run at once: the
/// simulator counts no limit breach, because both reserve every request in one file.
/// (Each run alone goes as fast as the limit allows, so two separate windows would
/// break it at once.)
#[test]
fn two_databases_with_one_key_share_one_window() {
    let sim = Sim::start(&["--task-ms", "100", "--limit", "topaz=10/1s"]);
    let state = tempfile::tempdir().unwrap();
    let dirs = [tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap()];
    // The margin covers the time from a request's reservation to its arrival on a
    // loaded machine (the simulator counts arrivals); two separate windows would
    // still break the limit dozens of times (35 when checked with the state folder
    // unusable).
    for d in &dirs {
        topaz_jobs(d.path(), 10);
        std::fs::write(
            d.path().join("pixbatch.toml"),
            "[engine]\nrate_margin = \"150ms\"\n\
             [providers.topaz]\nrate_limits = [\"10/1s\"]\nconcurrency = 8\npoll_interval = \"100ms\"\n",
        )
        .unwrap();
    }
    let runs: Vec<_> = dirs
        .iter()
        .map(|d| {
            let cmd = run_cmd(&sim, d.path(), state.path());
            std::thread::spawn(move || run_to_end(cmd, Duration::from_secs(240)))
        })
        .collect();
    for r in runs {
        let out = r.join().unwrap();
        assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    }
    let stats = sim.stats();
    assert_eq!(stats["violations"]["topaz"], 0, "{stats}");
    assert!(
        stats["requests"]["topaz"].as_u64().unwrap() >= 2 * 10 * 3,
        "both runs did their work: {stats}"
    );
    for d in &dirs {
        let rows = report(d.path(), &d.path().join("pixbatch.db"));
        assert!(rows.iter().all(|r| r["state"] == "done"), "{rows:?}");
    }
    // One file for the one credential, naming the provider and URL, never the key.
    let files = budget_files(state.path());
    assert_eq!(files.len(), 1, "{files:?}");
    let name = files[0].file_name().unwrap().to_string_lossy().into_owned();
    assert!(
        name.starts_with("topaz-") && !name.contains(TOPAZ_KEY),
        "{name}"
    );
    let body = std::fs::read_to_string(&files[0]).unwrap();
    assert!(!body.contains(TOPAZ_KEY), "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["provider"], "topaz");
    assert_eq!(v["base_url"], format!("{}/topaz/image/v1", sim.base));
    assert!(!v["sent_ms"].as_array().unwrap().is_empty(), "{v}");
    // And nothing else in the state folder holds the key either.
    for f in files_ending(state.path(), "") {
        let bytes = std::fs::read(&f).unwrap();
        assert!(
            !String::from_utf8_lossy(&bytes).contains(TOPAZ_KEY),
            "{f:?}"
        );
    }
}

/// The same made-up key against two simulators (two base URLs) is two credentials as
/// far as the budget goes: two files, one per URL.
#[test]
fn the_same_key_at_two_urls_keeps_two_budgets() {
    let sims = [
        Sim::start(&["--task-ms", "50"]),
        Sim::start(&["--task-ms", "50"]),
    ];
    let state = tempfile::tempdir().unwrap();
    for sim in &sims {
        let dir = tempfile::tempdir().unwrap();
        topaz_jobs(dir.path(), 1);
        let out = run_to_end(
            run_cmd(sim, dir.path(), state.path()),
            Duration::from_secs(60),
        );
        assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    }
    let files = budget_files(state.path());
    assert_eq!(files.len(), 2, "{files:?}");
    let urls: Vec<String> = files
        .iter()
        .map(|f| {
            let v: serde_json::Value =
                serde_json::from_str(&std::fs::read_to_string(f).unwrap()).unwrap();
            v["base_url"].as_str().unwrap().to_string()
        })
        .collect();
    for sim in &sims {
        let url = format!("{}/topaz/image/v1", sim.base);
        assert!(urls.contains(&url), "{urls:?} lacks {url}");
    }
}

/// Waits until the simulator's ledger has an entry matching `pred`, up to `limit`.
fn wait_for_entry(
    sim: &Sim,
    limit: Duration,
    pred: impl Fn(&serde_json::Value) -> bool,
) -> Option<serde_json::Value> {
    let start = Instant::now();
    while start.elapsed() < limit {
        if let Some(e) = sim.ledger().into_iter().find(|e| pred(e)) {
            return Some(e);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    None
}

fn spawn_quiet(mut cmd: Command) -> std::process::Child {
    cmd.stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn pixbatch run")
}

/// A run killed (SIGKILL) right after a 429 with Retry-After, and started again at
/// once, sends nothing before the Retry-After has elapsed: the restarted process finds
/// the provider's "not before" in the credential's budget file.
#[test]
fn a_restart_right_after_a_retry_after_waits_it_out() {
    const RETRY_AFTER_S: u64 = 4;
    let sim = Sim::start(&[
        "--task-ms",
        "50",
        "--limit",
        "topaz=20/1s",
        "--chaos-429",
        "1",
        "--chaos-retry-after",
        &RETRY_AFTER_S.to_string(),
    ]);
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    topaz_jobs(dir.path(), 2);
    // One request at a time: every request after the 429 comes from the restart.
    std::fs::write(
        dir.path().join("pixbatch.toml"),
        "[providers.topaz]\nrate_limits = [\"20/1s\"]\nconcurrency = 1\nmax_in_flight = 1\n",
    )
    .unwrap();

    let mut first = spawn_quiet(run_cmd(&sim, dir.path(), &state));
    let refused = wait_for_entry(&sim, Duration::from_secs(30), |e| {
        e["provider"] == "topaz" && e["fault"] == "429"
    });
    first.kill().unwrap();
    first.wait().unwrap();
    let refused = refused.expect("the first run got a 429");
    assert_eq!(refused["retry_after_s"], RETRY_AFTER_S, "{refused}");
    let (seq, t429) = (
        refused["seq"].as_u64().unwrap(),
        refused["t_ms"].as_u64().unwrap(),
    );

    // Started again at once: its first request must wait out the Retry-After.
    let mut second = spawn_quiet(run_cmd(&sim, dir.path(), &state));
    let next = wait_for_entry(&sim, Duration::from_secs(RETRY_AFTER_S + 20), |e| {
        e["provider"] == "topaz" && e["seq"].as_u64().unwrap() > seq
    });
    second.kill().unwrap();
    second.wait().unwrap();
    let next = next.expect("the restarted run sent a request in the end");
    let after = sim
        .ledger()
        .into_iter()
        .filter(|e| e["provider"] == "topaz" && e["seq"].as_u64().unwrap() > seq)
        .collect::<Vec<_>>();
    assert!(!after.is_empty(), "{next}");
    for e in &after {
        let t = e["t_ms"].as_u64().unwrap();
        // The client counts from when the answer came back, later than the arrival
        // the simulator stamped, so no slack is needed beyond clock rounding.
        assert!(
            t + 20 >= t429 + RETRY_AFTER_S * 1000,
            "request {} came {} ms after the 429 (Retry-After {RETRY_AFTER_S} s)",
            e["seq"],
            t - t429
        );
    }
}
