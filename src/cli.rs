//! The command line (SPEC §1): clap definitions, then one function per command.
//!
//! Errors a user can cause map to the documented exit codes: 0 all done, 2 some jobs
//! failed, 3 another process holds the database, 1 anything else, 130 interrupted.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::config::Config;
use crate::engine::{self, Engine, StopSignal};
use crate::intake::{self, Plan};
use crate::lock::{self, DbLock, LockError};
use crate::model::{now_ms, EventKind, JobEvent, JobState, ProviderKind};
use crate::progress::{self, Display, SharedBar};
use crate::query::{self, JobDetail, JobRow, LiveInfo, Query, StatusReport};
use crate::store::{Store, StoreOptions};

pub const EXIT_OK: i32 = 0;
pub const EXIT_ERROR: i32 = 1;
pub const EXIT_FAILED_JOBS: i32 = 2;
pub const EXIT_LOCKED: i32 = 3;
pub const EXIT_INTERRUPTED: i32 = 130;

#[derive(Parser, Debug)]
#[command(name = "pixbatch", version, about = "Durable batch jobs for paid AI image APIs", long_about = None)]
pub struct Cli {
    /// The job database (a folder).
    #[arg(long, global = true, value_name = "PATH")]
    pub db: Option<PathBuf>,
    /// Where results are written.
    #[arg(long, global = true, value_name = "DIR")]
    pub out: Option<PathBuf>,
    /// Configuration file (default ./pixbatch.toml if present).
    #[arg(long, global = true, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// More log output (-v debug, -vv trace). RUST_LOG overrides.
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    pub verbose: u8,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Enqueue the manifests (idempotently), then work until no job is runnable.
    Run(RunArgs),
    /// Only enqueue.
    Enqueue {
        #[arg(required = true)]
        manifests: Vec<PathBuf>,
    },
    /// Check every row and print the plan; enqueues nothing.
    Validate {
        #[arg(required = true)]
        manifests: Vec<PathBuf>,
    },
    /// Counts per state and provider, rate, ETA.
    Status {
        #[arg(long)]
        json: bool,
    },
    /// List jobs.
    List {
        #[arg(long)]
        state: Option<JobState>,
        #[arg(long)]
        provider: Option<ProviderKind>,
        /// One JSON object per line.
        #[arg(long)]
        json: bool,
    },
    /// One job: spec, state, attempts and their errors, outputs.
    Show {
        job_id: String,
        #[arg(long)]
        json: bool,
    },
    /// Put failed (or the given) jobs back in the queue.
    Retry {
        /// Every failed job.
        #[arg(long, conflicts_with = "job_ids")]
        failed: bool,
        job_ids: Vec<String>,
    },
    /// Cancel jobs (and their remote tasks where the provider can).
    Cancel {
        #[arg(required = true)]
        job_ids: Vec<String>,
    },
    /// Every job as CSV or JSON Lines.
    Report {
        #[arg(long, value_enum, default_value_t = ReportFormat::Csv)]
        format: ReportFormat,
        /// Write to FILE instead of stdout.
        #[arg(short = 'o', long = "output", value_name = "FILE")]
        output: Option<PathBuf>,
    },
    /// List the styles a provider offers, with the ids to put in a manifest's params
    /// (Perfect: the style groups of FEATURE, or with --group the styles in one).
    Styles {
        provider: ProviderKind,
        /// The operation whose styles to list (Perfect: hair-style, wig, text-to-image …).
        feature: Option<String>,
        /// A style group id: list the styles in it (Perfect).
        #[arg(long, value_name = "ID")]
        group: Option<String>,
        /// Only styles for this base model (Dzine: S or X).
        #[arg(long = "base-model", value_name = "MODEL")]
        base_model: Option<String>,
        /// Stop after N entries (default: every page).
        #[arg(long, value_name = "N")]
        limit: Option<usize>,
        /// One JSON object per line.
        #[arg(long)]
        json: bool,
    },
    /// Print a provider's remaining credit (where its API tells it).
    Balance {
        provider: ProviderKind,
        #[arg(long)]
        json: bool,
    },
    /// Serve the simulated providers on loopback (all five).
    Sim {
        /// Address to listen on (loopback only; port 0 picks a free one).
        #[arg(long, default_value = "127.0.0.1:8080")]
        addr: String,
        #[command(flatten)]
        sim: crate::sim::SimArgs,
    },
    /// Run the example manifest against the built-in simulator into ./out.
    Demo,
}

#[derive(Args, Debug, Default)]
pub struct RunArgs {
    pub manifests: Vec<PathBuf>,
    /// Print only the summary.
    #[arg(short, long)]
    pub quiet: bool,
}

#[derive(ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReportFormat {
    Csv,
    Jsonl,
}

/// Parses the arguments and runs; returns the exit code.
pub fn main() -> i32 {
    let cli = Cli::parse();
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("pixbatch: cannot start the async runtime: {e}");
            return EXIT_ERROR;
        }
    };
    let code = rt.block_on(dispatch(cli));
    // Step tasks that were cut off by Ctrl-C must not hold the exit.
    rt.shutdown_timeout(Duration::from_millis(200));
    code
}

/// A failure with its exit code and message.
struct Fail(i32, String);

impl<E: std::fmt::Display> From<E> for Fail {
    fn from(e: E) -> Self {
        Fail(EXIT_ERROR, e.to_string())
    }
}

async fn dispatch(cli: Cli) -> i32 {
    let env = |k: &str| std::env::var(k).ok();
    let config = match Config::load(cli.config.as_deref(), &env) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("pixbatch: {e}");
            return EXIT_ERROR;
        }
    };
    let bar = SharedBar::default();
    let secrets = config.secrets();
    init_logging(cli.verbose, secrets.clone(), bar.clone());
    let db = cli
        .db
        .clone()
        .unwrap_or_else(|| PathBuf::from("pixbatch.db"));
    let out = cli.out.clone().unwrap_or_else(|| PathBuf::from("out"));
    let result = match cli.command {
        Command::Run(args) => cmd_run(&db, &out, config, &args.manifests, args.quiet, bar).await,
        Command::Enqueue { manifests } => cmd_enqueue(&db, &config, &manifests),
        Command::Validate { manifests } => cmd_validate(&db, &config, &manifests),
        Command::Status { json } => cmd_status(&db, json),
        Command::List {
            state,
            provider,
            json,
        } => cmd_list(&db, state, provider, json),
        Command::Show { job_id, json } => cmd_show(&db, &job_id, json),
        Command::Retry { failed, job_ids } => cmd_retry(&db, failed, &job_ids),
        Command::Cancel { job_ids } => cmd_cancel(&db, &config, &job_ids).await,
        Command::Report { format, output } => cmd_report(&db, format, output.as_deref()),
        Command::Styles {
            provider,
            feature,
            group,
            base_model,
            limit,
            json,
        } => {
            let query = crate::providers::StyleQuery {
                feature,
                group,
                base_model,
                limit,
            };
            cmd_styles(&config, provider, &query, json).await
        }
        Command::Balance { provider, json } => cmd_balance(&config, provider, json).await,
        Command::Sim { addr, sim } => cmd_sim(&addr, sim).await,
        Command::Demo => cmd_demo(cli.db, &out, config, bar).await,
    };
    match result {
        Ok(code) => code,
        Err(Fail(code, message)) => {
            let message = progress::scrub(&message, &secrets);
            for line in message.lines() {
                eprintln!("pixbatch: {line}");
            }
            code
        }
    }
}

fn init_logging(verbose: u8, secrets: Vec<String>, bar: SharedBar) {
    use std::io::IsTerminal;
    let default = match verbose {
        0 => "pixbatch=info",
        1 => "pixbatch=debug",
        _ => "pixbatch=trace",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(progress::LogWriter::new(secrets, bar))
        .with_ansi(std::io::stderr().is_terminal())
        .with_target(false)
        .try_init();
}

/// Opens the database (the caller holds `<db>.lock`). sled's own lock on the folder
/// can outlive the previous holder's `<db>.lock` by a moment (its threads let go
/// of the files as they end), so a refusal of that lock is retried briefly.
fn open_store(db: &Path) -> Result<Store, Fail> {
    let deadline = std::time::Instant::now() + Duration::from_secs(3);
    loop {
        match Store::open(db, &StoreOptions::default()) {
            Ok(s) => return Ok(s),
            Err(e) => {
                let text = e.to_string();
                if text.contains("could not acquire lock") && std::time::Instant::now() < deadline {
                    std::thread::sleep(Duration::from_millis(20));
                    continue;
                }
                return Err(Fail(EXIT_ERROR, text));
            }
        }
    }
}

/// Takes the database for writing, or exits 3 naming who has it.
fn lock_for_writing(db: &Path, command: &str) -> Result<DbLock, Fail> {
    // A reading command holds the lock only for a moment, and a holder that has just
    // taken it may not have written its name yet: wait for either briefly. A run
    // (or demo) holds it for long: say so at once.
    DbLock::acquire_within(db, command, Duration::from_secs(5)).map_err(lock_fail)
}

fn lock_fail(e: LockError) -> Fail {
    match e {
        LockError::Io { .. } => Fail(EXIT_ERROR, e.to_string()),
        other => Fail(EXIT_LOCKED, other.to_string()),
    }
}

// ----- run ----------------------------------------------------------------------

async fn cmd_run(
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
async fn work(
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
    let _control = match crate::control::serve(&lock::socket_path(db), store.clone(), live) {
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
async fn wait_for_stop_signal() -> bool {
    use tokio::signal::unix::{signal, SignalKind};
    let Ok(mut term) = signal(SignalKind::terminate()) else {
        return tokio::signal::ctrl_c().await.is_ok();
    };
    tokio::select! {
        r = tokio::signal::ctrl_c() => r.is_ok(),
        r = term.recv() => r.is_some(),
    }
}

// ----- enqueue / validate -------------------------------------------------------

fn print_row_errors(errors: &[crate::manifest::RowError]) {
    for e in errors {
        eprintln!("{e}");
    }
}

fn enqueue_into(
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

fn cmd_enqueue(db: &Path, config: &Config, manifests: &[PathBuf]) -> Result<i32, Fail> {
    let _lock = lock_for_writing(db, "enqueue")?;
    let store = open_store(db)?;
    enqueue_into(&store, config, manifests, false)?;
    Ok(EXIT_OK)
}

fn cmd_validate(db: &Path, config: &Config, manifests: &[PathBuf]) -> Result<i32, Fail> {
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

fn print_plan(plan: &Plan, config: &Config) {
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

// ----- reading commands ---------------------------------------------------------

/// Answers a query from the database, or from the run that holds it.
fn ask(
    db: &Path,
    query: &Query,
    emit: &mut dyn FnMut(serde_json::Value) -> std::io::Result<()>,
) -> Result<(), Fail> {
    let socket = lock::socket_path(db);
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    let mut last;
    loop {
        match DbLock::try_acquire(db, "read") {
            Ok(_lock) => {
                if !db.exists() {
                    return Err(Fail(
                        EXIT_ERROR,
                        format!(
                            "no database at {} (run `pixbatch enqueue` first)",
                            db.display()
                        ),
                    ));
                }
                let store = open_store(db)?;
                return query::answer(&store, query, None, emit)
                    .map_err(|e| Fail(EXIT_ERROR, e.to_string()));
            }
            Err(LockError::Held { .. } | LockError::HeldUnknown { .. }) => {
                // A run answers over its socket; another short command (a reader,
                // enqueue, retry) lets go soon: try both until the deadline.
                match crate::control::ask(&socket, query, emit) {
                    Ok(()) => return Ok(()),
                    Err(query::QueryError::Io(e))
                        if matches!(
                            e.kind(),
                            std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused
                        ) =>
                    {
                        last = e.to_string();
                    }
                    Err(e) => return Err(Fail(EXIT_ERROR, e.to_string())),
                }
            }
            Err(e) => return Err(Fail(EXIT_ERROR, e.to_string())),
        }
        if std::time::Instant::now() >= deadline {
            let who = lock::current_holder(db)
                .map(|h| h.to_string())
                .unwrap_or_else(|| "another process".into());
            return Err(Fail(
                EXIT_LOCKED,
                format!("{who} holds the database and does not answer queries ({last})"),
            ));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn cmd_status(db: &Path, json: bool) -> Result<i32, Fail> {
    let mut report: Option<StatusReport> = None;
    ask(db, &Query::Status, &mut |v| {
        report = serde_json::from_value(v).ok();
        Ok(())
    })?;
    let report = report.ok_or_else(|| Fail(EXIT_ERROR, "empty status answer".into()))?;
    if json {
        println!("{}", serde_json::to_string_pretty(&report)?);
        return Ok(EXIT_OK);
    }
    println!("{} jobs", report.total);
    for state in JobState::ALL {
        let n = report.states.get(state.name()).copied().unwrap_or(0);
        if n == 0 {
            continue;
        }
        let per: Vec<String> = report
            .counts
            .iter()
            .filter(|c| c.state == state)
            .map(|c| format!("{} {}", c.provider, c.count))
            .collect();
        println!("  {:<12} {:>8}  ({})", state.name(), n, per.join(", "));
    }
    match &report.running {
        Some(l) => {
            print!(
                "running: pid {}, for {}, {:.2} jobs/s, {} finished by this run",
                l.pid,
                query::ago(l.started_ms),
                l.rate_per_sec,
                l.finished_this_run
            );
            match report.eta_secs {
                Some(eta) => println!(", ETA {}", query::human_secs(eta)),
                None => println!(),
            }
        }
        None => println!("not running"),
    }
    Ok(EXIT_OK)
}

fn cmd_list(
    db: &Path,
    state: Option<JobState>,
    provider: Option<ProviderKind>,
    json: bool,
) -> Result<i32, Fail> {
    let stdout = std::io::stdout();
    let mut out = std::io::BufWriter::new(stdout.lock());
    if !json {
        writeln!(
            out,
            "{:<24} {:<11} {:<14} {:<12} {:>3}  ERROR",
            "ID", "PROVIDER", "OPERATION", "STATE", "TRY"
        )?;
    }
    ask(db, &Query::List { state, provider }, &mut |v| {
        if json {
            return writeln!(out, "{v}");
        }
        let Ok(row) = serde_json::from_value::<JobRow>(v) else {
            return Ok(());
        };
        writeln!(
            out,
            "{:<24} {:<11} {:<14} {:<12} {:>3}  {}",
            row.id,
            row.provider,
            row.operation,
            row.state,
            row.attempts,
            row.error.unwrap_or_default()
        )
    })?;
    out.flush()?;
    Ok(EXIT_OK)
}

fn cmd_show(db: &Path, id: &str, json: bool) -> Result<i32, Fail> {
    let mut detail: Option<JobDetail> = None;
    ask(db, &Query::Show { id: id.to_string() }, &mut |v| {
        detail = serde_json::from_value(v).ok();
        Ok(())
    })?;
    let d = detail.ok_or_else(|| Fail(EXIT_ERROR, format!("no job with id {id:?}")))?;
    if json {
        println!("{}", serde_json::to_string_pretty(&d)?);
        return Ok(EXIT_OK);
    }
    let r = &d.row;
    println!("job        {}", r.id);
    println!("from       {}", r.origin);
    println!("provider   {} / {}", r.provider, r.operation);
    println!("inputs     {}", r.inputs);
    if let Some(p) = &d.prompt {
        println!("prompt     {p}");
    }
    println!("params     {}", d.params);
    if let Some(o) = &d.output {
        println!("output     {o}");
    }
    println!("state      {}", r.state);
    if let Some(remote) = &r.remote_id {
        println!("remote id  {remote}");
    }
    println!(
        "attempts   {} failed, {} submission(s)",
        r.attempts, r.submissions
    );
    if r.possible_duplicates > 0 {
        println!(
            "WARNING    {} possible duplicate charge(s): see the events below",
            r.possible_duplicates
        );
    }
    if let Some(e) = &r.error {
        println!("error      {e}");
    }
    for o in &d.outputs {
        println!(
            "output {}   {} ({} bytes, sha256 {})",
            o.index, o.path, o.size, o.sha256
        );
    }
    println!("events:");
    for e in &d.events {
        println!(
            "  {}  {:<26} {}",
            query::rfc3339(e.at_ms),
            e.kind.name(),
            e.message
        );
    }
    Ok(EXIT_OK)
}

fn cmd_report(db: &Path, format: ReportFormat, output: Option<&Path>) -> Result<i32, Fail> {
    let sink: Box<dyn Write> = match output {
        Some(p) => Box::new(
            std::fs::File::create(p)
                .map_err(|e| Fail(EXIT_ERROR, format!("{}: {e}", p.display())))?,
        ),
        None => Box::new(std::io::stdout().lock()),
    };
    let out = std::io::BufWriter::new(sink);
    match format {
        ReportFormat::Jsonl => {
            let mut out = out;
            ask(db, &Query::Report, &mut |v| writeln!(out, "{v}"))?;
            out.flush()?;
        }
        ReportFormat::Csv => {
            let mut w = csv::Writer::from_writer(out);
            w.write_record(REPORT_COLUMNS)?;
            ask(db, &Query::Report, &mut |v| {
                if let Ok(r) = serde_json::from_value::<JobRow>(v) {
                    w.write_record(report_record(&r))
                        .map_err(std::io::Error::other)?;
                }
                Ok(())
            })?;
            w.flush()?;
        }
    }
    Ok(EXIT_OK)
}

pub const REPORT_COLUMNS: [&str; 17] = [
    "id",
    "provider",
    "operation",
    "state",
    "inputs",
    "outputs",
    "sha256",
    "bytes",
    "remote_id",
    "attempts",
    "submissions",
    "possible_duplicates",
    "error",
    "origin",
    "created",
    "finished",
    "duration_s",
];

fn report_record(r: &JobRow) -> Vec<String> {
    vec![
        r.id.clone(),
        r.provider.to_string(),
        r.operation.clone(),
        r.state.to_string(),
        r.inputs.clone(),
        r.outputs.clone(),
        r.sha256.clone(),
        r.bytes.to_string(),
        r.remote_id.clone().unwrap_or_default(),
        r.attempts.to_string(),
        r.submissions.to_string(),
        r.possible_duplicates.to_string(),
        r.error.clone().unwrap_or_default(),
        r.origin.clone(),
        query::rfc3339(r.created_ms),
        r.finished_ms.map(query::rfc3339).unwrap_or_default(),
        r.duration_s.map(|d| format!("{d:.3}")).unwrap_or_default(),
    ]
}

// ----- retry / cancel -----------------------------------------------------------

fn cmd_retry(db: &Path, failed: bool, ids: &[String]) -> Result<i32, Fail> {
    if !failed && ids.is_empty() {
        return Err(Fail(
            EXIT_ERROR,
            "say which jobs: --failed or JOB_ID...".into(),
        ));
    }
    let _lock = lock_for_writing(db, "retry")?;
    let store = open_store(db)?;
    let targets: Vec<String> = if failed {
        store
            .ids_in_state(JobState::Failed, None)
            .collect::<Result<_, _>>()
            .map_err(|e| Fail(EXIT_ERROR, e.to_string()))?
    } else {
        ids.to_vec()
    };
    let mut n = 0;
    for id in &targets {
        let Some(mut job) = store.get(id)? else {
            eprintln!("pixbatch: no job with id {id:?}");
            continue;
        };
        if !matches!(job.state, JobState::Failed | JobState::Cancelled) {
            eprintln!(
                "pixbatch: {id} is {}, not failed or cancelled; left as it is",
                job.state
            );
            continue;
        }
        let remote_finished = job.remote_id.is_some() && !job.pending_outputs.is_empty();
        job.attempts = 0;
        job.error = None;
        job.finished_ms = None;
        job.due_ms = 0;
        if remote_finished {
            // The provider finished the task: fetch its results again rather than pay again.
            job.state = JobState::Downloading;
        } else {
            if job.remote_id.take().is_some() {
                job.submissions += 1;
            }
            job.pending_outputs.clear();
            job.state = JobState::Queued;
        }
        job.updated_ms = now_ms();
        store.save(&job)?;
        store.add_event(
            id,
            &JobEvent {
                at_ms: now_ms(),
                kind: EventKind::Requeued,
                message: format!("requeued by `pixbatch retry` as {}", job.state),
            },
        )?;
        n += 1;
    }
    store.flush()?;
    println!("{n} job(s) requeued");
    Ok(EXIT_OK)
}

async fn cmd_cancel(db: &Path, config: &Config, ids: &[String]) -> Result<i32, Fail> {
    let _lock = lock_for_writing(db, "cancel")?;
    let store = open_store(db)?;
    let mut n = 0;
    for id in ids {
        let Some(mut job) = store.get(id)? else {
            eprintln!("pixbatch: no job with id {id:?}");
            continue;
        };
        if job.state.is_terminal() {
            eprintln!("pixbatch: {id} is already {}", job.state);
            continue;
        }
        let mut note = "cancelled by `pixbatch cancel`".to_string();
        if let (Some(remote), true) = (job.remote_id.clone(), job.state.has_remote_task()) {
            let pc = config.provider(job.spec.provider);
            match crate::providers::build(&pc) {
                Ok(adapter) => {
                    let gate = Arc::new(engine::limiter::ProviderGate::new(
                        job.spec.provider,
                        &pc.rate_limits,
                        config.engine.rate_margin,
                        Some(store.clone()),
                    ));
                    let api = crate::api::Api::new(&pc.base_url, reqwest::Client::new(), gate);
                    match adapter.cancel(&api, &remote).await {
                        Ok(true) => note.push_str(&format!("; remote task {remote} cancelled")),
                        Ok(false) => note.push_str(&format!(
                            "; remote task {remote} could not be cancelled at the provider"
                        )),
                        Err(e) => {
                            note.push_str(&format!("; cancelling remote task {remote} failed: {e}"))
                        }
                    }
                }
                Err(e) => note.push_str(&format!("; remote task {remote} left running: {e}")),
            }
        }
        job.state = JobState::Cancelled;
        job.finished_ms = Some(now_ms());
        job.updated_ms = now_ms();
        job.error = Some(note.clone());
        store.save(&job)?;
        store.add_event(
            id,
            &JobEvent {
                at_ms: now_ms(),
                kind: EventKind::Cancelled,
                message: note.clone(),
            },
        )?;
        println!("{id}: {note}");
        n += 1;
    }
    store.flush()?;
    eprintln!("pixbatch: {n} job(s) cancelled");
    Ok(EXIT_OK)
}

// ----- styles / balance -----------------------------------------------------------

async fn cmd_styles(
    config: &Config,
    provider: ProviderKind,
    query: &crate::providers::StyleQuery,
    json: bool,
) -> Result<i32, Fail> {
    let (adapter, api) = engine::standalone(config, provider)
        .await
        .map_err(|e| Fail(EXIT_ERROR, e))?;
    let entries = adapter
        .styles(&api, query)
        .await
        .map_err(|e| Fail(EXIT_ERROR, format!("{provider}: {e}")))?;
    let mut out = std::io::stdout().lock();
    if json {
        for e in &entries {
            let detail: serde_json::Map<String, serde_json::Value> = e
                .detail
                .iter()
                .map(|(k, v)| (k.clone(), serde_json::Value::String(v.clone())))
                .collect();
            let line = serde_json::json!({
                "kind": e.kind, "id": e.id, "title": e.title, "detail": detail,
            });
            writeln!(out, "{line}")?;
        }
    } else {
        let id_width = entries.iter().map(|e| e.id.len()).max().unwrap_or(2).max(2);
        writeln!(out, "{:<6} {:<id_width$}  TITLE", "KIND", "ID")?;
        for e in &entries {
            let detail: Vec<String> = e.detail.iter().map(|(k, v)| format!("{k}={v}")).collect();
            let detail = if detail.is_empty() {
                String::new()
            } else {
                format!("  ({})", detail.join(", "))
            };
            writeln!(
                out,
                "{:<6} {:<id_width$}  {}{detail}",
                e.kind, e.id, e.title
            )?;
        }
    }
    if entries.is_empty() {
        eprintln!("pixbatch: {provider} listed no styles");
    }
    Ok(EXIT_OK)
}

async fn cmd_balance(config: &Config, provider: ProviderKind, json: bool) -> Result<i32, Fail> {
    let (adapter, api) = engine::standalone(config, provider)
        .await
        .map_err(|e| Fail(EXIT_ERROR, e))?;
    match adapter.balance(&api).await {
        Ok(Some(b)) => {
            if json {
                println!(
                    "{}",
                    serde_json::json!({"provider": provider.name(), "amount": b.amount, "unit": b.unit})
                );
            } else {
                println!("{provider}: {} {}", b.amount, b.unit);
            }
            Ok(EXIT_OK)
        }
        Ok(None) => Err(Fail(
            EXIT_ERROR,
            format!("{provider}: its API does not tell the balance"),
        )),
        Err(e) => Err(Fail(EXIT_ERROR, format!("{provider}: {e}"))),
    }
}

// ----- sim / demo ---------------------------------------------------------------

async fn cmd_sim(addr: &str, args: crate::sim::SimArgs) -> Result<i32, Fail> {
    let config = args.into_config().map_err(|e| Fail(EXIT_ERROR, e))?;
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| Fail(EXIT_ERROR, format!("cannot listen on {addr}: {e}")))?;
    let local = listener.local_addr()?;
    if !local.ip().is_loopback() {
        return Err(Fail(
            EXIT_ERROR,
            format!("the simulator serves loopback only, not {local}"),
        ));
    }
    let server = crate::sim::SimServer::bind(listener, config)?;
    // Credentials a client cannot make up (Perfect's generated key pair), as the
    // environment variables pixbatch reads, so `eval`-ing these lines configures it.
    if let Some(providers) = server.credentials().as_object() {
        for vars in providers.values().filter_map(|v| v.as_object()) {
            for (name, value) in vars {
                if let Some(value) = value.as_str() {
                    println!("export {name}='{value}'");
                }
            }
        }
    }
    // Tests read this line to learn the port.
    println!("pixbatch sim listening on http://{local}");
    std::io::stdout().flush()?;
    server
        .run(async {
            let _ = wait_for_stop_signal().await;
        })
        .await?;
    Ok(EXIT_OK)
}

async fn cmd_demo(
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
