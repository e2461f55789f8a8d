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
    // Credentials a client cannot make up (Perfect's generated key pair), as the
    // environment variables pixbatch reads, so `eval`-ing these lines configures it.
    if let Some(providers) = server.credentials().as_object() {
        for vars in providers.values().filter_map(|v| v.as_object()) {
            for (name, value) in vars {
                if let Some(value) = value.as_str() {
                    println!("export {name}='{value}'");
                }
            }
        }
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
