//! Helpers shared by the integration tests: the real binary, a simulator in its own
//! process, small input pictures, and a minimal HTTP client for the ledger.

#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

pub fn bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_pixbatch"))
}

/// A `pixbatch` command in `dir` with no provider variables from the outside.
pub fn pixbatch(dir: &Path) -> Command {
    let mut c = Command::new(bin());
    c.current_dir(dir);
    for var in [
        "DZINE_API_KEY",
        "PERFECT_CLIENT_ID",
        "PERFECT_CLIENT_SECRET",
        "PERFECT_API_KEY",
        "TOPAZ_API_KEY",
        "PHOTIO_API_KEY",
        "AITHRIVING_API_KEY",
        "PIXBATCH_DZINE_URL",
        "PIXBATCH_PERFECT_URL",
        "PIXBATCH_TOPAZ_URL",
        "PIXBATCH_PHOTIO_URL",
        "PIXBATCH_AITHRIVING_URL",
        "RUST_LOG",
        "PIXBATCH_STATE_DIR",
        "XDG_STATE_HOME",
    ] {
        c.env_remove(var);
    }
    // The per-credential rate budgets: inside the test's folder, never the real home.
    c.env("PIXBATCH_STATE_DIR", dir.join(".pixbatch-state"));
    c
}

/// `pixbatch sim` in its own process, killed on drop.
pub struct Sim {
    child: Child,
    pub base: String,
    pub port: u16,
    /// `export NAME='value'` lines the simulator printed (every provider's URL and
    /// key; Perfect's generated client id and key among them).
    pub credentials: Vec<(String, String)>,
}

impl Sim {
    pub fn start(args: &[&str]) -> Sim {
        Sim::start_at("127.0.0.1:0", args)
    }

    pub fn start_at(addr: &str, args: &[&str]) -> Sim {
        let mut child = Command::new(bin())
            .arg("sim")
            .args(["--addr", addr])
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("start the simulator");
        let stdout = child.stdout.take().expect("sim stdout");
        let mut reader = BufReader::new(stdout);
        let mut credentials = Vec::new();
        let base = loop {
            let mut line = String::new();
            let n = reader.read_line(&mut line).expect("sim output");
            assert!(n > 0, "the simulator ended before saying where it listens");
            let line = line.trim();
            if let Some(assign) = line.strip_prefix("export ") {
                if let Some((name, value)) = assign.split_once('=') {
                    credentials.push((name.to_string(), value.trim_matches('\'').to_string()));
                }
                continue;
            }
            if line.contains(" listening on ") {
                break line.rsplit(' ').next().expect("address").to_string();
            }
        };
        let port = base
            .rsplit(':')
            .next()
            .and_then(|p| p.parse().ok())
            .expect("port");
        Sim {
            child,
            base,
            port,
            credentials,
        }
    }

    /// Environment pointing all five providers at the simulator, with made-up keys
    /// (and the Perfect key pair the simulator generated).
    pub fn env(&self, cmd: &mut Command) {
        // The simulator prints every variable (URLs and made-up keys too); the tests'
        // own made-up keys win, so tests that search for them keep finding them.
        for (name, value) in &self.credentials {
            cmd.env(name, value);
        }
        sim_env(cmd, &self.base);
    }

    pub fn get_json(&self, path: &str) -> serde_json::Value {
        let body = http_get(self.port, path);
        serde_json::from_str(&body).unwrap_or_else(|e| panic!("{path}: {e}: {body}"))
    }

    pub fn ledger(&self) -> Vec<serde_json::Value> {
        self.get_json("/_sim/ledger")["entries"]
            .as_array()
            .cloned()
            .unwrap_or_default()
    }

    pub fn stats(&self) -> serde_json::Value {
        self.get_json("/_sim/stats")
    }
}

impl Drop for Sim {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Environment pointing the providers at a simulator at `base`
/// (`http://127.0.0.1:PORT`), with made-up keys. Perfect's RSA credentials come from
/// the simulator's output: use [`Sim::env`] for Perfect jobs.
pub fn sim_env(cmd: &mut Command, base: &str) {
    cmd.env("PIXBATCH_TOPAZ_URL", format!("{base}/topaz/image/v1"))
        .env("PIXBATCH_PHOTIO_URL", format!("{base}/photio/v1"))
        .env("PIXBATCH_AITHRIVING_URL", format!("{base}/aithriving"))
        .env("PIXBATCH_PERFECT_URL", format!("{base}/perfect"))
        .env("PIXBATCH_DZINE_URL", format!("{base}/dzine/openapi/v1"))
        .env("TOPAZ_API_KEY", "test-topaz-key-123")
        .env("PHOTIO_API_KEY", "test-photio-key-456")
        .env("AITHRIVING_API_KEY", "test-aithriving-key-789")
        .env("DZINE_API_KEY", "test-dzine-key-246");
}

/// A loopback port nothing listens on (for now).
pub fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    l.local_addr().expect("addr").port()
}

/// GET over plain HTTP/1.0 (the ledger only; no client crate needed).
pub fn http_get(port: u16, path: &str) -> String {
    let mut s = TcpStream::connect(("127.0.0.1", port)).expect("connect to sim");
    s.set_read_timeout(Some(Duration::from_secs(30))).ok();
    write!(s, "GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n").expect("send");
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).expect("read");
    let text = String::from_utf8_lossy(&raw).into_owned();
    match text.split_once("\r\n\r\n") {
        Some((_, body)) => body.to_string(),
        None => text,
    }
}

/// Writes a PNG of the given size (a gradient, different per `seed`).
pub fn write_png(path: &Path, w: u32, h: u32, seed: u8) {
    let img = image::RgbImage::from_fn(w, h, |x, y| {
        image::Rgb([(x * 7) as u8 ^ seed, (y * 5) as u8, seed.wrapping_mul(3)])
    });
    if let Some(p) = path.parent() {
        std::fs::create_dir_all(p).unwrap();
    }
    img.save(path).unwrap();
}

/// Runs `cmd` to its end (killing it after `limit`), draining its output as it goes
/// so a chatty process never blocks on a full pipe.
pub fn run_to_end(mut cmd: Command, limit: Duration) -> Output {
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    let drain = |mut r: Box<dyn Read + Send>| {
        std::thread::spawn(move || {
            let mut buf = Vec::new();
            let _ = r.read_to_end(&mut buf);
            buf
        })
    };
    let out_thread = drain(Box::new(child.stdout.take().expect("stdout")));
    let err_thread = drain(Box::new(child.stderr.take().expect("stderr")));
    let start = Instant::now();
    let mut timed_out = false;
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait") {
            break status;
        }
        if start.elapsed() > limit {
            timed_out = true;
            let _ = child.kill();
            break child.wait().expect("wait");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let out = Output {
        status,
        stdout: out_thread.join().unwrap_or_default(),
        stderr: err_thread.join().unwrap_or_default(),
    };
    if timed_out {
        panic!("command did not finish in {limit:?}\n{}", text(&out));
    }
    out
}

pub fn text(out: &Output) -> String {
    format!(
        "status {:?}\nstdout:\n{}\nstderr:\n{}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// `pixbatch report --format jsonl` as parsed rows.
pub fn report(dir: &Path, db: &Path) -> Vec<serde_json::Value> {
    let out = pixbatch(dir)
        .args(["--db", db.to_str().unwrap(), "report", "--format", "jsonl"])
        .output()
        .expect("report");
    assert!(out.status.success(), "{}", text(&out));
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).expect("report line"))
        .collect()
}

/// Every file under `dir` whose name ends with `suffix`.
pub fn files_ending(dir: &Path, suffix: &str) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(rd) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in rd.flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else if p.to_string_lossy().ends_with(suffix) {
                out.push(p);
            }
        }
    }
    out
}

pub fn sha256_file(path: &Path) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(std::fs::read(path).unwrap()))
}

/// The job id a simulator request key (`<job>~<n>`) belongs to.
pub fn job_of_key(key: &str) -> &str {
    key.rsplit_once('~').map(|(j, _)| j).unwrap_or(key)
}

pub fn sigint(child: &Child) {
    unsafe {
        libc::kill(child.id() as i32, libc::SIGINT);
    }
}

/// A report row's list (`outputs`, `sha256`, `inputs`: JSON arrays) as one
/// `|`-joined string ("" for an empty list).
pub fn joined(v: &serde_json::Value) -> String {
    match v {
        serde_json::Value::Array(items) => items
            .iter()
            .map(|i| i.as_str().unwrap_or_default().to_string())
            .collect::<Vec<_>>()
            .join("|"),
        serde_json::Value::String(s) => s.clone(),
        _ => String::new(),
    }
}
