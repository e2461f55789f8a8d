//! What a person sees on stderr: a progress bar on a terminal, periodic plain lines
//! otherwise (cron mails, CI logs), and log lines with every known secret scrubbed.

use std::io::{IsTerminal, Write};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

use crate::engine::{Progress, ProgressSink};
use crate::model::JobState;
use crate::query::human_secs;

/// Set by `--log-format json`: every stderr line is then a JSON log record.
static JSON_LINES: AtomicBool = AtomicBool::new(false);

pub fn set_json_lines(on: bool) {
    JSON_LINES.store(on, Ordering::Relaxed);
}

/// A message for the person at the terminal: `pixbatch: <message>` on stderr, or a
/// log record when logs are JSON (so a log shipper reads nothing but JSON).
pub fn notice(message: &str) {
    if JSON_LINES.load(Ordering::Relaxed) {
        tracing::info!("{message}");
    } else {
        eprintln!("pixbatch: {message}");
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

/// The bar, shared with the log writer so log lines print above it.
#[derive(Clone, Default)]
pub struct SharedBar(Arc<Mutex<Option<ProgressBar>>>);

impl SharedBar {
    fn with<R>(&self, f: impl FnOnce(Option<&ProgressBar>) -> R) -> R {
        match self.0.lock() {
            Ok(g) => f(g.as_ref()),
            Err(_) => f(None),
        }
    }

    pub fn finish(&self) {
        self.with(|b| {
            if let Some(b) = b {
                b.finish_and_clear();
            }
        });
    }
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
            Some(b) if !b.is_hidden() => b.suspend(|| {
                let _ = std::io::stderr().write_all(text.as_bytes());
            }),
            _ => {
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
            let b = ProgressBar::with_draw_target(Some(0), ProgressDrawTarget::stderr());
            b.set_style(
                ProgressStyle::with_template("{bar:30.cyan/blue} {pos}/{len} {msg}")
                    .unwrap_or_else(|_| ProgressStyle::default_bar()),
            );
            if let Ok(mut g) = bar.0.lock() {
                *g = Some(b);
            }
        }
        Display {
            bar,
            quiet,
            last_line: Mutex::new(None),
            every,
        }
    }
}

/// "done 10 · polling 3 · queued 40 · 2.5/s · ETA 16 s"
pub fn describe(p: &Progress) -> String {
    let mut parts: Vec<String> = Vec::new();
    for state in JobState::ALL {
        if let Some(n) = p.counts.get(&state).filter(|n| **n > 0) {
            parts.push(format!("{} {n}", state.name()));
        }
    }
    if p.rate_per_sec > 0.0 {
        parts.push(format!("{:.1}/s", p.rate_per_sec));
    }
    if let Some(eta) = p.eta_secs {
        parts.push(format!("ETA {}", human_secs(eta)));
    }
    parts.join(" · ")
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
                b.set_length(p.total);
                b.set_position(finished);
                b.set_message(describe(p));
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
                "pixbatch: {finished}/{} finished · {}",
                p.total,
                describe(p)
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
