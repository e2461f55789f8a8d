use std::collections::{BTreeMap, BTreeSet};
use std::process::Stdio;
use std::time::{Duration, Instant};

use rand::{Rng, SeedableRng};

use crate::common::*;

const JOBS: usize = 200;

fn write_manifest(dir: &std::path::Path) {
    for i in 0..8u32 {
        write_png(
            &dir.join(format!("in/img{i}.png")),
            40 + 8 * i,
            32 + 4 * i,
            i as u8 * 29,
        );
    }
    let mut csv = String::from("id,provider,operation,input,prompt,params,output\n");
    for i in 0..JOBS {
        let img = format!("in/img{}.png", i % 8);
        let row = match i % 8 {
            0 | 1 => format!("t{i},topaz,enhance,{img},,\"{{\"\"output_width\"\":96}}\",\n"),
            2 => format!("g{i},topaz,enhance-gen,{img},a quiet street,\"{{\"\"model\"\":\"\"Redefine\"\",\"\"output_width\"\":80}}\",\n"),
            3 => format!("s{i},topaz,enhance-sync,{img},,\"{{\"\"output_height\"\":64,\"\"output_format\"\":\"\"png\"\"}}\",\n"),
            4 => format!("p{i},photio,upscale,{img},,\"{{\"\"upscale_by\"\":2}}\",\n"),
            6 if i % 16 == 6 => format!("pe{i},perfect,photo-enhance,{img},,\"{{\"\"scale\"\":2}}\",\n"),
            6 => format!("pb{i},perfect,background-removal,{img},,,\n"),
            7 if i % 16 == 7 => format!("dt{i},dzine,txt2img,,a boat number {i},\"{{\"\"style_code\"\":\"\"Style-7feccf2b-f2ad-43a6-89cb-354fb5d928d2\"\",\"\"target_h\"\":128,\"\"generate_slots\"\":[1,1,0,0]}}\",\n"),
            7 => format!("du{i},dzine,upscale,{img},,\"{{\"\"upscaling_resize\"\":2}}\",\n"),
            _ => format!("a{i},aithriving,img2img,{img},a red bicycle,\"{{\"\"width\"\":320,\"\"height\"\":320}}\",\n"),
        };
        csv.push_str(&row);
    }
    std::fs::write(dir.join("jobs.csv"), csv).unwrap();
    std::fs::write(
        dir.join("pixbatch.toml"),
        r#"
[providers.topaz]
rate_limits = ["40/1s"]
concurrency = 8
max_in_flight = 24
poll_interval = "300ms"
max_attempts = 25
reconcile_grace = "3s"
[providers.photio]
rate_limits = ["20/1s"]
concurrency = 4
max_attempts = 25
[providers.aithriving]
rate_limits = ["20/1s"]
concurrency = 4
max_attempts = 25
[providers.perfect]
rate_limits = ["100/1s", "200/5s"]
max_attempts = 25
reconcile_grace = "3s"
[providers.dzine]
rate_limits = ["40/1s"]
concurrency = 8
poll_interval = "300ms"
max_attempts = 25
reconcile_grace = "3s"
"#,
    )
    .unwrap();
}

/// 200 jobs over all five providers with every chaos option on; the process is killed
/// with SIGKILL at random moments and restarted, then run to the end.
#[test]
fn killed_at_random_moments_it_resumes_without_paying_twice() {
    let sim = Sim::start(&[
        "--seed",
        "11",
        "--task-ms",
        "400",
        "--chaos-429",
        "0.04",
        "--chaos-5xx",
        "0.04",
        "--chaos-reset",
        "0.03",
        "--chaos-truncate",
        "0.05",
        "--chaos-slow",
        "0.03",
        "--slow-ms",
        "300",
        "--limit",
        "topaz=40/1s",
        "--limit",
        "photio=20/1s",
        "--limit",
        "aithriving=20/1s",
        "--limit",
        "perfect=100/1s,200/5s",
        "--limit",
        "dzine=40/1s",
    ]);
    let dir = tempfile::tempdir().unwrap();
    write_manifest(dir.path());
    let enqueue = pixbatch(dir.path())
        .args(["enqueue", "jobs.csv"])
        .output()
        .unwrap();
    assert!(enqueue.status.success(), "{}", text(&enqueue));

    let mut rng = rand::rngs::StdRng::seed_from_u64(2024);
    let mut kills = 0;
    let started = Instant::now();
    while kills < 6 && started.elapsed() < Duration::from_secs(120) {
        let mut cmd = pixbatch(dir.path());
        sim.env(&mut cmd);
        let mut child = cmd
            .args(["run", "--quiet"])
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.path().join(format!("run{kills}.err"))).unwrap())
            .spawn()
            .unwrap();
        std::thread::sleep(Duration::from_millis(rng.random_range(300..1500)));
        if let Some(status) = child.try_wait().unwrap() {
            let err = std::fs::read_to_string(dir.path().join(format!("run{kills}.err")))
                .unwrap_or_default();
            assert_eq!(
                status.code(),
                Some(0),
                "a run ended on its own, but not well: {err}"
            );
            break; // finished before we could kill it
        }
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();
        kills += 1;
    }
    assert!(
        kills >= 5,
        "only {kills} kills happened before the work was done"
    );

    let mut cmd = pixbatch(dir.path());
    sim.env(&mut cmd);
    cmd.args(["run", "--quiet"]);
    let out = run_to_end(cmd, Duration::from_secs(300));
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));

    let rows = report(dir.path(), &dir.path().join("pixbatch.db"));
    assert_eq!(rows.len(), JOBS);
    let not_done: Vec<_> = rows.iter().filter(|r| r["state"] != "done").collect();
    assert!(not_done.is_empty(), "{not_done:#?}");

    let ledger = sim.ledger();
    let mut charges: BTreeMap<String, u64> = BTreeMap::new();
    let mut served: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for e in &ledger {
        let Some(key) = e["request_key"].as_str() else {
            continue;
        };
        let job = job_of_key(key).to_string();
        if e["charged"] == true {
            *charges.entry(job.clone()).or_default() += 1;
        }
        if let Some(sha) = e["output_sha256"].as_str() {
            served.entry(job).or_default().insert(sha.to_string());
        }
    }
    let faults = sim.stats()["faults"].clone();
    eprintln!("kills: {kills}, faults injected: {faults}");

    for r in &rows {
        let id = r["id"].as_str().unwrap();
        let n = charges.get(id).copied().unwrap_or(0);
        let dups = r["possible_duplicates"].as_u64().unwrap();
        if r["provider"] == "topaz" || r["provider"] == "perfect" {
            // Topaz lists every task by the file name we sent, Perfect ignores a
            // repeated request_id: nothing is paid twice, nothing recorded as such.
            assert_eq!(dups, 0, "{id}: {r}");
            if n != 1 {
                let entries: Vec<_> = ledger
                    .iter()
                    .filter(|e| {
                        e["request_key"]
                            .as_str()
                            .is_some_and(|k| job_of_key(k) == id)
                    })
                    .collect();
                let show = pixbatch(dir.path()).args(["show", id]).output().unwrap();
                panic!(
                    "{id} charged {n} times: {r}\n{}\nledger: {entries:#?}",
                    text(&show)
                );
            }
        } else {
            // Photio, AIThriving and Dzine give no way to know; every extra charge
            // must be recorded on the job.
            assert!(
                n >= 1 && n <= 1 + dups,
                "{id} charged {n} times with {dups} recorded: {r}"
            );
        }
        for (path, sha) in r["outputs"]
            .as_str()
            .unwrap()
            .split('|')
            .zip(r["sha256"].as_str().unwrap().split('|'))
        {
            let file = dir.path().join("out").join(path);
            assert_eq!(
                sha256_file(&file),
                sha,
                "{id}: file differs from its record"
            );
            assert!(
                served.get(id).is_some_and(|s| s.contains(sha)),
                "{id}: {sha} is not what the simulator served"
            );
        }
    }
    let parts = files_ending(&dir.path().join("out"), ".part");
    assert!(parts.is_empty(), "temporary files left: {parts:?}");
}
