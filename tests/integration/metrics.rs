//! `run --metrics-addr`, `--metrics-file` and `--log-format json`.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use crate::common::*;

/// Series name with labels → value, checking the text format on the way: every
/// sample's metric has a TYPE line before it, every value is a number.
fn parse_metrics(text: &str) -> BTreeMap<String, f64> {
    let mut typed = std::collections::HashSet::new();
    let mut out = BTreeMap::new();
    for line in text.lines().filter(|l| !l.trim().is_empty()) {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let mut parts = rest.split(' ');
            let name = parts.next().unwrap_or_default().to_string();
            let kind = parts.next().unwrap_or_default();
            assert!(
                matches!(kind, "counter" | "gauge"),
                "bad TYPE line {line:?}"
            );
            typed.insert(name);
            continue;
        }
        if line.starts_with("# HELP ") {
            continue;
        }
        let (series, value) = line
            .rsplit_once(' ')
            .unwrap_or_else(|| panic!("not a sample line: {line:?}"));
        let name = series.split('{').next().unwrap_or_default();
        assert!(typed.contains(name), "{name} sampled before its TYPE line");
        let v: f64 = value
            .parse()
            .unwrap_or_else(|_| panic!("not a number in {line:?}"));
        out.insert(series.to_string(), v);
    }
    out
}

/// The sum of every series of `metric` whose labels contain all of `labels`.
fn sum(m: &BTreeMap<String, f64>, metric: &str, labels: &[&str]) -> f64 {
    m.iter()
        .filter(|(k, _)| k.split('{').next() == Some(metric))
        .filter(|(k, _)| labels.iter().all(|l| k.contains(l)))
        .map(|(_, v)| v)
        .sum()
}

/// GET /metrics, or None while nothing listens yet.
fn scrape(port: u16) -> Option<String> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(10))).ok();
    write!(
        s,
        "GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).ok()?;
    let text = String::from_utf8_lossy(&raw).into_owned();
    let (head, body) = text.split_once("\r\n\r\n")?;
    assert!(head.starts_with("HTTP/1.1 200"), "metrics answered {head}");
    assert!(
        head.to_ascii_lowercase()
            .contains("content-type: text/plain; version=0.0.4"),
        "{head}"
    );
    Some(body.to_string())
}

fn topaz_jobs(dir: &Path, n: usize) {
    let mut csv = String::from("id,provider,operation,input,prompt,params\n");
    for i in 0..n {
        write_png(&dir.join(format!("in{i}.png")), 48, 48, i as u8);
        csv.push_str(&format!("m{i},topaz,enhance,in{i}.png,,\n"));
    }
    std::fs::write(dir.join("jobs.csv"), csv).unwrap();
}

/// Two scrapes while the run works show the counters moving; the textfile written
/// at the end has every series, with the run's final figures.
#[test]
fn metrics_move_during_a_run_and_land_in_the_textfile() {
    // 429s on a fifth of the requests: the rate-limit and retry counters must move.
    let sim = Sim::start(&["--task-ms", "300", "--chaos-429", "0.2", "--seed", "7"]);
    let dir = tempfile::tempdir().unwrap();
    topaz_jobs(dir.path(), 16);
    let port = free_port();
    let prom = dir.path().join("textfile").join("pixbatch.prom");
    std::fs::create_dir_all(prom.parent().unwrap()).unwrap();
    let mut cmd = pixbatch(dir.path());
    sim.env(&mut cmd);
    cmd.args(["run", "jobs.csv", "--metrics-addr"])
        .arg(format!("127.0.0.1:{port}"))
        .arg("--metrics-file")
        .arg(&prom)
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    let mut child = cmd.spawn().unwrap();

    let deadline = Instant::now() + Duration::from_secs(90);
    let mut first: Option<BTreeMap<String, f64>> = None;
    let mut moved = None;
    while Instant::now() < deadline {
        if child.try_wait().unwrap().is_some() {
            break;
        }
        if let Some(body) = scrape(port) {
            let m = parse_metrics(&body);
            let requests = sum(&m, "pixbatch_requests_total", &[]);
            match &first {
                None if requests > 0.0 => first = Some(m),
                Some(f) if requests > sum(f, "pixbatch_requests_total", &[]) => {
                    moved = Some(m);
                    break;
                }
                _ => {}
            }
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        assert!(Instant::now() < deadline, "the run did not end");
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(status.code(), Some(0));
    let first = first.expect("no scrape saw a request while the run worked");
    let second = moved.expect("the request counter did not move between two scrapes");
    assert!(
        sum(&second, "pixbatch_requests_total", &[]) > sum(&first, "pixbatch_requests_total", &[])
    );
    // The job gauges are live too: they always add up to the 16 jobs.
    for m in [&first, &second] {
        assert_eq!(sum(m, "pixbatch_jobs", &[r#"provider="topaz""#]), 16.0);
    }

    let text = std::fs::read_to_string(&prom).expect("the metrics file after the run");
    let m = parse_metrics(&text);
    let topaz = r#"provider="topaz""#;
    assert_eq!(sum(&m, "pixbatch_jobs", &[topaz, r#"state="done""#]), 16.0);
    assert_eq!(
        sum(
            &m,
            "pixbatch_jobs_finished_total",
            &[topaz, r#"outcome="done""#]
        ),
        16.0
    );
    assert!(
        sum(
            &m,
            "pixbatch_requests_total",
            &[topaz, r#"kind="submit""#, r#"status="200""#]
        ) >= 16.0
    );
    assert!(sum(&m, "pixbatch_requests_total", &[topaz, r#"kind="poll""#]) >= 16.0);
    let answered_429 = sum(&m, "pixbatch_requests_total", &[topaz, r#"status="429""#]);
    assert!(answered_429 > 0.0, "chaos 429s were not counted:\n{text}");
    assert_eq!(
        sum(&m, "pixbatch_rate_limited_total", &[topaz]),
        answered_429
    );
    assert!(sum(&m, "pixbatch_retries_total", &[topaz]) > 0.0);
    let output_bytes: u64 = files_ending(&dir.path().join("out"), ".png")
        .iter()
        .chain(files_ending(&dir.path().join("out"), ".jpeg").iter())
        .chain(files_ending(&dir.path().join("out"), ".jpg").iter())
        .map(|p| std::fs::metadata(p).unwrap().len())
        .sum();
    assert!(output_bytes > 0);
    assert!(
        sum(&m, "pixbatch_downloaded_bytes_total", &[topaz]) >= output_bytes as f64,
        "downloaded bytes below the {output_bytes} bytes of output files:\n{text}"
    );
    assert!(sum(&m, "pixbatch_limiter_wait_seconds_total", &[topaz]) >= 0.0);
    assert_eq!(sum(&m, "pixbatch_limiter_waiting_requests", &[topaz]), 0.0);
    assert_eq!(sum(&m, "pixbatch_run_succeeded", &[]), 1.0);
    assert_eq!(sum(&m, "pixbatch_run_interrupted", &[]), 0.0);
    assert!(
        sum(&m, "pixbatch_run_end_time_seconds", &[])
            >= sum(&m, "pixbatch_run_start_time_seconds", &[])
    );
    // Written through a temporary name: nothing else is left in the folder.
    let names: Vec<_> = std::fs::read_dir(prom.parent().unwrap())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names.len(), 1, "{names:?}");
    // And the server went away with the run.
    assert!(scrape(port).is_none());
}

/// A port that cannot be bound stops the run before any work.
#[test]
fn a_busy_metrics_port_is_an_error_before_any_work() {
    let sim = Sim::start(&[]);
    let dir = tempfile::tempdir().unwrap();
    topaz_jobs(dir.path(), 1);
    let busy = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = busy.local_addr().unwrap().port();
    let mut cmd = pixbatch(dir.path());
    sim.env(&mut cmd);
    cmd.args(["run", "jobs.csv", "--metrics-addr"])
        .arg(format!("127.0.0.1:{port}"));
    let out = run_to_end(cmd, Duration::from_secs(60));
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains(&format!("--metrics-addr 127.0.0.1:{port}")),
        "{}",
        text(&out)
    );
    assert!(
        sim.ledger().is_empty(),
        "requests went out: {:?}",
        sim.ledger()
    );
}

/// `--log-format json`: every stderr line is a JSON object with a level and a
/// message, at trace level too, and no key appears in any of them.
#[test]
fn json_logs_are_json_lines_without_secrets() {
    let sim = Sim::start(&["--task-ms", "100"]);
    let dir = tempfile::tempdir().unwrap();
    write_png(&dir.path().join("a.png"), 32, 32, 9);
    std::fs::write(
        dir.path().join("jobs.csv"),
        "id,provider,operation,input,prompt,params\n\
         k1,topaz,enhance,a.png,,\n\
         k3,photio,upscale,a.png,,\n\
         k5,aithriving,img2img,a.png,sim-nsfw,\"{\"\"width\"\":320,\"\"height\"\":320}\"\n",
    )
    .unwrap();
    let mut cmd = pixbatch(dir.path());
    sim.env(&mut cmd);
    cmd.env("RUST_LOG", "trace,sled=info")
        .args(["--log-format", "json", "run", "jobs.csv"]);
    let out = run_to_end(cmd, Duration::from_secs(60));
    // k5 fails on purpose (the simulator's NSFW trigger).
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    let stderr = String::from_utf8_lossy(&out.stderr);
    let mut levels = std::collections::BTreeSet::new();
    let mut lines = 0;
    for line in stderr.lines() {
        let v: serde_json::Value = serde_json::from_str(line)
            .unwrap_or_else(|e| panic!("not a JSON line ({e}): {line:?}"));
        let level = v["level"]
            .as_str()
            .unwrap_or_else(|| panic!("no level: {line}"));
        levels.insert(level.to_string());
        assert!(v["timestamp"].is_string(), "no timestamp: {line}");
        lines += 1;
    }
    assert!(
        lines > 20,
        "trace logging produced too little: {lines} lines"
    );
    assert!(
        levels.contains("WARN") && levels.contains("TRACE"),
        "{levels:?}"
    );
    // The failed job's reason and the closing hint are records, not plain text.
    assert!(stderr.contains("k5"), "{stderr}");
    assert!(stderr.contains("some jobs failed"), "{stderr}");
    for key in [
        "test-topaz-key-123",
        "test-photio-key-456",
        "test-aithriving-key-789",
    ] {
        assert!(!stderr.contains(key), "the logs contain the key {key}");
    }
    // The summary line stays on stdout, for scripts.
    assert!(String::from_utf8_lossy(&out.stdout).contains("2 done, 1 failed"));

    // Errors that end a command are records too: before logging is set up (a bad
    // config file) and after (an unknown job).
    for args in [
        vec!["--log-format", "json", "--config", "missing.toml", "status"],
        vec!["--log-format", "json", "show", "no-such-job"],
    ] {
        let out = pixbatch(dir.path()).args(&args).output().unwrap();
        assert_eq!(out.status.code(), Some(1), "{}", text(&out));
        let stderr = String::from_utf8_lossy(&out.stderr);
        let lines: Vec<&str> = stderr.lines().collect();
        assert_eq!(lines.len(), 1, "{args:?}: {stderr}");
        let v: serde_json::Value = serde_json::from_str(lines[0])
            .unwrap_or_else(|e| panic!("{args:?}: not JSON ({e}): {stderr}"));
        assert_eq!(v["level"], "ERROR", "{v}");
        assert_eq!(v["exit_code"], 1, "{v}");
    }
}
