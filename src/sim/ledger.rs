//! The ledger: one entry per request the simulator answered under a provider prefix, so
//! tests can check what the client really did (how often it called, whether it broke a
//! limit, how often it was charged, which bytes it was served).
//!
//! Served as `GET /_sim/ledger` (`{"entries":[...]}`, in `seq` order) and summarised as
//! `GET /_sim/stats`.

use std::collections::BTreeMap;
use std::sync::Mutex;

use serde::{Deserialize, Serialize};

use super::{lock, Provider};

/// One request, as recorded. The JSON field names are a contract with the tests.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LedgerEntry {
    /// Arrival order, from 0, over all recorded requests.
    pub seq: u64,
    /// Milliseconds since the simulator started, taken when the request arrived.
    pub t_ms: u64,
    /// `topaz`, `photio`, `aithriving`.
    pub provider: String,
    pub method: String,
    /// The request path without the query.
    pub path: String,
    /// The operation, e.g. `enhance_async`, `status`, `file`, `upscale`; `unknown` for
    /// paths and methods the provider does not have.
    pub endpoint: String,
    /// The HTTP status answered (or, for a reset, the one that would have been).
    pub status: u16,
    /// The client's `X-Request-Id`, or for a Topaz request about a process, the key of the
    /// submission that created it.
    pub request_key: Option<String>,
    /// The provider's id for the remote task (Topaz `process_id`), when there is one.
    pub remote_id: Option<String>,
    /// An accepted paid submission (charged even when the answer was then lost).
    pub charged: bool,
    /// Counts against the provider's rate limit.
    pub metered: bool,
    /// Refused with 429 because the configured limits were exceeded.
    pub violation: bool,
    /// The injected fault: `429`, `5xx`, `slow`, `reset`, `truncate`.
    pub fault: Option<String>,
    /// The `Retry-After` seconds sent with a 429, if any.
    pub retry_after_s: Option<u64>,
    /// SHA-256 (hex) of the full image this request served or would have served.
    pub output_sha256: Option<String>,
    /// This answer told the client its task was dropped for not being polled in time
    /// (Perfect's keep-alive); recorded on the first answer after the drop.
    #[serde(default)]
    pub dropped: bool,
}

/// `GET /_sim/stats`.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Stats {
    /// Every recorded request (metered or not) per provider.
    pub requests: BTreeMap<String, u64>,
    /// Limit violations per provider.
    pub violations: BTreeMap<String, u64>,
    /// Charged submissions per provider.
    pub charges: BTreeMap<String, u64>,
    /// Injected faults by name (`429`, `5xx`, `slow`, `reset`, `truncate`).
    pub faults: BTreeMap<String, u64>,
    /// Tasks dropped for want of a poll, per provider (Perfect only).
    #[serde(default)]
    pub dropped_tasks: BTreeMap<String, u64>,
}

pub(crate) const FAULT_NAMES: [&str; 5] = ["429", "5xx", "slow", "reset", "truncate"];

#[derive(Default)]
pub(crate) struct Ledger {
    entries: Mutex<Vec<LedgerEntry>>,
}

impl Ledger {
    pub(crate) fn record(&self, entry: LedgerEntry) {
        tracing::debug!(
            seq = entry.seq,
            provider = %entry.provider,
            endpoint = %entry.endpoint,
            status = entry.status,
            fault = ?entry.fault,
            "sim request"
        );
        lock(&self.entries).push(entry);
    }

    /// Entries in `seq` order, optionally only those after `after_seq` and of one provider.
    pub(crate) fn entries(
        &self,
        after_seq: Option<u64>,
        provider: Option<&str>,
    ) -> Vec<LedgerEntry> {
        let mut out: Vec<LedgerEntry> = lock(&self.entries)
            .iter()
            .filter(|e| after_seq.is_none_or(|s| e.seq > s))
            .filter(|e| provider.is_none_or(|p| e.provider == p))
            .cloned()
            .collect();
        out.sort_by_key(|e| e.seq);
        out
    }

    pub(crate) fn clear(&self) {
        lock(&self.entries).clear();
    }

    pub(crate) fn stats(&self) -> Stats {
        let mut s = Stats::default();
        for p in Provider::ALL {
            s.requests.insert(p.name().to_string(), 0);
            s.violations.insert(p.name().to_string(), 0);
            s.charges.insert(p.name().to_string(), 0);
        }
        for f in FAULT_NAMES {
            s.faults.insert(f.to_string(), 0);
        }
        for e in lock(&self.entries).iter() {
            *s.requests.entry(e.provider.clone()).or_default() += 1;
            if e.violation {
                *s.violations.entry(e.provider.clone()).or_default() += 1;
            }
            if e.charged {
                *s.charges.entry(e.provider.clone()).or_default() += 1;
            }
            if let Some(f) = &e.fault {
                *s.faults.entry(f.clone()).or_default() += 1;
            }
            if e.dropped {
                *s.dropped_tasks.entry(e.provider.clone()).or_default() += 1;
            }
        }
        s
    }
}
