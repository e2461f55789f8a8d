//! Fault injection from a seed.
//!
//! One [`Chaos::draw`] per eligible request. It always takes the same seven numbers from
//! the generator, so the n-th eligible request gets the same decision for a given seed
//! whatever the earlier decisions were. The faults are tried in a fixed order and the
//! first that fires wins: 429, 5xx, reset, slow, truncate.

use std::sync::Mutex;

use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

use super::{lock, ChaosConfig};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Fault {
    /// Answer 429 before the handler; `Retry-After` when `Some`.
    TooMany { retry_after: Option<u64> },
    /// Answer this 5xx status before the handler.
    ServerError(u16),
    /// Drop the connection. `drop_silently`: no byte of an answer is written; otherwise
    /// the status line and headers go out and the body breaks off.
    Reset { drop_silently: bool },
    /// Sleep `ChaosConfig::slow` before answering.
    Slow,
    /// Send about half of an image-bearing body, then break the connection.
    Truncate,
}

impl Fault {
    /// The ledger's name for the fault.
    pub(crate) fn name(self) -> &'static str {
        match self {
            Fault::TooMany { .. } => "429",
            Fault::ServerError(_) => "5xx",
            Fault::Reset { .. } => "reset",
            Fault::Slow => "slow",
            Fault::Truncate => "truncate",
        }
    }
}

pub(crate) struct Chaos {
    cfg: ChaosConfig,
    rng: Mutex<SmallRng>,
}

impl Chaos {
    pub(crate) fn new(cfg: ChaosConfig, seed: u64) -> Self {
        Chaos {
            cfg,
            rng: Mutex::new(SmallRng::seed_from_u64(seed)),
        }
    }

    fn enabled(&self) -> bool {
        let c = &self.cfg;
        [
            c.rate_429,
            c.rate_5xx,
            c.rate_reset,
            c.rate_slow,
            c.rate_truncate,
        ]
        .iter()
        .any(|&r| r > 0.0)
    }

    /// Decide the fault for one request. `carries_image`: the answer would carry image
    /// bytes, the only kind truncation applies to.
    pub(crate) fn draw(&self, carries_image: bool) -> Option<Fault> {
        if !self.enabled() {
            return None;
        }
        let (r, coin, pick) = {
            let mut rng = lock(&self.rng);
            let r: [f64; 5] = std::array::from_fn(|_| rng.random::<f64>());
            let coin: bool = rng.random();
            let pick: u32 = rng.random_range(0..3);
            (r, coin, pick)
        };
        let c = &self.cfg;
        if r[0] < c.rate_429 {
            let retry_after = match c.retry_after_secs {
                Some(s) => Some(s),
                None => coin.then_some(1),
            };
            Some(Fault::TooMany { retry_after })
        } else if r[1] < c.rate_5xx {
            Some(Fault::ServerError([500, 502, 503][pick as usize]))
        } else if r[2] < c.rate_reset {
            Some(Fault::Reset {
                drop_silently: coin,
            })
        } else if r[3] < c.rate_slow {
            Some(Fault::Slow)
        } else if carries_image && r[4] < c.rate_truncate {
            Some(Fault::Truncate)
        } else {
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(all: f64) -> ChaosConfig {
        ChaosConfig {
            rate_429: all,
            rate_5xx: all,
            rate_slow: all,
            rate_reset: all,
            rate_truncate: all,
            ..Default::default()
        }
    }

    #[test]
    fn off_means_never() {
        let c = Chaos::new(ChaosConfig::default(), 1);
        assert!((0..1000).all(|_| c.draw(true).is_none()));
    }

    #[test]
    fn same_seed_same_faults() {
        let a = Chaos::new(cfg(0.2), 42);
        let b = Chaos::new(cfg(0.2), 42);
        let fa: Vec<_> = (0..500).map(|i| a.draw(i % 2 == 0)).collect();
        let fb: Vec<_> = (0..500).map(|i| b.draw(i % 2 == 0)).collect();
        assert_eq!(fa, fb);
        let c = Chaos::new(cfg(0.2), 43);
        let fc: Vec<_> = (0..500).map(|i| c.draw(i % 2 == 0)).collect();
        assert_ne!(fa, fc);
    }

    #[test]
    fn rates_are_roughly_honoured() {
        let c = Chaos::new(
            ChaosConfig {
                rate_429: 0.25,
                ..Default::default()
            },
            7,
        );
        let n = (0..10_000).filter(|_| c.draw(false).is_some()).count();
        assert!((2200..2800).contains(&n), "{n}");
    }

    #[test]
    fn retry_after_is_configured_or_half_and_half() {
        let c = Chaos::new(
            ChaosConfig {
                rate_429: 1.0,
                retry_after_secs: Some(7),
                ..Default::default()
            },
            1,
        );
        assert!((0..100).all(|_| c.draw(false)
            == Some(Fault::TooMany {
                retry_after: Some(7)
            })));
        let c = Chaos::new(
            ChaosConfig {
                rate_429: 1.0,
                ..Default::default()
            },
            1,
        );
        let with = (0..1000)
            .filter(|_| {
                c.draw(false)
                    == Some(Fault::TooMany {
                        retry_after: Some(1),
                    })
            })
            .count();
        assert!((400..600).contains(&with), "{with}");
    }

    #[test]
    fn truncate_only_for_images() {
        let c = Chaos::new(
            ChaosConfig {
                rate_truncate: 1.0,
                ..Default::default()
            },
            1,
        );
        assert_eq!(c.draw(false), None);
        assert_eq!(c.draw(true), Some(Fault::Truncate));
    }
}
