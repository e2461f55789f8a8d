//! A provider whose credential is refused or missing, or whose host never answers,
//! is halted: its jobs stay queued for a later run, the other providers' jobs are
//! worked, and `run` ends with exit code 5 and a message naming what to fix.

use std::io::Read;
use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use crate::common::*;

const EXIT_PROVIDER_HALTED: i32 = 5;

/// 12 Topaz jobs, 4 Photio and 4 AIThriving ones.
fn mixed_manifest(dir: &Path) {
    let mut rows = vec!["id,provider,operation,input,prompt,params".to_string()];
    for i in 0..12u8 {
        write_png(&dir.join(format!("in/t{i}.png")), 32, 32, i);
        rows.push(format!("t{i},topaz,enhance,in/t{i}.png,,"));
    }
    for i in 0..4 {
        rows.push(format!("p{i},photio,upscale,in/t{i}.png,,"));
        rows.push(format!(
            "a{i},aithriving,img2img,in/t{i}.png,a dog,\"{{\"\"width\"\":320,\"\"height\"\":320}}\""
        ));
    }
    std::fs::write(dir.join("jobs.csv"), rows.join("\n") + "\n").unwrap();
}

/// (id, state, attempts) of every job, from the report.
fn rows(dir: &Path) -> Vec<(String, String, u64)> {
    report(dir, &dir.join("pixbatch.db"))
        .iter()
        .map(|r| {
            (
                r["id"].as_str().unwrap_or_default().to_string(),
                r["state"].as_str().unwrap_or_default().to_string(),
                r["attempts"].as_u64().unwrap_or(99),
            )
        })
        .collect()
}

fn stderr_of(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn topaz_requests(sim: &Sim) -> usize {
    sim.ledger()
        .iter()
        .filter(|e| e["provider"] == "topaz")
        .count()
}

/// A wrong TOPAZ_API_KEY: the first 401 halts Topaz; its jobs stay queued with no
/// attempt used while Photio and AIThriving finish; `status` shows the halt during
/// the run; the run exits 5 naming TOPAZ_API_KEY; a run with the right key then
/// finishes every Topaz job, each charged once.
#[test]
fn a_refused_key_halts_its_provider_and_the_others_finish() {
    // Slow answers keep the run going long enough to be asked for its status.
    let sim = Sim::start(&["--task-ms", "1500"]);
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    mixed_manifest(d);

    let mut cmd = pixbatch(d);
    sim.env(&mut cmd);
    cmd.env("TOPAZ_API_KEY", "invalid-key-topaz")
        .args(["run", "jobs.csv"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().unwrap();
    let drain = |mut r: Box<dyn Read + Send>| {
        std::thread::spawn(move || {
            let mut buf = Vec::new();
            let _ = r.read_to_end(&mut buf);
            buf
        })
    };
    let stdout = drain(Box::new(child.stdout.take().unwrap()));
    let stderr = drain(Box::new(child.stderr.take().unwrap()));
    // `status` from another shell, while the run works the other providers.
    let start = Instant::now();
    let mut seen = None;
    while child.try_wait().unwrap().is_none() && start.elapsed() < Duration::from_secs(60) {
        let s = pixbatch(d).args(["status", "--json"]).output().unwrap();
        if let Ok(v) = serde_json::from_slice::<serde_json::Value>(&s.stdout) {
            if let Some(h) = v["running"]["halted"].as_array().and_then(|a| a.first()) {
                let text = pixbatch(d).arg("status").output().unwrap();
                seen = Some((
                    h.clone(),
                    String::from_utf8_lossy(&text.stdout).into_owned(),
                ));
                break;
            }
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let out = wait_for(child, stdout, stderr, Duration::from_secs(90));
    assert_eq!(
        out.status.code(),
        Some(EXIT_PROVIDER_HALTED),
        "{}",
        text(&out)
    );
    let err = stderr_of(&out);
    assert!(
        err.contains("topaz: halted: credential refused (401)") && err.contains("TOPAZ_API_KEY"),
        "{err}"
    );
    let (halt, status_text) = seen.expect("status never showed the halted provider");
    assert_eq!(halt["provider"], "topaz", "{halt}");
    assert_eq!(halt["reason"]["kind"], "credential_refused", "{halt}");
    assert!(
        status_text.contains("topaz: halted: credential refused (401) — fix TOPAZ_API_KEY"),
        "{status_text}"
    );

    let all = rows(d);
    assert_eq!(all.len(), 20, "{all:?}");
    for (id, state, attempts) in &all {
        if id.starts_with('t') {
            assert_eq!((state.as_str(), *attempts), ("queued", 0), "{id}: {all:?}");
        } else {
            assert_eq!(state, "done", "{id}: {all:?}");
        }
    }
    // At most one request per step slot (Topaz's concurrency, 8) before the halt.
    let refused = topaz_requests(&sim);
    assert!((1..=8).contains(&refused), "{refused} Topaz requests");

    // Fixed key: the kept jobs go, each paid once.
    let mut again = pixbatch(d);
    sim.env(&mut again);
    again.arg("run");
    let out = run_to_end(again, Duration::from_secs(90));
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    assert!(rows(d).iter().all(|(_, s, _)| s == "done"), "{:?}", rows(d));
    let mut charged: Vec<String> = sim
        .ledger()
        .iter()
        .filter(|e| e["provider"] == "topaz" && e["charged"] == true)
        .filter_map(|e| e["request_key"].as_str().map(|k| job_of_key(k).to_string()))
        .collect();
    charged.sort();
    let n = charged.len();
    charged.dedup();
    assert_eq!((n, charged.len()), (12, 12), "{charged:?}");
}

/// No TOPAZ_API_KEY: `validate` names the variable and fails; `run` names it before
/// any request, sends Topaz nothing, works the others and exits 5.
#[test]
fn a_missing_key_is_named_before_anything_is_sent() {
    let sim = Sim::start(&["--task-ms", "100"]);
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    mixed_manifest(d);

    let mut validate = pixbatch(d);
    sim.env(&mut validate);
    validate
        .env_remove("TOPAZ_API_KEY")
        .args(["validate", "jobs.csv"]);
    let out = run_to_end(validate, Duration::from_secs(30));
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    let err = stderr_of(&out);
    assert!(
        err.lines()
            .any(|l| l.contains("topaz") && l.contains("TOPAZ_API_KEY") && l.contains("12 job")),
        "{err}"
    );
    assert!(!err.contains("PHOTIO_API_KEY"), "{err}");

    let mut run = pixbatch(d);
    sim.env(&mut run);
    run.env_remove("TOPAZ_API_KEY").args([
        "run",
        "jobs.csv",
        "--on-finish",
        "printf '%s' \"$PIXBATCH_HALTED\" > halted.txt",
    ]);
    let out = run_to_end(run, Duration::from_secs(60));
    assert_eq!(
        out.status.code(),
        Some(EXIT_PROVIDER_HALTED),
        "{}",
        text(&out)
    );
    let err = stderr_of(&out);
    assert!(
        err.contains("topaz: halted: no credentials — set TOPAZ_API_KEY"),
        "{err}"
    );
    for (id, state, attempts) in rows(d) {
        let want = if id.starts_with('t') {
            "queued"
        } else {
            "done"
        };
        assert_eq!((state.as_str(), attempts), (want, 0), "{id}");
    }
    assert_eq!(topaz_requests(&sim), 0);
    // A cron hook learns which provider needs a person.
    let halted = std::fs::read_to_string(d.join("halted.txt")).expect("the hook ran");
    assert_eq!(halted, "topaz: halted: no credentials — set TOPAZ_API_KEY");
}

/// Topaz's base URL points at a port nothing listens on, with a short
/// `unreachable_after`: the run ends (it never waits without end) with Topaz halted,
/// the connection refused named with host:port, no Topaz job failed or done, and the
/// others done.
#[test]
fn an_unreachable_provider_is_halted_after_its_bound() {
    let sim = Sim::start(&["--task-ms", "100"]);
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    mixed_manifest(d);
    std::fs::write(
        d.join("pixbatch.toml"),
        "[providers.topaz]\nunreachable_after = \"2s\"\n",
    )
    .unwrap();
    let port = free_port();
    let mut run = pixbatch(d);
    sim.env(&mut run);
    run.env(
        "PIXBATCH_TOPAZ_URL",
        format!("http://127.0.0.1:{port}/topaz/image/v1"),
    )
    .args(["run", "jobs.csv"]);
    let out = run_to_end(run, Duration::from_secs(90));
    assert_eq!(
        out.status.code(),
        Some(EXIT_PROVIDER_HALTED),
        "{}",
        text(&out)
    );
    let err = stderr_of(&out);
    let target = format!("127.0.0.1:{port}");
    assert!(
        err.lines().any(|l| l.contains("topaz: halted: unreachable")
            && l.contains(&format!("cannot connect to {target}: connection refused"))
            && l.contains("PIXBATCH_TOPAZ_URL")),
        "{err}"
    );
    for (id, state, attempts) in rows(d) {
        if id.starts_with('t') {
            assert!(
                ["queued", "retry-wait"].contains(&state.as_str()),
                "{id} is {state}"
            );
            // Attempts before the outage breaker tripped, far from max_attempts.
            assert!(attempts < 8, "{id}: {attempts} attempts");
        } else {
            assert_eq!(state, "done", "{id}");
        }
    }
    // The errors the jobs keep name the refused connection too.
    let shown = pixbatch(d).args(["show", "t0", "--json"]).output().unwrap();
    let shown = String::from_utf8_lossy(&shown.stdout);
    assert!(
        shown.contains(&format!("cannot connect to {target}")),
        "{shown}"
    );

    // The right URL: the kept jobs finish, each charged once.
    let mut again = pixbatch(d);
    sim.env(&mut again);
    again.arg("run");
    let out = run_to_end(again, Duration::from_secs(120));
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    assert!(rows(d).iter().all(|(_, s, _)| s == "done"), "{:?}", rows(d));
    let mut charged: Vec<String> = sim
        .ledger()
        .iter()
        .filter(|e| e["provider"] == "topaz" && e["charged"] == true)
        .filter_map(|e| e["request_key"].as_str().map(|k| job_of_key(k).to_string()))
        .collect();
    charged.sort();
    let n = charged.len();
    charged.dedup();
    assert_eq!((n, charged.len()), (12, 12), "{charged:?}");
}

/// The end of a child whose output threads drain its pipes (killed after `limit`).
fn wait_for(
    mut child: std::process::Child,
    stdout: std::thread::JoinHandle<Vec<u8>>,
    stderr: std::thread::JoinHandle<Vec<u8>>,
    limit: Duration,
) -> std::process::Output {
    let start = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if start.elapsed() > limit {
            let _ = child.kill();
            break child.wait().unwrap();
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let out = std::process::Output {
        status,
        stdout: stdout.join().unwrap_or_default(),
        stderr: stderr.join().unwrap_or_default(),
    };
    assert!(start.elapsed() <= limit, "did not finish:\n{}", text(&out));
    out
}
