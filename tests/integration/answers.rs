//! The answers users asked other job queues for (issue 5, item 5), against the real
//! binary and the simulator: a job that keeps failing ends `failed` with every
//! attempt's error kept; `retry --failed` brings it back and it finishes; `cancel`
//! during a run cancels the remote task at the provider where it can; waits imposed
//! by the provider (429, with and without Retry-After) use up no attempts.
//! (`lifecycle.rs` covers a permanent refusal, cancel with no run going, and an
//! outage; `limits.rs` the timing of Retry-After.)

use std::process::Stdio;
use std::time::{Duration, Instant};

use crate::common::*;

fn show_json(dir: &std::path::Path, id: &str) -> serde_json::Value {
    let out = pixbatch(dir).args(["show", id, "--json"]).output().unwrap();
    assert!(out.status.success(), "{}", text(&out));
    serde_json::from_slice(&out.stdout).unwrap()
}

fn status_json(dir: &std::path::Path) -> serde_json::Value {
    let out = pixbatch(dir).args(["status", "--json"]).output().unwrap();
    serde_json::from_slice(&out.stdout).unwrap_or_default()
}

/// Nothing answers at the provider's address, so every attempt fails (each with its
/// own error recorded) until `max_attempts`; then the provider comes up, `retry
/// --failed` requeues the job and the next run finishes it, paying once.
#[test]
fn a_job_that_keeps_failing_keeps_every_error_and_retry_brings_it_back() {
    let dir = tempfile::tempdir().unwrap();
    write_png(&dir.path().join("in/a.png"), 32, 32, 3);
    std::fs::write(
        dir.path().join("jobs.csv"),
        "id,provider,operation,input\nflaky,topaz,enhance,in/a.png\n",
    )
    .unwrap();
    std::fs::write(
        dir.path().join("pixbatch.toml"),
        "[providers.topaz]\nmax_attempts = 3\npoll_interval = \"100ms\"\n",
    )
    .unwrap();
    let port = free_port();
    let base = format!("http://127.0.0.1:{port}");
    let mut cmd = pixbatch(dir.path());
    sim_env(&mut cmd, &base);
    cmd.args(["run", "jobs.csv"]);
    let out = run_to_end(cmd, Duration::from_secs(60));
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));

    let detail = show_json(dir.path(), "flaky");
    assert_eq!(detail["row"]["state"], "failed", "{detail:#}");
    assert_eq!(detail["row"]["attempts"], 3, "{detail:#}");
    let events = detail["events"].as_array().unwrap();
    let messages: Vec<&str> = events
        .iter()
        .map(|e| e["message"].as_str().unwrap_or(""))
        .collect();
    // Attempts 1 and 2 as retries, the third in the final failure: each with the cause.
    for n in 1..=2 {
        let m = messages
            .iter()
            .find(|m| m.starts_with(&format!("attempt {n} failed")))
            .unwrap_or_else(|| panic!("no event for attempt {n}: {messages:#?}"));
        assert!(
            m.contains("request failed") && m.contains(&port.to_string()),
            "attempt {n} lacks its cause: {m}"
        );
    }
    let last = events
        .iter()
        .find(|e| e["kind"] == "failed")
        .unwrap_or_else(|| panic!("no failed event: {messages:#?}"));
    assert!(
        last["message"]
            .as_str()
            .is_some_and(|m| m.contains("gave up after 3 attempts") && m.contains("request failed")),
        "{last}"
    );
    // The text form shows the same history.
    let shown = pixbatch(dir.path())
        .args(["show", "flaky"])
        .output()
        .unwrap();
    let shown = String::from_utf8_lossy(&shown.stdout);
    assert!(
        shown.contains("attempt 1 failed")
            && shown.contains("attempt 2 failed")
            && shown.contains("gave up after 3 attempts"),
        "{shown}"
    );

    // The provider comes back; the failure is brought back and finishes.
    let sim = Sim::start_at(&format!("127.0.0.1:{port}"), &["--task-ms", "100"]);
    let retry = pixbatch(dir.path())
        .args(["retry", "--failed"])
        .output()
        .unwrap();
    assert!(retry.status.success(), "{}", text(&retry));
    assert!(
        String::from_utf8_lossy(&retry.stdout).contains("1 job(s) requeued"),
        "{}",
        text(&retry)
    );
    let mut cmd = pixbatch(dir.path());
    sim.env(&mut cmd);
    cmd.args(["run"]);
    let out = run_to_end(cmd, Duration::from_secs(60));
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let detail = show_json(dir.path(), "flaky");
    assert_eq!(detail["row"]["state"], "done", "{detail:#}");
    let out_file = dir
        .path()
        .join("out")
        .join(detail["outputs"][0]["path"].as_str().unwrap());
    assert!(out_file.exists(), "{out_file:?}");
    let charged = sim
        .ledger()
        .into_iter()
        .filter(|e| e["charged"] == true)
        .count();
    assert_eq!(charged, 1);
    // The failed history is still there, followed by the requeue.
    let kinds: Vec<String> = detail["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["kind"].as_str().unwrap_or("").to_string())
        .collect();
    let failed_at = kinds.iter().position(|k| k == "failed").unwrap();
    let requeued_at = kinds.iter().position(|k| k == "requeued").unwrap();
    assert!(failed_at < requeued_at, "{kinds:?}");
}

/// `cancel` while a run holds the database: the running process cancels the jobs
/// itself (over its control socket), the Topaz task at the provider, the Dzine task
/// only locally (Dzine documents no cancel), and the run then ends on its own.
#[test]
fn cancel_during_a_run_cancels_the_remote_task_where_the_provider_can() {
    let sim = Sim::start(&["--task-ms", "60000"]);
    let dir = tempfile::tempdir().unwrap();
    write_png(&dir.path().join("in/a.png"), 32, 32, 5);
    std::fs::write(
        dir.path().join("jobs.csv"),
        "id,provider,operation,input,prompt,params\n\
         long,topaz,enhance,in/a.png,,\n\
         dz,dzine,txt2img,,a lighthouse,\"{\"\"style_code\"\":\"\"Style-7feccf2b-f2ad-43a6-89cb-354fb5d928d2\"\",\"\"target_h\"\":128,\"\"generate_slots\"\":[1,0,0,0]}\"\n",
    )
    .unwrap();
    std::fs::write(
        dir.path().join("pixbatch.toml"),
        "[providers.topaz]\npoll_interval = \"200ms\"\n[providers.dzine]\npoll_interval = \"200ms\"\n",
    )
    .unwrap();
    let mut cmd = pixbatch(dir.path());
    sim.env(&mut cmd);
    let mut run = cmd
        .args(["run", "jobs.csv"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Both tasks accepted and polled at least once (`polling`).
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let s = status_json(dir.path());
        if s["states"]["polling"].as_u64() == Some(2) {
            break;
        }
        assert!(Instant::now() < deadline, "the tasks never started: {s}");
        std::thread::sleep(Duration::from_millis(100));
    }

    let mut cmd = pixbatch(dir.path());
    sim.env(&mut cmd);
    let cancel = cmd
        .args(["cancel", "long", "dz", "nosuch"])
        .output()
        .unwrap();
    // An unknown id makes the exit 1; the known ones are cancelled all the same.
    assert_eq!(cancel.status.code(), Some(1), "{}", text(&cancel));
    let stdout = String::from_utf8_lossy(&cancel.stdout);
    let stderr = String::from_utf8_lossy(&cancel.stderr);
    assert!(
        stdout.lines().any(|l| l.starts_with("long\t")
            && l.contains("during a run")
            && l.contains("cancelled")
            && l.contains("remote task")),
        "{}",
        text(&cancel)
    );
    assert!(
        stdout
            .lines()
            .any(|l| l.starts_with("dz\t") && l.contains("could not be cancelled at the provider")),
        "{}",
        text(&cancel)
    );
    assert!(stderr.contains("nosuch: no such job"), "{}", text(&cancel));
    assert!(stderr.contains("2 job(s) cancelled"), "{}", text(&cancel));

    // Nothing left to do: the run ends by itself, with nothing failed.
    let start = Instant::now();
    let code = loop {
        if let Some(status) = run.try_wait().unwrap() {
            break status.code();
        }
        if start.elapsed() > Duration::from_secs(20) {
            let _ = run.kill();
            panic!("the run did not end after its jobs were cancelled");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let out = run.wait_with_output().unwrap();
    assert_eq!(code, Some(0), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("2 cancelled"),
        "{}",
        text(&out)
    );

    let ledger = sim.ledger();
    let cancels: Vec<_> = ledger
        .iter()
        .filter(|e| e["endpoint"] == "cancel")
        .collect();
    assert_eq!(cancels.len(), 1, "{cancels:?}");
    assert_eq!(cancels[0]["status"], 204);
    assert_eq!(
        cancels[0]["request_key"]
            .as_str()
            .map(job_of_key)
            .unwrap_or(""),
        "long"
    );
    // The cancelled Topaz task is not polled after its cancel.
    let cancelled_at = cancels[0]["seq"].as_u64().unwrap();
    let polls: Vec<u64> = ledger
        .iter()
        .filter(|e| e["provider"] == "topaz" && e["endpoint"] == "status")
        .map(|e| e["seq"].as_u64().unwrap())
        .collect();
    assert!(!polls.is_empty(), "the task was never polled");
    assert!(
        polls.iter().all(|&s| s < cancelled_at),
        "polled after its cancel: {polls:?} vs {cancelled_at}"
    );
    for id in ["long", "dz"] {
        let d = show_json(dir.path(), id);
        assert_eq!(d["row"]["state"], "cancelled", "{d:#}");
        assert!(
            d["events"]
                .as_array()
                .unwrap()
                .iter()
                .any(|e| e["kind"] == "cancelled"),
            "{d:#}"
        );
    }
}

/// With `max_attempts = 1`, any counted failure would fail a job at once: 429s (half
/// with Retry-After, half without) on half of every provider's requests, the
/// presigned storage's included, must not count.
#[test]
fn waits_imposed_by_the_provider_use_up_no_attempts() {
    let sim = Sim::start(&["--task-ms", "100", "--seed", "21", "--chaos-429", "0.5"]);
    let dir = tempfile::tempdir().unwrap();
    write_png(&dir.path().join("in/a.png"), 40, 32, 7);
    let mut csv = String::from("id,provider,operation,input,prompt,params\n");
    // The one-request providers get more jobs, so each surely meets a 429.
    for i in 0..10 {
        csv.push_str(&format!(
            "p{i},photio,upscale,in/a.png,,\"{{\"\"upscale_by\"\":2}}\"\n"
        ));
        csv.push_str(&format!(
            "a{i},aithriving,img2img,in/a.png,a kite {i},\"{{\"\"width\"\":320,\"\"height\"\":320}}\"\n"
        ));
    }
    for i in 0..4 {
        csv.push_str(&format!("t{i},topaz,enhance,in/a.png,,\n"));
        csv.push_str(&format!("b{i},perfect,background-removal,in/a.png,,\n"));
        csv.push_str(&format!(
            "d{i},dzine,upscale,in/a.png,,\"{{\"\"upscaling_resize\"\":2}}\"\n"
        ));
    }
    std::fs::write(dir.path().join("jobs.csv"), csv).unwrap();
    let mut toml = String::new();
    for p in ["topaz", "photio", "aithriving", "perfect", "dzine"] {
        toml.push_str(&format!(
            "[providers.{p}]\nmax_attempts = 1\npoll_interval = \"100ms\"\n"
        ));
    }
    std::fs::write(dir.path().join("pixbatch.toml"), toml).unwrap();
    let mut cmd = pixbatch(dir.path());
    sim.env(&mut cmd);
    cmd.args(["run", "jobs.csv"]);
    let out = run_to_end(cmd, Duration::from_secs(180));
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    for r in report(dir.path(), &dir.path().join("pixbatch.db")) {
        assert_eq!(r["state"], "done", "{r}");
        assert_eq!(r["attempts"], 0, "{r}");
    }
    let ledger = sim.ledger();
    for p in ["topaz", "photio", "aithriving", "perfect", "dzine"] {
        let with = ledger
            .iter()
            .filter(|e| e["provider"] == p && e["fault"] == "429" && !e["retry_after_s"].is_null())
            .count();
        let without = ledger
            .iter()
            .filter(|e| e["provider"] == p && e["fault"] == "429" && e["retry_after_s"].is_null())
            .count();
        assert!(with + without > 0, "{p} got no 429 to prove anything");
        eprintln!("{p}: 429s with Retry-After {with}, without {without}");
    }
    let total_with = ledger
        .iter()
        .filter(|e| e["fault"] == "429" && !e["retry_after_s"].is_null())
        .count();
    let total_without = ledger
        .iter()
        .filter(|e| e["fault"] == "429" && e["retry_after_s"].is_null())
        .count();
    assert!(
        total_with > 0 && total_without > 0,
        "{total_with} {total_without}"
    );
}
