//! pixbatch in a shell: pipes, exit codes, missing databases, filters and `--json`
//! on the commands that change jobs (issue 12, "fits the shell").

use std::path::Path;
use std::process::Command;

use crate::common::*;

fn manifest(dir: &Path, rows: usize) {
    write_png(&dir.join("in/a.png"), 16, 16, 2);
    let mut csv = String::from("id,provider,operation,input\n");
    for i in 0..rows {
        let provider = if i % 2 == 0 { "topaz" } else { "photio" };
        let operation = if i % 2 == 0 { "enhance" } else { "upscale" };
        csv.push_str(&format!("job{i:05},{provider},{operation},in/a.png\n"));
    }
    std::fs::write(dir.join("jobs.csv"), csv).unwrap();
}

fn enqueue(dir: &Path) {
    let out = pixbatch(dir)
        .args(["enqueue", "jobs.csv"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
}

fn entries(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

#[test]
fn reads_of_a_missing_database_print_nothing_and_leave_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    for args in [
        &["status"][..],
        &["status", "--json"],
        &["list"],
        &["list", "--json"],
        &["show", "x"],
        &["report"],
        &["report", "--format", "jsonl"],
        &["retry", "--failed"],
        &["cancel", "x"],
    ] {
        let out = pixbatch(d).args(args).output().unwrap();
        assert_eq!(out.status.code(), Some(1), "{args:?}: {}", text(&out));
        assert!(
            out.stdout.is_empty(),
            "{args:?} printed on stdout: {}",
            text(&out)
        );
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains("no database at pixbatch.db"),
            "{args:?}: {err}"
        );
        assert_eq!(
            entries(d),
            Vec::<String>::new(),
            "{args:?} left files behind"
        );
    }
    // `run` with nothing to do makes no database either, and says so.
    let out = pixbatch(d).arg("run").output().unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    assert!(String::from_utf8_lossy(&out.stderr).contains("nothing to do"));
    assert_eq!(entries(d), Vec::<String>::new());

    // After `demo`, a bare `status` points at the demo's database.
    std::fs::create_dir_all(d.join("pixbatch-demo/pixbatch.db")).unwrap();
    let out = pixbatch(d).arg("status").output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("--db pixbatch-demo/pixbatch.db status"),
        "{err}"
    );
}

#[test]
fn a_closed_pipe_ends_quietly_with_0() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    // Far more than a pipe holds (64 KiB), so the writer meets the closed end.
    manifest(d, 4000);
    enqueue(d);
    for command in [
        "list",
        "list --json",
        "report",
        "report --format jsonl",
        "show job00000",
    ] {
        let script = format!(
            "set -o pipefail; '{}' {command} | head -n 1",
            bin().display()
        );
        let out = Command::new("bash")
            .args(["-c", &script])
            .current_dir(d)
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(0), "{command}: {}", text(&out));
        assert_eq!(String::from_utf8_lossy(&out.stdout).lines().count(), 1);
        assert!(out.stderr.is_empty(), "{command}: {}", text(&out));
    }
}

#[test]
fn retry_and_cancel_take_filters_say_what_they_did_and_fail_on_unknown_ids() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    manifest(d, 6);
    enqueue(d);

    // Filters pick the jobs; --dry-run changes nothing; --json says what it did.
    let out = pixbatch(d)
        .args(["cancel", "--provider", "photio", "--dry-run", "--json"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
    let answer: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let ids: Vec<&str> = answer["changed"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["job00001", "job00003", "job00005"], "{answer}");
    assert_eq!(answer["dry_run"], true);
    let rows = report(d, &d.join("pixbatch.db"));
    assert!(rows.iter().all(|r| r["state"] == "queued"), "{rows:#?}");

    let out = pixbatch(d)
        .args(["cancel", "--provider", "photio", "--json"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
    let rows = report(d, &d.join("pixbatch.db"));
    let cancelled: Vec<&str> = rows
        .iter()
        .filter(|r| r["state"] == "cancelled")
        .map(|r| r["id"].as_str().unwrap())
        .collect();
    assert_eq!(cancelled, ["job00001", "job00003", "job00005"]);

    // Unknown ids exit 1, after doing what the known ones ask.
    let out = pixbatch(d)
        .args(["cancel", "job00000", "nosuch"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(String::from_utf8_lossy(&out.stderr).contains("nosuch: no such job"));
    let out = pixbatch(d)
        .args(["retry", "job00001", "nosuch", "--json"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    let answer: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(answer["unknown"], serde_json::json!(["nosuch"]), "{answer}");
    assert_eq!(answer["changed"][0]["id"], "job00001", "{answer}");
    // A named job in the wrong state is left alone, and says so with exit 1.
    let out = pixbatch(d).args(["retry", "job00002"]).output().unwrap();
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("job00002: is queued"),
        "{}",
        text(&out)
    );
    // Bare `cancel` names no jobs: refused rather than cancelling everything.
    let out = pixbatch(d).arg("cancel").output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("say which jobs"));

    let rows = report(d, &d.join("pixbatch.db"));
    let state = |id: &str| {
        rows.iter()
            .find(|r| r["id"] == id)
            .map(|r| r["state"].as_str().unwrap().to_string())
            .unwrap()
    };
    assert_eq!(state("job00000"), "cancelled");
    assert_eq!(state("job00001"), "queued");
    assert_eq!(state("job00003"), "cancelled");
}

#[test]
fn run_takes_provider_limit_and_concurrency_and_list_takes_limit_and_manifest() {
    let sim = Sim::start(&["--task-ms", "50"]);
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    manifest(d, 10);
    // A second manifest, so `list --manifest` has something to tell apart.
    std::fs::write(
        d.join("more.csv"),
        "id,provider,operation,input\nextra,topaz,enhance,in/a.png\n",
    )
    .unwrap();
    let go = |args: &[&str]| {
        let mut cmd = pixbatch(d);
        sim.env(&mut cmd);
        cmd.args(args);
        run_to_end(cmd, std::time::Duration::from_secs(120))
    };
    let states = || -> Vec<(String, String)> {
        report(d, &d.join("pixbatch.db"))
            .iter()
            .map(|r| {
                (
                    r["id"].as_str().unwrap().to_string(),
                    r["state"].as_str().unwrap().to_string(),
                )
            })
            .collect()
    };

    // Only Photio's jobs run; Topaz's stay queued, and that is what was asked: exit 0.
    let out = go(&["run", "--provider", "photio", "jobs.csv", "more.csv"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("6 job(s) left for a later run"),
        "{}",
        text(&out)
    );
    for (id, state) in states() {
        let photio = id != "extra" && id[3..].parse::<u32>().unwrap() % 2 == 1;
        assert_eq!(state, if photio { "done" } else { "queued" }, "{id}");
    }
    assert_eq!(
        sim.ledger()
            .iter()
            .filter(|e| e["provider"] == "topaz")
            .count(),
        0,
        "no Topaz request went out"
    );

    // --limit 2 with -j 1: exactly two more jobs are started, and finished.
    let out = go(&["run", "--limit", "2", "-j", "1"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let done = states().iter().filter(|(_, s)| s == "done").count();
    assert_eq!(done, 5 + 2);

    // list --limit and --manifest.
    let out = pixbatch(d)
        .args(["list", "--json", "--limit", "3"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(String::from_utf8_lossy(&out.stdout).lines().count(), 3);
    let more = d.join("more.csv");
    let out = pixbatch(d)
        .args(["list", "--json", "--manifest", more.to_str().unwrap()])
        .output()
        .unwrap();
    let ids: Vec<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).unwrap()["id"]
                .as_str()
                .unwrap()
                .to_string()
        })
        .collect();
    assert_eq!(ids, ["extra"]);
    let out = pixbatch(d)
        .args(["list", "--manifest", "jobs.csv", "--state", "done"])
        .output()
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).lines().count(),
        1 + done - usize::from(states().iter().any(|(id, s)| id == "extra" && s == "done")),
        "{}",
        text(&out)
    );
}

#[test]
fn doctor_json_gives_each_providers_verdict() {
    let sim = Sim::start(&[]);
    let dir = tempfile::tempdir().unwrap();
    let mut cmd = pixbatch(dir.path());
    sim.env(&mut cmd);
    let out = cmd.args(["doctor", "--json"]).output().unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let answer: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let providers = answer["providers"].as_array().unwrap();
    assert_eq!(providers.len(), 5, "{answer}");
    assert!(providers.iter().all(|p| p["verdict"] == "ok"), "{answer:#}");
    assert_eq!(answer["ok"], true);

    // Nothing configured: every provider says so, and the exit is 1.
    let out = pixbatch(dir.path())
        .args(["doctor", "--json"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    let answer: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(answer["providers"]
        .as_array()
        .unwrap()
        .iter()
        .all(|p| p["verdict"] == "not-configured"));
    assert_eq!(answer["ok"], false);
}

#[test]
fn validate_and_dry_run_speak_json() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    manifest(d, 4);
    let json_of = |out: &std::process::Output| -> serde_json::Value {
        serde_json::from_slice(&out.stdout)
            .unwrap_or_else(|e| panic!("not one JSON object ({e}): {}", text(out)))
    };
    let mut cmd = pixbatch(d);
    sim_env(&mut cmd, "http://127.0.0.1:9");
    let out = cmd
        .args(["validate", "--offline", "--json", "jobs.csv"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let doc = json_of(&out);
    assert_eq!(doc["ok"], true, "{doc:#}");
    assert_eq!(doc["plan"]["jobs"], 4);
    assert_eq!(doc["plan"]["providers"]["topaz"]["jobs"], 2);
    assert_eq!(doc["plan"]["providers"]["photio"]["new_jobs"], 2);
    assert!(doc["costs"]["topaz"]["jobs"].as_u64() == Some(2), "{doc:#}");

    // A bad row: exit 1, and the row named in the JSON.
    std::fs::write(
        d.join("bad.csv"),
        "id,provider,operation,input\nok,topaz,enhance,in/a.png\nbad,topaz,no-such-op,in/a.png\n",
    )
    .unwrap();
    let mut cmd = pixbatch(d);
    sim_env(&mut cmd, "http://127.0.0.1:9");
    let out = cmd
        .args(["validate", "--offline", "--json", "bad.csv"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    let doc = json_of(&out);
    assert_eq!(doc["ok"], false);
    assert_eq!(doc["errors"][0]["file"], "bad.csv", "{doc:#}");
    assert_eq!(doc["errors"][0]["line"], 3, "{doc:#}");

    // A missing key: not ok, the variable named.
    let out = pixbatch(d)
        .args(["validate", "--offline", "--json", "jobs.csv"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    let doc = json_of(&out);
    assert_eq!(doc["ok"], false);
    let missing = doc["missing_credentials"].to_string();
    assert!(missing.contains("TOPAZ_API_KEY"), "{doc:#}");

    // run --dry-run --json: the same plan, the caps, and nothing enqueued.
    let mut cmd = pixbatch(d);
    sim_env(&mut cmd, "http://127.0.0.1:9");
    let out = cmd
        .args([
            "run",
            "--dry-run",
            "--offline",
            "--json",
            "--max-credits",
            "photio=100",
            "jobs.csv",
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let doc = json_of(&out);
    assert_eq!(doc["plan"]["jobs"], 4, "{doc:#}");
    assert_eq!(doc["max_credits"]["photio"]["cap"], 100.0, "{doc:#}");
    assert!(!d.join("pixbatch.db").exists(), "a dry run enqueued");
}
