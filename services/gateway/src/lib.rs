//! The API gateway: Parley's public REST API (shared/API.md). It authenticates callers (access tokens
//! verified locally against cached keys), checks budgets with quota, forwards to the services over gRPC,
//! and waits for (or streams) replies via their NATS subjects.
//!
//! It owns no data. It must never answer a client mistake with a 500, reveal another user's resource
//! (that is a 404), or leak internals in an error.

mod auth;
mod limits;
pub mod metrics;
mod middleware;
mod openapi;
mod pipeline;
mod problem;
mod replies;
mod routes;
mod status;
mod timing;
mod views;

use std::sync::Arc;

use axum::Router;
use axum::extract::DefaultBodyLimit;
use parley_platform::Config;
use parley_platform::grpc::ClientChannel;
use parley_platform::health::Readiness;
use parley_platform::nats::Names;
use parley_proto::agent::v1::agent_service_client::AgentServiceClient;
use parley_proto::analytics::v1::analytics_service_client::AnalyticsServiceClient;
use parley_proto::chat::v1::chat_service_client::ChatServiceClient;
use parley_proto::quota::v1::quota_service_client::QuotaServiceClient;
use parley_proto::user::v1::user_service_client::UserServiceClient;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

pub use openapi::openapi_document;

/// Clients of the services behind the gateway.
#[derive(Clone)]
pub struct Backends {
    pub user: UserServiceClient<ClientChannel>,
    pub chat: ChatServiceClient<ClientChannel>,
    pub quota: QuotaServiceClient<ClientChannel>,
    pub analytics: AnalyticsServiceClient<ClientChannel>,
    pub agent: AgentServiceClient<ClientChannel>,
}

/// Everything a request handler can reach. Cloned by every layer and extractor of every request, so a
/// clone is one reference count: the parts live behind one `Arc`.
#[derive(Clone)]
pub struct AppState(Arc<Shared>);

impl std::ops::Deref for AppState {
    type Target = Shared;

    fn deref(&self) -> &Shared {
        &self.0
    }
}

pub struct Shared {
    pub config: Arc<Config>,
    pub backends: Backends,
    pub nats: async_nats::Client,
    pub names: Names,
    keys: Arc<auth::KeyCache>,
    api_keys: Arc<auth::ApiKeyCache>,
    limiter: Arc<limits::RateLimiter>,
    /// Budget reservations straight from Redis, with quota's own script (quota's service decides the rest).
    reserver: Arc<parley_quota::reserve::Reserver>,
    account_overrides: Arc<auth::AccountOverrides>,
    readiness: Arc<Readiness>,
    events_stream: Arc<tokio::sync::OnceCell<async_nats::jetstream::stream::Stream>>,
    /// Every reply's events, through one subscription, for the streams and waiting sends held here.
    replies: Arc<replies::ReplyHub>,
    /// Cancelled when the gateway shuts down: open event streams end so clients reconnect elsewhere.
    shutdown: CancellationToken,
    /// Recent requests and the last status answer, for the public status page.
    status: status::StatusBoard,
    /// Work that outlives a request whose client hung up (a send reaching chat); waited for at shutdown.
    tasks: tokio_util::task::TaskTracker,
}

impl AppState {
    pub fn new(config: Arc<Config>, backends: Backends, nats: async_nats::Client, readiness: Readiness) -> Self {
        let keys = Arc::new(auth::KeyCache::new(
            backends.user.clone(),
            &config.auth.issuer,
            &config.auth.audience,
            std::time::Duration::from_secs(config.auth.jwks_refresh_secs),
        ));
        let names = Names::new(&config.nats.prefix);
        let api_keys = Arc::new(auth::ApiKeyCache::new(backends.user.clone()));
        let limiter = Arc::new(limits::RateLimiter::new(
            &config.redis.url,
            &config.redis.key_prefix,
            config.http.expected_gateway_replicas,
        ));
        let token_lifetime = std::time::Duration::from_secs(config.auth.access_token_ttl_secs.max(0) as u64 + 60);
        Self(Arc::new(Shared {
            api_keys,
            limiter,
            reserver: Arc::new(parley_quota::reserve::Reserver::new(config.clone())),
            account_overrides: Arc::new(auth::AccountOverrides::new(token_lifetime)),
            config,
            backends,
            nats,
            names,
            keys,
            readiness: Arc::new(readiness),
            events_stream: Arc::new(tokio::sync::OnceCell::new()),
            replies: Arc::new(replies::ReplyHub::new()),
            shutdown: CancellationToken::new(),
            status: status::StatusBoard::default(),
            tasks: tokio_util::task::TaskTracker::new(),
        }))
    }
}

/// The whole public API, with its middleware.
pub fn router(state: AppState) -> Router {
    let body_limit = state.config.http.body_limit_bytes;
    routes::routes()
        // The document that describes the routes is served beside them, not among them.
        .route("/openapi.json", axum::routing::get(openapi::serve))
        // Identity, limits and signatures, in that order (`pipeline`); budgets are the handlers'.
        .route_layer(axum::middleware::from_fn_with_state(state.clone(), pipeline::admit))
        .route_layer(axum::middleware::from_fn(middleware::label_route))
        .fallback(routes::ops::not_found)
        .method_not_allowed_fallback(routes::ops::method_not_allowed)
        .layer(DefaultBodyLimit::max(body_limit))
        .layer(axum::middleware::from_fn_with_state(state.clone(), middleware::deadline))
        .layer(axum::middleware::from_fn(middleware::foreign_errors))
        // Event streams are neither compressed nor wrapped (see `middleware::compress`).
        .layer(axum::middleware::from_fn(middleware::compress))
        .layer(cors(&state.config.http.cors_allowed_origins))
        .layer(axum::middleware::from_fn_with_state(state.clone(), middleware::observe))
        .with_state(state)
}

/// CORS for the configured origins (none: no cross-origin access).
fn cors(origins: &[String]) -> tower_http::cors::CorsLayer {
    use axum::http::{HeaderName, HeaderValue, Method, header};
    let origins: Vec<HeaderValue> = origins.iter().filter_map(|origin| HeaderValue::from_str(origin).ok()).collect();
    tower_http::cors::CorsLayer::new()
        .allow_origin(origins)
        .allow_methods([Method::GET, Method::POST, Method::PATCH, Method::PUT, Method::DELETE])
        .allow_headers([
            header::AUTHORIZATION,
            header::CONTENT_TYPE,
            header::IF_MATCH,
            header::CACHE_CONTROL,
            HeaderName::from_static("idempotency-key"),
            HeaderName::from_static("x-api-key"),
            HeaderName::from_static("anthropic-version"),
            HeaderName::from_static("last-event-id"),
            HeaderName::from_static("x-request-id"),
            HeaderName::from_static("x-parley-timestamp"),
            HeaderName::from_static("x-parley-signature"),
        ])
        .expose_headers([
            header::ETAG,
            header::RETRY_AFTER,
            HeaderName::from_static("x-request-id"),
            HeaderName::from_static("server-timing"),
            HeaderName::from_static("ratelimit-limit"),
            HeaderName::from_static("ratelimit-remaining"),
            HeaderName::from_static("ratelimit-reset"),
        ])
        .max_age(std::time::Duration::from_secs(600))
}

/// Serves the API on `listener` until `shutdown` is cancelled, then lets in-flight requests finish.
pub async fn serve(state: AppState, listener: TcpListener, shutdown: CancellationToken) -> anyhow::Result<()> {
    metrics::describe();
    // Open event streams end when the gateway starts shutting down (the server's graceful shutdown
    // waits for them), so clients reconnect to another replica.
    let streams_end = state.shutdown.clone();
    let tasks = state.tasks.clone();
    let refresher = tokio::spawn(state.keys.clone().run_refresher(shutdown.clone()));
    let account_changes = tokio::spawn(state.account_overrides.clone().follow(
        state.nats.clone(),
        state.names.account_changes_subject(),
        shutdown.clone(),
    ));
    let revocations = tokio::spawn(state.api_keys.clone().follow_revocations(
        state.nats.clone(),
        state.names.api_key_revocations_subject(),
        shutdown.clone(),
    ));
    let replies = tokio::spawn(state.replies.clone().follow(
        state.nats.clone(),
        state.names.all_message_events(),
        shutdown.clone(),
    ));
    let served = parley_platform::net::serve_http(listener, router(state), {
        let shutdown = shutdown.clone();
        async move {
            shutdown.cancelled().await;
            streams_end.cancel();
        }
    })
    .await;
    shutdown.cancel();
    tasks.close();
    tasks.wait().await;
    refresher.await?;
    replies.await?;
    revocations.await?;
    account_changes.await?;
    served?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::collections::{BTreeMap, BTreeSet};

    /// The gateway's top-level modules and the others each one names (`crate::x`, or `super::x` from
    /// inside `routes/`), read from the source.
    fn module_imports() -> BTreeMap<String, BTreeSet<String>> {
        let src = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
        let mut imports: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
        let mut files = vec![src.clone()];
        while let Some(path) = files.pop() {
            if path.is_dir() {
                files.extend(std::fs::read_dir(&path).unwrap().map(|entry| entry.unwrap().path()));
                continue;
            }
            let relative = path.strip_prefix(&src).unwrap();
            let module = relative.components().next().unwrap().as_os_str().to_str().unwrap().trim_end_matches(".rs");
            if module == "lib" {
                continue;
            }
            let text = std::fs::read_to_string(&path).unwrap();
            let named = imports.entry(module.to_owned()).or_default();
            // `super::` inside `routes/` (but not in `routes/mod.rs`, whose parent is the crate) is
            // `routes`.
            let in_routes = module == "routes" && relative.components().count() > 1 && !relative.ends_with("mod.rs");
            let word =
                |piece: &str| -> String { piece.chars().take_while(|c| c.is_ascii_lowercase() || *c == '_').collect() };
            for piece in text.split("crate::").skip(1) {
                // `crate::{a, b::c}` names several.
                let names: Vec<String> = match piece.strip_prefix('{') {
                    Some(list) => {
                        list.split('}').next().unwrap_or_default().split(',').map(|name| word(name.trim())).collect()
                    }
                    None => vec![word(piece)],
                };
                named.extend(names.into_iter().filter(|name| !name.is_empty() && name != module));
            }
            if in_routes && text.contains("super::") {
                named.insert("routes".to_owned());
            }
            named.remove(module);
        }
        imports
    }

    #[test]
    fn no_two_gateway_modules_import_each_other_even_around_a_circle() {
        let imports = module_imports();
        assert!(imports["routes"].contains("pipeline"), "the reading of the source found imports: {imports:?}");
        for start in imports.keys() {
            // Everything `start` reaches; reaching itself is a cycle.
            let mut seen = BTreeSet::new();
            let mut next: Vec<&String> = imports[start].iter().collect();
            while let Some(module) = next.pop() {
                assert_ne!(module, start, "{start} imports a module that imports it back: {imports:?}");
                if seen.insert(module.clone()) {
                    next.extend(imports.get(module).into_iter().flatten());
                }
            }
        }
    }
}
