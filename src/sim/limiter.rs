//! Sliding-window rate limits, the way a strict server counts them.
//!
//! For every provider the simulator keeps the arrival times of the metered requests it
//! let through. A new request is refused when, for any of the provider's [`RateSpec`]s,
//! `count` accepted requests already arrived less than `window` ago. A refused request is
//! not logged, so it does not make later ones wait longer. A request arriving exactly
//! `window` after the oldest one in the window is let through.

use std::collections::{BTreeMap, VecDeque};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::rate::RateSpec;

use super::lock;

#[derive(Debug)]
struct Window {
    specs: Vec<RateSpec>,
    longest: Duration,
    /// Arrival times of accepted requests, oldest first, none older than `longest`.
    log: VecDeque<Instant>,
}

impl Window {
    fn new(specs: Vec<RateSpec>) -> Self {
        let longest = specs.iter().map(|s| s.window).max().unwrap_or_default();
        Window {
            specs,
            longest,
            log: VecDeque::new(),
        }
    }

    fn try_acquire(&mut self, now: Instant) -> Result<(), Duration> {
        // Keep the log sorted even if callers race on `now`.
        let now = match self.log.back() {
            Some(&last) if last > now => last,
            _ => now,
        };
        while let Some(&front) = self.log.front() {
            if now.duration_since(front) >= self.longest {
                self.log.pop_front();
            } else {
                break;
            }
        }
        let mut wait = Duration::ZERO;
        for spec in &self.specs {
            let count = spec.count as usize;
            let in_window = self
                .log
                .iter()
                .rev()
                .take_while(|&&t| now.duration_since(t) < spec.window)
                .count();
            if in_window >= count {
                // The request that must leave the window before another fits.
                let idx = self.log.len() - count;
                let oldest = self.log[idx];
                let free_at = spec.window.saturating_sub(now.duration_since(oldest));
                wait = wait.max(free_at);
            }
        }
        if wait > Duration::ZERO {
            return Err(wait);
        }
        self.log.push_back(now);
        Ok(())
    }
}

/// All providers' windows. Providers without limits are not in the map.
#[derive(Debug)]
pub(crate) struct Limiters {
    windows: BTreeMap<String, Mutex<Window>>,
}

impl Limiters {
    pub(crate) fn new(limits: &BTreeMap<String, Vec<RateSpec>>) -> Self {
        let windows = limits
            .iter()
            .filter(|(_, specs)| !specs.is_empty())
            .map(|(p, specs)| (p.clone(), Mutex::new(Window::new(specs.clone()))))
            .collect();
        Limiters { windows }
    }

    /// Count a request that arrived at `now`, or say how long until one would fit.
    pub(crate) fn try_acquire(&self, provider: &str, now: Instant) -> Result<(), Duration> {
        match self.windows.get(provider) {
            Some(w) => lock(w).try_acquire(now),
            None => Ok(()),
        }
    }
}

/// `Retry-After` in whole seconds for a wait: rounded up, at least 1.
pub(crate) fn retry_after_secs(wait: Duration) -> u64 {
    let secs = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
    secs.max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn sliding_window_counts_every_spec() {
        let mut w = Window::new(vec!["2/1s".parse().unwrap(), "3/10s".parse().unwrap()]);
        let t0 = Instant::now();
        assert!(w.try_acquire(t0).is_ok());
        assert!(w.try_acquire(t0 + ms(100)).is_ok());
        // Third within the second: refused until t0 + 1s.
        assert_eq!(w.try_acquire(t0 + ms(400)), Err(ms(600)));
        // Exactly one window after the first: allowed.
        assert!(w.try_acquire(t0 + ms(1000)).is_ok());
        // Fourth within 10 s: refused by the long window until t0 + 10 s.
        assert_eq!(w.try_acquire(t0 + ms(2500)), Err(ms(7500)));
        assert!(w.try_acquire(t0 + ms(10_000)).is_ok());
    }

    #[test]
    fn refused_requests_are_not_counted() {
        let mut w = Window::new(vec!["1/1s".parse().unwrap()]);
        let t0 = Instant::now();
        assert!(w.try_acquire(t0).is_ok());
        for i in 1..10 {
            assert!(w.try_acquire(t0 + ms(i * 50)).is_err());
        }
        assert!(w.try_acquire(t0 + ms(1000)).is_ok());
    }

    #[test]
    fn retry_after_rounds_up() {
        assert_eq!(retry_after_secs(ms(1)), 1);
        assert_eq!(retry_after_secs(ms(1000)), 1);
        assert_eq!(retry_after_secs(ms(1001)), 2);
        assert_eq!(retry_after_secs(Duration::ZERO), 1);
    }

    #[test]
    fn unlimited_providers_pass() {
        let l = Limiters::new(&BTreeMap::from([("topaz".to_string(), vec![])]));
        for _ in 0..1000 {
            assert!(l.try_acquire("topaz", Instant::now()).is_ok());
            assert!(l.try_acquire("photio", Instant::now()).is_ok());
        }
    }
}
