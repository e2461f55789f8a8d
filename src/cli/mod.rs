//! The command line (SPEC §1): clap definitions and dispatch here; the commands live in
//! one submodule per family (run, inspect, manage, provider).
//!
//! Errors a user can cause map to the documented exit codes: 0 all done, 2 some jobs
//! failed, 3 another process holds the database, 4 the credit cap stopped new work,
//! 5 a provider was halted (credential missing or refused, unreachable), 1 anything
//! else, 130 interrupted.

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
/// `run --max-credits`: the cap stopped new work; what was submitted is finished.
pub const EXIT_CREDIT_CAP: i32 = 4;
/// `run`: a provider was halted (no credentials, credential refused, unreachable past
/// `unreachable_after`); its jobs are kept queued, the other providers' were worked.
pub const EXIT_PROVIDER_HALTED: i32 = 5;
pub const EXIT_INTERRUPTED: i32 = 130;

/// The exit codes, for `--help` (the manual page has them too, `shell::MAN_TAIL`).
pub const EXIT_CODES_HELP: &str = "\
Exit codes:
  0    every job is done (or cancelled)
  1    any other error (bad manifest row, bad configuration, unknown job id ...)
  2    some jobs failed permanently; the rest are done
  3    another process holds the database (the message names it); nothing was done
  4    run --max-credits stopped submitting new work; what was submitted is finished
  5    run halted a provider (key missing or refused, host unreachable); its jobs
       stay queued, the message names what to fix
  130  interrupted (Ctrl-C or SIGTERM); run again to resume";

/// The job states, for the help of `--state` (a test checks it lists every one).
const STATES_HELP: &str = "queued, preparing, submitting, submitted, polling, downloading, retry-wait, done, failed, cancelled";

#[derive(Parser, Debug)]
#[command(name = "pixbatch", version, about = "Durable batch jobs for paid AI image APIs", long_about = None, after_help = EXIT_CODES_HELP)]
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
    /// Log lines as text, or as JSON objects (one per line) for log shippers.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Enqueue the manifests (idempotently), then work until no job is runnable.
    #[command(after_help = EXIT_CODES_HELP)]
    Run(RunArgs),
    /// Only enqueue.
    Enqueue {
        /// Manifest files: CSV, a JSON array or JSON Lines (by extension or content).
        #[arg(required = true, value_name = "MANIFEST")]
        manifests: Vec<PathBuf>,
        /// A row whose id is in the database with other content becomes a new
        /// version of that job (the old one's files and history are kept).
        #[arg(long)]
        update: bool,
    },
    /// Check every row and print the plan and what it will cost; enqueues nothing.
    Validate {
        /// Manifest files: CSV, a JSON array or JSON Lines (by extension or content).
        #[arg(required = true, value_name = "MANIFEST")]
        manifests: Vec<PathBuf>,
        /// Ask no provider anything (no estimates, no balances).
        #[arg(long)]
        offline: bool,
        /// One JSON object: the bad rows, providers without credentials, the plan
        /// and its cost ("ok" says whether `run` would take it all).
        #[arg(long)]
        json: bool,
    },
    /// Counts per state and provider, rate, ETA.
    Status {
        /// One JSON object instead of the table.
        #[arg(long)]
        json: bool,
    },
    /// List jobs, one line each (the filters combine).
    List {
        /// Only jobs in this state.
        #[arg(long, value_name = "STATE", long_help = format!("Only jobs in this state: one of {STATES_HELP}"), help = format!("Only jobs in this state [possible values: {STATES_HELP}]"))]
        state: Option<JobState>,
        /// Only this provider's jobs: topaz, photio, aithriving, perfect or dzine.
        #[arg(long)]
        provider: Option<ProviderKind>,
        /// Only jobs from this manifest (as given to run/enqueue, or any path to it).
        #[arg(long, value_name = "FILE")]
        manifest: Option<PathBuf>,
        /// Stop after N jobs.
        #[arg(long, value_name = "N")]
        limit: Option<u64>,
        /// One JSON object per line.
        #[arg(long)]
        json: bool,
    },
    /// One job: spec, state, attempts and their errors, outputs.
    Show {
        /// The job's id (the manifest's `id`).
        #[arg(value_name = "JOB_ID")]
        job_id: String,
        /// The whole record as one JSON object.
        #[arg(long)]
        json: bool,
    },
    /// Put failed or cancelled jobs back in the queue (all filters combine).
    Retry(RetryArgs),
    /// Cancel unfinished jobs (and their remote tasks where the provider can); the
    /// filters combine, as for retry. Exits 1 if a named job is unknown or finished.
    Cancel(CancelArgs),
    /// Every job as CSV, JSON Lines, or an HTML page with input and output previews.
    Report {
        /// The format; default: from the extension of -o (.html, .jsonl/.ndjson/.json,
        /// .csv), else csv.
        #[arg(long, value_enum)]
        format: Option<ReportFormat>,
        /// Write to FILE instead of stdout (replaced whole when complete).
        #[arg(short = 'o', long = "output", value_name = "FILE")]
        output: Option<PathBuf>,
        /// Only jobs in this state (`--state failed -o redo.csv` is a manifest of the
        /// failures, for `run` here or elsewhere).
        #[arg(long)]
        state: Option<JobState>,
        /// Only this provider's jobs.
        #[arg(long)]
        provider: Option<ProviderKind>,
        /// HTML: preview the pictures of the first N jobs (the rest are listed
        /// without previews; each preview adds ~5 KB to the page).
        #[arg(long, value_name = "N", default_value_t = 1000)]
        thumbnails: u64,
    },
    /// List the styles a provider offers, with the ids to put in a manifest's params
    /// (Perfect: the style groups of FEATURE, or with --group the styles in one).
    Styles {
        /// The provider: topaz, photio, aithriving, perfect or dzine.
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
    /// Check every done job's files against the database (missing, changed) and
    /// the output folders for files no job wrote (foreign); exit 1 on any. Files are
    /// looked for where each job wrote them, or under --out if given. Needs the
    /// database free (not during a run: exit 3). Also after a disk incident.
    Verify {
        /// One JSON document: counts and every problem.
        #[arg(long)]
        json: bool,
    },
    /// Print a provider's remaining credit (where its API tells it).
    Balance {
        /// The provider: topaz, photio, aithriving, perfect or dzine.
        provider: ProviderKind,
        /// One JSON object.
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
    /// Print a shell completion script (bash, zsh, fish, elvish, powershell).
    Completions {
        /// The shell to complete for.
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// Print the manual page (roff), made from these command definitions.
    Man,
    /// Print the effective configuration (defaults <- file <- environment), secrets
    /// redacted.
    Config,
    /// Check each configured provider's base URL and credentials with one cheap call.
    /// Exits 1 if any configured provider has a problem, or none is configured.
    Doctor {
        /// One JSON object: each provider's verdict, message and base URL.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Args, Debug, Default)]
pub struct RetryArgs {
    /// Every failed job (the same as --state failed).
    #[arg(long)]
    pub failed: bool,
    /// Jobs in this state: failed or cancelled (repeat for both).
    #[arg(
        long,
        value_name = "STATE",
        help = "Jobs in this state (repeat for both) [possible values: failed, cancelled]"
    )]
    pub state: Vec<JobState>,
    /// Only this provider's jobs.
    #[arg(long)]
    pub provider: Option<ProviderKind>,
    /// Only jobs whose error contains TEXT (ignoring case).
    #[arg(long, value_name = "TEXT")]
    pub error: Option<String>,
    /// Only jobs that ended at or after TIME: RFC 3339 (2025-05-01T22:00:00Z), a
    /// date (2025-05-01, UTC), or a duration ago (2h, 30m, 1d).
    #[arg(long, value_name = "TIME")]
    pub since: Option<String>,
    /// Print the jobs that would be requeued; change nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// One JSON object: the jobs changed, the named ones skipped (with why), the
    /// unknown ids.
    #[arg(long)]
    pub json: bool,
    /// These jobs (the filters apply to them too). An unknown one makes the exit 1.
    #[arg(value_name = "JOB_ID")]
    pub job_ids: Vec<String>,
}

#[derive(Args, Debug, Default)]
pub struct CancelArgs {
    /// Jobs in this state (an unfinished one: queued, retry-wait, polling …;
    /// repeatable). Default: every unfinished state.
    #[arg(long, value_name = "STATE")]
    pub state: Vec<JobState>,
    /// Only this provider's jobs.
    #[arg(long)]
    pub provider: Option<ProviderKind>,
    /// Only jobs whose error text (of a failed attempt) contains TEXT, ignoring case.
    #[arg(long, value_name = "TEXT")]
    pub error: Option<String>,
    /// Only jobs that last changed at or after TIME (as for retry).
    #[arg(long, value_name = "TIME")]
    pub since: Option<String>,
    /// Print the jobs that would be cancelled; change nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// One JSON object: the jobs cancelled, the named ones skipped (with why), the
    /// unknown ids.
    #[arg(long)]
    pub json: bool,
    /// These jobs (the filters apply to them too). An unknown one makes the exit 1.
    #[arg(value_name = "JOB_ID")]
    pub job_ids: Vec<String>,
}

#[derive(Args, Debug, Default)]
pub struct RunArgs {
    /// Manifest files to enqueue first (CSV, a JSON array or JSON Lines); none: work
    /// on what the database holds.
    #[arg(value_name = "MANIFEST")]
    pub manifests: Vec<PathBuf>,
    /// Print only the summary.
    #[arg(short, long)]
    pub quiet: bool,
    /// At most N requests at once per provider (over each provider's `concurrency`).
    #[arg(short = 'j', long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..=1024))]
    pub concurrency: Option<u64>,
    /// Work only this provider's jobs (repeatable); the others stay as they are.
    #[arg(long, value_name = "PROVIDER")]
    pub provider: Vec<ProviderKind>,
    /// Start at most N queued jobs; jobs already under way are finished too. The
    /// rest stay queued for a later run (exit 0 when those started all ended done).
    #[arg(long, value_name = "N")]
    pub limit: Option<u64>,
    #[command(flatten)]
    pub metrics: MetricsArgs,
    // --- cost, reprocessing and cron (docs/operations.md) ---
    /// Check the manifests and print the plan and its cost, what the database still
    /// holds, and the spend so far; enqueue and send nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// With --dry-run: ask no provider anything.
    #[arg(long, requires = "dry_run")]
    pub offline: bool,
    /// With --dry-run: the preview as one JSON object (as `validate --json`, plus
    /// the database's pending jobs, the spend so far and the caps).
    #[arg(long, requires = "dry_run")]
    pub json: bool,
    /// Stop submitting new work once the estimated spend of this database would pass
    /// N (each provider in its own unit), or PROVIDER=N for one provider; repeatable.
    /// Exits 4 when it stopped work.
    #[arg(long = "max-credits", value_name = "N|PROVIDER=N")]
    pub max_credits: Vec<String>,
    /// A row whose id is in the database with other content becomes a new version.
    #[arg(long)]
    pub update: bool,
    /// Put the failed jobs back in the queue first (like `retry --failed`).
    #[arg(long)]
    pub retry_failed: bool,
    /// If another process holds the database, wait up to SECONDS for it (then exit 3).
    #[arg(long, value_name = "SECONDS")]
    pub wait_lock: Option<u64>,
    /// Run CMD with `sh -c` when the run ends, the summary in its environment
    /// (PIXBATCH_EXIT_CODE, PIXBATCH_DONE, PIXBATCH_FAILED …).
    #[arg(long, value_name = "CMD")]
    pub on_finish: Option<String>,
}

#[derive(ValueEnum, Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

#[derive(ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReportFormat {
    Csv,
    Jsonl,
    /// One self-contained page (previews inlined, no network), for a browser.
    Html,
}

impl ReportFormat {
    /// The format a report file's name asks for (csv when it says nothing).
    pub fn for_file(path: Option<&Path>) -> ReportFormat {
        let ext = path
            .and_then(|p| p.extension())
            .map(|e| e.to_string_lossy().to_ascii_lowercase());
        match ext.as_deref() {
            Some("html" | "htm") => ReportFormat::Html,
            Some("jsonl" | "ndjson" | "json") => ReportFormat::Jsonl,
            _ => ReportFormat::Csv,
        }
    }
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
    // After the runtime is gone, so the database is closed: the command may read it.
    run::run_finish_hook(code);
    code
}

/// A failure with its exit code and message.
struct Fail(i32, String);

/// Not an exit code: the reader of our stdout went away (`pixbatch list | head -1`).
/// `dispatch` turns it into a quiet exit 0, as `cat` and `git log` end in a pipe.
const CLOSED_PIPE: i32 = -1;

impl Fail {
    fn closed_pipe() -> Fail {
        Fail(CLOSED_PIPE, String::new())
    }
}

impl<E: std::fmt::Display + 'static> From<E> for Fail {
    fn from(e: E) -> Self {
        let any: &dyn std::any::Any = &e;
        if let Some(io) = any.downcast_ref::<std::io::Error>() {
            if io.kind() == std::io::ErrorKind::BrokenPipe {
                return Fail::closed_pipe();
            }
        }
        if let Some(query::QueryError::Io(io)) = any.downcast_ref::<query::QueryError>() {
            if io.kind() == std::io::ErrorKind::BrokenPipe {
                return Fail::closed_pipe();
            }
        }
        if let Some(csv) = any.downcast_ref::<csv::Error>() {
            if let csv::ErrorKind::Io(io) = csv.kind() {
                if io.kind() == std::io::ErrorKind::BrokenPipe {
                    return Fail::closed_pipe();
                }
            }
        }
        Fail(EXIT_ERROR, e.to_string())
    }
}

async fn dispatch(cli: Cli) -> i32 {
    // These need no configuration: a broken config file must not hide them.
    let standalone = match &cli.command {
        Command::Completions { shell } => Some(shell::cmd_completions(*shell)),
        Command::Man => Some(shell::cmd_man()),
        _ => None,
    };
    if let Some(result) = standalone {
        return result.unwrap_or_else(|Fail(code, message)| {
            eprintln!("pixbatch: {message}");
            code
        });
    }
    let env = |k: &str| std::env::var(k).ok();
    let config = match Config::load(cli.config.as_deref(), &env) {
        Ok(c) => c,
        Err(e) => {
            if matches!(cli.command, Command::Doctor { .. } | Command::Config) {
                return doctor::bad_config(&e);
            }
            if cli.log_format == LogFormat::Json {
                // Logging is not set up yet (it needs the configured secrets to scrub).
                let record = serde_json::json!({
                    "timestamp": query::rfc3339(now_ms()),
                    "level": "ERROR",
                    "message": e.to_string(),
                    "exit_code": EXIT_ERROR,
                    "target": "pixbatch::cli",
                });
                eprintln!("{record}");
            } else {
                eprintln!("pixbatch: {e}");
            }
            return EXIT_ERROR;
        }
    };
    let bar = SharedBar::default();
    let secrets = config.secrets();
    let quiet = matches!(&cli.command, Command::Run(a) if a.quiet);
    init_logging(
        cli.verbose,
        quiet,
        cli.log_format,
        secrets.clone(),
        bar.clone(),
    );
    progress::install_panic_hook(secrets.clone());
    // Test builds only: a way to check the panic hook on the real binary.
    #[cfg(debug_assertions)]
    if let Ok(message) = std::env::var("PIXBATCH_DEBUG_PANIC") {
        panic!("{message}");
    }
    let db = cli
        .db
        .clone()
        .unwrap_or_else(|| PathBuf::from("pixbatch.db"));
    let out = cli.out.clone().unwrap_or_else(|| PathBuf::from("out"));
    let result = match cli.command {
        Command::Run(args) => cmd_run(&db, &out, config, &args, bar).await,
        Command::Enqueue { manifests, update } => cmd_enqueue(&db, &config, &manifests, update),
        Command::Validate {
            manifests,
            offline,
            json,
        } => cmd_validate(&db, &config, &manifests, offline, json).await,
        Command::Status { json } => cmd_status(&db, json),
        Command::List {
            state,
            provider,
            manifest,
            limit,
            json,
        } => {
            // The run answering may work in another folder: send the file's full path.
            let manifest = manifest.map(|m| {
                std::fs::canonicalize(&m)
                    .unwrap_or(m)
                    .to_string_lossy()
                    .into_owned()
            });
            let query = Query::List {
                state,
                provider,
                manifest,
                limit,
            };
            cmd_list(&db, &query, json)
        }
        Command::Show { job_id, json } => cmd_show(&db, cli.out.as_deref(), &job_id, json),
        Command::Retry(args) => cmd_retry(&db, &args),
        Command::Cancel(args) => cmd_cancel(&db, &config, &args).await,
        Command::Report {
            format,
            output,
            state,
            provider,
            thumbnails,
        } => {
            let format = format.unwrap_or_else(|| ReportFormat::for_file(output.as_deref()));
            let filter = Query::List {
                state,
                provider,
                manifest: None,
                limit: None,
            };
            // The jobs' own recorded folder unless --out says otherwise.
            cmd_report(
                &db,
                cli.out.as_deref(),
                format,
                &filter,
                output.as_deref(),
                thumbnails,
            )
        }
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
        Command::Verify { json } => verify::cmd_verify(&db, cli.out.as_deref(), &out, json),
        Command::Balance { provider, json } => cmd_balance(&config, provider, json).await,
        Command::Sim { addr, sim } => cmd_sim(&addr, sim).await,
        Command::Demo => cmd_demo(cli.db, &out, config, bar).await,
        Command::Completions { .. } | Command::Man => Ok(EXIT_OK),
        Command::Config => shell::cmd_config(&config),
        Command::Doctor { json } => doctor::cmd_doctor(&config, json).await,
    };
    match result {
        Ok(code) => code,
        Err(Fail(CLOSED_PIPE, _)) => EXIT_OK,
        Err(Fail(code, message)) => {
            let message = progress::scrub(&message, &secrets);
            if cli.log_format == LogFormat::Json {
                // One event (the log writer scrubs again), so a shipper sees one record.
                tracing::error!(exit_code = code, "{message}");
                return code;
            }
            for line in message.lines() {
                eprintln!("pixbatch: {line}");
            }
            code
        }
    }
}

/// Log lines go to stderr through `progress::LogWriter`, which scrubs every secret
/// (in JSON too) and keeps them above the progress bar.
fn init_logging(verbose: u8, quiet: bool, format: LogFormat, secrets: Vec<String>, bar: SharedBar) {
    use std::io::IsTerminal;
    let default = match verbose {
        // `run --quiet`: warnings and errors only, besides the summary.
        0 if quiet => "pixbatch=warn",
        0 => "pixbatch=info",
        1 => "pixbatch=debug",
        _ => "pixbatch=trace",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    let writer = progress::LogWriter::new(secrets, bar);
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(writer);
    let _ = match format {
        // At the default level, records look like the rest of stderr (one format).
        LogFormat::Text if verbose == 0 => builder.event_format(progress::PlainFormat).try_init(),
        LogFormat::Text => builder
            .with_ansi(std::io::stderr().is_terminal())
            .with_target(false)
            .try_init(),
        LogFormat::Json => {
            // Progress lines become log events too, so stderr is all JSON.
            progress::set_json_lines(true);
            builder
                .json()
                .flatten_event(true)
                .with_current_span(false)
                .with_ansi(false)
                .with_target(true)
                .try_init()
        }
    };
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

mod doctor;
mod inspect;
mod manage;
mod provider;
mod run;
mod shell;
mod verify;

use inspect::{cmd_list, cmd_report, cmd_show, cmd_status};
mod observe;
use manage::{cmd_cancel, cmd_retry};
pub use observe::MetricsArgs;
use provider::{cmd_balance, cmd_sim, cmd_styles};
use run::{cmd_demo, cmd_enqueue, cmd_run, cmd_validate, wait_for_stop_signal};
