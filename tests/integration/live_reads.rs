//! Every read command answers every row while a run holds the database, whatever
//! the rows hold: failed jobs with an error text, cancelled jobs, jobs waiting to
//! retry. (The control socket once took any row with an `error` key for a failed
//! request: `list` stopped at the first failed job and the HTML report wrote nothing.)

use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use crate::common::*;

const FAILING: usize = 6;
const SLOW: usize = 40;

fn manifest(dir: &std::path::Path) {
    write_png(&dir.join("in/a.png"), 32, 32, 9);
    let mut csv = String::from("id,provider,operation,input,prompt,params\n");
    for i in 0..FAILING {
        // The simulator refuses `sim-nsfw` prompts: these fail at once, with a reason.
        csv.push_str(&format!(
            "bad{i:02},aithriving,img2img,in/a.png,sim-nsfw,\"{{\"\"width\"\":320,\"\"height\"\":320}}\"\n"
        ));
    }
    for i in 0..SLOW {
        csv.push_str(&format!("slow{i:02},topaz,enhance,in/a.png,,\n"));
    }
    std::fs::write(dir.join("jobs.csv"), csv).unwrap();
    std::fs::write(
        dir.join("pixbatch.toml"),
        "[providers.topaz]\npoll_interval = \"500ms\"\n",
    )
    .unwrap();
}

fn read(dir: &std::path::Path, args: &[&str]) -> std::process::Output {
    let out = pixbatch(dir).args(args).output().unwrap();
    assert!(
        out.status.success(),
        "`pixbatch {}` during the run: {}",
        args.join(" "),
        text(&out)
    );
    out
}

fn status(dir: &std::path::Path) -> serde_json::Value {
    serde_json::from_slice(&read(dir, &["status", "--json"]).stdout).unwrap()
}

fn lines(out: &std::process::Output) -> Vec<String> {
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(str::to_string)
        .collect()
}

fn stop(mut run: Child) {
    let _ = run.kill();
    let _ = run.wait();
}

#[test]
fn every_read_command_answers_every_row_during_a_run_with_failed_and_cancelled_jobs() {
    // Slow Topaz tasks keep the run going; injected 5xx put jobs in retry-wait.
    let sim = Sim::start(&["--task-ms", "30000", "--chaos-5xx", "0.15"]);
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    manifest(d);
    let mut cmd = pixbatch(d);
    sim.env(&mut cmd);
    let run = cmd
        .args(["run", "jobs.csv"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();

    // Wait for every refused job to have failed, with the run still going.
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        // Until the run has created the database, `status` says there is none.
        let out = pixbatch(d).args(["status", "--json"]).output().unwrap();
        let s: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
        if s["states"]["failed"].as_u64() == Some(FAILING as u64) && !s["running"].is_null() {
            break;
        }
        assert!(Instant::now() < deadline, "the failures never came: {s}");
        std::thread::sleep(Duration::from_millis(200));
    }
    // Cancel three jobs still waiting, through the run.
    let queued = read(
        d,
        &["list", "--state", "queued", "--provider", "topaz", "--json"],
    );
    let queued: Vec<String> = lines(&queued)
        .iter()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).unwrap()["id"]
                .as_str()
                .unwrap()
                .to_string()
        })
        .collect();
    assert!(
        queued.len() >= 3,
        "too few queued jobs left to cancel: {queued:?}"
    );
    let cancelled = &queued[queued.len() - 3..];
    let mut args = vec!["cancel"];
    args.extend(cancelled.iter().map(String::as_str));
    let cancel = read(d, &args);
    assert_eq!(lines(&cancel).len(), 3, "{}", text(&cancel));

    let total = FAILING + SLOW;
    let s = status(d);
    assert!(!s["running"].is_null(), "the run ended too early: {s}");
    assert_eq!(s["total"], total as u64, "{s}");
    assert_eq!(s["states"]["cancelled"], 3, "{s}");

    let list = read(d, &["list"]);
    assert_eq!(
        lines(&list).len(),
        total + 1,
        "a header and one line per job: {}",
        text(&list)
    );
    let json = read(d, &["list", "--json"]);
    let rows: Vec<serde_json::Value> = lines(&json)
        .iter()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(rows.len(), total);
    let failed: Vec<_> = rows.iter().filter(|r| r["state"] == "failed").collect();
    assert_eq!(failed.len(), FAILING);
    assert!(
        failed
            .iter()
            .all(|r| r["error"].as_str().is_some_and(|e| !e.is_empty())),
        "{failed:#?}"
    );
    let only_failed = read(d, &["list", "--state", "failed", "--json"]);
    assert_eq!(lines(&only_failed).len(), FAILING);

    let show = read(d, &["show", "bad00", "--json"]);
    let detail: serde_json::Value = serde_json::from_slice(&show.stdout).unwrap();
    assert_eq!(detail["row"]["state"], "failed", "{detail}");
    let show = read(d, &["show", &cancelled[0]]);
    assert!(String::from_utf8_lossy(&show.stdout).contains("cancelled"));

    let jsonl = read(d, &["report", "--format", "jsonl"]);
    assert_eq!(lines(&jsonl).len(), total);
    let csv = read(d, &["report", "--format", "csv"]);
    assert_eq!(
        lines(&csv).len(),
        total + 1,
        "a header and one line per job"
    );
    read(d, &["report", "--format", "html", "-o", "report.html"]);
    let html = std::fs::read_to_string(d.join("report.html")).unwrap();
    for id in ["bad00", "bad05", "slow00", "slow39", &cancelled[0]] {
        assert!(html.contains(id), "{id} missing from the HTML report");
    }

    // All of it was answered by the run, not by a database it let go of.
    let s = status(d);
    assert!(
        !s["running"].is_null(),
        "the run ended before the reads: {s}"
    );
    stop(run);
}
