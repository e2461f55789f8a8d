//! Reading commands (`status`, `list`, `show`, `report`): answered from the database,
//! or by the run that holds it over its control socket.

use super::*;

/// Answers a query from the database, or from the run that holds it.
pub(super) fn ask(
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

pub(super) fn cmd_status(db: &Path, json: bool) -> Result<i32, Fail> {
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

pub(super) fn cmd_list(
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

pub(super) fn cmd_show(db: &Path, id: &str, json: bool) -> Result<i32, Fail> {
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

pub(super) fn cmd_report(
    db: &Path,
    format: ReportFormat,
    output: Option<&Path>,
) -> Result<i32, Fail> {
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

pub(super) fn report_record(r: &JobRow) -> Vec<String> {
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
