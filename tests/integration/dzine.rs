//! Dzine end to end: the real binary against `pixbatch sim` (its Dzine follows
//! `dzine.txt`; the triggers used here are listed in `docs/providers/dzine.md`).

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::time::Duration;

use crate::common::*;

const STYLE_S: &str = "Style-7feccf2b-f2ad-43a6-89cb-354fb5d928d2";

/// Fast polls, patient retries.
fn config(dir: &Path) {
    std::fs::write(
        dir.join("pixbatch.toml"),
        r#"
[providers.dzine]
rate_limits = ["50/1s"]
concurrency = 8
poll_interval = "150ms"
max_attempts = 30
reconcile_grace = "1s"
early_not_found = "1s"
"#,
    )
    .unwrap();
}

fn csv(dir: &Path, rows: &[String]) {
    let mut text = String::from("id,provider,operation,input,prompt,params,output\n");
    for r in rows {
        text.push_str(r);
        text.push('\n');
    }
    std::fs::write(dir.join("jobs.csv"), text).unwrap();
}

/// A CSV cell holding JSON.
fn j(v: serde_json::Value) -> String {
    format!("\"{}\"", v.to_string().replace('"', "\"\""))
}

fn run(sim: &Sim, dir: &Path, limit: Duration) -> std::process::Output {
    let mut cmd = pixbatch(dir);
    cmd.args(["run", "jobs.csv"]);
    sim.env(&mut cmd);
    run_to_end(cmd, limit)
}

fn show(sim: &Sim, dir: &Path, id: &str) -> String {
    let mut cmd = pixbatch(dir);
    cmd.args(["show", id]);
    sim.env(&mut cmd);
    let out = cmd.output().unwrap();
    assert!(out.status.success(), "{}", text(&out));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Job id -> hashes the simulator served for it (result downloads).
fn served(ledger: &[serde_json::Value]) -> BTreeMap<String, BTreeSet<String>> {
    let mut out: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for e in ledger {
        if let (Some(key), Some(sha)) = (e["request_key"].as_str(), e["output_sha256"].as_str()) {
            out.entry(job_of_key(key).to_string())
                .or_default()
                .insert(sha.to_string());
        }
    }
    out
}

fn charges(ledger: &[serde_json::Value]) -> BTreeMap<String, u64> {
    let mut out = BTreeMap::new();
    for e in ledger.iter().filter(|e| e["charged"] == true) {
        let key = e["request_key"].as_str().unwrap_or("");
        *out.entry(job_of_key(key).to_string()).or_insert(0) += 1;
    }
    out
}

/// Every report row's files exist, match their record, open as images, and are what
/// the simulator served for that job.
fn check_outputs(dir: &Path, rows: &[serde_json::Value], ledger: &[serde_json::Value]) {
    let served = served(ledger);
    for r in rows {
        let id = r["id"].as_str().unwrap();
        assert_eq!(r["state"], "done", "{r}");
        for (path, sha) in joined(&r["outputs"])
            .split('|')
            .zip(joined(&r["sha256"]).split('|'))
        {
            let file = dir.join("out").join(path);
            assert_eq!(
                sha256_file(&file),
                sha,
                "{id}: {path} differs from its record"
            );
            let bytes = std::fs::read(&file).unwrap();
            assert!(
                image::load_from_memory(&bytes).is_ok(),
                "{id}: {path} is no image"
            );
            assert!(
                served.get(id).is_some_and(|s| s.contains(sha)),
                "{id}: {path} is not what the simulator served"
            );
        }
    }
}

fn dims(path: &Path) -> (u32, u32) {
    image::image_dimensions(path).unwrap()
}

/// The four operations: txt2img with four slots gives four files, img2img two JPEGs,
/// a face swap from two local files (uploaded, detected, swapped), an upscale by 1.5.
#[test]
fn every_operation_end_to_end() {
    let sim = Sim::start(&["--task-ms", "300"]);
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    config(d);
    write_png(&d.join("in/land.png"), 160, 96, 1);
    write_png(&d.join("in/me.png"), 96, 128, 2);
    write_png(&d.join("in/twofaces_group.png"), 128, 128, 3);
    write_png(&d.join("in/sq.png"), 128, 128, 4);
    csv(
        d,
        &[
            format!(
                "t1,dzine,txt2img,,a red fox in snow,{},",
                j(
                    serde_json::json!({"style_code": STYLE_S, "target_h": 256, "target_w": 192, "generate_slots": [1, 1, 1, 1], "style_intensity": 0.7, "seed": 42})
                )
            ),
            format!(
                "i1,dzine,img2img,in/land.png,a watercolor,{},",
                j(
                    serde_json::json!({"style_code": STYLE_S, "structure_match": 0.8, "generate_slots": [1, 0, 1, 0], "output_format": "jpeg"})
                )
            ),
            format!(
                "f1,dzine,face_swap,in/me.png|in/twofaces_group.png,,{},",
                j(serde_json::json!({"generate_slots": [0, 1, 0, 0]}))
            ),
            format!(
                "u1,dzine,upscale,in/sq.png,,{},",
                j(serde_json::json!({"upscaling_resize": 1.5, "output_format": "png"}))
            ),
        ],
    );
    let out = run(&sim, d, Duration::from_secs(50));
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));

    let rows = report(d, &d.join("pixbatch.db"));
    let ledger = sim.ledger();
    check_outputs(d, &rows, &ledger);
    let by_id: BTreeMap<&str, &serde_json::Value> = rows
        .iter()
        .map(|r| (r["id"].as_str().unwrap(), r))
        .collect();
    let files = |id: &str| -> Vec<String> {
        joined(&by_id[id]["outputs"])
            .split('|')
            .map(str::to_string)
            .collect()
    };
    let t1 = files("t1");
    assert_eq!(t1, ["t1_0.png", "t1_1.png", "t1_2.png", "t1_3.png"]);
    for f in &t1 {
        assert_eq!(dims(&d.join("out").join(f)), (192, 256));
    }
    let t1_hashes = joined(&by_id["t1"]["sha256"]);
    let hashes: BTreeSet<&str> = t1_hashes.split('|').collect();
    assert_eq!(hashes.len(), 4, "four different pictures");
    assert_eq!(files("i1"), ["i1_0.jpg", "i1_1.jpg"]);
    assert_eq!(dims(&d.join("out/i1_0.jpg")), (160, 96));
    assert_eq!(files("f1"), ["f1.png"]);
    assert_eq!(dims(&d.join("out/f1.png")), (128, 128));
    assert_eq!(files("u1"), ["u1.png"]);
    assert_eq!(dims(&d.join("out/u1.png")), (192, 192));

    let count = |endpoint: &str| ledger.iter().filter(|e| e["endpoint"] == endpoint).count();
    assert_eq!(count("file_upload"), 2, "both face swap inputs uploaded");
    assert_eq!(count("face_detect"), 2);
    for op in ["txt2img", "img2img", "face_swap", "upscale"] {
        assert_eq!(count(op), 1, "{op} created once");
    }
    assert_eq!(sim.stats()["charges"]["dzine"], 4);
    assert!(ledger.iter().all(|e| e["violation"] == false));
}

/// Out-of-range parameters are refused by `validate` with the line and the reason,
/// and nothing reaches the provider.
#[test]
fn bad_params_are_refused_before_any_request() {
    let sim = Sim::start(&[]);
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    write_png(&d.join("a.png"), 64, 64, 1);
    let long = "x".repeat(900);
    csv(
        d,
        &[
            format!(
                "ok,dzine,txt2img,,fine,{},",
                j(serde_json::json!({"style_code": STYLE_S, "target_h": 512}))
            ),
            format!(
                "b1,dzine,txt2img,,a fox,{},",
                j(
                    serde_json::json!({"style_code": STYLE_S, "target_h": 512, "style_intensity": 0.25})
                )
            ),
            format!(
                "b2,dzine,txt2img,,{long},{},",
                j(serde_json::json!({"style_code": STYLE_S, "target_h": 512}))
            ),
            format!(
                "b3,dzine,txt2img,,a fox,{},",
                j(serde_json::json!({"style_code": STYLE_S, "target_h": 1600}))
            ),
            format!(
                "b4,dzine,upscale,a.png,,{},",
                j(serde_json::json!({"upscaling_resize": 5}))
            ),
            format!(
                "b5,dzine,img2img,a.png,a fox,{},",
                j(serde_json::json!({"style_code": STYLE_S, "seed": 0}))
            ),
            format!("b6,dzine,face_swap,a.png,,{},", j(serde_json::json!({}))),
            format!(
                "b7,dzine,txt2img,,a fox,{},",
                j(
                    serde_json::json!({"style_code": STYLE_S, "target_h": 512, "generate_slots": [1, 1, 1]})
                )
            ),
            format!(
                "b8,dzine,img2img,a.png,a fox,{},",
                j(serde_json::json!({"target_h": 512}))
            ),
        ],
    );
    let mut cmd = pixbatch(d);
    cmd.args(["validate", "jobs.csv"]);
    sim.env(&mut cmd);
    let out = cmd.output().unwrap();
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    let err = String::from_utf8_lossy(&out.stderr);
    for (line, reason) in [
        (3, "style_intensity must be one of 0, 0.1"),
        (4, "prompt is 900 characters long; at most 800"),
        (5, "target_h must be an integer from 128 to 1536 (got 1600)"),
        (6, "upscaling_resize must be 1.5, 2, 3 or 4 (got 5)"),
        (7, "seed must be an integer from 1 to 2147483647 (got 0)"),
        (8, "face_swap takes two inputs"),
        (9, "generate_slots must have 4 or 2 entries"),
        (10, "unknown dzine parameter \"target_h\""),
        (10, "needs params.style_code"),
    ] {
        let found = err
            .lines()
            .any(|l| l.contains(&format!("jobs.csv:{line}:")) && l.contains(reason));
        assert!(found, "line {line} ({reason}) not reported:\n{err}");
    }
    assert!(!err.contains("jobs.csv:2:"), "the good row is fine:\n{err}");
    assert!(
        sim.ledger().is_empty(),
        "a request was made: {:?}",
        sim.ledger()
    );
}

/// A face swap whose destination has no face fails at once with a clear reason,
/// before anything is paid; the other job is unaffected.
#[test]
fn a_face_swap_without_a_face_fails_permanently() {
    let sim = Sim::start(&["--task-ms", "200"]);
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    config(d);
    write_png(&d.join("me.png"), 96, 128, 2);
    write_png(&d.join("noface_wall.png"), 96, 96, 5);
    csv(
        d,
        &[
            "nf,dzine,face_swap,me.png|noface_wall.png,,,".to_string(),
            format!(
                "ok,dzine,face_swap,me.png|me.png,,{},",
                j(serde_json::json!({"dest_face_index": 0}))
            ),
            format!(
                "oor,dzine,face_swap,me.png|me.png,,{},",
                j(serde_json::json!({"source_face_index": 3}))
            ),
        ],
    );
    let out = run(&sim, d, Duration::from_secs(40));
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    let s = show(&sim, d, "nf");
    assert!(s.contains("failed"), "{s}");
    assert!(s.contains("dzine found no face in the dest image"), "{s}");
    assert!(s.contains("noface_wall.png"), "{s}");
    let s = show(&sim, d, "oor");
    assert!(
        s.contains("source_face_index 3 is out of range: dzine found 1 face(s)"),
        "{s}"
    );
    let rows = report(d, &d.join("pixbatch.db"));
    let state = |id: &str| rows.iter().find(|r| r["id"] == id).unwrap()["state"].clone();
    assert_eq!(state("ok"), "done");
    assert_eq!(state("nf"), "failed");
    let charged = charges(&sim.ledger());
    assert_eq!(charged.get("nf"), None, "nothing paid for the failed swap");
    assert_eq!(charged.get("ok"), Some(&1));
}

/// A task the provider forgets (its data expired) is lost: the job is submitted
/// again, and the possible double charge is recorded in `show` and `report`.
#[test]
fn an_expired_task_is_resubmitted_and_the_double_charge_recorded() {
    let sim = Sim::start(&["--task-ms", "200"]);
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    config(d);
    csv(
        d,
        &[
            format!(
                "exp,dzine,txt2img,,an owl sim-expire,{},",
                j(
                    serde_json::json!({"style_code": STYLE_S, "target_h": 128, "generate_slots": [1, 0, 0, 0]})
                )
            ),
            format!(
                "fine,dzine,txt2img,,an owl,{},",
                j(
                    serde_json::json!({"style_code": STYLE_S, "target_h": 128, "generate_slots": [0, 1, 0, 0]})
                )
            ),
        ],
    );
    let out = run(&sim, d, Duration::from_secs(40));
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let ledger = sim.ledger();
    let charged = charges(&ledger);
    assert_eq!(
        charged.get("exp"),
        Some(&2),
        "the lost task and its replacement"
    );
    assert_eq!(charged.get("fine"), Some(&1));
    let rows = report(d, &d.join("pixbatch.db"));
    check_outputs(d, &rows, &ledger);
    let row = |id: &str| rows.iter().find(|r| r["id"] == id).unwrap().clone();
    assert_eq!(row("exp")["possible_duplicates"], 1, "{}", row("exp"));
    assert_eq!(row("exp")["submissions"], 2);
    assert_eq!(row("fine")["possible_duplicates"], 0);
    let s = show(&sim, d, "exp");
    assert!(s.contains("no longer finds task"), "{s}");
    assert!(s.to_lowercase().contains("possible duplicate"), "{s}");
}

/// A mixed batch under chaos (429s, 5xx, slow answers, dropped connections,
/// truncated downloads) ends with every job done and every file what was served;
/// every charge beyond one per job is recorded as a possible duplicate.
#[test]
fn a_mixed_batch_under_chaos_finishes() {
    let sim = Sim::start(&[
        "--task-ms",
        "250",
        "--seed",
        "7",
        "--chaos",
        "0.1",
        "--slow-ms",
        "300",
    ]);
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    config(d);
    let mut rows = Vec::new();
    for i in 0..4u8 {
        write_png(
            &d.join(format!("in/p{i}.png")),
            64 + 8 * u32::from(i),
            80,
            i * 40,
        );
    }
    for i in 0..20 {
        let img = format!("in/p{}.png", i % 4);
        let other = format!("in/p{}.png", (i + 1) % 4);
        rows.push(match i % 4 {
            0 => format!("t{i},dzine,txt2img,,a lake {i},{},", j(serde_json::json!({"style_code": STYLE_S, "target_h": 128, "generate_slots": [1, 0, 1, 0]}))),
            1 => format!("i{i},dzine,img2img,{img},a lake {i},{},", j(serde_json::json!({"style_code": STYLE_S, "generate_slots": [0, 1, 0, 0]}))),
            2 => format!("f{i},dzine,face_swap,{img}|{other},,{},", j(serde_json::json!({"generate_slots": [1, 0, 0, 0]}))),
            _ => format!("u{i},dzine,upscale,{img},,{},", j(serde_json::json!({"upscaling_resize": 2}))),
        });
    }
    csv(d, &rows);
    let out = run(&sim, d, Duration::from_secs(55));
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let report_rows = report(d, &d.join("pixbatch.db"));
    assert_eq!(report_rows.len(), 20);
    let ledger = sim.ledger();
    check_outputs(d, &report_rows, &ledger);
    let charged = charges(&ledger);
    for r in &report_rows {
        let id = r["id"].as_str().unwrap();
        let n = charged.get(id).copied().unwrap_or(0);
        let dups = r["possible_duplicates"].as_u64().unwrap();
        assert!(
            n >= 1 && n <= 1 + dups,
            "{id} charged {n} times, {dups} recorded"
        );
    }
    let faults = &sim.stats()["faults"];
    eprintln!("faults injected: {faults}");
    let total: u64 = ["429", "5xx", "reset", "slow", "truncate"]
        .iter()
        .map(|f| faults[f].as_u64().unwrap_or(0))
        .sum();
    assert!(total >= 5, "chaos did not happen: {faults}");
}

/// `pixbatch styles dzine` lists every page, filtered by base model, with the codes a
/// manifest needs; `pixbatch balance dzine` tells the tokens left, which fall as
/// tasks succeed; `run` warns first when the configured cost per job says the
/// balance will not do.
#[test]
fn styles_balance_and_the_low_balance_warning() {
    let sim = Sim::start(&["--task-ms", "200"]);
    let dir = tempfile::tempdir().unwrap();
    let cli = |args: &[&str]| {
        let mut cmd = pixbatch(dir.path());
        sim.env(&mut cmd);
        cmd.args(args).output().unwrap()
    };

    let all = cli(&["styles", "dzine", "--json"]);
    assert!(all.status.success(), "{}", text(&all));
    let styles: Vec<serde_json::Value> = String::from_utf8_lossy(&all.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(styles.len(), 120, "every page is followed");
    assert_eq!(styles[0]["id"], STYLE_S);
    let x = cli(&["styles", "dzine", "--base-model", "X", "--json"]);
    let x: Vec<serde_json::Value> = String::from_utf8_lossy(&x.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert!(!x.is_empty() && x.len() < 120, "{} X styles", x.len());
    assert!(x.iter().all(|s| s["detail"]["base_model"] == "X"), "{x:?}");
    let table = cli(&["styles", "dzine", "--limit", "3"]);
    let table = String::from_utf8_lossy(&table.stdout).into_owned();
    assert_eq!(table.lines().count(), 4, "a header and 3 styles: {table}");
    assert!(table.contains(STYLE_S), "{table}");

    let before = cli(&["balance", "dzine", "--json"]);
    assert!(before.status.success(), "{}", text(&before));
    let before: serde_json::Value = serde_json::from_slice(&before.stdout).unwrap();
    assert_eq!(before["unit"], "tokens");
    let before = before["amount"].as_f64().unwrap();

    config(dir.path());
    let mut toml = std::fs::read_to_string(dir.path().join("pixbatch.toml")).unwrap();
    toml.push_str(&format!("cost_per_job = {}\n", before as u64));
    std::fs::write(dir.path().join("pixbatch.toml"), toml).unwrap();
    csv(
        dir.path(),
        &[
            format!(
                "w1,dzine,txt2img,,a small boat,{},",
                j(
                    serde_json::json!({"style_code": STYLE_S, "target_h": 128, "generate_slots": [1,1,0,0]})
                )
            ),
            format!(
                "w2,dzine,txt2img,,a big boat,{},",
                j(
                    serde_json::json!({"style_code": STYLE_S, "target_h": 128, "generate_slots": [1,0,0,0]})
                )
            ),
        ],
    );
    let out = run(&sim, dir.path(), Duration::from_secs(60));
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("balance looks too low"),
        "2 jobs at {before} each cannot be paid from {before}: {err}"
    );

    let after = cli(&["balance", "dzine"]);
    let after = String::from_utf8_lossy(&after.stdout).into_owned();
    let left: f64 = after
        .trim()
        .strip_prefix("dzine: ")
        .and_then(|s| s.strip_suffix(" tokens"))
        .unwrap_or_else(|| panic!("{after}"))
        .parse()
        .unwrap();
    assert!(
        left < before,
        "three images were paid for: {before} -> {left}"
    );
}

/// Dzine publishes no limit. Against a simulator that allows fewer requests than the
/// client's ceiling, the adaptive gate (halve on 429, creep back) is refused less
/// often than the same run with the rate fixed at the ceiling.
#[test]
fn the_adaptive_rate_backs_off_a_hidden_limit() {
    let run_with = |adaptive: bool| -> (u64, u64) {
        let sim = Sim::start(&["--task-ms", "100", "--limit", "dzine=2/1s"]);
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("pixbatch.toml"),
            format!(
                "[providers.dzine]\nrate_limits = [\"8/1s\"]\nconcurrency = 8\n\
                 poll_interval = \"200ms\"\nmax_attempts = 30\nadaptive = {adaptive}\n"
            ),
        )
        .unwrap();
        let rows: Vec<String> = (0..12)
            .map(|i| {
                format!(
                    "r{i},dzine,txt2img,,boat {i},{},",
                    j(serde_json::json!({"style_code": STYLE_S, "target_h": 128, "generate_slots": [1,0,0,0]}))
                )
            })
            .collect();
        csv(dir.path(), &rows);
        let out = run(&sim, dir.path(), Duration::from_secs(120));
        assert_eq!(out.status.code(), Some(0), "{}", text(&out));
        let stats = sim.stats();
        let refused = stats["violations"]["dzine"].as_u64().unwrap_or(0);
        let metered = sim
            .ledger()
            .iter()
            .filter(|e| e["provider"] == "dzine" && e["metered"] == true)
            .count() as u64;
        (refused, metered)
    };
    let (fixed, fixed_total) = run_with(false);
    let (adaptive, adaptive_total) = run_with(true);
    eprintln!(
        "429s: fixed {fixed} of {fixed_total} requests, adaptive {adaptive} of {adaptive_total}"
    );
    assert!(fixed > 0, "the hidden limit must bite the fixed rate");
    assert!(
        adaptive * 2 <= fixed,
        "adaptive {adaptive} vs fixed {fixed} refusals"
    );
}
