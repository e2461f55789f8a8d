//! The benchmark suite (issue 6): `cargo bench --bench suite -- [SCENARIO...] [OPTIONS]`.
//!
//! Every scenario starts `pixbatch sim` in a process of its own and drives the real
//! `pixbatch` binary, measuring from outside: wall time, the CPU time and peak RSS of
//! the pixbatch process (`wait4`'s rusage), the database's size, and what the
//! simulator's ledger and counters saw. Figures are ratios within one run wherever
//! the target is a ratio, so a loaded machine moves them less.
//!
//! Scenarios (default: all):
//!   limits     Perfect's two windows time-scaled (100/6s + 100/30s) and Topaz's
//!              single window (10/1s), each also with 5 % injected 429s; the four
//!              runs go at once, each with its own simulator (a few requests/s each).
//!   overhead   unlimited simulator, instant tasks: jobs/s, CPU-s per 1,000 jobs,
//!              requests/s against `wrk` on the same simulator.
//!   growth     enqueue 10k/100k/1M rows; jobs/s with that many queued; peak RSS;
//!              start-to-first-request after a restart; bytes per queued job.
//!   downloads  50 MiB results: pixbatch's throughput against curl's, peak RSS
//!              against a run with 1 MiB results.
//!
//! Options:
//!   --sizes 10000,100000,1000000   growth sizes (the largest is "1M" in the targets)
//!   --jobs N                       jobs in the overhead run (default 10000)
//!   --quick                        sizes 10000,100000, 2000 overhead jobs, 100
//!                                  Perfect/80 Topaz jobs in the limit runs
//!   --write                        also replace the suite's section of
//!                                  docs/BENCHMARKS.md with this run's results
//!   --keep                         keep the work folders (printed)
//!
//! Needs `curl` and `wrk` on the PATH for the baselines (a missing tool is reported,
//! not fatal).

use std::fmt::Write as _;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

const BIN: &str = env!("CARGO_BIN_EXE_pixbatch");
const ROOT: &str = env!("CARGO_MANIFEST_DIR");

type Res<T> = Result<T, String>;

fn main() {
    let mut opts = Opts::default();
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            // `cargo bench` passes this to every bench binary.
            "--bench" => {}
            "--quick" => opts.quick = true,
            "--write" => opts.write = true,
            "--keep" => opts.keep = true,
            "--sizes" => {
                let v = args.next().unwrap_or_default();
                opts.sizes = v.split(',').filter_map(|s| s.trim().parse().ok()).collect();
            }
            "--jobs" => opts.jobs = args.next().and_then(|v| v.parse().ok()),
            "limits" | "overhead" | "growth" | "downloads" => opts.scenarios.push(a),
            other => {
                eprintln!(
                    "unknown argument {other:?}; see the comment at the top of benches/suite.rs"
                );
                std::process::exit(2);
            }
        }
    }
    if opts.scenarios.is_empty() {
        opts.scenarios = ["limits", "overhead", "growth", "downloads"]
            .map(String::from)
            .to_vec();
    }
    if opts.sizes.is_empty() {
        opts.sizes = if opts.quick {
            vec![10_000, 100_000]
        } else {
            vec![10_000, 100_000, 1_000_000]
        };
    }
    let machine = Machine::now();
    eprintln!("suite: {} on {}", opts.scenarios.join(", "), machine.line());
    let mut report = Report::default();
    for s in opts.scenarios.clone() {
        eprintln!("suite: --- {s} ---");
        let started = Instant::now();
        let result = match s.as_str() {
            "limits" => limits(&opts, &mut report),
            "overhead" => overhead(&opts, &mut report),
            "growth" => growth(&opts, &mut report),
            "downloads" => downloads(&opts, &mut report),
            _ => Ok(()),
        };
        if let Err(e) = result {
            eprintln!("suite: {s} failed: {e}");
            report.notes.push(format!("{s}: did not complete: {e}"));
        }
        eprintln!("suite: {s} took {:.0} s", started.elapsed().as_secs_f64());
    }
    let machine_end = Machine::now();
    let md = report.markdown(&opts, &machine, &machine_end);
    println!("{md}");
    if opts.write {
        match write_into_docs(&md) {
            Ok(p) => eprintln!("suite: wrote {}", p.display()),
            Err(e) => eprintln!("suite: could not write the docs: {e}"),
        }
    }
}

#[derive(Default)]
struct Opts {
    scenarios: Vec<String>,
    sizes: Vec<u64>,
    jobs: Option<u64>,
    quick: bool,
    write: bool,
    keep: bool,
}

// ----- results ----------------------------------------------------------------------

/// One line of the summary table.
struct Row {
    scenario: String,
    figure: String,
    value: String,
    target: String,
    /// None: no target (context only).
    met: Option<bool>,
}

#[derive(Default)]
struct Report {
    rows: Vec<Row>,
    /// Detail tables, one per scenario, already in markdown.
    details: Vec<String>,
    notes: Vec<String>,
}

impl Report {
    fn row(
        &mut self,
        scenario: &str,
        figure: &str,
        value: String,
        target: &str,
        met: Option<bool>,
    ) {
        self.rows.push(Row {
            scenario: scenario.into(),
            figure: figure.into(),
            value,
            target: target.into(),
            met,
        });
    }

    fn markdown(&self, opts: &Opts, start: &Machine, end: &Machine) -> String {
        let mut s = String::new();
        let _ = writeln!(s, "### Suite run {}\n", start.date);
        let mut cmd = String::from("cargo bench --bench suite --");
        for sc in &opts.scenarios {
            let _ = write!(cmd, " {sc}");
        }
        if opts.quick {
            cmd.push_str(" --quick");
        }
        let sizes: Vec<String> = opts.sizes.iter().map(u64::to_string).collect();
        let _ = write!(cmd, " --sizes {}", sizes.join(","));
        if let Some(j) = opts.jobs {
            let _ = write!(cmd, " --jobs {j}");
        }
        let _ = writeln!(s, "Command: `{cmd}`  ");
        let _ = writeln!(s, "Machine: {}  ", start.line());
        let _ = writeln!(
            s,
            "Load average (1/5/15 min) at the start: {}; at the end: {}  ",
            start.load, end.load
        );
        let _ = writeln!(s, "Commit: {}\n", start.commit);
        let _ = writeln!(s, "| scenario | figure | measured | target | met |");
        let _ = writeln!(s, "|---|---|---|---|---|");
        for r in &self.rows {
            let met = match r.met {
                Some(true) => "yes",
                Some(false) => "**no**",
                None => "–",
            };
            let _ = writeln!(
                s,
                "| {} | {} | {} | {} | {} |",
                r.scenario, r.figure, r.value, r.target, met
            );
        }
        for d in &self.details {
            let _ = writeln!(s, "\n{d}");
        }
        if !self.notes.is_empty() {
            let _ = writeln!(s);
            for n in &self.notes {
                let _ = writeln!(s, "- {n}");
            }
        }
        s
    }
}

const BEGIN: &str = "<!-- suite:begin (written by `cargo bench --bench suite -- --write`) -->";
const END: &str = "<!-- suite:end -->";

fn write_into_docs(md: &str) -> Res<PathBuf> {
    let path = Path::new(ROOT).join("docs/BENCHMARKS.md");
    let text = std::fs::read_to_string(&path).map_err(|e| e.to_string())?;
    let new = match (text.find(BEGIN), text.find(END)) {
        (Some(a), Some(b)) if b > a => {
            format!("{}{BEGIN}\n{md}\n{}", &text[..a], &text[b..])
        }
        _ => format!("{text}\n{BEGIN}\n{md}\n{END}\n"),
    };
    std::fs::write(&path, new).map_err(|e| e.to_string())?;
    Ok(path)
}

struct Machine {
    date: String,
    cpu: String,
    nproc: usize,
    mem: String,
    load: String,
    commit: String,
}

impl Machine {
    fn now() -> Machine {
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let cpu = cpuinfo
            .lines()
            .find(|l| l.starts_with("model name"))
            .and_then(|l| l.split(':').nth(1))
            .unwrap_or("?")
            .trim()
            .to_string();
        let mem = std::fs::read_to_string("/proc/meminfo")
            .unwrap_or_default()
            .lines()
            .find(|l| l.starts_with("MemTotal"))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|kb| kb.parse::<f64>().ok())
            .map(|kb| format!("{:.0} GiB", kb / 1024.0 / 1024.0))
            .unwrap_or_default();
        let load = std::fs::read_to_string("/proc/loadavg")
            .unwrap_or_default()
            .split_whitespace()
            .take(3)
            .collect::<Vec<_>>()
            .join(" ");
        let out = |cmd: &str, args: &[&str]| {
            Command::new(cmd)
                .args(args)
                .current_dir(ROOT)
                .output()
                .ok()
                .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
                .unwrap_or_default()
        };
        Machine {
            date: out("date", &["-u", "+%Y-%m-%d %H:%M UTC"]),
            cpu,
            nproc: std::thread::available_parallelism().map_or(0, |n| n.get()),
            mem,
            load,
            commit: {
                let head = out("git", &["rev-parse", "--short", "HEAD"]);
                if out("git", &["status", "--porcelain", "--untracked-files=no"]).is_empty() {
                    head
                } else {
                    format!("{head} with uncommitted changes")
                }
            },
        }
    }

    fn line(&self) -> String {
        format!(
            "{} CPUs ({}), {} RAM, Linux {}",
            self.nproc,
            self.cpu,
            self.mem,
            std::fs::read_to_string("/proc/sys/kernel/osrelease")
                .unwrap_or_default()
                .trim()
        )
    }
}

// ----- processes ----------------------------------------------------------------------

/// What `wait4` says about a finished child.
#[derive(Debug, Clone, Copy, Default)]
struct Usage {
    wall: f64,
    user: f64,
    sys: f64,
    max_rss_kb: i64,
    code: i32,
}

impl Usage {
    fn cpu(&self) -> f64 {
        self.user + self.sys
    }
}

fn wait_usage(child: &Child, started: Instant) -> Usage {
    let pid = child.id() as libc::pid_t;
    let mut status: libc::c_int = 0;
    // SAFETY: an all-zero rusage is a valid value; wait4 fills it in.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: plain syscall on our own child with valid pointers.
    let r = unsafe { libc::wait4(pid, &mut status, 0, &mut ru) };
    let wall = started.elapsed().as_secs_f64();
    let tv = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    let code = if r < 0 {
        -1
    } else if libc::WIFEXITED(status) {
        libc::WEXITSTATUS(status)
    } else {
        128 + libc::WTERMSIG(status)
    };
    Usage {
        wall,
        user: tv(ru.ru_utime),
        sys: tv(ru.ru_stime),
        max_rss_kb: ru.ru_maxrss,
        code,
    }
}

fn signal(child: &Child, sig: libc::c_int) {
    // SAFETY: sending a signal to our own child.
    unsafe {
        libc::kill(child.id() as libc::pid_t, sig);
    }
}

/// A simulator in a process of its own.
struct Sim {
    child: Child,
    stopped: bool,
    started: Instant,
    addr: String,
    base: String,
    env: Vec<(String, String)>,
}

impl Sim {
    fn start(args: &[&str], log: &Path) -> Res<Sim> {
        let mut child = Command::new(BIN)
            .args(["sim", "--addr", "127.0.0.1:0"])
            .args(args)
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(log).map_err(|e| e.to_string())?)
            .env("RUST_LOG", "warn")
            .spawn()
            .map_err(|e| format!("starting the simulator: {e}"))?;
        let started = Instant::now();
        let stdout = child.stdout.take().ok_or("no simulator stdout")?;
        let mut lines = BufReader::new(stdout).lines();
        let mut env = Vec::new();
        let mut base = None;
        for line in lines.by_ref() {
            let line = line.map_err(|e| e.to_string())?;
            if let Some(rest) = line.strip_prefix("export ") {
                if let Some((k, v)) = rest.split_once('=') {
                    env.push((k.to_string(), v.trim_matches('\'').to_string()));
                }
            } else if let Some(rest) = line.strip_prefix("pixbatch sim listening on ") {
                base = rest.split_whitespace().next().map(str::to_string);
                break;
            }
        }
        // Keep draining so the simulator never blocks on a full pipe.
        std::thread::spawn(move || for _ in lines {});
        let base = base.ok_or("the simulator did not say where it listens")?;
        let addr = base.trim_start_matches("http://").to_string();
        Ok(Sim {
            child,
            stopped: false,
            started,
            addr,
            base,
            env,
        })
    }

    fn get(&self, path: &str) -> Res<Value> {
        let body = http_get(&self.addr, path)?;
        serde_json::from_slice(&body).map_err(|e| format!("{path}: {e}"))
    }

    fn stats(&self) -> Res<Value> {
        self.get("/_sim/stats")
    }

    fn ledger(&self, provider: &str) -> Res<Vec<Value>> {
        let v = self.get(&format!("/_sim/ledger?provider={provider}"))?;
        Ok(v["entries"].as_array().cloned().unwrap_or_default())
    }

    /// CPU seconds the simulator has used so far (from /proc).
    fn cpu_so_far(&self) -> f64 {
        let stat =
            std::fs::read_to_string(format!("/proc/{}/stat", self.child.id())).unwrap_or_default();
        // Fields after the command name (which may hold spaces) start at ") ".
        let rest = stat.rsplit_once(") ").map_or("", |x| x.1);
        let f: Vec<&str> = rest.split_whitespace().collect();
        // SAFETY: sysconf has no preconditions.
        let tck = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
        let t = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
        (t(11) + t(12)) / tck
    }

    fn stop(mut self) -> Usage {
        signal(&self.child, libc::SIGTERM);
        self.stopped = true;
        wait_usage(&self.child, self.started)
    }
}

impl Drop for Sim {
    /// A scenario that fails half way must not leave its simulator running.
    fn drop(&mut self) {
        if !self.stopped {
            signal(&self.child, libc::SIGTERM);
            wait_usage(&self.child, self.started);
        }
    }
}

/// A minimal HTTP/1.1 GET over loopback (the control endpoints answer small JSON).
fn http_get(addr: &str, path: &str) -> Res<Vec<u8>> {
    let mut s = TcpStream::connect(addr).map_err(|e| format!("{addr}: {e}"))?;
    s.set_read_timeout(Some(Duration::from_secs(60))).ok();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .map_err(|e| e.to_string())?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).map_err(|e| e.to_string())?;
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or("no HTTP header end")?;
    let head = String::from_utf8_lossy(&raw[..split]).to_ascii_lowercase();
    let body = &raw[split + 4..];
    if !head.starts_with("http/1.1 200") {
        return Err(format!("GET {path}: {}", head.lines().next().unwrap_or("")));
    }
    if head.contains("transfer-encoding: chunked") {
        let mut out = Vec::new();
        let mut rest = body;
        while let Some(eol) = rest.windows(2).position(|w| w == b"\r\n") {
            let size = usize::from_str_radix(String::from_utf8_lossy(&rest[..eol]).trim(), 16)
                .map_err(|e| e.to_string())?;
            if size == 0 {
                break;
            }
            let start = eol + 2;
            out.extend_from_slice(&rest[start..(start + size).min(rest.len())]);
            rest = &rest[(start + size + 2).min(rest.len())..];
        }
        return Ok(out);
    }
    Ok(body.to_vec())
}

/// A work folder with a database, an output folder and a config file.
struct Work {
    dir: PathBuf,
    keep: bool,
}

impl Work {
    fn new(name: &str, keep: bool) -> Res<Work> {
        let dir = std::env::temp_dir().join(format!(
            "pixbatch-bench-{name}-{}-{}",
            std::process::id(),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_millis())
        ));
        std::fs::create_dir_all(dir.join("in")).map_err(|e| e.to_string())?;
        Ok(Work { dir, keep })
    }

    fn path(&self, p: &str) -> PathBuf {
        self.dir.join(p)
    }

    fn write(&self, name: &str, text: &str) -> Res<()> {
        std::fs::write(self.path(name), text).map_err(|e| format!("{name}: {e}"))
    }

    fn copy_example(&self, name: &str) -> Res<()> {
        std::fs::copy(
            Path::new(ROOT).join("examples/images").join(name),
            self.path("in").join(name),
        )
        .map(|_| ())
        .map_err(|e| format!("{name}: {e}"))
    }

    /// `pixbatch --db db --out out --config pixbatch.toml ARGS`, not yet waited for.
    fn spawn(&self, args: &[&str], env: &[(String, String)], log: &str) -> Res<(Child, Instant)> {
        let log = std::fs::File::create(self.path(log)).map_err(|e| e.to_string())?;
        let child = Command::new(BIN)
            .current_dir(&self.dir)
            .args(["--db", "db", "--out", "out", "--config", "pixbatch.toml"])
            .args(args)
            .envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .map_err(|e| format!("pixbatch {args:?}: {e}"))?;
        Ok((child, Instant::now()))
    }

    fn run(&self, args: &[&str], env: &[(String, String)], log: &str) -> Res<Usage> {
        let (child, t) = self.spawn(args, env, log)?;
        Ok(wait_usage(&child, t))
    }

    fn db_bytes(&self) -> u64 {
        dir_size(&self.path("db"))
    }
}

impl Drop for Work {
    fn drop(&mut self) {
        if self.keep {
            eprintln!("suite: kept {}", self.dir.display());
        } else {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

fn dir_size(p: &Path) -> u64 {
    let Ok(rd) = std::fs::read_dir(p) else {
        return std::fs::metadata(p).map_or(0, |m| m.len());
    };
    rd.flatten()
        .map(|e| {
            let path = e.path();
            if path.is_dir() {
                dir_size(&path)
            } else {
                e.metadata().map_or(0, |m| m.len())
            }
        })
        .sum()
}

fn topaz_manifest(work: &Work, name: &str, n: u64, prefix: &str) -> Res<()> {
    let f = std::fs::File::create(work.path(name)).map_err(|e| e.to_string())?;
    let mut w = std::io::BufWriter::with_capacity(1 << 20, f);
    let mut go = || -> std::io::Result<()> {
        writeln!(w, "id,provider,operation,input,prompt,params")?;
        for i in 0..n {
            writeln!(w, "{prefix}{i},topaz,enhance,in/tiny.png,,")?;
        }
        w.flush()
    };
    go().map_err(|e| e.to_string())
}

fn num(v: &Value, a: &str, b: &str) -> u64 {
    v[a][b].as_u64().unwrap_or(0)
}

fn env_for(sim: &Sim, provider: &str, path: &str) -> Vec<(String, String)> {
    let mut env = sim.env.clone();
    env.push((
        format!("PIXBATCH_{}_URL", provider.to_ascii_uppercase()),
        format!("{}/{provider}{path}", sim.base),
    ));
    env.push(("TOPAZ_API_KEY".into(), "bench-key".into()));
    env.push(("RUST_LOG".into(), "pixbatch=warn".into()));
    env
}

fn fmt_mb(kb: i64) -> String {
    format!("{:.0} MB", kb as f64 / 1024.0)
}

fn fmt_n(n: u64) -> String {
    match n {
        n if n >= 1_000_000 && n % 1_000_000 == 0 => format!("{}M", n / 1_000_000),
        n if n >= 1_000 && n % 1_000 == 0 => format!("{}k", n / 1_000),
        n => n.to_string(),
    }
}

// ----- scenario 1: limit efficiency -------------------------------------------------

struct LimitCase {
    name: &'static str,
    provider: &'static str,
    /// More lines for the provider's table in pixbatch.toml.
    extra_config: &'static str,
    jobs: u64,
    limits: Vec<(u64, u64)>,
    sim_args: Vec<String>,
}

struct LimitResult {
    name: &'static str,
    jobs: u64,
    r: u64,
    least_s: f64,
    span_s: f64,
    wall_s: f64,
    violations: u64,
    faults_429: u64,
    lost: u64,
    charges: u64,
    code: i32,
}

fn limit_case(case: &LimitCase, keep: bool) -> Res<LimitResult> {
    let work = Work::new(case.name, keep)?;
    let sim_args: Vec<&str> = case.sim_args.iter().map(String::as_str).collect();
    let sim = Sim::start(&sim_args, &work.path("sim.log"))?;
    let limits_toml: Vec<String> = case
        .limits
        .iter()
        .map(|(n, w)| format!("\"{n}/{}s\"", w / 1000))
        .collect();
    let (env, manifest, config) = if case.provider == "perfect" {
        work.copy_example("landscape.png")?;
        let mut m = String::from("id,provider,operation,input,prompt,params\n");
        for i in 0..case.jobs {
            if i % 2 == 0 {
                let _ = writeln!(
                    m,
                    "p{i},perfect,photo-enhance,in/landscape.png,,\"{{\"\"scale\"\":2}}\""
                );
            } else {
                let _ = writeln!(m, "p{i},perfect,background-removal,in/landscape.png,,");
            }
        }
        let config = format!(
            "[providers.perfect]\nrate_limits = [{}]\nkeep_alive = \"1s\"\n",
            limits_toml.join(", ")
        );
        (env_for(&sim, "perfect", ""), m, config)
    } else {
        work.copy_example("tiny.png")?;
        let mut m = String::from("id,provider,operation,input,prompt,params\n");
        for i in 0..case.jobs {
            let _ = writeln!(m, "t{i},topaz,enhance,in/tiny.png,,");
        }
        let config = format!(
            "[providers.topaz]\nrate_limits = [{}]\n{}",
            limits_toml.join(", "),
            case.extra_config
        );
        (env_for(&sim, "topaz", "/image/v1"), m, config)
    };
    work.write("jobs.csv", &manifest)?;
    work.write("pixbatch.toml", &config)?;
    let enq = work.run(&["enqueue", "jobs.csv"], &env, "enqueue.log")?;
    if enq.code != 0 {
        return Err(format!("{}: enqueue exited {}", case.name, enq.code));
    }
    let run = work.run(&["run", "--quiet"], &env, "run.log")?;
    let entries = sim.ledger(case.provider)?;
    let stats = sim.stats()?;
    sim.stop();
    let metered: Vec<&Value> = entries
        .iter()
        .filter(|e| e["metered"].as_bool() == Some(true) && e["violation"].as_bool() != Some(true))
        .collect();
    let r = metered.len() as u64;
    let t0 = metered
        .first()
        .and_then(|e| e["t_ms"].as_u64())
        .unwrap_or(0);
    let t_last = entries
        .last()
        .and_then(|e| e["t_ms"].as_u64())
        .unwrap_or(t0);
    let least_ms = case
        .limits
        .iter()
        .map(|(n, w)| if r == 0 { 0 } else { (r - 1) / n * w })
        .max()
        .unwrap_or(0);
    let lost = entries
        .iter()
        .filter(|e| e["endpoint"] == "task_status" && e["status"].as_u64() == Some(400))
        .count() as u64;
    let faults_429 = entries
        .iter()
        .filter(|e| e["fault"].as_str() == Some("429"))
        .count() as u64;
    Ok(LimitResult {
        name: case.name,
        jobs: case.jobs,
        r,
        least_s: least_ms as f64 / 1000.0,
        span_s: (t_last - t0) as f64 / 1000.0,
        wall_s: run.wall,
        violations: num(&stats, "violations", case.provider),
        faults_429,
        lost,
        charges: num(&stats, "charges", case.provider),
        code: run.code,
    })
}

fn limits(opts: &Opts, report: &mut Report) -> Res<()> {
    let (np, nt) = if opts.quick { (100, 80) } else { (200, 150) };
    let perfect = |name, chaos: bool| LimitCase {
        name,
        provider: "perfect",
        extra_config: "",
        jobs: np,
        limits: vec![(100, 6_000), (100, 30_000)],
        sim_args: [
            "--limit",
            "perfect=100/6s,100/30s",
            "--keep-alive-ms",
            "1000",
            "--task-ms",
            "300",
            "--seed",
            "1",
        ]
        .iter()
        .map(|s| s.to_string())
        .chain(
            chaos
                .then(|| ["--chaos-429".to_string(), "0.05".to_string()])
                .into_iter()
                .flatten(),
        )
        .collect(),
    };
    let topaz = |name, chaos: bool, extra_config| LimitCase {
        name,
        provider: "topaz",
        extra_config,
        jobs: nt,
        limits: vec![(10, 1_000)],
        sim_args: ["--limit", "topaz=10/1s", "--task-ms", "300", "--seed", "1"]
            .iter()
            .map(|s| s.to_string())
            .chain(
                chaos
                    .then(|| ["--chaos-429".to_string(), "0.05".to_string()])
                    .into_iter()
                    .flatten(),
            )
            .collect(),
    };
    let cases = vec![
        perfect("perfect", false),
        perfect("perfect-chaos", true),
        topaz("topaz", false, ""),
        topaz("topaz-chaos", true, ""),
        topaz("topaz-poll500", false, "poll_interval = \"500ms\"\n"),
        topaz("topaz-poll500-chaos", true, "poll_interval = \"500ms\"\n"),
    ];
    let keep = opts.keep;
    let handles: Vec<_> = cases
        .into_iter()
        .map(|c| std::thread::spawn(move || limit_case(&c, keep)))
        .collect();
    let mut table = String::from(
        "#### Limit efficiency\n\nR = metered requests the simulator let through (auth, uploads slots, submits, polls, \
download links, deletes: every request the limits count; injected 429s count, limit refusals do not). \
Least = max over the limits of ⌊(R−1)/n⌋·w. Span = first metered request to the last ledger entry; \
wall = the `pixbatch run` process. Ratio = least / span. Client settings: the defaults, except \
the limits and Perfect's time-scaled `keep_alive = \"1s\"`; the `-poll500` runs set Topaz's `poll_interval` to 500 ms \
(default 2 s) for its 300 ms tasks.\n\n\
| run | jobs | R | least | span | wall | ratio | violations | injected 429s | lost tasks | charges | exit |\n\
|---|---|---|---|---|---|---|---|---|---|---|---|\n",
    );
    for h in handles {
        let r = h.join().map_err(|_| "a limit run panicked".to_string())??;
        let ratio = if r.span_s > 0.0 {
            r.least_s / r.span_s
        } else {
            0.0
        };
        let _ = writeln!(
            table,
            "| {} | {} | {} | {:.1} s | {:.1} s | {:.1} s | {:.3} | {} | {} | {} | {} | {} |",
            r.name,
            r.jobs,
            r.r,
            r.least_s,
            r.span_s,
            r.wall_s,
            ratio,
            r.violations,
            r.faults_429,
            r.lost,
            r.charges,
            r.code
        );
        let chaos = r.name.ends_with("chaos");
        let target = if chaos { 0.85 } else { 0.95 };
        let clean = r.violations == 0 && r.lost == 0 && r.charges == r.jobs && r.code == 0;
        report.row(
            "limits",
            &format!("{}: least time / time taken", r.name),
            format!(
                "{ratio:.3} ({:.1} s / {:.1} s); {} violations, {} lost, {} charges for {} jobs",
                r.least_s, r.span_s, r.violations, r.lost, r.charges, r.jobs
            ),
            &format!("≥ {target}, 0 violations, 0 lost"),
            Some(ratio >= target && clean),
        );
    }
    report.details.push(table);
    Ok(())
}

// ----- scenario 2: engine overhead ----------------------------------------------------

fn unlimited_config(work: &Work) -> Res<()> {
    work.write(
        "pixbatch.toml",
        "[providers.topaz]\nrate_limits = []\nconcurrency = 64\nmax_in_flight = 256\npoll_interval = \"20ms\"\n",
    )
}

/// Submits one Topaz task with curl and returns its process id (for the baselines).
fn curl_submit(sim: &Sim, image: &Path) -> Res<String> {
    let out = Command::new("curl")
        .args(["-sf", "-H", "X-API-Key: bench-key", "-F"])
        .arg(format!("image=@{}", image.display()))
        .arg(format!("{}/topaz/image/v1/enhance/async", sim.base))
        .output()
        .map_err(|e| format!("curl: {e}"))?;
    let v: Value = serde_json::from_slice(&out.stdout).map_err(|e| format!("curl submit: {e}"))?;
    v["process_id"]
        .as_str()
        .map(str::to_string)
        .ok_or_else(|| format!("curl submit answered {v}"))
}

fn wrk_rate(url: &str, secs: u64) -> Res<f64> {
    let out = Command::new("wrk")
        .args([
            "-t2",
            "-c32",
            &format!("-d{secs}s"),
            "-H",
            "X-API-Key: bench-key",
            url,
        ])
        .output()
        .map_err(|e| format!("wrk: {e} (apt-get install wrk)"))?;
    let text = String::from_utf8_lossy(&out.stdout);
    text.lines()
        .find_map(|l| l.strip_prefix("Requests/sec:"))
        .and_then(|v| v.trim().parse().ok())
        .ok_or_else(|| format!("wrk printed no rate: {text}"))
}

fn overhead(opts: &Opts, report: &mut Report) -> Res<()> {
    let n = opts.jobs.unwrap_or(if opts.quick { 2_000 } else { 10_000 });
    let work = Work::new("overhead", opts.keep)?;
    work.copy_example("tiny.png")?;
    topaz_manifest(&work, "jobs.csv", n, "j")?;
    unlimited_config(&work)?;
    let sim = Sim::start(
        &["--no-limits", "--task-ms", "0", "--ledger-cap", "1000"],
        &work.path("sim.log"),
    )?;
    let env = env_for(&sim, "topaz", "/image/v1");
    let enq = work.run(&["enqueue", "jobs.csv"], &env, "enqueue.log")?;
    let before = sim.stats()?;
    let sim_cpu0 = sim.cpu_so_far();
    let run = work.run(&["run", "--quiet"], &env, "run.log")?;
    let sim_cpu = sim.cpu_so_far() - sim_cpu0;
    let after = sim.stats()?;
    let requests = num(&after, "requests", "topaz") - num(&before, "requests", "topaz");
    let done = num(&after, "endpoints", "topaz/status_delete")
        - num(&before, "endpoints", "topaz/status_delete");
    let db = work.db_bytes();
    let live = pixbatch::store::Store::open(&work.path("db"), &Default::default())
        .and_then(|st| st.live_bytes())
        .unwrap_or(0);
    // The raw rate on the same simulator: a status poll, the cheapest metered call.
    let id = curl_submit(&sim, &work.path("in/tiny.png"))?;
    let url = format!("{}/topaz/image/v1/status/{id}", sim.base);
    let raw = wrk_rate(&url, 5);
    sim.stop();

    let jobs_s = n as f64 / run.wall;
    let req_s = requests as f64 / run.wall;
    let cpu_per_1000 = run.cpu() / n as f64 * 1000.0;
    let mut detail = format!(
        "#### Engine overhead\n\n{n} Topaz async jobs (submit with a 64×48 PNG, poll, download link, 1 file, delete), \
simulator with no limits and instant tasks in its own process; `concurrency = 64`, `max_in_flight = 256`, \
`poll_interval = \"20ms\"`.\n\n\
| figure | value |\n|---|---|\n\
| `pixbatch run` wall | {:.2} s (exit {}) |\n\
| jobs finished (the simulator's `status_delete` count) | {done} |\n\
| jobs/s | {jobs_s:.0} |\n\
| pixbatch CPU (user + sys) | {:.2} s + {:.2} s = {:.2} CPU-s per 1,000 jobs |\n\
| pixbatch peak RSS | {} |\n\
| requests to the simulator | {requests} ({:.1} per job), {req_s:.0}/s |\n\
| simulator CPU during the run | {sim_cpu:.2} s ({:.2} CPU-s per 1,000 jobs; pixbatch + simulator = {:.2} CPUs busy on average) |\n\
| enqueue of the {n} rows | {:.2} s |\n\
| database after the run | {:.0} bytes per finished job on disk ({} bytes); live data (keys + values) {:.0} bytes per job |\n",
        run.wall,
        run.code,
        run.user,
        run.sys,
        cpu_per_1000,
        fmt_mb(run.max_rss_kb),
        requests as f64 / n.max(1) as f64,
        sim_cpu / n as f64 * 1000.0,
        (run.cpu() + sim_cpu) / run.wall,
        enq.wall,
        db as f64 / n as f64,
        db,
        live as f64 / n as f64,
    );
    report.row(
        "overhead",
        "jobs/s end to end (instant tasks)",
        format!("{jobs_s:.0} ({n} jobs in {:.2} s)", run.wall),
        "≥ 1,000, or ≥ 0.5 of raw (the lower)",
        None,
    );
    report.row(
        "overhead",
        "CPU-s per 1,000 jobs (pixbatch process)",
        format!("{cpu_per_1000:.2}"),
        "–",
        None,
    );
    match raw {
        Ok(raw) => {
            let frac = req_s / raw;
            let _ = writeln!(
                detail,
                "| `wrk -t2 -c32 -d5s` on `GET /status/ID`, same simulator | {raw:.0} requests/s |\n\
| pixbatch requests/s ÷ wrk requests/s | {frac:.2} |"
            );
            let target_jobs = 1000f64.min(0.5 * raw / (requests as f64 / n.max(1) as f64));
            report.row(
                "overhead",
                "requests/s as a fraction of wrk's on the same sim",
                format!("{frac:.2} ({req_s:.0} vs {raw:.0} req/s)"),
                "≥ 0.5 (or ≥ 1,000 jobs/s)",
                None,
            );
            report.row(
                "overhead",
                "target met (jobs/s ≥ min(1,000, 0.5 × raw ÷ requests per job))",
                format!("{jobs_s:.0} jobs/s vs {target_jobs:.0}"),
                &format!("≥ {target_jobs:.0} jobs/s"),
                Some(jobs_s >= target_jobs && run.code == 0),
            );
        }
        Err(e) => report.notes.push(format!("overhead: no raw baseline: {e}")),
    }
    report.details.push(detail);
    if run.code != 0 {
        return Err(format!("pixbatch run exited {}", run.code));
    }
    // Kept for the growth table.
    report.row(
        "growth",
        "database size per finished job",
        format!(
            "{:.0} bytes on disk, {:.0} bytes live ({n} jobs)",
            db as f64 / n as f64,
            live as f64 / n as f64
        ),
        "≤ 1 KB",
        Some(db as f64 / (n as f64) <= 1024.0),
    );
    Ok(())
}

// ----- scenario 3: growth ---------------------------------------------------------------

struct GrowthResult {
    size: u64,
    enqueue: Usage,
    db_queued: u64,
    /// Per round: (start to first request, jobs/s, the run's usage).
    rounds: Vec<(f64, f64, Usage)>,
}

impl GrowthResult {
    fn jobs_s(&self) -> f64 {
        self.rounds.iter().map(|r| r.1).sum::<f64>() / self.rounds.len().max(1) as f64
    }
    fn max_rss_kb(&self) -> i64 {
        self.rounds
            .iter()
            .map(|r| r.2.max_rss_kb)
            .max()
            .unwrap_or(0)
    }
}

/// Waits for the simulator's request count to pass `above`; seconds since `t`.
fn first_request(sim: &Sim, above: u64, t: Instant, limit: Duration) -> Res<f64> {
    loop {
        if num(&sim.stats()?, "requests", "topaz") > above {
            return Ok(t.elapsed().as_secs_f64());
        }
        if t.elapsed() > limit {
            return Err("no request arrived".into());
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// A database with `size` queued jobs and its simulator.
struct GrowthSetup {
    work: Work,
    sim: Sim,
    env: Vec<(String, String)>,
    result: GrowthResult,
}

fn growth_setup(size: u64, keep: bool) -> Res<GrowthSetup> {
    let work = Work::new(&format!("growth{size}"), keep)?;
    work.copy_example("tiny.png")?;
    topaz_manifest(&work, "jobs.csv", size, "g")?;
    unlimited_config(&work)?;
    let sim = Sim::start(
        &["--no-limits", "--task-ms", "0", "--ledger-cap", "1000"],
        &work.path("sim.log"),
    )?;
    let env = env_for(&sim, "topaz", "/image/v1");
    let enqueue = work.run(&["enqueue", "jobs.csv"], &env, "enqueue.log")?;
    if enqueue.code != 0 {
        return Err(format!("enqueue of {size} rows exited {}", enqueue.code));
    }
    let db_queued = work.db_bytes();
    Ok(GrowthSetup {
        result: GrowthResult {
            size,
            enqueue,
            db_queued,
            rounds: Vec::new(),
        },
        work,
        sim,
        env,
    })
}

/// Enqueues as many new jobs as the simulator has seen finish.
fn top_up(g: &mut GrowthSetup) -> Res<()> {
    let done = num(&g.sim.stats()?, "endpoints", "topaz/status_delete");
    topaz_manifest(&g.work, "more.csv", done, "more")?;
    let u = g.work.run(&["enqueue", "more.csv"], &g.env, "more.log")?;
    if u.code != 0 {
        return Err(format!(
            "topping up with {done} jobs: enqueue exited {}",
            u.code
        ));
    }
    Ok(())
}

/// One `pixbatch run`: time to the first request, jobs finished per second over 3 s
/// after a 1 s warm-up, then `end` (SIGINT: Ctrl-C; SIGKILL: a crash).
fn growth_round(g: &mut GrowthSetup, round: usize, end: libc::c_int) -> Res<()> {
    let sim = &g.sim;
    let before = num(&sim.stats()?, "requests", "topaz");
    let (child, t) = g
        .work
        .spawn(&["run", "--quiet"], &g.env, &format!("run{round}.log"))?;
    let first = match first_request(sim, before, t, Duration::from_secs(120)) {
        Ok(f) => f,
        Err(e) => {
            signal(&child, libc::SIGKILL);
            wait_usage(&child, t);
            return Err(e);
        }
    };
    std::thread::sleep(Duration::from_secs(1));
    let a = (
        Instant::now(),
        num(&sim.stats()?, "endpoints", "topaz/status_delete"),
    );
    std::thread::sleep(Duration::from_secs(4));
    let b = (
        Instant::now(),
        num(&sim.stats()?, "endpoints", "topaz/status_delete"),
    );
    let jobs_s = (b.1 - a.1) as f64 / (b.0 - a.0).as_secs_f64();
    signal(&child, end);
    let usage = wait_usage(&child, t);
    g.result.rounds.push((first, jobs_s, usage));
    Ok(())
}

fn growth(opts: &Opts, report: &mut Report) -> Res<()> {
    let mut setups = Vec::new();
    for &size in &opts.sizes {
        eprintln!("suite: growth: enqueue {size} jobs");
        setups.push(growth_setup(size, opts.keep)?);
    }
    // The runs of all sizes close together, three times over, so a change in the
    // machine's load hits every size alike: a first run ended by Ctrl-C, a restart
    // ended by SIGKILL (a crash), a restart after that crash.
    let ends = [libc::SIGINT, libc::SIGKILL, libc::SIGINT];
    for (round, end) in ends.into_iter().enumerate() {
        if round == 1 {
            // Put back as many jobs as the first run finished, so the queue is its
            // size again (the smallest would otherwise run dry).
            for g in setups.iter_mut() {
                top_up(g)?;
            }
        }
        for g in setups.iter_mut() {
            eprintln!(
                "suite: growth: run {} with {} jobs",
                round + 1,
                g.result.size
            );
            growth_round(g, round, end)?;
        }
    }
    let results: Vec<GrowthResult> = setups
        .into_iter()
        .map(|g| {
            g.sim.stop();
            g.result
        })
        .collect();
    let mut table = String::from(
        "#### Growth\n\nFor each size: a new database, `pixbatch enqueue` of that many Topaz rows. Then, for \
every size in turn, three times over: `pixbatch run` against an unlimited simulator with instant tasks, \
timed from its start to the first request the simulator sees; jobs/s = jobs finished (the \
simulator's `status_delete` count) in 3 s after a 1 s warm-up. The first run is ended by Ctrl-C \
(SIGINT); then as many new jobs as it finished are enqueued; the second run (a restart) is ended \
by SIGKILL, and the third is a restart after that crash (the store first finishes the state \
changes the killed process left half done).\n\n\
| queued | enqueue | enqueue rows/s | enqueue peak RSS | DB per queued job | start → first request (1st run, restart, restart after SIGKILL) | jobs/s (same runs) | run peak RSS |\n\
|---|---|---|---|---|---|---|---|\n",
    );
    for r in &results {
        let firsts: Vec<String> = r.rounds.iter().map(|x| format!("{:.3} s", x.0)).collect();
        let rates: Vec<String> = r.rounds.iter().map(|x| format!("{:.0}", x.1)).collect();
        let _ = writeln!(
            table,
            "| {} | {:.2} s | {:.0} | {} | {:.0} B | {} | {} | {} |",
            fmt_n(r.size),
            r.enqueue.wall,
            r.size as f64 / r.enqueue.wall,
            fmt_mb(r.enqueue.max_rss_kb),
            r.db_queued as f64 / r.size as f64,
            firsts.join(", "),
            rates.join(", "),
            fmt_mb(r.max_rss_kb()),
        );
    }
    report.details.push(table);
    let (Some(small), Some(big)) = (results.first(), results.last()) else {
        return Ok(());
    };
    let n = fmt_n(big.size);
    report.row(
        "growth",
        &format!(
            "jobs/s with {n} queued ÷ with {} queued (mean of 3 runs)",
            fmt_n(small.size)
        ),
        format!(
            "{:.2} ({:.0} vs {:.0})",
            big.jobs_s() / small.jobs_s(),
            big.jobs_s(),
            small.jobs_s()
        ),
        "≥ 0.8",
        Some(big.jobs_s() >= 0.8 * small.jobs_s()),
    );
    let rss_mb = big.max_rss_kb() as f64 / 1024.0;
    report.row(
        "growth",
        &format!("peak RSS of `run` with {n} queued"),
        format!("{rss_mb:.0} MB"),
        "≤ 200 MB",
        Some(rss_mb <= 200.0),
    );
    report.row(
        "growth",
        &format!("enqueue of a {n}-row CSV"),
        format!(
            "{:.1} s ({:.0} rows/s, peak RSS {})",
            big.enqueue.wall,
            big.size as f64 / big.enqueue.wall,
            fmt_mb(big.enqueue.max_rss_kb)
        ),
        if big.size >= 1_000_000 {
            "≤ 15 s (1M rows)"
        } else {
            "≤ 15 s for 1M rows"
        },
        (big.size >= 1_000_000).then_some(big.enqueue.wall <= 15.0),
    );
    let restart = |i: usize| big.rounds.get(i).map_or(f64::NAN, |x| x.0);
    report.row(
        "growth",
        &format!("start → first request after a restart, {n} in the DB"),
        format!(
            "{:.3} s after Ctrl-C, {:.3} s after SIGKILL",
            restart(1),
            restart(2)
        ),
        "≤ 1 s",
        Some(restart(1) <= 1.0 && restart(2) <= 1.0),
    );
    report.row(
        "growth",
        "database size per queued job",
        format!("{:.0} bytes ({n})", big.db_queued as f64 / big.size as f64),
        "–",
        None,
    );
    Ok(())
}

// ----- scenario 4: downloads --------------------------------------------------------------

struct DownloadRun {
    usage: Usage,
    /// Per job: seconds from the file request's arrival to the job's next request
    /// (its status delete, sent once done is durable).
    spans: Vec<f64>,
    bytes: u64,
}

fn download_run(bytes: u64, jobs: u64, keep: bool) -> Res<(DownloadRun, Option<(f64, f64)>)> {
    let work = Work::new(&format!("dl{bytes}"), keep)?;
    work.copy_example("tiny.png")?;
    topaz_manifest(&work, "jobs.csv", jobs, "d")?;
    work.write(
        "pixbatch.toml",
        "[providers.topaz]\nrate_limits = []\nconcurrency = 1\nmax_in_flight = 1\npoll_interval = \"20ms\"\n",
    )?;
    let sim = Sim::start(
        &[
            "--no-limits",
            "--task-ms",
            "0",
            "--result-bytes",
            &bytes.to_string(),
        ],
        &work.path("sim.log"),
    )?;
    let env = env_for(&sim, "topaz", "/image/v1");
    work.run(&["enqueue", "jobs.csv"], &env, "enqueue.log")?;
    let usage = work.run(&["run", "--quiet"], &env, "run.log")?;
    let entries = sim.ledger("topaz")?;
    let mut spans = Vec::new();
    for (i, e) in entries.iter().enumerate() {
        if e["endpoint"] != "file" {
            continue;
        }
        let id = &e["remote_id"];
        if let Some(next) = entries[i + 1..].iter().find(|x| &x["remote_id"] == id) {
            let dt = next["t_ms"].as_u64().unwrap_or(0) - e["t_ms"].as_u64().unwrap_or(0);
            spans.push(dt as f64 / 1000.0);
        }
    }
    // curl from the same simulator, the same kind of link, into the same folder.
    let curl = if bytes >= 10 << 20 {
        let id = curl_submit(&sim, &work.path("in/tiny.png"))?;
        std::thread::sleep(Duration::from_millis(100));
        let out = Command::new("curl")
            .args(["-sf", "-H", "X-API-Key: bench-key"])
            .arg(format!("{}/topaz/image/v1/download/{id}", sim.base))
            .output()
            .map_err(|e| format!("curl: {e}"))?;
        let v: Value =
            serde_json::from_slice(&out.stdout).map_err(|e| format!("download link: {e}"))?;
        let url = v["download_url"]
            .as_str()
            .ok_or("no download_url")?
            .to_string();
        let mut plain = Vec::new();
        let mut synced = Vec::new();
        for i in 0..jobs {
            let file = work.path(&format!("curl{i}.png"));
            let t = Instant::now();
            let st = Command::new("curl")
                .args(["-sf", "-o"])
                .arg(&file)
                .arg(&url)
                .status()
                .map_err(|e| format!("curl: {e}"))?;
            let t_plain = t.elapsed().as_secs_f64();
            let _ = Command::new("sync").arg(&file).status();
            let t_synced = t.elapsed().as_secs_f64();
            if st.success() {
                plain.push(t_plain);
                synced.push(t_synced);
            }
        }
        Some((median(&plain), median(&synced)))
    } else {
        None
    };
    sim.stop();
    if usage.code != 0 {
        return Err(format!("pixbatch run exited {}", usage.code));
    }
    Ok((
        DownloadRun {
            usage,
            spans,
            bytes,
        },
        curl,
    ))
}

fn median(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(|a, b| a.total_cmp(b));
    v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
}

fn downloads(opts: &Opts, report: &mut Report) -> Res<()> {
    let jobs = 4;
    let (small, _) = download_run(1 << 20, jobs, opts.keep)?;
    let (big, curl) = download_run(50 << 20, jobs, opts.keep)?;
    let mbps = |bytes: u64, s: f64| bytes as f64 / (1024.0 * 1024.0) / s;
    let pb = mbps(big.bytes, median(&big.spans));
    let mut detail = format!(
        "#### Downloads\n\n{jobs} Topaz jobs one at a time (`concurrency = 1`), results padded by the simulator \
(`--result-bytes`) to 1 MiB and to 50 MiB. pixbatch's time per file = the file request's arrival to the \
job's next request (its status delete, sent after the file is fsynced, renamed, and `done` is durable). \
curl fetches the same kind of presigned link from the same simulator into the same folder.\n\n\
| figure | 1 MiB results | 50 MiB results |\n|---|---|---|\n\
| pixbatch peak RSS | {} | {} |\n\
| pixbatch `run` wall | {:.2} s | {:.2} s |\n\
| pixbatch per file (median of {jobs}) | {:.3} s | {:.3} s ({pb:.0} MiB/s) |\n",
        fmt_mb(small.usage.max_rss_kb),
        fmt_mb(big.usage.max_rss_kb),
        small.usage.wall,
        big.usage.wall,
        median(&small.spans),
        median(&big.spans),
    );
    report.row(
        "downloads",
        "peak RSS, 50 MiB results vs 1 MiB results",
        format!(
            "{} vs {}",
            fmt_mb(big.usage.max_rss_kb),
            fmt_mb(small.usage.max_rss_kb)
        ),
        "does not grow with file size",
        Some((big.usage.max_rss_kb - small.usage.max_rss_kb) < 16 * 1024),
    );
    if let Some((plain, synced)) = curl {
        let c = mbps(big.bytes, plain);
        let cs = mbps(big.bytes, synced);
        let _ = writeln!(
            detail,
            "| curl per file (median) | – | {plain:.3} s ({c:.0} MiB/s); with `sync FILE` after it: {synced:.3} s ({cs:.0} MiB/s) |"
        );
        report.row(
            "downloads",
            "50 MiB throughput, pixbatch ÷ curl",
            format!(
                "{:.2} ({pb:.0} vs {c:.0} MiB/s); against curl + fsync {:.2}",
                pb / c,
                pb / cs
            ),
            "≥ 0.8",
            Some(pb / c >= 0.8),
        );
    }
    report.details.push(detail);
    Ok(())
}
