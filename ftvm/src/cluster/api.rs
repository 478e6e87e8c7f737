//! The coordinator's HTTPS API (axum over hyper and rustls): the only way into the
//! coordinator. Every route but `/metrics` is under `/api/v1`:
//!
//! | route | who | what |
//! |---|---|---|
//! | `GET /metrics` (not under `/api/v1`) | read-only | Prometheus metrics ([`super::metrics`]) |
//! | `GET /ca` | anyone | the cluster CA certificate (PEM), for pinning by fingerprint |
//! | `GET /openapi.json` | anyone | this API's OpenAPI 3 document (committed as `docs/openapi.json`) |
//! | `GET /status[?vm=NAME]` | read-only | cluster or VM status |
//! | `GET /vms` | read-only | VMs and their states |
//! | `POST /vms` | operator | define a VM |
//! | `POST /vms/{name}/start`, `/stop` | operator | power a VM on / off |
//! | `POST /vms/{name}/ft` | operator | an FT operation (`"on"`, `"test-failover"`, …) |
//! | `GET /events[?vm=&host=&since=MS&after=SEQ&limit=N]` | read-only | the cluster's history |
//! | `GET /tokens`, `POST /tokens`, `DELETE /tokens/{name}` | admin | API tokens |
//! | `POST /join-tokens` | admin | a one-time token for a new host |
//! | `DELETE /hosts/{name}/identity` | admin | forget a host's certificate |
//! | `POST /hosts/{name}/join` | join token | a host certificate for a signing request |
//! | `POST /hosts/{name}/heartbeat` | host certificate of `name` | report, get assignments |
//!
//! Operators authenticate with `Authorization: Bearer NAME.SECRET`; hosts with their
//! certificate (mutual TLS), which must name the host of the path and be the one the cluster
//! issued it. A plaintext connection fails the TLS handshake: there is no plaintext port.
//! Every mutating call is recorded as an event (who, what, when, outcome).
use super::coordinator::Coord;
use super::pki;
use super::proto::{FtAction, ProcReport, Reply, Request};
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use axum::{Extension, Json, Router};
use coordinator::auth::{AuthError, Role};
use coordinator::events::{Event, Filter, Severity};
use serde::{Deserialize, Serialize};
use std::sync::Arc;

/// Who is calling.
#[derive(Debug, Clone)]
pub enum Caller {
    /// An operator's token: (name, role).
    Token(String, Role),
    /// A host, by its certificate.
    Host(String),
}

impl Caller {
    fn name(&self) -> String {
        match self {
            Caller::Token(n, r) => format!("token {n} ({})", r.name()),
            Caller::Host(h) => format!("host {h}"),
        }
    }

    /// As events name it: the token's name, or `host:NAME`.
    fn actor(&self) -> String {
        match self {
            Caller::Token(n, _) => n.clone(),
            Caller::Host(h) => format!("host:{h}"),
        }
    }
}

/// The TLS peer of one connection: its (CA-verified) client certificate, if it sent one.
#[derive(Clone, Default)]
pub struct Peer {
    pub cert: Option<Vec<u8>>,
}

/// An error reply: a status and `{"error": "..."}`.
pub struct ApiErr(StatusCode, String);

impl std::fmt::Display for ApiErr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.1)
    }
}

impl IntoResponse for ApiErr {
    fn into_response(self) -> Response {
        (self.0, Json(serde_json::json!({ "error": self.1 }))).into_response()
    }
}

impl From<AuthError> for ApiErr {
    fn from(e: AuthError) -> Self {
        let code = match e {
            AuthError::Unauthenticated(_) => StatusCode::UNAUTHORIZED,
            AuthError::Forbidden(_) => StatusCode::FORBIDDEN,
            AuthError::BadRequest(_) => StatusCode::BAD_REQUEST,
            AuthError::Conflict(_) => StatusCode::CONFLICT,
        };
        ApiErr(code, e.to_string())
    }
}

impl From<anyhow::Error> for ApiErr {
    fn from(e: anyhow::Error) -> Self {
        ApiErr(StatusCode::INTERNAL_SERVER_ERROR, format!("{e:#}"))
    }
}

type ApiResult = Result<Response, ApiErr>;

/// The `Authorization: Bearer` credential of a request, if any.
fn bearer(headers: &HeaderMap) -> Option<&str> {
    headers
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
}

/// The operator a bearer token names, if its role allows `needed`.
fn operator(c: &Coord, headers: &HeaderMap, needed: Role) -> Result<Caller, ApiErr> {
    let bearer = bearer(headers).ok_or_else(|| {
        ApiErr(
            StatusCode::UNAUTHORIZED,
            "this call needs an API token (Authorization: Bearer NAME.SECRET)".into(),
        )
    })?;
    let t = c.authenticate(bearer)?;
    if !t.1.allows(needed) {
        return Err(ApiErr(
            StatusCode::FORBIDDEN,
            format!(
                "token {:?} has role {}; this call needs {}",
                t.0,
                t.1.name(),
                needed.name()
            ),
        ));
    }
    Ok(Caller::Token(t.0, t.1))
}

/// Runs an internal request on a blocking thread; an error reply becomes 400 (or 404/409
/// where the text says so).
async fn run(c: Arc<Coord>, who: Caller, what: String, req: Request) -> ApiResult {
    let mutating = !matches!(req, Request::Status { .. } | Request::VmList);
    let vm = match &req {
        Request::VmCreate { name, .. }
        | Request::VmStart { name }
        | Request::VmStop { name }
        | Request::Ft { name, .. } => Some(name.clone()),
        _ => None,
    };
    let c2 = c.clone();
    let reply = tokio::task::spawn_blocking(move || c2.handle(req))
        .await
        .map_err(|e| ApiErr(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?;
    let reply = match reply {
        Ok(r) => r,
        Err(e) => Reply::Error {
            text: format!("{e:#}"),
        },
    };
    if mutating {
        let outcome = match &reply {
            Reply::Error { text } => Err(text),
            _ => Ok(()),
        };
        let about = vm.as_deref().map_or(About::Cluster, About::Vm);
        audit(&c, &who, &what, about, &outcome);
    }
    match reply {
        Reply::Error { text } => Err(ApiErr(StatusCode::BAD_REQUEST, text)),
        r => Ok(Json(r).into_response()),
    }
}

#[derive(Deserialize)]
struct StatusQuery {
    vm: Option<String>,
}

#[utoipa::path(get, path = "/api/v1/status", tag = "cluster", security(("token" = [])),
    params(("vm" = Option<String>, Query, description = "one VM only")),
    responses((status = 200, description = "cluster (or one VM's) status: `json` typed, `text` for people", body = Reply), (status = 401, description = "no or unknown token", body = ErrorBody), (status = 403, description = "the token's role does not allow this", body = ErrorBody)))]
async fn status(
    State(c): State<Arc<Coord>>,
    h: HeaderMap,
    Query(q): Query<StatusQuery>,
) -> ApiResult {
    let who = operator(&c, &h, Role::ReadOnly)?;
    run(c, who, "status".into(), Request::Status { name: q.vm }).await
}

#[utoipa::path(get, path = "/api/v1/vms", tag = "vms", security(("token" = [])),
    responses((status = 200, description = "every VM's definition and state", body = Reply), (status = 401, description = "no or unknown token", body = ErrorBody), (status = 403, description = "the token's role does not allow this", body = ErrorBody)))]
async fn vms(State(c): State<Arc<Coord>>, h: HeaderMap) -> ApiResult {
    let who = operator(&c, &h, Role::ReadOnly)?;
    run(c, who, "vm list".into(), Request::VmList).await
}

#[utoipa::path(post, path = "/api/v1/vms", tag = "vms", security(("token" = [])),
    request_body(content = Request, description = "a `vm-create` request"),
    responses((status = 200, body = Reply), (status = 400, description = "bad definition or a limit", body = ErrorBody), (status = 401, description = "no or unknown token", body = ErrorBody), (status = 403, description = "the token's role does not allow this", body = ErrorBody)))]
async fn vm_create(
    State(c): State<Arc<Coord>>,
    h: HeaderMap,
    Json(req): Json<Request>,
) -> ApiResult {
    let who = operator(&c, &h, Role::Operator)?;
    let Request::VmCreate { name, .. } = &req else {
        return Err(ApiErr(
            StatusCode::BAD_REQUEST,
            "POST /vms takes a vm-create request".into(),
        ));
    };
    let what = format!("vm create {name}");
    run(c, who, what, req).await
}

#[utoipa::path(post, path = "/api/v1/vms/{name}/start", tag = "vms", security(("token" = [])),
    params(("name" = String, Path, description = "the VM")),
    responses((status = 200, body = Reply), (status = 400, body = ErrorBody), (status = 401, description = "no or unknown token", body = ErrorBody), (status = 403, description = "the token's role does not allow this", body = ErrorBody)))]
async fn vm_start(
    State(c): State<Arc<Coord>>,
    h: HeaderMap,
    Path(name): Path<String>,
) -> ApiResult {
    let who = operator(&c, &h, Role::Operator)?;
    run(
        c,
        who,
        format!("vm start {name}"),
        Request::VmStart { name },
    )
    .await
}

#[utoipa::path(post, path = "/api/v1/vms/{name}/stop", tag = "vms", security(("token" = [])),
    params(("name" = String, Path, description = "the VM")),
    responses((status = 200, body = Reply), (status = 400, body = ErrorBody), (status = 401, description = "no or unknown token", body = ErrorBody), (status = 403, description = "the token's role does not allow this", body = ErrorBody)))]
async fn vm_stop(State(c): State<Arc<Coord>>, h: HeaderMap, Path(name): Path<String>) -> ApiResult {
    let who = operator(&c, &h, Role::Operator)?;
    run(c, who, format!("vm stop {name}"), Request::VmStop { name }).await
}

#[utoipa::path(post, path = "/api/v1/vms/{name}/ft", tag = "ft", security(("token" = [])),
    params(("name" = String, Path, description = "the VM")),
    request_body(content = FtAction, description = "the vSphere FT operation"),
    responses((status = 200, body = Reply), (status = 400, body = ErrorBody), (status = 401, description = "no or unknown token", body = ErrorBody), (status = 403, description = "the token's role does not allow this", body = ErrorBody)))]
async fn vm_ft(
    State(c): State<Arc<Coord>>,
    h: HeaderMap,
    Path(name): Path<String>,
    Json(action): Json<FtAction>,
) -> ApiResult {
    let who = operator(&c, &h, Role::Operator)?;
    let what = match &action {
        FtAction::MigrateSecondary { to } => format!("ft migrate-secondary {name} to {to}"),
        a => format!("ft {} {name}", a.word()),
    };
    run(c, who, what, Request::Ft { name, action }).await
}

/// An API token as listed (never its secret).
#[derive(Serialize, Deserialize, utoipa::ToSchema)]
pub struct TokenInfo {
    pub name: String,
    pub role: Role,
    pub created_ms: u64,
    pub created_by: String,
    pub revoked_ms: Option<u64>,
}

#[utoipa::path(get, path = "/api/v1/tokens", tag = "access", security(("token" = [])),
    responses((status = 200, description = "API tokens (never their secrets)", body = Vec<TokenInfo>), (status = 401, description = "no or unknown token", body = ErrorBody), (status = 403, description = "the token's role does not allow this", body = ErrorBody)))]
async fn tokens(State(c): State<Arc<Coord>>, h: HeaderMap) -> ApiResult {
    operator(&c, &h, Role::Admin)?;
    let list: Vec<TokenInfo> = c
        .security()
        .tokens
        .values()
        .map(|t| TokenInfo {
            name: t.name.clone(),
            role: t.role,
            created_ms: t.created_ms,
            created_by: t.created_by.clone(),
            revoked_ms: t.revoked_ms,
        })
        .collect();
    Ok(Json(list).into_response())
}

#[derive(Serialize, Deserialize, utoipa::ToSchema)]
pub struct NewToken {
    pub name: String,
    pub role: Role,
}

/// A secret, shown once.
#[derive(Serialize, Deserialize, utoipa::ToSchema)]
pub struct Secret {
    pub token: String,
    /// For join tokens: the fingerprint of the cluster CA a new host pins.
    #[serde(default)]
    pub ca_sha256: Option<String>,
}

/// Every mutating call becomes an event (who, what, when, and whether it was done): kind
/// `api.<first two words of what>`, about the VM or host named by `about`.
fn audit<T, E: std::fmt::Display>(
    c: &Coord,
    who: &Caller,
    what: &str,
    about: About,
    outcome: &Result<T, E>,
) {
    let (severity, message) = match outcome {
        Ok(_) => (Severity::Info, format!("{what}: done")),
        Err(e) => (Severity::Warning, format!("{what}: refused: {e}")),
    };
    let kind = format!(
        "api.{}",
        what.split_whitespace()
            .take(2)
            .collect::<Vec<_>>()
            .join("-")
    );
    let mut e = Event::new(severity, &kind, message)
        .actor(&who.actor())
        .details(serde_json::json!({ "caller": who.name() }));
    match about {
        About::Vm(v) => e = e.vm(v),
        About::Host(h) => e = e.host(h),
        About::Cluster => {}
    }
    // The store write blocks (etcd runs its own runtime): off this async worker.
    tokio::task::block_in_place(|| c.event(e));
}

/// What an audited call is about.
enum About<'a> {
    Vm(&'a str),
    Host(&'a str),
    Cluster,
}

#[utoipa::path(post, path = "/api/v1/tokens", tag = "access", security(("token" = [])),
    request_body = NewToken,
    responses((status = 201, description = "the new token, shown only now", body = Secret), (status = 400, body = ErrorBody), (status = 409, description = "the name is taken", body = ErrorBody), (status = 401, description = "no or unknown token", body = ErrorBody), (status = 403, description = "the token's role does not allow this", body = ErrorBody)))]
async fn token_create(
    State(c): State<Arc<Coord>>,
    h: HeaderMap,
    Json(t): Json<NewToken>,
) -> ApiResult {
    let who = operator(&c, &h, Role::Admin)?;
    let by = who.name();
    let r = c.secure(|s| s.create_token(&t.name, t.role, &by, super::now_ms()));
    audit(
        &c,
        &who,
        &format!("token create {} ({})", t.name, t.role.name()),
        About::Cluster,
        &r,
    );
    let token = r?;
    Ok((
        StatusCode::CREATED,
        Json(Secret {
            token,
            ca_sha256: None,
        }),
    )
        .into_response())
}

#[utoipa::path(delete, path = "/api/v1/tokens/{name}", tag = "access", security(("token" = [])),
    params(("name" = String, Path, description = "the token's name")),
    responses((status = 200, body = TextBody), (status = 400, body = ErrorBody), (status = 401, description = "no or unknown token", body = ErrorBody), (status = 403, description = "the token's role does not allow this", body = ErrorBody)))]
async fn token_revoke(
    State(c): State<Arc<Coord>>,
    h: HeaderMap,
    Path(name): Path<String>,
) -> ApiResult {
    let who = operator(&c, &h, Role::Admin)?;
    let r = c.secure(|s| s.revoke_token(&name, super::now_ms()));
    audit(
        &c,
        &who,
        &format!("token revoke {name}"),
        About::Cluster,
        &r,
    );
    r?;
    Ok(Json(serde_json::json!({ "text": format!("revoked token {name}") })).into_response())
}

#[derive(Serialize, Deserialize, utoipa::ToSchema)]
pub struct NewJoin {
    /// How long the token stays good, in seconds.
    pub ttl_s: u64,
}

#[utoipa::path(post, path = "/api/v1/join-tokens", tag = "access", security(("token" = [])),
    request_body = NewJoin,
    responses((status = 201, description = "a one-time join token and the CA fingerprint to pin", body = Secret), (status = 400, body = ErrorBody), (status = 401, description = "no or unknown token", body = ErrorBody), (status = 403, description = "the token's role does not allow this", body = ErrorBody)))]
async fn join_token(
    State(c): State<Arc<Coord>>,
    h: HeaderMap,
    Json(j): Json<NewJoin>,
) -> ApiResult {
    let who = operator(&c, &h, Role::Admin)?;
    if j.ttl_s == 0 || j.ttl_s > 7 * 86_400 {
        return Err(ApiErr(
            StatusCode::BAD_REQUEST,
            "a join token's lifetime is 1 s to 7 days".into(),
        ));
    }
    let by = who.name();
    let r = c.secure(|s| Ok(s.create_join(&by, j.ttl_s * 1000, super::now_ms())));
    audit(&c, &who, "join-token create", About::Cluster, &r);
    let token = r?;
    Ok((
        StatusCode::CREATED,
        Json(Secret {
            token,
            ca_sha256: Some(pki::fingerprint(&c.ca().der)),
        }),
    )
        .into_response())
}

#[utoipa::path(delete, path = "/api/v1/hosts/{name}/identity", tag = "hosts", security(("token" = [])),
    params(("name" = String, Path, description = "the host")),
    responses((status = 200, body = TextBody), (status = 400, body = ErrorBody), (status = 401, description = "no or unknown token", body = ErrorBody), (status = 403, description = "the token's role does not allow this", body = ErrorBody)))]
async fn host_forget(
    State(c): State<Arc<Coord>>,
    h: HeaderMap,
    Path(name): Path<String>,
) -> ApiResult {
    let who = operator(&c, &h, Role::Admin)?;
    let r = c.secure(|s| s.forget_host(&name));
    audit(
        &c,
        &who,
        &format!("host forget {name}"),
        About::Host(&name),
        &r,
    );
    r?;
    Ok(Json(serde_json::json!({
        "text": format!("forgot host {name}: its certificate is no longer accepted")
    }))
    .into_response())
}

#[derive(Serialize, Deserialize, utoipa::ToSchema)]
pub struct JoinRequest {
    pub csr_pem: String,
}

#[derive(Serialize, Deserialize, utoipa::ToSchema)]
pub struct Joined {
    pub cert_pem: String,
    pub ca_pem: String,
}

#[utoipa::path(post, path = "/api/v1/hosts/{name}/join", tag = "hosts", security(("join_token" = [])),
    params(("name" = String, Path, description = "the joining host")),
    request_body = JoinRequest,
    responses((status = 200, description = "the host's certificate and the cluster CA", body = Joined), (status = 400, body = ErrorBody), (status = 401, body = ErrorBody), (status = 403, description = "bad, used or expired join token, or the name is another host's", body = ErrorBody)))]
async fn host_join(
    State(c): State<Arc<Coord>>,
    h: HeaderMap,
    Path(name): Path<String>,
    Json(j): Json<JoinRequest>,
) -> ApiResult {
    let token = bearer(&h)
        .ok_or_else(|| {
            ApiErr(
                StatusCode::UNAUTHORIZED,
                "joining needs a join token (`ftvm host join-token`)".into(),
            )
        })?
        .to_string();
    let who = Caller::Host(name.clone());
    let now = super::now_ms();
    let r = c.secure(|s| {
        let id = s.check_join(&token, &name, now)?;
        let cert = c
            .ca()
            .sign_host(&j.csr_pem, &name)
            .map_err(|e| AuthError::BadRequest(format!("{e:#}")))?;
        let der = pki::certs_from_pem(&cert)
            .map_err(|e| AuthError::BadRequest(format!("{e:#}")))?
            .remove(0);
        s.joined(&id, &name, &der, now);
        Ok(cert)
    });
    audit(
        &c,
        &who,
        &format!("host join {name}"),
        About::Host(&name),
        &r,
    );
    let cert_pem = r?;
    Ok(Json(Joined {
        cert_pem,
        ca_pem: c.ca().pem.clone(),
    })
    .into_response())
}

#[derive(Serialize, Deserialize, utoipa::ToSchema)]
pub struct HeartbeatBody {
    /// The report's format ([`super::proto::REPORT_VERSION`]).
    pub version: u32,
    pub ip: String,
    pub report: Vec<ProcReport>,
}

#[utoipa::path(post, path = "/api/v1/hosts/{name}/heartbeat", tag = "hosts", security(("host_certificate" = [])),
    params(("name" = String, Path, description = "the reporting host (its certificate must name it)")),
    request_body = HeartbeatBody,
    responses((status = 200, description = "the processes this host should run", body = Reply), (status = 400, body = ErrorBody), (status = 401, description = "no host certificate", body = ErrorBody), (status = 403, description = "another host's certificate, or a forgotten one", body = ErrorBody)))]
async fn host_heartbeat(
    State(c): State<Arc<Coord>>,
    Extension(peer): Extension<Peer>,
    Path(name): Path<String>,
    Json(b): Json<HeartbeatBody>,
) -> ApiResult {
    let cert = peer.cert.ok_or_else(|| {
        ApiErr(
            StatusCode::UNAUTHORIZED,
            "a host reports with its host certificate (mutual TLS); join first".into(),
        )
    })?;
    match pki::host_of(&cert) {
        Some(h) if h == name => {}
        Some(h) => {
            tracing::warn!(target: "audit", "host {h} tried to report as host {name}: refused");
            return Err(ApiErr(
                StatusCode::FORBIDDEN,
                format!("this certificate is host {h}'s; it cannot report as {name}"),
            ));
        }
        None => {
            return Err(ApiErr(
                StatusCode::FORBIDDEN,
                "not a host certificate".into(),
            ))
        }
    }
    if !c.security().host_cert_current(&name, &cert) {
        return Err(ApiErr(
            StatusCode::FORBIDDEN,
            format!("host {name}'s certificate is not (or no longer) this cluster's: join again"),
        ));
    }
    let req = Request::Heartbeat {
        version: b.version,
        host: name,
        ip: b.ip,
        report: b.report,
    };
    let reply = tokio::task::spawn_blocking(move || c.handle(req))
        .await
        .map_err(|e| ApiErr(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?;
    match reply {
        Ok(r) => Ok(Json(r).into_response()),
        Err(e) => Err(ApiErr(StatusCode::BAD_REQUEST, format!("{e:#}"))),
    }
}

#[utoipa::path(get, path = "/api/v1/ca", tag = "access",
    responses((status = 200, description = "the cluster CA certificate (PEM), to pin by its SHA-256 fingerprint", content_type = "application/x-pem-file", body = String)))]
async fn ca(State(c): State<Arc<Coord>>) -> Response {
    c.ca().pem.clone().into_response()
}

#[derive(Deserialize)]
struct EventsQuery {
    vm: Option<String>,
    host: Option<String>,
    /// Unix ms.
    since: Option<u64>,
    /// A sequence number: only later events.
    after: Option<u64>,
    limit: Option<usize>,
}

/// The events a reader asked for, oldest first, and the highest sequence number so far
/// (a follower asks for what comes after it).
#[derive(Serialize, Deserialize, utoipa::ToSchema)]
pub struct EventsReply {
    pub events: Vec<Event>,
}

#[utoipa::path(get, path = "/api/v1/events", tag = "events", security(("token" = [])),
    params(
        ("vm" = Option<String>, Query, description = "only events about this VM"),
        ("host" = Option<String>, Query, description = "only events about this host"),
        ("since" = Option<u64>, Query, description = "only events at or after this time (Unix ms)"),
        ("after" = Option<u64>, Query, description = "only events after this sequence number (follow)"),
        ("limit" = Option<usize>, Query, description = "at most this many, the newest (default 1000)"),
    ),
    responses((status = 200, description = "events, oldest first", body = EventsReply), (status = 401, description = "no or unknown token", body = ErrorBody), (status = 403, description = "the token's role does not allow this", body = ErrorBody)))]
async fn events(
    State(c): State<Arc<Coord>>,
    h: HeaderMap,
    Query(q): Query<EventsQuery>,
) -> Result<Json<EventsReply>, ApiErr> {
    operator(&c, &h, Role::ReadOnly)?;
    let f = Filter {
        vm: q.vm,
        host: q.host,
        since_ms: q.since,
        after: q.after,
        limit: Some(q.limit.unwrap_or(1000).min(c.events.retain())),
    };
    Ok(Json(EventsReply {
        events: c.events.query(&f),
    }))
}

/// An error reply.
#[derive(Serialize, Deserialize, utoipa::ToSchema)]
pub struct ErrorBody {
    pub error: String,
}

/// A done operation's message.
#[derive(Serialize, Deserialize, utoipa::ToSchema)]
pub struct TextBody {
    pub text: String,
}

/// The API's OpenAPI 3 document, generated from the handlers and types above; committed as
/// `docs/openapi.json` (a test keeps the two equal) and served at `/api/v1/openapi.json`.
#[derive(utoipa::OpenApi)]
#[openapi(
    info(title = "ftvm coordinator API", description = "The ftvm cluster's control plane: hosts, VMs, vSphere FT operations, events, API tokens. HTTPS only; operators authenticate with a bearer token (`NAME.SECRET`, roles admin > operator > read-only), hosts with their cluster certificate (mutual TLS)."),
    paths(status, vms, vm_create, vm_start, vm_stop, vm_ft, events, tokens, token_create, token_revoke, join_token, host_forget, host_join, host_heartbeat, ca, openapi, metrics),
    modifiers(&Security),
    tags(
        (name = "cluster", description = "status"),
        (name = "vms", description = "define, power on and off"),
        (name = "ft", description = "vSphere FT operations"),
        (name = "events", description = "the cluster's history"),
        (name = "access", description = "API tokens, join tokens, the CA"),
        (name = "hosts", description = "host agents: join, report"),
    )
)]
pub struct ApiDoc;

struct Security;

impl utoipa::Modify for Security {
    fn modify(&self, api: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
        let c = api.components.get_or_insert_with(Default::default);
        c.add_security_scheme(
            "token",
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .bearer_format("NAME.SECRET")
                    .description(Some("an API token (`ftvm token create`)"))
                    .build(),
            ),
        );
        c.add_security_scheme(
            "join_token",
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .description(Some("a one-time host join token (`ftvm host join-token`)"))
                    .build(),
            ),
        );
        c.add_security_scheme(
            "host_certificate",
            SecurityScheme::MutualTls {
                description: Some(
                    "the host's certificate from the cluster CA, naming the host".into(),
                ),
                extensions: None,
            },
        );
    }
}

/// The document as served and committed (pretty JSON, one trailing newline).
pub fn openapi_json() -> String {
    use utoipa::OpenApi;
    ApiDoc::openapi()
        .to_pretty_json()
        .expect("the OpenAPI document serializes")
        + "\n"
}

#[utoipa::path(get, path = "/api/v1/openapi.json", tag = "cluster",
    responses((status = 200, description = "this document", content_type = "application/json", body = Object)))]
async fn openapi() -> Response {
    (
        [(axum::http::header::CONTENT_TYPE, "application/json")],
        openapi_json(),
    )
        .into_response()
}

#[utoipa::path(get, path = "/metrics", tag = "cluster", security(("token" = [])),
    responses((status = 200, description = "Prometheus metrics (text exposition format 0.0.4): hosts by state, VMs by protection, failovers, time to live and to re-protected, and each pair's epoch, lag, link bytes, held output and epoch pauses", content_type = "text/plain; version=0.0.4", body = String), (status = 401, description = "no or unknown token", body = ErrorBody)))]
async fn metrics(State(c): State<Arc<Coord>>, h: HeaderMap) -> Result<Response, ApiErr> {
    operator(&c, &h, Role::ReadOnly)?;
    let text = tokio::task::spawn_blocking(move || c.metrics())
        .await
        .map_err(|e| ApiErr(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?;
    Ok((
        [(
            axum::http::header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        text,
    )
        .into_response())
}

async fn not_found() -> ApiErr {
    ApiErr(StatusCode::NOT_FOUND, "no such API route".into())
}

pub(super) fn router(c: Arc<Coord>) -> Router {
    Router::new()
        .route("/api/v1/ca", get(ca))
        .route("/api/v1/openapi.json", get(openapi))
        .route("/metrics", get(metrics))
        .route("/api/v1/status", get(status))
        .route("/api/v1/vms", get(vms).post(vm_create))
        .route("/api/v1/vms/{name}/start", post(vm_start))
        .route("/api/v1/vms/{name}/stop", post(vm_stop))
        .route("/api/v1/vms/{name}/ft", post(vm_ft))
        .route("/api/v1/events", get(events))
        .route("/api/v1/tokens", get(tokens).post(token_create))
        .route("/api/v1/tokens/{name}", delete(token_revoke))
        .route("/api/v1/join-tokens", post(join_token))
        .route("/api/v1/hosts/{name}/identity", delete(host_forget))
        .route("/api/v1/hosts/{name}/join", post(host_join))
        .route("/api/v1/hosts/{name}/heartbeat", post(host_heartbeat))
        .fallback(not_found)
        .with_state(c)
}

/// Serves `app` over TLS on `listener` until the process ends. A connection that does not
/// complete a TLS handshake within 10 s is dropped.
pub async fn serve(
    listener: tokio::net::TcpListener,
    tls: rustls::ServerConfig,
    app: Router,
) -> anyhow::Result<()> {
    use tower::ServiceExt;
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(tls));
    loop {
        let (tcp, addr) = match listener.accept().await {
            Ok(x) => x,
            Err(e) => {
                tracing::warn!("accept: {e}");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                continue;
            }
        };
        let (acceptor, app) = (acceptor.clone(), app.clone());
        tokio::spawn(async move {
            let tls = match tokio::time::timeout(
                std::time::Duration::from_secs(10),
                acceptor.accept(tcp),
            )
            .await
            {
                Ok(Ok(s)) => s,
                Ok(Err(e)) => {
                    tracing::debug!("TLS handshake with {addr} failed: {e}");
                    return;
                }
                Err(_) => return,
            };
            let peer = Peer {
                cert: tls
                    .get_ref()
                    .1
                    .peer_certificates()
                    .and_then(|c| c.first())
                    .map(|c| c.to_vec()),
            };
            let app = app.layer(Extension(peer));
            let svc =
                hyper::service::service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                    app.clone().oneshot(req.map(axum::body::Body::new))
                });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(hyper_util::rt::TokioIo::new(tls), svc)
                .await;
        });
    }
}

#[cfg(test)]
mod openapi_tests {
    use super::*;

    const COMMITTED: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/openapi.json");

    /// The committed document is the one the code generates (regenerate it with
    /// `FTVM_UPDATE_OPENAPI=1 cargo test -p ftvm openapi`), and it describes every route.
    #[test]
    fn openapi_document_is_committed_and_complete() {
        let doc = openapi_json();
        if std::env::var_os("FTVM_UPDATE_OPENAPI").is_some() {
            std::fs::write(COMMITTED, &doc).unwrap();
        }
        let committed = std::fs::read_to_string(COMMITTED).unwrap_or_default();
        assert!(
            committed == doc,
            "docs/openapi.json is not what the code generates: run FTVM_UPDATE_OPENAPI=1 cargo test -p ftvm openapi and commit it"
        );
        let v: serde_json::Value = serde_json::from_str(&doc).unwrap();
        assert!(
            v["openapi"].as_str().unwrap().starts_with("3."),
            "{}",
            v["openapi"]
        );
        let paths = v["paths"].as_object().unwrap();
        // Every route the router serves (read from its source, so a new route without a
        // document entry fails here).
        let src = include_str!("api.rs");
        let routes: Vec<&str> = src
            .lines()
            .filter_map(|l| l.trim().strip_prefix(".route(\""))
            .filter_map(|l| l.split('"').next())
            .collect();
        assert!(routes.len() >= 14, "{routes:?}");
        for r in routes {
            assert!(
                paths.contains_key(r),
                "route {r} is not in the OpenAPI document"
            );
        }
        for (name, schema) in [
            ("Request", "op"),
            ("Event", "severity"),
            ("PairStatus", "protected"),
            ("PairRole", "secondary"),
            ("Role", "read-only"),
        ] {
            let s = &v["components"]["schemas"][name];
            assert!(s.to_string().contains(schema), "schema {name}: {s}");
        }
        let sec = &v["components"]["securitySchemes"];
        assert_eq!(sec["token"]["scheme"], "bearer", "{sec}");
        assert_eq!(sec["host_certificate"]["type"], "mutualTLS", "{sec}");
    }
}
