//! Topaz as the live API and its current pages show it (issue 13), against
//! `pixbatch sim`: the current models and settings, unknown models passing `validate`
//! with a warning (errors under `strict_params`), and face enhancement's required
//! strength refused before any request.

use std::time::Duration;

use crate::common::*;

fn show_json(dir: &std::path::Path, id: &str) -> serde_json::Value {
    let out = pixbatch(dir).args(["show", id, "--json"]).output().unwrap();
    assert!(out.status.success(), "{}", text(&out));
    serde_json::from_slice(&out.stdout).unwrap()
}

/// `validate --offline` asks no provider, but a missing key is still an error: a
/// made-up one (nothing is sent).
fn offline_validate(dir: &std::path::Path) -> std::process::Command {
    let mut cmd = pixbatch(dir);
    cmd.env("TOPAZ_API_KEY", "test-topaz-key-123");
    cmd
}

fn write_manifest(dir: &std::path::Path, rows: &[serde_json::Value]) {
    let body: String = rows.iter().map(|r| format!("{r}\n")).collect();
    std::fs::write(dir.join("jobs.jsonl"), body).unwrap();
}

fn row(id: &str, op: &str, params: serde_json::Value) -> serde_json::Value {
    serde_json::json!({
        "id": id, "provider": "topaz", "operation": op, "input": "in/a.png", "params": params
    })
}

/// The submissions the simulator charged for, by the job they belong to.
fn charged_jobs(sim: &Sim) -> Vec<String> {
    let mut jobs: Vec<String> = sim
        .ledger()
        .iter()
        .filter(|e| e["provider"] == "topaz" && e["charged"] == true)
        .filter_map(|e| e["request_key"].as_str().map(|k| job_of_key(k).to_string()))
        .collect();
    jobs.sort();
    jobs
}

#[test]
fn current_models_and_settings_validate_and_run() {
    let dir = tempfile::tempdir().unwrap();
    write_png(&dir.path().join("in/a.png"), 32, 32, 5);
    write_manifest(
        dir.path(),
        &[
            row(
                "rec2",
                "enhance-gen",
                serde_json::json!({"model": "Recovery V2", "detail": 0.4}),
            ),
            row(
                "max",
                "enhance-gen",
                serde_json::json!({"model": "Standard MAX", "creativity": 9,
                                   "subject_detection": "foreground"}),
            ),
            row(
                "wonder",
                "enhance-gen",
                serde_json::json!({"model": "Wonder", "autoprompt": true,
                                   "face_enhancement": true,
                                   "face_enhancement_strength": 0.7,
                                   "face_enhancement_creativity": 0.2}),
            ),
            row(
                "text",
                "enhance",
                serde_json::json!({"model": "Text Refine", "strength": 0.3}),
            ),
        ],
    );
    std::fs::write(
        dir.path().join("pixbatch.toml"),
        "[providers.topaz]\npoll_interval = \"100ms\"\n",
    )
    .unwrap();
    let out = offline_validate(dir.path())
        .args(["validate", "--offline", "jobs.jsonl"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!stderr.contains("warning"), "{}", text(&out));

    let sim = Sim::start(&["--task-ms", "100"]);
    let mut cmd = pixbatch(dir.path());
    sim.env(&mut cmd);
    cmd.args(["run", "jobs.jsonl"]);
    let out = run_to_end(cmd, Duration::from_secs(90));
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    for id in ["rec2", "max", "wonder", "text"] {
        assert_eq!(show_json(dir.path(), id)["row"]["state"], "done", "{id}");
    }
    assert_eq!(charged_jobs(&sim), ["max", "rec2", "text", "wonder"]);
}

#[test]
fn an_unknown_model_warns_fails_with_the_providers_reason_and_strict_refuses_it() {
    let dir = tempfile::tempdir().unwrap();
    write_png(&dir.path().join("in/a.png"), 32, 32, 6);
    write_manifest(
        dir.path(),
        &[
            row(
                "future",
                "enhance-gen",
                serde_json::json!({"model": "Wonder 9"}),
            ),
            row(
                "known",
                "enhance-gen",
                serde_json::json!({"model": "Wonder 2"}),
            ),
        ],
    );
    std::fs::write(
        dir.path().join("pixbatch.toml"),
        "[providers.topaz]\npoll_interval = \"100ms\"\nmax_attempts = 2\n",
    )
    .unwrap();
    let out = offline_validate(dir.path())
        .args(["validate", "--offline", "jobs.jsonl"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr
            .contains("jobs.jsonl:1: warning: topaz model \"Wonder 9\" is not one pixbatch knows"),
        "{}",
        text(&out)
    );
    assert!(!stderr.contains("jobs.jsonl:2:"), "{}", text(&out));

    // The live API refuses the model: the job fails with its reason, nothing charged.
    let sim = Sim::start(&["--task-ms", "100"]);
    let mut cmd = pixbatch(dir.path());
    sim.env(&mut cmd);
    cmd.args(["run", "jobs.jsonl"]);
    let out = run_to_end(cmd, Duration::from_secs(90));
    assert_ne!(out.status.code(), Some(0), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("jobs.jsonl:1: warning: topaz model"),
        "run shows the warning too: {}",
        text(&out)
    );
    let future = show_json(dir.path(), "future");
    assert_eq!(future["row"]["state"], "failed", "{future:#}");
    assert!(
        future.to_string().contains("Invalid model"),
        "the provider's reason is kept: {future:#}"
    );
    assert_eq!(show_json(dir.path(), "known")["row"]["state"], "done");
    assert_eq!(charged_jobs(&sim), ["known"]);

    // strict_params = true: the same row is an error, and validate fails.
    let strict = tempfile::tempdir().unwrap();
    write_png(&strict.path().join("in/a.png"), 32, 32, 6);
    std::fs::copy(
        dir.path().join("jobs.jsonl"),
        strict.path().join("jobs.jsonl"),
    )
    .unwrap();
    std::fs::write(
        strict.path().join("pixbatch.toml"),
        "[providers.topaz]\nstrict_params = true\n",
    )
    .unwrap();
    let out = offline_validate(strict.path())
        .args(["validate", "--offline", "jobs.jsonl"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("jobs.jsonl:1: topaz model \"Wonder 9\"")
            && stderr.contains("strict_params = true for topaz"),
        "{}",
        text(&out)
    );
    assert!(!stderr.contains("warning:"), "{}", text(&out));
}

#[test]
fn face_enhancement_without_its_strength_is_refused_before_any_request() {
    let dir = tempfile::tempdir().unwrap();
    write_png(&dir.path().join("in/a.png"), 32, 32, 7);
    write_manifest(
        dir.path(),
        &[row(
            "faces",
            "enhance",
            serde_json::json!({"face_enhancement": true}),
        )],
    );
    let out = offline_validate(dir.path())
        .args(["validate", "--offline", "jobs.jsonl"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr)
            .contains("jobs.jsonl:1: face_enhancement = true needs face_enhancement_strength"),
        "{}",
        text(&out)
    );
    let sim = Sim::start(&[]);
    let mut cmd = pixbatch(dir.path());
    sim.env(&mut cmd);
    cmd.args(["run", "jobs.jsonl"]);
    let out = run_to_end(cmd, Duration::from_secs(60));
    assert_ne!(out.status.code(), Some(0), "{}", text(&out));
    assert!(
        sim.ledger().iter().all(|e| e["provider"] != "topaz"),
        "no request reached Topaz: {:?}",
        sim.ledger()
    );
}

/// A one-file HTTP server on loopback that records the `User-Agent` of every request.
struct ImageHost {
    url: String,
    seen: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
}

fn serve_image(bytes: Vec<u8>) -> ImageHost {
    use std::io::{BufRead, BufReader, Write};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}/pics/cat.png", listener.local_addr().unwrap());
    let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let log = seen.clone();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { return };
            let mut reader = BufReader::new(stream.try_clone().unwrap());
            let mut agent = String::from("(none)");
            loop {
                let mut line = String::new();
                if reader.read_line(&mut line).unwrap_or(0) == 0 || line.trim().is_empty() {
                    break;
                }
                if let Some(v) = line
                    .to_ascii_lowercase()
                    .strip_prefix("user-agent:")
                    .map(|v| v.trim().to_string())
                {
                    agent = v;
                }
            }
            log.lock().unwrap().push(agent);
            let head = format!(
                "HTTP/1.1 200 OK\r\nContent-Type: image/png\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                bytes.len()
            );
            let _ = stream.write_all(head.as_bytes());
            let _ = stream.write_all(&bytes);
        }
    });
    ImageHost { url, seen }
}

#[test]
fn a_url_input_goes_as_source_url_and_pixbatch_never_downloads_it() {
    let dir = tempfile::tempdir().unwrap();
    write_png(&dir.path().join("a.png"), 40, 30, 8);
    let host = serve_image(std::fs::read(dir.path().join("a.png")).unwrap());
    let mut r = row("remote", "enhance", serde_json::json!({"output_width": 80}));
    r["input"] = serde_json::json!(host.url);
    write_manifest(dir.path(), &[r]);
    std::fs::write(
        dir.path().join("pixbatch.toml"),
        "[providers.topaz]\npoll_interval = \"100ms\"\n",
    )
    .unwrap();
    let out = offline_validate(dir.path())
        .args(["validate", "--offline", "jobs.jsonl"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));

    let sim = Sim::start(&["--task-ms", "100"]);
    let mut cmd = pixbatch(dir.path());
    sim.env(&mut cmd);
    cmd.args(["--out", "results", "run", "jobs.jsonl"]);
    let out = run_to_end(cmd, Duration::from_secs(60));
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    assert_eq!(show_json(dir.path(), "remote")["row"]["state"], "done");
    // Fetched once, by the simulator (reqwest without a user agent), never by
    // pixbatch (`pixbatch/<version>`).
    let seen = host.seen.lock().unwrap().clone();
    assert_eq!(seen, ["(none)"], "who fetched the input");
    assert_eq!(charged_jobs(&sim), ["remote"]);
    // The result is the 80-pixel-wide enhancement of the served picture.
    let files = files_ending(&dir.path().join("results"), ".jpg");
    assert_eq!(files.len(), 1, "{files:?}");
    let img = image::open(&files[0]).unwrap();
    assert_eq!((img.width(), img.height()), (80, 60));
}

#[test]
fn balance_topaz_prints_the_simulators_credit_balance() {
    let dir = tempfile::tempdir().unwrap();
    write_png(&dir.path().join("in/a.png"), 32, 32, 9);
    write_manifest(
        dir.path(),
        &[row(
            "one",
            "enhance-gen",
            serde_json::json!({"model": "Wonder"}),
        )],
    );
    std::fs::write(
        dir.path().join("pixbatch.toml"),
        "[providers.topaz]\npoll_interval = \"100ms\"\n",
    )
    .unwrap();
    let sim = Sim::start(&["--task-ms", "100"]);
    let balance = |json: bool| {
        let mut cmd = pixbatch(dir.path());
        sim.env(&mut cmd);
        cmd.args(["balance", "topaz"]);
        if json {
            cmd.arg("--json");
        }
        let out = cmd.output().unwrap();
        assert!(out.status.success(), "{}", text(&out));
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    };
    assert_eq!(balance(false), "topaz: 10000 credits");
    let mut cmd = pixbatch(dir.path());
    sim.env(&mut cmd);
    cmd.args(["run", "jobs.jsonl"]);
    let out = run_to_end(cmd, Duration::from_secs(60));
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    // One generative job of a 32x32 input: the simulator's 4 credits.
    let v: serde_json::Value = serde_json::from_str(&balance(true)).unwrap();
    assert_eq!(v["amount"], 9996.0, "{v}");
    assert_eq!(v["unit"], "credits");
}

#[test]
fn sharpen_denoise_restore_and_lighting_run_through_the_simulator() {
    let dir = tempfile::tempdir().unwrap();
    write_png(&dir.path().join("in/a.png"), 40, 24, 10);
    let ops = [
        (
            "sh",
            "sharpen",
            serde_json::json!({"model": "Lens Blur V2", "strength": 0.4}),
        ),
        (
            "shs",
            "sharpen-sync",
            serde_json::json!({"model": "Natural"}),
        ),
        (
            "shg",
            "sharpen-gen",
            serde_json::json!({"model": "Super Focus V2", "detail": 0.5}),
        ),
        (
            "dn",
            "denoise",
            serde_json::json!({"model": "Strong", "minor_deblur": 0.2}),
        ),
        ("dns", "denoise-sync", serde_json::json!({})),
        (
            "rs",
            "restore-gen",
            serde_json::json!({"model": "Dust-Scratch"}),
        ),
        (
            "lt",
            "lighting",
            serde_json::json!({"model": "Adjust", "exposure": 1.2}),
        ),
        (
            "lts",
            "lighting-sync",
            serde_json::json!({"model": "White Balance", "opacity": 0.5}),
        ),
    ];
    let rows: Vec<_> = ops
        .iter()
        .map(|(id, op, p)| row(id, op, p.clone()))
        .collect();
    write_manifest(dir.path(), &rows);
    std::fs::write(
        dir.path().join("pixbatch.toml"),
        "[providers.topaz]\npoll_interval = \"100ms\"\n",
    )
    .unwrap();
    let out = offline_validate(dir.path())
        .args(["validate", "--offline", "jobs.jsonl"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    assert!(
        !String::from_utf8_lossy(&out.stderr).contains("warning"),
        "{}",
        text(&out)
    );
    let sim = Sim::start(&["--task-ms", "100"]);
    let mut cmd = pixbatch(dir.path());
    sim.env(&mut cmd);
    cmd.args(["--out", "results", "run", "jobs.jsonl"]);
    let out = run_to_end(cmd, Duration::from_secs(90));
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let mut ids: Vec<String> = ops.iter().map(|(id, _, _)| id.to_string()).collect();
    ids.sort();
    assert_eq!(charged_jobs(&sim), ids, "each charged once");
    // Each went to its own endpoint.
    let endpoints: std::collections::BTreeSet<String> = sim
        .ledger()
        .iter()
        .filter(|e| e["charged"] == true)
        .filter_map(|e| e["endpoint"].as_str().map(str::to_string))
        .collect();
    assert_eq!(endpoints.len(), 8, "{endpoints:?}");
    // The filters keep the input's size.
    let files = files_ending(&dir.path().join("results"), ".jpg");
    assert_eq!(files.len(), 8, "{files:?}");
    for f in files {
        let img = image::open(&f).unwrap();
        assert_eq!((img.width(), img.height()), (40, 24), "{}", f.display());
    }
}

#[test]
fn published_credit_tables_price_topaz_jobs_offline() {
    let dir = tempfile::tempdir().unwrap();
    write_png(&dir.path().join("in/a.png"), 40, 30, 11);
    write_manifest(
        dir.path(),
        &[
            // Standard V2, 32 MP at 24 MP a credit: 2.
            row(
                "big",
                "enhance",
                serde_json::json!({"output_width": 8000, "output_height": 4000}),
            ),
            // Wonder, 1200 x 900 (from the 40 x 30 input) at 4 MP a credit: 1.
            row(
                "gen",
                "enhance-gen",
                serde_json::json!({"model": "Wonder", "output_width": 1200}),
            ),
        ],
    );
    let out = offline_validate(dir.path())
        .args(["validate", "--offline", "jobs.jsonl"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("2 jobs  ≈ 3 credits  (topaz's published credit tables"),
        "{}",
        text(&out)
    );
}
