//! Configuration: built-in defaults, then the TOML file, then the environment.
//!
//! ```toml
//! [providers.topaz]
//! base_url = "https://api.topazlabs.com/image/v1"
//! concurrency = 8
//! rate_limits = ["10/1s"]
//! max_attempts = 8
//! poll_interval = "3s"
//! timeout = "120s"
//! max_in_flight = 16
//! ```
//!
//! Credentials come from the environment (`TOPAZ_API_KEY` …) or the file's
//! `api_key`/`client_id`/`client_secret`; they are held only in memory.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::model::ProviderKind;
use crate::providers::{self, Credentials};
use crate::rate::RateSpec;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("config file {path}: {message}")]
    File { path: String, message: String },
    #[error("{0}")]
    Invalid(String),
}

/// Everything the engine needs to know about one provider.
#[derive(Debug, Clone)]
pub struct ProviderConfig {
    pub kind: ProviderKind,
    pub base_url: String,
    /// Requests to this provider in progress at once.
    pub concurrency: usize,
    /// All enforced together.
    pub rate_limits: Vec<RateSpec>,
    /// Failed attempts (429s excluded) before a job fails for good.
    pub max_attempts: u32,
    pub poll_interval: Duration,
    /// Per-request read timeout (reset on every read) — not a bound on a whole
    /// download, which may legitimately take long.
    pub timeout: Duration,
    /// Remote tasks accepted and not yet finished, at most. Polls of these come
    /// before new submissions, so this bounds how much of the rate budget polling
    /// can take.
    pub max_in_flight: usize,
    /// How long after a submission was sent a provider's "never heard of it" is
    /// believed: a request from a process that died may still be in transit or in
    /// the provider's queue.
    pub reconcile_grace: Duration,
    /// Slow down on 429s and 5xx and speed up again while answers are healthy
    /// (additive increase, multiplicative decrease), never above `rate_limits`. For
    /// providers that publish no limit (Dzine).
    pub adaptive: bool,
    /// Overrides the adapter's keep-alive (how long an accepted task may go unpolled
    /// before the provider drops it), for time-scaled tests against the simulator.
    pub keep_alive: Option<Duration>,
    /// Overrides the adapter's early "no such task" window: how long after a
    /// submission was sent such an answer is taken as "accepted, not visible yet"
    /// rather than "lost" (Perfect's `InvalidTaskId`, Dzine's 404). `None`: the
    /// adapter's default (docs/providers.md).
    pub early_not_found: Option<Duration>,
    /// What one job costs in the provider's unit (credits, tokens), when the user
    /// knows it: lets `run` warn before starting when the balance looks too low.
    pub cost_per_job: Option<f64>,
    /// Operation name → the provider's path segment for it, overriding the built-in
    /// table (Perfect's document leaves some feature slugs unverified).
    pub operations: BTreeMap<String, String>,
    /// How long the provider may go without a single answer (connect refused, DNS,
    /// timeouts) before the run halts it, its jobs kept queued: a wrong base URL must
    /// not make a cron run wait without end.
    pub unreachable_after: Duration,
    /// Turns `validate`'s warnings for this provider (a model or parameter pixbatch
    /// does not know) into row errors. Off by default: providers add models faster
    /// than pixbatch is released, and Topaz ignores parameters it does not use.
    pub strict_params: bool,
    pub credentials: Credentials,
}

/// Settings that are not per provider.
#[derive(Debug, Clone)]
pub struct EngineSettings {
    /// Largest result file accepted (a hostile URL cannot fill the disk).
    pub max_download_bytes: u64,
    /// Widening of every rate window (see `engine::limiter`).
    pub rate_margin: Duration,
    /// How long a provider outage may last before jobs' attempts count again.
    pub outage_patience: Duration,
    /// Where the per-credential rate budgets live (`engine::budget::state_dir`):
    /// `$PIXBATCH_STATE_DIR`, `$XDG_STATE_HOME/pixbatch` or
    /// `~/.local/state/pixbatch`. None: no home, the database's own log is used.
    pub state_dir: Option<PathBuf>,
}

impl Default for EngineSettings {
    fn default() -> Self {
        EngineSettings {
            max_download_bytes: 2 * 1024 * 1024 * 1024,
            rate_margin: Duration::from_millis(30),
            outage_patience: Duration::from_secs(30 * 60),
            state_dir: None,
        }
    }
}

#[derive(Debug, Clone)]
pub struct Config {
    pub providers: BTreeMap<ProviderKind, ProviderConfig>,
    pub engine: EngineSettings,
    /// The file the configuration was read from, if any.
    pub source: Option<PathBuf>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    #[serde(default)]
    providers: BTreeMap<String, FileProvider>,
    #[serde(default)]
    engine: Option<FileEngine>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileEngine {
    max_download_bytes: Option<u64>,
    rate_margin: Option<String>,
    outage_patience: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileProvider {
    base_url: Option<String>,
    concurrency: Option<usize>,
    rate_limits: Option<Vec<String>>,
    max_attempts: Option<u32>,
    poll_interval: Option<String>,
    timeout: Option<String>,
    max_in_flight: Option<usize>,
    reconcile_grace: Option<String>,
    adaptive: Option<bool>,
    keep_alive: Option<String>,
    early_not_found: Option<String>,
    cost_per_job: Option<f64>,
    operations: Option<BTreeMap<String, String>>,
    unreachable_after: Option<String>,
    strict_params: Option<bool>,
    api_key: Option<String>,
    client_id: Option<String>,
    client_secret: Option<String>,
}

/// A provider without one answer for this long is halted (`unreachable_after`):
/// long enough to ride out a restart or a network blip, short enough that a cron
/// run with a wrong URL ends.
pub const DEFAULT_UNREACHABLE_AFTER: Duration = Duration::from_secs(20 * 60);

/// The documented or, where a provider publishes none, conservative defaults.
/// `docs/providers.md` gives the reason for each.
pub fn default_provider_config(kind: ProviderKind) -> ProviderConfig {
    let rates = |list: &[&str]| list.iter().filter_map(|s| s.parse().ok()).collect();
    let (concurrency, rate_limits, poll_ms, timeout_s, in_flight) = match kind {
        ProviderKind::Topaz => (8, rates(&["10/1s"]), 2_000, 120, 16),
        ProviderKind::Photio => (4, rates(&["4/1s"]), 1_000, 300, 4),
        ProviderKind::Aithriving => (4, rates(&["4/1s"]), 1_000, 300, 4),
        // Perfect: every accepted task is polled at least every 10 s, and each poll
        // holds a step slot for a moment; in-flight tasks are bounded by the rate
        // budget (the engine's keep-alive admission), so the concurrency is generous.
        ProviderKind::Perfect => (16, rates(&["100/1m", "100/5m"]), 2_000, 120, 64),
        // Dzine publishes no limit: a modest ceiling, adapted down on 429/5xx.
        ProviderKind::Dzine => (4, rates(&["5/1s"]), 2_000, 120, 16),
    };
    ProviderConfig {
        kind,
        base_url: providers::default_base_url(kind).to_string(),
        concurrency,
        rate_limits,
        max_attempts: 8,
        poll_interval: Duration::from_millis(poll_ms),
        timeout: Duration::from_secs(timeout_s),
        max_in_flight: in_flight,
        reconcile_grace: Duration::from_secs(30),
        adaptive: kind == ProviderKind::Dzine,
        keep_alive: None,
        early_not_found: None,
        cost_per_job: None,
        operations: BTreeMap::new(),
        unreachable_after: DEFAULT_UNREACHABLE_AFTER,
        strict_params: false,
        credentials: Credentials::default(),
    }
}

/// The environment variables a provider reads: (base URL, API key or client id,
/// client secret).
pub fn env_names(kind: ProviderKind) -> (&'static str, &'static str, Option<&'static str>) {
    match kind {
        ProviderKind::Dzine => ("PIXBATCH_DZINE_URL", "DZINE_API_KEY", None),
        ProviderKind::Perfect => (
            "PIXBATCH_PERFECT_URL",
            "PERFECT_CLIENT_ID",
            Some("PERFECT_CLIENT_SECRET"),
        ),
        ProviderKind::Topaz => ("PIXBATCH_TOPAZ_URL", "TOPAZ_API_KEY", None),
        ProviderKind::Photio => ("PIXBATCH_PHOTIO_URL", "PHOTIO_API_KEY", None),
        ProviderKind::Aithriving => ("PIXBATCH_AITHRIVING_URL", "AITHRIVING_API_KEY", None),
    }
}

impl Config {
    /// Loads `explicit` if given (it must exist), else `./pixbatch.toml` if present,
    /// then applies `env` (a lookup, so tests need not touch the process environment).
    pub fn load(
        explicit: Option<&Path>,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<Config, ConfigError> {
        let (file, source) = match explicit {
            Some(p) => (Some(read_file(p)?), Some(p.to_path_buf())),
            None => {
                let p = PathBuf::from("pixbatch.toml");
                if p.is_file() {
                    (Some(read_file(&p)?), Some(p))
                } else {
                    (None, None)
                }
            }
        };
        let file = file.unwrap_or_default();
        let source_name = source
            .as_ref()
            .map(|p| p.display().to_string())
            .unwrap_or_else(|| "the defaults".into());
        let bad = |m: String| ConfigError::File {
            path: source_name.clone(),
            message: m,
        };

        let mut engine = EngineSettings {
            state_dir: crate::engine::budget::state_dir(env),
            ..EngineSettings::default()
        };
        if let Some(e) = &file.engine {
            if let Some(b) = e.max_download_bytes {
                engine.max_download_bytes = b;
            }
            if let Some(m) = &e.outage_patience {
                engine.outage_patience =
                    parse_duration(m).map_err(|m| bad(format!("engine.outage_patience: {m}")))?;
            }
            if let Some(m) = &e.rate_margin {
                engine.rate_margin =
                    parse_duration(m).map_err(|m| bad(format!("engine.rate_margin: {m}")))?;
            }
        }

        let mut providers = BTreeMap::new();
        for (name, _) in file.providers.iter() {
            name.parse::<ProviderKind>()
                .map_err(|e| bad(format!("[providers.{name}]: {e}")))?;
        }
        for kind in ProviderKind::ALL {
            let mut c = default_provider_config(kind);
            if let Some(f) = file.providers.get(kind.name()) {
                let ctx = |field: &str, m: String| bad(format!("providers.{kind}.{field}: {m}"));
                if let Some(v) = &f.base_url {
                    c.base_url = v.clone();
                }
                if let Some(v) = f.concurrency {
                    if v == 0 {
                        return Err(ctx("concurrency", "must be at least 1".into()));
                    }
                    c.concurrency = v;
                }
                if let Some(list) = &f.rate_limits {
                    c.rate_limits = list
                        .iter()
                        .map(|s| s.parse::<RateSpec>())
                        .collect::<Result<_, _>>()
                        .map_err(|e| ctx("rate_limits", e.to_string()))?;
                }
                if let Some(v) = f.max_attempts {
                    if v == 0 {
                        return Err(ctx("max_attempts", "must be at least 1".into()));
                    }
                    c.max_attempts = v;
                }
                if let Some(v) = &f.poll_interval {
                    c.poll_interval = parse_duration(v).map_err(|m| ctx("poll_interval", m))?;
                }
                if let Some(v) = &f.timeout {
                    c.timeout = parse_duration(v).map_err(|m| ctx("timeout", m))?;
                }
                if let Some(v) = f.max_in_flight {
                    if v == 0 {
                        return Err(ctx("max_in_flight", "must be at least 1".into()));
                    }
                    c.max_in_flight = v;
                }
                if let Some(v) = &f.reconcile_grace {
                    c.reconcile_grace = parse_duration(v).map_err(|m| ctx("reconcile_grace", m))?;
                }
                if let Some(v) = f.adaptive {
                    c.adaptive = v;
                }
                if let Some(v) = &f.unreachable_after {
                    let d = parse_duration(v).map_err(|m| ctx("unreachable_after", m))?;
                    if d.is_zero() {
                        return Err(ctx("unreachable_after", "must be longer than 0".into()));
                    }
                    c.unreachable_after = d;
                }
                if let Some(v) = f.strict_params {
                    c.strict_params = v;
                }
                if let Some(v) = &f.keep_alive {
                    c.keep_alive = Some(parse_duration(v).map_err(|m| ctx("keep_alive", m))?);
                }
                if let Some(v) = &f.early_not_found {
                    c.early_not_found =
                        Some(parse_duration(v).map_err(|m| ctx("early_not_found", m))?);
                }
                if let Some(v) = f.cost_per_job {
                    if !(v.is_finite() && v >= 0.0) {
                        return Err(ctx(
                            "cost_per_job",
                            format!("must be a number ≥ 0, got {v}"),
                        ));
                    }
                    c.cost_per_job = Some(v);
                }
                if let Some(map) = &f.operations {
                    for (op, slug) in map {
                        let ok = !slug.is_empty()
                            && slug
                                .chars()
                                .all(|ch| ch.is_ascii_alphanumeric() || "-_.".contains(ch));
                        if !ok {
                            return Err(ctx(
                                "operations",
                                format!(
                                    "{op} = {slug:?}: a path segment of letters, digits, -_. only"
                                ),
                            ));
                        }
                    }
                    c.operations = map.clone();
                }
                c.credentials.api_key = f.api_key.clone();
                c.credentials.client_id = f.client_id.clone();
                c.credentials.client_secret = f.client_secret.clone();
            }
            let (url_var, key_var, secret_var) = env_names(kind);
            if let Some(v) = env(url_var).filter(|v| !v.trim().is_empty()) {
                c.base_url = v;
            }
            if let Some(v) = env(key_var).filter(|v| !v.is_empty()) {
                if kind == ProviderKind::Perfect {
                    c.credentials.client_id = Some(v);
                } else {
                    c.credentials.api_key = Some(v);
                }
            }
            // Perfect's second way in: a console API key sent as the Bearer token.
            if kind == ProviderKind::Perfect {
                if let Some(v) = env("PERFECT_API_KEY").filter(|v| !v.is_empty()) {
                    c.credentials.api_key = Some(v);
                }
            }
            if let Some(var) = secret_var {
                if let Some(v) = env(var).filter(|v| !v.is_empty()) {
                    c.credentials.client_secret = Some(v);
                }
            }
            check_base_url(&c.base_url)
                .map_err(|m| ConfigError::Invalid(format!("{kind}: {m}")))?;
            providers.insert(kind, c);
        }
        Ok(Config {
            providers,
            engine,
            source,
        })
    }

    /// The settings of `kind` (`load` fills every kind; defaults otherwise).
    pub fn provider(&self, kind: ProviderKind) -> ProviderConfig {
        self.providers
            .get(&kind)
            .cloned()
            .unwrap_or_else(|| default_provider_config(kind))
    }

    /// Every secret held, for scrubbing logs and messages.
    pub fn secrets(&self) -> Vec<String> {
        self.providers
            .values()
            .flat_map(|p| p.credentials.secrets())
            .collect()
    }
}

fn read_file(path: &Path) -> Result<FileConfig, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|e| ConfigError::File {
        path: path.display().to_string(),
        message: e.to_string(),
    })?;
    toml::from_str(&text).map_err(|e| ConfigError::File {
        path: path.display().to_string(),
        message: e.to_string(),
    })
}

/// "2s", "500ms", "1m30s" (humantime), or a bare number of seconds.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    if let Ok(secs) = s.parse::<f64>() {
        if secs.is_finite() && secs >= 0.0 {
            return Ok(Duration::from_secs_f64(secs));
        }
    }
    humantime::parse_duration(s).map_err(|e| format!("invalid duration {s:?}: {e}"))
}

/// Whether `url` names this machine (127.0.0.0/8, ::1, `localhost`): the only hosts
/// plain http may go to. A name that merely starts with one (`127.0.0.1.example.com`,
/// `localhost.example.com`) is not.
pub fn is_loopback(url: &url::Url) -> bool {
    match url.host() {
        Some(url::Host::Ipv4(ip)) => ip.is_loopback(),
        Some(url::Host::Ipv6(ip)) => ip.is_loopback(),
        Some(url::Host::Domain(d)) => d.eq_ignore_ascii_case("localhost"),
        None => false,
    }
}

/// Plain http only to loopback: credentials must not cross a network in clear.
pub fn check_base_url(base: &str) -> Result<(), String> {
    let url = url::Url::parse(base).map_err(|e| format!("base URL {base:?} is not a URL: {e}"))?;
    match url.scheme() {
        "https" => Ok(()),
        "http" => {
            if is_loopback(&url) {
                Ok(())
            } else {
                Err(format!(
                    "base URL {base:?} uses plain http to a host that is not loopback; use https"
                ))
            }
        }
        other => Err(format!("base URL {base:?} has scheme {other:?}; use https")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn no_env(_: &str) -> Option<String> {
        None
    }

    #[test]
    fn file_then_environment() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.toml");
        std::fs::write(
            &path,
            r#"
[providers.perfect]
rate_limits = ["50/1m", "80/5m"]
poll_interval = "1500ms"
[providers.topaz]
base_url = "http://127.0.0.1:9/topaz/image/v1"
api_key = "from-file"
concurrency = 2
"#,
        )
        .unwrap();
        let env = |k: &str| (k == "TOPAZ_API_KEY").then(|| "from-env".to_string());
        let c = Config::load(Some(&path), &env).unwrap();
        let p = c.provider(ProviderKind::Perfect);
        assert_eq!(p.rate_limits.len(), 2);
        assert_eq!(p.rate_limits[1].to_string(), "80/5m");
        assert_eq!(p.poll_interval, Duration::from_millis(1500));
        let t = c.provider(ProviderKind::Topaz);
        assert_eq!(t.concurrency, 2);
        assert_eq!(t.credentials.api_key.as_deref(), Some("from-env"));
        assert!(!format!("{:?}", t.credentials).contains("from-env"));
    }

    #[test]
    fn defaults_follow_the_documents() {
        let c = Config::load(None, &no_env).unwrap();
        let p = c.provider(ProviderKind::Perfect);
        let limits: Vec<String> = p.rate_limits.iter().map(|r| r.to_string()).collect();
        assert_eq!(limits, vec!["100/1m", "100/5m"]);
    }

    /// `pixbatch sim` must refuse exactly what the client's defaults would send.
    #[test]
    fn client_defaults_equal_the_simulators_limits() {
        for (name, limits) in crate::sim::default_limits() {
            let kind: ProviderKind = name.parse().unwrap();
            assert_eq!(default_provider_config(kind).rate_limits, limits, "{name}");
        }
    }

    #[test]
    fn plain_http_only_to_loopback() {
        assert!(check_base_url("http://127.0.0.1:8080/topaz").is_ok());
        assert!(check_base_url("http://localhost:1/x").is_ok());
        assert!(check_base_url("http://[::1]:1/x").is_ok());
        assert!(check_base_url("https://api.topazlabs.com/image/v1").is_ok());
        assert!(check_base_url("http://api.topazlabs.com/image/v1").is_err());
        assert!(check_base_url("http://10.0.0.1/x").is_err());
        assert!(check_base_url("ftp://127.0.0.1/x").is_err());
        // Names that only look local, and other schemes.
        for bad in [
            "http://127.0.0.1.nip.io/x",
            "http://localhost.example.com/x",
            "http://example.com/127.0.0.1",
            "http://169.254.169.254/latest",
            "http://[::ffff:10.0.0.1]/x",
            "file:///etc/passwd",
            "ws://127.0.0.1/x",
            "127.0.0.1:8080/x",
            "",
        ] {
            assert!(check_base_url(bad).is_err(), "{bad}");
        }
        assert!(check_base_url("http://LOCALHOST:9/x").is_ok());
        assert!(check_base_url("http://127.8.9.10/x").is_ok());
        // The environment variable and the file are both checked, naming the culprit.
        let env = |k: &str| (k == "PIXBATCH_PHOTIO_URL").then(|| "http://example.com".to_string());
        assert!(Config::load(None, &env).is_err());
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.toml");
        std::fs::write(
            &path,
            "[providers.dzine]\nbase_url = \"http://dzine.example/openapi/v1\"\n",
        )
        .unwrap();
        let e = Config::load(Some(&path), &no_env).unwrap_err().to_string();
        assert!(e.contains("dzine.example") && e.contains("https"), "{e}");
    }

    #[test]
    fn bad_files_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.toml");
        std::fs::write(&path, "[providers.topaz]\nrate_limits = [\"10/1d\"]\n").unwrap();
        let e = Config::load(Some(&path), &no_env).unwrap_err().to_string();
        assert!(e.contains("c.toml") && e.contains("rate_limits"), "{e}");
        std::fs::write(&path, "[providers.nope]\n").unwrap();
        assert!(Config::load(Some(&path), &no_env).is_err());
    }

    #[test]
    fn unreachable_after_is_per_provider_with_a_default_in_tens_of_minutes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.toml");
        std::fs::write(&path, "[providers.topaz]\nunreachable_after = \"90s\"\n").unwrap();
        let c = Config::load(Some(&path), &no_env).unwrap();
        assert_eq!(
            c.provider(ProviderKind::Topaz).unreachable_after,
            Duration::from_secs(90)
        );
        assert_eq!(
            c.provider(ProviderKind::Photio).unreachable_after,
            DEFAULT_UNREACHABLE_AFTER
        );
        std::fs::write(&path, "[providers.topaz]\nunreachable_after = \"0s\"\n").unwrap();
        let e = Config::load(Some(&path), &no_env).unwrap_err().to_string();
        assert!(e.contains("unreachable_after"), "{e}");
    }
}
