//! The simulated Perfect. (Placeholder: every path answers 404 until it is written.)

use std::sync::Arc;

use axum::extract::Request;
use axum::http::{Method, StatusCode};
use serde_json::json;

use super::{Ctx, Reply, Route, Shared, SimConfig};

/// Everything the simulated Perfect remembers.
#[derive(Debug, Default)]
pub(crate) struct PerfectState {}

impl PerfectState {
    pub(crate) fn new(_config: &SimConfig) -> Self {
        PerfectState {}
    }
}

/// What a client needs to talk to this simulator (shown by `pixbatch sim` and
/// `/_sim/credentials`).
pub(crate) fn credentials(s: &Shared) -> serde_json::Value {
    let _ = &s.perfect;
    json!({})
}

pub(crate) fn route(_method: &Method, _rest: &str) -> Route {
    Route::api("unknown").unmetered()
}

pub(crate) fn request_key_hint(_s: &Shared, _route: &Route) -> Option<String> {
    None
}

pub(crate) fn authorize(_s: &Shared, _ctx: &Ctx, _req: &Request) -> Result<(), Reply> {
    Ok(())
}

pub(crate) fn too_many(_route: &Route) -> Reply {
    Reply::json(
        StatusCode::TOO_MANY_REQUESTS,
        &json!({"error": "too many requests"}),
    )
}

pub(crate) fn server_error(_route: &Route, status: StatusCode) -> Reply {
    Reply::json(status, &json!({"error": "server error"}))
}

pub(crate) async fn handle(_s: &Arc<Shared>, _ctx: &Ctx, _req: Request) -> Reply {
    Reply::json(
        StatusCode::NOT_FOUND,
        &json!({"error": "not simulated yet"}),
    )
}
