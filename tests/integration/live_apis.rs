//! What live clients of Perfect and Dzine show beyond their documents (issue 13,
//! docs/providers.md "live evidence"): tasks that answer "no such task" for a while
//! after creation, Perfect's credit endpoint, the style-list shapes other clients
//! read, and what a console API key can and cannot do. The real binary against
//! `pixbatch sim` with the matching chaos options, time-scaled: the simulator's
//! windows are shorter than the defaults and the client's `early_not_found` matches.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use serde_json::Value;

use crate::common::*;

fn entries<'a>(ledger: &'a [Value], provider: &str, endpoint: &str) -> Vec<&'a Value> {
    ledger
        .iter()
        .filter(|e| e["provider"] == provider && e["endpoint"] == endpoint)
        .collect()
}

/// Charged entries per job (the ledger key is the submit key `<job>~<n>`).
fn charges(ledger: &[Value], provider: &str) -> BTreeMap<String, u64> {
    let mut out = BTreeMap::new();
    for e in ledger
        .iter()
        .filter(|e| e["provider"] == provider && e["charged"] == true)
    {
        let key = e["request_key"].as_str().unwrap_or("");
        *out.entry(job_of_key(key).to_string()).or_insert(0) += 1;
    }
    out
}

fn run(sim: &Sim, dir: &Path, limit: Duration) -> std::process::Output {
    let mut cmd = pixbatch(dir);
    sim.env(&mut cmd);
    cmd.args(["run", "jobs.csv"]);
    run_to_end(cmd, limit)
}

/// Every job done after exactly one submission.
fn all_done_once(dir: &Path, jobs: usize) {
    let rows = report(dir, &dir.join("pixbatch.db"));
    assert_eq!(rows.len(), jobs);
    for r in &rows {
        assert_eq!(r["state"], "done", "{r}");
        assert_eq!(r["submissions"], 1, "resubmitted: {r}");
    }
}

fn perfect_jobs(dir: &Path, n: usize) {
    write_png(&dir.join("in/a.png"), 48, 32, 3);
    let mut csv = String::from("id,provider,operation,input,prompt,params\n");
    for i in 0..n {
        csv.push_str(&format!("c{i},perfect,colorize,in/a.png,,\n"));
    }
    std::fs::write(dir.join("jobs.csv"), csv).unwrap();
}

/// Every new task answers `InvalidTaskId` for 1.5 s; the client's window (3 s here,
/// 10 s by default) covers it: no task is lost or run twice, each is charged once.
#[test]
fn perfect_early_invalid_task_id_loses_no_task_and_charges_once() {
    let sim = Sim::start(&[
        "--task-ms",
        "300",
        "--keep-alive-ms",
        "3000",
        "--perfect-early-invalid-ms",
        "1500",
    ]);
    let dir = tempfile::tempdir().unwrap();
    perfect_jobs(dir.path(), 3);
    std::fs::write(
        dir.path().join("pixbatch.toml"),
        "[providers.perfect]\npoll_interval = \"300ms\"\nkeep_alive = \"3s\"\nearly_not_found = \"3s\"\n",
    )
    .unwrap();
    let out = run(&sim, dir.path(), Duration::from_secs(60));
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    all_done_once(dir.path(), 3);

    let ledger = sim.ledger();
    let early = entries(&ledger, "perfect", "task_status")
        .into_iter()
        .filter(|e| e["status"] == 400)
        .count();
    assert!(
        early >= 3,
        "every task answered InvalidTaskId at first ({early})"
    );
    assert_eq!(
        entries(&ledger, "perfect", "task_run").len(),
        3,
        "no task run twice"
    );
    let charged = charges(&ledger, "perfect");
    assert_eq!(charged.len(), 3, "{charged:?}");
    assert!(charged.values().all(|n| *n == 1), "{charged:?}");
}

/// The same simulator with a client window shorter than the simulator's: the tasks
/// count as lost and are run again (what pixbatch did before the window), so the
/// test above shows the window at work.
#[test]
fn perfect_without_the_window_the_early_tasks_are_lost() {
    let sim = Sim::start(&[
        "--task-ms",
        "300",
        "--keep-alive-ms",
        "3000",
        "--perfect-early-invalid-ms",
        "1500",
    ]);
    let dir = tempfile::tempdir().unwrap();
    perfect_jobs(dir.path(), 1);
    std::fs::write(
        dir.path().join("pixbatch.toml"),
        "[providers.perfect]\npoll_interval = \"300ms\"\nkeep_alive = \"3s\"\nearly_not_found = \"0s\"\nmax_attempts = 2\n",
    )
    .unwrap();
    let _ = run(&sim, dir.path(), Duration::from_secs(60));
    let ledger = sim.ledger();
    assert!(
        entries(&ledger, "perfect", "task_run").len() >= 2,
        "the early InvalidTaskId was taken as lost"
    );
}

/// Every new Dzine task answers 404 for 1.5 s (the live 10 s, time-scaled; the
/// client's window is 3 s): each job is submitted once, charged once, and done.
#[test]
fn dzine_early_404_window_loses_no_task_and_charges_once() {
    let sim = Sim::start(&["--task-ms", "200", "--dzine-early-404-ms", "1500"]);
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    std::fs::write(
        d.join("pixbatch.toml"),
        "[providers.dzine]\nrate_limits = [\"50/1s\"]\npoll_interval = \"150ms\"\nearly_not_found = \"3s\"\n",
    )
    .unwrap();
    let params = r#""{""style_code"": ""Style-7feccf2b-f2ad-43a6-89cb-354fb5d928d2"", ""target_h"": 128, ""generate_slots"": [1, 0, 0, 0]}""#;
    let mut csv = String::from("id,provider,operation,input,prompt,params\n");
    for i in 0..3 {
        csv.push_str(&format!("z{i},dzine,txt2img,,an owl {i},{params}\n"));
    }
    std::fs::write(d.join("jobs.csv"), csv).unwrap();
    let out = run(&sim, d, Duration::from_secs(60));
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    all_done_once(d, 3);

    let ledger = sim.ledger();
    let created = entries(&ledger, "dzine", "txt2img");
    assert_eq!(created.len(), 3, "no task created twice");
    // Polls inside a task's hidden 1.5 s were answered 404 (the simulator hides every
    // task that long): the window was exercised.
    let hidden_polls = entries(&ledger, "dzine", "task_progress")
        .into_iter()
        .filter(|p| {
            created.iter().any(|c| {
                c["remote_id"] == p["remote_id"]
                    && p["t_ms"].as_u64().unwrap_or(0) < c["t_ms"].as_u64().unwrap_or(0) + 1400
            })
        })
        .count();
    assert!(hidden_polls >= 3, "polls while hidden: {hidden_polls}");
    let charged = charges(&ledger, "dzine");
    assert_eq!(charged.len(), 3, "{charged:?}");
    assert!(charged.values().all(|n| *n == 1), "{charged:?}");
}

/// `balance perfect` reads `/s2s/v1.0/client/credit`: with the RSA pair (an access
/// token) and with a console API key alone (the route the official clients send it
/// to), the simulator's spendable batch, less what the run spent.
#[test]
fn balance_perfect_prints_the_simulators_balance() {
    let sim = Sim::start(&["--task-ms", "200"]);
    let dir = tempfile::tempdir().unwrap();
    perfect_jobs(dir.path(), 2);
    std::fs::write(
        dir.path().join("pixbatch.toml"),
        "[providers.perfect]\npoll_interval = \"200ms\"\n",
    )
    .unwrap();
    let out = run(&sim, dir.path(), Duration::from_secs(60));
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));

    let mut cmd = pixbatch(dir.path());
    sim.env(&mut cmd);
    let out = cmd.args(["balance", "perfect"]).output().unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "perfect: 9998 credits",
        "10000 less the two charged tasks; the non-API batch not counted"
    );

    let mut cmd = pixbatch(dir.path());
    sim_env(&mut cmd, &sim.base);
    cmd.env("PERFECT_API_KEY", "console-key-1");
    let out = cmd.args(["balance", "perfect", "--json"]).output().unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["amount"], 9998.0, "{v}");
    assert_eq!(v["unit"], "credits");
}

/// Style-group lists in the shapes other live clients read (`result.style_groups`,
/// `data.style_groups`) list the same groups as the document's `result.groups`.
#[test]
fn styles_read_the_alternative_answer_shapes() {
    for shape in ["result.style_groups", "data.style_groups"] {
        let sim = Sim::start(&["--perfect-style-shape", shape]);
        let dir = tempfile::tempdir().unwrap();
        let mut cmd = pixbatch(dir.path());
        sim.env(&mut cmd);
        let out = cmd
            .args(["styles", "perfect", "hair-style", "--json"])
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(0), "{shape}: {}", text(&out));
        let groups: Vec<Value> = String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(groups.len(), 25, "{shape}: both pages");
        assert_eq!(groups[0]["id"], "9007199254740993", "{shape}");
        assert!(groups.iter().all(|g| g["kind"] == "group"));
        assert!(
            groups[0]["title"].as_str().unwrap_or("").contains("group"),
            "{shape}: {}",
            groups[0]
        );
        // The styles of a group (under `data` in that shape) too.
        let mut cmd = pixbatch(dir.path());
        sim.env(&mut cmd);
        let first = groups[0]["id"].as_str().unwrap();
        let out = cmd
            .args([
                "styles",
                "perfect",
                "hair-style",
                "--group",
                first,
                "--json",
            ])
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(0), "{shape}: {}", text(&out));
        assert_eq!(String::from_utf8_lossy(&out.stdout).lines().count(), 23);
    }
}

/// `api_key` mode: a console API key alone runs no job. The run stops before any
/// request to the v1.0 routes, saying which credentials to set instead; `doctor`
/// says the same (and that the credit endpoint took the key).
#[test]
fn api_key_mode_refuses_jobs_naming_the_credentials_to_use() {
    let sim = Sim::start(&["--task-ms", "200"]);
    let dir = tempfile::tempdir().unwrap();
    perfect_jobs(dir.path(), 1);
    let mut cmd = pixbatch(dir.path());
    sim_env(&mut cmd, &sim.base);
    cmd.env("PERFECT_API_KEY", "console-key-1");
    cmd.args(["run", "jobs.csv"]);
    let out = run_to_end(cmd, Duration::from_secs(30));
    assert_ne!(out.status.code(), Some(0), "{}", text(&out));
    let said = text(&out);
    assert!(
        said.contains("PERFECT_CLIENT_ID") && said.contains("PERFECT_CLIENT_SECRET"),
        "{said}"
    );
    let ledger = sim.ledger();
    assert!(
        ledger
            .iter()
            .filter(|e| e["provider"] == "perfect")
            .all(|e| e["endpoint"] == "credit"),
        "no request but (at most) the credit check: {ledger:?}"
    );
    let rows = report(dir.path(), &dir.path().join("pixbatch.db"));
    assert!(rows.iter().all(|r| r["state"] != "done"), "{rows:?}");
}

/// A run stopped inside a task's early window and started again keeps the window
/// (counted from the submission time in the job, not from the restart): the task
/// that does not show yet is polled on, not resubmitted, and charged once.
#[test]
fn a_restart_inside_the_early_window_keeps_the_task() {
    let sim = Sim::start(&[
        "--task-ms",
        "300",
        "--keep-alive-ms",
        "20000",
        "--perfect-early-invalid-ms",
        "3000",
    ]);
    let dir = tempfile::tempdir().unwrap();
    perfect_jobs(dir.path(), 1);
    std::fs::write(
        dir.path().join("pixbatch.toml"),
        "[providers.perfect]\npoll_interval = \"300ms\"\nkeep_alive = \"20s\"\nearly_not_found = \"6s\"\n",
    )
    .unwrap();
    let mut cmd = pixbatch(dir.path());
    sim.env(&mut cmd);
    let first = cmd
        .args(["run", "jobs.csv"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    // Wait for the first "not visible yet" answer: the job is inside its window.
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let early = entries(&sim.ledger(), "perfect", "task_status")
            .into_iter()
            .any(|e| e["status"] == 400);
        if early {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no early InvalidTaskId seen"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    sigint(&first);
    let mut first = first;
    let _ = first.wait();
    // Stopped with the task still not showing: the second run has to pick it up.
    let rows = report(dir.path(), &dir.path().join("pixbatch.db"));
    assert_ne!(rows[0]["state"], "done", "{}", rows[0]);

    let out = run(&sim, dir.path(), Duration::from_secs(60));
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    all_done_once(dir.path(), 1);
    let ledger = sim.ledger();
    assert_eq!(
        entries(&ledger, "perfect", "task_run").len(),
        1,
        "not resubmitted"
    );
    let charged = charges(&ledger, "perfect");
    assert_eq!(charged.get("c0"), Some(&1), "{charged:?}");
}
