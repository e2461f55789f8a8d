//! What a person sees on stderr: a progress bar on a terminal, periodic plain lines
//! otherwise (cron mails, CI logs), and log lines with every known secret scrubbed.

use std::io::{IsTerminal, Write};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::engine::{Progress, ProgressSink};
use crate::model::JobState;
use crate::query::human_secs;

/// Set by `--log-format json`: every stderr line is then a JSON log record.
static JSON_LINES: AtomicBool = AtomicBool::new(false);

pub fn set_json_lines(on: bool) {
    JSON_LINES.store(on, Ordering::Relaxed);
}

/// The bar of the run, once there is one: notices print above it (not into it).
static ACTIVE_BAR: std::sync::OnceLock<SharedBar> = std::sync::OnceLock::new();

/// A message for the person at the terminal: `pixbatch: <message>` on stderr, or a
/// log record when logs are JSON (so a log shipper reads nothing but JSON).
pub fn notice(message: &str) {
    if JSON_LINES.load(Ordering::Relaxed) {
        tracing::info!("{message}");
        return;
    }
    let print = || eprintln!("pixbatch: {message}");
    match ACTIVE_BAR.get() {
        Some(bar) => bar.with(|b| match b {
            Some(b) => b.suspend(print),
            None => print(),
        }),
        None => print(),
    }
}

/// Takes the progress line off the terminal (before the process exits at once, so
/// no stale frame stays behind the shell prompt).
pub fn clear_bar() {
    if let Some(bar) = ACTIVE_BAR.get() {
        bar.finish();
    }
}

/// Replaces every secret in `text` with `<redacted>`.
pub fn scrub(text: &str, secrets: &[String]) -> String {
    let mut out = text.to_string();
    for s in secrets {
        if !s.is_empty() && out.contains(s.as_str()) {
            out = out.replace(s.as_str(), "<redacted>");
        }
    }
    out
}

/// Replaces the default panic message with one scrubbed of `secrets`: a panic's
/// message can carry any value the code had in hand (a header, a URL, a config).
pub fn install_panic_hook(secrets: Vec<String>) {
    std::panic::set_hook(Box::new(move |info| {
        let text = panic_report(info.payload(), info.location(), &secrets);
        let _ = std::io::stderr().write_all(text.as_bytes());
    }));
}

/// The text the panic hook prints: where, what (scrubbed), and the backtrace when
/// `RUST_BACKTRACE` asks for one (scrubbed too).
pub fn panic_report(
    payload: &(dyn std::any::Any + Send),
    location: Option<&std::panic::Location<'_>>,
    secrets: &[String],
) -> String {
    let message = payload
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "(no message)".to_string());
    let thread = std::thread::current()
        .name()
        .unwrap_or("<unnamed>")
        .to_string();
    let at = location
        .map(|l| format!(" at {}:{}:{}", l.file(), l.line(), l.column()))
        .unwrap_or_default();
    let mut text = format!(
        "pixbatch: internal error (a bug; please report it): thread '{thread}' panicked{at}:\n{message}\n"
    );
    let backtrace = std::backtrace::Backtrace::capture();
    if backtrace.status() == std::backtrace::BacktraceStatus::Captured {
        text.push_str(&format!("{backtrace}\n"));
    }
    scrub(&text, secrets)
}

/// The progress line, shared with the log writer so log lines print above it.
#[derive(Clone, Default)]
pub struct SharedBar(Arc<Mutex<Option<StatusLine>>>);

impl SharedBar {
    fn with<R>(&self, f: impl FnOnce(Option<&mut StatusLine>) -> R) -> R {
        match self.0.lock() {
            Ok(mut g) => f(g.as_mut()),
            Err(_) => f(None),
        }
    }

    /// Takes the line off the terminal for good (the summary comes next).
    pub fn finish(&self) {
        if let Ok(mut g) = self.0.lock() {
            if let Some(mut line) = g.take() {
                line.clear();
            }
        }
    }
}

/// One line at the bottom of a terminal, redrawn in place. Drawn by hand rather
/// than with indicatif: indicatif remembers how many rows its last frame took at the
/// width it was drawn, so after the terminal narrows (and re-wraps that frame over
/// more rows) it clears too few and a stale piece stays. Here the rows are counted
/// at the width of the moment of clearing.
#[derive(Default)]
pub struct StatusLine {
    /// What is on the terminal now ("" = nothing).
    shown: String,
}

impl StatusLine {
    /// Removes the line: back up over every row it takes at today's width.
    fn clear(&mut self) {
        if self.shown.is_empty() {
            return;
        }
        let rows = rows_taken(self.shown.chars().count(), stderr_width());
        let mut err = std::io::stderr().lock();
        if rows > 1 {
            let _ = write!(err, "\x1b[{}A", rows - 1);
        }
        let _ = write!(err, "\r\x1b[J");
        let _ = err.flush();
        self.shown.clear();
    }

    fn draw(&mut self, line: &str) {
        if line == self.shown {
            return;
        }
        self.clear();
        let mut err = std::io::stderr().lock();
        let _ = write!(err, "{line}");
        let _ = err.flush();
        self.shown = line.to_string();
    }

    /// Runs `print` (which writes whole lines) with the line out of the way, then
    /// puts it back below what was printed.
    fn suspend(&mut self, print: impl FnOnce()) {
        let line = self.shown.clone();
        self.clear();
        print();
        self.draw(&line);
    }
}

/// Rows a line of `chars` columns takes on a terminal `width` wide (terminals that
/// re-wrap on a resize: tmux, VTE, kitty, iTerm2, Windows Terminal).
fn rows_taken(chars: usize, width: usize) -> usize {
    chars.div_ceil(width.max(1)).max(1)
}

/// A tracing writer: scrubs secrets, and prints above the bar when there is one.
#[derive(Clone)]
pub struct LogWriter {
    secrets: Arc<Vec<String>>,
    bar: SharedBar,
}

impl LogWriter {
    pub fn new(secrets: Vec<String>, bar: SharedBar) -> Self {
        // JSON logs escape quotes, backslashes and newlines (a PEM key has them): scrub
        // the escaped spelling as well.
        let mut all = secrets.clone();
        for s in &secrets {
            if let Ok(quoted) = serde_json::to_string(s) {
                let escaped = &quoted[1..quoted.len() - 1];
                if escaped != s {
                    all.push(escaped.to_string());
                }
            }
        }
        LogWriter {
            secrets: Arc::new(all),
            bar,
        }
    }

    /// A log record with every secret, in either spelling, replaced.
    pub fn clean(&self, text: &str) -> String {
        scrub(text, &self.secrets)
    }
}

pub struct LineWriter {
    inner: LogWriter,
    buf: Vec<u8>,
}

impl Write for LineWriter {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        self.buf.extend_from_slice(data);
        Ok(data.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Drop for LineWriter {
    fn drop(&mut self) {
        if self.buf.is_empty() {
            return;
        }
        let text = self.inner.clean(&String::from_utf8_lossy(&self.buf));
        self.inner.bar.with(|bar| match bar {
            Some(b) => b.suspend(|| {
                let _ = std::io::stderr().write_all(text.as_bytes());
            }),
            None => {
                let _ = std::io::stderr().write_all(text.as_bytes());
            }
        });
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for LogWriter {
    type Writer = LineWriter;
    fn make_writer(&'a self) -> Self::Writer {
        LineWriter {
            inner: self.clone(),
            buf: Vec::new(),
        }
    }
}

/// The `ProgressSink` of `run` and `demo`.
pub struct Display {
    bar: SharedBar,
    quiet: bool,
    last_line: Mutex<Option<Instant>>,
    every: Duration,
}

impl Display {
    /// A bar when stderr is a terminal (and not `quiet`), else plain lines every
    /// `every`.
    pub fn new(bar: SharedBar, quiet: bool, every: Duration) -> Display {
        if !quiet && std::io::stderr().is_terminal() {
            // Made for the terminal's width at every update (see `fit`), so it
            // never wraps, after a resize either.
            if let Ok(mut g) = bar.0.lock() {
                *g = Some(StatusLine::default());
            }
            let _ = ACTIVE_BAR.set(bar.clone());
        }
        Display {
            bar,
            quiet,
            last_line: Mutex::new(None),
            every,
        }
    }
}

/// "done 10 · polling 3 · queued 40 · 2.5/s · ETA 16 s · topaz: rate window 3s"
pub fn describe(p: &Progress) -> String {
    let mut parts: Vec<String> = Vec::new();
    for state in JobState::ALL {
        if let Some(n) = p.counts.get(&state).filter(|n| **n > 0) {
            parts.push(format!("{} {n}", state.name()));
        }
    }
    if p.rate_per_sec > 0.0 {
        parts.push(rate_text(p.rate_per_sec));
    }
    let finished: u64 = p
        .counts
        .iter()
        .filter(|(s, _)| s.is_terminal())
        .map(|(_, n)| n)
        .sum();
    match p.eta_secs {
        Some(eta) => parts.push(format!("ETA {}", human_secs(eta))),
        // Until every provider with work left has finished a job.
        None if finished < p.total => parts.push("ETA unknown yet".to_string()),
        None => {}
    }
    parts.extend(wait_parts(p));
    parts.join(" · ")
}

/// "2.5/s", or per minute below one a second ("12/min").
fn rate_text(per_sec: f64) -> String {
    if per_sec >= 1.0 {
        format!("{per_sec:.1}/s")
    } else {
        format!("{:.0}/min", per_sec * 60.0)
    }
}

/// "topaz: rate window 3s" for every provider that waits.
fn wait_parts(p: &Progress) -> Vec<String> {
    let now = crate::model::now_ms();
    p.providers
        .iter()
        .filter_map(|l| {
            l.wait
                .as_ref()
                .map(|w| format!("{}: {}", l.provider.name(), w.short(now)))
        })
        .collect()
}

/// Separates the parts of the progress line (two spaces, as cargo and nextest: a
/// dot costs columns a 50-column terminal does not have).
const SEP: &str = "  ";

/// The progress line's parts, in the order shown, each with how much it matters
/// (higher stays longer when the terminal is narrow): the count finished and the
/// elapsed time first, then the ETA, why providers wait, failures, the rate, the
/// states of the jobs under way, and a bar when there is room.
pub fn line_parts(p: &Progress) -> Vec<(u8, String)> {
    let finished: u64 = p
        .counts
        .iter()
        .filter(|(s, _)| s.is_terminal())
        .map(|(_, n)| n)
        .sum();
    let mut parts = vec![(9, crate::wait::compact_secs(p.elapsed_secs))];
    if p.total > 0 {
        const BAR: usize = 20;
        let filled = (finished as usize * BAR / p.total as usize).min(BAR);
        parts.push((
            0,
            format!("[{}{}]", "=".repeat(filled), " ".repeat(BAR - filled)),
        ));
    }
    parts.push((10, format!("{finished}/{}", p.total)));
    let unfinished = finished < p.total;
    if p.rate_per_sec > 0.0 {
        parts.push((5, rate_text(p.rate_per_sec)));
    }
    match p.eta_secs {
        Some(eta) if unfinished => {
            parts.push((8, format!("ETA {}", crate::wait::compact_secs(eta))))
        }
        None if unfinished => parts.push((8, "ETA ?".to_string())),
        _ => {}
    }
    if let Some(n) = p.counts.get(&JobState::Failed).filter(|n| **n > 0) {
        parts.push((6, format!("failed {n}")));
    }
    for w in wait_parts(p) {
        parts.push((7, w));
    }
    for state in JobState::ALL {
        if state.is_terminal() {
            continue;
        }
        if let Some(n) = p.counts.get(&state).filter(|n| **n > 0) {
            parts.push((3, format!("{} {n}", state.name())));
        }
    }
    parts
}

/// Joins `parts` into at most `width` columns: the parts that matter least go first
/// (the later of equals first), and a single part still too long is cut.
pub fn fit(parts: &[(u8, String)], width: usize) -> String {
    let mut keep: Vec<bool> = vec![true; parts.len()];
    let cols = |keep: &[bool]| -> usize {
        let shown: Vec<&(u8, String)> = parts
            .iter()
            .zip(keep)
            .filter(|(_, k)| **k)
            .map(|(p, _)| p)
            .collect();
        shown.iter().map(|(_, t)| t.chars().count()).sum::<usize>()
            + SEP.chars().count() * shown.len().saturating_sub(1)
    };
    while cols(&keep) > width && keep.iter().filter(|k| **k).count() > 1 {
        let drop = parts
            .iter()
            .enumerate()
            .filter(|(i, _)| keep[*i])
            .min_by_key(|(i, (prio, _))| (*prio, std::cmp::Reverse(*i)))
            .map(|(i, _)| i);
        match drop {
            Some(i) => keep[i] = false,
            None => break,
        }
    }
    let line = parts
        .iter()
        .zip(&keep)
        .filter(|(_, k)| **k)
        .map(|(p, _)| p.1.as_str())
        .collect::<Vec<_>>()
        .join(SEP);
    if line.chars().count() <= width {
        return line;
    }
    let mut cut: String = line.chars().take(width.saturating_sub(1)).collect();
    if width > 0 {
        cut.push('…');
    }
    cut
}

/// Columns of the terminal on stderr (80 when it does not say).
fn stderr_width() -> usize {
    // SAFETY: TIOCGWINSZ fills the `winsize` it is given, or fails (stderr is not a
    // terminal) and leaves it zeroed; nothing else is touched.
    let mut ws: libc::winsize = unsafe { std::mem::zeroed() };
    let rc = unsafe { libc::ioctl(2, libc::TIOCGWINSZ, &mut ws) };
    if rc == 0 && ws.ws_col > 0 {
        ws.ws_col as usize
    } else {
        80
    }
}

impl ProgressSink for Display {
    fn update(&self, p: &Progress) {
        let finished: u64 = p
            .counts
            .iter()
            .filter(|(s, _)| s.is_terminal())
            .map(|(_, n)| n)
            .sum();
        let has_bar = self.bar.with(|b| {
            if let Some(b) = b {
                // One column spare: a line that fills the last column leaves the
                // cursor waiting to wrap, and the next clear would miss a row.
                b.draw(&fit(&line_parts(p), stderr_width().saturating_sub(1)));
                true
            } else {
                false
            }
        });
        if has_bar || self.quiet {
            return;
        }
        let Ok(mut last) = self.last_line.lock() else {
            return;
        };
        let due = last.is_none_or(|t| t.elapsed() >= self.every);
        if due {
            *last = Some(Instant::now());
            if JSON_LINES.load(Ordering::Relaxed) {
                tracing::info!(
                    target: "pixbatch::progress",
                    finished,
                    total = p.total,
                    rate_per_sec = p.rate_per_sec,
                    eta_secs = p.eta_secs,
                    "{}",
                    describe(p)
                );
                return;
            }
            eprintln!(
                "pixbatch: {finished}/{} finished · {} elapsed · {}",
                p.total,
                crate::wait::compact_secs(p.elapsed_secs),
                describe(p)
            );
        }
    }
}

/// Log records at the default level, in the one format of every other stderr line:
/// `pixbatch: warning: topaz: <message> key=value`, no timestamp or target (cargo's
/// style). `-v` keeps tracing's own format, timestamps and all, for debugging.
pub struct PlainFormat;

/// The fields of one record: the message, the provider, and the rest.
#[derive(Default)]
struct Fields {
    message: String,
    provider: Option<String>,
    rest: Vec<(String, String)>,
}

impl tracing::field::Visit for Fields {
    fn record_str(&mut self, field: &tracing::field::Field, value: &str) {
        self.put(field.name(), value.to_string());
    }

    fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn std::fmt::Debug) {
        self.put(field.name(), format!("{value:?}"));
    }
}

impl Fields {
    fn put(&mut self, name: &str, value: String) {
        match name {
            "message" => self.message = value,
            "provider" => self.provider = Some(value),
            _ => self.rest.push((name.to_string(), value)),
        }
    }
}

impl<S, N> tracing_subscriber::fmt::FormatEvent<S, N> for PlainFormat
where
    S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
    N: for<'a> tracing_subscriber::fmt::FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        _ctx: &tracing_subscriber::fmt::FmtContext<'_, S, N>,
        mut writer: tracing_subscriber::fmt::format::Writer<'_>,
        event: &tracing::Event<'_>,
    ) -> std::fmt::Result {
        let mut f = Fields::default();
        event.record(&mut f);
        writeln!(writer, "{}", plain_line(*event.metadata().level(), f))
    }
}

fn plain_line(level: tracing::Level, f: Fields) -> String {
    let mut line = String::from("pixbatch: ");
    match level {
        tracing::Level::ERROR => line.push_str("error: "),
        tracing::Level::WARN => line.push_str("warning: "),
        _ => {}
    }
    if let Some(p) = f.provider {
        // Messages that already name their provider do not name it twice.
        if !f.message.starts_with(&format!("{p}:")) {
            line.push_str(&p);
            line.push_str(": ");
        }
    }
    line.push_str(&f.message);
    for (k, v) in f.rest {
        line.push_str(&format!(" {k}={v}"));
    }
    line
}

#[cfg(test)]
mod tests {
    use super::*;

    fn busy_progress() -> Progress {
        use crate::model::ProviderKind;
        use crate::wait::{ProviderLive, WaitReason};
        let now = crate::model::now_ms();
        let mut counts = std::collections::BTreeMap::new();
        for (s, n) in [
            (JobState::Done, 412),
            (JobState::Failed, 2),
            (JobState::Queued, 500),
            (JobState::Submitted, 40),
            (JobState::Polling, 30),
            (JobState::RetryWait, 16),
        ] {
            counts.insert(s, n);
        }
        let waiting = |provider, wait| ProviderLive {
            wait: Some(wait),
            ..ProviderLive::new(provider)
        };
        Progress {
            total: counts.values().sum(),
            counts,
            rate_per_sec: 6.25,
            eta_secs: Some(9_400),
            elapsed_secs: 6_600,
            providers: vec![
                waiting(
                    ProviderKind::Topaz,
                    WaitReason::RateWindow {
                        until_ms: now + 3_000,
                    },
                ),
                waiting(
                    ProviderKind::Perfect,
                    WaitReason::RetryAfter {
                        until_ms: now + 40_000,
                    },
                ),
            ],
        }
    }

    #[test]
    fn the_line_fits_120_and_50_columns_keeping_what_matters() {
        let p = busy_progress();
        let parts = line_parts(&p);
        let full = fit(&parts, usize::MAX);
        assert!(
            full.chars().count() > 120,
            "the test needs a long line: {full}"
        );
        for width in [120, 80, 50, 30] {
            let line = fit(&parts, width);
            assert!(line.chars().count() <= width, "{width}: {line:?}");
            assert!(!line.contains('\n'), "{line:?}");
            // The count and the elapsed time survive any width that holds them.
            assert!(line.contains("414/1000"), "{width}: {line}");
            assert!(line.contains("1h50m"), "{width}: {line}");
        }
        let wide = fit(&parts, 120);
        assert!(wide.contains("ETA 2h36m"), "{wide}");
        assert!(wide.contains("topaz: rate limit 3s"), "{wide}");
        assert!(wide.contains("perfect: Retry-After"), "{wide}");
        let narrow = fit(&parts, 50);
        assert!(narrow.contains("ETA 2h36m"), "{narrow}");
        assert!(narrow.contains("topaz: rate limit 3s"), "{narrow}");
        // The states of the jobs under way go before the reasons for waiting.
        assert!(!narrow.contains("queued"), "{narrow}");
        // Too narrow for even one part: cut, never longer.
        let tiny = fit(&parts, 5);
        assert_eq!(tiny.chars().count(), 5, "{tiny}");
        assert!(tiny.ends_with('…'), "{tiny}");
    }

    #[test]
    fn an_idle_start_says_the_eta_is_unknown() {
        let mut p = busy_progress();
        p.eta_secs = None;
        p.rate_per_sec = 0.3;
        let line = fit(&line_parts(&p), 120);
        assert!(line.contains("ETA ?") && line.contains("18/min"), "{line}");
        assert!(describe(&p).contains("topaz: rate limit"));
    }

    #[test]
    fn log_records_read_like_the_other_lines() {
        let fields = |message: &str, provider: Option<&str>| Fields {
            message: message.into(),
            provider: provider.map(str::to_string),
            rest: vec![("job".into(), "t1".into())],
        };
        assert_eq!(
            plain_line(tracing::Level::WARN, fields("slow answer", Some("topaz"))),
            "pixbatch: warning: topaz: slow answer job=t1"
        );
        assert_eq!(
            plain_line(tracing::Level::INFO, fields("topaz: ready", Some("topaz"))),
            "pixbatch: topaz: ready job=t1"
        );
        assert_eq!(
            plain_line(tracing::Level::ERROR, fields("disk full", None)),
            "pixbatch: error: disk full job=t1"
        );
    }

    #[test]
    fn a_narrowed_terminal_rewraps_the_old_line_over_more_rows() {
        assert_eq!(rows_taken(102, 120), 1);
        assert_eq!(rows_taken(102, 40), 3);
        assert_eq!(rows_taken(40, 40), 1);
        assert_eq!(rows_taken(0, 0), 1);
    }

    #[test]
    fn scrub_removes_every_secret() {
        let s = scrub(
            "key=abcd1234 and abcd1234 again, xyz",
            &["abcd1234".into(), "".into()],
        );
        assert_eq!(s, "key=<redacted> and <redacted> again, xyz");
    }

    #[test]
    fn json_escaped_secrets_are_scrubbed_too() {
        let secret = "line1\nq\"uote\\".to_string();
        let w = LogWriter::new(vec![secret.clone()], SharedBar::default());
        let record = serde_json::json!({ "message": format!("key is {secret}!") }).to_string();
        assert!(
            !record.contains(&secret),
            "the test needs an escaped spelling"
        );
        let cleaned = w.clean(&record);
        let parsed: serde_json::Value = serde_json::from_str(&cleaned).unwrap();
        assert_eq!(parsed["message"], "key is <redacted>!");
        assert_eq!(w.clean(&format!("plain {secret}")), "plain <redacted>");
    }

    #[test]
    fn panic_reports_are_scrubbed() {
        let secrets = vec!["sk-live-123456".to_string()];
        let owned: Box<dyn std::any::Any + Send> =
            Box::new("bad header Bearer sk-live-123456 in request".to_string());
        let text = panic_report(owned.as_ref(), None, &secrets);
        assert!(!text.contains("sk-live-123456"), "{text}");
        assert!(
            text.contains("bad header Bearer <redacted> in request"),
            "{text}"
        );
        let fixed: Box<dyn std::any::Any + Send> = Box::new("key sk-live-123456");
        let text = panic_report(
            fixed.as_ref(),
            Some(std::panic::Location::caller()),
            &secrets,
        );
        assert!(
            text.contains("key <redacted>") && text.contains("progress.rs"),
            "{text}"
        );
        // A real panic, caught, goes through the same function.
        let caught = std::panic::catch_unwind(|| panic!("token sk-live-123456 leaked"))
            .expect_err("it panicked");
        let text = panic_report(caught.as_ref(), None, &secrets);
        assert!(text.contains("token <redacted> leaked"), "{text}");
    }
}
