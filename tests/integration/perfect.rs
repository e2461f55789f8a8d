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
        let files: Vec<&str> = row["outputs"].as_str().unwrap().split('|').collect();
        let shas: Vec<&str> = row["sha256"].as_str().unwrap().split('|').collect();
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
