use std::process::Stdio;
use std::time::{Duration, Instant};

use crate::common::*;

fn slow_manifest(dir: &std::path::Path, n: usize) {
    write_png(&dir.join("in/a.png"), 32, 32, 3);
    let mut csv = String::from("id,provider,operation,input\n");
    for i in 0..n {
        csv.push_str(&format!("slow{i},topaz,enhance,in/a.png\n"));
    }
    std::fs::write(dir.join("jobs.csv"), csv).unwrap();
}

fn status_json(dir: &std::path::Path) -> Option<serde_json::Value> {
    let out = pixbatch(dir).args(["status", "--json"]).output().ok()?;
    if !out.status.success() {
        return None;
    }
    serde_json::from_slice(&out.stdout).ok()
}

/// While a run works: a second run exits 3 at once naming the holder, `status`
/// answers, SIGINT stops the run within 5 s, and the next run finishes the work.
#[test]
fn one_run_at_a_time_status_while_running_and_graceful_interrupt() {
    let sim = Sim::start(&["--task-ms", "4000"]);
    let dir = tempfile::tempdir().unwrap();
    slow_manifest(dir.path(), 6);
    std::fs::write(
        dir.path().join("pixbatch.toml"),
        "[providers.topaz]\npoll_interval = \"500ms\"\n",
    )
    .unwrap();

    let mut cmd = pixbatch(dir.path());
    sim.env(&mut cmd);
    let mut first = cmd
        .args(["run", "jobs.csv"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();

    // status answers from another process while the run holds the database.
    let deadline = Instant::now() + Duration::from_secs(20);
    let live = loop {
        if let Some(s) = status_json(dir.path()) {
            if !s["running"].is_null() && s["total"] == 6 {
                break s;
            }
        }
        assert!(
            Instant::now() < deadline,
            "status never showed the running run"
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    assert_eq!(
        live["running"]["pid"].as_u64(),
        Some(first.id() as u64),
        "{live}"
    );
    let list = pixbatch(dir.path())
        .args(["list", "--json"])
        .output()
        .unwrap();
    assert!(list.status.success(), "{}", text(&list));
    assert_eq!(String::from_utf8_lossy(&list.stdout).lines().count(), 6);
    let show = pixbatch(dir.path())
        .args(["show", "slow0"])
        .output()
        .unwrap();
    assert!(
        show.status.success() && String::from_utf8_lossy(&show.stdout).contains("slow0"),
        "{}",
        text(&show)
    );

    // A second run is refused at once with exit 3, naming the holder.
    let t = Instant::now();
    let mut cmd = pixbatch(dir.path());
    sim.env(&mut cmd);
    let second = cmd.arg("run").output().unwrap();
    assert_eq!(second.status.code(), Some(3), "{}", text(&second));
    assert!(
        t.elapsed() < Duration::from_secs(3),
        "took {:?}",
        t.elapsed()
    );
    let err = String::from_utf8_lossy(&second.stderr);
    assert!(err.contains(&format!("pid {}", first.id())), "{err}");

    // SIGINT: the run stops within 5 s.
    sigint(&first);
    let t = Instant::now();
    let code = loop {
        if let Some(status) = first.try_wait().unwrap() {
            break status.code();
        }
        assert!(
            t.elapsed() < Duration::from_secs(5),
            "run still going 5 s after SIGINT"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(code, Some(130));
    let after = status_json(dir.path()).expect("status after the interrupt");
    assert!(after["running"].is_null());
    assert_ne!(
        after["states"]["done"], 6,
        "the interrupt came too late to test anything: {after}"
    );

    // The next run finishes the work, without paying twice.
    let mut cmd = pixbatch(dir.path());
    sim.env(&mut cmd);
    cmd.args(["run", "--quiet"]);
    let out = run_to_end(cmd, Duration::from_secs(120));
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let rows = report(dir.path(), &dir.path().join("pixbatch.db"));
    assert!(rows.iter().all(|r| r["state"] == "done"), "{rows:#?}");
    let charged = sim.ledger().iter().filter(|e| e["charged"] == true).count();
    assert_eq!(charged, 6);
}

/// A job that fails keeps its reason; `retry --failed` puts it back; `cancel` of a job
/// whose Topaz task is running cancels the task at the provider too.
#[test]
fn failed_jobs_can_be_retried_and_running_tasks_cancelled() {
    let dir = tempfile::tempdir().unwrap();
    write_png(&dir.path().join("in/a.png"), 32, 32, 4);
    std::fs::write(
        dir.path().join("fail.csv"),
        "id,provider,operation,input,prompt,params\n\
         nsfw,aithriving,img2img,in/a.png,sim-nsfw,\"{\"\"width\"\":320,\"\"height\"\":320}\"\n",
    )
    .unwrap();
    std::fs::write(
        dir.path().join("long.csv"),
        "id,provider,operation,input\nlong,topaz,enhance,in/a.png\n",
    )
    .unwrap();
    std::fs::write(
        dir.path().join("pixbatch.toml"),
        "[providers.topaz]\npoll_interval = \"300ms\"\n",
    )
    .unwrap();

    // 1. A job the provider refuses ends failed with the provider's reason.
    let fast = Sim::start(&["--task-ms", "100"]);
    let mut cmd = pixbatch(dir.path());
    fast.env(&mut cmd);
    cmd.args(["run", "fail.csv"]);
    let out = run_to_end(cmd, Duration::from_secs(60));
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    let show = pixbatch(dir.path())
        .args(["show", "nsfw", "--json"])
        .output()
        .unwrap();
    let detail: serde_json::Value = serde_json::from_slice(&show.stdout).unwrap();
    assert_eq!(detail["row"]["state"], "failed");
    let reason = detail["row"]["error"]
        .as_str()
        .unwrap_or_default()
        .to_lowercase();
    assert!(
        reason.contains("nsfw"),
        "the provider's reason is kept: {detail}"
    );

    // 2. A long Topaz task, interrupted while it runs, then cancelled.
    let slow = Sim::start(&["--task-ms", "60000"]);
    let mut cmd = pixbatch(dir.path());
    slow.env(&mut cmd);
    let mut run = cmd
        .args(["run", "long.csv"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let s = status_json(dir.path()).unwrap_or_default();
        let remote = s["states"]["polling"].as_u64().unwrap_or(0)
            + s["states"]["submitted"].as_u64().unwrap_or(0);
        if remote == 1 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the Topaz task never started: {s}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    sigint(&run);
    assert_eq!(run.wait().unwrap().code(), Some(130));
    let mut cmd = pixbatch(dir.path());
    slow.env(&mut cmd);
    let cancel = cmd.args(["cancel", "long"]).output().unwrap();
    assert!(cancel.status.success(), "{}", text(&cancel));
    assert!(
        String::from_utf8_lossy(&cancel.stdout).contains("remote task"),
        "{}",
        text(&cancel)
    );
    let cancels: Vec<_> = slow
        .ledger()
        .into_iter()
        .filter(|e| {
            e["endpoint"] == "cancel"
                && e["request_key"]
                    .as_str()
                    .is_some_and(|k| job_of_key(k) == "long")
        })
        .collect();
    assert_eq!(cancels.len(), 1, "{cancels:?}");
    assert_eq!(cancels[0]["status"], 204);

    // 3. retry --failed brings the failure back, with its history.
    let retry = pixbatch(dir.path())
        .args(["retry", "--failed"])
        .output()
        .unwrap();
    assert!(retry.status.success(), "{}", text(&retry));
    let s = status_json(dir.path()).unwrap();
    assert_eq!(s["states"]["queued"], 1, "{s}");
    assert_eq!(s["states"]["cancelled"], 1, "{s}");
    let show = pixbatch(dir.path())
        .args(["show", "nsfw"])
        .output()
        .unwrap();
    let text_show = String::from_utf8_lossy(&show.stdout);
    assert!(
        text_show.contains("requeued") && text_show.contains("failed"),
        "history kept: {text_show}"
    );
}

/// A provider that is down for a while does not fail the queue: once requests fail
/// in a row the provider is paused and attempts stop counting; when it comes back,
/// every job finishes.
#[test]
fn an_outage_of_the_provider_does_not_use_up_attempts() {
    let dir = tempfile::tempdir().unwrap();
    slow_manifest(dir.path(), 3);
    std::fs::write(
        dir.path().join("pixbatch.toml"),
        "[providers.topaz]\nmax_attempts = 3\nconcurrency = 1\npoll_interval = \"200ms\"\n",
    )
    .unwrap();
    let port = free_port();
    let base = format!("http://127.0.0.1:{port}");
    let mut cmd = pixbatch(dir.path());
    sim_env(&mut cmd, &base);
    let run = cmd
        .args(["run", "jobs.csv"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Nothing answers for 12 s: two bursts of failures (the breaker pauses 5 s, then
    // 10 s); without its excuse, 3 attempts per job would not last that long.
    std::thread::sleep(Duration::from_secs(12));
    let sim = Sim::start_at(&format!("127.0.0.1:{port}"), &["--task-ms", "100"]);
    let out = {
        let mut run = run;
        let start = Instant::now();
        loop {
            if run.try_wait().unwrap().is_some() {
                break run.wait_with_output().unwrap();
            }
            if start.elapsed() > Duration::from_secs(120) {
                let _ = run.kill();
                panic!("the run did not finish after the provider came back");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    };
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("looks down"),
        "{}",
        text(&out)
    );
    let rows = report(dir.path(), &dir.path().join("pixbatch.db"));
    assert!(rows.iter().all(|r| r["state"] == "done"), "{rows:#?}");
    assert_eq!(
        sim.ledger().iter().filter(|e| e["charged"] == true).count(),
        3
    );
}
