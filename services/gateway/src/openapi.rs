//! The OpenAPI 3.1 document, generated from the handlers' annotations and the view types.

use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{Modify, OpenApi};

use crate::routes::{api_keys, conversations, identity, messages, openai, ops, streaming, usage};

#[derive(OpenApi)]
#[openapi(
    info(title = "Parley API", description = "Parley's public REST API (v1)."),
    paths(
        ops::healthz, ops::readyz, ops::metrics, ops::openapi,
        identity::register, identity::login, identity::refresh, identity::logout, identity::me, identity::jwks,
        identity::set_tier,
        api_keys::create, api_keys::list, api_keys::revoke,
        conversations::create, conversations::list, conversations::get, conversations::update, conversations::delete,
        messages::send, messages::list, messages::get, streaming::events, streaming::websocket,
        usage::own, usage::admin,
        openai::chat_completions, openai::models,
    ),
    modifiers(&BearerAuth),
    tags(
        (name = "identity", description = "Accounts and tokens"),
        (name = "conversations", description = "Conversations"),
        (name = "messages", description = "Messages and replies"),
        (name = "usage", description = "Tokens, requests and cost"),
        (name = "admin", description = "Operator endpoints (role admin)"),
        (name = "openai", description = "OpenAI-compatible Chat Completions"),
        (name = "operations", description = "Health, readiness, metrics"),
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
    }
}

/// The document served at `/openapi.json`.
pub fn openapi_document() -> utoipa::openapi::OpenApi {
    ApiDoc::openapi()
}
