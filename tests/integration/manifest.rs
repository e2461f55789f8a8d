use std::time::Duration;

use crate::common::*;

/// A manifest with bad rows enqueues nothing and names every bad line.
#[test]
fn bad_rows_enqueue_nothing_and_every_bad_line_is_named() {
    let dir = tempfile::tempdir().unwrap();
    write_png(&dir.path().join("a.png"), 32, 32, 1);
    let csv = "id,provider,operation,input,prompt,params,output\n\
               ok1,topaz,enhance,a.png,,,\n\
               bad-creativity,topaz,enhance-gen,a.png,,\"{\"\"model\"\":\"\"Redefine\"\",\"\"creativity\"\":10}\",\n\
               ok2,photio,upscale,a.png,,,\n\
               bad-size,aithriving,img2img,a.png,cat,\"{\"\"width\"\":300,\"\"height\"\":512}\",\n\
               bad-provider,midjourney,imagine,a.png,,,\n\
               bad-input,photio,upscale,missing.png,,,\n\
               bad-upscale,photio,upscale,a.png,,\"{\"\"upscale_by\"\":3}\",\n\
               bad-output,topaz,enhance,a.png,,,../../etc/x\n\
               ok1,topaz,enhance,a.png,,\"{\"\"model\"\":\"\"CGI\"\"}\",\n";
    std::fs::write(dir.path().join("jobs.csv"), csv).unwrap();

    for command in ["validate", "enqueue", "run"] {
        let out = pixbatch(dir.path())
            .args([command, "jobs.csv"])
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(1), "{command}: {}", text(&out));
        let err = String::from_utf8_lossy(&out.stderr);
        for line in [3, 5, 6, 7, 8, 9, 10] {
            assert!(
                err.contains(&format!("jobs.csv:{line}:")),
                "{command}: line {line} not named:\n{err}"
            );
        }
        for line in [2, 4] {
            assert!(
                !err.contains(&format!("jobs.csv:{line}:")),
                "{command}: good line {line} named:\n{err}"
            );
        }
        assert!(
            err.contains("jobs.csv:2"),
            "the duplicate id must name its first line:\n{err}"
        );
    }
    // Nothing was enqueued.
    let status = pixbatch(dir.path())
        .args(["status", "--json"])
        .output()
        .unwrap();
    assert!(status.status.success(), "{}", text(&status));
    let s: serde_json::Value = serde_json::from_slice(&status.stdout).unwrap();
    assert_eq!(s["total"], 0, "{s}");
}

/// validate prints the plan; enqueueing twice adds nothing the second time; a
/// re-run of a finished manifest sends no request.
#[test]
fn enqueue_is_idempotent_and_a_rerun_does_only_what_is_missing() {
    let sim = Sim::start(&["--task-ms", "100"]);
    let dir = tempfile::tempdir().unwrap();
    write_png(&dir.path().join("a.png"), 32, 32, 1);
    let csv = "provider,operation,input,prompt,params\n\
               topaz,enhance,a.png,,\n\
               photio,upscale,a.png,,\n\
               aithriving,img2img,a.png,a dog,\"{\"\"width\"\":320,\"\"height\"\":320}\"\n\
               photio,upscale,a.png,,\n";
    std::fs::write(dir.path().join("jobs.csv"), csv).unwrap();

    // With the keys: a provider without one is an error of `validate`.
    let mut validate = pixbatch(dir.path());
    sim.env(&mut validate);
    let plan = validate.args(["validate", "jobs.csv"]).output().unwrap();
    assert!(plan.status.success(), "{}", text(&plan));
    let stdout = String::from_utf8_lossy(&plan.stdout);
    assert!(
        stdout.contains("3 jobs") && stdout.contains("1 repeated"),
        "{stdout}"
    );
    assert!(
        stdout.contains("topaz") && stdout.contains("least time"),
        "{stdout}"
    );

    for expected in ["3 new jobs", "0 new jobs"] {
        let out = pixbatch(dir.path())
            .args(["enqueue", "jobs.csv"])
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", text(&out));
        assert!(
            String::from_utf8_lossy(&out.stderr).contains(expected),
            "{}",
            text(&out)
        );
    }
    let mut cmd = pixbatch(dir.path());
    sim.env(&mut cmd);
    cmd.args(["run", "jobs.csv"]);
    let out = run_to_end(cmd, Duration::from_secs(60));
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let requests = sim.ledger().len();

    let mut cmd = pixbatch(dir.path());
    sim.env(&mut cmd);
    cmd.args(["run", "jobs.csv"]);
    let out = run_to_end(cmd, Duration::from_secs(60));
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    assert_eq!(
        sim.ledger().len(),
        requests,
        "a re-run of a finished manifest sent requests"
    );

    // report: CSV with a header and one line per job.
    let csv = pixbatch(dir.path()).args(["report"]).output().unwrap();
    let text_csv = String::from_utf8_lossy(&csv.stdout);
    assert!(
        text_csv.starts_with("id,provider,operation,input,prompt,params,output,state"),
        "{text_csv}"
    );
    assert_eq!(text_csv.lines().count(), 4);
}
