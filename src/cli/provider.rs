//! Commands that talk to one provider directly (`styles`, `balance`) and `sim`.

use super::*;

pub(super) async fn cmd_styles(
    config: &Config,
    provider: ProviderKind,
    query: &crate::providers::StyleQuery,
    json: bool,
) -> Result<i32, Fail> {
    let (adapter, api) = engine::standalone(config, provider)
        .await
        .map_err(|e| Fail(EXIT_ERROR, e))?;
    let entries = adapter
        .styles(&api, query)
        .await
        .map_err(|e| Fail(EXIT_ERROR, format!("{provider}: {e}")))?;
    let mut out = std::io::stdout().lock();
    if json {
        for e in &entries {
            let detail: serde_json::Map<String, serde_json::Value> = e
                .detail
                .iter()
                .map(|(k, v)| (k.clone(), serde_json::Value::String(v.clone())))
                .collect();
            let line = serde_json::json!({
                "kind": e.kind, "id": e.id, "title": e.title, "detail": detail,
            });
            writeln!(out, "{line}")?;
        }
    } else {
        let id_width = entries.iter().map(|e| e.id.len()).max().unwrap_or(2).max(2);
        writeln!(out, "{:<6} {:<id_width$}  TITLE", "KIND", "ID")?;
        for e in &entries {
            let detail: Vec<String> = e.detail.iter().map(|(k, v)| format!("{k}={v}")).collect();
            let detail = if detail.is_empty() {
                String::new()
            } else {
                format!("  ({})", detail.join(", "))
            };
            writeln!(
                out,
                "{:<6} {:<id_width$}  {}{detail}",
                e.kind, e.id, e.title
            )?;
        }
    }
    if entries.is_empty() {
        // Said out loud: an empty list from a feature that has styles usually means a
        // wrong slug or group, not "no styles" (docs/providers.md, "live evidence").
        match query.feature.as_deref().filter(|f| !f.trim().is_empty()) {
            Some(f) => eprintln!(
                "pixbatch: {provider} listed no styles for {f}{} (a feature with styles answered an empty list: check the feature's slug and the group id)",
                query.group.as_deref().map(|g| format!(" in group {g}")).unwrap_or_default()
            ),
            None => eprintln!("pixbatch: {provider} listed no styles"),
        }
    }
    Ok(EXIT_OK)
}

pub(super) async fn cmd_balance(
    config: &Config,
    provider: ProviderKind,
    json: bool,
) -> Result<i32, Fail> {
    let (adapter, api) =
        engine::standalone_unchecked(config, provider).map_err(|e| Fail(EXIT_ERROR, e))?;
    match adapter.balance(&api).await {
        Ok(Some(b)) => {
            if json {
                println!(
                    "{}",
                    serde_json::json!({"provider": provider.name(), "amount": b.amount, "unit": b.unit})
                );
            } else {
                println!("{provider}: {} {}", b.amount, b.unit);
            }
            Ok(EXIT_OK)
        }
        Ok(None) => Err(Fail(
            EXIT_ERROR,
            format!("{provider}: its API does not tell the balance"),
        )),
        Err(e) => Err(Fail(EXIT_ERROR, format!("{provider}: {e}"))),
    }
}

pub(super) async fn cmd_sim(addr: &str, args: crate::sim::SimArgs) -> Result<i32, Fail> {
    let config = args.into_config().map_err(|e| Fail(EXIT_ERROR, e))?;
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| Fail(EXIT_ERROR, format!("cannot listen on {addr}: {e}")))?;
    let local = listener.local_addr()?;
    if !local.ip().is_loopback() {
        return Err(Fail(
            EXIT_ERROR,
            format!("the simulator serves loopback only, not {local}"),
        ));
    }
    let server = crate::sim::SimServer::bind(listener, config)?;
    // Every variable a client needs, as the environment variables pixbatch reads, so
    // pasting these lines (or `eval`-ing them) points all five providers here.
    for line in sim_exports(&format!("http://{local}"), &server.credentials()) {
        println!("{line}");
    }
    // Tests read this line to learn the port.
    println!("pixbatch sim listening on http://{local}");
    std::io::stdout().flush()?;
    server
        .run(async {
            let _ = wait_for_stop_signal().await;
        })
        .await?;
    Ok(EXIT_OK)
}

/// `export NAME='value'` lines for every provider: its base URL on the simulator, and
/// its credentials: the ones the simulator generated (Perfect's key pair) as they
/// are, a made-up key for the others (the simulator accepts any key that does not
/// start with `invalid`).
pub(super) fn sim_exports(base: &str, generated: &serde_json::Value) -> Vec<String> {
    let mut lines = Vec::new();
    for kind in ProviderKind::ALL {
        let (url_var, key_var, secret_var) = crate::config::env_names(kind);
        lines.push(format!(
            "export {url_var}='{base}{}'",
            crate::providers::sim_base_path(kind)
        ));
        let own = generated.get(kind.name()).and_then(|v| v.as_object());
        for var in std::iter::once(key_var).chain(secret_var) {
            let value = own
                .and_then(|o| o.get(var))
                .and_then(|v| v.as_str())
                .map(str::to_string)
                .unwrap_or_else(|| format!("sim-{}-key", kind.name()));
            lines.push(format!("export {var}='{value}'"));
        }
    }
    lines
}

#[cfg(test)]
mod tests {
    #[test]
    fn sim_exports_name_every_url_and_key() {
        let generated = serde_json::json!({
            "perfect": {"PERFECT_CLIENT_ID": "cid", "PERFECT_CLIENT_SECRET": "pub"},
            "dzine": {},
        });
        let lines = super::sim_exports("http://127.0.0.1:9", &generated);
        for expected in [
            "export PIXBATCH_TOPAZ_URL='http://127.0.0.1:9/topaz/image/v1'",
            "export PIXBATCH_PHOTIO_URL='http://127.0.0.1:9/photio/v1'",
            "export PIXBATCH_AITHRIVING_URL='http://127.0.0.1:9/aithriving'",
            "export PIXBATCH_PERFECT_URL='http://127.0.0.1:9/perfect'",
            "export PIXBATCH_DZINE_URL='http://127.0.0.1:9/dzine/openapi/v1'",
            "export TOPAZ_API_KEY='sim-topaz-key'",
            "export PHOTIO_API_KEY='sim-photio-key'",
            "export AITHRIVING_API_KEY='sim-aithriving-key'",
            "export DZINE_API_KEY='sim-dzine-key'",
            "export PERFECT_CLIENT_ID='cid'",
            "export PERFECT_CLIENT_SECRET='pub'",
        ] {
            assert!(
                lines.iter().any(|l| l == expected),
                "{expected} in {lines:?}"
            );
        }
        assert_eq!(lines.len(), 11, "{lines:?}");
    }
}
