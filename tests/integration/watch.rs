//! Watching a run (issue 12, points 4 and 9): `status` says per provider why it waits
//! and until when; the progress line fits a narrow terminal; `pixbatch sim` prints
//! everything a client needs.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::common::*;

/// `n` Topaz jobs on one small picture.
fn topaz_manifest(dir: &Path, n: usize) {
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

/// The exports `pixbatch sim` prints are enough on their own: a run with nothing
/// else in its environment finishes a job of each kind of key.
#[test]
fn sim_prints_every_url_and_key_a_client_needs() {
    let sim = Sim::start(&["--task-ms", "50"]);
    let names: Vec<&str> = sim.credentials.iter().map(|(n, _)| n.as_str()).collect();
    for kind in ["TOPAZ", "PHOTIO", "AITHRIVING", "PERFECT", "DZINE"] {
        assert!(
            names.contains(&format!("PIXBATCH_{kind}_URL").as_str()),
            "{kind} URL missing: {names:?}"
        );
    }
    for key in [
        "TOPAZ_API_KEY",
        "PHOTIO_API_KEY",
        "AITHRIVING_API_KEY",
        "DZINE_API_KEY",
        "PERFECT_CLIENT_ID",
        "PERFECT_CLIENT_SECRET",
    ] {
        assert!(names.contains(&key), "{key} missing: {names:?}");
    }
    let dir = tempfile::tempdir().unwrap();
    write_png(&dir.path().join("in/a.png"), 48, 32, 1);
    std::fs::write(
        dir.path().join("jobs.csv"),
        "id,provider,operation,input,prompt,params\n\
         t1,topaz,enhance,in/a.png,,\"{\"\"output_width\"\":64}\"\n\
         p1,photio,upscale,in/a.png,a picture,\n",
    )
    .unwrap();
    let mut cmd = pixbatch(dir.path());
    for (name, value) in &sim.credentials {
        cmd.env(name, value);
    }
    cmd.args(["run", "jobs.csv"]);
    let out = run_to_end(cmd, Duration::from_secs(120));
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("2 done, 0 failed"),
        "{}",
        text(&out)
    );
}

/// While the configured window is full, `status --json` names it for Topaz, with the
/// time the window frees, and the text `status` prints says the same.
#[test]
fn status_names_the_rate_window_and_its_end() {
    let sim = Sim::start(&["--task-ms", "100"]);
    let dir = tempfile::tempdir().unwrap();
    topaz_manifest(dir.path(), 4);
    std::fs::write(
        dir.path().join("pixbatch.toml"),
        "[providers.topaz]\nrate_limits = [\"1/2s\"]\npoll_interval = \"100ms\"\n",
    )
    .unwrap();
    let mut cmd = pixbatch(dir.path());
    sim.env(&mut cmd);
    let mut run = cmd
        .args(["run", "jobs.csv"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start the run");
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut seen_json = None;
    let mut seen_text = None;
    while run.try_wait().expect("wait").is_none() && Instant::now() < deadline {
        let mut status = pixbatch(dir.path());
        let out = status.args(["status", "--json"]).output().expect("status");
        if let Ok(v) = serde_json::from_slice::<serde_json::Value>(&out.stdout) {
            let topaz = v["running"]["providers"]
                .as_array()
                .and_then(|ps| ps.iter().find(|p| p["provider"] == "topaz").cloned());
            if let Some(p) = topaz.filter(|p| p["wait"]["reason"] == "rate_window") {
                seen_json.get_or_insert((p, v["running"]["started_ms"].clone()));
            }
        }
        if seen_text.is_none() {
            let out = pixbatch(dir.path()).arg("status").output().expect("status");
            let text = String::from_utf8_lossy(&out.stdout).into_owned();
            if text.contains("waiting: rate window full until") {
                seen_text = Some(text);
            }
        }
        if seen_json.is_some() && seen_text.is_some() {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let status = run.wait().expect("the run ends");
    assert_eq!(status.code(), Some(0));
    let (topaz, started) = seen_json.expect("status --json never named the rate window");
    let until = topaz["wait"]["until_ms"].as_u64().expect("until_ms");
    assert!(until > started.as_u64().unwrap(), "{topaz}");
    assert!(
        topaz["wait_text"]
            .as_str()
            .is_some_and(|t| t.starts_with("rate window full until")),
        "{topaz}"
    );
    assert!(
        topaz["remaining"].as_u64().is_some_and(|n| n >= 1),
        "{topaz}"
    );
    let text = seen_text.expect("status never said why Topaz waits");
    assert!(
        text.contains("topaz") && text.contains("jobs/min"),
        "{text}"
    );
}

/// In a 50-column terminal (tmux), the run shows exactly one progress line that
/// never wraps. Skipped when tmux is missing, unless PIXBATCH_REQUIRE_TMUX is set
/// (CI installs it).
#[test]
fn a_50_column_terminal_shows_one_progress_line() {
    if Command::new("tmux").arg("-V").output().is_err() {
        assert!(
            std::env::var_os("PIXBATCH_REQUIRE_TMUX").is_none(),
            "tmux is required (PIXBATCH_REQUIRE_TMUX) but missing"
        );
        eprintln!("tmux not found: skipped");
        return;
    }
    let sim = Sim::start(&["--task-ms", "100"]);
    let dir = tempfile::tempdir().unwrap();
    topaz_manifest(dir.path(), 6);
    std::fs::write(
        dir.path().join("pixbatch.toml"),
        "[providers.topaz]\nrate_limits = [\"1/1s\"]\npoll_interval = \"100ms\"\n",
    )
    .unwrap();
    // The run in a shell script, so tmux needs no environment of ours.
    let script = format!(
        "cd '{}'\nexport PIXBATCH_TOPAZ_URL='{}/topaz/image/v1'\nexport TOPAZ_API_KEY=k\n\
         '{}' run jobs.csv > summary.txt\necho $? > code.txt\nsleep 30\n",
        dir.path().display(),
        sim.base,
        bin().display()
    );
    std::fs::write(dir.path().join("run.sh"), script).unwrap();
    let socket = format!("pixbatch-test-{}", std::process::id());
    let tmux = |args: &[&str]| {
        Command::new("tmux")
            .args(["-L", &socket, "-f", "/dev/null"])
            .args(args)
            .output()
            .expect("tmux")
    };
    let script_path = dir.path().join("run.sh");
    let started = tmux(&[
        "new-session",
        "-d",
        "-x",
        "50",
        "-y",
        "20",
        "sh",
        script_path.to_str().unwrap(),
    ]);
    assert!(started.status.success(), "{}", text(&started));
    let progress_line = |l: &str| {
        let mut words = l.split_whitespace();
        let elapsed = words.next().unwrap_or("");
        elapsed.ends_with('s')
            && elapsed.starts_with(|c: char| c.is_ascii_digit())
            && l.contains("/6")
    };
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut frames = 0;
    while !dir.path().join("code.txt").exists() && Instant::now() < deadline {
        // -J joins rows the terminal wrapped: a wrapped line shows as one long line.
        let cap = tmux(&["capture-pane", "-p", "-J"]);
        let screen = String::from_utf8_lossy(&cap.stdout).into_owned();
        let lines: Vec<&str> = screen.lines().filter(|l| progress_line(l)).collect();
        if !lines.is_empty() {
            frames += 1;
            assert_eq!(lines.len(), 1, "more than one progress line:\n{screen}");
            assert!(
                lines[0].trim_end().chars().count() < 50,
                "the progress line wraps at 50 columns:\n{screen}"
            );
        }
        std::thread::sleep(Duration::from_millis(300));
    }
    let _ = tmux(&["kill-server"]);
    let code = std::fs::read_to_string(dir.path().join("code.txt")).unwrap_or_default();
    assert_eq!(code.trim(), "0", "the run in tmux failed");
    assert!(frames > 0, "no progress line was ever seen");
    let summary = std::fs::read_to_string(dir.path().join("summary.txt")).unwrap();
    assert!(summary.contains("6 done"), "{summary}");
}

/// A 429 with Retry-After shows in `status --json` as `retry_after`, until its end.
#[test]
fn status_names_a_retry_after_pause() {
    let sim = Sim::start(&[
        "--task-ms",
        "100",
        "--no-limits",
        "--seed",
        "5",
        "--chaos-429",
        "0.3",
        "--chaos-retry-after",
        "3",
    ]);
    let dir = tempfile::tempdir().unwrap();
    topaz_manifest(dir.path(), 6);
    std::fs::write(
        dir.path().join("pixbatch.toml"),
        "[providers.topaz]\nrate_limits = []\npoll_interval = \"100ms\"\n",
    )
    .unwrap();
    let mut cmd = pixbatch(dir.path());
    sim.env(&mut cmd);
    let mut run = cmd
        .args(["run", "jobs.csv"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start the run");
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut seen = None;
    while run.try_wait().expect("wait").is_none() && Instant::now() < deadline {
        let out = pixbatch(dir.path())
            .args(["status", "--json"])
            .output()
            .expect("status");
        if let Ok(v) = serde_json::from_slice::<serde_json::Value>(&out.stdout) {
            let wait = &v["running"]["providers"][0]["wait"];
            if wait["reason"] == "retry_after" {
                seen = Some(wait.clone());
                break;
            }
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let status = run.wait().expect("the run ends");
    assert!(status.code().is_some());
    let wait = seen.expect("status --json never named the Retry-After pause");
    assert!(wait["until_ms"].as_u64().is_some(), "{wait}");
    let stats = sim.stats();
    assert!(
        stats["faults"]["429"].as_u64().is_some_and(|n| n > 0),
        "{stats}"
    );
}
