use std::time::Duration;

use crate::common::*;

/// With trace logging on and known keys, no key appears in anything pixbatch
/// writes: logs, the database, the reports, the outputs.
#[test]
fn credentials_never_reach_logs_database_or_reports() {
    let sim = Sim::start(&["--task-ms", "100"]);
    let dir = tempfile::tempdir().unwrap();
    write_png(&dir.path().join("a.png"), 32, 32, 9);
    std::fs::write(
        dir.path().join("jobs.csv"),
        "id,provider,operation,input,prompt,params\n\
         k1,topaz,enhance,a.png,,\n\
         k2,topaz,enhance-sync,a.png,,\n\
         k3,photio,upscale,a.png,,\n\
         k4,aithriving,img2img,a.png,a fox,\"{\"\"width\"\":320,\"\"height\"\":320}\"\n\
         k5,aithriving,img2img,a.png,sim-nsfw,\"{\"\"width\"\":320,\"\"height\"\":320}\"\n",
    )
    .unwrap();
    let mut cmd = pixbatch(dir.path());
    sim.env(&mut cmd);
    // Everything at trace level but sled's page cache, which only slows the run.
    cmd.env("RUST_LOG", "trace,sled=info")
        .args(["run", "jobs.csv"]);
    let out = run_to_end(cmd, Duration::from_secs(60));
    // k5 fails on purpose (the simulator's NSFW trigger), so the run exits 2.
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    let logs = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        logs.lines().count() > 20,
        "trace logging produced too little to mean anything"
    );

    for args in [
        vec!["report"],
        vec!["report", "--format", "jsonl"],
        vec!["show", "k5"],
        vec!["list", "--json"],
    ] {
        let o = pixbatch(dir.path()).args(&args).output().unwrap();
        assert!(o.status.success(), "{}", text(&o));
        check_clean(&String::from_utf8_lossy(&o.stdout), &format!("{args:?}"));
    }
    check_clean(&logs, "the run's logs");
    for file in files_ending(dir.path(), "") {
        let bytes = std::fs::read(&file).unwrap();
        check_clean(
            &String::from_utf8_lossy(&bytes),
            &file.display().to_string(),
        );
    }
}

fn check_clean(text: &str, what: &str) {
    for key in [
        "test-topaz-key-123",
        "test-photio-key-456",
        "test-aithriving-key-789",
    ] {
        assert!(!text.contains(key), "{what} contains the key {key}");
    }
}
