//! Rate-limit specifications: "at most COUNT requests in any window of DURATION".
//!
//! Shared by the client's limiter (`engine::limiter`) and the simulator, so both read
//! `"100/1m"` the same way.

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// At most `count` requests in any window of length `window`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct RateSpec {
    pub count: u32,
    pub window: Duration,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error(
    "invalid rate limit {input:?}: {reason} (expected COUNT/DURATION, e.g. 100/1m, 20/1s, 500/1h)"
)]
pub struct RateSpecError {
    input: String,
    reason: String,
}

impl RateSpec {
    pub fn new(count: u32, window: Duration) -> Self {
        RateSpec { count, window }
    }

    /// The average spacing of requests this limit allows in the long run.
    pub fn interval(&self) -> Duration {
        self.window / self.count.max(1)
    }
}

impl FromStr for RateSpec {
    type Err = RateSpecError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = |reason: &str| RateSpecError {
            input: s.to_string(),
            reason: reason.to_string(),
        };
        let (count, window) = s.trim().split_once('/').ok_or_else(|| err("no '/'"))?;
        let count: u32 = count
            .trim()
            .parse()
            .map_err(|_| err("COUNT is not a whole number"))?;
        if count == 0 {
            return Err(err("COUNT must be at least 1"));
        }
        let window = window.trim();
        // The number, then the unit: "1min" is an unknown unit, not a bad number.
        let digits = window.len()
            - window
                .trim_start_matches(|c: char| c.is_ascii_digit())
                .len();
        let (n, unit) = window.split_at(digits);
        if n.is_empty() {
            return Err(err("DURATION must be a number followed by s, m or h"));
        }
        if unit.is_empty() {
            return Err(err(&format!(
                "DURATION {n} has no unit (s, m or h, e.g. {n}s)"
            )));
        }
        let n: u64 = n.parse().map_err(|_| err("DURATION too long"))?;
        if n == 0 {
            return Err(err("DURATION must be positive"));
        }
        let secs = match unit {
            "s" => n,
            "m" => n.checked_mul(60).ok_or_else(|| err("DURATION too long"))?,
            "h" => n
                .checked_mul(3600)
                .ok_or_else(|| err("DURATION too long"))?,
            other => {
                return Err(err(&format!(
                    "unknown unit {other:?} in DURATION (the units are s, m and h)"
                )))
            }
        };
        Ok(RateSpec {
            count,
            window: Duration::from_secs(secs),
        })
    }
}

impl fmt::Display for RateSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let secs = self.window.as_secs();
        if secs % 3600 == 0 {
            write!(f, "{}/{}h", self.count, secs / 3600)
        } else if secs % 60 == 0 {
            write!(f, "{}/{}m", self.count, secs / 60)
        } else {
            write!(f, "{}/{}s", self.count, secs)
        }
    }
}

impl TryFrom<String> for RateSpec {
    type Error = RateSpecError;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        s.parse()
    }
}

impl From<RateSpec> for String {
    fn from(r: RateSpec) -> String {
        r.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_prints_the_documented_forms() {
        for (s, count, secs) in [
            ("100/1m", 100, 60),
            ("100/5m", 100, 300),
            ("20/1s", 20, 1),
            ("3/2h", 3, 7200),
        ] {
            let r: RateSpec = s.parse().unwrap();
            assert_eq!((r.count, r.window.as_secs()), (count, secs));
            assert_eq!(r.to_string(), s);
        }
    }

    #[test]
    fn an_unknown_unit_is_named_as_such() {
        for (spec, unit) in [("10/1min", "min"), ("10/1d", "d"), ("10/500ms", "ms")] {
            let e = spec.parse::<RateSpec>().unwrap_err().to_string();
            assert!(
                e.contains(&format!("unknown unit \"{unit}\"")),
                "{spec}: {e}"
            );
        }
        let e = "10/5".parse::<RateSpec>().unwrap_err().to_string();
        assert!(e.contains("has no unit"), "{e}");
    }

    #[test]
    fn rejects_malformed_specs() {
        for s in ["", "100", "0/1s", "10/0s", "10/1d", "x/1s", "10/s", "-1/1s"] {
            assert!(s.parse::<RateSpec>().is_err(), "{s} should be rejected");
        }
    }
}
