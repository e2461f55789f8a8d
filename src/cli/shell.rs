//! Commands that fit pixbatch into a shell: `completions`, `man`, `config`.

use super::*;
use clap::CommandFactory;

pub(super) fn cmd_completions(shell: clap_complete::Shell) -> Result<i32, Fail> {
    let mut cmd = Cli::command();
    clap_complete::generate(shell, &mut cmd, "pixbatch", &mut std::io::stdout());
    Ok(EXIT_OK)
}

/// The manual page, made from the same clap definitions as `--help`, so it cannot
/// fall behind the options. `pixbatch man > pixbatch.1`, or
/// `pixbatch man | man -l -`.
pub(super) fn cmd_man() -> Result<i32, Fail> {
    let mut out = Vec::new();
    man_page(&mut out)?;
    std::io::stdout().write_all(&out)?;
    Ok(EXIT_OK)
}

/// The page: clap_mangen's sections for the top command, then one section per
/// subcommand with its options, then the exit codes and environment.
pub fn man_page(out: &mut dyn Write) -> std::io::Result<()> {
    let cmd = Cli::command();
    let man = clap_mangen::Man::new(cmd.clone());
    man.render_title(out)?;
    man.render_name_section(out)?;
    man.render_synopsis_section(out)?;
    man.render_description_section(out)?;
    man.render_options_section(out)?;
    for sub in cmd.get_subcommands() {
        let name = sub.get_name();
        writeln!(out, ".SH \"PIXBATCH {}\"", name.to_uppercase())?;
        let sub_man = clap_mangen::Man::new(sub.clone().bin_name(format!("pixbatch {name}")));
        let mut part = Vec::new();
        sub_man.render_synopsis_section(&mut part)?;
        sub_man.render_description_section(&mut part)?;
        sub_man.render_options_section(&mut part)?;
        // Fold the subcommand's own section headings into sub-headings.
        let text = String::from_utf8_lossy(&part).replace(".SH ", ".SS ");
        out.write_all(text.as_bytes())?;
    }
    out.write_all(MAN_TAIL.as_bytes())?;
    man.render_version_section(out)?;
    Ok(())
}

const MAN_TAIL: &str = r#".SH "EXIT STATUS"
.TP
0
every job is done (or cancelled)
.TP
1
any other error (bad manifest row, bad configuration, unknown job id ...)
.TP
2
some jobs failed permanently; the rest are done
.TP
3
another process holds the database (the message names it); nothing was done
.TP
4
run \-\-max\-credits stopped submitting new work; what was submitted is finished
.TP
5
run halted a provider (credential missing or refused, unreachable past unreachable_after); its jobs stay queued, the others were worked; the message names the variable to fix
.TP
130
interrupted (Ctrl\-C or SIGTERM); run again to resume
.SH ENVIRONMENT
.TP
DZINE_API_KEY, PERFECT_CLIENT_ID, PERFECT_CLIENT_SECRET, PERFECT_API_KEY, TOPAZ_API_KEY, PHOTIO_API_KEY, AITHRIVING_API_KEY
credentials; never written to the database, logs or reports
.TP
PIXBATCH_DZINE_URL, PIXBATCH_PERFECT_URL, PIXBATCH_TOPAZ_URL, PIXBATCH_PHOTIO_URL, PIXBATCH_AITHRIVING_URL
base URLs (plain http only to loopback)
.TP
RUST_LOG
log filter (overrides \-v)
.TP
PIXBATCH_STATE_DIR, XDG_STATE_HOME, HOME
where the per\-credential rate budgets live: $PIXBATCH_STATE_DIR, else $XDG_STATE_HOME/pixbatch, else ~/.local/state/pixbatch
"#;

/// Prints the effective configuration as TOML: what the built-in defaults, the
/// config file and the environment add up to. Secrets show only whether they are
/// set and where from. The output is a valid config file once the secrets are
/// filled in or removed.
pub(super) fn cmd_config(config: &Config) -> Result<i32, Fail> {
    let env = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
    print!("{}", render_config(config, &env));
    Ok(EXIT_OK)
}

pub(super) fn render_config(config: &Config, env: &dyn Fn(&str) -> Option<String>) -> String {
    use std::fmt::Write as _;
    let mut s = String::new();
    let source = config
        .source
        .as_ref()
        .map(|p| p.display().to_string())
        .unwrap_or_else(|| "no config file".into());
    let _ = writeln!(
        s,
        "# effective configuration: built-in defaults <- {source} <- environment"
    );
    let _ = writeln!(
        s,
        "# secrets are redacted; \"# from X\" names the variable that set a value\n"
    );
    let e = &config.engine;
    let _ = writeln!(s, "[engine]");
    let _ = writeln!(s, "max_download_bytes = {}", e.max_download_bytes);
    let _ = writeln!(s, "rate_margin = {:?}", dur(e.rate_margin));
    let _ = writeln!(s, "outage_patience = {:?}", dur(e.outage_patience));
    for (kind, pc) in &config.providers {
        let (url_var, key_var, secret_var) = crate::config::env_names(*kind);
        let _ = writeln!(s, "\n[providers.{kind}]");
        let from = |var: &str| {
            if env(var).is_some() {
                format!("  # from {var}")
            } else {
                String::new()
            }
        };
        let _ = writeln!(s, "base_url = {:?}{}", pc.base_url, from(url_var));
        let _ = writeln!(s, "concurrency = {}", pc.concurrency);
        let limits: Vec<String> = pc
            .rate_limits
            .iter()
            .map(|l| format!("{:?}", l.to_string()))
            .collect();
        let _ = writeln!(s, "rate_limits = [{}]", limits.join(", "));
        let _ = writeln!(s, "max_attempts = {}", pc.max_attempts);
        let _ = writeln!(s, "poll_interval = {:?}", dur(pc.poll_interval));
        let _ = writeln!(s, "timeout = {:?}", dur(pc.timeout));
        let _ = writeln!(s, "max_in_flight = {}", pc.max_in_flight);
        let _ = writeln!(s, "reconcile_grace = {:?}", dur(pc.reconcile_grace));
        let _ = writeln!(s, "adaptive = {}", pc.adaptive);
        let _ = writeln!(s, "unreachable_after = {:?}", dur(pc.unreachable_after));
        if let Some(k) = pc.keep_alive {
            let _ = writeln!(s, "keep_alive = {:?}", dur(k));
        }
        if let Some(w) = pc.early_not_found {
            let _ = writeln!(s, "early_not_found = {:?}", dur(w));
        }
        if let Some(c) = pc.cost_per_job {
            let _ = writeln!(s, "cost_per_job = {c}");
        }
        if !pc.operations.is_empty() {
            let ops: Vec<String> = pc
                .operations
                .iter()
                .map(|(k, v)| format!("{k} = {v:?}"))
                .collect();
            let _ = writeln!(s, "operations = {{ {} }}", ops.join(", "));
        }
        let c = &pc.credentials;
        let perfect = *kind == ProviderKind::Perfect;
        let api_key_var = if perfect { "PERFECT_API_KEY" } else { key_var };
        let secret = |name: &str, value: &Option<String>, var: &str| {
            if value.is_some() {
                let place = if env(var).is_some() {
                    format!("from {var}")
                } else {
                    "from the config file".to_string()
                };
                format!("# {name} = \"<redacted>\"  # set, {place}\n")
            } else {
                format!("# {name}: not set ({var})\n")
            }
        };
        s.push_str(&secret("api_key", &c.api_key, api_key_var));
        if perfect {
            s.push_str(&secret("client_id", &c.client_id, key_var));
            s.push_str(&secret(
                "client_secret",
                &c.client_secret,
                secret_var.unwrap_or(""),
            ));
        }
    }
    s
}

/// A duration as the config file writes it ("2s", "30m", "1500ms").
fn dur(d: Duration) -> String {
    humantime::format_duration(d).to_string().replace(' ', "")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_redacts_secrets_and_reads_back() {
        let vars = [
            ("TOPAZ_API_KEY", "sekrit-topaz-1234"),
            ("PERFECT_CLIENT_ID", "client-abcd"),
            ("PERFECT_CLIENT_SECRET", "-----BEGIN PRIVATE sekrit"),
            ("PIXBATCH_TOPAZ_URL", "http://127.0.0.1:9/topaz"),
        ];
        let env = |k: &str| {
            vars.iter()
                .find(|(n, _)| *n == k)
                .map(|(_, v)| v.to_string())
        };
        let config = Config::load(None, &env).unwrap();
        let text = render_config(&config, &env);
        for (_, secret) in &vars[..3] {
            assert!(!text.contains(secret), "{secret} leaked:\n{text}");
        }
        assert!(
            text.contains("# api_key = \"<redacted>\"  # set, from TOPAZ_API_KEY"),
            "{text}"
        );
        assert!(
            text.contains("base_url = \"http://127.0.0.1:9/topaz\"  # from PIXBATCH_TOPAZ_URL"),
            "{text}"
        );
        assert!(
            text.contains("# api_key: not set (PHOTIO_API_KEY)"),
            "{text}"
        );
        // Without the comments it is a config file this pixbatch reads back.
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.toml");
        std::fs::write(&path, &text).unwrap();
        let again = Config::load(Some(&path), &|_| None).unwrap();
        let topaz = again.provider(ProviderKind::Topaz);
        assert_eq!(topaz.base_url, "http://127.0.0.1:9/topaz");
        assert_eq!(
            topaz.rate_limits,
            config.provider(ProviderKind::Topaz).rate_limits
        );
        assert_eq!(
            topaz.poll_interval,
            config.provider(ProviderKind::Topaz).poll_interval
        );
    }

    #[test]
    fn the_man_page_names_every_command_and_the_exit_codes() {
        let mut out = Vec::new();
        man_page(&mut out).unwrap();
        let text = String::from_utf8(out).unwrap();
        assert!(
            text.contains(".TH pixbatch 1"),
            "{}",
            &text[..80.min(text.len())]
        );
        for sub in Cli::command().get_subcommands() {
            let heading = format!(".SH \"PIXBATCH {}\"", sub.get_name().to_uppercase());
            assert!(text.contains(&heading), "no {heading}");
        }
        assert!(text.contains("max\\-credits"), "run's options are in it");
        assert!(text.contains("EXIT STATUS"));
    }
}
