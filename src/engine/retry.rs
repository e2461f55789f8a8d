//! How long a job waits before its next try.

use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBuilder};

/// The shortest and longest pause between tries of one job.
pub const MIN_DELAY: Duration = Duration::from_millis(500);
pub const MAX_DELAY: Duration = Duration::from_secs(300);

/// Exponential backoff with jitter for the `attempt`-th failure (1-based), never
/// shorter than the provider's `Retry-After`.
///
/// The queue is durable, so the delay is computed from the attempt count kept in
/// the job record rather than by a retry loop in memory: backon supplies the
/// sequence (with jitter switched on; it is off by default).
pub fn backoff_delay(attempt: u32, retry_after: Option<Duration>) -> Duration {
    let nth = attempt.saturating_sub(1).min(30) as usize;
    let base = ExponentialBuilder::default()
        .with_min_delay(MIN_DELAY)
        .with_max_delay(MAX_DELAY)
        .with_factor(2.0)
        .with_jitter()
        .without_max_times()
        .build()
        .nth(nth)
        .unwrap_or(MAX_DELAY);
    match retry_after {
        Some(ra) => base.max(ra),
        None => base,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grows_with_jitter_and_honours_retry_after() {
        let first = backoff_delay(1, None);
        assert!(first >= MIN_DELAY && first <= 2 * MIN_DELAY, "{first:?}");
        let fifth = backoff_delay(5, None);
        assert!(
            fifth >= MIN_DELAY * 16 && fifth <= MIN_DELAY * 32,
            "{fifth:?}"
        );
        assert!(backoff_delay(100, None) <= 2 * MAX_DELAY);
        assert_eq!(
            backoff_delay(1, Some(Duration::from_secs(30))),
            Duration::from_secs(30)
        );
        // Jitter: not every delay the same.
        let samples: std::collections::BTreeSet<_> =
            (0..20).map(|_| backoff_delay(3, None)).collect();
        assert!(samples.len() > 1);
    }
}
