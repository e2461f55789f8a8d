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
    // No database and no process about to make one (it would hold `<db>.lock`): say
    // so without leaving a lock file behind.
    if !db.exists() && !lock::lock_path(db).exists() {
        return Err(no_database(db));
    }
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    let mut last;
    loop {
        match DbLock::try_acquire(db, "read") {
            Ok(_lock) => {
                if !db.exists() {
                    return Err(no_database(db));
                }
                let store = open_store(db)?;
                return query::answer(&store, query, None, emit).map_err(Fail::from);
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
                    Err(e) => return Err(Fail::from(e)),
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

/// "No database at X", with the way to the demo's database when that is the one
/// the user means (`pixbatch status` right after `pixbatch demo`).
pub(super) fn no_database(db: &Path) -> Fail {
    let mut message = format!("no database at {}", db.display());
    let demo = Path::new(crate::demo::FOLDER).join("pixbatch.db");
    if db == Path::new("pixbatch.db") && demo.exists() {
        message.push_str(&format!(
            " (the demo's database is {0}: `pixbatch --db {0} status`)",
            demo.display()
        ));
    } else {
        message.push_str(" (`pixbatch run MANIFEST` or `pixbatch enqueue MANIFEST` makes one)");
    }
    Fail(EXIT_ERROR, message)
}

pub(super) fn cmd_status(db: &Path, json: bool) -> Result<i32, Fail> {
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    let mut report: Option<StatusReport> = None;
    ask(db, &Query::Status, &mut |v| {
        report = serde_json::from_value(v).ok();
        Ok(())
    })?;
    let report = report.ok_or_else(|| Fail(EXIT_ERROR, "empty status answer".into()))?;
    if json {
        writeln!(out, "{}", serde_json::to_string_pretty(&report)?)?;
        return Ok(EXIT_OK);
    }
    writeln!(out, "{} jobs", report.total)?;
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
        writeln!(out, "  {:<12} {:>8}  ({})", state.name(), n, per.join(", "))?;
    }
    match &report.running {
        Some(l) => {
            write!(
                out,
                "running: pid {}, for {}, {:.2} jobs/s, {} finished by this run",
                l.pid,
                query::ago(l.started_ms),
                l.rate_per_sec,
                l.finished_this_run
            )?;
            match report.eta_secs {
                Some(eta) => writeln!(out, ", ETA {}", query::human_secs(eta))?,
                None => writeln!(out)?,
            }
            for h in &l.halted {
                println!("{h}");
            }
            for line in provider_lines(&l.providers) {
                println!("{line}");
            }
        }
        None => writeln!(out, "not running")?,
    }
    Ok(EXIT_OK)
}

/// One line per provider of the run: its rate, what is left, its ETA, and why it
/// waits and until when.
fn provider_lines(providers: &[crate::wait::ProviderLive]) -> Vec<String> {
    let now = now_ms();
    providers
        .iter()
        .map(|p| {
            let eta = match p.eta_secs {
                _ if p.remaining == 0 => "all finished".to_string(),
                Some(s) => format!("ETA {}", query::human_secs(s)),
                None => "ETA unknown (none finished yet)".to_string(),
            };
            let wait = match &p.wait {
                Some(w) => format!("waiting: {}", w.describe(now)),
                None => "working".to_string(),
            };
            format!(
                "  {:<11} {:>6.1} jobs/min  {:>5.2} req/s  {:>6} left  {eta}  {wait}",
                p.provider.name(),
                p.jobs_per_min,
                p.requests_per_sec,
                p.remaining
            )
        })
        .collect()
}

pub(super) fn cmd_list(db: &Path, query: &Query, json: bool) -> Result<i32, Fail> {
    let stdout = std::io::stdout();
    let mut out = std::io::BufWriter::new(stdout.lock());
    // The header goes out with the first row (or after an empty answer), so a failed
    // query prints nothing on stdout.
    let header = |out: &mut dyn Write| {
        writeln!(
            out,
            "{:<24} {:<11} {:<14} {:<12} {:>3}  ERROR",
            "ID", "PROVIDER", "OPERATION", "STATE", "TRY"
        )
    };
    let mut started = json;
    ask(db, query, &mut |v| {
        if json {
            return writeln!(out, "{v}");
        }
        let Ok(row) = serde_json::from_value::<JobRow>(v) else {
            return Ok(());
        };
        if !started {
            header(&mut out)?;
            started = true;
        }
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
    if !started {
        header(&mut out)?;
    }
    out.flush()?;
    Ok(EXIT_OK)
}

pub(super) fn cmd_show(
    db: &Path,
    out_dir: Option<&Path>,
    id: &str,
    json: bool,
) -> Result<i32, Fail> {
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    let mut detail: Option<JobDetail> = None;
    ask(db, &Query::Show { id: id.to_string() }, &mut |v| {
        detail = serde_json::from_value(v).ok();
        Ok(())
    })?;
    let mut d = detail.ok_or_else(|| Fail(EXIT_ERROR, format!("no job with id {id:?}")))?;
    if out_dir.is_some() || d.files.is_empty() {
        // `--out` names where the files are now; without it and without a recorded
        // folder, the default `out`.
        let dir = crate::report::out_dir_of(&d.row, out_dir);
        d.files = d
            .outputs
            .iter()
            .map(|o| dir.join(&o.path).display().to_string())
            .collect();
    }
    if json {
        writeln!(out, "{}", serde_json::to_string_pretty(&d)?)?;
        return Ok(EXIT_OK);
    }
    let r = &d.row;
    writeln!(out, "job        {}", r.id)?;
    writeln!(out, "from       {}", r.origin)?;
    writeln!(out, "provider   {} / {}", r.provider, r.operation)?;
    writeln!(out, "inputs     {}", r.inputs.join(" | "))?;
    if let Some(p) = &d.prompt {
        writeln!(out, "prompt     {p}")?;
    }
    writeln!(out, "params     {}", d.params)?;
    if let Some(o) = &d.output {
        writeln!(out, "output     {o}")?;
    }
    for (k, v) in &r.metadata.0 {
        writeln!(out, "{:<10} {v}", format!("{k}:"))?;
    }
    writeln!(out, "state      {}", r.state)?;
    if let Some(remote) = &r.remote_id {
        writeln!(out, "remote id  {remote}")?;
    }
    writeln!(
        out,
        "attempts   {} failed, {} submission(s)",
        r.attempts, r.submissions
    )?;
    if r.possible_duplicates > 0 {
        writeln!(
            out,
            "WARNING    {} possible duplicate charge(s): see the events below",
            r.possible_duplicates
        )?;
    }
    if let Some(e) = &r.error {
        writeln!(out, "error      {e}")?;
    }
    for (i, o) in d.outputs.iter().enumerate() {
        let path = d.files.get(i).cloned().unwrap_or_else(|| o.path.clone());
        let pixels = match query::pixels(o) {
            Some(p) => format!("{p} px, "),
            None => String::new(),
        };
        writeln!(
            out,
            "output {}   {} ({pixels}{} bytes, sha256 {})",
            o.index, path, o.size, o.sha256
        )?;
    }
    for v in &d.versions {
        writeln!(
            out,
            "version {}  {} ({}), outputs {}",
            v.version,
            v.job.state,
            v.params,
            v.job.outputs.join(", ")
        )?;
    }
    writeln!(out, "events:")?;
    for e in &d.events {
        writeln!(
            out,
            "  {}  {:<26} {}",
            query::rfc3339(e.at_ms),
            e.kind.name(),
            e.message
        )?;
    }
    Ok(EXIT_OK)
}

pub(super) fn cmd_report(
    db: &Path,
    out_dir: Option<&Path>,
    format: ReportFormat,
    filter: &Query,
    output: Option<&Path>,
    thumbnails: u64,
) -> Result<i32, Fail> {
    // A file is written under a temporary name and renamed when complete, so a
    // browser or script never reads half a report.
    let tmp = output.map(|p| {
        let mut name = p.file_name().unwrap_or_default().to_os_string();
        name.push(format!(".{}.tmp", std::process::id()));
        p.with_file_name(name)
    });
    let sink: Box<dyn Write> = match &tmp {
        Some(t) => Box::new(
            std::fs::File::create(t)
                .map_err(|e| Fail(EXIT_ERROR, format!("{}: {e}", t.display())))?,
        ),
        None => Box::new(std::io::stdout().lock()),
    };
    let result = write_report(db, out_dir, format, filter, sink, thumbnails);
    if let (Some(t), Some(p)) = (&tmp, output) {
        match &result {
            Ok(_) => std::fs::rename(t, p)
                .map_err(|e| Fail(EXIT_ERROR, format!("{}: {e}", p.display())))?,
            Err(_) => {
                let _ = std::fs::remove_file(t);
            }
        }
    }
    result
}

/// The rows of `filter`, each completed from the files (`report::complete_row`).
fn rows(
    db: &Path,
    filter: &Query,
    out_dir: Option<&Path>,
    each: &mut dyn FnMut(JobRow) -> std::io::Result<()>,
) -> Result<(), Fail> {
    ask(
        db,
        filter,
        &mut |v| match serde_json::from_value::<JobRow>(v) {
            Ok(mut r) => {
                crate::report::complete_row(&mut r, out_dir);
                each(r)
            }
            Err(e) => Err(std::io::Error::other(format!("a report row: {e}"))),
        },
    )
}

fn write_report(
    db: &Path,
    out_dir: Option<&Path>,
    format: ReportFormat,
    filter: &Query,
    sink: Box<dyn Write>,
    thumbnails: u64,
) -> Result<i32, Fail> {
    let out = std::io::BufWriter::new(sink);
    match format {
        ReportFormat::Jsonl => {
            let mut out = out;
            rows(db, filter, out_dir, &mut |r| {
                let line = serde_json::to_string(&r).map_err(std::io::Error::other)?;
                writeln!(out, "{line}")
            })?;
            out.flush()?;
        }
        ReportFormat::Csv => {
            // The extra columns are known only from the rows: a first pass collects
            // their names (in the order first seen), the second writes.
            let mut extra: Vec<String> = Vec::new();
            ask(db, filter, &mut |v| {
                if let Some(m) = v.get("metadata").and_then(|m| m.as_object()) {
                    for k in m.keys() {
                        if !extra.contains(k) {
                            extra.push(k.clone());
                        }
                    }
                }
                Ok(())
            })?;
            let mut w = csv::Writer::from_writer(out);
            // Keeps a closed pipe's error kind, so `report | head` ends quietly.
            let csv_io = |e: csv::Error| match e.into_kind() {
                csv::ErrorKind::Io(io) => io,
                other => std::io::Error::other(format!("{other:?}")),
            };
            w.write_record(crate::report::csv_header(&extra))?;
            rows(db, filter, out_dir, &mut |r| {
                w.write_record(crate::report::csv_record(&r, &extra))
                    .map_err(csv_io)
            })?;
            w.flush()?;
        }
        ReportFormat::Html => {
            let opts = crate::report::html::HtmlOptions {
                out_dir: out_dir.map(Path::to_path_buf),
                max_thumbnail_jobs: thumbnails,
                source: db.display().to_string(),
                ..Default::default()
            };
            let mut page = crate::report::html::HtmlReport::new(out, opts)?;
            rows(db, filter, out_dir, &mut |r| page.push(r))?;
            page.finish()?;
        }
    }
    Ok(EXIT_OK)
}
