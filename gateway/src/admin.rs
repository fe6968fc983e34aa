//! The operator's admin API under `/admin/v1` (not part of OSB): what the
//! `svcbroker` CLI lists and looks up by name.
//!
//! - `GET /admin/v1/instances`: every instance with its name (from the OSB
//!   `context` given at provision), service, plan, node, state, observed
//!   state, times, binding count and last operation.
//! - `GET /admin/v1/instances/{id-or-name}`: one instance and its bindings.
//! - `GET /admin/v1/nodes`: the node registry (plus nodes that only the
//!   stored placements still name), with capacity and placements.
//!
//! Same basic auth as OSB; no `X-Broker-API-Version` (this is not OSB).
//! Read-only, and nothing here ever carries a secret: passwords live in the
//! allocator and reach clients only through OSB bind/fetch answers.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::rejection::PathRejection;
use axum::extract::{Path, Request, State};
use axum::http::{StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde_json::{Map, Value, json};
use svcbroker_proto::v1::NodeInfo;

use crate::api::{rfc3339_ms, shown};
use crate::catalog::Loaded;
use crate::config::Config;
use crate::engine::Engine;
use crate::error::Error;
use crate::store::{BindingRow, InstanceView, OperationRow, now_ms};
use crate::validate::check_basic_auth;

/// Path prefix of the admin API.
pub const PREFIX: &str = "/admin/v1";

#[derive(Clone)]
struct AdminState {
    engine: Arc<Engine>,
    config: Arc<Config>,
}

/// Builds the admin router (state applied, so it merges into the OSB
/// router).
pub fn router(engine: Arc<Engine>, config: Arc<Config>) -> Router {
    let state = AdminState { engine, config };
    Router::new()
        .route(&format!("{PREFIX}/instances"), get(list_instances))
        .route(
            &format!("{PREFIX}/instances/{{instance}}"),
            get(get_instance),
        )
        .route(&format!("{PREFIX}/nodes"), get(list_nodes))
        .route_layer(middleware::from_fn_with_state(state.clone(), admin_guard))
        .with_state(state)
}

/// Basic auth only: the admin API is for operators, who hold the broker's
/// credentials, not for OSB platforms.
async fn admin_guard(State(state): State<AdminState>, req: Request, next: Next) -> Response {
    let auth = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok());
    if !check_basic_auth(auth, &state.config.username, &state.config.password) {
        return Error::Unauthorized.into_response();
    }
    next.run(req).await
}

async fn list_instances(State(state): State<AdminState>) -> Result<Response, Error> {
    let catalog = state.engine.catalog();
    let rows = state.engine.store().list_instances().await?;
    let instances: Vec<Value> = rows
        .iter()
        .map(|(view, bindings)| instance_json(&catalog, view, *bindings))
        .collect();
    Ok((StatusCode::OK, Json(json!({ "instances": instances }))).into_response())
}

async fn get_instance(
    State(state): State<AdminState>,
    path: Result<Path<String>, PathRejection>,
) -> Result<Response, Error> {
    let key = path
        .map(|Path(p)| p)
        .map_err(|e| Error::BadRequest(format!("invalid path: {}", e.body_text())))?;
    let store = state.engine.store();
    // An id wins over a name: ids are unique, names are only a convention
    // of the platform that sent them.
    let rows = store.list_instances().await?;
    let mut matches: Vec<&(InstanceView, u32)> =
        rows.iter().filter(|(v, _)| v.instance.id == key).collect();
    if matches.is_empty() {
        matches = rows
            .iter()
            .filter(|(v, _)| instance_name(&v.instance.context).as_deref() == Some(key.as_str()))
            .collect();
    }
    let (view, count) = match matches.as_slice() {
        [] => {
            return Err(Error::NotFound(format!(
                "no service instance has the id or name '{}'",
                shown(&key)
            )));
        }
        [one] => *one,
        many => {
            let ids: Vec<&str> = many.iter().map(|(v, _)| v.instance.id.as_str()).collect();
            return Err(Error::Conflict(format!(
                "{} service instances are named '{}' ({}); use an id",
                ids.len(),
                shown(&key),
                ids.join(", ")
            )));
        }
    };
    let catalog = state.engine.catalog();
    let mut body = instance_json(&catalog, view, *count);
    let mut bindings = Vec::new();
    for b in store.bindings_of(&view.instance.id).await? {
        let last_op = store.last_binding_op(&b.id).await?;
        bindings.push(binding_json(&b, last_op.as_ref()));
    }
    if let Value::Object(m) = &mut body {
        m.insert("bindings".into(), Value::Array(bindings));
    }
    Ok((StatusCode::OK, Json(body)).into_response())
}

async fn list_nodes(State(state): State<AdminState>) -> Result<Response, Error> {
    let placed: BTreeMap<String, u32> = state
        .engine
        .store()
        .instances_per_node()
        .await?
        .into_iter()
        .collect();
    let now = now_ms();
    let mut nodes: Vec<Value> = Vec::new();
    let known = state.engine.registry().statuses();
    for (info, live, ago) in &known {
        let used = placed.get(&info.node_id).copied().unwrap_or(0);
        nodes.push(node_json(info, *live, *ago, used, now));
    }
    // A node that placements name but that has not announced itself since
    // this gateway started (e.g. it is gone for good) is still listed: its
    // instances are somewhere.
    for (node_id, used) in &placed {
        if !known.iter().any(|(i, _, _)| &i.node_id == node_id) {
            nodes.push(json!({
                "node_id": node_id,
                "state": "unknown",
                "grpc_url": null,
                "advertise_host": null,
                "services": [],
                "capacity": null,
                "used": used,
                "reported_used": null,
                "port_range": null,
                "boot_id": null,
                "last_seen": null,
                "last_seen_ms_ago": null,
            }));
        }
    }
    Ok((StatusCode::OK, Json(json!({ "nodes": nodes }))).into_response())
}

/// The instance's name: `context.instance_name` (Cloud Foundry and the
/// svcbroker CLI send it), else `context.name`.
fn instance_name(context: &Value) -> Option<String> {
    ["instance_name", "name"]
        .iter()
        .find_map(|k| context.get(*k).and_then(Value::as_str))
        .filter(|s| !s.is_empty())
        .map(str::to_owned)
}

/// A binding's name: `context.binding_name`, else `context.name`.
fn binding_name(context: &Value) -> Option<String> {
    ["binding_name", "name"]
        .iter()
        .find_map(|k| context.get(*k).and_then(Value::as_str))
        .filter(|s| !s.is_empty())
        .map(str::to_owned)
}

fn instance_json(catalog: &Loaded, view: &InstanceView, bindings: u32) -> Value {
    let inst = &view.instance;
    let def = catalog.existing(&inst.service_id, &inst.plan_id);
    let service_name = def.as_ref().map(|(s, _)| s.name.clone()).or_else(|| {
        catalog
            .existing_service(&inst.service_id)
            .map(|s| s.name.clone())
    });
    let plan_name = def.as_ref().map(|(_, p)| p.name.clone());
    let observed = inst.observed.as_ref().map(|o| {
        json!({
            "state": o.state,
            "message": o.message,
            "at": rfc3339_ms(o.at),
        })
    });
    let mut m = Map::new();
    m.insert("id".into(), json!(inst.id));
    m.insert("name".into(), json!(instance_name(&inst.context)));
    m.insert("service_id".into(), json!(inst.service_id));
    m.insert("service_name".into(), json!(service_name));
    m.insert("plan_id".into(), json!(inst.plan_id));
    m.insert("plan_name".into(), json!(plan_name));
    m.insert("node_id".into(), json!(inst.node_id));
    m.insert("kind".into(), json!(inst.kind));
    m.insert("state".into(), json!(inst.state.as_str()));
    m.insert(
        "observed_state".into(),
        json!(inst.observed.as_ref().map(|o| o.state.clone())),
    );
    m.insert("observed".into(), json!(observed));
    m.insert(
        "maintenance_version".into(),
        json!(inst.maintenance_version),
    );
    m.insert("created_at".into(), json!(rfc3339_ms(inst.created_at)));
    m.insert("updated_at".into(), json!(rfc3339_ms(inst.updated_at)));
    m.insert("binding_count".into(), json!(bindings));
    m.insert(
        "last_operation".into(),
        json!(view.last_op.as_ref().map(operation_json)),
    );
    Value::Object(m)
}

fn binding_json(b: &BindingRow, last_op: Option<&OperationRow>) -> Value {
    json!({
        "id": b.id,
        "name": binding_name(&b.context),
        "state": b.state.as_str(),
        "created_at": rfc3339_ms(b.created_at),
        "updated_at": rfc3339_ms(b.updated_at),
        "last_operation": last_op.map(operation_json),
    })
}

fn operation_json(op: &OperationRow) -> Value {
    json!({
        "id": op.id,
        "action": op.action.as_str(),
        "state": op.state.as_str(),
        "description": op.description,
        "created_at": rfc3339_ms(op.created_at),
        "updated_at": rfc3339_ms(op.updated_at),
    })
}

fn node_json(info: &NodeInfo, live: bool, ago: Duration, used: u32, now: i64) -> Value {
    let ago_ms = i64::try_from(ago.as_millis()).unwrap_or(i64::MAX);
    json!({
        "node_id": info.node_id,
        "state": if live { "up" } else { "down" },
        "grpc_url": info.grpc_url,
        "advertise_host": info.advertise_host,
        "services": info.services,
        "capacity": info.capacity,
        // What the gateway placed there (what placement counts), and what
        // the node itself said it holds.
        "used": used,
        "reported_used": info.used,
        "port_range": info.port_range.as_ref().map(|r| json!({"start": r.start, "end": r.end})),
        "boot_id": info.boot_id,
        "last_seen": rfc3339_ms(now.saturating_sub(ago_ms)),
        "last_seen_ms_ago": ago_ms,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_come_from_context() {
        assert_eq!(
            instance_name(&json!({"instance_name": "a", "name": "b"})).as_deref(),
            Some("a")
        );
        assert_eq!(instance_name(&json!({"name": "b"})).as_deref(), Some("b"));
        assert_eq!(instance_name(&json!({"instance_name": ""})), None);
        assert_eq!(instance_name(&json!({"instance_name": 7})), None);
        assert_eq!(
            binding_name(&json!({"binding_name": "x"})).as_deref(),
            Some("x")
        );
        assert_eq!(binding_name(&json!({})), None);
    }
}
