//! A run's counters and their Prometheus text rendering (`run --metrics-addr`,
//! `run --metrics-file`).
//!
//! Every label set is known in advance (five providers, seven request kinds, the HTTP
//! status range, ten job states), so each series is a plain `AtomicU64` in a fixed
//! array: the request path bumps one with a relaxed `fetch_add` and never takes a
//! lock, allocates or hashes. The text exposition format is rendered here by hand;
//! it is a few lines of `name{labels} value`, and a registry crate would add a
//! lock-protected label map (prometheus-client's `Family`) or a process-global
//! recorder (metrics-exporter-prometheus) that tests running several engines in one
//! process would share. Job counts per state are not counted here at all: the store
//! keeps them (the state index), and the renderer reads them at scrape time.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use crate::api::RequestKind;
use crate::model::{JobState, ProviderKind};

/// Slots per request kind: statuses 100..=599, then "other" (a status outside that
/// range) and "none" (no answer: connect error, reset, timeout).
const STATUS_SLOTS: usize = 502;
const SLOT_OTHER: usize = 500;
const SLOT_NONE: usize = 501;

/// The counters of one provider. Cheap to bump from any task.
pub struct ProviderMetrics {
    kind: ProviderKind,
    /// `[request kind][status slot]`.
    requests: Box<[[AtomicU64; STATUS_SLOTS]; RequestKind::ALL.len()]>,
    rate_limited: AtomicU64,
    retries: AtomicU64,
    jobs_done: AtomicU64,
    jobs_failed: AtomicU64,
    downloaded_bytes: AtomicU64,
    /// Nanoseconds requests spent waiting at the rate-limit gate.
    limiter_wait_ns: AtomicU64,
    /// Requests waiting at the gate now.
    limiter_waiting: AtomicU64,
}

impl ProviderMetrics {
    fn new(kind: ProviderKind) -> ProviderMetrics {
        ProviderMetrics {
            kind,
            requests: Box::new(std::array::from_fn(|_| {
                std::array::from_fn(|_| AtomicU64::new(0))
            })),
            rate_limited: AtomicU64::new(0),
            retries: AtomicU64::new(0),
            jobs_done: AtomicU64::new(0),
            jobs_failed: AtomicU64::new(0),
            downloaded_bytes: AtomicU64::new(0),
            limiter_wait_ns: AtomicU64::new(0),
            limiter_waiting: AtomicU64::new(0),
        }
    }

    pub fn kind(&self) -> ProviderKind {
        self.kind
    }

    /// A request got an answer with this HTTP status (`None`: no answer at all).
    pub fn request(&self, kind: RequestKind, status: Option<u16>) {
        let slot = match status {
            Some(s @ 100..=599) => usize::from(s - 100),
            Some(_) => SLOT_OTHER,
            None => SLOT_NONE,
        };
        self.requests[kind.index()][slot].fetch_add(1, Ordering::Relaxed);
    }

    /// The provider said "too many requests" (HTTP 429, or inside a 200 answer).
    pub fn rate_limited(&self) {
        self.rate_limited.fetch_add(1, Ordering::Relaxed);
    }

    /// A job step failed transiently and was scheduled again.
    pub fn retry(&self) {
        self.retries.fetch_add(1, Ordering::Relaxed);
    }

    pub fn job_done(&self) {
        self.jobs_done.fetch_add(1, Ordering::Relaxed);
    }

    pub fn job_failed(&self) {
        self.jobs_failed.fetch_add(1, Ordering::Relaxed);
    }

    /// Result bytes received (streamed downloads as they arrive, inline results
    /// when written).
    pub fn downloaded(&self, bytes: u64) {
        self.downloaded_bytes.fetch_add(bytes, Ordering::Relaxed);
    }

    /// Counts a request as waiting at the gate until the guard is dropped (also when
    /// the waiting future is cancelled), then adds the time it waited.
    pub fn waiting(&self) -> WaitGuard<'_> {
        self.limiter_waiting.fetch_add(1, Ordering::Relaxed);
        WaitGuard {
            metrics: self,
            since: std::time::Instant::now(),
        }
    }
}

/// See [`ProviderMetrics::waiting`].
pub struct WaitGuard<'a> {
    metrics: &'a ProviderMetrics,
    since: std::time::Instant,
}

impl Drop for WaitGuard<'_> {
    fn drop(&mut self) {
        let ns = u64::try_from(self.since.elapsed().as_nanos()).unwrap_or(u64::MAX);
        self.metrics
            .limiter_wait_ns
            .fetch_add(ns, Ordering::Relaxed);
        self.metrics.limiter_waiting.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Every provider's counters for one run.
pub struct Metrics {
    providers: [Arc<ProviderMetrics>; ProviderKind::ALL.len()],
    started: SystemTime,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

/// What the end of a run adds to the textfile (`--metrics-file`).
#[derive(Debug, Clone, Copy)]
pub struct RunEnd {
    pub at: SystemTime,
    pub interrupted: bool,
    /// Every job done: none failed, none left unfinished, no error.
    pub succeeded: bool,
}

impl Metrics {
    pub fn new() -> Metrics {
        Metrics {
            providers: ProviderKind::ALL.map(|k| Arc::new(ProviderMetrics::new(k))),
            started: SystemTime::now(),
        }
    }

    pub fn provider(&self, kind: ProviderKind) -> Arc<ProviderMetrics> {
        self.providers[usize::from(kind.index())].clone()
    }

    /// The Prometheus text format (version 0.0.4) of every series. `jobs` is the
    /// store's count per (state, provider); `active` the providers this run works:
    /// their series are written even while zero, so rates start from a sample.
    pub fn render(
        &self,
        jobs: &BTreeMap<(JobState, ProviderKind), u64>,
        active: &[ProviderKind],
        end: Option<RunEnd>,
    ) -> String {
        let mut out = String::with_capacity(4096);
        let shown: Vec<&ProviderMetrics> = self
            .providers
            .iter()
            .map(|p| p.as_ref())
            .filter(|p| active.contains(&p.kind) || jobs.keys().any(|(_, k)| *k == p.kind))
            .collect();

        header(
            &mut out,
            "pixbatch_requests_total",
            "counter",
            "Requests sent to a provider's API host, by request kind and HTTP status (none: no answer).",
        );
        for p in &shown {
            for kind in RequestKind::ALL {
                for (slot, n) in p.requests[kind.index()].iter().enumerate() {
                    let n = n.load(Ordering::Relaxed);
                    if n == 0 {
                        continue;
                    }
                    let status = match slot {
                        SLOT_NONE => "none".to_string(),
                        SLOT_OTHER => "other".to_string(),
                        s => (s + 100).to_string(),
                    };
                    let _ = writeln!(
                        out,
                        "pixbatch_requests_total{{provider=\"{}\",kind=\"{}\",status=\"{status}\"}} {n}",
                        p.kind.name(),
                        kind.name()
                    );
                }
            }
        }
        let simple: [Simple; 4] = [
            (
                "pixbatch_rate_limited_total",
                "counter",
                "Answers saying too many requests (HTTP 429, or a 429 code inside a 200 answer).",
                |p| p.rate_limited.load(Ordering::Relaxed),
            ),
            (
                "pixbatch_retries_total",
                "counter",
                "Job steps that failed transiently and were scheduled again.",
                |p| p.retries.load(Ordering::Relaxed),
            ),
            (
                "pixbatch_downloaded_bytes_total",
                "counter",
                "Result bytes received (downloads as they stream, inline results when written).",
                |p| p.downloaded_bytes.load(Ordering::Relaxed),
            ),
            (
                "pixbatch_limiter_waiting_requests",
                "gauge",
                "Requests waiting for the rate limiter now.",
                |p| p.limiter_waiting.load(Ordering::Relaxed),
            ),
        ];
        for (name, kind, help, get) in simple {
            header(&mut out, name, kind, help);
            for p in &shown {
                let _ = writeln!(out, "{name}{{provider=\"{}\"}} {}", p.kind.name(), get(p));
            }
        }
        header(
            &mut out,
            "pixbatch_limiter_wait_seconds_total",
            "counter",
            "Time requests spent waiting for the rate limiter, summed over requests.",
        );
        for p in &shown {
            let ns = p.limiter_wait_ns.load(Ordering::Relaxed);
            let _ = writeln!(
                out,
                "pixbatch_limiter_wait_seconds_total{{provider=\"{}\"}} {}",
                p.kind.name(),
                Duration::from_nanos(ns).as_secs_f64()
            );
        }
        header(
            &mut out,
            "pixbatch_jobs_finished_total",
            "counter",
            "Jobs this run finished, by outcome.",
        );
        for p in &shown {
            for (outcome, n) in [("done", &p.jobs_done), ("failed", &p.jobs_failed)] {
                let _ = writeln!(
                    out,
                    "pixbatch_jobs_finished_total{{provider=\"{}\",outcome=\"{outcome}\"}} {}",
                    p.kind.name(),
                    n.load(Ordering::Relaxed)
                );
            }
        }
        header(
            &mut out,
            "pixbatch_jobs",
            "gauge",
            "Jobs in the database per state.",
        );
        for p in &shown {
            for state in JobState::ALL {
                let n = jobs.get(&(state, p.kind)).copied().unwrap_or(0);
                let _ = writeln!(
                    out,
                    "pixbatch_jobs{{provider=\"{}\",state=\"{}\"}} {n}",
                    p.kind.name(),
                    state.name()
                );
            }
        }
        header(
            &mut out,
            "pixbatch_run_start_time_seconds",
            "gauge",
            "When this run started (Unix time).",
        );
        let _ = writeln!(
            out,
            "pixbatch_run_start_time_seconds {}",
            unix_secs(self.started)
        );
        if let Some(end) = end {
            header(
                &mut out,
                "pixbatch_run_end_time_seconds",
                "gauge",
                "When this run ended (Unix time).",
            );
            let _ = writeln!(out, "pixbatch_run_end_time_seconds {}", unix_secs(end.at));
            header(
                &mut out,
                "pixbatch_run_interrupted",
                "gauge",
                "1 when the run was stopped (Ctrl-C, SIGTERM) before the queue was worked off.",
            );
            let _ = writeln!(
                out,
                "pixbatch_run_interrupted {}",
                u8::from(end.interrupted)
            );
            header(
                &mut out,
                "pixbatch_run_succeeded",
                "gauge",
                "1 when the run ended with every job done (exit code 0), else 0.",
            );
            let _ = writeln!(out, "pixbatch_run_succeeded {}", u8::from(end.succeeded));
        }
        out
    }
}

/// A one-label series: name, type, help, and how to read it.
type Simple = (
    &'static str,
    &'static str,
    &'static str,
    fn(&ProviderMetrics) -> u64,
);

fn header(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
}

fn unix_secs(t: SystemTime) -> f64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| (d.as_millis() as f64) / 1000.0)
        .unwrap_or(0.0)
}

/// Serves `render()` at `GET /metrics` on `listener` until the handle is aborted.
pub fn serve(
    listener: tokio::net::TcpListener,
    render: Arc<dyn Fn() -> String + Send + Sync>,
) -> tokio::task::JoinHandle<()> {
    use axum::http::header::CONTENT_TYPE;
    let app = axum::Router::new().route(
        "/metrics",
        axum::routing::get(move || {
            let render = render.clone();
            async move {
                // The store's counts are a small sled read: no need for a blocking
                // thread.
                (
                    [(CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")],
                    render(),
                )
            }
        }),
    );
    tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            tracing::warn!("metrics server stopped: {e}");
        }
    })
}

/// Binds the metrics address, saying which address failed and why.
pub async fn bind(addr: &str) -> Result<(tokio::net::TcpListener, SocketAddr), String> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| format!("--metrics-addr {addr}: {e}"))?;
    let local = listener
        .local_addr()
        .map_err(|e| format!("--metrics-addr {addr}: {e}"))?;
    Ok((listener, local))
}

/// Writes `text` to `path` the way node_exporter's textfile collector needs: to a
/// temporary name in the same folder (which does not end in `.prom`, so the
/// collector never reads a half-written file), synced, then renamed over `path`.
pub fn write_textfile(path: &Path, text: &str) -> std::io::Result<()> {
    use std::io::Write;
    let mut tmp_name = path.file_name().unwrap_or_default().to_os_string();
    tmp_name.push(format!(".{}.tmp", std::process::id()));
    let tmp = path.with_file_name(tmp_name);
    let result = (|| {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(text.as_bytes())?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> BTreeMap<String, f64> {
        let mut out = BTreeMap::new();
        let mut typed = std::collections::HashSet::new();
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                let name = rest.split(' ').next().unwrap_or_default();
                assert!(typed.insert(name.to_string()), "TYPE twice for {name}");
                continue;
            }
            if line.starts_with('#') {
                continue;
            }
            let (series, value) = line.rsplit_once(' ').expect("series and value");
            let name = series.split('{').next().unwrap_or_default();
            assert!(typed.contains(name), "{name} has no TYPE line before it");
            assert!(
                name.chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':'),
                "bad metric name {name}"
            );
            let v: f64 = value.parse().expect("a number");
            assert!(
                out.insert(series.to_string(), v).is_none(),
                "{series} twice"
            );
        }
        out
    }

    #[test]
    fn renders_what_was_counted() {
        let m = Metrics::new();
        let topaz = m.provider(ProviderKind::Topaz);
        topaz.request(RequestKind::Submit, Some(200));
        topaz.request(RequestKind::Poll, Some(200));
        topaz.request(RequestKind::Poll, Some(200));
        topaz.request(RequestKind::Poll, Some(429));
        topaz.request(RequestKind::Poll, None);
        topaz.request(RequestKind::Poll, Some(999));
        topaz.rate_limited();
        topaz.retry();
        topaz.job_done();
        topaz.downloaded(1234);
        {
            let _g = topaz.waiting();
            std::thread::sleep(Duration::from_millis(5));
        }
        let mut jobs = BTreeMap::new();
        jobs.insert((JobState::Done, ProviderKind::Topaz), 3);
        jobs.insert((JobState::Queued, ProviderKind::Photio), 2);
        let text = m.render(&jobs, &[ProviderKind::Topaz], None);
        let s = parse(&text);
        let get = |k: &str| *s.get(k).unwrap_or_else(|| panic!("no {k} in\n{text}"));
        assert_eq!(
            get(r#"pixbatch_requests_total{provider="topaz",kind="poll",status="200"}"#),
            2.0
        );
        assert_eq!(
            get(r#"pixbatch_requests_total{provider="topaz",kind="submit",status="200"}"#),
            1.0
        );
        assert_eq!(
            get(r#"pixbatch_requests_total{provider="topaz",kind="poll",status="none"}"#),
            1.0
        );
        assert_eq!(
            get(r#"pixbatch_requests_total{provider="topaz",kind="poll",status="other"}"#),
            1.0
        );
        assert_eq!(get(r#"pixbatch_rate_limited_total{provider="topaz"}"#), 1.0);
        assert_eq!(get(r#"pixbatch_retries_total{provider="topaz"}"#), 1.0);
        assert_eq!(
            get(r#"pixbatch_jobs_finished_total{provider="topaz",outcome="done"}"#),
            1.0
        );
        assert_eq!(
            get(r#"pixbatch_downloaded_bytes_total{provider="topaz"}"#),
            1234.0
        );
        assert!(get(r#"pixbatch_limiter_wait_seconds_total{provider="topaz"}"#) >= 0.005);
        assert_eq!(
            get(r#"pixbatch_limiter_waiting_requests{provider="topaz"}"#),
            0.0
        );
        assert_eq!(get(r#"pixbatch_jobs{provider="topaz",state="done"}"#), 3.0);
        // A provider with jobs but no lane still shows its job counts.
        assert_eq!(
            get(r#"pixbatch_jobs{provider="photio",state="queued"}"#),
            2.0
        );
        assert_eq!(get(r#"pixbatch_jobs{provider="photio",state="done"}"#), 0.0);
        // Providers with neither are left out.
        assert!(!text.contains("dzine"));
        assert!(!text.contains("pixbatch_run_end_time_seconds"));
    }

    #[test]
    fn the_textfile_is_replaced_whole_and_has_the_end() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("pixbatch.prom");
        std::fs::write(&path, "old").unwrap();
        let m = Metrics::new();
        let text = m.render(
            &BTreeMap::new(),
            &[ProviderKind::Photio],
            Some(RunEnd {
                at: SystemTime::now(),
                interrupted: false,
                succeeded: false,
            }),
        );
        write_textfile(&path, &text).unwrap();
        let written = std::fs::read_to_string(&path).unwrap();
        let s = parse(&written);
        assert_eq!(s["pixbatch_run_succeeded"], 0.0);
        assert_eq!(s["pixbatch_run_interrupted"], 0.0);
        assert!(s["pixbatch_run_end_time_seconds"] >= s["pixbatch_run_start_time_seconds"]);
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names.len(), 1, "a temporary file was left: {names:?}");
    }
}
