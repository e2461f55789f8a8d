//! The provider simulator behind `pixbatch sim`, `pixbatch demo`, the tests and the
//! benchmarks.
//!
//! One HTTP server on one port serves every simulated provider under its own path prefix
//! (`/topaz`, `/photio`, `/aithriving`; `/perfect` and `/dzine` slot in the same way). Each
//! provider module follows its document: paths, auth, validation, JSON shapes, status
//! sequences. This module owns what they share:
//!
//! * the request pipeline ([`pipeline`]): arrival time and sequence number, the
//!   provider's sliding-window rate limits, the auth check, chaos, the provider's handler,
//!   then delivery (normal, slowed, truncated or reset) and one ledger entry;
//! * the ledger and the control endpoints under `/_sim/` (never metered, never recorded);
//! * configuration ([`SimArgs`] for the CLI, [`SimConfig`] for code).
//!
//! Every request is handled in a task of its own, so a client that hangs up half way
//! cannot cancel a submission the simulator has already accepted and charged: the
//! ledger always tells what the provider would have billed.
//!
//! Adding a provider: a module with `route`, `authorize`, `too_many`, `server_error`,
//! `request_key_hint` and `handle`, a variant in [`Provider`], its default limits in
//! [`DEFAULT_LIMITS`].

mod aithriving;
mod chaos;
mod dzine;
mod form;
pub mod images;
mod ledger;
mod limiter;
mod net;
mod perfect;
mod photio;
mod presign;
mod topaz;

use std::collections::BTreeMap;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use axum::body::{Body, Bytes};
use axum::extract::{ConnectInfo, DefaultBodyLimit, Request, State};
use axum::http::{header, HeaderMap, HeaderName, HeaderValue, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use sha2::{Digest, Sha256};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;

use crate::rate::RateSpec;

pub use ledger::{LedgerEntry, Stats};

use chaos::{Chaos, Fault};
use ledger::Ledger;
use limiter::{retry_after_secs, Limiters};
use net::{ConnInfo, SimListener};

/// The limits the simulator enforces unless told otherwise. The client's defaults are the
/// same, so a default run never trips them.
/// Perfect's are the document's (100 per minute per access token and 100 per 5
/// minutes per IP: with one client on loopback both count every request). Dzine
/// publishes none, so the simulator enforces none unless told (`--limit dzine=…`).
pub const DEFAULT_LIMITS: &[(&str, &[&str])] = &[
    ("topaz", &["10/1s"]),
    ("photio", &["4/1s"]),
    ("aithriving", &["4/1s"]),
    ("perfect", &["100/1m", "100/5m"]),
];

/// Provider names `--limit` accepts (those still to come included, so scripts can be
/// written ahead).
pub const PROVIDER_NAMES: &[&str] = &["topaz", "photio", "aithriving", "perfect", "dzine"];

/// Command-line options of `pixbatch sim` (the CLI flattens this and owns `--addr`).
#[derive(clap::Args, Debug, Clone)]
pub struct SimArgs {
    /// Seed for the chaos decisions and the ids the simulator hands out.
    #[arg(long, value_name = "N", default_value_t = 1)]
    pub seed: u64,

    /// Shorthand: set all five chaos rates (429, 5xx, slow, reset, truncate) at once;
    /// the specific options below win over it.
    #[arg(long, value_name = "RATE")]
    pub chaos: Option<f64>,

    /// Fraction (0..1) of requests answered 429 before being handled.
    #[arg(long = "chaos-429", value_name = "RATE")]
    pub chaos_429: Option<f64>,

    /// Injected 429s carry `Retry-After: SECS`. Unset: half carry `Retry-After: 1`,
    /// half carry none.
    #[arg(long = "chaos-retry-after", value_name = "SECS")]
    pub chaos_retry_after: Option<u64>,

    /// Fraction (0..1) of requests answered 500, 502 or 503 before being handled.
    #[arg(long = "chaos-5xx", value_name = "RATE")]
    pub chaos_5xx: Option<f64>,

    /// Fraction (0..1) of requests answered only after `--slow-ms`.
    #[arg(long = "chaos-slow", value_name = "RATE")]
    pub chaos_slow: Option<f64>,

    /// How long a slowed answer is held back.
    #[arg(long = "slow-ms", value_name = "MS", default_value_t = 2000)]
    pub slow_ms: u64,

    /// Fraction (0..1) of requests whose connection is dropped after they were handled
    /// (a paid submission is accepted and charged, then its answer is lost).
    #[arg(long = "chaos-reset", value_name = "RATE")]
    pub chaos_reset: Option<f64>,

    /// Fraction (0..1) of image-bearing answers cut off half way.
    #[arg(long = "chaos-truncate", value_name = "RATE")]
    pub chaos_truncate: Option<f64>,

    /// Replace a provider's rate limits, e.g. `topaz=10/1s` or `perfect=100/1m,100/5m`
    /// (repeatable). `PROVIDER=none` removes them.
    #[arg(long = "limit", value_name = "PROVIDER=SPEC[,SPEC]")]
    pub limit: Vec<String>,

    /// Start without the default limits (limits given with `--limit` still apply).
    #[arg(long = "no-limits")]
    pub no_limits: bool,

    /// How long an asynchronous task takes from submission to completion (and how long
    /// a synchronous call takes to answer).
    #[arg(long = "task-ms", value_name = "MS", default_value_t = 800)]
    pub task_ms: u64,

    /// Lifetime of presigned download URLs.
    #[arg(long = "link-ttl-ms", value_name = "MS", default_value_t = 3_600_000)]
    pub link_ttl_ms: u64,

    /// A Perfect task not polled for this long is dropped (the document's 10 s;
    /// shorter for time-scaled tests, with the client's `keep_alive` to match).
    #[arg(long = "keep-alive-ms", value_name = "MS", default_value_t = 10_000)]
    pub keep_alive_ms: u64,

    /// Lifetime of the access tokens Perfect's auth hands out (the document's 2 hours;
    /// shorter to see a client renew one mid-run).
    #[arg(long = "token-ttl-ms", value_name = "MS", default_value_t = 7_200_000)]
    pub token_ttl_ms: u64,

    /// Pad every Topaz result image to at least this many bytes (a private PNG chunk
    /// or JPEG comments the decoders skip): large downloads for benchmarks.
    #[arg(long = "result-bytes", value_name = "BYTES", default_value_t = 0)]
    pub result_bytes: usize,

    /// Keep only the newest N ledger entries (0 = all); `/_sim/stats` stays exact.
    /// For long benchmark runs, whose ledger would otherwise grow without bound.
    #[arg(long = "ledger-cap", value_name = "N", default_value_t = 0)]
    pub ledger_cap: usize,

    /// Every new Perfect task answers 400 `InvalidTaskId` to its polls for this long
    /// after creation before it shows (0 = never), as live clients report.
    #[arg(
        long = "perfect-early-invalid-ms",
        value_name = "MS",
        default_value_t = 0
    )]
    pub perfect_early_invalid_ms: u64,

    /// Where Perfect's style lists put their items: `result.groups` (the document),
    /// `result.style_groups` or `data.style_groups` (shapes other clients read).
    #[arg(
        long = "perfect-style-shape",
        value_name = "SHAPE",
        default_value = "result.groups"
    )]
    pub perfect_style_shape: String,

    /// Every new Dzine task answers 404 for this long after creation (0 = only every
    /// third task, for half of `--task-ms`), as a live client needed up to ten 1 s
    /// polls for.
    #[arg(long = "dzine-early-404-ms", value_name = "MS", default_value_t = 0)]
    pub dzine_early_404_ms: u64,
}

impl SimArgs {
    /// Validate the options into a configuration.
    pub fn into_config(self) -> Result<SimConfig, String> {
        let rate = |name: &str, specific: Option<f64>| -> Result<f64, String> {
            let v = specific.or(self.chaos).unwrap_or(0.0);
            if v.is_finite() && (0.0..=1.0).contains(&v) {
                Ok(v)
            } else {
                Err(format!(
                    "--{name} must be a number between 0 and 1, got {v}"
                ))
            }
        };
        let chaos = ChaosConfig {
            rate_429: rate("chaos-429", self.chaos_429)?,
            retry_after_secs: self.chaos_retry_after,
            rate_5xx: rate("chaos-5xx", self.chaos_5xx)?,
            rate_slow: rate("chaos-slow", self.chaos_slow)?,
            slow: Duration::from_millis(self.slow_ms),
            rate_reset: rate("chaos-reset", self.chaos_reset)?,
            rate_truncate: rate("chaos-truncate", self.chaos_truncate)?,
        };
        let mut limits = if self.no_limits {
            BTreeMap::new()
        } else {
            default_limits()
        };
        for arg in &self.limit {
            let (provider, specs) = parse_limit_arg(arg)?;
            limits.insert(provider, specs);
        }
        let perfect_style_shape = match self.perfect_style_shape.as_str() {
            "result.groups" => StyleShape::Result,
            "result.style_groups" => StyleShape::ResultStyleGroups,
            "data.style_groups" => StyleShape::DataStyleGroups,
            other => {
                return Err(format!(
                    "--perfect-style-shape {other:?}: one of result.groups, result.style_groups, data.style_groups"
                ))
            }
        };
        Ok(SimConfig {
            perfect_early_invalid: Duration::from_millis(self.perfect_early_invalid_ms),
            perfect_style_shape,
            dzine_early_404: Duration::from_millis(self.dzine_early_404_ms),
            seed: self.seed,
            chaos,
            limits,
            task_duration: Duration::from_millis(self.task_ms),
            link_ttl: Duration::from_millis(self.link_ttl_ms),
            keep_alive: Duration::from_millis(self.keep_alive_ms),
            token_ttl: Duration::from_millis(self.token_ttl_ms),
            result_bytes: self.result_bytes,
            ledger_cap: self.ledger_cap,
            ..SimConfig::default()
        })
    }
}

/// `PROVIDER=SPEC[,SPEC]` (or `PROVIDER=none`).
fn parse_limit_arg(arg: &str) -> Result<(String, Vec<RateSpec>), String> {
    let (provider, specs) = arg.split_once('=').ok_or_else(|| {
        format!("--limit {arg:?}: expected PROVIDER=SPEC[,SPEC], e.g. topaz=10/1s")
    })?;
    let provider = provider.trim().to_ascii_lowercase();
    if !PROVIDER_NAMES.contains(&provider.as_str()) {
        return Err(format!(
            "--limit {arg:?}: unknown provider {provider:?} (one of {})",
            PROVIDER_NAMES.join(", ")
        ));
    }
    if specs.trim().eq_ignore_ascii_case("none") {
        return Ok((provider, Vec::new()));
    }
    let specs = specs
        .split(',')
        .map(|s| {
            s.parse::<RateSpec>()
                .map_err(|e| format!("--limit {arg:?}: {e}"))
        })
        .collect::<Result<Vec<_>, _>>()?;
    Ok((provider, specs))
}

/// The default limits as a map (see [`DEFAULT_LIMITS`]).
pub fn default_limits() -> BTreeMap<String, Vec<RateSpec>> {
    DEFAULT_LIMITS
        .iter()
        .map(|(p, specs)| {
            let specs = specs.iter().filter_map(|s| s.parse().ok()).collect();
            (p.to_string(), specs)
        })
        .collect()
}

/// Everything the simulator needs to run.
#[derive(Debug, Clone)]
pub struct SimConfig {
    /// Seed for chaos decisions and generated ids.
    pub seed: u64,
    pub chaos: ChaosConfig,
    /// Provider name -> limits, all enforced together; missing or empty = unlimited.
    pub limits: BTreeMap<String, Vec<RateSpec>>,
    /// How long an asynchronous task takes from submission to completion; synchronous
    /// endpoints (Topaz `/enhance`, Photio, AIThriving) take as long to answer.
    pub task_duration: Duration,
    /// Lifetime of presigned download URLs.
    pub link_ttl: Duration,
    /// How long a Perfect task may go unpolled before it is dropped.
    pub keep_alive: Duration,
    /// Lifetime of Perfect access tokens.
    pub token_ttl: Duration,
    /// The largest image (input or output, in pixels) the simulator decodes or produces;
    /// above it, requests the providers would accept are refused with a "simulator
    /// limit" message. Protects the machine running the tests.
    pub max_pixels: u64,
    /// Request bodies above this are answered 413.
    pub max_body_bytes: usize,
    /// Topaz result images are padded to at least this many bytes (0: as encoded).
    pub result_bytes: usize,
    /// The ledger keeps at most this many entries (0: all).
    pub ledger_cap: usize,
    /// New Perfect tasks answer `InvalidTaskId` for this long (0: never).
    pub perfect_early_invalid: Duration,
    /// Where Perfect's style lists put their items.
    pub perfect_style_shape: StyleShape,
    /// Every new Dzine task answers 404 for this long (0: every third, briefly).
    pub dzine_early_404: Duration,
}

/// The answer shapes of Perfect's style lists that clients read (docs/simulator.md).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum StyleShape {
    /// `result.groups` / `result.styles` (the document).
    #[default]
    Result,
    /// `result.style_groups` / `result.styles`.
    ResultStyleGroups,
    /// `data.style_groups` / `data.styles`, without a `result`.
    DataStyleGroups,
}

impl Default for SimConfig {
    fn default() -> Self {
        SimConfig {
            seed: 1,
            chaos: ChaosConfig {
                slow: Duration::from_millis(2000),
                ..ChaosConfig::default()
            },
            limits: default_limits(),
            task_duration: Duration::from_millis(800),
            link_ttl: Duration::from_millis(3_600_000),
            keep_alive: Duration::from_secs(10),
            token_ttl: Duration::from_secs(7200),
            max_pixels: 40_000_000,
            max_body_bytes: 64 * 1024 * 1024,
            result_bytes: 0,
            ledger_cap: 0,
            perfect_early_invalid: Duration::ZERO,
            perfect_style_shape: StyleShape::Result,
            dzine_early_404: Duration::ZERO,
        }
    }
}

/// Fault injection rates (each 0..1) and shapes.
#[derive(Debug, Clone, Default)]
pub struct ChaosConfig {
    /// Requests answered 429 before the handler.
    pub rate_429: f64,
    /// `Retry-After` on injected 429s; `None`: half carry `1`, half carry none.
    pub retry_after_secs: Option<u64>,
    /// Requests answered 500/502/503 before the handler.
    pub rate_5xx: f64,
    /// Requests answered only after `slow`.
    pub rate_slow: f64,
    pub slow: Duration,
    /// Requests whose connection is dropped after handling.
    pub rate_reset: f64,
    /// Image-bearing answers cut off half way.
    pub rate_truncate: f64,
}

/// Serve until `shutdown` completes. Tests bind port 0 and pass any future.
pub async fn serve(
    listener: TcpListener,
    config: SimConfig,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> io::Result<()> {
    SimServer::bind(listener, config)?.run(shutdown).await
}

/// A simulator whose state is built (keys made, limits set) but that does not serve
/// yet: lets the caller show the credentials before the first request can arrive.
pub struct SimServer {
    listener: TcpListener,
    shared: Arc<Shared>,
}

impl SimServer {
    pub fn bind(listener: TcpListener, config: SimConfig) -> io::Result<SimServer> {
        let local_addr = listener.local_addr()?;
        let shared = Arc::new(Shared::new(config, local_addr)?);
        Ok(SimServer { listener, shared })
    }

    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// Per provider, the credentials the simulator accepts that a client cannot make
    /// up (see [`SimHandle::credentials`]).
    pub fn credentials(&self) -> serde_json::Value {
        credentials(&self.shared)
    }

    pub async fn run(self, shutdown: impl Future<Output = ()> + Send + 'static) -> io::Result<()> {
        let local_addr = self.listener.local_addr()?;
        tracing::info!("simulator listening on http://{local_addr}");
        let app = router(self.shared);
        axum::serve(
            SimListener::new(self.listener),
            app.into_make_service_with_connect_info::<ConnInfo>(),
        )
        .with_graceful_shutdown(shutdown)
        .await
    }
}

fn credentials(s: &Shared) -> serde_json::Value {
    serde_json::json!({
        "perfect": perfect::credentials(s),
        "dzine": dzine::credentials(s),
    })
}

/// A simulator running in the background of the current tokio runtime.
pub struct SimHandle {
    addr: SocketAddr,
    credentials: serde_json::Value,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<io::Result<()>>,
}

impl SimHandle {
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://127.0.0.1:PORT`; provider base URLs are this plus the provider prefix plus
    /// the real API's path (e.g. `/topaz/image/v1`).
    pub fn base_url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// `{"perfect": {...}, "dzine": {...}}`: what `/_sim/credentials` answers.
    pub fn credentials(&self) -> &serde_json::Value {
        &self.credentials
    }

    /// Stop accepting, finish the requests in flight, and return.
    pub async fn shutdown(mut self) -> io::Result<()> {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        (&mut self.task).await.map_err(io::Error::other)?
    }
}

/// Bind 127.0.0.1 on a free port and serve there in the background.
pub async fn spawn(config: SimConfig) -> io::Result<SimHandle> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let server = SimServer::bind(listener, config)?;
    let addr = server.local_addr()?;
    let credentials = server.credentials();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(server.run(async move {
        let _ = stopped.await;
    }));
    Ok(SimHandle {
        addr,
        credentials,
        stop: Some(stop),
        task,
    })
}

// ---------------------------------------------------------------------------------------
// Shared state

pub(crate) struct Shared {
    pub(crate) config: SimConfig,
    /// `t_ms` in the ledger counts from here.
    started: Instant,
    /// Next ledger `seq`.
    seq: AtomicU64,
    ledger: Ledger,
    limiters: Limiters,
    chaos: Chaos,
    /// Ids handed out (Topaz process ids), seeded so runs are reproducible.
    ids: Mutex<SmallRng>,
    /// Key for presigned URL signatures.
    pub(crate) secret: [u8; 32],
    /// Where presigned URLs point when the request had no usable `Host`.
    pub(crate) local_addr: SocketAddr,
    /// Bounds concurrent image work to the number of CPUs.
    cpu: Semaphore,
    /// For Photio's image URLs (loopback only).
    pub(crate) http: reqwest::Client,
    pub(crate) topaz: topaz::TopazState,
    pub(crate) perfect: perfect::PerfectState,
    pub(crate) dzine: dzine::DzineState,
}

impl Shared {
    fn new(config: SimConfig, local_addr: SocketAddr) -> io::Result<Self> {
        let secret: [u8; 32] = Sha256::new()
            .chain_update(b"pixbatch-sim-presign")
            .chain_update(config.seed.to_le_bytes())
            .finalize()
            .into();
        let http = reqwest::Client::builder()
            .no_proxy()
            .connect_timeout(Duration::from_secs(5))
            .timeout(Duration::from_secs(30))
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .map_err(io::Error::other)?;
        let cpus = std::thread::available_parallelism().map_or(2, |n| n.get());
        Ok(Shared {
            started: Instant::now(),
            seq: AtomicU64::new(0),
            ledger: Ledger::with_cap(config.ledger_cap),
            limiters: Limiters::new(&config.limits),
            chaos: Chaos::new(config.chaos.clone(), config.seed),
            ids: Mutex::new(SmallRng::seed_from_u64(config.seed ^ 0x05ee_d1d5_u64)),
            secret,
            local_addr,
            cpu: Semaphore::new(cpus.max(1)),
            http,
            topaz: topaz::TopazState::default(),
            perfect: perfect::PerfectState::new(&config),
            dzine: dzine::DzineState::new(&config),
            config,
        })
    }

    /// A fresh v4 UUID from the seeded generator.
    pub(crate) fn new_uuid(&self) -> String {
        let mut bytes = [0u8; 16];
        lock(&self.ids).fill(&mut bytes);
        uuid::Builder::from_random_bytes(bytes)
            .into_uuid()
            .hyphenated()
            .to_string()
    }

    /// Run CPU-heavy image work off the async threads, at most one job per CPU.
    pub(crate) async fn cpu<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> Result<T, String> + Send + 'static,
    ) -> Result<T, String> {
        let _permit = self
            .cpu
            .acquire()
            .await
            .map_err(|_| "simulator shutting down".to_string())?;
        tokio::task::spawn_blocking(f)
            .await
            .map_err(|e| format!("image worker failed: {e}"))?
    }
}

/// Lock a mutex, shrugging off poisoning (a panicked holder cannot leave our plain data
/// half-written in a way that matters to a simulator).
pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

pub(crate) fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// The key rule shared by every provider: any non-empty key not starting with `invalid`.
pub(crate) fn key_ok(key: &str) -> bool {
    !key.trim().is_empty() && !key.starts_with("invalid")
}

pub(crate) fn header_str<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers.get(name).and_then(|v| v.to_str().ok())
}

// ---------------------------------------------------------------------------------------
// Providers and routes

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Provider {
    Topaz,
    Photio,
    AiThriving,
    Perfect,
    Dzine,
}

impl Provider {
    pub(crate) const ALL: [Provider; 5] = [
        Provider::Topaz,
        Provider::Photio,
        Provider::AiThriving,
        Provider::Perfect,
        Provider::Dzine,
    ];

    pub(crate) fn name(self) -> &'static str {
        match self {
            Provider::Topaz => "topaz",
            Provider::Photio => "photio",
            Provider::AiThriving => "aithriving",
            Provider::Perfect => "perfect",
            Provider::Dzine => "dzine",
        }
    }

    fn prefix(self) -> &'static str {
        match self {
            Provider::Topaz => "/topaz",
            Provider::Photio => "/photio",
            Provider::AiThriving => "/aithriving",
            Provider::Perfect => "/perfect",
            Provider::Dzine => "/dzine",
        }
    }

    fn from_path(path: &str) -> Option<Provider> {
        Provider::ALL.into_iter().find(|p| {
            path.strip_prefix(p.prefix())
                .is_some_and(|rest| rest.is_empty() || rest.starts_with('/'))
        })
    }

    fn route(self, method: &Method, rest: &str) -> Route {
        match self {
            Provider::Topaz => topaz::route(method, rest),
            Provider::Photio => photio::route(method, rest),
            Provider::AiThriving => aithriving::route(method, rest),
            Provider::Perfect => perfect::route(method, rest),
            Provider::Dzine => dzine::route(method, rest),
        }
    }

    fn request_key_hint(self, s: &Shared, route: &Route) -> Option<String> {
        match self {
            Provider::Topaz => topaz::request_key_hint(s, route),
            Provider::Perfect => perfect::request_key_hint(s, route),
            Provider::Dzine => dzine::request_key_hint(s, route),
            Provider::Photio | Provider::AiThriving => None,
        }
    }

    fn authorize(self, s: &Shared, ctx: &Ctx, req: &Request) -> Result<(), Reply> {
        match self {
            Provider::Topaz => topaz::authorize(s, ctx, req),
            Provider::Photio => photio::authorize(req),
            Provider::AiThriving => aithriving::authorize(req),
            Provider::Perfect => perfect::authorize(s, ctx, req),
            Provider::Dzine => dzine::authorize(s, ctx, req),
        }
    }

    /// A 429 in the provider's shape. `violation`: refused for the configured limits.
    fn too_many(self, route: &Route, retry_after: Option<u64>) -> Reply {
        let reply = match self {
            Provider::Topaz => topaz::too_many(route),
            Provider::Photio => photio::too_many(),
            Provider::AiThriving => aithriving::too_many(),
            Provider::Perfect => perfect::too_many(route),
            Provider::Dzine => dzine::too_many(route),
        };
        match retry_after {
            Some(secs) => reply.header(header::RETRY_AFTER, &secs.to_string()),
            None => reply,
        }
    }

    fn server_error(self, route: &Route, code: u16) -> Reply {
        let status = StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        if status == StatusCode::BAD_GATEWAY {
            // What a load balancer in front of any of them answers.
            return Reply::bytes(
                status,
                "text/html",
                Bytes::from_static(
                    b"<html>\r\n<head><title>502 Bad Gateway</title></head>\r\n<body>\r\n<center><h1>502 Bad Gateway</h1></center>\r\n</body>\r\n</html>\r\n",
                ),
            );
        }
        match self {
            Provider::Topaz => topaz::server_error(route, status),
            Provider::Photio => photio::server_error(status),
            Provider::AiThriving => aithriving::server_error(status),
            Provider::Perfect => perfect::server_error(route, status),
            Provider::Dzine => dzine::server_error(route, status),
        }
    }

    async fn handle(self, s: &Arc<Shared>, ctx: &Ctx, req: Request) -> Reply {
        match self {
            Provider::Topaz => topaz::handle(s, ctx, req).await,
            Provider::Photio => photio::handle(s, ctx, req).await,
            Provider::AiThriving => aithriving::handle(s, ctx, req).await,
            Provider::Perfect => perfect::handle(s, ctx, req).await,
            Provider::Dzine => dzine::handle(s, ctx, req).await,
        }
    }
}

/// What the pipeline needs to know about a request before handling it.
#[derive(Debug, Clone)]
pub(crate) struct Route {
    /// The ledger's endpoint name; `unknown` for paths/methods the provider lacks.
    pub(crate) endpoint: &'static str,
    /// Counts against the provider's rate limit.
    pub(crate) metered: bool,
    /// A successful answer carries image bytes (truncation applies).
    pub(crate) carries_image: bool,
    /// The remote task named in the path, if any.
    pub(crate) remote_id: Option<String>,
}

impl Route {
    pub(crate) fn api(endpoint: &'static str) -> Self {
        Route {
            endpoint,
            metered: true,
            carries_image: false,
            remote_id: None,
        }
    }

    pub(crate) fn image(mut self) -> Self {
        self.carries_image = true;
        self
    }

    pub(crate) fn unmetered(mut self) -> Self {
        self.metered = false;
        self
    }

    pub(crate) fn about(mut self, id: &str) -> Self {
        self.remote_id = Some(id.to_string());
        self
    }
}

/// Per-request facts handed to the handlers.
#[derive(Debug, Clone)]
pub(crate) struct Ctx {
    pub(crate) arrived: Instant,
    pub(crate) arrived_unix_ms: u64,
    /// The client's `X-Request-Id`.
    pub(crate) request_key: Option<String>,
    pub(crate) route: Route,
}

impl Ctx {
    /// Sleep until `task_duration` after arrival: what a synchronous call costs.
    pub(crate) async fn sync_processing(&self, s: &Shared) {
        tokio::time::sleep_until((self.arrived + s.config.task_duration).into()).await;
    }
}

/// A handler's answer plus what the ledger should say about it. Boxed: it travels
/// through many `Result`s and is built once per request.
#[derive(Debug)]
pub(crate) struct Reply(Box<ReplyInner>);

#[derive(Debug)]
pub(crate) struct ReplyInner {
    pub(crate) status: StatusCode,
    pub(crate) headers: HeaderMap,
    pub(crate) body: Bytes,
    pub(crate) charged: bool,
    pub(crate) remote_id: Option<String>,
    pub(crate) request_key: Option<String>,
    pub(crate) output_sha256: Option<String>,
    pub(crate) dropped: bool,
}

impl Reply {
    pub(crate) fn bytes(status: StatusCode, content_type: &str, body: Bytes) -> Self {
        let mut headers = HeaderMap::new();
        if let Ok(v) = HeaderValue::from_str(content_type) {
            headers.insert(header::CONTENT_TYPE, v);
        }
        Reply(Box::new(ReplyInner {
            status,
            headers,
            body,
            charged: false,
            remote_id: None,
            request_key: None,
            output_sha256: None,
            dropped: false,
        }))
    }

    pub(crate) fn json(status: StatusCode, value: &serde_json::Value) -> Self {
        let body = serde_json::to_vec(value).unwrap_or_default();
        Reply::bytes(status, "application/json", Bytes::from(body))
    }

    pub(crate) fn empty(status: StatusCode) -> Self {
        let mut r = Reply::bytes(status, "", Bytes::new());
        r.headers.clear();
        r
    }

    pub(crate) fn header(mut self, name: HeaderName, value: &str) -> Self {
        if let Ok(v) = HeaderValue::from_str(value) {
            self.headers.insert(name, v);
        }
        self
    }

    /// The answer reports a task dropped for want of a poll (ledger `dropped`).
    pub(crate) fn dropped(mut self) -> Self {
        self.0.dropped = true;
        self
    }

    pub(crate) fn charged(mut self) -> Self {
        self.charged = true;
        self
    }

    pub(crate) fn remote(mut self, id: &str) -> Self {
        self.remote_id = Some(id.to_string());
        self
    }

    pub(crate) fn key(mut self, key: Option<String>) -> Self {
        if key.is_some() {
            self.request_key = key;
        }
        self
    }

    pub(crate) fn sha(mut self, sha: String) -> Self {
        self.output_sha256 = Some(sha);
        self
    }

    fn into_response(self) -> Response {
        let this = *self.0;
        let mut resp = Response::new(Body::from(this.body));
        *resp.status_mut() = this.status;
        *resp.headers_mut() = this.headers;
        resp
    }

    /// The status line and headers with the full `Content-Length`, then `keep` bytes of
    /// the body, then a broken stream: hyper aborts the connection mid-body.
    fn into_broken_response(self, keep: usize) -> Response {
        use futures_util::StreamExt;
        let this = *self.0;
        let full = this.body.len();
        let head = this.body.slice(..keep.min(full));
        let stream = futures_util::stream::once(async move { Ok::<Bytes, io::Error>(head) }).chain(
            futures_util::stream::once(async {
                // Let hyper flush what it has before the connection breaks.
                tokio::time::sleep(Duration::from_millis(30)).await;
                Err(io::Error::new(
                    io::ErrorKind::ConnectionReset,
                    "simulated broken connection",
                ))
            }),
        );
        let mut resp = Response::new(Body::from_stream(stream));
        *resp.status_mut() = this.status;
        *resp.headers_mut() = this.headers;
        resp.headers_mut()
            .insert(header::CONTENT_LENGTH, HeaderValue::from(full as u64));
        resp
    }
}

impl std::ops::Deref for Reply {
    type Target = ReplyInner;
    fn deref(&self) -> &ReplyInner {
        &self.0
    }
}

impl std::ops::DerefMut for Reply {
    fn deref_mut(&mut self) -> &mut ReplyInner {
        &mut self.0
    }
}

// ---------------------------------------------------------------------------------------
// The server

/// Credentials the simulated providers accept that a client cannot make up (Perfect's
/// client id and RSA public key, generated at start).
async fn get_credentials(State(s): State<Arc<Shared>>) -> Json<serde_json::Value> {
    Json(credentials(&s))
}

fn router(shared: Arc<Shared>) -> Router {
    let limit = shared.config.max_body_bytes;
    Router::new()
        .route("/_sim/ledger", get(get_ledger))
        .route("/_sim/stats", get(get_stats))
        .route("/_sim/reset-ledger", post(reset_ledger))
        .route(
            "/_sim/health",
            get(|| async { Json(serde_json::json!({"ok": true})) }),
        )
        .route("/_sim/config", get(get_config))
        .route("/_sim/credentials", get(get_credentials))
        .fallback(dispatch)
        .layer(DefaultBodyLimit::max(limit))
        .with_state(shared)
}

async fn get_ledger(State(s): State<Arc<Shared>>, req: Request) -> Response {
    let mut after_seq = None;
    let mut provider = None;
    if let Some(q) = req.uri().query() {
        for (k, v) in url::form_urlencoded::parse(q.as_bytes()) {
            match k.as_ref() {
                "after_seq" => after_seq = v.parse::<u64>().ok(),
                "provider" => provider = Some(v.into_owned()),
                _ => {}
            }
        }
    }
    let entries = s.ledger.entries(after_seq, provider.as_deref());
    Json(serde_json::json!({ "entries": entries })).into_response()
}

async fn get_stats(State(s): State<Arc<Shared>>) -> Response {
    Json(s.ledger.stats()).into_response()
}

async fn reset_ledger(State(s): State<Arc<Shared>>) -> StatusCode {
    s.ledger.clear();
    StatusCode::NO_CONTENT
}

async fn get_config(State(s): State<Arc<Shared>>) -> Response {
    let c = &s.config;
    let limits: BTreeMap<&String, Vec<String>> = c
        .limits
        .iter()
        .map(|(p, specs)| (p, specs.iter().map(|r| r.to_string()).collect()))
        .collect();
    Json(serde_json::json!({
        "seed": c.seed,
        "limits": limits,
        "task_ms": c.task_duration.as_millis() as u64,
        "link_ttl_ms": c.link_ttl.as_millis() as u64,
        "max_pixels": c.max_pixels,
        "max_body_bytes": c.max_body_bytes,
        "result_bytes": c.result_bytes,
        "ledger_cap": c.ledger_cap,
        "chaos": {
            "rate_429": c.chaos.rate_429,
            "retry_after_secs": c.chaos.retry_after_secs,
            "rate_5xx": c.chaos.rate_5xx,
            "rate_slow": c.chaos.rate_slow,
            "slow_ms": c.chaos.slow.as_millis() as u64,
            "rate_reset": c.chaos.rate_reset,
            "rate_truncate": c.chaos.rate_truncate,
        },
    }))
    .into_response()
}

/// Everything that is not `/_sim/...`.
async fn dispatch(State(s): State<Arc<Shared>>, req: Request) -> Response {
    let Some(provider) = Provider::from_path(req.uri().path()) else {
        return (
            StatusCode::NOT_FOUND,
            Json(serde_json::json!({
                "error": "not a simulated provider path (prefixes: /topaz, /photio, /aithriving, /perfect, /dzine; control: /_sim)"
            })),
        )
            .into_response();
    };
    // A task of its own: a client hanging up must not cancel an accepted submission
    // half way, nor lose its ledger entry.
    match tokio::spawn(pipeline(s, provider, req)).await {
        Ok(resp) => resp,
        Err(e) => {
            tracing::error!("sim: request task failed: {e}");
            (
                StatusCode::INTERNAL_SERVER_ERROR,
                "simulator request task failed",
            )
                .into_response()
        }
    }
}

/// Arrival -> limits -> auth -> chaos -> handler -> delivery, one ledger entry.
async fn pipeline(s: Arc<Shared>, provider: Provider, req: Request) -> Response {
    let arrived = Instant::now();
    let arrived_unix_ms = unix_ms();
    let conn = req
        .extensions()
        .get::<ConnectInfo<ConnInfo>>()
        .map(|c| c.0.clone());
    let path = req.uri().path().to_string();
    let rest = path.get(provider.prefix().len()..).unwrap_or("");
    let route = provider.route(req.method(), rest);
    let header_key = header_str(req.headers(), "x-request-id")
        .map(str::trim)
        .filter(|k| !k.is_empty())
        .map(str::to_string);
    let seq = s.seq.fetch_add(1, Ordering::SeqCst);
    let mut entry = LedgerEntry {
        seq,
        t_ms: arrived.duration_since(s.started).as_millis() as u64,
        provider: provider.name().to_string(),
        method: req.method().to_string(),
        path: path.clone(),
        endpoint: route.endpoint.to_string(),
        status: 0,
        request_key: provider
            .request_key_hint(&s, &route)
            .or_else(|| header_key.clone()),
        remote_id: route.remote_id.clone(),
        charged: false,
        metered: route.metered,
        violation: false,
        fault: None,
        retry_after_s: None,
        output_sha256: None,
        dropped: false,
    };
    let ctx = Ctx {
        arrived,
        arrived_unix_ms,
        request_key: header_key,
        route,
    };

    if ctx.route.metered {
        if let Err(wait) = s.limiters.try_acquire(provider.name(), arrived) {
            // Topaz says when to come back; the others do not.
            let retry_after = (provider == Provider::Topaz).then(|| retry_after_secs(wait));
            entry.violation = true;
            entry.retry_after_s = retry_after;
            let reply = provider.too_many(&ctx.route, retry_after);
            drain(&s, req).await;
            return deliver(&s, entry, reply, None, conn).await;
        }
    }

    // Unknown paths answer 404/405 whatever the credentials, which points a client with
    // a wrong base URL at the real problem.
    let auth = if ctx.route.endpoint == "unknown" {
        Ok(())
    } else {
        provider.authorize(&s, &ctx, &req)
    };
    if let Err(reply) = auth {
        drain(&s, req).await;
        return deliver(&s, entry, reply, None, conn).await;
    }

    let fault = s.chaos.draw(ctx.route.carries_image);
    match fault {
        Some(Fault::TooMany { retry_after }) => {
            entry.retry_after_s = retry_after;
            let reply = provider.too_many(&ctx.route, retry_after);
            drain(&s, req).await;
            return deliver(&s, entry, reply, fault, conn).await;
        }
        Some(Fault::ServerError(code)) => {
            let reply = provider.server_error(&ctx.route, code);
            drain(&s, req).await;
            return deliver(&s, entry, reply, fault, conn).await;
        }
        _ => {}
    }

    let reply = provider.handle(&s, &ctx, req).await;
    deliver(&s, entry, reply, fault, conn).await
}

/// Read and discard the body of a request answered without handling, so the client gets
/// to read the answer instead of failing to write its upload.
async fn drain(s: &Shared, req: Request) {
    let _ = form::read_body(req, s.config.max_body_bytes).await;
}

/// Record the entry, then send the reply the way the fault says.
async fn deliver(
    s: &Shared,
    mut entry: LedgerEntry,
    reply: Reply,
    fault: Option<Fault>,
    conn: Option<ConnInfo>,
) -> Response {
    entry.status = reply.status.as_u16();
    entry.charged |= reply.charged;
    if reply.remote_id.is_some() {
        entry.remote_id = reply.remote_id.clone();
    }
    if reply.request_key.is_some() {
        entry.request_key = reply.request_key.clone();
    }
    entry.output_sha256 = reply.output_sha256.clone();
    entry.dropped = reply.dropped;
    let fault = match fault {
        Some(Fault::Truncate)
            if !(reply.status.is_success()
                && reply.output_sha256.is_some()
                && !reply.body.is_empty()) =>
        {
            None
        }
        f => f,
    };
    entry.fault = fault.map(|f| f.name().to_string());
    // A HEAD answer has no body to break: reset those silently.
    let is_head = entry.method == "HEAD";
    s.ledger.record(entry);

    match fault {
        Some(Fault::Slow) => {
            tokio::time::sleep(s.config.chaos.slow).await;
            reply.into_response()
        }
        Some(Fault::Truncate) => {
            let keep = reply.body.len() / 2;
            reply.into_broken_response(keep)
        }
        Some(Fault::Reset { drop_silently }) => match conn {
            Some(conn) if drop_silently || is_head => {
                conn.kill.kill();
                Reply::empty(StatusCode::INTERNAL_SERVER_ERROR).into_response()
            }
            _ => reply.into_broken_response(0),
        },
        _ => reply.into_response(),
    }
}

#[cfg(test)]
pub(crate) mod testutil {
    //! Helpers for the simulator's own tests.

    use super::*;

    pub(crate) fn config() -> SimConfig {
        SimConfig {
            limits: BTreeMap::new(),
            task_duration: Duration::from_millis(100),
            link_ttl: Duration::from_secs(60),
            ..SimConfig::default()
        }
    }

    pub(crate) async fn start(config: SimConfig) -> (SimHandle, String) {
        let h = spawn(config).await.unwrap();
        let base = h.base_url();
        (h, base)
    }

    pub(crate) fn client() -> reqwest::Client {
        reqwest::Client::builder().no_proxy().build().unwrap()
    }

    pub(crate) async fn ledger(base: &str) -> Vec<LedgerEntry> {
        #[derive(serde::Deserialize)]
        struct L {
            entries: Vec<LedgerEntry>,
        }
        let l: L = client()
            .get(format!("{base}/_sim/ledger"))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        l.entries
    }

    pub(crate) async fn stats(base: &str) -> Stats {
        client()
            .get(format!("{base}/_sim/stats"))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap()
    }
}

#[cfg(test)]
mod tests {
    use super::testutil::*;
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        sim: SimArgs,
    }

    fn args(a: &[&str]) -> Result<SimConfig, String> {
        let mut v = vec!["sim"];
        v.extend_from_slice(a);
        Cli::try_parse_from(v)
            .map_err(|e| e.to_string())?
            .sim
            .into_config()
    }

    #[test]
    fn cli_defaults_equal_config_defaults() {
        let a = args(&[]).unwrap();
        let d = SimConfig::default();
        assert_eq!(a.seed, d.seed);
        assert_eq!(a.limits, d.limits);
        assert_eq!(a.task_duration, d.task_duration);
        assert_eq!(a.link_ttl, d.link_ttl);
        assert_eq!(a.chaos.slow, d.chaos.slow);
        assert_eq!(a.chaos.rate_429, 0.0);
        assert_eq!(
            a.limits["topaz"],
            vec!["10/1s".parse::<RateSpec>().unwrap()]
        );
        assert_eq!(
            a.limits["photio"],
            vec!["4/1s".parse::<RateSpec>().unwrap()]
        );
        assert_eq!(
            a.limits["aithriving"],
            vec!["4/1s".parse::<RateSpec>().unwrap()]
        );
    }

    #[test]
    fn cli_chaos_shorthand_and_overrides() {
        let c = args(&[
            "--chaos",
            "0.1",
            "--chaos-5xx",
            "0.3",
            "--chaos-retry-after",
            "4",
        ])
        .unwrap();
        assert_eq!(c.chaos.rate_429, 0.1);
        assert_eq!(c.chaos.rate_5xx, 0.3);
        assert_eq!(c.chaos.rate_slow, 0.1);
        assert_eq!(c.chaos.rate_reset, 0.1);
        assert_eq!(c.chaos.rate_truncate, 0.1);
        assert_eq!(c.chaos.retry_after_secs, Some(4));
        assert!(args(&["--chaos-429", "1.5"]).is_err());
        assert!(args(&["--chaos", "-0.1"]).is_err());
    }

    #[test]
    fn cli_limits() {
        let c = args(&["--limit", "topaz=3/1s,100/1m", "--limit", "photio=none"]).unwrap();
        assert_eq!(c.limits["topaz"].len(), 2);
        assert!(c.limits["photio"].is_empty());
        assert_eq!(c.limits["aithriving"].len(), 1);
        let c = args(&["--no-limits", "--limit", "perfect=100/1m,100/5m"]).unwrap();
        assert_eq!(c.limits.len(), 1);
        assert!(args(&["--limit", "nobody=1/1s"]).is_err());
        assert!(args(&["--limit", "topaz"]).is_err());
        assert!(args(&["--limit", "topaz=1/1d"]).is_err());
    }

    #[tokio::test]
    async fn control_endpoints_and_unknown_paths() {
        let (h, base) = start(config()).await;
        let c = client();
        let r = c.get(format!("{base}/elsewhere")).send().await.unwrap();
        assert_eq!(r.status(), 404);
        let r = c
            .get(format!("{base}/photio/nothing"))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 404);
        let r = c.get(format!("{base}/topazzz/x")).send().await.unwrap();
        assert_eq!(r.status(), 404);
        let l = ledger(&base).await;
        assert_eq!(l.len(), 1, "only the /photio request is recorded: {l:?}");
        assert_eq!(l[0].endpoint, "unknown");
        assert_eq!(l[0].provider, "photio");
        assert!(l[0].metered);
        let st = stats(&base).await;
        assert_eq!(st.requests["photio"], 1);
        assert_eq!(st.requests["topaz"], 0);
        assert_eq!(st.faults.len(), 5);
        let r = c
            .post(format!("{base}/_sim/reset-ledger"))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 204);
        assert!(ledger(&base).await.is_empty());
        let r = c.get(format!("{base}/_sim/config")).send().await.unwrap();
        assert_eq!(r.status(), 200);
        h.shutdown().await.unwrap();
    }

    #[tokio::test]
    async fn uuids_are_seeded() {
        let a = Shared::new(SimConfig::default(), "127.0.0.1:1".parse().unwrap()).unwrap();
        let b = Shared::new(SimConfig::default(), "127.0.0.1:1".parse().unwrap()).unwrap();
        let ua = a.new_uuid();
        assert_eq!(ua, b.new_uuid());
        assert!(uuid::Uuid::parse_str(&ua).is_ok());
        assert_ne!(ua, a.new_uuid());
    }
}
