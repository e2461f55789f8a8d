//! `pixbatch verify`: the output folder against the database (the walk and the
//! checks are in [`crate::verify`]).

use super::*;

/// `out`: the `--out` the user gave (every job's files are looked for there), or
/// None to look where each job recorded writing them (`default_out` for jobs that
/// recorded no folder).
pub(super) fn cmd_verify(
    db: &Path,
    out: Option<&Path>,
    default_out: &Path,
    json: bool,
) -> Result<i32, Fail> {
    if !db.exists() {
        return Err(Fail(
            EXIT_ERROR,
            format!(
                "no database at {} (give the run's --db, and its --out)",
                db.display()
            ),
        ));
    }
    // Held for the whole check: no run moves files or records meanwhile, so what is
    // reported is what is there. A run holding it is said at once (exit 3).
    let _lock = lock_for_writing(db, "verify")?;
    let store = open_store(db)?;
    // The database's own files (its folder, lock and socket all start with its
    // path), should they sit inside the output folder.
    let skip = [db.to_path_buf()];
    let v = crate::verify::verify(&store, out, default_out, &skip)?;
    let is = |f: fn(&crate::verify::Problem) -> bool| v.count(f);
    let missing = is(|p| matches!(p, crate::verify::Problem::Missing));
    let changed = is(|p| matches!(p, crate::verify::Problem::Changed { .. }));
    let foreign = is(|p| matches!(p, crate::verify::Problem::Foreign));
    if json {
        let mut doc = serde_json::to_value(&v)?;
        doc["ok"] = serde_json::Value::Bool(v.ok());
        doc["out"] = serde_json::Value::String(v.folders.join(", "));
        println!("{}", serde_json::to_string_pretty(&doc)?);
    } else {
        let stdout = std::io::stdout();
        let mut w = std::io::BufWriter::new(stdout.lock());
        for p in &v.problems {
            writeln!(w, "{p}")?;
        }
        w.flush()?;
    }
    let summary = format!(
        "{} file(s) of {} done job(s) checked against {}, {} file(s) under {}",
        v.files_checked,
        v.done_jobs,
        db.display(),
        v.files_found,
        v.folders.join(", ")
    );
    if v.ok() {
        progress::notice(&format!("{summary}: all in place"));
        Ok(EXIT_OK)
    } else {
        progress::notice(&summary);
        Err(Fail(
            EXIT_ERROR,
            format!("{missing} missing, {changed} changed, {foreign} foreign file(s)"),
        ))
    }
}
