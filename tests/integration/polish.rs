//! The smaller things of issue 12, point 11: messages that say what is wrong once and
//! plainly, help texts that tell what to type, history in time order.

use std::path::Path;
use std::time::Duration;

use crate::common::*;

fn stdout(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn stderr(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn help(dir: &Path, args: &[&str]) -> String {
    let out = pixbatch(dir).args(args).arg("--help").output().unwrap();
    assert!(out.status.success(), "{}", text(&out));
    stdout(&out)
}

/// `--help` lists the exit codes (top level and `run`), every positional argument has
/// a help text, and `--state` names its values.
#[test]
fn help_tells_exit_codes_arguments_and_states() {
    let dir = tempfile::tempdir().unwrap();
    for args in [&[][..], &["run"][..]] {
        let h = help(dir.path(), args);
        assert!(h.contains("Exit codes:"), "{args:?}: {h}");
        for code in ["0 ", "1 ", "2 ", "3 ", "4 ", "130 "] {
            assert!(
                h.lines().any(|l| l.trim_start().starts_with(code)),
                "{args:?}: no exit code {code}: {h}"
            );
        }
    }
    for cmd in [
        "run",
        "enqueue",
        "validate",
        "show",
        "cancel",
        "retry",
        "styles",
        "balance",
        "completions",
    ] {
        let h = help(dir.path(), &[cmd]);
        let args: Vec<&str> = h
            .split("Arguments:")
            .nth(1)
            .unwrap_or_else(|| panic!("{cmd}: no arguments section: {h}"))
            .split("Options:")
            .next()
            .unwrap()
            .lines()
            .filter(|l| !l.trim().is_empty())
            .collect();
        assert!(!args.is_empty(), "{cmd}: {h}");
        for line in args {
            // "  <NAME>...  the help text": a name with nothing after it has no help.
            let t = line.trim();
            let after = t.split_once("  ").map(|(_, h)| h.trim()).unwrap_or("");
            assert!(!after.is_empty(), "{cmd}: argument without help: {line:?}");
        }
    }
    let list = help(dir.path(), &["list"]);
    for state in [
        "queued",
        "preparing",
        "submitting",
        "submitted",
        "polling",
        "downloading",
        "retry-wait",
        "done",
        "failed",
        "cancelled",
    ] {
        assert!(list.contains(state), "list --help lacks {state}: {list}");
    }
    let retry = help(dir.path(), &["retry"]);
    assert!(
        retry.contains("[possible values: failed, cancelled]"),
        "{retry}"
    );
}

/// `[{…},]` is refused naming the trailing comma, not "expected a JSON object".
#[test]
fn a_trailing_comma_in_a_json_array_is_named() {
    let dir = tempfile::tempdir().unwrap();
    write_png(&dir.path().join("a.png"), 16, 16, 1);
    std::fs::write(
        dir.path().join("jobs.json"),
        "[\n{\"id\":\"a\",\"provider\":\"topaz\",\"operation\":\"enhance\",\"input\":\"a.png\"},\n]\n",
    )
    .unwrap();
    let out = pixbatch(dir.path())
        .args(["validate", "--offline", "jobs.json"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(
        stderr(&out).contains("line 3: trailing comma"),
        "{}",
        text(&out)
    );
}

/// `10/1min` is "unknown unit", not "not a whole number".
#[test]
fn an_unknown_rate_limit_unit_is_named() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("pixbatch.toml"),
        "[providers.topaz]\nrate_limits = [\"10/1min\"]\n",
    )
    .unwrap();
    let out = pixbatch(dir.path()).arg("config").output().unwrap();
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(
        stderr(&out).contains("unknown unit \"min\""),
        "{}",
        text(&out)
    );
}

/// A refused Perfect key pair is named once: "perfect: the authentication was
/// refused: … (check …)", never "perfect: perfect:" or the hint twice. And a cost
/// that is unknown says why once, not "credits unknown: unknown:".
#[test]
fn prefixes_are_not_doubled() {
    let sim = Sim::start(&["--task-ms", "50"]);
    let dir = tempfile::tempdir().unwrap();
    write_png(&dir.path().join("a.png"), 32, 32, 1);
    std::fs::write(
        dir.path().join("jobs.csv"),
        "id,provider,operation,input,params\np,perfect,photo-enhance,a.png,\"{\"\"scale\"\":2}\"\n",
    )
    .unwrap();
    let mut cmd = pixbatch(dir.path());
    sim.env(&mut cmd);
    cmd.env("PERFECT_CLIENT_ID", "invalid-client")
        .args(["run", "jobs.csv"]);
    let out = run_to_end(cmd, Duration::from_secs(60));
    // A refused credential halts its provider (exit 5, docs/operations.md).
    assert_eq!(out.status.code(), Some(5), "{}", text(&out));
    let err = stderr(&out);
    assert!(
        err.contains("(the authentication was refused: HTTP 401"),
        "{}",
        text(&out)
    );
    assert!(!err.contains("perfect: perfect"), "{}", text(&out));
    // Said when it happens and again in the summary; each time the hint once.
    let lines: Vec<&str> = err
        .lines()
        .filter(|l| l.contains("(check PERFECT_CLIENT_ID"))
        .collect();
    assert!(!lines.is_empty(), "{err}");
    for line in lines {
        assert_eq!(
            line.matches("(check PERFECT_CLIENT_ID").count(),
            1,
            "{line}"
        );
    }

    // Topaz without a key: its estimate needs one (`validate` refuses a missing key,
    // so the preview of `run --dry-run` shows the cost line).
    std::fs::write(
        dir.path().join("t.csv"),
        "id,provider,operation,input,params\nt,topaz,enhance,a.png,\n",
    )
    .unwrap();
    let mut cmd = pixbatch(dir.path());
    sim.env(&mut cmd);
    cmd.env_remove("TOPAZ_API_KEY")
        .args(["run", "--dry-run", "t.csv"]);
    let out = run_to_end(cmd, Duration::from_secs(60));
    let said = stdout(&out);
    assert!(
        said.contains("credits unknown: its estimate needs a key (TOPAZ_API_KEY)"),
        "{}",
        text(&out)
    );
    assert!(!said.contains("unknown: unknown"), "{}", text(&out));
}

/// `--max-credits` with a price nobody knows (Perfect without `cost_per_job`) stops
/// the provider and says the price, not the cap, is the reason: in the plan, in the
/// summary and in the closing advice.
#[test]
fn max_credits_names_an_unknown_price_as_the_reason() {
    let sim = Sim::start(&["--task-ms", "50"]);
    let dir = tempfile::tempdir().unwrap();
    write_png(&dir.path().join("a.png"), 32, 32, 1);
    std::fs::write(
        dir.path().join("jobs.csv"),
        "id,provider,operation,input,params\np,perfect,photo-enhance,a.png,\"{\"\"scale\"\":2}\"\n",
    )
    .unwrap();
    let mut cmd = pixbatch(dir.path());
    sim.env(&mut cmd);
    cmd.args(["run", "--dry-run", "--max-credits", "10", "jobs.csv"]);
    let plan = run_to_end(cmd, Duration::from_secs(60));
    assert!(
        stdout(&plan).contains("the work's cost is unknown (perfect's API does not tell"),
        "{}",
        text(&plan)
    );

    let mut cmd = pixbatch(dir.path());
    sim.env(&mut cmd);
    cmd.args(["run", "--max-credits", "10", "jobs.csv"]);
    let out = run_to_end(cmd, Duration::from_secs(60));
    assert_eq!(out.status.code(), Some(4), "{}", text(&out));
    let summary = stdout(&out);
    assert!(
        summary.contains("perfect 0 of 10 credits (0 this run), stopped: a job's price is unknown"),
        "{}",
        text(&out)
    );
    assert!(!summary.contains("cap reached"), "{}", text(&out));
    assert!(
        stderr(&out).contains("because its price is unknown"),
        "{}",
        text(&out)
    );
    assert!(
        sim.ledger().iter().all(|e| e["charged"] != true),
        "nothing was submitted"
    );
}

/// After `run --update`, `show` lists the job's history oldest first, beginning with
/// the first version's enqueue (not the new version's, dated after everything).
#[test]
fn events_are_in_time_order_after_an_update() {
    let sim = Sim::start(&["--task-ms", "50"]);
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    write_png(&d.join("a.png"), 32, 32, 1);
    let run = |csv: &str, update: bool| {
        std::fs::write(d.join("jobs.csv"), csv).unwrap();
        let mut cmd = pixbatch(d);
        sim.env(&mut cmd);
        cmd.arg("run");
        if update {
            cmd.arg("--update");
        }
        cmd.arg("jobs.csv");
        let out = run_to_end(cmd, Duration::from_secs(60));
        assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    };
    run(
        "id,provider,operation,input,params\nv,topaz,enhance,a.png,\n",
        false,
    );
    run(
        "id,provider,operation,input,params\nv,topaz,enhance,a.png,\"{\"\"output_width\"\":64}\"\n",
        true,
    );
    let out = pixbatch(d).args(["show", "v", "--json"]).output().unwrap();
    assert!(out.status.success(), "{}", text(&out));
    let detail: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let events = detail["events"].as_array().unwrap();
    let times: Vec<u64> = events
        .iter()
        .map(|e| e["at_ms"].as_u64().unwrap())
        .collect();
    assert!(
        times.windows(2).all(|w| w[0] <= w[1]),
        "not in time order: {events:#?}"
    );
    assert_eq!(events[0]["kind"], "enqueued", "{events:#?}");
    let enqueues = events.iter().filter(|e| e["kind"] == "enqueued").count();
    assert_eq!(
        enqueues, 2,
        "the first version's and the update's: {events:#?}"
    );
    assert_eq!(
        events.iter().filter(|e| e["kind"] == "done").count(),
        2,
        "{events:#?}"
    );
}
