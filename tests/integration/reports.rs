//! Reports a person can use (issue 12, points 6 and 7): every report carries the
//! manifest row (prompt, params as objects in JSON, extra columns), outputs and
//! hashes as lists, pixel sizes; `report` and `show` find the files where the run
//! put them; a CSV report of the failures is a manifest `run` accepts elsewhere.

use std::path::Path;
use std::time::Duration;

use crate::common::*;

fn go(sim: &Sim, dir: &Path, args: &[&str]) -> std::process::Output {
    let mut cmd = pixbatch(dir);
    sim.env(&mut cmd);
    cmd.args(args);
    run_to_end(cmd, Duration::from_secs(120))
}

fn lines(out: &std::process::Output) -> Vec<serde_json::Value> {
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect()
}

fn read_csv(path: &Path) -> Vec<std::collections::HashMap<String, String>> {
    let mut r = csv::Reader::from_path(path).unwrap();
    let header: Vec<String> = r.headers().unwrap().iter().map(str::to_string).collect();
    r.records()
        .map(|rec| {
            header
                .iter()
                .cloned()
                .zip(rec.unwrap().iter().map(str::to_string))
                .collect()
        })
        .collect()
}

#[test]
fn reports_carry_the_row_lists_pixel_sizes_and_find_the_files_without_out() {
    let sim = Sim::start(&["--task-ms", "100"]);
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    write_png(&d.join("a.png"), 48, 40, 3);
    write_png(&d.join("b.png"), 30, 20, 9);
    std::fs::write(
        d.join("jobs.csv"),
        "id,provider,operation,input,prompt,params,sku,notes\n\
         up-a,photio,upscale,a.png,,,SKU-1,\"first, with a comma\"\n\
         enh-b,aithriving,img2img,b.png,sharper please,\"{\"\"width\"\":320,\"\"height\"\":384}\",SKU-2,\n\
         bad,aithriving,img2img,a.png,sim-nsfw,\"{\"\"width\"\":320,\"\"height\"\":320}\",SKU-3,refused\n",
    )
    .unwrap();
    // The extra columns validate.
    let out = go(&sim, d, &["validate", "--offline", "jobs.csv"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    // The run writes elsewhere than the default `out`.
    let out = go(&sim, d, &["--out", "elsewhere", "run", "jobs.csv"]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(!d.join("out").exists());

    // JSON Lines, picked from the extension, no --out.
    let out = pixbatch(d)
        .args(["report", "-o", "r.jsonl"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
    let rows: Vec<serde_json::Value> = std::fs::read_to_string(d.join("r.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(rows.len(), 3);
    let row = |id: &str| rows.iter().find(|r| r["id"] == id).unwrap().clone();
    let enh = row("enh-b");
    assert_eq!(enh["state"], "done", "{enh}");
    assert_eq!(enh["prompt"], "sharper please");
    assert_eq!(
        enh["params"],
        serde_json::json!({"width": 320, "height": 384})
    );
    assert_eq!(enh["metadata"], serde_json::json!({"sku": "SKU-2"}));
    assert_eq!(
        row("up-a")["metadata"],
        serde_json::json!({"sku": "SKU-1", "notes": "first, with a comma"})
    );
    assert_eq!(row("bad")["metadata"]["notes"], "refused");
    assert_eq!(row("bad")["params"]["width"], 320);
    for id in ["up-a", "enh-b"] {
        let r = row(id);
        let outputs = r["outputs"].as_array().unwrap();
        let hashes = r["sha256"].as_array().unwrap();
        let pixels = r["pixels"].as_array().unwrap();
        assert_eq!(outputs.len(), 1, "{r}");
        assert_eq!(hashes.len(), 1, "{r}");
        let out_dir = r["out_dir"].as_str().unwrap();
        assert_eq!(
            Path::new(out_dir),
            d.join("elsewhere").canonicalize().unwrap()
        );
        let file = Path::new(out_dir).join(outputs[0].as_str().unwrap());
        assert_eq!(sha256_file(&file), hashes[0].as_str().unwrap(), "{r}");
        let (w, h) = image::image_dimensions(&file).unwrap();
        assert_eq!(pixels[0], format!("{w}x{h}"), "{r}");
    }
    assert_eq!(row("bad")["outputs"], serde_json::json!([]));

    // CSV: the manifest's columns, the extra ones, then the report's.
    let out = pixbatch(d)
        .args(["report", "-o", "r.csv"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
    let csv_rows = read_csv(&d.join("r.csv"));
    let up = csv_rows.iter().find(|r| r["id"] == "up-a").unwrap();
    assert_eq!(up["sku"], "SKU-1");
    assert_eq!(up["notes"], "first, with a comma");
    assert_eq!(up["state"], "done");
    assert!(up["pixels"].contains('x'), "{up:?}");
    let enh_csv = csv_rows.iter().find(|r| r["id"] == "enh-b").unwrap();
    assert_eq!(enh_csv["prompt"], "sharper please");
    assert_eq!(enh_csv["params"], r#"{"height":384,"width":320}"#);

    // HTML from the extension, without --out: the outputs are previewed from
    // where the run put them.
    let out = pixbatch(d)
        .args(["report", "-o", "r.html"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
    let page = std::fs::read_to_string(d.join("r.html")).unwrap();
    assert!(page.starts_with("<!DOCTYPE html>"));
    let start = page
        .find("<script id=\"jobs-data\" type=\"application/json\">")
        .unwrap();
    let rest = &page[start..];
    let json = &rest[rest.find('>').unwrap() + 1..rest.find("</script>").unwrap()];
    let cards: Vec<serde_json::Value> = serde_json::from_str(json).unwrap();
    for id in ["up-a", "enh-b"] {
        let c = cards.iter().find(|c| c["id"] == id).unwrap();
        let o = &c["outputs"][0];
        assert!(
            o["src"]
                .as_str()
                .is_some_and(|s| s.starts_with("data:image/")),
            "no preview of {id}'s output: {o}"
        );
        assert!(o["size"].as_str().is_some_and(|s| s.contains('×')), "{o}");
    }
    assert!(page.contains("SKU-1"), "the metadata is on the page");

    // show: the files' full paths, without --out.
    let out = pixbatch(d)
        .args(["show", "up-a", "--json"])
        .output()
        .unwrap();
    let detail: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let file = detail["files"][0].as_str().unwrap();
    assert_eq!(sha256_file(Path::new(file)), detail["outputs"][0]["sha256"]);
    let out = pixbatch(d).args(["show", "up-a"]).output().unwrap();
    let human = String::from_utf8_lossy(&out.stdout);
    assert!(human.contains(file), "{human}");
    assert!(human.contains("sku:") && human.contains("SKU-1"), "{human}");

    // --format still wins over the extension; --state filters.
    let out = pixbatch(d)
        .args(["report", "--format", "jsonl", "--state", "failed"])
        .output()
        .unwrap();
    let failed = lines(&out);
    assert_eq!(failed.len(), 1);
    assert_eq!(failed[0]["id"], "bad");
}

#[test]
fn a_csv_report_of_the_failures_runs_as_a_manifest_elsewhere() {
    // Every other request fails with a 5xx; with one attempt allowed those jobs
    // fail for good.
    let sim = Sim::start(&["--task-ms", "50", "--seed", "7", "--chaos-5xx", "0.5"]);
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let mut csv = String::from("id,provider,operation,input,customer\n");
    for i in 0..10 {
        write_png(&d.join(format!("in/p{i}.png")), 32, 24, i as u8);
        csv.push_str(&format!("p{i},photio,upscale,in/p{i}.png,cust-{i}\n"));
    }
    std::fs::write(d.join("jobs.csv"), csv).unwrap();
    std::fs::write(
        d.join("pixbatch.toml"),
        "[providers.photio]\nmax_attempts = 1\n",
    )
    .unwrap();
    let out = go(&sim, d, &["run", "jobs.csv"]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    let all = report(d, &d.join("pixbatch.db"));
    let failed: Vec<String> = all
        .iter()
        .filter(|r| r["state"] == "failed")
        .map(|r| r["id"].as_str().unwrap().to_string())
        .collect();
    let done = all.iter().filter(|r| r["state"] == "done").count();
    assert!(
        !failed.is_empty() && done > 0,
        "chaos gave {done} done, {failed:?} failed"
    );

    let out = pixbatch(d)
        .args([
            "report", "--format", "csv", "--state", "failed", "-o", "redo.csv",
        ])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
    let redo = d.join("redo.csv");
    assert_eq!(read_csv(&redo).len(), failed.len());

    // Elsewhere: a fresh folder, a simulator without faults, the file as it is.
    let sim2 = Sim::start(&["--task-ms", "50"]);
    let fresh = tempfile::tempdir().unwrap();
    let f = fresh.path();
    let out = go(&sim2, f, &["validate", "--offline", redo.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let out = go(&sim2, f, &["run", redo.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let again = report(f, &f.join("pixbatch.db"));
    let mut ids: Vec<String> = again
        .iter()
        .map(|r| r["id"].as_str().unwrap().to_string())
        .collect();
    ids.sort();
    let mut want = failed.clone();
    want.sort();
    assert_eq!(ids, want, "the redo ran exactly the failed jobs");
    for r in &again {
        assert_eq!(r["state"], "done", "{r}");
        let id = r["id"].as_str().unwrap();
        // The user's column came along; the old run's state and error did not.
        assert_eq!(
            r["metadata"],
            serde_json::json!({"customer": format!("cust-{}", &id[1..])}),
            "{r}"
        );
        assert!(r["error"].is_null(), "{r}");
        assert!(f.join("out").join(joined(&r["outputs"])).is_file(), "{r}");
    }
    // The new simulator saw those jobs only.
    let sent: std::collections::BTreeSet<String> = sim2
        .ledger()
        .iter()
        .filter_map(|e| e["request_key"].as_str().map(|k| job_of_key(k).to_string()))
        .collect();
    assert_eq!(sent.into_iter().collect::<Vec<_>>(), want);
}

#[test]
fn a_near_typo_of_a_known_column_is_refused_with_a_suggestion() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    write_png(&d.join("a.png"), 16, 16, 1);
    std::fs::write(
        d.join("jobs.csv"),
        "id,provider,operation,input,promt,sku\nx,topaz,enhance,a.png,a cat,S1\n",
    )
    .unwrap();
    for args in [
        &["validate", "--offline", "jobs.csv"][..],
        &["enqueue", "jobs.csv"],
    ] {
        let out = pixbatch(d).args(args).output().unwrap();
        assert_eq!(out.status.code(), Some(1), "{args:?}: {}", text(&out));
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("\"promt\": did you mean prompt?"), "{err}");
        assert!(!err.contains("sku"), "{err}");
    }
    assert!(
        pixbatch(d)
            .args(["list", "--json"])
            .output()
            .unwrap()
            .stdout
            .is_empty(),
        "nothing was enqueued"
    );
}

/// A job record written by the pixbatch before this change (record format 1; the
/// bytes are the format-1 code's own, as in the store's unit test).
const V1_JOB: &str = "01056f6c642d31030775707363616c6501092f696e2f612e706e67010561206361740b7b227363616c65223a327d0105636174732f455b843d26cf8da3d8b4f2789601ff632a3d5aefe7cb278ad2108107979d39a8056d2e6373760707000102010675706c6f616403752d39000104722d343202000a687474703a2f2f782f7903706e6702036a706701000e636174732f6f6c642d312e706e67fbd20440616261626162616261626162616261626162616261626162616261626162616261626162616261626162616261626162616261626162616261626162616261620000fd0068e5cf8b01000001fde86be5cf8b01000001fdd06fe5cf8b010000fdd06fe5cf8b010000";

#[test]
fn a_database_of_the_previous_format_opens_and_reports() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    write_png(&d.join("a.png"), 16, 16, 1);
    std::fs::write(
        d.join("jobs.csv"),
        "id,provider,operation,input\nnew-1,topaz,enhance,a.png\n",
    )
    .unwrap();
    let out = pixbatch(d).args(["enqueue", "jobs.csv"]).output().unwrap();
    assert!(out.status.success(), "{}", text(&out));
    // Made into a format-1 database holding a format-1 job record.
    {
        let db = sled::open(d.join("pixbatch.db")).unwrap();
        db.open_tree("meta")
            .unwrap()
            .insert("format", &[1u8])
            .unwrap();
        db.open_tree("jobs")
            .unwrap()
            .insert("old-1", hex::decode(V1_JOB).unwrap())
            .unwrap();
        db.flush().unwrap();
    }
    let out = pixbatch(d)
        .args(["show", "old-1", "--json"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
    let detail: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(detail["row"]["state"], "done");
    assert_eq!(
        detail["row"]["outputs"],
        serde_json::json!(["cats/old-1.png"])
    );
    assert_eq!(detail["row"]["metadata"], serde_json::json!({}));
    // No folder recorded then: the default one.
    assert_eq!(detail["files"][0], "out/cats/old-1.png");
    let rows = report(d, &d.join("pixbatch.db"));
    assert_eq!(rows.len(), 2);
    let old = rows.iter().find(|r| r["id"] == "old-1").unwrap();
    assert_eq!(old["pixels"], serde_json::json!([null]), "{old}");
    assert!(old["out_dir"].is_null());
    // Marked format 2 by the open, for an older pixbatch to refuse cleanly.
    let db = sled::open(d.join("pixbatch.db")).unwrap();
    let format = db
        .open_tree("meta")
        .unwrap()
        .get("format")
        .unwrap()
        .unwrap();
    assert_eq!(format.to_vec(), vec![pixbatch::store::FORMAT_VERSION]);
}
