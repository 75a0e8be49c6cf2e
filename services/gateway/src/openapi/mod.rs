//! The OpenAPI 3.1 document, generated from the handlers' annotations and the view types.

mod constraints;

use utoipa::openapi::security::{ApiKey, ApiKeyValue, HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::openapi::{ContentBuilder, Ref, RefOr, ResponseBuilder};
use utoipa::{Modify, OpenApi};

use crate::routes::{
    anthropic, api_keys, audit, conversations, embeddings, export, feedback, identity, messages, openai, ops, search,
    stored_completions, streaming, usage, web,
};

#[derive(OpenApi)]
#[openapi(
    info(title = "Parley API", description = "Parley's public REST API (v1)."),
    paths(
        ops::healthz, ops::readyz, ops::metrics, serve, ops::status, web::index, web::status_page, web::asset,
        identity::register, identity::login, identity::refresh, identity::logout, identity::me, identity::delete_me, identity::jwks,
        identity::set_tier, export::export,
        api_keys::create, api_keys::list, api_keys::revoke,
        conversations::create, conversations::list, conversations::get, conversations::update, conversations::delete,
        messages::send, messages::list, messages::get, streaming::events, streaming::websocket,
        messages::edit, messages::regenerate, messages::stop, messages::siblings, conversations::switch_branch,
        search::search, feedback::put, feedback::get, feedback::delete, feedback::export, feedback::summary,
        usage::own, usage::admin, audit::list,
        openai::chat_completions, openai::models, embeddings::embeddings,
        stored_completions::list, stored_completions::get, stored_completions::messages, stored_completions::update,
        stored_completions::delete,
        anthropic::messages, anthropic::count_tokens,
    ),
    modifiers(&BearerAuth, &ErrorResponses),
    tags(
        (name = "identity", description = "Accounts and tokens"),
        (name = "conversations", description = "Conversations"),
        (name = "messages", description = "Messages and replies"),
        (name = "usage", description = "Tokens, requests and cost"),
        (name = "admin", description = "Operator endpoints (role admin)"),
        (name = "openai", description = "OpenAI-compatible Chat Completions and Embeddings"),
        (name = "anthropic", description = "Anthropic-compatible Messages"),
        (name = "operations", description = "Health, readiness, metrics, status"),
        (name = "web", description = "The web client and the public status page"),
    )
)]
struct ApiDoc;

struct BearerAuth;

impl Modify for BearerAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(
                HttpBuilder::new().scheme(HttpAuthScheme::Bearer).bearer_format("JWT or pk_ API key").build(),
            ),
        );
        // An API key as Anthropic's SDKs send it; taken on every route, like a bearer credential.
        components
            .add_security_scheme("api_key", SecurityScheme::ApiKey(ApiKey::Header(ApiKeyValue::new("x-api-key"))));
    }
}

/// Error responses as the server sends them. Every error is `application/problem+json` (a `Problem`),
/// except on the OpenAI- and Anthropic-compatible routes, whose errors keep those APIs' shapes as
/// `application/json`; and
/// every operation lists the errors any request to it can get, besides its own: 401 where credentials
/// are needed, 429 and 503 (a dependency unavailable) on every `/v1/` route, 400 where a query or a
/// header is read, 400 and 413 where a body is.
struct ErrorResponses;

impl Modify for ErrorResponses {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        for (path, item) in &mut openapi.paths.paths {
            // Every `/v1/` route is rate limited (per caller, or per address where there is none) and
            // reaches services that may be down.
            let limited = path.starts_with("/v1/");
            let operations = [&mut item.get, &mut item.put, &mut item.post, &mut item.delete, &mut item.patch];
            for operation in operations.into_iter().flatten() {
                let openai = operation
                    .tags
                    .as_ref()
                    .is_some_and(|tags| tags.iter().any(|tag| tag == "openai" || tag == "anthropic"));
                let media = if openai { "application/json" } else { "application/problem+json" };
                for (status, response) in &mut operation.responses.responses {
                    if let RefOr::T(response) = response
                        && (status.starts_with('4') || status.starts_with('5'))
                        && let Some(content) = response.content.shift_remove("application/json")
                    {
                        response.content.insert(media.to_owned(), content);
                    }
                }
                let error = |description: &str| {
                    let content = if openai {
                        ContentBuilder::new().build()
                    } else {
                        ContentBuilder::new().schema(Some(Ref::from_schema_name("Problem"))).build()
                    };
                    RefOr::T(ResponseBuilder::new().description(description).content(media, content).build())
                };
                let mut add = |status: &str, description: &str| {
                    operation.responses.responses.entry(status.to_owned()).or_insert_with(|| error(description));
                };
                if operation.security.as_ref().is_some_and(|security| !security.is_empty()) {
                    add("401", "Missing, invalid or expired credentials (`unauthorized`)");
                }
                if limited {
                    add("429", "Over the rate limit (`rate_limited`, with `Retry-After`)");
                    add("503", "A service behind the gateway is unavailable (`unavailable`, with `Retry-After`)");
                }
                let read_parameters = operation
                    .parameters
                    .iter()
                    .flatten()
                    .any(|parameter| !matches!(parameter.parameter_in, utoipa::openapi::path::ParameterIn::Path));
                if read_parameters {
                    add("400", "Invalid input (`invalid_request`; `field` names it)");
                }
                if operation.request_body.is_some() {
                    add("400", "Invalid input (`invalid_request`; `field` names it)");
                    add("413", "The body is larger than the limit (`payload_too_large`)");
                }
            }
        }
    }
}

/// The document as generated from the handlers and types alone.
pub fn openapi_document() -> utoipa::openapi::OpenApi {
    ApiDoc::openapi()
}

/// This document.
#[utoipa::path(get, path = "/openapi.json", tag = "operations", responses((status = 200, description = "The OpenAPI 3.1 document")))]
pub async fn serve(
    axum::extract::State(state): axum::extract::State<crate::AppState>,
) -> axum::Json<serde_json::Value> {
    axum::Json(served_document(&state.config))
}

/// The document served at `/openapi.json`: the generated one with this deployment's rules (lengths,
/// patterns, ranges, its models and tiers; see [`constraints`]).
pub fn served_document(config: &parley_platform::Config) -> serde_json::Value {
    let mut document = serde_json::to_value(openapi_document()).unwrap_or_default();
    constraints::apply(&mut document, config);
    document
}
