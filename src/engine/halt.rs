//! A provider the run stopped working ("halted"), and why.
//!
//! Some trouble is the same for every job of a provider and no retry fixes it: a
//! refused or missing credential, a host that never answers. Failing (or retrying)
//! each job then only burns attempts and fills the log, 100k times by morning. So the
//! engine halts the provider instead: it sends nothing more to it, its jobs keep the
//! state they have with no attempt used, the other providers go on, and the run ends
//! naming the provider and what to fix (`run` exits with `EXIT_PROVIDER_HALTED`).

use serde::{Deserialize, Serialize};

use crate::model::ProviderKind;

/// Why a provider was halted.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum HaltReason {
    /// No usable credentials (no key in the environment or the config file): found
    /// before any request.
    NotConfigured { detail: String },
    /// The provider refused the credential: 401/403 or its own "bad key" answer.
    CredentialRefused { status: Option<u16>, detail: String },
    /// Not one answer (connect refused, DNS, timeouts) for longer than the
    /// provider's `unreachable_after`.
    Unreachable {
        /// `host:port` of the API.
        target: String,
        /// The last transport error.
        detail: String,
        /// How long it went without an answer.
        for_secs: u64,
    },
}

/// A halted provider, as the engine holds it and `status` shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProviderHalt {
    pub provider: ProviderKind,
    pub reason: HaltReason,
    /// When it was halted (ms since the epoch).
    pub at_ms: u64,
    /// What to change before the next run: the variable or setting to fix.
    pub fix: String,
}

impl ProviderHalt {
    pub fn new(provider: ProviderKind, reason: HaltReason, base_url: &str) -> ProviderHalt {
        let fix = match &reason {
            HaltReason::NotConfigured { .. } => format!("set {}", credential_vars(provider)),
            HaltReason::CredentialRefused { .. } => format!("fix {}", credential_vars(provider)),
            HaltReason::Unreachable { .. } => format!(
                "check {} or base_url in [providers.{provider}] (now {base_url})",
                crate::config::env_names(provider).0
            ),
        };
        ProviderHalt {
            provider,
            reason,
            at_ms: crate::model::now_ms(),
            fix,
        }
    }

    /// What happens to the provider's jobs, for messages.
    pub fn jobs_note(&self) -> &'static str {
        match self.reason {
            // Requests that got no answer counted as attempts before the halt.
            HaltReason::Unreachable { .. } => "stay queued",
            _ => "stay queued (no attempt used)",
        }
    }

    /// One short line after the provider's name: "credential refused (401) — fix
    /// TOPAZ_API_KEY".
    pub fn summary(&self) -> String {
        let what = match &self.reason {
            HaltReason::NotConfigured { .. } => "no credentials".to_string(),
            HaltReason::CredentialRefused {
                status: Some(s), ..
            } => format!("credential refused ({s})"),
            HaltReason::CredentialRefused { status: None, .. } => "credential refused".into(),
            HaltReason::Unreachable {
                target,
                detail,
                for_secs,
            } => {
                // "cannot connect to host:port: connection refused", without the
                // transport's chain (the detail keeps it).
                let short = detail.strip_prefix("request failed: ").unwrap_or(detail);
                let short = short.split(" (").next().unwrap_or(short);
                let mut what = format!(
                    "unreachable for {}: {short}",
                    crate::query::human_secs(*for_secs)
                );
                if !short.contains(target.as_str()) {
                    what.push_str(&format!(" ({target})"));
                }
                what
            }
        };
        format!("{what} — {}", self.fix)
    }

    /// The provider's own words (or the transport error).
    pub fn detail(&self) -> &str {
        match &self.reason {
            HaltReason::NotConfigured { detail }
            | HaltReason::CredentialRefused { detail, .. }
            | HaltReason::Unreachable { detail, .. } => detail,
        }
    }
}

impl std::fmt::Display for ProviderHalt {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: halted: {}", self.provider, self.summary())
    }
}

/// The variables that hold a provider's credentials.
pub fn credential_vars(kind: ProviderKind) -> &'static str {
    match kind {
        ProviderKind::Perfect => "PERFECT_CLIENT_ID and PERFECT_CLIENT_SECRET (or PERFECT_API_KEY)",
        other => crate::config::env_names(other).1,
    }
}

/// The status a refusal names (401 or 403), if it names one.
pub fn refused_status(text: &str) -> Option<u16> {
    [401u16, 403]
        .into_iter()
        .find(|code| text.contains(&code.to_string()))
}

/// Drops a leading "provider: " from a message that is shown after the provider's
/// name anyway (no "topaz: halted: topaz: ...").
pub fn without_prefix(kind: ProviderKind, text: &str) -> String {
    let prefix = format!("{kind}: ");
    text.strip_prefix(&prefix).unwrap_or(text).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_halt_names_the_provider_the_status_and_the_variable() {
        let h = ProviderHalt::new(
            ProviderKind::Topaz,
            HaltReason::CredentialRefused {
                status: refused_status("HTTP 401 Unauthorized: Unauthorized"),
                detail: "HTTP 401 Unauthorized".into(),
            },
            "http://127.0.0.1:1/topaz",
        );
        assert_eq!(
            h.to_string(),
            "topaz: halted: credential refused (401) — fix TOPAZ_API_KEY"
        );
        let u = ProviderHalt::new(
            ProviderKind::Photio,
            HaltReason::Unreachable {
                target: "127.0.0.1:9".into(),
                detail: "request failed: cannot connect to 127.0.0.1:9: connection refused (os error 111)".into(),
                for_secs: 1200,
            },
            "http://127.0.0.1:9/photio/v1",
        );
        let s = u.to_string();
        assert_eq!(
            s,
            "photio: halted: unreachable for 20 min 0 s: cannot connect to 127.0.0.1:9: connection refused \
             — check PIXBATCH_PHOTIO_URL or base_url in [providers.photio] (now http://127.0.0.1:9/photio/v1)"
        );
        assert!(!u.summary().starts_with("photio"));
        assert_eq!(
            without_prefix(ProviderKind::Dzine, "dzine: no API key"),
            "no API key"
        );
        let json = serde_json::to_string(&u).unwrap();
        assert_eq!(serde_json::from_str::<ProviderHalt>(&json).unwrap(), u);
    }
}
