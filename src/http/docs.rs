//! API documentation: the pages (Swagger UI's assets from the
//! utoipa-swagger-ui `vendored` feature, ReDoc's script embedded from the npm
//! package, so both work offline) and the finishing touches that make the
//! generated document state every status and limit the server enforces.

use std::{borrow::Cow, sync::Arc};

use axum::{
    Router,
    http::header,
    response::{Html, IntoResponse},
    routing::get,
};
use serde_json::json;
use utoipa::{
    IntoParams, Modify, PartialSchema, ToSchema,
    openapi::{
        Content, OpenApi, PathItem, RefOr, Response, Schema,
        extensions::Extensions,
        link::LinkBuilder,
        path::{Operation, ParameterIn},
        schema::{AnyOfBuilder, KnownFormat, ObjectBuilder, SchemaFormat, Type},
        security::{HttpAuthScheme, HttpBuilder, SecurityScheme},
    },
};
use utoipa_swagger_ui::{Config, SwaggerUi};

use super::AppState;
use crate::domain::conversation::{MAX_SYSTEM_PROMPT_CHARS, MAX_TITLE_CHARS};

static REDOC_BUNDLE: &str = include_str!("../../assets/vendor/redoc/redoc.standalone.js");

/// The bundle as served: its sidebar footer shows Redocly's logo from their
/// CDN (no option turns it off), which our no-CDN rule and the page's CSP
/// refuse; an empty inline image stands in for it.
static REDOC_JS: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
    REDOC_BUNDLE.replace(
        "https://cdn.redoc.ly/redoc/logo-mini.svg",
        "data:image/svg+xml,%3Csvg xmlns=%27http://www.w3.org/2000/svg%27/%3E",
    )
});

const REDOC_PAGE: &str = r#"<!DOCTYPE html>
<html>
  <head>
    <title>Palaver API</title>
    <meta charset="utf-8"/>
    <meta name="viewport" content="width=device-width, initial-scale=1">
    <style>body { margin: 0; padding: 0; }</style>
  </head>
  <body>
    <redoc spec-url="/openapi.json"></redoc>
    <script src="/redoc/redoc.standalone.js"></script>
  </body>
</html>
"#;

/// Declares the Bearer scheme the `security(("bearer" = []))` paths name.
pub struct SecurityAddon;

impl Modify for SecurityAddon {
    fn modify(&self, openapi: &mut OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).bearer_format("JWT").build()),
        );
    }
}

/// The error statuses an operation can answer whatever its handler does,
/// added to every operation that does not list them itself: they come from
/// the extractors and layers every route shares, so stating them once here
/// keeps forty annotations from drifting apart.
pub struct CommonResponses;

impl Modify for CommonResponses {
    fn modify(&self, openapi: &mut OpenApi) {
        for item in openapi.paths.paths.values_mut() {
            for (method, operation) in operations(item) {
                let socket = operation.responses.responses.contains_key("101");
                for (status, description) in common_statuses(method, operation) {
                    let mut response = Response::new(description);
                    response.content.insert("application/json".into(), Content::new(Some(error_body())));
                    if socket && status == "400" {
                        // axum's upgrade extractor refuses a plain request in plain text.
                        response.description = "Not a WebSocket upgrade request, or a malformed query.".into();
                        response.content.insert("text/plain".into(), Content::new(Some(string().build())));
                    }
                    operation.responses.responses.entry(status.into()).or_insert(RefOr::T(response));
                }
                // Handlers name an error status with its body only; say what it means.
                for (status, response) in operation.responses.responses.iter_mut() {
                    if let (RefOr::T(response), Some(meaning)) = (response, meaning(status))
                        && response.description.is_empty()
                    {
                        response.description = meaning.into();
                    }
                }
            }
        }
    }
}

/// OpenAPI links from a new support session to the routes that take its id,
/// so clients and fuzzers know where `session_id` goes (utoipa's derive
/// cannot state links).
pub struct SupportLinks;

impl Modify for SupportLinks {
    fn modify(&self, openapi: &mut OpenApi) {
        let created = openapi.paths.paths.get_mut("/api/support/sessions").and_then(|item| item.post.as_mut());
        let Some(RefOr::T(response)) = created.and_then(|op| op.responses.responses.get_mut("201")) else { return };
        for (name, operation_id) in [
            ("GetSession", "get_session"),
            ("ListMessages", "support_list_messages"),
            ("PostMessage", "support_post_message"),
            ("Handoff", "handoff"),
            ("Claim", "claim"),
        ] {
            // utoipa 5.5 writes `Link::operation_id` as `operation_id`, not
            // `operationId`, so the name rides in the extensions.
            let mut target = Extensions::default();
            target.insert("operationId".into(), operation_id.into());
            let link = LinkBuilder::new().parameter("id", "$response.body#/session_id").extensions(Some(target));
            response.links.insert(name.into(), RefOr::T(link.build()));
        }
    }
}

fn error_body() -> RefOr<Schema> {
    RefOr::Ref(utoipa::openapi::Ref::from_schema_name("ErrorBody"))
}

fn meaning(status: &str) -> Option<&'static str> {
    Some(match status {
        "401" => "Missing, invalid, expired or revoked credentials.",
        "403" => "Authenticated but not allowed.",
        "404" => "Not found, or not yours.",
        "409" => "Conflicts with the current state.",
        "422" => "Validation failed; `errors` names each field.",
        "429" => "Rate limited; retry after `Retry-After` seconds.",
        "502" => "The AI provider failed after retries; the user message is kept (`user_message`).",
        "504" => "The AI provider did not answer in time; the user message is kept (`user_message`).",
        _ => return None,
    })
}

fn operations(item: &mut PathItem) -> Vec<(&'static str, &mut Operation)> {
    [
        ("get", item.get.as_mut()),
        ("post", item.post.as_mut()),
        ("put", item.put.as_mut()),
        ("patch", item.patch.as_mut()),
        ("delete", item.delete.as_mut()),
    ]
    .into_iter()
    .filter_map(|(method, op)| op.map(|op| (method, op)))
    .collect()
}

fn common_statuses(method: &str, op: &Operation) -> Vec<(&'static str, &'static str)> {
    let secured = op.security.as_ref().is_some_and(|s| !s.is_empty());
    let params = op.parameters.as_deref().unwrap_or_default();
    let has_path_id = params.iter().any(|p| p.parameter_in == ParameterIn::Path);
    let has_body = op.request_body.is_some();
    let ops = op.tags.as_ref().is_some_and(|t| t.iter().any(|t| t == "ops"));
    let mut statuses = vec![(
        "400",
        "Malformed request: the JSON or form body does not parse, the query string does not parse, or \
         Content-Length and Transfer-Encoding are both sent.",
    )];
    if secured {
        statuses.push(("401", "Missing, invalid, expired or revoked credentials."));
        if method != "get" {
            statuses.push(("403", "Not allowed: a cookie-authenticated request without a valid X-CSRF-Token."));
        }
    }
    if has_path_id {
        statuses.push(("404", "Not found, or not yours."));
    }
    if has_body {
        statuses.push(("413", "The body is larger than 1 MiB."));
        statuses.push(("415", "The body is not sent as JSON."));
    }
    if has_body || !params.is_empty() {
        statuses.push((
            "422",
            "Validation failed: a path id is not a UUID, or a query, header or body field is invalid; \
             `errors` names each.",
        ));
    }
    if !ops {
        statuses.push(("503", "The database (or Redis) does not answer; retry after `Retry-After`."));
    }
    statuses
}

/// The limits that depend on this server's configuration: which providers a
/// model id may name, and how long a message may be.
pub struct ServerLimits {
    /// Configured provider names; empty means any well-formed name.
    pub providers: Vec<String>,
    pub max_message_chars: usize,
}

impl Default for ServerLimits {
    /// What `palaver openapi` prints: any provider, PALAVER_MAX_MESSAGE_CHARS's default.
    fn default() -> Self {
        Self { providers: Vec::new(), max_message_chars: 32_000 }
    }
}

impl Modify for ServerLimits {
    fn modify(&self, openapi: &mut OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.schemas.insert(ModelIdSchema::name().into_owned(), model_id_schema(&self.providers).into());
        components.schemas.insert(MessageText::name().into_owned(), message_text_schema(self.max_message_chars).into());
        for (name, rule) in body_rules() {
            if let Some(RefOr::T(Schema::Object(object))) = components.schemas.get_mut(name) {
                let extensions = object.extensions.get_or_insert_with(Default::default);
                extensions.insert("anyOf".into(), rule);
            }
        }
    }
}

/// Rules across fields that the derive cannot state. utoipa has no field
/// for them on an object schema, so they ride in its (flattened) extensions.
fn body_rules() -> [(&'static str, serde_json::Value); 2] {
    [
        // An account needs an email or a username (a null one does not count).
        (
            "RegisterBody",
            json!([
                { "required": ["email"], "properties": { "email": { "type": "string", "pattern": "\\S" } } },
                { "required": ["username"], "properties": { "username": { "type": "string", "minLength": 1 } } },
            ]),
        ),
        // A new password needs the current one.
        (
            "UpdateMeBody",
            json!([
                { "properties": { "password": { "type": "null" } } },
                { "required": ["current_password"], "properties": { "current_password": { "type": "string" } } },
            ]),
        ),
    ]
}

/// Characters `char::is_control` refuses (Unicode Cc), as a regex class body.
const CONTROL: &str = r"\u0000-\u001f\u007f-\u009f";

/// What `str::trim` removes (Unicode White_Space), as a regex class body:
/// `\s` differs between regex dialects and from Rust.
const WS: &str = r"\t\n\u000b\f\r \u0085\u00a0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000";

/// A string that, trimmed, has 1 to `max` characters and none of `forbidden`.
fn trimmed_pattern(max: usize, forbidden: &str) -> String {
    format!("^[{WS}]*[^{WS}{forbidden}](?:[^{forbidden}]{{0,{}}}[^{WS}{forbidden}])?[{WS}]*$", max - 2)
}

/// A display name or a visitor's name, as `DisplayName::parse` accepts it.
pub fn display_name() -> Schema {
    string().pattern(Some(trimmed_pattern(100, CONTROL))).into()
}

pub fn optional_display_name() -> Schema {
    nullable([display_name()])
}

/// A retention in days, as `RetentionDays::parse` accepts it (`null` for none).
pub fn optional_retention_days() -> Schema {
    nullable([ObjectBuilder::new()
        .schema_type(Type::Integer)
        .minimum(Some(1))
        .maximum(Some(crate::domain::user::MAX_RETENTION_DAYS))
        .into()])
}

/// A conversation title, as `Title::parse` accepts it (`null` for none).
pub fn optional_title() -> Schema {
    nullable([string().pattern(Some(trimmed_pattern(MAX_TITLE_CHARS, r"\u0000"))).into()])
}

/// A system prompt, as `SystemPrompt::parse` accepts it (`null` for none).
pub fn optional_system_prompt() -> Schema {
    nullable([string().max_length(Some(MAX_SYSTEM_PROMPT_CHARS)).pattern(Some(r"^[^\u0000]*$")).into()])
}

/// `provider/model` as `ModelId::parse` and `Providers::validate_model` accept it.
fn model_id_schema(providers: &[String]) -> Schema {
    let provider =
        if providers.is_empty() { "[A-Za-z0-9_-]+".to_owned() } else { format!("(?:{})", providers.join("|")) };
    ObjectBuilder::new()
        .schema_type(Type::String)
        .description(Some("`provider/model`, e.g. `openai/gpt-4o-mini`; the provider must be configured."))
        .min_length(Some(3))
        .max_length(Some(200))
        .pattern(Some(format!("^[{WS}]*{provider}/[^{CONTROL}]*[^{WS}{CONTROL}][{WS}]*$")))
        .into()
}

/// A message's text as `MessageContent::parse` accepts it.
fn message_text_schema(max_chars: usize) -> Schema {
    ObjectBuilder::new()
        .schema_type(Type::String)
        .description(Some("Message text: not only white space, no NUL."))
        .min_length(Some(1))
        .max_length(Some(max_chars))
        .pattern(Some(format!(r"^[{WS}]*[^{WS}\u0000][^\u0000]*$")))
        .into()
}

/// A UUID in the hyphenated form; `format` alone is only an annotation in
/// JSON Schema 2020-12, so the pattern makes it a rule.
const UUID_PATTERN: &str = "^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$";

/// Matches strings the server trims to nothing and then treats as absent.
fn blank() -> String {
    format!("^[{WS}]*$")
}

fn string() -> ObjectBuilder {
    ObjectBuilder::new().schema_type(Type::String)
}

fn nullable(alternatives: impl IntoIterator<Item = Schema>) -> Schema {
    let mut any = AnyOfBuilder::new().item(ObjectBuilder::new().schema_type(Type::Null));
    for a in alternatives {
        any = any.item(a);
    }
    any.into()
}

/// A UUID, as `parse_uuid` reads it.
pub fn uuid() -> Schema {
    string().format(Some(SchemaFormat::KnownFormat(KnownFormat::Uuid))).pattern(Some(UUID_PATTERN)).into()
}

/// An optional UUID in a body (`null` for none).
pub fn optional_uuid() -> Schema {
    nullable([uuid()])
}

/// The `before` cursor: a message id, or blank for none.
pub fn uuid_or_blank() -> Schema {
    AnyOfBuilder::new().item(uuid()).item(string().pattern(Some(blank()))).into()
}

/// The registration email: blank counts as absent (`Email::parse` otherwise).
pub fn optional_email() -> Schema {
    let email =
        string().format(Some(SchemaFormat::KnownFormat(KnownFormat::Email))).min_length(Some(3)).max_length(Some(254));
    nullable([string().pattern(Some(blank())).into(), email.into()])
}

/// The registration username: empty counts as absent (`Username::parse` otherwise).
pub fn optional_username() -> Schema {
    let username = string().min_length(Some(3)).max_length(Some(32)).pattern(Some("^[A-Za-z0-9_.-]{3,32}$"));
    nullable([string().max_length(Some(0)).into(), username.into()])
}

/// A visitor's phone: blank counts as absent (`parse_phone` otherwise).
pub fn optional_phone() -> Schema {
    let phone = string().max_length(Some(30)).pattern(Some(r"^[ +().-]*(?:[0-9][ +().-]*){5,}$"));
    nullable([string().pattern(Some(blank())).into(), phone.into()])
}

/// The `ModelId` schema; `ServerLimits` fills in this server's providers.
pub struct ModelIdSchema;

impl PartialSchema for ModelIdSchema {
    fn schema() -> RefOr<Schema> {
        model_id_schema(&[]).into()
    }
}

impl ToSchema for ModelIdSchema {
    fn name() -> Cow<'static, str> {
        "ModelId".into()
    }
}

/// The `MessageText` schema; `ServerLimits` fills in the configured maximum.
pub struct MessageText;

impl PartialSchema for MessageText {
    fn schema() -> RefOr<Schema> {
        message_text_schema(ServerLimits::default().max_message_chars).into()
    }
}

impl ToSchema for MessageText {
    fn name() -> Cow<'static, str> {
        "MessageText".into()
    }
}

/// The `Idempotency-Key` header of the send routes (see `streaming::idempotency_key`).
#[derive(IntoParams)]
#[into_params(parameter_in = Header)]
#[allow(dead_code, reason = "documentation only")]
pub struct IdempotencyKey {
    /// A retry with the same key within 24 h returns the original result.
    #[param(rename = "Idempotency-Key", value_type = String, required = false, min_length = 1, max_length = 200,
        pattern = r"^[!-~](?:[ -~]*[!-~])?$")]
    idempotency_key: Option<String>,
}

/// `Last-Event-ID` of a resumed stream (see `streaming::resume_offset`).
#[derive(IntoParams)]
#[into_params(parameter_in = Header)]
#[allow(dead_code, reason = "documentation only")]
pub struct LastEventId {
    /// The `id:` of the last event received (`123` or `123:end`).
    #[param(rename = "Last-Event-ID", value_type = String, required = false, pattern = r"^[0-9]{1,19}(?::[ -~]*)?$")]
    last_event_id: Option<String>,
}

/// `/openapi.json`, `/docs` (Swagger UI) and `/redoc`.
pub fn routes(openapi: OpenApi) -> Router<Arc<AppState>> {
    Router::new()
        // No online validator badge: the page would call validator.swagger.io.
        .merge(SwaggerUi::new("/docs").url("/openapi.json", openapi).config(Config::default().validator_url("none")))
        .route("/redoc", get(|| async { Html(REDOC_PAGE) }))
        .route(
            "/redoc/redoc.standalone.js",
            get(|| async {
                (
                    [
                        (header::CONTENT_TYPE, "application/javascript"),
                        (header::CACHE_CONTROL, "public, max-age=86400"),
                    ],
                    REDOC_JS.as_str(),
                )
                    .into_response()
            }),
        )
}

/// The OpenAPI document, as `palaver openapi` prints it.
pub fn openapi_json() -> String {
    let (_, openapi) = super::api_parts(&ServerLimits::default());
    openapi.to_pretty_json().unwrap_or_else(|e| format!("{{\"error\": \"{e}\"}}"))
}
