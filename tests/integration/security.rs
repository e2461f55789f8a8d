//! Paths and URLs from the outside (issue 5, item 4): ids and output columns cannot
//! leave the output folder, a result larger than the cap fails its job and leaves
//! nothing behind, plain http to a provider that is not on this machine is refused.
//! (`secrets.rs` covers credentials; `download.rs` and `config.rs` the unit cases.)

use std::time::Duration;

use crate::common::*;

/// Hostile ids and outputs are refused before anything is enqueued, each bad row
/// named with its line; a long but legal output lands inside the folder.
#[test]
fn ids_and_outputs_cannot_leave_the_output_folder() {
    let dir = tempfile::tempdir().unwrap();
    write_png(&dir.path().join("a.png"), 32, 32, 1);
    let long = "n".repeat(201);
    let mut csv = b"id,provider,operation,input,output\n".to_vec();
    let rows: Vec<Vec<u8>> = vec![
        b"ok1,topaz,enhance,a.png,\n".to_vec(),              // line 2
        b"up,topaz,enhance,a.png,../../escape\n".to_vec(),   // 3
        b"abs,topaz,enhance,a.png,/etc/cron.d/x\n".to_vec(), // 4
        b"mid,topaz,enhance,a.png,a/../../b\n".to_vec(),     // 5
        b"nul,topaz,enhance,a.png,x\0y\n".to_vec(),          // 6
        format!("long,topaz,enhance,a.png,d/{long}\n").into_bytes(), // 7
        b"../x,topaz,enhance,a.png,\n".to_vec(),             // 8
        b"a/b,topaz,enhance,a.png,\n".to_vec(),              // 9
        b"bs,topaz,enhance,a.png,..\\..\\x\n".to_vec(),      // 10
        b"drive,topaz,enhance,a.png,C:/x\n".to_vec(),        // 11
    ];
    for r in &rows {
        csv.extend_from_slice(r);
    }
    std::fs::write(dir.path().join("bad.csv"), &csv).unwrap();
    let out = pixbatch(dir.path())
        .args(["enqueue", "bad.csv"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    let stderr = String::from_utf8_lossy(&out.stderr);
    for line in 3..=11 {
        assert!(
            stderr.contains(&format!("bad.csv:{line}:")),
            "line {line} not named: {stderr}"
        );
    }
    assert!(!stderr.contains("bad.csv:2:"), "{stderr}");
    assert!(stderr.contains("nothing was enqueued"), "{stderr}");

    // The longest legal names, nested: inside the folder, whole.
    let sim = Sim::start(&["--task-ms", "100"]);
    let name = "m".repeat(200);
    std::fs::write(
        dir.path().join("good.csv"),
        format!(
            "id,provider,operation,input,output\n{id},topaz,enhance,a.png,{name}/{name}/{name}\n",
            id = "i".repeat(128)
        ),
    )
    .unwrap();
    let mut cmd = pixbatch(dir.path());
    sim.env(&mut cmd);
    cmd.args(["--out", "results", "run", "good.csv"]);
    let out = run_to_end(cmd, Duration::from_secs(60));
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let files = files_ending(&dir.path().join("results"), "");
    assert_eq!(files.len(), 1, "{files:?}");
    assert!(files[0].starts_with(dir.path().join("results").join(&name).join(&name)));
    let outside: Vec<_> = files_ending(dir.path(), ".jpg")
        .into_iter()
        .filter(|f| !f.starts_with(dir.path().join("results")))
        .collect();
    assert!(outside.is_empty(), "{outside:?}");
}

/// `[engine] max_download_bytes` smaller than the result: the job fails with the
/// reason, no file and no `.part` is left, and nothing is fetched twice for it.
#[test]
fn a_result_over_the_size_cap_fails_its_job_and_leaves_nothing() {
    let sim = Sim::start(&["--task-ms", "100"]);
    let dir = tempfile::tempdir().unwrap();
    write_png(&dir.path().join("a.png"), 64, 64, 2);
    std::fs::write(
        dir.path().join("jobs.csv"),
        "id,provider,operation,input,params\n\
         big,topaz,enhance,a.png,\"{\"\"output_width\"\":512}\"\n\
         dz,dzine,upscale,a.png,\"{\"\"upscaling_resize\"\":2}\"\n",
    )
    .unwrap();
    std::fs::write(
        dir.path().join("pixbatch.toml"),
        "[engine]\nmax_download_bytes = 300\n[providers.topaz]\npoll_interval = \"100ms\"\n[providers.dzine]\npoll_interval = \"100ms\"\n",
    )
    .unwrap();
    let mut cmd = pixbatch(dir.path());
    sim.env(&mut cmd);
    cmd.args(["run", "jobs.csv"]);
    let out = run_to_end(cmd, Duration::from_secs(60));
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    for r in report(dir.path(), &dir.path().join("pixbatch.db")) {
        assert_eq!(r["state"], "failed", "{r}");
        let e = r["error"].as_str().unwrap_or("");
        assert!(
            e.contains("download refused") && e.contains("300-byte limit"),
            "{r}"
        );
        assert_eq!(r["attempts"], 0, "failed at once, not retried: {r}");
    }
    let left = files_ending(&dir.path().join("out"), "");
    assert!(left.is_empty(), "{left:?}");
}

/// A provider URL with plain http to another machine is refused before any job is
/// touched, naming the variable's value; https and loopback http are accepted.
#[test]
fn plain_http_to_a_remote_provider_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    write_png(&dir.path().join("a.png"), 32, 32, 1);
    std::fs::write(
        dir.path().join("jobs.csv"),
        "id,provider,operation,input\nj,topaz,enhance,a.png\n",
    )
    .unwrap();
    for url in [
        "http://api.topazlabs.example/image/v1",
        "http://127.0.0.1.nip.io/image/v1",
        "ftp://127.0.0.1/image/v1",
    ] {
        let out = pixbatch(dir.path())
            .env("TOPAZ_API_KEY", "test-topaz-key-123")
            .env("PIXBATCH_TOPAZ_URL", url)
            .args(["run", "jobs.csv"])
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(1), "{url}: {}", text(&out));
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains(url) && stderr.contains("https"), "{stderr}");
        assert!(
            !dir.path().join("pixbatch.db").exists(),
            "{url}: a database was made"
        );
    }
}
