//! `pixbatch doctor`: is each configured provider reachable, and does it take the
//! credentials? One cheap request per provider (`Provider::check_access`: an auth
//! call, a balance, a status list), and a plain sentence for what is wrong.
//!
//! Providers without credentials are listed as "not configured" and not contacted.
//! The exit code is 1 when any configured provider has a problem (or none is
//! configured), 0 otherwise.

use super::*;
use crate::api::ProviderError;

/// Longest a single provider's check may take (connect, then the request).
const CHECK_TIMEOUT: Duration = Duration::from_secs(20);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// The configuration itself is wrong (a bad file, plain http to a remote host):
/// says so plainly, for `doctor` and `config`.
pub(super) fn bad_config(e: &crate::config::ConfigError) -> i32 {
    eprintln!("pixbatch: the configuration is wrong: {e}");
    EXIT_ERROR
}

/// What one provider's check found.
#[derive(Debug, Clone, PartialEq)]
pub(super) enum Verdict {
    NotConfigured(String),
    Ok(String),
    Problem(String),
}

/// One provider's line of `doctor --json`.
#[derive(Debug, serde::Serialize)]
struct Checked {
    provider: ProviderKind,
    /// "ok", "problem" or "not-configured".
    verdict: &'static str,
    message: String,
    base_url: String,
}

pub(super) async fn cmd_doctor(config: &Config, json: bool) -> Result<i32, Fail> {
    let mut problems = 0;
    let mut configured = 0;
    if let Some(p) = config.source.as_ref().filter(|_| !json) {
        println!("config file  {}", p.display());
    }
    let mut checked = Vec::new();
    for kind in ProviderKind::ALL {
        let pc = config.provider(kind);
        let verdict = check(&pc, config.engine.state_dir.as_deref()).await;
        let (mark, name, text) = match &verdict {
            Verdict::NotConfigured(t) => ("-", "not-configured", t.clone()),
            Verdict::Ok(t) => {
                configured += 1;
                ("ok", "ok", t.clone())
            }
            Verdict::Problem(t) => {
                configured += 1;
                problems += 1;
                ("FAIL", "problem", t.clone())
            }
        };
        if json {
            checked.push(Checked {
                provider: kind,
                verdict: name,
                message: text,
                base_url: pc.base_url.clone(),
            });
            continue;
        }
        println!("{mark:<4} {kind:<11} {text}");
        if !matches!(verdict, Verdict::NotConfigured(_)) {
            println!("     {:<11} base URL {}", "", pc.base_url);
        }
    }
    if json {
        let answer = serde_json::json!({
            "config_file": config.source.as_ref().map(|p| p.display().to_string()),
            "providers": checked,
            "ok": configured > 0 && problems == 0,
        });
        println!("{}", serde_json::to_string_pretty(&answer)?);
    }
    if configured == 0 {
        eprintln!(
            "pixbatch: no provider has credentials; set e.g. TOPAZ_API_KEY (see `pixbatch config`)"
        );
        return Ok(EXIT_ERROR);
    }
    if problems > 0 {
        eprintln!("pixbatch: {problems} provider(s) have a problem");
        return Ok(EXIT_ERROR);
    }
    Ok(EXIT_OK)
}

async fn check(pc: &crate::config::ProviderConfig, state_dir: Option<&std::path::Path>) -> Verdict {
    let kind = pc.kind;
    if !crate::cost::has_credentials(&pc.credentials) {
        let (_, key_var, secret_var) = crate::config::env_names(kind);
        let how = match secret_var {
            Some(secret) => format!("{key_var} and {secret}, or PERFECT_API_KEY"),
            None => key_var.to_string(),
        };
        return Verdict::NotConfigured(format!("not configured (no {how})"));
    }
    // The file's checks passed at load (plain http only to loopback); this says
    // the rest: where it cannot connect, what the provider said.
    if let Err(e) = crate::config::check_base_url(&pc.base_url) {
        return Verdict::Problem(e);
    }
    if let Some(problem) = connect(&pc.base_url).await {
        return Verdict::Problem(problem);
    }
    let adapter = match crate::providers::build(pc) {
        Ok(a) => a,
        Err(e) => return Verdict::Problem(format!("the credentials cannot be used: {e}")),
    };
    let client = match engine::http_client(pc) {
        Ok(c) => c,
        Err(e) => return Verdict::Problem(e),
    };
    // Its requests count against the credential's shared window like a run's.
    let gate = Arc::new(
        engine::limiter::ProviderGate::new(kind, &pc.rate_limits, Duration::ZERO, None)
            .with_shared_budget_in(state_dir, &pc.base_url, &pc.credentials),
    );
    let api = crate::api::Api::new(&pc.base_url, client, gate);
    match tokio::time::timeout(CHECK_TIMEOUT, adapter.check_access(&api)).await {
        Err(_) => Verdict::Problem(format!(
            "no answer within {} s from {}",
            CHECK_TIMEOUT.as_secs(),
            pc.base_url
        )),
        Ok(Ok(said)) => Verdict::Ok(said),
        Ok(Err(e)) => Verdict::Problem(explain(&e)),
    }
}

/// Connects to the base URL's host and port: "unreachable" is clearer said
/// before any HTTP.
async fn connect(base_url: &str) -> Option<String> {
    let url = match url::Url::parse(base_url) {
        Ok(u) => u,
        Err(e) => return Some(format!("the base URL {base_url:?} is not a URL: {e}")),
    };
    let host = url.host_str()?.trim_matches(['[', ']']).to_string();
    let port = url.port_or_known_default()?;
    let target = format!("{host}:{port}");
    match tokio::time::timeout(
        CONNECT_TIMEOUT,
        tokio::net::TcpStream::connect((host.as_str(), port)),
    )
    .await
    {
        Ok(Ok(_)) => None,
        Ok(Err(e)) if e.kind() == std::io::ErrorKind::ConnectionRefused => Some(format!(
            "unreachable: nothing listens at {target} (connection refused); check the base URL"
        )),
        Ok(Err(e)) => Some(format!("unreachable: cannot connect to {target}: {e}")),
        Err(_) => Some(format!(
            "unreachable: no connection to {target} within {} s",
            CONNECT_TIMEOUT.as_secs()
        )),
    }
}

/// A provider's error in the words a person needs.
pub(super) fn explain(e: &ProviderError) -> String {
    let text = e.to_string();
    let has = |code: &str| {
        text.contains(&format!("HTTP {code}"))
            || text.contains(&format!("code {code}"))
            || text.contains(&format!("error {code}:"))
            || text.contains(&format!("({code})"))
            || text.contains(&format!("{code} Unauthorized"))
            || text.contains(&format!("{code} Forbidden"))
    };
    match e {
        ProviderError::Permanent(_) | ProviderError::Credential(_) if has("401") => {
            format!("the key was refused (401): {text}")
        }
        ProviderError::Permanent(_) | ProviderError::Credential(_) if has("403") => {
            format!("the key was refused (403): {text}")
        }
        ProviderError::Permanent(_) if has("404") || has("405") => {
            format!("the base URL looks wrong: the provider's path was not found ({text})")
        }
        ProviderError::Transient {
            rate_limited: true, ..
        } => format!("rate limited right now (429); try again later: {text}"),
        ProviderError::Transient { reason, .. } if reason.starts_with("request failed") => {
            format!("unreachable: {reason}")
        }
        ProviderError::Transient { reason, .. } if reason.starts_with("HTTP 5") => {
            format!("the provider answered with a server error: {reason}")
        }
        _ => format!("the check failed: {text}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_are_put_plainly() {
        let refused =
            ProviderError::permanent("HTTP 401 Unauthorized: invalid key (check TOPAZ_API_KEY)");
        assert!(explain(&refused).starts_with("the key was refused (401)"));
        let dzine = ProviderError::permanent("dzine error 401: Unauthorized: invalid API key");
        assert!(explain(&dzine).starts_with("the key was refused (401)"));
        let gone =
            ProviderError::transient("request failed: error sending request: connection refused");
        assert!(explain(&gone).starts_with("unreachable"));
        let down = ProviderError::transient("HTTP 503 Service Unavailable");
        assert!(explain(&down).contains("server error"));
        let path = ProviderError::permanent("HTTP 404 Not Found");
        assert!(explain(&path).contains("base URL looks wrong"));
    }
}
