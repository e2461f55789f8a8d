//! `run`, `enqueue`, `validate` and `demo`: the commands that fill and work the queue.

use super::*;

pub(super) async fn cmd_run(
    db: &Path,
    out: &Path,
    config: Config,
    args: &RunArgs,
    bar: SharedBar,
) -> Result<i32, Fail> {
    let started = now_ms();
    let result = run_inner(db, out, config, args, bar).await;
    if let Some(command) = &args.on_finish {
        set_finish_hook(FinishHook::new(command, db, out, started, &result));
    }
    result.map(|o| o.code)
}

async fn run_inner(
    db: &Path,
    out: &Path,
    config: Config,
    args: &RunArgs,
    bar: SharedBar,
) -> Result<Outcome, Fail> {
    let mut caps = engine::spend::Caps::default();
    for value in &args.max_credits {
        caps.add(value).map_err(|e| Fail(EXIT_ERROR, e))?;
    }
    if args.dry_run {
        let code = dry_run(
            db,
            &config,
            &args.manifests,
            args.update,
            args.offline,
            &caps,
            args.json,
        )
        .await?;
        return Ok(Outcome::nothing(code));
    }
    if args.manifests.is_empty() && !db.exists() {
        // Nothing given and nothing left from before: make no database to say so.
        progress::notice(&format!(
            "nothing to do: no manifest given and no database at {} (`pixbatch run MANIFEST`)",
            db.display()
        ));
        return Ok(Outcome::nothing(EXIT_OK));
    }
    let _lock = lock_waiting(db, "run", args.wait_lock, args.quiet).await?;
    let store = open_store(db)?;
    if !args.manifests.is_empty() {
        enqueue_into(&store, &config, &args.manifests, args.quiet, args.update)?;
    }
    if args.retry_failed {
        let failed: Vec<String> = store
            .ids_in_state(JobState::Failed, None)
            .collect::<Result<_, _>>()?;
        let mut n = 0;
        for id in &failed {
            if let Some(job) = store.get(id)? {
                n += u64::from(super::manage::requeue(&store, job, "`run --retry-failed`")?);
            }
        }
        store.flush()?;
        if !args.quiet && n > 0 {
            progress::notice(&format!("{n} failed job(s) requeued"));
        }
    }
    let unfinished = engine::summarize(&store)?.unfinished;
    if unfinished == 0 && !args.quiet {
        progress::notice(&format!(
            "nothing to do: every job in {} has finished (`pixbatch retry --failed` puts failed ones back)",
            db.display()
        ));
    }
    let mut gate = engine::spend::SpendGate::new(caps, &config);
    if args.on_finish.is_some() {
        // PIXBATCH_CREDITS_SPENT is the database's total.
        gate = gate.with_earlier_runs();
    }
    let gate = Arc::new(gate);
    let mut config = config;
    if let Some(n) = args.concurrency {
        // `-j N`: every provider's concurrent requests, over the config file's.
        for pc in config.providers.values_mut() {
            pc.concurrency = n as usize;
        }
    }
    let options = WorkOptions {
        quiet: args.quiet,
        metrics: &args.metrics,
        gate,
        selection: engine::Selection {
            providers: args.provider.clone(),
            max_new_jobs: args.limit,
        },
    };
    work(store, db, out, config, options, bar).await
}

/// What a run ended with, for the exit code and `--on-finish`.
pub(super) struct Outcome {
    pub code: i32,
    pub summary: Option<engine::RunSummary>,
    pub spend: Vec<engine::spend::ProviderSpend>,
    pub line: String,
}

impl Outcome {
    fn nothing(code: i32) -> Outcome {
        Outcome {
            code,
            summary: None,
            spend: Vec::new(),
            line: String::new(),
        }
    }
}

/// Takes the database for a run: at once (exit 3 naming the holder), or waiting
/// up to `wait` seconds for whoever holds it.
async fn lock_waiting(
    db: &Path,
    command: &str,
    wait: Option<u64>,
    quiet: bool,
) -> Result<DbLock, Fail> {
    let Some(secs) = wait else {
        return lock_for_writing(db, command);
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(secs);
    let mut told = false;
    loop {
        match DbLock::try_acquire(db, command) {
            Ok(lock) => return Ok(lock),
            Err(e @ LockError::Io { .. }) => return Err(lock_fail(e)),
            Err(e) => {
                if std::time::Instant::now() >= deadline {
                    return Err(Fail(
                        EXIT_LOCKED,
                        format!("{e}; gave up after waiting {secs} s (--wait-lock)"),
                    ));
                }
                if !told && !quiet {
                    progress::notice(&format!("{e}; waiting up to {secs} s for it (--wait-lock)"));
                    told = true;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

/// How a run shows itself and what it may spend: the parts of `work` that `run` sets
/// from its flags and `demo` leaves at their defaults.
pub(super) struct WorkOptions<'a> {
    pub quiet: bool,
    pub metrics: &'a MetricsArgs,
    pub gate: Arc<engine::spend::SpendGate>,
    /// `run --provider` and `--limit`.
    pub selection: engine::Selection,
}

/// Runs the engine over `store` until done or interrupted; prints the summary.
pub(super) async fn work(
    store: Store,
    db: &Path,
    out: &Path,
    config: Config,
    options: WorkOptions<'_>,
    bar: SharedBar,
) -> Result<Outcome, Fail> {
    let WorkOptions {
        quiet,
        metrics,
        gate,
        selection,
    } = options;
    std::fs::create_dir_all(out)
        .map_err(|e| Fail(EXIT_ERROR, format!("output folder {}: {e}", out.display())))?;
    let engine = Engine::with_selection(store.clone(), config, out.to_path_buf(), selection)
        .map_err(|e| Fail(EXIT_ERROR, e.to_string()))?
        .with_spend_gate(gate.clone());
    let observer = super::observe::Observer::start(metrics, &engine, &store).await?;
    let stats = engine.stats();
    let started = now_ms();
    // Providers without credentials are named before any request; their jobs stay
    // queued and the others are worked.
    for h in engine.not_configured() {
        progress::notice(&format!(
            "{}: {}; its jobs stay queued, the other providers go on",
            h.provider,
            h.detail()
        ));
    }
    let live = {
        let stats = stats.clone();
        let halts = engine.halt_view();
        let view = engine.live_view();
        Arc::new(move || LiveInfo {
            pid: std::process::id(),
            started_ms: started,
            rate_per_sec: stats.rate_per_sec(started),
            finished_this_run: stats.done.load(std::sync::atomic::Ordering::Relaxed)
                + stats.failed.load(std::sync::atomic::Ordering::Relaxed),
            halted: halts.list(),
            providers: view.providers(started),
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
                progress::notice(
                    "stopping: finishing requests in flight (Ctrl-C again to quit at once)",
                );
                let _ = stop_tx.send(StopSignal::Graceful);
            } else {
                progress::notice("quitting now; the next run resumes");
                progress::clear_bar();
                std::process::exit(EXIT_INTERRUPTED);
            }
        }
    });
    let display: Arc<dyn engine::ProgressSink> =
        Arc::new(Display::new(bar.clone(), quiet, Duration::from_secs(10)));
    let summary = engine.run(stop_rx, Some(display)).await;
    bar.finish();
    observer.finish(summary.as_ref().ok());
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
    if summary.held_back > 0 && !summary.interrupted {
        progress::notice(&format!(
            "{} job(s) left for a later run, as asked (--provider/--limit)",
            summary.held_back
        ));
    }
    if !quiet {
        // How long it took, as cargo ends: on stderr, so stdout keeps the one line
        // scripts read.
        let secs = now_ms().saturating_sub(started) / 1000;
        let n = summary.finished_this_run;
        progress::notice(&match n {
            0 => format!("ran {}", query::human_secs(secs)),
            n => format!(
                "ran {}: {n} jobs finished, {:.1} jobs/min",
                query::human_secs(secs),
                n as f64 * 60.0 / secs.max(1) as f64
            ),
        });
    }
    let spend = gate.report();
    if !gate.caps().is_empty() {
        // The spend is part of the summary when a cap was asked for.
        let parts: Vec<String> = spend
            .iter()
            .filter(|s| s.cap.is_some())
            .map(|s| {
                format!(
                    "{} {} of {} {} ({} this run){}",
                    s.kind,
                    crate::cost::amount(s.spent),
                    crate::cost::amount(s.cap.unwrap_or(0.0)),
                    s.unit,
                    crate::cost::amount(s.spent_this_run),
                    if s.price_unknown {
                        ", stopped: a job's price is unknown"
                    } else if s.stopped.is_some() {
                        ", cap reached"
                    } else {
                        ""
                    }
                )
            })
            .collect();
        if !parts.is_empty() {
            println!("estimated spend: {}", parts.join("; "));
        }
    }
    let code = exit_code(&summary, &gate);
    if code != EXIT_INTERRUPTED {
        print_halts(&store, &summary.halted);
    }
    match code {
        EXIT_INTERRUPTED => progress::notice("interrupted; run again to resume"),
        EXIT_CREDIT_CAP => {
            for s in gate.stopped() {
                progress::notice(&format!(
                    "{}: stopped submitting new work: {}",
                    s.kind,
                    s.stopped.as_deref().unwrap_or("")
                ));
            }
            if gate.stopped().iter().all(|s| s.price_unknown) {
                // Raising the cap would not help: the price is what is missing.
                progress::notice(
                    "--max-credits held back new work because its price is unknown; jobs already submitted were finished; set cost_per_job for the provider (or run without --max-credits) and run again to go on",
                );
            } else {
                progress::notice(
                    "the credit cap (--max-credits) held back new work; jobs already submitted were finished; raise the cap and run again to go on",
                );
            }
        }
        _ => {}
    }
    if summary.failed > 0 && code != EXIT_INTERRUPTED {
        progress::notice(
            "some jobs failed; see `pixbatch list --state failed` and `pixbatch retry --failed`",
        );
    }
    Ok(Outcome {
        code,
        summary: Some(summary),
        spend,
        line,
    })
}

/// One line per halted provider, with what to fix and how many of its jobs wait.
fn print_halts(store: &Store, halted: &[engine::halt::ProviderHalt]) {
    let counts = store.counts().unwrap_or_default();
    for h in halted {
        let waiting: u64 = counts
            .iter()
            .filter(|((s, p), _)| *p == h.provider && !s.is_terminal())
            .map(|(_, n)| n)
            .sum();
        let detail = match h.reason {
            // The fix already says all there is.
            engine::halt::HaltReason::NotConfigured { .. } => String::new(),
            _ => format!(" ({})", h.detail()),
        };
        progress::notice(&format!(
            "{h}; its {waiting} unfinished job(s) {}; fix it and run again{detail}",
            h.jobs_note()
        ));
    }
}

/// SPEC §1's codes, 4 for a run the credit cap stopped and 5 for one that halted a
/// provider. Interrupted wins; then a halted provider (nothing more happens until a
/// person fixes its key or URL); then the cap (work remains that only a higher cap
/// will do); then failed jobs.
fn exit_code(summary: &engine::RunSummary, gate: &engine::spend::SpendGate) -> i32 {
    if summary.interrupted {
        EXIT_INTERRUPTED
    } else if !summary.halted.is_empty() {
        EXIT_PROVIDER_HALTED
    } else if !gate.stopped().is_empty() && summary.unfinished > 0 {
        EXIT_CREDIT_CAP
    } else if summary.failed > 0 {
        EXIT_FAILED_JOBS
    } else if summary.unfinished > summary.held_back {
        EXIT_ERROR
    } else {
        EXIT_OK
    }
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

/// `FILE:LINE: warning: …` for rows that pass with something pixbatch does not know.
pub(super) fn print_row_warnings(warnings: &[crate::manifest::RowError]) {
    for w in warnings {
        eprintln!("{}: warning: {}", w.origin, w.reason);
    }
}

pub(super) fn enqueue_into(
    store: &Store,
    config: &Config,
    manifests: &[PathBuf],
    quiet: bool,
    update: bool,
) -> Result<(), Fail> {
    let mut updated = 0;
    if update {
        updated = apply_updates(store, config, manifests)?;
    }
    match intake::enqueue(manifests, store, config)? {
        Ok(done) => {
            // Shown on enqueue and run too: the row is queued, but it names something
            // pixbatch does not know (a typo would cost a request).
            print_row_warnings(&done.warnings);
            if !quiet {
                progress::notice(&format!(
                    "{} rows read, {} new jobs enqueued, {} already queued, {} repeated rows",
                    done.plan.rows, done.added, done.plan.already_queued, done.plan.repeats
                ));
                if updated > 0 {
                    progress::notice(&format!(
                        "{updated} job(s) became a new version (`pixbatch show ID` tells the history)"
                    ));
                }
            }
            Ok(())
        }
        Err(errors) => {
            print_row_errors(&errors);
            if !update
                && errors
                    .iter()
                    .any(|e| e.reason.contains("with different content"))
            {
                eprintln!(
                    "pixbatch: to turn changed rows into new versions of their jobs, add --update"
                );
            }
            Err(Fail(
                EXIT_ERROR,
                format!("{} problem(s) found; nothing was enqueued", errors.len()),
            ))
        }
    }
}

/// `--update`: checks every row first (a manifest with any bad row changes
/// nothing), then replaces the jobs whose rows changed with a new version.
fn apply_updates(store: &Store, config: &Config, manifests: &[PathBuf]) -> Result<u64, Fail> {
    let found = crate::versions::find(manifests, store)?;
    let checked = intake::check(manifests, Some(store), config)?;
    let mut errors: Vec<_> = checked
        .errors
        .into_iter()
        .filter(|e| !found.is_update(&e.origin))
        .collect();
    errors.extend(found.errors.iter().cloned());
    if !errors.is_empty() {
        errors
            .sort_by(|a, b| (&a.origin.file, a.origin.line).cmp(&(&b.origin.file, b.origin.line)));
        print_row_errors(&errors);
        return Err(Fail(
            EXIT_ERROR,
            format!(
                "{} problem(s) found; nothing was enqueued or updated",
                errors.len()
            ),
        ));
    }
    Ok(crate::versions::apply(store, &found.updates)?)
}

pub(super) fn cmd_enqueue(
    db: &Path,
    config: &Config,
    manifests: &[PathBuf],
    update: bool,
) -> Result<i32, Fail> {
    let _lock = lock_for_writing(db, "enqueue")?;
    let store = open_store(db)?;
    enqueue_into(&store, config, manifests, false, update)?;
    Ok(EXIT_OK)
}

/// Opens the database for reading if it exists and no one is using it.
fn open_if_free(db: &Path, command: &str) -> Result<Option<(DbLock, Store)>, Fail> {
    let lock = db
        .exists()
        .then(|| DbLock::try_acquire(db, command).ok())
        .flatten();
    match lock {
        Some(lock) => Ok(Some((lock, open_store(db)?))),
        None => Ok(None),
    }
}

pub(super) async fn cmd_validate(
    db: &Path,
    config: &Config,
    manifests: &[PathBuf],
    offline: bool,
    json: bool,
) -> Result<i32, Fail> {
    // Compare with the database too when it exists and no one is using it.
    let opened = open_if_free(db, "validate")?;
    let store = opened.as_ref().map(|(_, s)| s);
    let checked = intake::check(manifests, store, config)?;
    let missing = missing_credentials(&checked.plan, config);
    let mut doc = Preview::new(json, &checked.errors, &checked.plan, config, &missing);
    doc.set_warnings(&checked.warnings);
    if !json {
        print_row_warnings(&checked.warnings);
        print_row_errors(&checked.errors);
        print_plan(&checked.plan, config);
        for line in &missing {
            eprintln!("pixbatch: {line}");
        }
    }
    if !checked.errors.is_empty() {
        doc.print();
        return Err(Fail(
            EXIT_ERROR,
            format!("{} bad row(s)", checked.errors.len()),
        ));
    }
    if !missing.is_empty() {
        doc.print();
        return Err(Fail(
            EXIT_ERROR,
            format!(
                "{} provider(s) without credentials: `run` would keep their jobs queued",
                missing.len()
            ),
        ));
    }
    // Nothing is asked of a provider about a manifest with bad rows.
    let costs = plan_costs(
        config,
        &checked.plan,
        manifests,
        store,
        None,
        false,
        offline,
    )
    .await?;
    if json {
        doc.set("costs", costs_json(&costs));
        doc.print();
    } else {
        print_costs(&costs, "the new jobs");
    }
    Ok(EXIT_OK)
}

/// `validate --json` and `run --dry-run --json`: what the text preview says, as one
/// JSON object printed at the end (or when a bad row stops the preview).
struct Preview {
    doc: Option<serde_json::Value>,
}

impl Preview {
    fn new(
        json: bool,
        errors: &[crate::manifest::RowError],
        plan: &Plan,
        config: &Config,
        missing: &[String],
    ) -> Preview {
        let doc = json.then(|| {
            serde_json::json!({
                "ok": errors.is_empty() && missing.is_empty(),
                "errors": rows_json(errors),
                "missing_credentials": missing,
                "plan": plan_json(plan, config),
            })
        });
        Preview { doc }
    }

    /// `warnings`: rows that pass with something pixbatch does not know (a model,
    /// a parameter), as `{file, line, reason}`.
    fn set_warnings(&mut self, warnings: &[crate::manifest::RowError]) {
        self.set("warnings", rows_json(warnings));
    }

    fn set(&mut self, key: &str, value: serde_json::Value) {
        if let Some(doc) = &mut self.doc {
            doc[key] = value;
        }
    }

    fn print(&self) {
        if let Some(doc) = &self.doc {
            // A closed stdout leaves nothing to tell: the exit code still says it.
            let _ = writeln!(
                std::io::stdout(),
                "{}",
                serde_json::to_string_pretty(doc).unwrap_or_default()
            );
        }
    }
}

fn rows_json(rows: &[crate::manifest::RowError]) -> serde_json::Value {
    rows.iter()
        .map(|e| {
            serde_json::json!({
                "file": e.origin.file,
                "line": e.origin.line,
                "reason": e.reason,
            })
        })
        .collect()
}

fn plan_json(plan: &Plan, config: &Config) -> serde_json::Value {
    let providers: serde_json::Map<String, serde_json::Value> = plan
        .providers
        .iter()
        .map(|(kind, p)| {
            let limits: Vec<String> = config
                .provider(*kind)
                .rate_limits
                .iter()
                .map(|l| l.to_string())
                .collect();
            (
                kind.name().to_string(),
                serde_json::json!({
                    "jobs": p.jobs,
                    "new_jobs": p.new_jobs,
                    "requests": p.requests,
                    "least_time_secs": p.least_time.as_secs(),
                    "rate_limits": limits,
                }),
            )
        })
        .collect();
    serde_json::json!({
        "rows": plan.rows,
        "jobs": plan.providers.values().map(|p| p.jobs).sum::<u64>(),
        "repeated_rows": plan.repeats,
        "already_in_database": plan.already_queued,
        "providers": providers,
    })
}

fn costs_json(
    costs: &std::collections::BTreeMap<ProviderKind, crate::cost::CostLine>,
) -> serde_json::Value {
    let map: serde_json::Map<String, serde_json::Value> = costs
        .iter()
        .map(|(kind, c)| {
            (
                kind.name().to_string(),
                serde_json::json!({
                    "jobs": c.jobs,
                    "credits": c.credits,
                    "unit": c.unit,
                    "how": c.how,
                    "balance": c.balance,
                }),
            )
        })
        .collect();
    serde_json::Value::Object(map)
}

/// One line per provider the plan has jobs for and no usable credentials, naming
/// the variable to set (the adapter's own words).
fn missing_credentials(plan: &Plan, config: &Config) -> Vec<String> {
    plan.providers
        .iter()
        .filter(|(_, p)| p.jobs > 0)
        .filter_map(|(kind, p)| {
            let e = crate::providers::build(&config.provider(*kind)).err()?;
            Some(format!(
                "{e}; {} job(s) of the manifest are for {kind}",
                p.jobs
            ))
        })
        .collect()
}

/// `run --dry-run`: validate, plus what the database holds, the spend so far and the
/// cap. Enqueues nothing and sends no paid request.
async fn dry_run(
    db: &Path,
    config: &Config,
    manifests: &[PathBuf],
    update: bool,
    offline: bool,
    caps: &engine::spend::Caps,
    json: bool,
) -> Result<i32, Fail> {
    let opened = open_if_free(db, "dry-run")?;
    if opened.is_none() && db.exists() {
        eprintln!(
            "pixbatch: the database is in use ({}); the preview leaves it out",
            lock::current_holder(db)
                .map(|h| h.to_string())
                .unwrap_or_else(|| "another process".into())
        );
    }
    let store = opened.as_ref().map(|(_, s)| s);
    let mut plan = Plan::default();
    let mut updates = None;
    let mut doc = Preview::new(json, &[], &plan, config, &[]);
    if !manifests.is_empty() {
        let found = match (update, store) {
            (true, Some(s)) => Some(crate::versions::find(manifests, s)?),
            _ => None,
        };
        let checked = intake::check(manifests, store, config)?;
        if !json {
            print_row_warnings(&checked.warnings);
        }
        let mut errors: Vec<_> = checked
            .errors
            .into_iter()
            .filter(|e| !found.as_ref().is_some_and(|f| f.is_update(&e.origin)))
            .collect();
        if let Some(f) = &found {
            errors.extend(f.errors.iter().cloned());
        }
        let missing = missing_credentials(&checked.plan, config);
        doc = Preview::new(json, &errors, &checked.plan, config, &missing);
        doc.set_warnings(&checked.warnings);
        if !json {
            print_row_errors(&errors);
            print_plan(&checked.plan, config);
            for line in &missing {
                eprintln!("pixbatch: {line}; `run` would keep their jobs queued");
            }
        }
        if !errors.is_empty() {
            doc.print();
            return Err(Fail(EXIT_ERROR, format!("{} bad row(s)", errors.len())));
        }
        if let Some(f) = &found {
            doc.set("new_versions", f.updates.len().into());
            if !f.updates.is_empty() && !json {
                println!(
                    "{} row(s) would become a new version of their job (--update)",
                    f.updates.len()
                );
            }
        }
        plan = checked.plan;
        updates = found;
    }
    let costs = plan_costs(
        config,
        &plan,
        manifests,
        store,
        updates.as_ref(),
        true,
        offline,
    )
    .await?;
    let totals = match store {
        Some(store) => engine::spend::ledger_totals(store)?,
        None => Default::default(),
    };
    if json {
        doc.set("costs", costs_json(&costs));
        let spent: serde_json::Map<String, serde_json::Value> = totals
            .iter()
            .map(|(kind, (spent, priced, unpriced))| {
                (
                    kind.name().to_string(),
                    serde_json::json!({
                        "credits": spent,
                        "unit": crate::providers::cost_unit(*kind),
                        "submissions_priced": priced,
                        "submissions_unpriced": unpriced,
                    }),
                )
            })
            .collect();
        doc.set("spent_so_far", serde_json::Value::Object(spent));
        let capped: serde_json::Map<String, serde_json::Value> = ProviderKind::ALL
            .iter()
            .filter_map(|kind| {
                let cap = caps.of(*kind)?;
                let spent = totals.get(kind).map_or(0.0, |t| t.0);
                let needed = costs.get(kind).map_or(Some(0.0), |c| c.credits);
                let room = (cap - spent).max(0.0);
                Some((
                    kind.name().to_string(),
                    serde_json::json!({
                        "cap": cap,
                        "left": room,
                        "needed": needed,
                        "fits": needed.is_some_and(|c| c <= room + 1e-9),
                    }),
                ))
            })
            .collect();
        doc.set("max_credits", serde_json::Value::Object(capped));
        doc.print();
        return Ok(EXIT_OK);
    }
    print_costs(
        &costs,
        "the new jobs and those in the database not yet submitted",
    );
    {
        for (kind, (spent, priced, unpriced)) in &totals {
            let unit = crate::providers::cost_unit(*kind);
            let mut line = format!(
                "spent so far   {kind:<11} ≈ {} {unit} over {priced} submission(s)",
                crate::cost::amount(*spent)
            );
            if *unpriced > 0 {
                line.push_str(&format!(" and {unpriced} without a known price"));
            }
            println!("{line}");
        }
        let mut kinds: Vec<ProviderKind> = costs.keys().chain(totals.keys()).copied().collect();
        kinds.sort();
        kinds.dedup();
        for kind in &kinds {
            let Some(cap) = caps.of(*kind) else { continue };
            let spent = totals.get(kind).map_or(0.0, |t| t.0);
            let room = (cap - spent).max(0.0);
            let unit = crate::providers::cost_unit(*kind);
            let line = costs.get(kind).cloned().unwrap_or(crate::cost::CostLine {
                jobs: 0,
                credits: Some(0.0),
                unit,
                how: String::new(),
                balance: None,
            });
            let verdict = match line.credits {
                Some(c) if c <= room + 1e-9 => "the work fits".to_string(),
                Some(c) => format!(
                    "the work needs ≈ {}: the run will stop submitting before the end",
                    crate::cost::amount(c)
                ),
                None => format!(
                    "the work's cost is unknown ({}): the run will not start it",
                    line.how
                ),
            };
            println!(
                "--max-credits  {kind:<11} {} {}: {} left; {verdict}",
                crate::cost::amount(cap),
                line.unit,
                crate::cost::amount(room)
            );
        }
    }
    Ok(EXIT_OK)
}

/// The credits the plan's jobs (and, with `pending`, the database's jobs not yet
/// submitted) will cost, per provider.
async fn plan_costs(
    config: &Config,
    plan: &Plan,
    manifests: &[PathBuf],
    store: Option<&Store>,
    updates: Option<&crate::versions::Found>,
    pending: bool,
    offline: bool,
) -> Result<std::collections::BTreeMap<ProviderKind, crate::cost::CostLine>, Fail> {
    let mut pending_jobs = Vec::new();
    if let (true, Some(store)) = (pending, store) {
        for state in [JobState::Queued, JobState::RetryWait, JobState::Preparing] {
            for id in store.ids_in_state(state, None) {
                if let Some(job) = store.get(&id?)? {
                    pending_jobs.push(job);
                }
            }
        }
    }
    let mut kinds: Vec<ProviderKind> = plan.providers.keys().copied().collect();
    kinds.extend(pending_jobs.iter().map(|j| j.spec.provider));
    kinds.extend(
        updates
            .iter()
            .flat_map(|f| f.updates.iter().map(|u| u.spec.provider)),
    );
    kinds.sort();
    kinds.dedup();
    let mut estimators = if offline {
        Default::default()
    } else {
        crate::cost::estimators(config, &kinds).await
    };
    let mut grouped: Vec<ProviderKind> = estimators
        .iter()
        .filter(|(_, e)| e.is_ok())
        .map(|(k, _)| *k)
        .collect();
    // Topaz's published credit tables price groups with no request (offline too).
    if kinds.contains(&ProviderKind::Topaz)
        && !grouped.contains(&ProviderKind::Topaz)
        && config.provider(ProviderKind::Topaz).cost_per_job.is_none()
    {
        grouped.push(ProviderKind::Topaz);
    }
    let mut collector = crate::cost::Collector::new(grouped);
    for (kind, p) in &plan.providers {
        if !collector.groups(*kind) {
            collector.add_count(*kind, p.new_jobs);
        }
    }
    if kinds.iter().any(|k| collector.groups(*k)) && !manifests.is_empty() {
        // A second pass, only for the providers priced per parameter set.
        let mut tracker = crate::manifest::DuplicateTracker::new();
        let mut failure = None;
        for path in manifests {
            let mut on_row = |row: Result<
                (crate::model::Origin, crate::model::JobSpec),
                crate::manifest::RowError,
            >| {
                let Ok((origin, spec)) = row else { return };
                if failure.is_some() || !collector.groups(spec.provider) {
                    return;
                }
                if !matches!(
                    tracker.check(&origin, &spec),
                    Ok(crate::manifest::RowStatus::New)
                ) {
                    return;
                }
                let known = match store.map(|s| s.get(&spec.id)) {
                    None | Some(Ok(None)) => false,
                    Some(Ok(Some(_))) => true,
                    Some(Err(e)) => {
                        failure = Some(e);
                        return;
                    }
                };
                if !known {
                    collector.add(&spec);
                }
            };
            crate::manifest::read_manifest(path, &mut on_row)?;
        }
        if let Some(e) = failure {
            return Err(e.into());
        }
    }
    for u in updates.iter().flat_map(|f| f.updates.iter()) {
        collector.add(&u.spec);
    }
    for job in &pending_jobs {
        collector.add(&job.spec);
    }
    Ok(crate::cost::price(config, &collector, &mut estimators, !offline).await)
}

fn print_costs(
    costs: &std::collections::BTreeMap<ProviderKind, crate::cost::CostLine>,
    what: &str,
) {
    if costs.values().all(|c| c.jobs == 0) {
        return;
    }
    println!("cost of {what}:");
    for (kind, c) in costs {
        if c.jobs == 0 && c.balance.is_none() {
            continue;
        }
        let mut line = match c.credits {
            Some(x) => format!(
                "  {kind:<11} {:>8} jobs  ≈ {} {}  ({})",
                c.jobs,
                crate::cost::amount(x),
                c.unit,
                c.how
            ),
            None => format!(
                "  {kind:<11} {:>8} jobs  {} unknown: {}",
                c.jobs, c.unit, c.how
            ),
        };
        if let Some(b) = c.balance {
            line.push_str(&format!("; balance {} {}", crate::cost::amount(b), c.unit));
            if c.credits.is_some_and(|x| x > b) {
                line.push_str(" — too low for these jobs");
            }
        }
        println!("{line}");
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
    let folder = PathBuf::from(crate::demo::FOLDER);
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
    enqueue_into(&store, &config, &[manifest], false, false)?;
    let gate = Arc::new(engine::spend::SpendGate::uncapped(&config));
    let metrics = MetricsArgs::default();
    let options = WorkOptions {
        quiet: false,
        metrics: &metrics,
        gate,
        selection: engine::Selection::default(),
    };
    let outcome = work(store, &db, out, config, options, bar).await;
    let _ = sim.shutdown().await;
    outcome.map(|o| o.code)
}

// ----- --on-finish ------------------------------------------------------------------

/// The command `--on-finish` runs, with the run's summary as environment variables.
/// It runs after the async runtime has shut down (`cli::main`), when the database
/// is closed and unlocked, so it may run `pixbatch report` or `status` itself.
pub(super) struct FinishHook {
    command: String,
    env: Vec<(String, String)>,
}

static FINISH_HOOK: std::sync::Mutex<Option<FinishHook>> = std::sync::Mutex::new(None);

fn set_finish_hook(hook: FinishHook) {
    if let Ok(mut slot) = FINISH_HOOK.lock() {
        *slot = Some(hook);
    }
}

impl FinishHook {
    fn new(
        command: &str,
        db: &Path,
        out: &Path,
        started_ms: u64,
        result: &Result<Outcome, Fail>,
    ) -> FinishHook {
        let mut env: Vec<(String, String)> = vec![
            ("PIXBATCH_DB".into(), db.display().to_string()),
            ("PIXBATCH_OUT".into(), out.display().to_string()),
            ("PIXBATCH_STARTED".into(), query::rfc3339(started_ms)),
            (
                "PIXBATCH_DURATION_S".into(),
                (now_ms().saturating_sub(started_ms) / 1000).to_string(),
            ),
        ];
        let (summary, spend, line, error) = match result {
            Ok(o) => (
                o.summary.clone(),
                o.spend.clone(),
                o.line.clone(),
                String::new(),
            ),
            Err(Fail(_, message)) => (None, Vec::new(), String::new(), message.clone()),
        };
        let s = summary.unwrap_or_default();
        let flag = |b: bool| if b { "1" } else { "0" }.to_string();
        env.extend([
            ("PIXBATCH_DONE".into(), s.done.to_string()),
            ("PIXBATCH_FAILED".into(), s.failed.to_string()),
            ("PIXBATCH_CANCELLED".into(), s.cancelled.to_string()),
            ("PIXBATCH_UNFINISHED".into(), s.unfinished.to_string()),
            (
                "PIXBATCH_FINISHED_THIS_RUN".into(),
                s.finished_this_run.to_string(),
            ),
            ("PIXBATCH_INTERRUPTED".into(), flag(s.interrupted)),
            (
                "PIXBATCH_CREDIT_CAP_REACHED".into(),
                flag(spend.iter().any(|p| p.stopped.is_some())),
            ),
            (
                "PIXBATCH_CREDITS_SPENT".into(),
                spend
                    .iter()
                    .map(|p| format!("{}={}", p.kind, crate::cost::amount(p.spent)))
                    .collect::<Vec<_>>()
                    .join(","),
            ),
            (
                "PIXBATCH_CREDITS_THIS_RUN".into(),
                spend
                    .iter()
                    .filter(|p| p.started_this_run > 0)
                    .map(|p| format!("{}={}", p.kind, crate::cost::amount(p.spent_this_run)))
                    .collect::<Vec<_>>()
                    .join(","),
            ),
            (
                // One `provider: halted: what — fix` line per halted provider.
                "PIXBATCH_HALTED".into(),
                s.halted
                    .iter()
                    .map(|h| h.to_string())
                    .collect::<Vec<_>>()
                    .join("\n"),
            ),
            ("PIXBATCH_SUMMARY".into(), line),
            ("PIXBATCH_ERROR".into(), error),
        ]);
        FinishHook {
            command: command.to_string(),
            env,
        }
    }
}

/// Runs the `--on-finish` command, if one was set, with the exit code added. Its
/// failure is reported but does not change pixbatch's exit code.
pub(super) fn run_finish_hook(code: i32) {
    let hook = FINISH_HOOK.lock().ok().and_then(|mut h| h.take());
    let Some(hook) = hook else { return };
    let status = std::process::Command::new("sh")
        .arg("-c")
        .arg(&hook.command)
        .envs(hook.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
        .env("PIXBATCH_EXIT_CODE", code.to_string())
        .status();
    match status {
        Ok(s) if s.success() => {}
        Ok(s) => progress::notice(&format!("--on-finish command ended with {s}")),
        Err(e) => progress::notice(&format!("--on-finish command could not start: {e}")),
    }
}
