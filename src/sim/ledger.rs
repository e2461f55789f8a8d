//! The ledger: one entry per request the simulator answered under a provider prefix, so
//! tests can check what the client really did (how often it called, whether it broke a
//! limit, how often it was charged, which bytes it was served).
//!
//! Served as `GET /_sim/ledger` (`{"entries":[...]}`, in `seq` order) and summarised as
//! `GET /_sim/stats`.
//!
//! The stats are running totals, kept as entries are recorded, so they cost nothing to
//! read and stay exact when the entries themselves are capped (`--ledger-cap`: a
//! benchmark with a million jobs would otherwise hold every request in memory).

use std::collections::{BTreeMap, VecDeque};
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
    /// Requests that counted against the provider's limits (metered and not refused
    /// for a violation), per provider.
    #[serde(default)]
    pub metered: BTreeMap<String, u64>,
    /// Answered requests per `provider/endpoint` (e.g. `topaz/status_delete`).
    #[serde(default)]
    pub endpoints: BTreeMap<String, u64>,
    /// Entries no longer held because of the ledger's cap (the totals above still
    /// count them).
    #[serde(default)]
    pub dropped_entries: u64,
}

pub(crate) const FAULT_NAMES: [&str; 5] = ["429", "5xx", "slow", "reset", "truncate"];

#[derive(Default)]
pub(crate) struct Ledger {
    inner: Mutex<Inner>,
    /// Keep at most this many entries (the oldest go first); 0 = all.
    cap: usize,
}

#[derive(Default)]
struct Inner {
    entries: VecDeque<LedgerEntry>,
    totals: Stats,
}

impl Ledger {
    pub(crate) fn with_cap(cap: usize) -> Ledger {
        Ledger {
            inner: Mutex::default(),
            cap,
        }
    }

    pub(crate) fn record(&self, entry: LedgerEntry) {
        tracing::debug!(
            seq = entry.seq,
            provider = %entry.provider,
            endpoint = %entry.endpoint,
            status = entry.status,
            fault = ?entry.fault,
            "sim request"
        );
        let mut inner = lock(&self.inner);
        let t = &mut inner.totals;
        *t.requests.entry(entry.provider.clone()).or_default() += 1;
        if entry.violation {
            *t.violations.entry(entry.provider.clone()).or_default() += 1;
        } else if entry.metered {
            *t.metered.entry(entry.provider.clone()).or_default() += 1;
        }
        if entry.charged {
            *t.charges.entry(entry.provider.clone()).or_default() += 1;
        }
        if let Some(f) = &entry.fault {
            *t.faults.entry(f.clone()).or_default() += 1;
        }
        if entry.dropped {
            *t.dropped_tasks.entry(entry.provider.clone()).or_default() += 1;
        }
        let endpoint = format!("{}/{}", entry.provider, entry.endpoint);
        *t.endpoints.entry(endpoint).or_default() += 1;
        if self.cap > 0 && inner.entries.len() >= self.cap {
            inner.entries.pop_front();
            inner.totals.dropped_entries += 1;
        }
        inner.entries.push_back(entry);
    }

    /// Entries in `seq` order, optionally only those after `after_seq` and of one provider.
    pub(crate) fn entries(
        &self,
        after_seq: Option<u64>,
        provider: Option<&str>,
    ) -> Vec<LedgerEntry> {
        let mut out: Vec<LedgerEntry> = lock(&self.inner)
            .entries
            .iter()
            .filter(|e| after_seq.is_none_or(|s| e.seq > s))
            .filter(|e| provider.is_none_or(|p| e.provider == p))
            .cloned()
            .collect();
        out.sort_by_key(|e| e.seq);
        out
    }

    /// Forgets every entry and the totals.
    pub(crate) fn clear(&self) {
        let mut inner = lock(&self.inner);
        inner.entries.clear();
        inner.totals = Stats::default();
    }

    pub(crate) fn stats(&self) -> Stats {
        let mut s = lock(&self.inner).totals.clone();
        for p in Provider::ALL {
            for map in [
                &mut s.requests,
                &mut s.violations,
                &mut s.charges,
                &mut s.metered,
            ] {
                map.entry(p.name().to_string()).or_default();
            }
        }
        for f in FAULT_NAMES {
            s.faults.entry(f.to_string()).or_default();
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(seq: u64, metered: bool, violation: bool, charged: bool) -> LedgerEntry {
        LedgerEntry {
            seq,
            t_ms: seq,
            provider: "topaz".into(),
            method: "GET".into(),
            path: "/topaz/x".into(),
            endpoint: "status".into(),
            status: 200,
            request_key: None,
            remote_id: None,
            charged,
            metered,
            violation,
            fault: (seq == 2).then(|| "429".to_string()),
            retry_after_s: None,
            output_sha256: None,
            dropped: false,
        }
    }

    #[test]
    fn capped_ledger_keeps_the_newest_entries_and_exact_totals() {
        let l = Ledger::with_cap(2);
        l.record(entry(0, true, false, true));
        l.record(entry(1, true, true, false));
        l.record(entry(2, false, false, false));
        let kept: Vec<u64> = l.entries(None, None).iter().map(|e| e.seq).collect();
        assert_eq!(kept, vec![1, 2]);
        let s = l.stats();
        assert_eq!(s.requests["topaz"], 3);
        assert_eq!(s.violations["topaz"], 1);
        assert_eq!(s.metered["topaz"], 1);
        assert_eq!(s.charges["topaz"], 1);
        assert_eq!(s.faults["429"], 1);
        assert_eq!(s.faults["5xx"], 0);
        assert_eq!(s.requests["perfect"], 0);
        assert_eq!(s.dropped_entries, 1);
        assert_eq!(s.endpoints["topaz/status"], 3);
        l.clear();
        assert_eq!(l.stats().requests["topaz"], 0);
        assert!(l.entries(None, None).is_empty());
    }
}
