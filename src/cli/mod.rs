//! The command line (SPEC §1): clap definitions and dispatch here; the commands live in
//! one submodule per family (run, inspect, manage, provider).
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

mod inspect;
mod manage;
mod provider;
mod run;

pub use inspect::REPORT_COLUMNS;
use inspect::{cmd_list, cmd_report, cmd_show, cmd_status};
use manage::{cmd_cancel, cmd_retry};
use provider::{cmd_balance, cmd_sim, cmd_styles};
use run::{cmd_demo, cmd_enqueue, cmd_run, cmd_validate, wait_for_stop_signal};
