//! Credentials never reach the database, the logs (at any level), the reports, the
//! outputs or a panic message: runs at trace level with known keys, then every file
//! written and everything printed is searched for each secret.

use std::path::Path;
use std::time::Duration;

use crate::common::*;

/// The made-up keys `sim_env` sets.
const KEYS: [&str; 4] = [
    "test-topaz-key-123",
    "test-photio-key-456",
    "test-aithriving-key-789",
    "test-dzine-key-246",
];

/// Every access token the simulator's Perfect hands out starts so.
const PERFECT_TOKEN_PREFIX: &str = "sim-at-";

/// The secrets to look for: the four keys, Perfect's client id and secret (as a
/// whole and as a fragment, in case a message wraps it), and any Perfect token.
fn secrets(sim: &Sim) -> Vec<String> {
    let mut out: Vec<String> = KEYS.iter().map(|k| k.to_string()).collect();
    for (name, value) in &sim.credentials {
        if name.starts_with("PERFECT_") {
            assert!(value.len() >= 16, "{name} is too short to search for");
            out.push(value.clone());
            out.push(value[value.len() / 2..value.len() / 2 + 16].to_string());
        }
    }
    assert_eq!(out.len(), KEYS.len() + 4, "Perfect's credentials not found");
    out.push(PERFECT_TOKEN_PREFIX.to_string());
    out
}

fn check_clean(text: &str, what: &str, secrets: &[String]) {
    for s in secrets {
        assert!(!text.contains(s.as_str()), "{what} contains the secret {s}");
    }
}

/// Every file under `dir`, searched byte for byte (sled's files too).
fn check_files(dir: &Path, secrets: &[String]) -> usize {
    let files = files_ending(dir, "");
    for file in &files {
        let bytes = std::fs::read(file).unwrap();
        check_clean(
            &String::from_utf8_lossy(&bytes),
            &file.display().to_string(),
            secrets,
        );
    }
    files.len()
}

/// With trace logging on and known keys, over all five providers (jobs that succeed,
/// jobs the provider refuses, Perfect's token auth, Dzine's uploads and face
/// detection, the styles and balance commands), no secret appears in anything
/// pixbatch prints or writes.
#[test]
fn credentials_never_reach_logs_database_or_reports() {
    let sim = Sim::start(&["--task-ms", "100"]);
    let secrets = secrets(&sim);
    let dir = tempfile::tempdir().unwrap();
    write_png(&dir.path().join("a.png"), 32, 32, 9);
    write_png(&dir.path().join("face.png"), 64, 64, 3);
    std::fs::write(
        dir.path().join("jobs.csv"),
        "id,provider,operation,input,prompt,params\n\
         k1,topaz,enhance,a.png,,\n\
         k2,topaz,enhance-sync,a.png,,\n\
         k3,photio,upscale,a.png,,\n\
         k4,aithriving,img2img,a.png,a fox,\"{\"\"width\"\":320,\"\"height\"\":320}\"\n\
         k5,aithriving,img2img,a.png,sim-nsfw,\"{\"\"width\"\":320,\"\"height\"\":320}\"\n\
         k6,perfect,background-removal,a.png,,\n\
         k7,perfect,photo-enhance,a.png,,\"{\"\"scale\"\":2}\"\n\
         k8,dzine,txt2img,,a harbour,\"{\"\"style_code\"\":\"\"Style-7feccf2b-f2ad-43a6-89cb-354fb5d928d2\"\",\"\"target_h\"\":128,\"\"generate_slots\"\":[1,0,0,0]}\"\n\
         k9,dzine,upscale,a.png,,\"{\"\"upscaling_resize\"\":2}\"\n\
         k10,dzine,face_swap,face.png|a.png,,\"{\"\"generate_slots\"\":[1,0,0,0]}\"\n\
         k11,dzine,txt2img,,sim-fail,\"{\"\"style_code\"\":\"\"Style-7feccf2b-f2ad-43a6-89cb-354fb5d928d2\"\",\"\"target_h\"\":128,\"\"generate_slots\"\":[1,0,0,0]}\"\n",
    )
    .unwrap();
    let mut cmd = pixbatch(dir.path());
    sim.env(&mut cmd);
    // Everything at trace level but sled's page cache, which only slows the run.
    cmd.env("RUST_LOG", "trace,sled=info")
        .args(["run", "jobs.csv"]);
    let out = run_to_end(cmd, Duration::from_secs(120));
    // k5 and k11 fail on purpose (the simulator's triggers), so the run exits 2.
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    let logs = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        logs.lines().count() > 100,
        "trace logging produced too little to mean anything"
    );
    // The run did use Perfect's token auth: it finished Perfect jobs.
    let rows = report(dir.path(), &dir.path().join("pixbatch.db"));
    for id in ["k1", "k2", "k3", "k4", "k6", "k7", "k8", "k9", "k10"] {
        let r = rows.iter().find(|r| r["id"] == id).unwrap();
        assert_eq!(r["state"], "done", "{r}");
    }
    check_clean(&logs, "the run's logs", &secrets);

    let mut printed = 0;
    for args in [
        vec!["report"],
        vec!["report", "--format", "jsonl"],
        vec!["report", "-o", "report.csv"],
        vec!["show", "k5"],
        vec!["show", "k11", "--json"],
        vec!["show", "k6"],
        vec!["list", "--json"],
        vec!["status", "--json"],
        vec!["styles", "dzine", "--limit", "3"],
        vec!["balance", "dzine"],
        vec!["styles", "perfect", "hair-style", "--limit", "3"],
    ] {
        let mut cmd = pixbatch(dir.path());
        sim.env(&mut cmd);
        let o = cmd
            .env("RUST_LOG", "trace,sled=info")
            .args(&args)
            .output()
            .unwrap();
        assert!(o.status.success(), "{args:?}: {}", text(&o));
        check_clean(
            &String::from_utf8_lossy(&o.stdout),
            &format!("{args:?}"),
            &secrets,
        );
        check_clean(
            &String::from_utf8_lossy(&o.stderr),
            &format!("{args:?} stderr"),
            &secrets,
        );
        printed += o.stdout.len();
    }
    assert!(
        printed > 1000,
        "the commands printed too little to mean anything"
    );
    // The database folder, the outputs, the report file, the manifest's folder.
    let files = check_files(dir.path(), &secrets);
    assert!(files > 15, "only {files} files written");
    assert!(dir.path().join("report.csv").is_file());
}

/// `pixbatch demo` at trace level: its folder (database, manifest, inputs), the
/// outputs and its logs hold none of the keys it uses, the Perfect credentials of
/// its simulator, or a Perfect token.
#[test]
fn the_demo_writes_no_credentials() {
    // The demo's simulator has the default seed, so the same Perfect credentials
    // as a default `pixbatch sim`.
    let reference = Sim::start(&[]);
    let mut secrets: Vec<String> = ["topaz", "photio", "aithriving", "dzine", "perfect"]
        .iter()
        .map(|k| format!("demo-{k}-key"))
        .collect();
    secrets.extend(
        reference
            .credentials
            .iter()
            .filter(|(n, _)| n.starts_with("PERFECT_"))
            .map(|(_, v)| v.clone()),
    );
    secrets.push(PERFECT_TOKEN_PREFIX.to_string());
    drop(reference);

    let dir = tempfile::tempdir().unwrap();
    let mut cmd = pixbatch(dir.path());
    cmd.env("RUST_LOG", "trace,sled=info").arg("demo");
    let out = run_to_end(cmd, Duration::from_secs(180));
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let logs = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(logs.lines().count() > 100, "too little logging");
    check_clean(&logs, "the demo's logs", &secrets);
    let files = check_files(dir.path(), &secrets);
    assert!(
        dir.path().join("pixbatch-demo/pixbatch.db").is_dir() && files > 20,
        "{files} files"
    );
}

/// A panic's message goes through the scrubbing hook (test builds can be asked to
/// panic with a given message).
#[test]
fn a_panic_message_is_scrubbed() {
    let sim = Sim::start(&[]);
    let secrets = secrets(&sim);
    let dir = tempfile::tempdir().unwrap();
    let mut cmd = pixbatch(dir.path());
    sim.env(&mut cmd);
    let secret = sim
        .credentials
        .iter()
        .find(|(n, _)| n == "PERFECT_CLIENT_SECRET")
        .map(|(_, v)| v.clone())
        .unwrap();
    let out = cmd
        .env(
            "PIXBATCH_DEBUG_PANIC",
            format!("header Bearer test-dzine-key-246, secret {secret}, key test-topaz-key-123"),
        )
        .args(["status"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(101), "{}", text(&out));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("header Bearer <redacted>, secret <redacted>, key <redacted>")
            && stderr.contains("internal error"),
        "{stderr}"
    );
    check_clean(&stderr, "the panic message", &secrets);
}
