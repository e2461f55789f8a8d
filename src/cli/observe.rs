//! What `run` shows to monitoring: Prometheus metrics over HTTP while it works
//! (`--metrics-addr`) and a node_exporter textfile when it ends (`--metrics-file`).
//! The counters themselves live in `crate::metrics`; this is the wiring.

use super::*;

use crate::engine::RunSummary;
use crate::metrics::{Metrics, RunEnd};

/// `run`'s metrics options.
#[derive(Args, Debug, Default, Clone)]
pub struct MetricsArgs {
    /// Serve Prometheus metrics at http://ADDR/metrics while the run works
    /// (e.g. 127.0.0.1:9464; no authentication: keep it on loopback or a private net).
    #[arg(long = "metrics-addr", value_name = "ADDR")]
    pub addr: Option<String>,
    /// When the run ends, write the same metrics to PATH for node_exporter's textfile
    /// collector (e.g. /var/lib/node_exporter/pixbatch.prom), replacing it atomically.
    #[arg(long = "metrics-file", value_name = "PATH")]
    pub file: Option<PathBuf>,
}

/// Running for as long as the run: aborts the server when dropped.
pub(super) struct Observer {
    server: Option<tokio::task::JoinHandle<()>>,
    file: Option<PathBuf>,
    metrics: Arc<Metrics>,
    active: Vec<ProviderKind>,
    store: Store,
}

impl Drop for Observer {
    fn drop(&mut self) {
        if let Some(s) = &self.server {
            s.abort();
        }
    }
}

impl Observer {
    /// Starts the metrics server if asked; a port that cannot be bound stops the
    /// run before any work (a cron job should not run unobserved by mistake).
    pub(super) async fn start(
        args: &MetricsArgs,
        engine: &Engine,
        store: &Store,
    ) -> Result<Observer, Fail> {
        if let Some(dir) = args.file.as_deref().and_then(Path::parent) {
            if !dir.as_os_str().is_empty() && !dir.is_dir() {
                return Err(Fail(
                    EXIT_ERROR,
                    format!("--metrics-file: no folder {}", dir.display()),
                ));
            }
        }
        let (metrics, active) = engine.metrics();
        let mut observer = Observer {
            server: None,
            file: args.file.clone(),
            metrics,
            active,
            store: store.clone(),
        };
        if let Some(addr) = &args.addr {
            let (listener, local) = crate::metrics::bind(addr).await.map_err(Fail::from)?;
            let render = {
                let (metrics, active, store) = (
                    observer.metrics.clone(),
                    observer.active.clone(),
                    observer.store.clone(),
                );
                Arc::new(move || {
                    let jobs = store.counts().unwrap_or_default();
                    metrics.render(&jobs, &active, None)
                })
            };
            observer.server = Some(crate::metrics::serve(listener, render));
            tracing::info!("metrics at http://{local}/metrics");
        }
        Ok(observer)
    }

    /// Writes the textfile (if asked) with how the run ended; `None` when the
    /// engine stopped with an error.
    pub(super) fn finish(&self, summary: Option<&RunSummary>) {
        let Some(path) = &self.file else {
            return;
        };
        let end = RunEnd {
            at: std::time::SystemTime::now(),
            interrupted: summary.is_some_and(|s| s.interrupted),
            succeeded: summary
                .is_some_and(|s| !s.interrupted && s.failed == 0 && s.unfinished == 0),
        };
        let jobs = self.store.counts().unwrap_or_default();
        let text = self.metrics.render(&jobs, &self.active, Some(end));
        match crate::metrics::write_textfile(path, &text) {
            Ok(()) => tracing::debug!("metrics written to {}", path.display()),
            Err(e) => tracing::warn!("could not write the metrics file {}: {e}", path.display()),
        }
    }
}
