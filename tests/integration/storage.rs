//! Storage faults, end to end with the real binary: a full disk while results are
//! written or while the database is written (injected through `PIXBATCH_FAILPOINTS`),
//! and databases that cannot be opened or were written by a newer pixbatch.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};

use crate::common::*;

/// Topaz jobs (a result URL, streamed to disk) and Photio jobs (inline bytes).
fn write_jobs(dir: &Path) -> usize {
    for i in 0..3u32 {
        write_png(
            &dir.join(format!("in/{i}.png")),
            40 + 8 * i,
            32,
            i as u8 * 40,
        );
    }
    let mut csv = String::from("id,provider,operation,input,prompt,params,output\n");
    for i in 0..6 {
        csv.push_str(&format!(
            "t{i},topaz,enhance,in/{}.png,,\"{{\"\"output_width\"\":96}}\",\n",
            i % 3
        ));
    }
    for i in 0..3 {
        csv.push_str(&format!(
            "p{i},photio,upscale,in/{i}.png,,\"{{\"\"upscale_by\"\":2}}\",\n"
        ));
    }
    std::fs::write(dir.join("jobs.csv"), csv).unwrap();
    std::fs::write(
        dir.join("pixbatch.toml"),
        "[providers.topaz]\npoll_interval = \"100ms\"\n",
    )
    .unwrap();
    9
}

fn run_with_failpoints(sim: &Sim, dir: &Path, failpoints: Option<&str>) -> std::process::Output {
    let mut cmd = pixbatch(dir);
    sim.env(&mut cmd);
    cmd.args(["run", "--quiet", "jobs.csv"]);
    match failpoints {
        Some(f) => cmd.env("PIXBATCH_FAILPOINTS", f),
        None => cmd.env_remove("PIXBATCH_FAILPOINTS"),
    };
    run_to_end(cmd, Duration::from_secs(120))
}

fn charges_per_job(sim: &Sim) -> BTreeMap<String, u64> {
    let mut charges = BTreeMap::new();
    for e in sim.ledger() {
        if e["charged"] == true {
            if let Some(key) = e["request_key"].as_str() {
                *charges.entry(job_of_key(key).to_string()).or_default() += 1;
            }
        }
    }
    charges
}

/// After the space is back: every job done, every file whole and as recorded,
/// Topaz charged once per job, Photio at most once plus what is recorded.
fn assert_finished_well(sim: &Sim, dir: &Path, jobs: usize) {
    let out = run_with_failpoints(sim, dir, None);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let rows = report(dir, &dir.join("pixbatch.db"));
    assert_eq!(rows.len(), jobs);
    let charges = charges_per_job(sim);
    for r in &rows {
        let id = r["id"].as_str().unwrap();
        assert_eq!(r["state"], "done", "{r}");
        let file = dir.join("out").join(joined(&r["outputs"]));
        assert_eq!(sha256_file(&file), joined(&r["sha256"]), "{id}");
        let n = charges.get(id).copied().unwrap_or(0);
        let dups = r["possible_duplicates"].as_u64().unwrap();
        if r["provider"] == "topaz" {
            assert_eq!((n, dups), (1, 0), "{id}: {r}");
        } else {
            assert!(n >= 1 && n <= 1 + dups, "{id} charged {n}, {dups} recorded");
        }
    }
    assert!(files_ending(&dir.join("out"), ".part").is_empty());
}

#[test]
fn a_full_disk_while_writing_results_stops_the_run_and_the_next_run_finishes() {
    let sim = Sim::start(&["--task-ms", "200"]);
    let dir = tempfile::tempdir().unwrap();
    let jobs = write_jobs(dir.path());

    let started = Instant::now();
    let out = run_with_failpoints(&sim, dir.path(), Some("download-write=enospc"));
    let took = started.elapsed();
    let all = text(&out);
    assert_eq!(out.status.code(), Some(1), "{all}");
    let stderr = String::from_utf8_lossy(&out.stderr).to_lowercase();
    assert!(
        stderr.contains("no space left on device") && stderr.contains("job "),
        "the message names neither the job nor the cause: {all}"
    );
    assert!(!all.contains("panicked"), "{all}");
    // It stops instead of going through backoff until the attempts run out (25 s
    // and more); the bound leaves room for a loaded machine.
    assert!(took < Duration::from_secs(60), "took {took:?}");

    let rows = report(dir.path(), &dir.path().join("pixbatch.db"));
    assert_eq!(rows.len(), jobs);
    for r in &rows {
        // Back to retry: neither done (no whole file) nor failed.
        assert!(r["state"] != "done" && r["state"] != "failed", "{r}\n{all}");
        assert_eq!(joined(&r["outputs"]), "", "{r}");
    }
    let left = files_ending(&dir.path().join("out"), "");
    assert!(left.is_empty(), "files left in out: {left:?}");

    assert_finished_well(&sim, dir.path(), jobs);
}

#[test]
fn a_full_disk_under_the_database_stops_the_run_and_the_next_run_finishes() {
    let sim = Sim::start(&["--task-ms", "200"]);
    let dir = tempfile::tempdir().unwrap();
    let jobs = write_jobs(dir.path());

    // Let the first dozen job records through, then every write fails.
    let out = run_with_failpoints(&sim, dir.path(), Some("store-write=enospc:12"));
    let all = text(&out);
    assert_eq!(out.status.code(), Some(1), "{all}");
    let stderr = String::from_utf8_lossy(&out.stderr).to_lowercase();
    assert!(
        stderr.contains("no space left on device") && stderr.contains("job "),
        "{all}"
    );
    assert!(stderr.contains("free some space"), "{all}");
    assert!(!all.contains("panicked"), "{all}");

    // Whatever was recorded as done is whole.
    for r in report(dir.path(), &dir.path().join("pixbatch.db")) {
        if r["state"] == "done" {
            let file = dir.path().join("out").join(joined(&r["outputs"]));
            assert_eq!(sha256_file(&file), joined(&r["sha256"]));
        }
    }

    assert_finished_well(&sim, dir.path(), jobs);
}

/// Enqueues `n` jobs into `dir/pixbatch.db` and returns the database path.
fn enqueued_db(dir: &Path, n: usize) -> std::path::PathBuf {
    write_png(&dir.join("in/0.png"), 40, 32, 1);
    let mut csv = String::from("id,provider,operation,input\n");
    for i in 0..n {
        csv.push_str(&format!("x{i},topaz,enhance,in/0.png\n"));
    }
    std::fs::write(dir.join("jobs.csv"), csv).unwrap();
    let out = pixbatch(dir)
        .args(["enqueue", "jobs.csv"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
    dir.join("pixbatch.db")
}

/// `pixbatch ARGS` ends with exit 1 and a message containing `needle`, no panic.
fn assert_clear_error(dir: &Path, args: &[&str], needle: &str) {
    let mut cmd = pixbatch(dir);
    // Any provider variable is enough for `run` to get as far as the database.
    sim_env(&mut cmd, "http://127.0.0.1:9");
    let out = cmd.args(args).output().unwrap();
    let all = text(&out);
    assert_eq!(out.status.code(), Some(1), "{args:?}: {all}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(needle),
        "{args:?}: expected {needle:?}: {all}"
    );
    assert!(!stderr.contains("panicked"), "{args:?}: {all}");
}

#[test]
fn a_database_that_cannot_be_opened_is_a_clear_error_not_a_panic() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();

    std::fs::write(d.join("file.db"), "not a database").unwrap();
    for cmd in [&["run"][..], &["status"], &["enqueue", "jobs.csv"]] {
        let args: Vec<&str> = ["--db", "file.db"].iter().chain(cmd).copied().collect();
        assert_clear_error(d, &args, "is a file, not a database folder");
    }

    std::fs::create_dir(d.join("photos")).unwrap();
    std::fs::write(d.join("photos/holiday.jpg"), "jpeg").unwrap();
    assert_clear_error(d, &["--db", "photos", "run"], "no database");
    // Nothing was written among the user's files.
    assert_eq!(std::fs::read_dir(d.join("photos")).unwrap().count(), 1);

    // Damage the log of a database with 300 jobs three ways: sled either says it is
    // corrupt or recovers nothing, and pixbatch refuses both.
    let db = enqueued_db(d, 300);
    let len = std::fs::metadata(db.join("db")).unwrap().len();
    type Damage = Box<dyn Fn(&std::fs::File)>;
    let damages: [(&str, Damage); 3] = [
        ("cut short", Box::new(|f| f.set_len(100).unwrap())),
        ("garbage at 1/8", Box::new(move |f| garbage(f, len / 8))),
        ("garbage at 1/2", Box::new(move |f| garbage(f, len / 2))),
    ];
    for (what, damage) in damages {
        let broken = d.join("broken.db");
        let _ = std::fs::remove_dir_all(&broken);
        std::fs::create_dir(&broken).unwrap();
        for f in std::fs::read_dir(&db).unwrap().flatten() {
            if f.path().is_file() {
                std::fs::copy(f.path(), broken.join(f.file_name())).unwrap();
            }
        }
        damage(
            &std::fs::OpenOptions::new()
                .write(true)
                .open(broken.join("db"))
                .unwrap(),
        );
        for cmd in ["run", "status", "report"] {
            let out = pixbatch(d)
                .args(["--db", "broken.db", cmd])
                .output()
                .unwrap();
            let stderr = String::from_utf8_lossy(&out.stderr);
            assert_eq!(out.status.code(), Some(1), "{what}, {cmd}: {}", text(&out));
            assert!(
                stderr.contains("corrupt") || stderr.contains("damaged"),
                "{what}, {cmd}: {}",
                text(&out)
            );
            assert!(!stderr.contains("panicked"), "{what}: {}", text(&out));
        }
    }
}

fn garbage(f: &std::fs::File, at: u64) {
    use std::os::unix::fs::FileExt;
    f.write_all_at(&[0x5a; 64], at).unwrap();
}

/// Rewrites the first byte (the format version) of a record in `tree`.
fn set_version(db: &Path, tree: &str, key: &str, version: u8) {
    let db = sled::open(db).unwrap();
    let t = db.open_tree(tree).unwrap();
    let mut v = t.get(key).unwrap().expect("record").to_vec();
    v[0] = version;
    t.insert(key, v).unwrap();
    db.flush().unwrap();
}

#[test]
fn a_database_of_a_newer_format_is_refused_with_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let db = enqueued_db(d, 3);

    // One job record written by a newer pixbatch: what reads it refuses it.
    set_version(&db, "jobs", "x1", pixbatch::store::FORMAT_VERSION + 1);
    assert_clear_error(d, &["show", "x1"], "newer than this pixbatch");
    assert_clear_error(d, &["report"], "newer than this pixbatch");
    assert_clear_error(d, &["run"], "newer than this pixbatch");

    // The whole database marked newer: nothing opens it.
    set_version(&db, "meta", "format", pixbatch::store::FORMAT_VERSION + 1);
    for cmd in [
        &["run"][..],
        &["status"],
        &["list"],
        &["enqueue", "jobs.csv"],
    ] {
        assert_clear_error(d, cmd, "newer than this pixbatch");
    }
}
