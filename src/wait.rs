//! Why a provider is waiting, and what it does per minute: what the progress line
//! and `status` show per provider (issue 12, "waiting is explained").
//!
//! The engine's parts that make a provider wait each set one [`WaitReason`]: the
//! rate-limit gate (window full, a 429's Retry-After, an outage pause, the
//! keep-alive reserve), the spend gate (`--max-credits`) and whatever halts a
//! provider (a refused credential). [`ProviderLive`] carries it, with the rate and
//! the remaining work, over the control socket to `status`.

use serde::{Deserialize, Serialize};

use crate::model::{now_ms, ProviderKind};

/// Why a provider sends nothing now. Times are milliseconds since the epoch.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(tag = "reason", rename_all = "snake_case")]
pub enum WaitReason {
    /// Every request the configured `rate_limits` allow in a window has gone; the
    /// next may go at `until_ms`.
    RateWindow { until_ms: u64 },
    /// The provider answered 429 with a Retry-After (or a 429 without one: 1 s).
    RetryAfter { until_ms: u64 },
    /// Requests in a row failed (5xx, no answer): the provider looks down.
    Outage { until_ms: u64 },
    /// New work holds back so the rate budget covers the polls of `live_tasks`
    /// tasks (accepted, or being submitted) that the provider drops when not polled
    /// in time.
    KeepAliveReserve { live_tasks: usize },
    /// `--max-credits` stopped new work for this provider.
    SpendCap { detail: String },
    /// The provider is halted for this run (a refused credential, a host that stays
    /// unreachable): its jobs stay queued.
    Halted { detail: String },
    /// Nothing is under way: `jobs` jobs wait to be tried again after errors, the
    /// first at `until_ms` (each job's own backoff).
    Backoff { until_ms: u64, jobs: u64 },
}

impl WaitReason {
    /// The machine name, as in `status --json`'s `reason` field.
    pub fn name(&self) -> &'static str {
        match self {
            WaitReason::RateWindow { .. } => "rate_window",
            WaitReason::RetryAfter { .. } => "retry_after",
            WaitReason::Outage { .. } => "outage",
            WaitReason::KeepAliveReserve { .. } => "keep_alive_reserve",
            WaitReason::SpendCap { .. } => "spend_cap",
            WaitReason::Halted { .. } => "halted",
            WaitReason::Backoff { .. } => "backoff",
        }
    }

    pub fn until_ms(&self) -> Option<u64> {
        match self {
            WaitReason::RateWindow { until_ms }
            | WaitReason::RetryAfter { until_ms }
            | WaitReason::Outage { until_ms }
            | WaitReason::Backoff { until_ms, .. } => Some(*until_ms),
            _ => None,
        }
    }

    /// For the progress line: a few words ("rate limit 3s").
    pub fn short(&self, now: u64) -> String {
        let left = |until: u64| compact_secs(until.saturating_sub(now).div_ceil(1000));
        match self {
            WaitReason::RateWindow { until_ms } => format!("rate limit {}", left(*until_ms)),
            WaitReason::RetryAfter { until_ms } => format!("Retry-After {}", left(*until_ms)),
            WaitReason::Outage { until_ms } => format!("down {}", left(*until_ms)),
            WaitReason::KeepAliveReserve { .. } => "keep-alive reserve".to_string(),
            WaitReason::SpendCap { .. } => "spend cap".to_string(),
            WaitReason::Halted { .. } => "halted".to_string(),
            WaitReason::Backoff { until_ms, .. } => format!("retry {}", left(*until_ms)),
        }
    }

    /// For `status`: what, and until when.
    pub fn describe(&self, now: u64) -> String {
        let until = |t: u64| {
            format!(
                "until {} (in {})",
                clock_utc(t),
                crate::query::human_secs(t.saturating_sub(now).div_ceil(1000))
            )
        };
        match self {
            WaitReason::RateWindow { until_ms } => {
                format!("rate window full {}", until(*until_ms))
            }
            WaitReason::RetryAfter { until_ms } => {
                format!("asked to wait (Retry-After) {}", until(*until_ms))
            }
            WaitReason::Outage { until_ms } => {
                format!("provider looks down: paused {}", until(*until_ms))
            }
            WaitReason::KeepAliveReserve { live_tasks } => format!(
                "new work held back: the rate budget is kept for the polls of {live_tasks} tasks under way"
            ),
            WaitReason::SpendCap { detail } => format!("spend cap reached: {detail}"),
            WaitReason::Halted { detail } => format!("halted: {detail}"),
            WaitReason::Backoff { until_ms, jobs } => format!(
                "{jobs} jobs wait to retry after errors, the first {}",
                until(*until_ms)
            ),
        }
    }
}

/// One provider of a running engine, as `status` and the progress line show it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ProviderLive {
    pub provider: ProviderKind,
    /// Jobs of this provider finished (done or failed) per minute, over the last
    /// minute of the run (or since its start).
    pub jobs_per_min: f64,
    /// Requests admitted per second over the same span.
    #[serde(default)]
    pub requests_per_sec: f64,
    /// Jobs of this provider not yet done, failed or cancelled.
    #[serde(default)]
    pub remaining: u64,
    /// `remaining` at `jobs_per_min`; none before the first job finishes.
    #[serde(default)]
    pub eta_secs: Option<u64>,
    /// Why it sends nothing now; none while it works.
    #[serde(default)]
    pub wait: Option<WaitReason>,
    /// `wait`, said for people (`status --json` readers need not rebuild it).
    #[serde(default)]
    pub wait_text: Option<String>,
}

impl ProviderLive {
    pub fn new(provider: ProviderKind) -> ProviderLive {
        ProviderLive {
            provider,
            jobs_per_min: 0.0,
            requests_per_sec: 0.0,
            remaining: 0,
            eta_secs: None,
            wait: None,
            wait_text: None,
        }
    }

    /// Fills the figures that need the queue: what is left and when it will be done.
    pub fn with_remaining(mut self, remaining: u64) -> ProviderLive {
        self.remaining = remaining;
        self.eta_secs = eta(remaining, self.jobs_per_min / 60.0);
        self.wait_text = self.wait.as_ref().map(|w| w.describe(now_ms()));
        self
    }
}

/// The reason of a provider that has nothing under way but jobs waiting out their
/// retry backoff (errors that did not pause the provider as a whole): without it a
/// person sees only "retry-wait 3".
pub fn idle_backoff(
    store: &crate::store::Store,
    kind: ProviderKind,
    now: u64,
) -> Option<WaitReason> {
    use crate::model::JobState;
    let under_way = [
        JobState::Preparing,
        JobState::Submitting,
        JobState::Submitted,
        JobState::Polling,
        JobState::Downloading,
    ];
    if under_way
        .iter()
        .any(|s| store.count(*s, kind).unwrap_or(0) > 0)
    {
        return None;
    }
    let jobs = store.count(JobState::RetryWait, kind).ok()?;
    let due = store.next_due(JobState::RetryWait, kind).ok()??;
    (jobs > 0 && due > now).then_some(WaitReason::Backoff {
        until_ms: due,
        jobs,
    })
}

/// `remaining` jobs at `per_sec`: none while nothing has finished yet.
pub fn eta(remaining: u64, per_sec: f64) -> Option<u64> {
    if remaining == 0 {
        return Some(0);
    }
    (per_sec > 0.0).then(|| (remaining as f64 / per_sec).ceil() as u64)
}

/// The run's ETA: the slowest provider sets it (they work side by side).
pub fn total_eta(providers: &[ProviderLive]) -> Option<u64> {
    let mut worst = Some(0);
    // A provider stopped for the run (halted, capped) is not waited for.
    let waited_for = |p: &&ProviderLive| {
        p.remaining > 0
            && !matches!(
                p.wait,
                Some(WaitReason::Halted { .. } | WaitReason::SpendCap { .. })
            )
    };
    for p in providers.iter().filter(waited_for) {
        worst = match (worst, p.eta_secs) {
            (Some(a), Some(b)) => Some(a.max(b)),
            _ => None,
        };
    }
    worst
}

/// "12s", "3m05s", "2h07m": short, for the progress line.
pub fn compact_secs(secs: u64) -> String {
    match secs {
        s if s < 60 => format!("{s}s"),
        s if s < 3600 => format!("{}m{:02}s", s / 60, s % 60),
        s => format!("{}h{:02}m", s / 3600, (s % 3600) / 60),
    }
}

/// "18:20:05 UTC" (with the date when not today).
pub fn clock_utc(ms: u64) -> String {
    let stamp = crate::query::rfc3339(ms);
    let today = crate::query::rfc3339(now_ms());
    let time = stamp.get(11..19).unwrap_or(&stamp);
    if stamp.get(..10) == today.get(..10) {
        format!("{time} UTC")
    } else {
        format!("{} {time} UTC", stamp.get(..10).unwrap_or(""))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reasons_serialize_with_their_name_and_until() {
        let w = WaitReason::RateWindow { until_ms: 5_000 };
        let v = serde_json::to_value(&w).unwrap();
        assert_eq!(v["reason"], "rate_window");
        assert_eq!(v["until_ms"], 5_000);
        assert_eq!(w.name(), "rate_window");
        let back: WaitReason = serde_json::from_value(v).unwrap();
        assert_eq!(back, w);
        assert_eq!(w.short(2_100), "rate limit 3s");
        let h = WaitReason::Halted {
            detail: "TOPAZ_API_KEY refused".into(),
        };
        assert_eq!(serde_json::to_value(&h).unwrap()["reason"], "halted");
        assert!(h.describe(0).contains("TOPAZ_API_KEY refused"));
        let b = WaitReason::Backoff {
            until_ms: 10_000,
            jobs: 3,
        };
        assert_eq!(serde_json::to_value(&b).unwrap()["reason"], "backoff");
        assert_eq!(b.short(4_000), "retry 6s");
        assert!(b
            .describe(4_000)
            .starts_with("3 jobs wait to retry after errors"));
    }

    #[test]
    fn the_slowest_provider_sets_the_eta() {
        let p = |remaining, jobs_per_min| {
            ProviderLive {
                jobs_per_min,
                ..ProviderLive::new(ProviderKind::Topaz)
            }
            .with_remaining(remaining)
        };
        // 60 left at 60/min = 60 s; 10 left at 2/min = 300 s.
        let all = [p(60, 60.0), p(10, 2.0), p(0, 0.0)];
        assert_eq!(all[0].eta_secs, Some(60));
        assert_eq!(all[1].eta_secs, Some(300));
        assert_eq!(total_eta(&all), Some(300));
        // A provider with work left and nothing finished yet: unknown.
        assert_eq!(total_eta(&[p(60, 60.0), p(5, 0.0)]), None);
        assert_eq!(total_eta(&[]), Some(0));
    }

    #[test]
    fn compact_times() {
        assert_eq!(compact_secs(7), "7s");
        assert_eq!(compact_secs(185), "3m05s");
        assert_eq!(compact_secs(7_620), "2h07m");
    }
}
