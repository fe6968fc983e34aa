//! The OSB v2.17 REST API (axum).
//!
//! Every handler validates the whole request (ids, body, catalog, schema,
//! idempotency) before it records anything, so a 4xx never changes state.
//! Mutations are recorded with their operation in one transaction and then
//! driven by the [`Engine`]; synchronous requests wait for the operation up
//! to `sync_timeout_ms`.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::rejection::{BytesRejection, PathRejection, QueryRejection};
use axum::extract::{DefaultBodyLimit, Path, Query, Request, State};
use axum::http::{HeaderName, HeaderValue, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde_json::{Map, Value, json};
use svcbroker_svcdef::{PlanDef, SchemaKind, ServiceDef, Template, Vars};

use crate::catalog::Loaded;
use tracing::Instrument;

use crate::config::Config;
use crate::engine::{BindingAnswer, Engine};
use crate::error::Error;
use crate::store::{
    Action, BindingState, CreateBinding, CreateInstance, InstanceRow, InstanceState, NewBinding,
    NewInstance, NewOperation, OpState, OperationRow, StartOp,
};
use crate::validate::{check_api_version, check_basic_auth, validate_id};

/// `X-Broker-API-Version`.
pub const API_VERSION_HEADER: HeaderName = HeaderName::from_static("x-broker-api-version");
/// `X-Broker-API-Request-Identity`, echoed on every response.
pub const REQUEST_IDENTITY_HEADER: HeaderName =
    HeaderName::from_static("x-broker-api-request-identity");

/// State shared by the handlers.
#[derive(Clone)]
pub struct AppState {
    engine: Arc<Engine>,
    config: Arc<Config>,
}

/// Builds the HTTP router: `/v2/...` behind basic auth and the API version
/// check, `/healthz` open.
pub fn router(engine: Arc<Engine>, config: Arc<Config>) -> Router {
    let limit = config.max_body_bytes;
    let state = AppState { engine, config };
    let instance = "/v2/service_instances/{instance_id}";
    let binding = "/v2/service_instances/{instance_id}/service_bindings/{binding_id}";
    let v2 = Router::new()
        .route("/v2/catalog", get(catalog))
        .route(
            instance,
            get(get_instance)
                .put(provision)
                .patch(update)
                .delete(deprovision),
        )
        .route(
            &format!("{instance}/last_operation"),
            get(instance_last_operation),
        )
        .route(binding, get(get_binding).put(bind).delete(unbind))
        .route(
            &format!("{binding}/last_operation"),
            get(binding_last_operation),
        )
        // An OSB path with a method it does not serve: the spec's JSON
        // error body, not axum's empty 405 (axum still adds `Allow`).
        .method_not_allowed_fallback(method_not_allowed)
        .layer(DefaultBodyLimit::max(limit))
        .route_layer(middleware::from_fn_with_state(state.clone(), osb_guard));
    Router::new()
        .route("/healthz", get(healthz))
        .merge(v2)
        .fallback(not_found)
        .layer(middleware::from_fn(request_identity))
        .with_state(state)
}

// ---- middleware -------------------------------------------------------------

/// Characters of a request identity that are logged and passed on.
const MAX_LOGGED_REQUEST_ID: usize = 128;

/// Characters of a request path that are logged.
const MAX_LOGGED_PATH: usize = 512;

/// Echoes (or generates) the request identity and runs the request in a
/// span carrying it, so every log line of the request can be correlated.
async fn request_identity(req: Request, next: Next) -> Response {
    let given = req
        .headers()
        .get(&REQUEST_IDENTITY_HEADER)
        .filter(|v| !v.is_empty())
        .cloned();
    let value = given.unwrap_or_else(|| {
        HeaderValue::from_str(&uuid::Uuid::new_v4().to_string())
            .unwrap_or_else(|_| HeaderValue::from_static("unknown"))
    });
    // The id goes on every log line of the request (and of the gRPC calls it
    // causes): a GUID fits with room to spare, a 64 KiB header must not
    // flood the logs (spec.md: the broker MAY log it; the echo stays whole).
    let id: String = String::from_utf8_lossy(value.as_bytes())
        .chars()
        .take(MAX_LOGGED_REQUEST_ID)
        .collect();
    // The path, too, is whatever the client sent (up to the HTTP server's
    // 64 KiB): ids are 255 characters at most, so 512 show any real request.
    let path: String = req.uri().path().chars().take(MAX_LOGGED_PATH).collect();
    let span = tracing::info_span!("request", request_id = %id, method = %req.method(),
        path = %path);
    // gRPC calls this request causes carry its id as `x-request-id`.
    let mut response =
        svcbroker_proto::auth::with_request_id(id, next.run(req).instrument(span.clone())).await;
    span.in_scope(|| tracing::debug!(status = response.status().as_u16(), "answered"));
    response
        .headers_mut()
        .insert(REQUEST_IDENTITY_HEADER, value);
    response
}

/// Basic auth (401) then `X-Broker-API-Version` (412) on every OSB route.
async fn osb_guard(State(state): State<AppState>, req: Request, next: Next) -> Response {
    let auth = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok());
    if !check_basic_auth(auth, &state.config.username, &state.config.password) {
        return Error::Unauthorized.into_response();
    }
    let version = req
        .headers()
        .get(&API_VERSION_HEADER)
        .map(|v| v.to_str().unwrap_or("?"));
    if let Err(e) = check_api_version(version) {
        return e.into_response();
    }
    // A body announced too large is refused before any of it is read, so a
    // client cannot hold a handler by announcing a gigabyte and sending
    // nothing. (Chunked bodies are cut by the extractor's limit instead.)
    let limit = state.config.max_body_bytes;
    let announced = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok());
    if announced.is_some_and(|n| n > limit as u64) {
        return Error::PayloadTooLarge { limit }.into_response();
    }
    next.run(req).await
}

async fn healthz(State(state): State<AppState>) -> Response {
    let nodes = state.engine.registry().snapshot();
    let live = nodes.iter().filter(|(_, live)| *live).count();
    Json(json!({
        "status": "ok",
        "nodes": nodes.len(),
        "live_nodes": live,
        "services": state.engine.catalog().catalog().services().len(),
        "reconcile": state.engine.reconcile_stats(),
    }))
    .into_response()
}

async fn not_found() -> Response {
    Error::NotFound("no such endpoint".into()).into_response()
}

/// Quotes a value taken from the request in an error description: at most
/// 64 characters, control characters escaped, so that the description (and
/// the log line recording the refusal) stays one short line whatever a
/// client sends.
pub(crate) fn shown(value: &str) -> String {
    const MAX_CHARS: usize = 64;
    let mut out = String::new();
    for c in value.chars().take(MAX_CHARS) {
        if c.is_control() {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    if value.chars().nth(MAX_CHARS).is_some() {
        out.push_str("...");
    }
    out
}

async fn method_not_allowed() -> Response {
    reply(
        StatusCode::METHOD_NOT_ALLOWED,
        json!({ "description": "this endpoint does not serve this method" }),
    )
}

async fn catalog(State(state): State<AppState>) -> Response {
    // Serialized once per (re)load, not per request.
    (
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        )],
        state.engine.catalog().body(),
    )
        .into_response()
}

// ---- request parsing ----------------------------------------------------------

type Params = Result<Query<HashMap<String, String>>, QueryRejection>;

fn path_ids<T>(path: Result<Path<T>, PathRejection>) -> Result<T, Error> {
    path.map(|Path(p)| p)
        .map_err(|e| Error::BadRequest(format!("invalid path: {}", e.body_text())))
}

fn query(q: Params) -> Result<HashMap<String, String>, Error> {
    q.map(|Query(q)| q)
        .map_err(|e| Error::BadRequest(format!("invalid query string: {}", e.body_text())))
}

fn accepts_incomplete(q: &HashMap<String, String>) -> Result<bool, Error> {
    match q.get("accepts_incomplete").map(String::as_str) {
        None | Some("false") => Ok(false),
        Some("true") => Ok(true),
        Some(_) => Err(Error::BadRequest(
            "query parameter accepts_incomplete must be true or false".into(),
        )),
    }
}

fn required_query<'a>(q: &'a HashMap<String, String>, key: &str) -> Result<&'a str, Error> {
    match q.get(key).map(String::as_str) {
        Some(v) if !v.is_empty() => Ok(v),
        _ => Err(Error::BadRequest(format!(
            "missing required query parameter '{key}'"
        ))),
    }
}

fn body_object(
    body: Result<Bytes, BytesRejection>,
    limit: usize,
) -> Result<Map<String, Value>, Error> {
    let bytes = body.map_err(|e| {
        if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
            Error::PayloadTooLarge { limit }
        } else {
            Error::BadRequest(format!("cannot read request body: {}", e.body_text()))
        }
    })?;
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Err(Error::BadRequest(
            "request body must be a JSON object".into(),
        ));
    }
    match serde_json::from_slice::<Value>(&bytes) {
        Ok(Value::Object(m)) => Ok(m),
        Ok(_) => Err(Error::BadRequest(
            "request body must be a JSON object".into(),
        )),
        // serde_json's syntax errors give a position, never the content.
        Err(e) => Err(Error::BadRequest(format!(
            "request body is not valid JSON: {e}"
        ))),
    }
}

/// An optional string field: absent gives `None`; present, it must be a
/// non-empty string (the spec types these fields as strings, and an empty
/// guid names nothing), else 400.
fn opt_str(body: &Map<String, Value>, key: &str) -> Result<Option<String>, Error> {
    match body.get(key) {
        None => Ok(None),
        Some(Value::String(s)) if !s.is_empty() => Ok(Some(s.clone())),
        Some(Value::String(_)) => Err(Error::BadRequest(format!(
            "field '{key}' must be a non-empty string"
        ))),
        Some(_) => Err(Error::BadRequest(format!("field '{key}' must be a string"))),
    }
}

fn req_str(body: &Map<String, Value>, key: &str) -> Result<String, Error> {
    match opt_str(body, key)? {
        Some(s) if !s.is_empty() => Ok(s),
        Some(_) => Err(Error::BadRequest(format!(
            "field '{key}' must be a non-empty string"
        ))),
        None => Err(Error::BadRequest(format!("missing required field '{key}'"))),
    }
}

/// An object field: absent gives `None`; any other type, `null` included
/// (the spec types these fields as objects), is a 400.
fn opt_obj(body: &Map<String, Value>, key: &str) -> Result<Option<Value>, Error> {
    match body.get(key) {
        None => Ok(None),
        Some(v @ Value::Object(_)) => Ok(Some(v.clone())),
        Some(_) => Err(Error::BadRequest(format!(
            "field '{key}' must be an object"
        ))),
    }
}

/// spec.md "Bind Resource Object": `app_guid` and `route` are strings; a
/// body that breaks their types is malformed (400), not a binding that
/// records whatever was sent.
fn check_bind_resource(bind_resource: &Value) -> Result<(), Error> {
    for key in ["app_guid", "route"] {
        if bind_resource.get(key).is_some_and(|v| !v.is_string()) {
            return Err(Error::BadRequest(format!(
                "field 'bind_resource.{key}' must be a string"
            )));
        }
    }
    Ok(())
}

/// `previous_values` is informational (the broker knows the instance's
/// current values), but a body that breaks its types is malformed (spec.md
/// "400 Bad Request | MUST be returned if the request is malformed"): the
/// four ids are strings, `maintenance_info` an object.
fn check_previous_values(body: &Map<String, Value>) -> Result<(), Error> {
    let Some(Value::Object(prev)) = opt_obj(body, "previous_values")? else {
        return Ok(());
    };
    for key in ["service_id", "plan_id", "organization_id", "space_id"] {
        if prev.get(key).is_some_and(|v| !v.is_string()) {
            return Err(Error::BadRequest(format!(
                "field 'previous_values.{key}' must be a string"
            )));
        }
    }
    if prev.get("maintenance_info").is_some_and(|v| !v.is_object()) {
        return Err(Error::BadRequest(
            "field 'previous_values.maintenance_info' must be an object".into(),
        ));
    }
    Ok(())
}

/// `maintenance_info.version`, when sent.
fn maintenance_version(body: &Map<String, Value>) -> Result<Option<String>, Error> {
    let Some(mi) = opt_obj(body, "maintenance_info")? else {
        return Ok(None);
    };
    match mi.get("version") {
        Some(Value::String(v)) if !v.is_empty() => Ok(Some(v.clone())),
        _ => Err(Error::BadRequest(
            "field 'maintenance_info.version' must be a non-empty string".into(),
        )),
    }
}

fn check_maintenance(plan: &PlanDef, requested: Option<&str>) -> Result<(), Error> {
    let Some(requested) = requested else {
        return Ok(());
    };
    match &plan.maintenance_info {
        Some(mi) if mi.version == requested => Ok(()),
        Some(mi) => Err(Error::MaintenanceInfoConflict(format!(
            "maintenance_info.version {} does not match the catalog's {} for plan '{}'",
            shown(requested),
            mi.version,
            plan.name
        ))),
        None => Err(Error::MaintenanceInfoConflict(format!(
            "plan '{}' has no maintenance_info, but the request names version {}",
            plan.name,
            shown(requested)
        ))),
    }
}

fn service_and_plan<'a>(
    catalog: &'a Loaded,
    service_id: &str,
    plan_id: &str,
) -> Result<(&'a ServiceDef, &'a PlanDef), Error> {
    let svc = catalog
        .service(service_id)
        .ok_or_else(|| Error::BadRequest(format!("unknown service_id '{}'", shown(service_id))))?;
    let plan = svc.plan(plan_id).ok_or_else(|| {
        Error::BadRequest(format!(
            "plan_id '{}' is not a plan of service '{}'",
            shown(plan_id),
            svc.name
        ))
    })?;
    Ok((svc, plan))
}

/// Like [`service_and_plan`], but also finds the definition of a service or
/// plan a reload removed (for requests on what exists already).
fn existing_service_and_plan(
    catalog: &Loaded,
    service_id: &str,
    plan_id: &str,
) -> Result<(Arc<ServiceDef>, PlanDef), Error> {
    if let Some(found) = catalog.existing(service_id, plan_id) {
        return Ok(found);
    }
    service_and_plan(catalog, service_id, plan_id)?;
    Err(Error::Internal(format!(
        "plan '{}' of service '{}' not found",
        shown(plan_id),
        shown(service_id)
    )))
}

fn validate_params(plan: &PlanDef, kind: SchemaKind, params: &Value) -> Result<(), Error> {
    plan.validate_params(kind, params)
        .map_err(|e| Error::BadRequest(e.message))
}

/// Checks every template value `params` sets (parameters reach templates
/// only through the plan's variables) the way rendering will, so that a value
/// no template can take (control characters, an object where a scalar is
/// needed) is a 400 now, not an instance that fails to start or can never
/// be bound.
fn check_template_values(plan: &PlanDef, params: &Value) -> Result<(), Error> {
    let mut vars = Vars::new();
    for (name, value) in plan.vars_with(params) {
        vars.set(&name, value);
        let probe = Template::parse(&format!("{{{{{name}}}}}"))
            .map_err(|e| Error::Internal(format!("plan variable {name}: {e}")))?;
        probe
            .render(&vars)
            .map_err(|e| Error::BadRequest(format!("parameters /{name}: {e}")))?;
    }
    Ok(())
}

fn deadline_ms(state: &AppState, plan: &PlanDef) -> i64 {
    let secs = plan
        .maximum_polling_duration
        .unwrap_or(state.config.default_max_polling_duration_s);
    i64::try_from(secs.saturating_mul(1000)).unwrap_or(i64::MAX / 2)
}

fn async_required(svc: &ServiceDef, accepts: bool) -> Result<(), Error> {
    if svc.async_required && !accepts {
        return Err(Error::AsyncRequired(format!(
            "service '{}' requires client support for asynchronous service operations \
             (accepts_incomplete=true)",
            svc.name
        )));
    }
    Ok(())
}

// ---- responses ----------------------------------------------------------------

fn reply(status: StatusCode, body: Value) -> Response {
    (status, Json(body)).into_response()
}

fn accepted(op: &OperationRow) -> Response {
    reply(StatusCode::ACCEPTED, json!({ "operation": op.id }))
}

/// Waits for a synchronous request's operation; a failure becomes the
/// error answer, a timeout a 503 while the operation goes on.
async fn wait_sync(state: &AppState, op: &OperationRow) -> Result<OperationRow, Error> {
    match state
        .engine
        .wait(&op.id, state.config.sync_timeout())
        .await?
    {
        Some(done) if done.state == OpState::Succeeded => Ok(done),
        Some(done) => Err(Error::OperationFailed {
            message: done
                .description
                .clone()
                .unwrap_or_else(|| format!("{} failed", done.action)),
            instance_usable: done.instance_usable,
            update_repeatable: done.update_repeatable,
        }),
        None => Err(Error::Unavailable {
            message: format!(
                "{} is taking longer than {} ms and continues in the background (operation {})",
                op.action, state.config.sync_timeout_ms, op.id
            ),
        }),
    }
}

/// Answers a started or repeated operation: 202 for asynchronous clients,
/// otherwise waits and answers `done_status` with `{}`.
async fn answer_op(
    state: &AppState,
    op: &OperationRow,
    accepts: bool,
    done_status: StatusCode,
) -> Result<Response, Error> {
    if accepts {
        return Ok(accepted(op));
    }
    wait_sync(state, op).await?;
    Ok(reply(done_status, json!({})))
}

fn last_operation_body(op: &OperationRow) -> Value {
    let mut body = Map::new();
    body.insert("state".into(), json!(op.state.as_str()));
    if let Some(d) = op.description.as_deref().filter(|d| !d.is_empty()) {
        body.insert("description".into(), json!(d));
    }
    if op.state == OpState::Failed {
        if let Some(u) = op.instance_usable {
            body.insert("instance_usable".into(), json!(u));
        }
        if let Some(r) = op.update_repeatable {
            body.insert("update_repeatable".into(), json!(r));
        }
    }
    Value::Object(body)
}

// ---- service instances ----------------------------------------------------------

async fn provision(
    State(state): State<AppState>,
    path: Result<Path<String>, PathRejection>,
    q: Params,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, Error> {
    let instance_id = path_ids(path)?;
    validate_id("instance_id", &instance_id)?;
    let q = query(q)?;
    let accepts = accepts_incomplete(&q)?;
    let body = body_object(body, state.config.max_body_bytes)?;
    let service_id = req_str(&body, "service_id")?;
    let plan_id = req_str(&body, "plan_id")?;
    let context = opt_obj(&body, "context")?.unwrap_or_else(|| json!({}));
    let organization_guid = opt_str(&body, "organization_guid")?;
    let space_guid = opt_str(&body, "space_guid")?;
    let parameters = opt_obj(&body, "parameters")?.unwrap_or_else(|| json!({}));
    let requested_mv = maintenance_version(&body)?;
    // Only the current catalog: a service a reload removed takes no new
    // instances.
    let catalog = state.engine.catalog();
    let (svc, plan) = service_and_plan(&catalog, &service_id, &plan_id)?;
    check_maintenance(plan, requested_mv.as_deref())?;
    validate_params(plan, SchemaKind::InstanceCreate, &parameters)?;
    check_template_values(plan, &parameters)?;
    async_required(svc, accepts)?;
    // Deprecated in favour of `context`, but still REQUIRED by spec.md
    // ("organization_guid* ... MUST be a non-empty string"), and a request
    // "missing mandatory data" MUST be a 400.
    for (key, value) in [
        ("organization_guid", &organization_guid),
        ("space_guid", &space_guid),
    ] {
        if value.is_none() {
            return Err(Error::BadRequest(format!("missing required field '{key}'")));
        }
    }

    let new = NewInstance {
        id: instance_id.clone(),
        service_id: service_id.clone(),
        plan_id: plan_id.clone(),
        parameters: parameters.clone(),
        context,
        organization_guid,
        space_guid,
        maintenance_version: plan.maintenance_info.as_ref().map(|m| m.version.clone()),
        kind: svc.model.as_str().to_owned(),
        database: Some(NewInstance::generate_database_name()),
    };
    let op = NewOperation::fresh(deadline_ms(&state, plan), json!({}));
    let candidates = state.engine.registry().candidates(&svc.name);
    let created = state
        .engine
        .store()
        .create_instance(new, op, candidates)
        .await?;
    let view = match created {
        CreateInstance::Created(view) => {
            let op = view
                .last_op
                .ok_or_else(|| Error::Internal("created instance without operation".into()))?;
            tracing::info!(instance_id = %instance_id, node_id = %view.instance.node_id,
                op_id = %op.id, "provisioning");
            state.engine.spawn(op.clone());
            return answer_op(&state, &op, accepts, StatusCode::CREATED).await;
        }
        CreateInstance::NoCapacity => {
            return Err(Error::Unavailable {
                message: format!(
                    "no live node offers service '{}' with free capacity",
                    svc.name
                ),
            });
        }
        CreateInstance::Exists(view) => view,
    };
    let existing = &view.instance;
    // Identity is service, plan and parameters; context and the deprecated
    // org/space fields may legitimately differ between retries.
    let identical = existing.service_id == service_id
        && existing.plan_id == plan_id
        && existing.parameters == parameters;
    if !identical {
        return Err(Error::Conflict(format!(
            "service instance '{instance_id}' already exists with different attributes"
        )));
    }
    match existing.state {
        InstanceState::Ready | InstanceState::Updating => Ok(reply(StatusCode::OK, json!({}))),
        InstanceState::Provisioning => {
            let op = view
                .last_op
                .ok_or_else(|| Error::Internal("provisioning without operation".into()))?;
            if accepts {
                return Ok(accepted(&op));
            }
            wait_sync(&state, &op).await?;
            Ok(reply(StatusCode::OK, json!({})))
        }
        InstanceState::Failed => {
            let op = NewOperation::fresh(deadline_ms(&state, plan), json!({}));
            match state
                .engine
                .store()
                .retry_provision(&instance_id, op)
                .await?
            {
                StartOp::Started(op) => {
                    tracing::info!(instance_id = %instance_id, op_id = %op.id, "provisioning again");
                    state.engine.spawn(op.clone());
                    answer_op(&state, &op, accepts, StatusCode::CREATED).await
                }
                StartOp::Busy(Some(op))
                    if op.action == Action::Provision && op.state == OpState::InProgress =>
                {
                    answer_op(&state, &op, accepts, StatusCode::OK).await
                }
                _ => Err(Error::Concurrency(format!(
                    "another operation on service instance '{instance_id}' is in progress"
                ))),
            }
        }
        InstanceState::Deprovisioning => Err(Error::Concurrency(format!(
            "service instance '{instance_id}' is being deprovisioned"
        ))),
    }
}

async fn get_instance(
    State(state): State<AppState>,
    path: Result<Path<String>, PathRejection>,
) -> Result<Response, Error> {
    let instance_id = path_ids(path)?;
    validate_id("instance_id", &instance_id)?;
    let Some(view) = state.engine.store().get_instance(&instance_id).await? else {
        return Err(Error::NotFound(format!(
            "service instance '{instance_id}' does not exist"
        )));
    };
    let inst = view.instance;
    match inst.state {
        InstanceState::Ready => {}
        InstanceState::Provisioning => {
            return Err(Error::NotFound(format!(
                "service instance '{instance_id}' is still being provisioned"
            )));
        }
        InstanceState::Failed => {
            return Err(Error::NotFound(format!(
                "provisioning of service instance '{instance_id}' failed"
            )));
        }
        InstanceState::Updating => {
            return Err(Error::Concurrency(format!(
                "service instance '{instance_id}' is being updated"
            )));
        }
        InstanceState::Deprovisioning => {
            return Err(Error::Concurrency(format!(
                "service instance '{instance_id}' is being deprovisioned"
            )));
        }
    }
    let mut body = Map::new();
    body.insert("service_id".into(), json!(inst.service_id));
    body.insert("plan_id".into(), json!(inst.plan_id));
    body.insert("parameters".into(), inst.parameters.clone());
    if let Some(v) = &inst.maintenance_version {
        let mut mi = Map::new();
        mi.insert("version".into(), json!(v));
        if let Some(d) = state
            .engine
            .catalog()
            .existing(&inst.service_id, &inst.plan_id)
            .and_then(|(_, p)| p.maintenance_info)
            .filter(|m| &m.version == v)
            .and_then(|m| m.description)
        {
            mi.insert("description".into(), json!(d));
        }
        body.insert("maintenance_info".into(), Value::Object(mi));
    }
    body.insert(
        "metadata".into(),
        json!({ "attributes": instance_attributes(&inst) }),
    );
    Ok(reply(StatusCode::OK, Value::Object(body)))
}

/// OSB 2.17 instance metadata attributes: where the instance runs and what
/// the reconciler last saw of it there (e.g. `observed_state: failed` for a
/// daemon its node gave up on).
fn instance_attributes(inst: &InstanceRow) -> Value {
    let mut a = Map::new();
    a.insert("node_id".into(), json!(inst.node_id));
    if let Some(o) = &inst.observed {
        a.insert("observed_state".into(), json!(o.state));
        if !o.message.is_empty() {
            a.insert("observed_message".into(), json!(o.message));
        }
        a.insert("observed_at".into(), json!(rfc3339_ms(o.at)));
    }
    Value::Object(a)
}

/// Formats milliseconds since the epoch as `yyyy-mm-ddThh:mm:ss.sssZ` (UTC).
pub(crate) fn rfc3339_ms(ms: i64) -> String {
    let secs = ms.div_euclid(1000);
    let millis = ms.rem_euclid(1000);
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    // Howard Hinnant's days-to-civil algorithm.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{millis:03}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

async fn update(
    State(state): State<AppState>,
    path: Result<Path<String>, PathRejection>,
    q: Params,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, Error> {
    let instance_id = path_ids(path)?;
    validate_id("instance_id", &instance_id)?;
    let q = query(q)?;
    let accepts = accepts_incomplete(&q)?;
    let body = body_object(body, state.config.max_body_bytes)?;
    let service_id = req_str(&body, "service_id")?;
    let plan_id = opt_str(&body, "plan_id")?;
    let context = opt_obj(&body, "context")?;
    let parameters = opt_obj(&body, "parameters")?;
    let requested_mv = maintenance_version(&body)?;
    check_previous_values(&body)?;
    let catalog = state.engine.catalog();
    let svc = catalog
        .service(&service_id)
        .ok_or_else(|| Error::BadRequest(format!("unknown service_id '{}'", shown(&service_id))))?;
    if let Some(p) = &plan_id {
        svc.plan(p).ok_or_else(|| {
            Error::BadRequest(format!(
                "plan_id '{}' is not a plan of service '{}'",
                shown(p),
                svc.name
            ))
        })?;
    }
    let Some(view) = state.engine.store().get_instance(&instance_id).await? else {
        return Err(Error::NotFound(format!(
            "service instance '{instance_id}' does not exist"
        )));
    };
    let inst = &view.instance;
    if inst.service_id != service_id {
        return Err(Error::BadRequest(format!(
            "service_id '{}' is not the service of instance '{instance_id}'",
            shown(&service_id)
        )));
    }
    let current_plan = svc.plan(&inst.plan_id).ok_or_else(|| {
        Error::Unprocessable(format!(
            "the plan of service instance '{instance_id}' is no longer in the catalog"
        ))
    })?;
    let target_plan = match &plan_id {
        Some(p) => svc.plan(p).unwrap_or(current_plan),
        None => current_plan,
    };
    let plan_changes = target_plan.id != current_plan.id;
    if plan_changes && !current_plan.plan_updateable {
        return Err(Error::Unprocessable(format!(
            "plan '{}' does not support plan changes",
            current_plan.name
        )));
    }
    check_maintenance(target_plan, requested_mv.as_deref())?;
    if let Some(p) = &parameters {
        validate_params(target_plan, SchemaKind::InstanceUpdate, p)?;
    }
    async_required(svc, accepts)?;
    match inst.state {
        InstanceState::Ready | InstanceState::Updating => {}
        InstanceState::Provisioning => {
            return Err(Error::Concurrency(format!(
                "service instance '{instance_id}' is still being provisioned"
            )));
        }
        InstanceState::Deprovisioning => {
            return Err(Error::Concurrency(format!(
                "service instance '{instance_id}' is being deprovisioned"
            )));
        }
        InstanceState::Failed => {
            return Err(Error::Unprocessable(format!(
                "provisioning of service instance '{instance_id}' failed; delete it"
            )));
        }
    }
    // Sent parameters are applied over the current ones: the spec leaves the
    // meaning of absent keys to the broker, and keeping them is what a
    // platform sending only the user's changes expects.
    let mut merged = inst.parameters.clone();
    if let (Some(Value::Object(new)), Some(m)) = (&parameters, merged.as_object_mut()) {
        for (k, v) in new {
            m.insert(k.clone(), v.clone());
        }
    }
    check_template_values(target_plan, &merged)?;
    let target_mv = target_plan
        .maintenance_info
        .as_ref()
        .map(|m| m.version.clone());
    let changes = plan_changes
        || merged != inst.parameters
        || (requested_mv.is_some() && target_mv != inst.maintenance_version);
    let target = json!({
        "plan_id": target_plan.id,
        "parameters": merged,
        "maintenance_version": target_mv,
        "context": context.clone().unwrap_or(Value::Null),
    });
    if let Some(active) = view
        .last_op
        .as_ref()
        .filter(|o| o.state == OpState::InProgress)
    {
        let same = active.action == Action::Update
            && active.target.get("plan_id") == target.get("plan_id")
            && active.target.get("parameters") == target.get("parameters");
        if same {
            return answer_op(&state, active, accepts, StatusCode::OK).await;
        }
        return Err(Error::Concurrency(format!(
            "another operation on service instance '{instance_id}' is in progress"
        )));
    }
    if !changes {
        if let Some(c) = context {
            state.engine.store().set_context(&instance_id, c).await?;
        }
        return Ok(reply(StatusCode::OK, json!({})));
    }
    let op = NewOperation::fresh(deadline_ms(&state, target_plan), target);
    match state
        .engine
        .store()
        .start_instance_op(&instance_id, Action::Update, op)
        .await?
    {
        StartOp::Started(op) => {
            tracing::info!(instance_id = %instance_id, op_id = %op.id, "updating");
            state.engine.spawn(op.clone());
            answer_op(&state, &op, accepts, StatusCode::OK).await
        }
        StartOp::Missing => Err(Error::NotFound(format!(
            "service instance '{instance_id}' does not exist"
        ))),
        StartOp::Busy(_) => Err(Error::Concurrency(format!(
            "another operation on service instance '{instance_id}' is in progress"
        ))),
    }
}

async fn deprovision(
    State(state): State<AppState>,
    path: Result<Path<String>, PathRejection>,
    q: Params,
) -> Result<Response, Error> {
    let instance_id = path_ids(path)?;
    validate_id("instance_id", &instance_id)?;
    let q = query(q)?;
    let service_id = required_query(&q, "service_id")?;
    let plan_id = required_query(&q, "plan_id")?;
    let accepts = accepts_incomplete(&q)?;
    let catalog = state.engine.catalog();
    let view = state.engine.store().get_instance(&instance_id).await?;
    // A service or plan a reload removed still names its instances: they
    // can be deleted with the definition they were made from, or (after a
    // restart) with what their record says.
    let def = catalog.existing(service_id, plan_id);
    if def.is_none() {
        if let Some(svc) = catalog.service(service_id) {
            return Err(Error::BadRequest(format!(
                "plan_id '{}' is not a plan of service '{}'",
                shown(plan_id),
                svc.name
            )));
        }
        if view
            .as_ref()
            .is_none_or(|v| v.instance.service_id != service_id)
        {
            return Err(Error::BadRequest(format!(
                "unknown service_id '{}'",
                shown(service_id)
            )));
        }
    }
    let Some(view) = view else {
        return Err(Error::Gone(format!(
            "service instance '{instance_id}' does not exist"
        )));
    };
    if view.instance.service_id != service_id {
        return Err(Error::BadRequest(format!(
            "service_id '{}' is not the service of instance '{instance_id}'",
            shown(service_id)
        )));
    }
    if let Some((svc, _)) = &def {
        async_required(svc, accepts)?;
    }
    if let Some(active) = view
        .last_op
        .as_ref()
        .filter(|o| o.state == OpState::InProgress)
    {
        match active.action {
            Action::Deprovision => return answer_op(&state, active, accepts, StatusCode::OK).await,
            // Halted by the deprovision (spec: "the net effect of halting
            // the current creation process").
            Action::Provision => {}
            _ => {
                return Err(Error::Concurrency(format!(
                    "another operation ({}) on service instance '{instance_id}' is in progress",
                    active.action
                )));
            }
        }
    }
    let deadline = def.as_ref().map_or_else(
        || {
            i64::try_from(state.config.default_max_polling_duration_s * 1000)
                .unwrap_or(i64::MAX / 2)
        },
        |(_, p)| deadline_ms(&state, p),
    );
    let op = NewOperation::fresh(deadline, json!({}));
    match state
        .engine
        .store()
        .start_instance_op(&instance_id, Action::Deprovision, op)
        .await?
    {
        StartOp::Started(op) => {
            tracing::info!(instance_id = %instance_id, op_id = %op.id, "deprovisioning");
            state.engine.spawn(op.clone());
            answer_op(&state, &op, accepts, StatusCode::OK).await
        }
        StartOp::Missing => Err(Error::Gone(format!(
            "service instance '{instance_id}' does not exist"
        ))),
        StartOp::Busy(Some(op)) if op.action == Action::Deprovision => {
            answer_op(&state, &op, accepts, StatusCode::OK).await
        }
        StartOp::Busy(_) => Err(Error::Concurrency(format!(
            "another operation on service instance '{instance_id}' is in progress"
        ))),
    }
}

async fn instance_last_operation(
    State(state): State<AppState>,
    path: Result<Path<String>, PathRejection>,
    q: Params,
) -> Result<Response, Error> {
    let instance_id = path_ids(path)?;
    validate_id("instance_id", &instance_id)?;
    let q = query(q)?;
    let store = state.engine.store();
    let named = match q.get("operation").filter(|o| !o.is_empty()) {
        Some(id) => store
            .get_operation(id)
            .await?
            .filter(|o| o.instance_id == instance_id && o.binding_id.is_none()),
        None => None,
    };
    let op = match named {
        Some(op) => op,
        None => store.last_instance_op(&instance_id).await?.ok_or_else(|| {
            Error::NotFound(format!("service instance '{instance_id}' does not exist"))
        })?,
    };
    if op.action == Action::Deprovision && op.state == OpState::Succeeded {
        return Err(Error::Gone(format!(
            "service instance '{instance_id}' was deprovisioned"
        )));
    }
    Ok(reply(StatusCode::OK, last_operation_body(&op)))
}

// ---- service bindings ---------------------------------------------------------------

async fn bind(
    State(state): State<AppState>,
    path: Result<Path<(String, String)>, PathRejection>,
    q: Params,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, Error> {
    let (instance_id, binding_id) = path_ids(path)?;
    validate_id("instance_id", &instance_id)?;
    validate_id("binding_id", &binding_id)?;
    let q = query(q)?;
    let accepts = accepts_incomplete(&q)?;
    let body = body_object(body, state.config.max_body_bytes)?;
    let service_id = req_str(&body, "service_id")?;
    let plan_id = req_str(&body, "plan_id")?;
    let context = opt_obj(&body, "context")?.unwrap_or_else(|| json!({}));
    let parameters = opt_obj(&body, "parameters")?.unwrap_or_else(|| json!({}));
    let app_guid = opt_str(&body, "app_guid")?;
    let mut bind_resource = opt_obj(&body, "bind_resource")?.unwrap_or_else(|| json!({}));
    check_bind_resource(&bind_resource)?;
    if opt_str(&body, "predecessor_binding_id")?.is_some() {
        return Err(Error::BadRequest(
            "binding rotation (predecessor_binding_id) is not supported by this broker".into(),
        ));
    }
    let catalog = state.engine.catalog();
    let (svc, plan) = existing_service_and_plan(&catalog, &service_id, &plan_id)?;
    let plan = &plan;
    if !plan.bindable {
        return Err(Error::BadRequest(format!(
            "plan '{}' of service '{}' is not bindable",
            plan.name, svc.name
        )));
    }
    validate_params(plan, SchemaKind::BindingCreate, &parameters)?;
    // The deprecated top-level app_guid and bind_resource.app_guid mean the
    // same; keep one place for identity comparisons.
    if let (Some(g), Some(m)) = (app_guid, bind_resource.as_object_mut()) {
        m.entry("app_guid").or_insert(json!(g));
    }
    if let Some(view) = state.engine.store().get_instance(&instance_id).await?
        && (view.instance.service_id != service_id || view.instance.plan_id != plan_id)
    {
        return Err(Error::BadRequest(format!(
            "service_id and plan_id must be those of service instance '{instance_id}'"
        )));
    }
    let new = NewBinding {
        id: binding_id.clone(),
        instance_id: instance_id.clone(),
        service_id: service_id.clone(),
        plan_id: plan_id.clone(),
        parameters: parameters.clone(),
        context,
        bind_resource: bind_resource.clone(),
    };
    let op = NewOperation::fresh(deadline_ms(&state, plan), json!({}));
    let existing = match state.engine.store().create_binding(new, op).await? {
        CreateBinding::Created(view) => {
            let op = view
                .last_op
                .ok_or_else(|| Error::Internal("created binding without operation".into()))?;
            tracing::info!(instance_id = %instance_id, binding_id = %binding_id, op_id = %op.id,
                "binding");
            state.engine.spawn(op.clone());
            return answer_bind(
                &state,
                &instance_id,
                &binding_id,
                &op,
                accepts,
                StatusCode::CREATED,
            )
            .await;
        }
        CreateBinding::InstanceMissing => {
            return Err(Error::NotFound(format!(
                "service instance '{instance_id}' does not exist"
            )));
        }
        CreateBinding::InstanceBusy(view) => {
            return Err(match view.instance.state {
                InstanceState::Failed => Error::Unprocessable(format!(
                    "provisioning of service instance '{instance_id}' failed"
                )),
                s => Error::Concurrency(format!(
                    "service instance '{instance_id}' is not ready (state {s})"
                )),
            });
        }
        CreateBinding::Exists(view) => view,
    };
    let b = &existing.binding;
    let identical = b.instance_id == instance_id
        && b.service_id == service_id
        && b.plan_id == plan_id
        && b.parameters == parameters
        && b.bind_resource == bind_resource;
    if !identical {
        return Err(Error::Conflict(format!(
            "service binding '{binding_id}' already exists with different attributes"
        )));
    }
    match b.state {
        BindingState::Ready => {
            let answer = answer_of(&state, &instance_id, &binding_id).await?;
            Ok(reply(StatusCode::OK, binding_body(answer, None)))
        }
        BindingState::Binding => {
            let op = existing
                .last_op
                .ok_or_else(|| Error::Internal("binding without operation".into()))?;
            answer_bind(
                &state,
                &instance_id,
                &binding_id,
                &op,
                accepts,
                StatusCode::OK,
            )
            .await
        }
        BindingState::Failed => {
            let op = NewOperation::fresh(deadline_ms(&state, plan), json!({}));
            match state.engine.store().retry_bind(&binding_id, op).await? {
                StartOp::Started(op) => {
                    state.engine.spawn(op.clone());
                    answer_bind(
                        &state,
                        &instance_id,
                        &binding_id,
                        &op,
                        accepts,
                        StatusCode::CREATED,
                    )
                    .await
                }
                _ => Err(Error::Concurrency(format!(
                    "service binding '{binding_id}' cannot be retried now"
                ))),
            }
        }
        BindingState::Unbinding => Err(Error::Concurrency(format!(
            "service binding '{binding_id}' is being deleted"
        ))),
    }
}

async fn answer_bind(
    state: &AppState,
    instance_id: &str,
    binding_id: &str,
    op: &OperationRow,
    accepts: bool,
    done_status: StatusCode,
) -> Result<Response, Error> {
    if accepts {
        return Ok(accepted(op));
    }
    wait_sync(state, op).await?;
    let answer = answer_of(state, instance_id, binding_id).await?;
    Ok(reply(done_status, binding_body(answer, None)))
}

/// The body of a binding answer: `credentials`, `volume_mounts` when the
/// service has them, and (for a fetch) `parameters`.
fn binding_body(answer: BindingAnswer, parameters: Option<Value>) -> Value {
    let mut body = Map::new();
    body.insert("credentials".into(), Value::Object(answer.credentials));
    if let Some(v) = answer.volume_mounts {
        body.insert("volume_mounts".into(), json!(v));
    }
    if let Some(p) = parameters {
        body.insert("parameters".into(), p);
    }
    Value::Object(body)
}

async fn answer_of(
    state: &AppState,
    instance_id: &str,
    binding_id: &str,
) -> Result<BindingAnswer, Error> {
    let store = state.engine.store();
    let inst = store
        .get_instance(instance_id)
        .await?
        .ok_or_else(|| Error::NotFound(format!("service instance '{instance_id}' does not exist")))?
        .instance;
    let binding = store
        .get_binding(binding_id)
        .await?
        .ok_or_else(|| Error::NotFound(format!("service binding '{binding_id}' does not exist")))?
        .binding;
    state.engine.binding_answer(&inst, &binding).await
}

async fn get_binding(
    State(state): State<AppState>,
    path: Result<Path<(String, String)>, PathRejection>,
) -> Result<Response, Error> {
    let (instance_id, binding_id) = path_ids(path)?;
    validate_id("instance_id", &instance_id)?;
    validate_id("binding_id", &binding_id)?;
    let view = state
        .engine
        .store()
        .get_binding(&binding_id)
        .await?
        .filter(|v| v.binding.instance_id == instance_id)
        .ok_or_else(|| Error::NotFound(format!("service binding '{binding_id}' does not exist")))?;
    match view.binding.state {
        BindingState::Ready => {}
        BindingState::Binding => {
            return Err(Error::NotFound(format!(
                "service binding '{binding_id}' is still being created"
            )));
        }
        BindingState::Failed => {
            return Err(Error::NotFound(format!(
                "creating service binding '{binding_id}' failed"
            )));
        }
        BindingState::Unbinding => {
            return Err(Error::NotFound(format!(
                "service binding '{binding_id}' is being deleted"
            )));
        }
    }
    let answer = answer_of(&state, &instance_id, &binding_id).await?;
    Ok(reply(
        StatusCode::OK,
        binding_body(answer, Some(view.binding.parameters)),
    ))
}

async fn unbind(
    State(state): State<AppState>,
    path: Result<Path<(String, String)>, PathRejection>,
    q: Params,
) -> Result<Response, Error> {
    let (instance_id, binding_id) = path_ids(path)?;
    validate_id("instance_id", &instance_id)?;
    validate_id("binding_id", &binding_id)?;
    let q = query(q)?;
    let service_id = required_query(&q, "service_id")?;
    let plan_id = required_query(&q, "plan_id")?;
    let accepts = accepts_incomplete(&q)?;
    let catalog = state.engine.catalog();
    let gone = || Error::Gone(format!("service binding '{binding_id}' does not exist"));
    let view = state
        .engine
        .store()
        .get_binding(&binding_id)
        .await?
        .filter(|v| v.binding.instance_id == instance_id);
    // A binding of a service a reload removed can still be deleted.
    let plan = match existing_service_and_plan(&catalog, service_id, plan_id) {
        Ok((_, plan)) => Some(plan),
        Err(_)
            if catalog.service(service_id).is_none()
                && view
                    .as_ref()
                    .is_some_and(|v| v.binding.service_id == service_id) =>
        {
            None
        }
        Err(e) => return Err(e),
    };
    let view = view.ok_or_else(gone)?;
    if view.binding.service_id != service_id {
        return Err(Error::BadRequest(format!(
            "service_id '{}' is not the service of binding '{binding_id}'",
            shown(service_id)
        )));
    }
    if let Some(active) = view
        .last_op
        .as_ref()
        .filter(|o| o.state == OpState::InProgress)
    {
        if active.action == Action::Unbind {
            return answer_op(&state, active, accepts, StatusCode::OK).await;
        }
        return Err(Error::Concurrency(format!(
            "service binding '{binding_id}' is still being created"
        )));
    }
    let deadline = plan.as_ref().map_or_else(
        || {
            i64::try_from(state.config.default_max_polling_duration_s * 1000)
                .unwrap_or(i64::MAX / 2)
        },
        |p| deadline_ms(&state, p),
    );
    let op = NewOperation::fresh(deadline, json!({}));
    match state
        .engine
        .store()
        .start_unbind(&instance_id, &binding_id, op)
        .await?
    {
        StartOp::Started(op) => {
            tracing::info!(instance_id = %instance_id, binding_id = %binding_id, op_id = %op.id,
                "unbinding");
            state.engine.spawn(op.clone());
            answer_op(&state, &op, accepts, StatusCode::OK).await
        }
        StartOp::Missing => Err(gone()),
        StartOp::Busy(Some(op))
            if op.action == Action::Unbind && op.binding_id.as_deref() == Some(&binding_id) =>
        {
            answer_op(&state, &op, accepts, StatusCode::OK).await
        }
        StartOp::Busy(_) => Err(Error::Concurrency(format!(
            "another operation on service instance '{instance_id}' is in progress"
        ))),
    }
}

async fn binding_last_operation(
    State(state): State<AppState>,
    path: Result<Path<(String, String)>, PathRejection>,
    q: Params,
) -> Result<Response, Error> {
    let (instance_id, binding_id) = path_ids(path)?;
    validate_id("instance_id", &instance_id)?;
    validate_id("binding_id", &binding_id)?;
    let q = query(q)?;
    let store = state.engine.store();
    let belongs = |o: &OperationRow| {
        o.instance_id == instance_id && o.binding_id.as_deref() == Some(binding_id.as_str())
    };
    let named = match q.get("operation").filter(|o| !o.is_empty()) {
        Some(id) => store.get_operation(id).await?.filter(|o| belongs(o)),
        None => None,
    };
    let op = match named {
        Some(op) => op,
        None => store
            .last_binding_op(&binding_id)
            .await?
            .filter(|o| belongs(o))
            .ok_or_else(|| {
                Error::NotFound(format!("service binding '{binding_id}' does not exist"))
            })?,
    };
    if op.action == Action::Unbind && op.state == OpState::Succeeded {
        return Err(Error::Gone(format!(
            "service binding '{binding_id}' was deleted"
        )));
    }
    Ok(reply(StatusCode::OK, last_operation_body(&op)))
}

/// Returns how long a graceful HTTP shutdown may take before in-flight
/// requests are dropped.
pub fn shutdown_grace() -> Duration {
    Duration::from_secs(10)
}
