//! `run`, `enqueue`, `validate` and `demo`: the commands that fill and work the queue.

use super::*;

pub(super) async fn cmd_run(
    db: &Path,
    out: &Path,
    config: Config,
    manifests: &[PathBuf],
    quiet: bool,
    bar: SharedBar,
) -> Result<i32, Fail> {
    let _lock = lock_for_writing(db, "run")?;
    let store = open_store(db)?;
    if !manifests.is_empty() {
        enqueue_into(&store, &config, manifests, quiet)?;
    }
    work(store, db, out, config, quiet, bar).await
}

/// Runs the engine over `store` until done or interrupted; prints the summary.
pub(super) async fn work(
    store: Store,
    db: &Path,
    out: &Path,
    config: Config,
    quiet: bool,
    bar: SharedBar,
) -> Result<i32, Fail> {
    std::fs::create_dir_all(out)
        .map_err(|e| Fail(EXIT_ERROR, format!("output folder {}: {e}", out.display())))?;
    let engine = Engine::new(store.clone(), config, out.to_path_buf())
        .map_err(|e| Fail(EXIT_ERROR, e.to_string()))?;
    let stats = engine.stats();
    let started = now_ms();
    let live = {
        let stats = stats.clone();
        Arc::new(move || LiveInfo {
            pid: std::process::id(),
            started_ms: started,
            rate_per_sec: stats.rate_per_sec(started),
            finished_this_run: stats.done.load(std::sync::atomic::Ordering::Relaxed)
                + stats.failed.load(std::sync::atomic::Ordering::Relaxed),
        })
    };
    let canceller = Some(engine.canceller());
    let _control =
        match crate::control::serve(&lock::socket_path(db), store.clone(), live, canceller) {
            Ok(c) => Some(c),
            Err(e) => {
                tracing::warn!(
                    "status queries from other processes will not work: control socket: {e}"
                );
                None
            }
        };
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(StopSignal::Run);
    tokio::spawn(async move {
        let mut presses = 0;
        loop {
            if !wait_for_stop_signal().await {
                return;
            }
            presses += 1;
            if presses == 1 {
                eprintln!("pixbatch: stopping: finishing requests in flight (Ctrl-C again to quit at once)");
                let _ = stop_tx.send(StopSignal::Graceful);
            } else {
                eprintln!("pixbatch: quitting now; the next run resumes");
                std::process::exit(EXIT_INTERRUPTED);
            }
        }
    });
    let display: Arc<dyn engine::ProgressSink> =
        Arc::new(Display::new(bar.clone(), quiet, Duration::from_secs(10)));
    let summary = engine.run(stop_rx, Some(display)).await;
    bar.finish();
    let summary = summary.map_err(|e| Fail(EXIT_ERROR, e.to_string()))?;
    let line = format!(
        "{} done, {} failed, {} cancelled, {} unfinished ({} finished by this run)",
        summary.done,
        summary.failed,
        summary.cancelled,
        summary.unfinished,
        summary.finished_this_run
    );
    println!("{line}");
    if summary.interrupted {
        eprintln!("pixbatch: interrupted; run again to resume");
        return Ok(EXIT_INTERRUPTED);
    }
    if summary.failed > 0 {
        eprintln!("pixbatch: some jobs failed; see `pixbatch list --state failed` and `pixbatch retry --failed`");
        return Ok(EXIT_FAILED_JOBS);
    }
    if summary.unfinished > 0 {
        return Ok(EXIT_ERROR);
    }
    Ok(EXIT_OK)
}

/// Resolves on Ctrl-C or SIGTERM; false if signals cannot be watched.
pub(super) async fn wait_for_stop_signal() -> bool {
    use tokio::signal::unix::{signal, SignalKind};
    let Ok(mut term) = signal(SignalKind::terminate()) else {
        return tokio::signal::ctrl_c().await.is_ok();
    };
    tokio::select! {
        r = tokio::signal::ctrl_c() => r.is_ok(),
        r = term.recv() => r.is_some(),
    }
}

pub(super) fn print_row_errors(errors: &[crate::manifest::RowError]) {
    for e in errors {
        eprintln!("{e}");
    }
}

pub(super) fn enqueue_into(
    store: &Store,
    config: &Config,
    manifests: &[PathBuf],
    quiet: bool,
) -> Result<(), Fail> {
    match intake::enqueue(manifests, store, config)? {
        Ok(done) => {
            if !quiet {
                eprintln!(
                    "pixbatch: {} rows read, {} new jobs enqueued, {} already queued, {} repeated rows",
                    done.plan.rows, done.added, done.plan.already_queued, done.plan.repeats
                );
            }
            Ok(())
        }
        Err(errors) => {
            print_row_errors(&errors);
            Err(Fail(
                EXIT_ERROR,
                format!("{} problem(s) found; nothing was enqueued", errors.len()),
            ))
        }
    }
}

pub(super) fn cmd_enqueue(db: &Path, config: &Config, manifests: &[PathBuf]) -> Result<i32, Fail> {
    let _lock = lock_for_writing(db, "enqueue")?;
    let store = open_store(db)?;
    enqueue_into(&store, config, manifests, false)?;
    Ok(EXIT_OK)
}

pub(super) fn cmd_validate(db: &Path, config: &Config, manifests: &[PathBuf]) -> Result<i32, Fail> {
    // Compare with the database too when it exists and no one is using it.
    let lock = db
        .exists()
        .then(|| DbLock::try_acquire(db, "validate").ok())
        .flatten();
    let store = match &lock {
        Some(_) => Some(open_store(db)?),
        None => None,
    };
    let checked = intake::check(manifests, store.as_ref(), config)?;
    print_row_errors(&checked.errors);
    print_plan(&checked.plan, config);
    if checked.errors.is_empty() {
        Ok(EXIT_OK)
    } else {
        Err(Fail(
            EXIT_ERROR,
            format!("{} bad row(s)", checked.errors.len()),
        ))
    }
}

pub(super) fn print_plan(plan: &Plan, config: &Config) {
    println!(
        "{} rows: {} jobs, {} repeated rows, {} already in the database",
        plan.rows,
        plan.providers.values().map(|p| p.jobs).sum::<u64>(),
        plan.repeats,
        plan.already_queued
    );
    for (kind, p) in &plan.providers {
        let limits: Vec<String> = config
            .provider(*kind)
            .rate_limits
            .iter()
            .map(|l| l.to_string())
            .collect();
        println!(
            "  {kind:<11} {:>8} jobs ({} new)  ~{} requests  least time {} under {}",
            p.jobs,
            p.new_jobs,
            p.requests,
            query::human_secs(p.least_time.as_secs()),
            if limits.is_empty() {
                "no limits".to_string()
            } else {
                limits.join(" + ")
            }
        );
    }
}

pub(super) async fn cmd_demo(
    db: Option<PathBuf>,
    out: &Path,
    mut config: Config,
    bar: SharedBar,
) -> Result<i32, Fail> {
    let folder = PathBuf::from("pixbatch-demo");
    let manifest = crate::demo::materialize(&folder).map_err(|e| {
        Fail(
            EXIT_ERROR,
            format!("writing the demo files into {}: {e}", folder.display()),
        )
    })?;
    let db = db.unwrap_or_else(|| folder.join("pixbatch.db"));
    let sim = crate::sim::spawn(crate::sim::SimConfig::default()).await?;
    let addr = sim.addr();
    let sim_credentials = sim.credentials().clone();
    for kind in ProviderKind::ALL {
        if let Some(pc) = config.providers.get_mut(&kind) {
            pc.base_url = format!("http://{addr}{}", crate::providers::sim_base_path(kind));
            // Made-up keys; Perfect's RSA pair is the one this simulator generated.
            pc.credentials = crate::providers::Credentials {
                api_key: Some(format!("demo-{kind}-key")),
                ..Default::default()
            };
            let vars = &sim_credentials[kind.name()];
            let var = |name: &str| vars[name].as_str().map(str::to_string);
            if let (Some(id), Some(secret)) =
                (var("PERFECT_CLIENT_ID"), var("PERFECT_CLIENT_SECRET"))
            {
                pc.credentials = crate::providers::Credentials {
                    api_key: None,
                    client_id: Some(id),
                    client_secret: Some(secret),
                };
            }
        }
    }
    eprintln!(
        "pixbatch demo: simulator on http://{addr}, manifest {}, database {}, results in {}",
        manifest.display(),
        db.display(),
        out.display()
    );
    let _lock = lock_for_writing(&db, "demo")?;
    let store = open_store(&db)?;
    enqueue_into(&store, &config, &[manifest], false)?;
    let code = work(store, &db, out, config, false, bar).await;
    let _ = sim.shutdown().await;
    code
}
