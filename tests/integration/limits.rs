use std::time::Duration;

use crate::common::*;

fn manifest(dir: &std::path::Path, topaz: usize, photio: usize, aithriving: usize) {
    write_png(&dir.join("in/a.png"), 48, 32, 1);
    let mut csv = String::from("id,provider,operation,input,prompt,params\n");
    for i in 0..topaz {
        csv.push_str(&format!(
            "t{i},topaz,enhance,in/a.png,,\"{{\"\"output_width\"\":{}}}\"\n",
            64 + i
        ));
    }
    for i in 0..photio {
        csv.push_str(&format!("p{i},photio,upscale,in/a.png,picture {i},\n"));
    }
    for i in 0..aithriving {
        csv.push_str(&format!("a{i},aithriving,img2img,in/a.png,picture {i},\"{{\"\"width\"\":320,\"\"height\"\":384}}\"\n"));
    }
    std::fs::write(dir.join("jobs.csv"), csv).unwrap();
}

fn metered_times(ledger: &[serde_json::Value], provider: &str) -> Vec<u64> {
    ledger
        .iter()
        .filter(|e| e["provider"] == provider && e["metered"] == true)
        .map(|e| e["t_ms"].as_u64().unwrap())
        .collect()
}

fn busiest_window(times: &[u64], window_ms: u64) -> usize {
    times
        .iter()
        .map(|&s| {
            times
                .iter()
                .filter(|&&t| t >= s && t < s + window_ms)
                .count()
        })
        .max()
        .unwrap_or(0)
}

/// With the client's limits equal to the simulator's, the simulator refuses nothing,
/// and the limits are really reached (the limiter, not luck, kept us under).
#[test]
fn limits_equal_to_the_simulators_cause_no_violation() {
    let sim = Sim::start(&[
        "--task-ms",
        "200",
        "--limit",
        "topaz=8/1s",
        "--limit",
        "photio=3/1s",
        "--limit",
        "aithriving=3/1s",
    ]);
    let dir = tempfile::tempdir().unwrap();
    manifest(dir.path(), 24, 8, 8);
    std::fs::write(
        dir.path().join("pixbatch.toml"),
        "[providers.topaz]\nrate_limits = [\"8/1s\"]\nconcurrency = 8\npoll_interval = \"200ms\"\n\
         [providers.photio]\nrate_limits = [\"3/1s\"]\n[providers.aithriving]\nrate_limits = [\"3/1s\"]\n",
    )
    .unwrap();
    let mut cmd = pixbatch(dir.path());
    sim.env(&mut cmd);
    cmd.args(["run", "jobs.csv"]);
    let out = run_to_end(cmd, Duration::from_secs(180));
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));

    let stats = sim.stats();
    for p in ["topaz", "photio", "aithriving"] {
        assert_eq!(
            stats["violations"][p].as_u64().unwrap_or(0),
            0,
            "{p}: {stats}"
        );
    }
    let ledger = sim.ledger();
    let topaz = busiest_window(&metered_times(&ledger, "topaz"), 1000);
    assert!(
        (7..=8).contains(&topaz),
        "busiest topaz second had {topaz} requests"
    );
    let photio = busiest_window(&metered_times(&ledger, "photio"), 1000);
    assert!(photio <= 3, "busiest photio second had {photio} requests");
}

/// After a 429 with Retry-After, no request to that provider comes before it elapses
/// (one request at a time, so every later request was sent after the answer).
#[test]
fn retry_after_is_honoured() {
    let sim = Sim::start(&[
        "--task-ms",
        "100",
        "--no-limits",
        "--seed",
        "5",
        "--chaos-429",
        "0.12",
        "--chaos-retry-after",
        "2",
    ]);
    let dir = tempfile::tempdir().unwrap();
    manifest(dir.path(), 8, 0, 0);
    std::fs::write(
        dir.path().join("pixbatch.toml"),
        "[providers.topaz]\nconcurrency = 1\nmax_in_flight = 1\npoll_interval = \"100ms\"\nrate_limits = []\n",
    )
    .unwrap();
    let mut cmd = pixbatch(dir.path());
    sim.env(&mut cmd);
    cmd.args(["run", "jobs.csv"]);
    let out = run_to_end(cmd, Duration::from_secs(180));
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));

    let ledger = sim.ledger();
    let metered: Vec<&serde_json::Value> = ledger
        .iter()
        .filter(|e| e["provider"] == "topaz" && e["metered"] == true)
        .collect();
    let mut checked = 0;
    for (i, e) in metered.iter().enumerate() {
        if e["fault"] != "429" {
            continue;
        }
        assert_eq!(e["retry_after_s"].as_u64(), Some(2), "{e}");
        let t = e["t_ms"].as_u64().unwrap();
        if let Some(next) = metered.get(i + 1) {
            let gap = next["t_ms"].as_u64().unwrap() - t;
            assert!(
                gap >= 2000,
                "request {} came {gap} ms after a 429 with Retry-After: 2",
                next["seq"]
            );
            checked += 1;
        }
    }
    assert!(
        checked >= 2,
        "only {checked} injected 429s to check; raise the rate"
    );
    // A provider-imposed wait does not use up a job's attempts.
    for r in report(dir.path(), &dir.path().join("pixbatch.db")) {
        assert_eq!(r["state"], "done");
        assert_eq!(r["attempts"], 0, "{r}");
    }
}

/// A run killed right after using up a window must not let the next run burst:
/// the send times of the last window survive the kill.
#[test]
fn a_restart_right_after_a_burst_keeps_the_limit() {
    let sim = Sim::start(&["--task-ms", "100", "--limit", "topaz=6/5s"]);
    let dir = tempfile::tempdir().unwrap();
    write_png(&dir.path().join("in/a.png"), 40, 30, 2);
    let mut csv = String::from("id,provider,operation,input\n");
    for i in 0..12 {
        csv.push_str(&format!("b{i},topaz,enhance-sync,in/a.png\n"));
    }
    std::fs::write(dir.path().join("jobs.csv"), csv).unwrap();
    std::fs::write(
        dir.path().join("pixbatch.toml"),
        "[providers.topaz]\nrate_limits = [\"6/5s\"]\n",
    )
    .unwrap();
    let enqueue = pixbatch(dir.path())
        .args(["enqueue", "jobs.csv"])
        .output()
        .unwrap();
    assert!(enqueue.status.success(), "{}", text(&enqueue));

    let mut cmd = pixbatch(dir.path());
    sim.env(&mut cmd);
    let mut child = cmd
        .arg("run")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    // Kill it as soon as the first window's six requests have arrived.
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while metered_times(&sim.ledger(), "topaz").len() < 6 {
        assert!(
            std::time::Instant::now() < deadline,
            "the first burst never came"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    child.kill().unwrap();
    child.wait().unwrap();

    let mut cmd = pixbatch(dir.path());
    sim.env(&mut cmd);
    cmd.arg("run");
    let out = run_to_end(cmd, Duration::from_secs(120));
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let stats = sim.stats();
    assert_eq!(stats["violations"]["topaz"].as_u64(), Some(0), "{stats}");
    let times = metered_times(&sim.ledger(), "topaz");
    assert!(times.len() > 12, "{} requests", times.len());
    assert!(busiest_window(&times, 5000) <= 6);
}

/// Perfect drops a task not polled in time, and its limits are tight: the engine may
/// start new work only while the polls of every accepted task still fit. Time-scaled
/// (1.5 s keep-alive, 2.5 s tasks, 20 per 2 s and 60 per 8 s), far more jobs than
/// the budget can keep alive at once: none is lost, none is refused.
#[test]
fn perfect_tasks_are_kept_alive_under_tight_limits() {
    let sim = Sim::start(&[
        "--task-ms",
        "2500",
        "--keep-alive-ms",
        "1500",
        "--limit",
        "perfect=20/2s,60/8s",
    ]);
    let dir = tempfile::tempdir().unwrap();
    write_png(&dir.path().join("in/a.png"), 48, 32, 3);
    let mut csv = String::from("id,provider,operation,input,prompt,params\n");
    for i in 0..30 {
        csv.push_str(&format!(
            "e{i},perfect,photo-enhance,in/a.png,,\"{{\"\"scale\"\":{}}}\"\n",
            [1, 2, 4][i % 3]
        ));
    }
    std::fs::write(dir.path().join("jobs.csv"), csv).unwrap();
    std::fs::write(
        dir.path().join("pixbatch.toml"),
        "[providers.perfect]\nrate_limits = [\"20/2s\", \"60/8s\"]\nkeep_alive = \"1500ms\"\n\
         concurrency = 16\nmax_in_flight = 64\npoll_interval = \"300ms\"\n",
    )
    .unwrap();
    let mut cmd = pixbatch(dir.path());
    sim.env(&mut cmd);
    cmd.args(["run", "jobs.csv"]);
    let started = std::time::Instant::now();
    let out = run_to_end(cmd, Duration::from_secs(240));
    let took = started.elapsed();
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));

    let stats = sim.stats();
    assert_eq!(
        stats["violations"]["perfect"].as_u64().unwrap_or(0),
        0,
        "{stats}"
    );
    let ledger = sim.ledger();
    // A dropped task answers its next poll with HTTP 400 InvalidTaskId.
    let lost = ledger
        .iter()
        .filter(|e| {
            e["provider"] == "perfect" && e["endpoint"] == "task_status" && e["status"] == 400
        })
        .count();
    assert_eq!(lost, 0, "tasks dropped for lack of polls");
    let rows = report(dir.path(), &dir.path().join("pixbatch.db"));
    assert!(rows.iter().all(|r| r["state"] == "done"));
    let metered = metered_times(&ledger, "perfect");
    eprintln!("30 jobs, {} metered requests, {took:?}", metered.len());
}
