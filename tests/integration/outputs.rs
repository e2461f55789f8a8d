//! No paid result is ever overwritten: rows writing one file are refused before
//! anything is enqueued, a run never replaces a file that is not its job's, and
//! `pixbatch verify` finds missing, changed and foreign files.

use std::path::Path;
use std::time::Duration;

use crate::common::*;

fn write(dir: &Path, name: &str, rows: &[&str]) {
    let mut text = String::from("id,provider,operation,input,output\n");
    for r in rows {
        text.push_str(r);
        text.push('\n');
    }
    std::fs::write(dir.join(name), text).unwrap();
}

fn stderr(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn stdout(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn run(sim: &Sim, dir: &Path, args: &[&str]) -> std::process::Output {
    let mut cmd = pixbatch(dir);
    cmd.args(args);
    sim.env(&mut cmd);
    run_to_end(cmd, Duration::from_secs(120))
}

#[test]
fn rows_that_write_one_file_are_refused_naming_both_lines_and_nothing_is_enqueued() {
    let sim = Sim::start(&[]);
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    write_png(&d.join("in/a.png"), 32, 32, 1);
    write(
        d,
        "jobs.csv",
        &[
            "good,topaz,enhance,in/a.png,",
            "first,topaz,enhance,in/a.png,pics/x",
            "second,topaz,enhance,in/a.png,pics/x",
            // Numbered outputs of `first` (pics/x_0, pics/x_1 …) meet this one.
            "third,topaz,enhance,in/a.png,pics/x_1",
        ],
    );
    let validate = run(&sim, d, &["validate", "--offline", "jobs.csv"]);
    assert_eq!(validate.status.code(), Some(1), "{}", text(&validate));
    let e = stderr(&validate);
    assert!(
        e.contains("jobs.csv:4: output pics/x resolves to the same file as the row at jobs.csv:3"),
        "{e}"
    );
    assert!(
        e.contains(
            "jobs.csv:5: output pics/x_1 resolves to the same file as the row at jobs.csv:3"
        ),
        "{e}"
    );

    let ran = run(&sim, d, &["run", "jobs.csv"]);
    assert_eq!(ran.status.code(), Some(1), "{}", text(&ran));
    assert!(stderr(&ran)
        .contains("jobs.csv:4: output pics/x resolves to the same file as the row at jobs.csv:3"));
    assert!(
        stderr(&ran).contains("nothing was enqueued"),
        "{}",
        text(&ran)
    );
    assert!(report(d, &d.join("pixbatch.db")).is_empty());
    assert!(sim.ledger().is_empty(), "{:?}", sim.ledger());
    assert!(files_ending(&d.join("out"), "").is_empty());

    // Two manifests of one command; letter case folded.
    write(d, "one.csv", &["a,topaz,enhance,in/a.png,Pics/Y"]);
    write(d, "two.csv", &["b,topaz,enhance,in/a.png,pics/y"]);
    let both = run(&sim, d, &["enqueue", "one.csv", "two.csv"]);
    assert_eq!(both.status.code(), Some(1), "{}", text(&both));
    assert!(
        stderr(&both).contains("two.csv:2: output pics/y resolves to the same file as the row at one.csv:2 (the names differ only in letter case"),
        "{}",
        text(&both)
    );

    // A new row against a job already in the database (enqueue and validate alike).
    let first = run(&sim, d, &["enqueue", "one.csv"]);
    assert!(first.status.success(), "{}", text(&first));
    write(d, "later.csv", &["c,topaz,enhance,in/a.png,pics/"]);
    write(
        d,
        "clash.csv",
        &[
            "c,topaz,enhance,in/a.png,Pics/a",
            "d,topaz,enhance,in/a.png,Pics/Y",
        ],
    );
    for args in [
        &["validate", "--offline", "clash.csv"][..],
        &["enqueue", "clash.csv"],
    ] {
        let out = run(&sim, d, args);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {}", text(&out));
        assert!(
            stderr(&out).contains("clash.csv:3: output Pics/Y resolves to the same file as job \"a\" in the database (from one.csv:2)"),
            "{args:?}: {}",
            text(&out)
        );
    }
    let rows = report(d, &d.join("pixbatch.db"));
    assert_eq!(rows.len(), 1, "{rows:?}");
    assert!(run(&sim, d, &["enqueue", "later.csv"]).status.success());

    // `--update`: a new version's name (a.v2) is checked too.
    write(
        d,
        "upd.csv",
        &[
            "a,topaz,enhance,in/a.png,Pics/Y2",
            "e,topaz,enhance,in/a.png,pics/y2.v2",
        ],
    );
    let out = run(&sim, d, &["enqueue", "--update", "upd.csv"]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(
        stderr(&out).contains("upd.csv:3: output pics/y2.v2 resolves to the same file as the new version (--update) of the row at upd.csv:2"),
        "{}",
        text(&out)
    );
    assert!(sim.ledger().is_empty());
}

#[test]
fn verify_passes_after_a_run_and_finds_changed_deleted_and_foreign_files() {
    let sim = Sim::start(&[]);
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    for i in 0..3 {
        write_png(&d.join(format!("in/{i}.png")), 32, 32, i as u8);
    }
    write(
        d,
        "jobs.csv",
        &[
            "j0,topaz,enhance,in/0.png,",
            "j1,topaz,enhance,in/1.png,sub/",
            "j2,topaz,enhance,in/2.png,sub/two",
        ],
    );
    let ran = run(&sim, d, &["run", "jobs.csv"]);
    assert!(ran.status.success(), "{}", text(&ran));
    let ok = run(&sim, d, &["verify"]);
    assert_eq!(ok.status.code(), Some(0), "{}", text(&ok));
    assert_eq!(stdout(&ok), "");
    assert!(
        stderr(&ok).contains("3 file(s) of 3 done job(s)"),
        "{}",
        text(&ok)
    );
    assert!(stderr(&ok).contains("all in place"), "{}", text(&ok));

    let rows = report(d, &d.join("pixbatch.db"));
    let file = |id: &str| {
        let r = rows.iter().find(|r| r["id"] == id).unwrap();
        (joined(&r["outputs"]), joined(&r["sha256"]))
    };
    let (p0, _) = file("j0");
    let (p1, sha1) = file("j1");
    let (p2, _) = file("j2");
    assert!(
        p1.starts_with("sub/j1.") && p2.starts_with("sub/two."),
        "{p1} {p2}"
    );
    // A disk incident: one file changed, one gone, one nobody wrote.
    std::fs::write(d.join("out").join(&p1), b"not the result").unwrap();
    std::fs::remove_file(d.join("out").join(&p2)).unwrap();
    std::fs::write(d.join("out/sub/stray.png"), b"x").unwrap();
    let bad = run(&sim, d, &["verify"]);
    assert_eq!(bad.status.code(), Some(1), "{}", text(&bad));
    let changed = hex::encode(<sha2::Sha256 as sha2::Digest>::digest(b"not the result"));
    let mut lines: Vec<String> = stdout(&bad).lines().map(str::to_string).collect();
    lines.sort();
    assert_eq!(
        lines,
        vec![
            "-: out/sub/stray.png: foreign file".to_string(),
            format!("j1: out/{p1}: changed (sha256 recorded {sha1}, file {changed})"),
            format!("j2: out/{p2}: missing"),
        ],
        "{}",
        text(&bad)
    );
    assert!(stderr(&bad).contains("1 missing, 1 changed, 1 foreign file(s)"));

    let json = run(&sim, d, &["verify", "--json"]);
    assert_eq!(json.status.code(), Some(1), "{}", text(&json));
    let doc: serde_json::Value = serde_json::from_slice(&json.stdout).unwrap();
    assert_eq!(doc["ok"], false);
    assert_eq!(doc["done_jobs"], 3);
    let kinds: Vec<&str> = doc["problems"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["problem"].as_str().unwrap())
        .collect();
    assert_eq!(kinds.len(), 3, "{doc}");
    for k in ["changed", "missing", "foreign"] {
        assert!(kinds.contains(&k), "{doc}");
    }
    // Untouched: j0's file is not among the problems.
    assert!(!stdout(&bad).contains(&p0));
}

#[test]
fn a_run_never_replaces_a_file_it_did_not_write_and_keeps_its_own_result_aside() {
    let sim = Sim::start(&[]);
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    write_png(&d.join("in/a.png"), 32, 32, 1);
    write_png(&d.join("in/b.png"), 40, 40, 9);
    write(d, "a.csv", &["one,topaz,enhance,in/a.png,pics/x"]);
    write(d, "b.csv", &["two,topaz,enhance,in/b.png,pics/x"]);
    // Two databases sharing one --out: the second cannot know the first's jobs.
    let first = run(&sim, d, &["--db", "a.db", "run", "a.csv"]);
    assert!(first.status.success(), "{}", text(&first));
    let theirs = report(d, &d.join("a.db"));
    let path = joined(&theirs[0]["outputs"]);
    let sha = joined(&theirs[0]["sha256"]);
    let second = run(&sim, d, &["--db", "b.db", "run", "b.csv"]);
    assert_eq!(second.status.code(), Some(2), "{}", text(&second));
    assert_eq!(sha256_file(&d.join("out").join(&path)), sha, "replaced");
    let ours = report(d, &d.join("b.db"));
    assert_eq!(ours[0]["state"], "failed", "{ours:?}");
    let error = ours[0]["error"].as_str().unwrap();
    assert!(
        error.contains(&format!("output {path} is already there")),
        "{error}"
    );
    let kept = files_ending(&d.join("out/pics"), "")
        .into_iter()
        .find(|p| p.to_string_lossy().contains(".kept-two."))
        .unwrap_or_else(|| panic!("no kept file: {error}"));
    let kept_name = kept.file_name().unwrap().to_string_lossy().into_owned();
    assert!(
        error.contains(&format!("kept as pics/{kept_name}")),
        "{error}"
    );
    // What the simulator served for `two` is whole in the side file.
    let served: Vec<String> = sim
        .ledger()
        .iter()
        .filter(|e| {
            e["request_key"]
                .as_str()
                .is_some_and(|k| job_of_key(k) == "two")
        })
        .filter_map(|e| e["output_sha256"].as_str().map(str::to_string))
        .collect();
    assert!(served.contains(&sha256_file(&kept)), "{served:?}");
    // The first database's files are all in place; the side file is foreign to it.
    let v = run(&sim, d, &["--db", "a.db", "verify"]);
    assert_eq!(v.status.code(), Some(1), "{}", text(&v));
    assert_eq!(
        stdout(&v),
        format!("-: out/pics/{kept_name}: foreign file\n"),
        "{}",
        text(&v)
    );
}

/// `verify` looks where each job wrote its files: a run with `--out elsewhere` is
/// checked without being told `--out` again.
#[test]
fn verify_finds_the_files_where_the_run_wrote_them() {
    let sim = Sim::start(&[]);
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    write_png(&d.join("in/a.png"), 32, 32, 5);
    write(
        d,
        "jobs.csv",
        &[
            "one,topaz,enhance,in/a.png,",
            "two,photio,upscale,in/a.png,",
        ],
    );
    let out = run(&sim, d, &["--out", "elsewhere", "run", "jobs.csv"]);
    assert!(out.status.success(), "{}", text(&out));

    let ok = pixbatch(d).arg("verify").output().unwrap();
    assert_eq!(ok.status.code(), Some(0), "{}", text(&ok));
    assert!(
        stderr(&ok).contains("2 file(s) of 2 done job(s)"),
        "{}",
        text(&ok)
    );
    assert!(stderr(&ok).contains("elsewhere"), "{}", text(&ok));

    let files = files_ending(&d.join("elsewhere"), "");
    assert_eq!(files.len(), 2, "{files:?}");
    std::fs::write(&files[0], b"changed after the run").unwrap();
    let bad = pixbatch(d).arg("verify").output().unwrap();
    assert_eq!(bad.status.code(), Some(1), "{}", text(&bad));
    assert_eq!(stdout(&bad).lines().count(), 1, "{}", text(&bad));
    assert!(stdout(&bad).contains("changed"), "{}", text(&bad));
    // Told another folder, it looks there: both files are missing from ./out.
    let other = pixbatch(d)
        .args(["--out", "out", "verify"])
        .output()
        .unwrap();
    assert_eq!(other.status.code(), Some(1));
    assert_eq!(
        stdout(&other)
            .lines()
            .filter(|l| l.contains("missing"))
            .count(),
        2,
        "{}",
        text(&other)
    );
}
