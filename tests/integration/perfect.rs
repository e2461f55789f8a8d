//! Perfect end to end: the real binary against `pixbatch sim` in its own process.
//!
//! The simulator's style catalogue (docs/providers/perfect.md): the groups of the
//! feature at index `k` of its slug table are `2^53 + 1 + 1_000_000 k + 1000 i`
//! (i < 25), and a group's styles are the group's id plus 1..=23 — all above 2^53, so
//! a client that reads them as floats sends ids the simulator refuses.

use std::collections::{BTreeSet, HashMap};
use std::path::Path;
use std::time::Duration;

use serde_json::Value;

use crate::common::*;

const ID_BASE: u64 = (1 << 53) + 1;

fn group(slug_index: u64) -> u64 {
    ID_BASE + 1_000_000 * slug_index
}

fn styled(slug_index: u64) -> String {
    let g = group(slug_index);
    format!(
        "\"{{\"\"style_group_id\"\":{g},\"\"style_id\"\":{}}}\"",
        g + 7
    )
}

/// Inputs every feature can use: a JPEG face, a PNG photo, a reference, a mask.
fn inputs(dir: &Path) {
    write_png(&dir.join("in/face.jpg"), 96, 80, 3);
    write_png(&dir.join("in/photo.png"), 120, 90, 5);
    write_png(&dir.join("in/ref.png"), 64, 64, 9);
    let mask = image::GrayImage::from_fn(120, 90, |x, y| {
        image::Luma([if (40..80).contains(&x) && (30..60).contains(&y) {
            255
        } else {
            0
        }])
    });
    mask.save(dir.join("in/mask.png")).unwrap();
}

/// One row per feature (twelve), ids `<prefix><n>-<operation>`.
fn all_features(prefix: &str, n: usize) -> String {
    let rows = [
        ("hair-style", "in/face.jpg", "", styled(0)),
        ("wig", "in/face.jpg", "", styled(1)),
        ("hair-extension", "in/photo.png", "", styled(2)),
        ("hair-bang", "in/face.jpg", "", styled(3)),
        ("hair-volume", "in/photo.png", "", styled(4)),
        ("aging", "in/face.jpg", "", String::new()),
        (
            "makeup-transfer",
            "in/face.jpg|in/ref.png",
            "",
            String::new(),
        ),
        (
            "object-removal",
            "in/photo.png|in/mask.png",
            "",
            String::new(),
        ),
        ("colorize", "in/photo.png", "", String::new()),
        ("background-removal", "in/photo.png", "", String::new()),
        (
            "photo-enhance",
            "in/photo.png",
            "",
            "\"{\"\"scale\"\":2}\"".to_string(),
        ),
        ("text-to-image", "", "a lighthouse at dusk", styled(11)),
    ];
    let mut csv = String::new();
    for (op, input, prompt, params) in rows {
        let prompt = if prompt.is_empty() {
            String::new()
        } else {
            format!("{prompt} {n}")
        };
        csv.push_str(&format!(
            "{prefix}{n}-{op},perfect,{op},{input},{prompt},{params}\n"
        ));
    }
    csv
}

fn config(dir: &Path, extra: &str) {
    std::fs::write(
        dir.join("pixbatch.toml"),
        format!("[providers.perfect]\npoll_interval = \"300ms\"\nkeep_alive = \"2s\"\n{extra}"),
    )
    .unwrap();
}

fn run(sim: &Sim, dir: &Path, limit: Duration) -> std::process::Output {
    let mut cmd = pixbatch(dir);
    sim.env(&mut cmd);
    cmd.args(["run", "jobs.csv"]);
    run_to_end(cmd, limit)
}

fn perfect_entries(sim: &Sim) -> Vec<Value> {
    sim.ledger()
        .into_iter()
        .filter(|e| e["provider"] == "perfect")
        .collect()
}

/// Every output of every done job opens as an image and is byte for byte one the
/// simulator served; returns the number of outputs per job.
fn check_outputs(dir: &Path, sim_ledger: &[Value]) -> HashMap<String, usize> {
    let served: BTreeSet<String> = sim_ledger
        .iter()
        .filter(|e| e["endpoint"] == "result" && e["status"] == 200)
        .filter_map(|e| e["output_sha256"].as_str().map(str::to_string))
        .collect();
    let mut counts = HashMap::new();
    for row in report(dir, &dir.join("pixbatch.db")) {
        assert_eq!(row["state"], "done", "{row}");
        let (files, shas) = (joined(&row["outputs"]), joined(&row["sha256"]));
        let files: Vec<&str> = files.split('|').collect();
        let shas: Vec<&str> = shas.split('|').collect();
        assert_eq!(files.len(), shas.len());
        for (f, sha) in files.iter().zip(&shas) {
            let path = dir.join("out").join(f);
            assert_eq!(sha256_file(&path), *sha, "{f}");
            assert!(served.contains(*sha), "{f}: not served by the simulator");
            image::open(&path).unwrap_or_else(|e| panic!("{f} does not open: {e}"));
        }
        counts.insert(row["id"].as_str().unwrap().to_string(), files.len());
    }
    counts
}

#[test]
fn every_feature_end_to_end() {
    let sim = Sim::start(&["--task-ms", "300", "--keep-alive-ms", "2000"]);
    let dir = tempfile::tempdir().unwrap();
    inputs(dir.path());
    let csv = format!(
        "id,provider,operation,input,prompt,params\n{}",
        all_features("j", 0)
    );
    std::fs::write(dir.path().join("jobs.csv"), csv).unwrap();
    config(dir.path(), "");
    let out = run(&sim, dir.path(), Duration::from_secs(60));
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));

    let ledger = perfect_entries(&sim);
    let counts = check_outputs(dir.path(), &ledger);
    assert_eq!(counts.len(), 12);
    // Aging serves the upload and three older faces.
    assert_eq!(counts["j0-aging"], 4);
    assert!(counts
        .iter()
        .filter(|(k, _)| *k != "j0-aging")
        .all(|(_, n)| *n == 1));
    let enhanced = image::open(dir.path().join("out/j0-photo-enhance.jpg")).unwrap();
    assert_eq!((enhanced.width(), enhanced.height()), (240, 180));
    let cutout = image::open(dir.path().join("out/j0-background-removal.png")).unwrap();
    assert!(cutout.color().has_alpha());

    let charged: Vec<&Value> = ledger.iter().filter(|e| e["charged"] == true).collect();
    assert_eq!(charged.len(), 12, "one charge per job");
    let keys: BTreeSet<&str> = charged
        .iter()
        .map(|e| e["request_key"].as_str().unwrap())
        .collect();
    assert_eq!(keys.len(), 12, "no request_id charged twice");
    assert_eq!(ledger.iter().filter(|e| e["endpoint"] == "auth").count(), 1);
    assert_eq!(
        ledger
            .iter()
            .filter(|e| e["endpoint"] == "task_run")
            .count(),
        12
    );
    assert_eq!(
        ledger.iter().filter(|e| e["endpoint"] == "upload").count(),
        13,
        "nine single inputs, two pairs"
    );
    assert!(
        ledger.iter().all(|e| e["status"].as_u64().unwrap() < 400),
        "no refusals"
    );
}

/// Bad rows are refused with their line and reason, and nothing reaches the provider.
#[test]
fn validation_rejects_bad_rows_before_any_request() {
    let sim = Sim::start(&[]);
    let dir = tempfile::tempdir().unwrap();
    inputs(dir.path());
    write_png(&dir.path().join("in/big.jpg"), 2000, 1200, 1);
    write_png(&dir.path().join("in/small-mask.png"), 60, 45, 1);
    let g = group(0);
    let csv = format!(
        "id,provider,operation,input,prompt,params\n\
         ok,perfect,colorize,in/photo.png,,\n\
         png,perfect,hair-style,in/photo.png,,{}\n\
         big,perfect,hair-style,in/big.jpg,,{}\n\
         float,perfect,hair-bang,in/face.jpg,,\"{{\"\"style_group_id\"\":{g},\"\"style_id\"\":1.5}}\"\n\
         mask,perfect,object-removal,in/photo.png|in/small-mask.png,,\n\
         scale,perfect,photo-enhance,in/photo.png,,\"{{\"\"scale\"\":3}}\"\n",
        styled(0),
        styled(0)
    );
    std::fs::write(dir.path().join("jobs.csv"), csv).unwrap();
    let mut cmd = pixbatch(dir.path());
    sim.env(&mut cmd);
    cmd.args(["validate", "jobs.csv"]);
    let out = run_to_end(cmd, Duration::from_secs(30));
    assert_ne!(out.status.code(), Some(0), "{}", text(&out));
    let all = text(&out);
    for (line, reason) in [
        (3, "takes JPEG source inputs, but the source"),
        (4, "long side is at most 1024 pixels"),
        (5, "style_id must be a whole number id"),
        (
            6,
            "the mask must be the same size as the image: the image is 120x90, the mask 60x45",
        ),
        (7, "scale must be 1, 2 or 4"),
    ] {
        let wanted = format!("jobs.csv:{line}:");
        assert!(
            all.lines()
                .any(|l| l.contains(&wanted) && l.contains(reason)),
            "no {wanted} … {reason:?} in\n{all}"
        );
    }
    assert!(
        !all.contains("jobs.csv:2:"),
        "the good row is not reported: {all}"
    );
    // `run` enqueues nothing from a manifest with a bad row.
    let out = run(&sim, dir.path(), Duration::from_secs(30));
    assert_ne!(out.status.code(), Some(0), "{}", text(&out));
    assert!(
        perfect_entries(&sim).is_empty(),
        "no request reached the provider"
    );
}

/// Access tokens that die mid-run are renewed on `InvalidAccessToken` without
/// failing a job.
#[test]
fn an_expired_token_is_renewed_mid_run() {
    let sim = Sim::start(&[
        "--task-ms",
        "700",
        "--token-ttl-ms",
        "1500",
        "--keep-alive-ms",
        "2000",
        "--limit",
        "perfect=100/1s",
    ]);
    let dir = tempfile::tempdir().unwrap();
    inputs(dir.path());
    let mut csv = String::from("id,provider,operation,input,prompt,params\n");
    for n in 0..2 {
        csv.push_str(&all_features("t", n));
    }
    std::fs::write(dir.path().join("jobs.csv"), csv).unwrap();
    // Few at a time, so the run outlives several tokens.
    // Past the document's 100 per 5 minutes: time-scaled limits on both sides.
    config(
        dir.path(),
        "concurrency = 3\nmax_in_flight = 3\nrate_limits = [\"100/1s\"]\n",
    );
    let out = run(&sim, dir.path(), Duration::from_secs(60));
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let ledger = perfect_entries(&sim);
    let auths = ledger
        .iter()
        .filter(|e| e["endpoint"] == "auth" && e["status"] == 200)
        .count();
    let refused = ledger.iter().filter(|e| e["status"] == 401).count();
    assert!(auths >= 2, "the token was renewed ({auths} auth calls)");
    assert!(refused >= 1, "an expired token was refused at least once");
    assert_eq!(check_outputs(dir.path(), &ledger).len(), 24);
    let t0 = ledger.iter().find(|e| e["endpoint"] == "auth").unwrap()["t_ms"]
        .as_u64()
        .unwrap();
    let last = ledger.last().unwrap()["t_ms"].as_u64().unwrap();
    assert!(
        last - t0 > 1500,
        "the run outlived the first token ({} ms)",
        last - t0
    );
}

/// A secret key that is not the client's halts Perfect at the first auth call (exit
/// 5, a halted provider), with a message naming the variables, before any job is
/// touched.
#[test]
fn a_wrong_secret_fails_fast() {
    let sim = Sim::start(&[]);
    let other = Sim::start(&["--seed", "99"]);
    let foreign = other
        .credentials
        .iter()
        .find(|(k, _)| k == "PERFECT_CLIENT_SECRET")
        .map(|(_, v)| v.clone())
        .unwrap();
    drop(other);
    let dir = tempfile::tempdir().unwrap();
    inputs(dir.path());
    let csv = format!(
        "id,provider,operation,input,prompt,params\n{}",
        all_features("w", 0)
    );
    std::fs::write(dir.path().join("jobs.csv"), csv).unwrap();
    let mut cmd = pixbatch(dir.path());
    sim.env(&mut cmd);
    cmd.env("PERFECT_CLIENT_SECRET", &foreign);
    cmd.args(["run", "jobs.csv"]);
    let out = run_to_end(cmd, Duration::from_secs(30));
    assert_eq!(out.status.code(), Some(5), "{}", text(&out));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("PERFECT_CLIENT_SECRET"), "{stderr}");
    assert!(stderr.contains("InvalidIdToken"), "{stderr}");
    assert!(!stderr.contains(&foreign), "the secret is never shown");
    let ledger = perfect_entries(&sim);
    assert!(!ledger.is_empty());
    assert!(
        ledger.iter().all(|e| e["endpoint"] == "auth"),
        "only auth calls: {ledger:?}"
    );
    for row in report(dir.path(), &dir.path().join("pixbatch.db")) {
        assert_eq!(row["state"], "queued", "{row}");
    }
}

/// A task the provider dropped is submitted again with a new request_id and ends
/// done; the loss shows in `show` and was never charged.
#[test]
fn a_lost_task_is_resubmitted() {
    let sim = Sim::start(&["--task-ms", "300", "--keep-alive-ms", "2000"]);
    let dir = tempfile::tempdir().unwrap();
    inputs(dir.path());
    std::fs::copy(
        dir.path().join("in/photo.png"),
        dir.path().join("in/sim-drop-once.png"),
    )
    .unwrap();
    std::fs::write(
        dir.path().join("jobs.csv"),
        "id,provider,operation,input,prompt,params\nlost,perfect,colorize,in/sim-drop-once.png,,\n",
    )
    .unwrap();
    // The early-InvalidTaskId window (10 s by default) shortened: the dropped task is
    // polled again for that long before it counts as lost.
    config(dir.path(), "early_not_found = \"1s\"\n");
    let out = run(&sim, dir.path(), Duration::from_secs(30));
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));

    let ledger = perfect_entries(&sim);
    let dropped: Vec<&Value> = ledger
        .iter()
        .filter(|e| e["endpoint"] == "task_status" && e["status"] == 400)
        .collect();
    assert!(!dropped.is_empty(), "a poll found the task dropped");
    let runs: Vec<&Value> = ledger
        .iter()
        .filter(|e| e["endpoint"] == "task_run")
        .collect();
    assert_eq!(runs.len(), 2);
    assert_ne!(
        runs[0]["request_key"], runs[1]["request_key"],
        "a new request_id"
    );
    assert_ne!(runs[0]["remote_id"], runs[1]["remote_id"], "a new task");
    let charged: Vec<&Value> = ledger.iter().filter(|e| e["charged"] == true).collect();
    assert_eq!(charged.len(), 1);
    assert_eq!(charged[0]["remote_id"], runs[1]["remote_id"]);

    let show = pixbatch(dir.path())
        .args(["show", "lost"])
        .output()
        .unwrap();
    let shown = String::from_utf8_lossy(&show.stdout);
    assert!(shown.contains("InvalidTaskId"), "{shown}");
    assert!(
        !shown.to_lowercase().contains("charged twice") && !shown.contains("possible-duplicate"),
        "{shown}"
    );
    assert_eq!(
        report(dir.path(), &dir.path().join("pixbatch.db"))[0]["possible_duplicates"],
        0
    );
}

/// Jobs whose inputs the engine refuses fail at once with the document's reason; a
/// transient engine error is retried and ends done.
#[test]
fn engine_errors_permanent_and_transient() {
    let sim = Sim::start(&["--task-ms", "200", "--keep-alive-ms", "2000"]);
    let dir = tempfile::tempdir().unwrap();
    inputs(dir.path());
    std::fs::copy(
        dir.path().join("in/face.jpg"),
        dir.path().join("in/x_error_no_face.jpg"),
    )
    .unwrap();
    std::fs::copy(
        dir.path().join("in/face.jpg"),
        dir.path().join("in/x_error_inference.jpg"),
    )
    .unwrap();
    std::fs::write(
        dir.path().join("jobs.csv"),
        format!(
            "id,provider,operation,input,prompt,params\n\
             noface,perfect,hair-style,in/x_error_no_face.jpg,,{}\n\
             flaky,perfect,aging,in/x_error_inference.jpg,,\n",
            styled(0)
        ),
    )
    .unwrap();
    config(dir.path(), "");
    let out = run(&sim, dir.path(), Duration::from_secs(60));
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    let rows = report(dir.path(), &dir.path().join("pixbatch.db"));
    let by_id: HashMap<&str, &Value> = rows
        .iter()
        .map(|r| (r["id"].as_str().unwrap(), r))
        .collect();
    assert_eq!(by_id["noface"]["state"], "failed");
    let reason = by_id["noface"]["error"].as_str().unwrap();
    assert!(
        reason.contains("error_no_face") && reason.contains("No face detected"),
        "{reason}"
    );
    assert_eq!(by_id["noface"]["submissions"], 1, "not retried");
    assert_eq!(by_id["flaky"]["state"], "done");
    assert_eq!(by_id["flaky"]["submissions"], 2);
}

/// 300 jobs over all twelve features with time-scaled limits: no violation, no lost
/// task, every output the simulator's.
#[test]
fn volume_300_jobs_all_features() {
    let sim = Sim::start(&[
        "--task-ms",
        "400",
        "--keep-alive-ms",
        "2000",
        "--limit",
        "perfect=100/1s,200/5s",
    ]);
    let dir = tempfile::tempdir().unwrap();
    inputs(dir.path());
    let mut csv = String::from("id,provider,operation,input,prompt,params\n");
    for n in 0..25 {
        csv.push_str(&all_features("v", n));
    }
    std::fs::write(dir.path().join("jobs.csv"), csv).unwrap();
    config(
        dir.path(),
        "rate_limits = [\"100/1s\", \"200/5s\"]\nconcurrency = 16\nmax_in_flight = 24\n",
    );
    let started = std::time::Instant::now();
    let out = run(&sim, dir.path(), Duration::from_secs(120));
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let ledger = perfect_entries(&sim);
    let violations = ledger.iter().filter(|e| e["violation"] == true).count();
    let lost = ledger
        .iter()
        .filter(|e| e["endpoint"] == "task_status" && e["status"] == 400)
        .count();
    let counts = check_outputs(dir.path(), &ledger);
    eprintln!(
        "volume: {} jobs, {} perfect requests, {violations} violations, {lost} lost, {:?}",
        counts.len(),
        ledger.len(),
        started.elapsed()
    );
    assert_eq!(counts.len(), 300);
    assert_eq!(violations, 0);
    assert_eq!(lost, 0);
    let charged: BTreeSet<&str> = ledger
        .iter()
        .filter(|e| e["charged"] == true)
        .map(|e| e["request_key"].as_str().unwrap())
        .collect();
    assert_eq!(charged.len(), 300);
    assert_eq!(ledger.iter().filter(|e| e["charged"] == true).count(), 300);
}

/// `pixbatch styles perfect FEATURE` lists the style groups over every page, and
/// `--group ID` the styles in one, with ids above 2^53 exact; `balance` reads the credit
/// endpoint (docs/providers.md, live evidence).
#[test]
fn styles_command_lists_groups_and_styles_with_exact_ids() {
    let sim = Sim::start(&[]);
    let dir = tempfile::tempdir().unwrap();
    let cli = |args: &[&str]| {
        let mut cmd = pixbatch(dir.path());
        sim.env(&mut cmd);
        cmd.args(args).output().unwrap()
    };
    let lines = |out: &std::process::Output| -> Vec<serde_json::Value> {
        assert!(out.status.success(), "{}", text(out));
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    };
    let groups = lines(&cli(&["styles", "perfect", "hair-style", "--json"]));
    assert_eq!(groups.len(), 25, "both pages of groups");
    assert!(groups.iter().all(|g| g["kind"] == "group"));
    let first = groups[0]["id"].as_str().unwrap().to_string();
    assert_eq!(first, "9007199254740993", "2^53 + 1, not rounded");
    let styles = lines(&cli(&[
        "styles",
        "perfect",
        "hair-style",
        "--group",
        &first,
        "--json",
    ]));
    assert_eq!(styles.len(), 23);
    assert_eq!(styles[0]["id"], "9007199254740994");
    assert!(styles.iter().all(|s| s["kind"] == "style"));

    // A style id from the listing works in a manifest as is.
    let img = dir.path().join("in/face.jpg");
    std::fs::create_dir_all(img.parent().unwrap()).unwrap();
    std::fs::write(&img, pixbatch::sim::images::sample_jpeg(96, 128, 4)).unwrap();
    std::fs::write(
        dir.path().join("jobs.csv"),
        format!(
            "id,provider,operation,input,params\nh1,perfect,hair-style,in/face.jpg,\"{{\"\"style_group_id\"\":{first},\"\"style_id\"\":{}}}\"\n",
            styles[5]["id"].as_str().unwrap()
        ),
    )
    .unwrap();
    let run = cli(&["run", "jobs.csv"]);
    assert_eq!(run.status.code(), Some(0), "{}", text(&run));

    // The credit endpoint: the simulator's ApiSubscription batch, one credit spent.
    let balance = cli(&["balance", "perfect"]);
    assert_eq!(balance.status.code(), Some(0), "{}", text(&balance));
    assert_eq!(
        String::from_utf8_lossy(&balance.stdout).trim(),
        "perfect: 9999 credits"
    );
}

/// Result links expire (Perfect's after 2 hours; here 300 ms). A link that arrives
/// already stale (its poll answer slowed past the link's life) answers 403; the job
/// goes back to polling the finished task for fresh links and ends done.
#[test]
fn an_expired_result_link_is_renewed_by_polling_again() {
    let sim = Sim::start(&[
        "--task-ms",
        "200",
        "--keep-alive-ms",
        "3000",
        "--link-ttl-ms",
        "300",
        // 30 % of answers slowed past a link's life: with 16 jobs the chance that no
        // link-bearing poll answer is slowed (and nothing is tested) is 0.7^16 ≈ 0.3 %;
        // with 8 jobs it was ~6 % and happened in CI. (More slowing makes renewals go
        // stale again and again, and their backoff grows.)
        "--chaos-slow",
        "0.3",
        "--slow-ms",
        "600",
        "--seed",
        "3",
    ]);
    let dir = tempfile::tempdir().unwrap();
    inputs(dir.path());
    let mut csv = String::from("id,provider,operation,input,prompt,params\n");
    for i in 0..16 {
        csv.push_str(&format!(
            "x{i},perfect,photo-enhance,in/photo.png,,\"{{\"\"scale\"\":{}}}\"\n",
            [1, 2, 4][i % 3]
        ));
    }
    std::fs::write(dir.path().join("jobs.csv"), csv).unwrap();
    std::fs::write(
        dir.path().join("pixbatch.toml"),
        "[providers.perfect]\npoll_interval = \"300ms\"\nkeep_alive = \"3s\"\nmax_attempts = 30\n",
    )
    .unwrap();
    let out = run(&sim, dir.path(), Duration::from_secs(120));
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let ledger = perfect_entries(&sim);
    check_outputs(dir.path(), &ledger);
    let stale = ledger
        .iter()
        .filter(|e| e["endpoint"] == "result" && e["status"] == 403)
        .count();
    assert!(stale > 0, "no link expired: the test did not test anything");
    let mut renewed = 0;
    for i in 0..16 {
        let show = pixbatch(dir.path())
            .args(["show", &format!("x{i}")])
            .output()
            .unwrap();
        if String::from_utf8_lossy(&show.stdout).contains("asking the provider for fresh links") {
            renewed += 1;
        }
    }
    assert!(
        renewed > 0,
        "{stale} stale links, but no job says it renewed one"
    );
    let charged = ledger.iter().filter(|e| e["charged"] == true).count();
    assert_eq!(charged, 16, "renewing a link is not a new task");
}
