//! What operators run overnight and from cron: the cost preview and the spend cap,
//! reprocessing (`--update`, `retry` filters, `--retry-failed`), `--wait-lock`,
//! `--on-finish`, `--quiet`, and the shell commands (`doctor`, `config`,
//! `completions`, `man`).

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::common::*;

const AIT_PARAMS: &str = "\"{\"\"width\"\":320,\"\"height\"\":320}\"";

fn write(dir: &Path, name: &str, text: &str) {
    std::fs::write(dir.join(name), text).unwrap();
}

fn cmd(sim: &Sim, dir: &Path, args: &[&str]) -> Command {
    let mut c = pixbatch(dir);
    sim.env(&mut c);
    c.args(args);
    c
}

fn go(sim: &Sim, dir: &Path, args: &[&str]) -> std::process::Output {
    run_to_end(cmd(sim, dir, args), Duration::from_secs(90))
}

fn stdout(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn stderr(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Ledger entries of `endpoint`.
fn calls(sim: &Sim, endpoint: &str) -> Vec<serde_json::Value> {
    sim.ledger()
        .into_iter()
        .filter(|e| e["endpoint"] == endpoint)
        .collect()
}

/// The jobs charged by the simulator, by submit key.
fn charged_keys(sim: &Sim) -> Vec<String> {
    let mut keys: Vec<String> = sim
        .ledger()
        .into_iter()
        .filter(|e| e["charged"] == true)
        .filter_map(|e| e["request_key"].as_str().map(str::to_string))
        .collect();
    keys.sort();
    keys
}

fn states(dir: &Path) -> Vec<(String, String)> {
    let mut rows: Vec<(String, String)> = report(dir, &dir.join("pixbatch.db"))
        .iter()
        .map(|r| {
            (
                r["id"].as_str().unwrap_or("").to_string(),
                r["state"].as_str().unwrap_or("").to_string(),
            )
        })
        .collect();
    rows.sort();
    rows
}

/// Five Topaz jobs of one credit each (the simulator's estimate and charge for a
/// small picture): a cap of 3 submits exactly the first three, in queue order,
/// finishes them and exits 4; the same cap again spends nothing more; a cap of 5
/// does the rest. One estimate request serves all five (one parameter set).
#[test]
fn the_spend_cap_stops_at_the_right_job_and_holds_across_runs() {
    let sim = Sim::start(&["--task-ms", "100"]);
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    write_png(&d.join("a.png"), 32, 32, 1);
    let mut csv = String::from("id,provider,operation,input\n");
    for i in 0..5 {
        csv.push_str(&format!("j{i},topaz,enhance,a.png\n"));
    }
    write(d, "jobs.csv", &csv);

    let first = go(&sim, d, &["run", "jobs.csv", "--max-credits", "topaz=3"]);
    assert_eq!(first.status.code(), Some(4), "{}", text(&first));
    assert!(
        stdout(&first).contains("topaz 3 of 3 credits (3 this run), cap reached"),
        "{}",
        text(&first)
    );
    assert!(
        stderr(&first).contains("the next job, j3, at 1 credits"),
        "{}",
        text(&first)
    );
    let expect_done = |upto: usize| -> Vec<(String, String)> {
        (0..5)
            .map(|i| {
                let s = if i < upto { "done" } else { "queued" };
                (format!("j{i}"), s.to_string())
            })
            .collect()
    };
    assert_eq!(states(d), expect_done(3));
    assert_eq!(charged_keys(&sim), vec!["j0~1", "j1~1", "j2~1"]);
    assert_eq!(
        calls(&sim, "estimate").len(),
        1,
        "one estimate per parameter set"
    );

    // The spend survives the restart: the same cap submits nothing more.
    let again = go(&sim, d, &["run", "jobs.csv", "--max-credits", "topaz=3"]);
    assert_eq!(again.status.code(), Some(4), "{}", text(&again));
    assert_eq!(charged_keys(&sim).len(), 3, "{}", text(&again));
    assert_eq!(states(d), expect_done(3));

    let rest = go(&sim, d, &["run", "--max-credits", "5"]);
    assert_eq!(rest.status.code(), Some(0), "{}", text(&rest));
    assert_eq!(states(d), expect_done(5));
    assert_eq!(charged_keys(&sim).len(), 5);
}

/// `validate` prices the new jobs: one estimate per distinct parameter set
/// (here two input sizes), the document's bound for AIThriving, "unknown" with
/// what to set for Photio; `--offline` asks nothing; `run --dry-run` enqueues
/// and sends nothing and shows the cap's verdict.
#[test]
fn validate_and_dry_run_preview_the_cost() {
    let sim = Sim::start(&["--task-ms", "100"]);
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    write_png(&d.join("small.png"), 32, 32, 1);
    write_png(&d.join("wide.png"), 64, 32, 2);
    let mut csv = String::from("id,provider,operation,input,prompt,params\n");
    for i in 0..4 {
        let img = if i % 2 == 0 { "small.png" } else { "wide.png" };
        csv.push_str(&format!("t{i},topaz,enhance,{img},,\n"));
    }
    csv.push_str("p0,photio,upscale,small.png,,\n");
    csv.push_str(&format!(
        "a0,aithriving,img2img,small.png,a dog,{AIT_PARAMS}\n"
    ));
    write(d, "jobs.csv", &csv);

    let offline = go(&sim, d, &["validate", "--offline", "jobs.csv"]);
    assert!(offline.status.success(), "{}", text(&offline));
    assert!(
        sim.ledger().is_empty(),
        "--offline asked: {:?}",
        sim.ledger()
    );
    assert!(
        stdout(&offline)
            .contains("credits unknown: its estimate is a request, not made with --offline"),
        "{}",
        text(&offline)
    );

    let out = go(&sim, d, &["validate", "jobs.csv"]);
    assert!(out.status.success(), "{}", text(&out));
    let s = stdout(&out);
    assert!(
        s.contains(
            "4 jobs  ≈ 4 credits  (topaz estimate: 2 request(s) for 2 distinct parameter set(s))"
        ),
        "{s}"
    );
    assert!(
        s.contains("photio")
            && s.contains(
                "credits unknown: photio's API does not tell; set [providers.photio] cost_per_job"
            ),
        "{s}"
    );
    assert!(
        s.contains("≈ 2 credits  (at most 2 per job by aithriving's document"),
        "{s}"
    );
    assert_eq!(calls(&sim, "estimate").len(), 2);

    let dry = go(
        &sim,
        d,
        &["run", "--dry-run", "--max-credits", "topaz=3", "jobs.csv"],
    );
    assert!(dry.status.success(), "{}", text(&dry));
    assert!(
        stdout(&dry).contains("--max-credits  topaz       3 credits: 3 left; the work needs ≈ 4"),
        "{}",
        text(&dry)
    );
    assert!(
        calls(&sim, "enhance_async").is_empty() && calls(&sim, "upscale").is_empty(),
        "a dry run submitted work"
    );
    let list = go(&sim, d, &["list", "--json"]);
    assert!(
        stdout(&list).trim().is_empty(),
        "a dry run enqueued: {}",
        text(&list)
    );

    // A configured price wins over the estimate, and needs no request.
    write(
        d,
        "pixbatch.toml",
        "[providers.topaz]\ncost_per_job = 2.5\n",
    );
    let before = calls(&sim, "estimate").len();
    let priced = go(&sim, d, &["validate", "jobs.csv"]);
    assert!(
        stdout(&priced).contains("≈ 10 credits  (4 × cost_per_job 2.5 (configured))"),
        "{}",
        text(&priced)
    );
    assert_eq!(calls(&sim, "estimate").len(), before);
}

/// A changed row is refused without `--update` (with a hint); with it, the job
/// becomes version 2: the first version's file stays as it was, the second goes
/// to `<id>.v2.<ext>` under a new submit key, and `show` tells both.
#[test]
fn update_makes_a_second_version_and_keeps_the_first_files() {
    let sim = Sim::start(&["--task-ms", "100"]);
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    write_png(&d.join("a.png"), 32, 32, 1);
    write(
        d,
        "jobs.csv",
        "id,provider,operation,input,params\nv,topaz,enhance,a.png,\nw,topaz,enhance,a.png,\n",
    );
    let first = go(&sim, d, &["run", "jobs.csv"]);
    assert_eq!(first.status.code(), Some(0), "{}", text(&first));
    let v1 = files_ending(&d.join("out"), ".jpg")
        .into_iter()
        .find(|p| p.file_name().is_some_and(|n| n == "v.jpg"))
        .expect("v.jpg");
    let v1_sha = sha256_file(&v1);

    // Same rows again: nothing is sent.
    let charged = charged_keys(&sim).len();
    let same = go(&sim, d, &["run", "jobs.csv"]);
    assert_eq!(same.status.code(), Some(0), "{}", text(&same));
    assert_eq!(charged_keys(&sim).len(), charged);

    write(
        d,
        "jobs.csv",
        "id,provider,operation,input,params\nv,topaz,enhance,a.png,\"{\"\"output_width\"\":64}\"\nw,topaz,enhance,a.png,\n",
    );
    let refused = go(&sim, d, &["enqueue", "jobs.csv"]);
    assert_eq!(refused.status.code(), Some(1), "{}", text(&refused));
    assert!(
        stderr(&refused).contains("add --update"),
        "{}",
        text(&refused)
    );

    let updated = go(&sim, d, &["run", "--update", "jobs.csv"]);
    assert_eq!(updated.status.code(), Some(0), "{}", text(&updated));
    assert!(
        stderr(&updated).contains("1 job(s) became a new version"),
        "{}",
        text(&updated)
    );
    assert_eq!(sha256_file(&v1), v1_sha, "version 1's file was touched");
    let v2 = d.join("out/v.v2.jpg");
    assert!(v2.is_file(), "no {}", v2.display());
    let keys = charged_keys(&sim);
    assert!(keys.contains(&"v~2".to_string()), "{keys:?}");
    assert!(
        !keys.iter().any(|k| k.starts_with("w~2")),
        "w was redone: {keys:?}"
    );

    let show = go(&sim, d, &["show", "v", "--json"]);
    assert!(show.status.success(), "{}", text(&show));
    let detail: serde_json::Value = serde_json::from_slice(&show.stdout).unwrap();
    assert_eq!(detail["row"]["state"], "done");
    assert_eq!(detail["row"]["outputs"], serde_json::json!(["v.v2.jpg"]));
    assert_eq!(detail["versions"][0]["version"], 1);
    assert_eq!(
        detail["versions"][0]["job"]["outputs"],
        serde_json::json!(["v.jpg"])
    );
    assert_eq!(
        detail["versions"][0]["job"]["sha256"],
        serde_json::json!([v1_sha.as_str()])
    );
    let human = go(&sim, d, &["show", "v"]);
    assert!(
        stdout(&human).contains("version 2 from jobs.csv:2 replaces version 1"),
        "{}",
        text(&human)
    );
}

/// Two AIThriving jobs fail as NSFW, one Photio job fails as its input is gone,
/// one job is cancelled: each filter picks exactly its jobs, and they combine.
#[test]
fn retry_filters_pick_the_right_jobs() {
    let sim = Sim::start(&["--task-ms", "100"]);
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    write_png(&d.join("a.png"), 32, 32, 1);
    // Deleted after it is enqueued: the job fails when it is sent.
    write_png(&d.join("gone.png"), 32, 32, 2);
    write(
        d,
        "jobs.csv",
        &format!(
            "id,provider,operation,input,prompt,params\n\
             n1,aithriving,img2img,a.png,sim-nsfw one,{AIT_PARAMS}\n\
             n2,aithriving,img2img,a.png,sim-nsfw two,{AIT_PARAMS}\n\
             big,photio,upscale,gone.png,,\n\
             ok,topaz,enhance,a.png,,\n\
             c1,photio,upscale,a.png,,\n"
        ),
    );
    let enq = go(&sim, d, &["enqueue", "jobs.csv"]);
    assert!(enq.status.success(), "{}", text(&enq));
    std::fs::remove_file(d.join("gone.png")).unwrap();
    let cancel = go(&sim, d, &["cancel", "c1"]);
    assert!(cancel.status.success(), "{}", text(&cancel));
    let run = go(&sim, d, &["run"]);
    assert_eq!(run.status.code(), Some(2), "{}", text(&run));

    let picked = |args: &[&str]| -> Vec<String> {
        let mut full = vec!["retry", "--dry-run"];
        full.extend_from_slice(args);
        let out = go(&sim, d, &full);
        assert!(out.status.success(), "{full:?}: {}", text(&out));
        let mut ids: Vec<String> = stdout(&out)
            .lines()
            .filter_map(|l| l.split('\t').next().map(str::to_string))
            .collect();
        ids.sort();
        ids
    };
    assert_eq!(picked(&["--failed"]), vec!["big", "n1", "n2"]);
    assert_eq!(picked(&["--error", "nsfw"]), vec!["n1", "n2"]);
    assert_eq!(picked(&["--provider", "photio"]), vec!["big"]);
    assert_eq!(
        picked(&["--state", "cancelled", "--provider", "photio"]),
        vec!["c1"]
    );
    assert_eq!(
        picked(&["--state", "failed", "--state", "cancelled"]),
        vec!["big", "c1", "n1", "n2"]
    );
    assert_eq!(
        picked(&["--since", "1h", "--error", "NSFW", "n2", "big"]),
        vec!["n2"]
    );
    assert!(picked(&["--since", "2099-01-01"]).is_empty());
    assert!(picked(&[
        "--failed",
        "--since",
        "2000-01-01T00:00:00Z",
        "--provider",
        "topaz"
    ])
    .is_empty());

    let bad = go(&sim, d, &["retry", "--state", "done"]);
    assert_eq!(bad.status.code(), Some(1), "{}", text(&bad));

    // The real thing: only the picked job is queued again.
    let real = go(&sim, d, &["retry", "--provider", "photio"]);
    assert!(
        stdout(&real).contains("1 job(s) requeued"),
        "{}",
        text(&real)
    );
    let now: Vec<(String, String)> = states(d);
    assert!(now.contains(&("big".into(), "queued".into())), "{now:?}");
    assert!(now.contains(&("n1".into(), "failed".into())), "{now:?}");
    assert!(now.contains(&("c1".into(), "cancelled".into())), "{now:?}");
}

/// Re-running a manifest sends only what is missing; `--retry-failed` sends the
/// failed job again and nothing else.
#[test]
fn rerun_does_only_what_is_missing_or_failed() {
    let sim = Sim::start(&["--task-ms", "100"]);
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    write_png(&d.join("a.png"), 32, 32, 1);
    write(
        d,
        "jobs.csv",
        &format!(
            "id,provider,operation,input,prompt,params\n\
             good,aithriving,img2img,a.png,a cat,{AIT_PARAMS}\n\
             bad,aithriving,img2img,a.png,sim-nsfw,{AIT_PARAMS}\n"
        ),
    );
    let sent = |sim: &Sim, id: &str| {
        calls(sim, "image_to_image")
            .iter()
            .filter(|e| {
                e["request_key"]
                    .as_str()
                    .is_some_and(|k| job_of_key(k) == id)
            })
            .count()
    };
    let first = go(&sim, d, &["run", "jobs.csv"]);
    assert_eq!(first.status.code(), Some(2), "{}", text(&first));
    assert_eq!((sent(&sim, "good"), sent(&sim, "bad")), (1, 1));

    let again = go(&sim, d, &["run", "jobs.csv"]);
    assert_eq!(again.status.code(), Some(2), "{}", text(&again));
    assert_eq!(
        (sent(&sim, "good"), sent(&sim, "bad")),
        (1, 1),
        "nothing is redone"
    );

    let retried = go(&sim, d, &["run", "--retry-failed", "jobs.csv"]);
    assert_eq!(retried.status.code(), Some(2), "{}", text(&retried));
    assert_eq!(
        (sent(&sim, "good"), sent(&sim, "bad")),
        (1, 2),
        "only the failed one"
    );
}

/// A run started while another holds the database waits with `--wait-lock`, then
/// does its work; with a wait too short it exits 3 naming the holder.
#[test]
fn wait_lock_waits_then_runs() {
    let sim = Sim::start(&["--task-ms", "3000"]);
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    write_png(&d.join("a.png"), 32, 32, 1);
    write(
        d,
        "first.csv",
        "id,provider,operation,input\nf1,topaz,enhance,a.png\n",
    );
    write(
        d,
        "second.csv",
        "id,provider,operation,input\ns1,topaz,enhance,a.png\n",
    );
    write(
        d,
        "pixbatch.toml",
        "[providers.topaz]\npoll_interval = \"300ms\"\n",
    );
    let mut holder = cmd(&sim, d, &["run", "first.csv"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while pixbatch_lock_holder(d).is_none() {
        assert!(
            Instant::now() < deadline,
            "the first run never took the lock"
        );
        std::thread::sleep(Duration::from_millis(50));
    }

    let t = Instant::now();
    let short = go(&sim, d, &["run", "second.csv", "--wait-lock", "1"]);
    assert_eq!(short.status.code(), Some(3), "{}", text(&short));
    assert!(
        stderr(&short).contains("gave up after waiting 1 s"),
        "{}",
        text(&short)
    );
    assert!(
        stderr(&short).contains("pixbatch run (pid"),
        "{}",
        text(&short)
    );
    assert!(t.elapsed() >= Duration::from_millis(900));

    let waited = go(&sim, d, &["run", "second.csv", "--wait-lock", "60"]);
    let holder_status = holder.wait().unwrap();
    assert_eq!(holder_status.code(), Some(0));
    assert_eq!(waited.status.code(), Some(0), "{}", text(&waited));
    assert!(
        stderr(&waited).contains("waiting up to 60 s"),
        "{}",
        text(&waited)
    );
    assert_eq!(
        states(d),
        vec![("f1".into(), "done".into()), ("s1".into(), "done".into())]
    );
}

fn pixbatch_lock_holder(dir: &Path) -> Option<String> {
    let text = std::fs::read_to_string(dir.join("pixbatch.db.lock")).ok()?;
    text.contains("run").then_some(text)
}

/// `--on-finish` runs after the database is let go, with the summary in its
/// environment, for a run that did its work and for one that could not start.
#[test]
fn on_finish_sees_the_summary() {
    let sim = Sim::start(&["--task-ms", "100"]);
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    write_png(&d.join("a.png"), 32, 32, 1);
    write(
        d,
        "jobs.csv",
        &format!(
            "id,provider,operation,input,prompt,params\n\
             good,aithriving,img2img,a.png,a cat,{AIT_PARAMS}\n\
             bad,aithriving,img2img,a.png,sim-nsfw,{AIT_PARAMS}\n"
        ),
    );
    let hook = format!(
        "env | grep '^PIXBATCH_' > hook.env; '{}' status --json > status.json",
        bin().display()
    );
    let out = go(
        &sim,
        d,
        &["run", "jobs.csv", "--quiet", "--on-finish", &hook],
    );
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    let env = std::fs::read_to_string(d.join("hook.env")).expect("the hook ran");
    for line in [
        "PIXBATCH_EXIT_CODE=2",
        "PIXBATCH_DONE=1",
        "PIXBATCH_FAILED=1",
        "PIXBATCH_UNFINISHED=0",
        "PIXBATCH_FINISHED_THIS_RUN=2",
        "PIXBATCH_INTERRUPTED=0",
        "PIXBATCH_CREDIT_CAP_REACHED=0",
        "PIXBATCH_CREDITS_THIS_RUN=aithriving=4",
        "PIXBATCH_SUMMARY=1 done, 1 failed, 0 cancelled, 0 unfinished (2 finished by this run)",
        "PIXBATCH_ERROR=",
    ] {
        assert!(env.lines().any(|l| l == line), "no {line} in\n{env}");
    }
    // The hook could read the database: the run had let it go.
    let status: serde_json::Value =
        serde_json::from_slice(&std::fs::read(d.join("status.json")).unwrap()).unwrap();
    assert_eq!(status["total"], 2);

    let failed = go(
        &sim,
        d,
        &[
            "run",
            "missing.csv",
            "--on-finish",
            "env | grep '^PIXBATCH_' > hook2.env",
        ],
    );
    assert_eq!(failed.status.code(), Some(1), "{}", text(&failed));
    let env = std::fs::read_to_string(d.join("hook2.env")).expect("the hook ran");
    assert!(env.contains("PIXBATCH_EXIT_CODE=1"), "{env}");
    assert!(
        env.lines()
            .any(|l| l.starts_with("PIXBATCH_ERROR=") && l.contains("missing.csv")),
        "{env}"
    );
}

/// `--quiet` prints the summary only; without a terminal nothing draws a bar or
/// colours, quiet or not.
#[test]
fn quiet_prints_only_the_summary_and_nothing_draws_without_a_terminal() {
    let sim = Sim::start(&["--task-ms", "100"]);
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    write_png(&d.join("a.png"), 32, 32, 1);
    write(
        d,
        "a.csv",
        "id,provider,operation,input\nq1,topaz,enhance,a.png\n",
    );
    write(
        d,
        "b.csv",
        "id,provider,operation,input\nq2,topaz,enhance,a.png\n",
    );
    let quiet = go(&sim, d, &["run", "a.csv", "--quiet"]);
    assert_eq!(quiet.status.code(), Some(0), "{}", text(&quiet));
    assert_eq!(
        stdout(&quiet),
        "1 done, 0 failed, 0 cancelled, 0 unfinished (1 finished by this run)\n"
    );
    assert_eq!(stderr(&quiet), "", "quiet wrote to stderr");

    let loud = go(&sim, d, &["run", "b.csv"]);
    assert_eq!(loud.status.code(), Some(0), "{}", text(&loud));
    let err = stderr(&loud);
    assert!(err.contains("new jobs enqueued"), "{err}");
    assert!(
        !err.contains('\r') && !err.contains('\u{1b}'),
        "a bar or colours without a terminal: {err:?}"
    );
}

/// `doctor` passes with the simulator's keys, names a refused key and an
/// unreachable URL, refuses plain http to a remote host, and skips providers
/// without credentials.
#[test]
fn doctor_names_a_wrong_key_and_passes_with_the_right_ones() {
    let sim = Sim::start(&["--task-ms", "100"]);
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let good = go(&sim, d, &["doctor"]);
    assert_eq!(good.status.code(), Some(0), "{}", text(&good));
    for p in ["dzine", "perfect", "topaz", "photio", "aithriving"] {
        assert!(
            stdout(&good)
                .lines()
                .any(|l| l.starts_with("ok") && l.contains(p)),
            "{p} not ok:\n{}",
            text(&good)
        );
    }
    assert!(calls(&sim, "enhance_async").is_empty() && charged_keys(&sim).is_empty());

    let mut wrong = cmd(&sim, d, &["doctor"]);
    wrong.env("TOPAZ_API_KEY", "invalid-key-123").env(
        "PIXBATCH_PHOTIO_URL",
        format!("http://127.0.0.1:{}/photio/v1", free_port()),
    );
    let out = run_to_end(wrong, Duration::from_secs(60));
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    let s = stdout(&out);
    assert!(
        s.lines().any(|l| l.starts_with("FAIL")
            && l.contains("topaz")
            && l.contains("the key was refused (401)")),
        "{s}"
    );
    assert!(
        s.lines()
            .any(|l| l.starts_with("FAIL") && l.contains("photio") && l.contains("unreachable")),
        "{s}"
    );
    assert!(
        s.lines()
            .any(|l| l.starts_with("ok") && l.contains("dzine")),
        "{s}"
    );

    let mut remote = cmd(&sim, d, &["doctor"]);
    remote.env("PIXBATCH_TOPAZ_URL", "http://example.com/topaz");
    let out = run_to_end(remote, Duration::from_secs(30));
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(
        stderr(&out).contains("plain http to a host that is not loopback"),
        "{}",
        text(&out)
    );

    let none = run_to_end(
        {
            let mut c = pixbatch(d);
            c.arg("doctor");
            c
        },
        Duration::from_secs(30),
    );
    assert_eq!(none.status.code(), Some(1), "{}", text(&none));
    assert!(stdout(&none).contains("not configured"), "{}", text(&none));
}

/// `config` shows where values came from and never a secret.
#[test]
fn config_redacts_secrets() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    write(
        d,
        "pixbatch.toml",
        "[providers.photio]\napi_key = \"file-secret-photio-999\"\nconcurrency = 2\n",
    );
    let mut c = pixbatch(d);
    c.env("TOPAZ_API_KEY", "env-secret-topaz-123")
        .env("PERFECT_CLIENT_SECRET", "env-secret-perfect-456")
        .arg("config");
    let out = run_to_end(c, Duration::from_secs(30));
    assert!(out.status.success(), "{}", text(&out));
    let s = stdout(&out);
    for secret in [
        "file-secret-photio-999",
        "env-secret-topaz-123",
        "env-secret-perfect-456",
    ] {
        assert!(!s.contains(secret), "{secret} printed:\n{s}");
    }
    assert!(
        s.contains("# api_key = \"<redacted>\"  # set, from TOPAZ_API_KEY"),
        "{s}"
    );
    assert!(
        s.contains("# api_key = \"<redacted>\"  # set, from the config file"),
        "{s}"
    );
    assert!(
        s.contains("# client_secret = \"<redacted>\"  # set, from PERFECT_CLIENT_SECRET"),
        "{s}"
    );
    assert!(
        s.contains("built-in defaults <- pixbatch.toml <- environment"),
        "{s}"
    );
}

#[test]
fn completions_and_man_produce_output() {
    let dir = tempfile::tempdir().unwrap();
    for (shell, marker) in [
        ("bash", "_pixbatch()"),
        ("zsh", "#compdef pixbatch"),
        ("fish", "complete -c pixbatch"),
    ] {
        let out = pixbatch(dir.path())
            .args(["completions", shell])
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", text(&out));
        let s = stdout(&out);
        assert!(s.contains(marker), "{shell}: no {marker}");
        assert!(s.contains("max-credits") && s.contains("doctor"), "{shell}");
    }
    let man = pixbatch(dir.path()).arg("man").output().unwrap();
    assert!(man.status.success(), "{}", text(&man));
    let s = stdout(&man);
    assert!(
        s.contains(".TH pixbatch 1") && s.contains(".SH \"PIXBATCH RUN\""),
        "{s}"
    );
    assert!(s.contains("wait\\-lock"), "run's options are in the page");
}

/// Ctrl-C (SIGINT) ends the run gracefully, and `--on-finish` still runs, told so.
#[test]
fn on_finish_runs_after_an_interrupted_run() {
    let sim = Sim::start(&["--task-ms", "5000"]);
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    write_png(&d.join("a.png"), 32, 32, 1);
    write(
        d,
        "jobs.csv",
        "id,provider,operation,input\ni1,topaz,enhance,a.png\n",
    );
    let mut child = cmd(
        &sim,
        d,
        &[
            "run",
            "jobs.csv",
            "--on-finish",
            "env | grep '^PIXBATCH_' > hook.env",
        ],
    )
    .stdout(Stdio::null())
    .stderr(Stdio::null())
    .spawn()
    .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while calls(&sim, "enhance_async").is_empty() {
        assert!(Instant::now() < deadline, "the run never submitted");
        std::thread::sleep(Duration::from_millis(50));
    }
    sigint(&child);
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(130));
    let env = std::fs::read_to_string(d.join("hook.env")).expect("the hook ran");
    for line in [
        "PIXBATCH_EXIT_CODE=130",
        "PIXBATCH_INTERRUPTED=1",
        "PIXBATCH_UNFINISHED=1",
    ] {
        assert!(env.lines().any(|l| l == line), "no {line} in\n{env}");
    }
}
