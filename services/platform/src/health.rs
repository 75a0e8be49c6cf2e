//! Liveness, readiness and the admin routes (`/healthz`, `/readyz`, `/metrics`).
//!
//! Liveness checks nothing. Readiness runs every dependency check concurrently, each bounded by a
//! timeout, and names the ones that fail. A process is unready only when a dependency it cannot work
//! without fails; one it degrades around (Redis, for instance) is reported and leaves it ready, in
//! state `degraded`, so that an orchestrator keeps sending it the traffic it can still serve.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use axum::Json;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use futures::future::BoxFuture;
use serde_json::json;

type CheckFn = Arc<dyn Fn() -> BoxFuture<'static, Result<(), String>> + Send + Sync>;
type InfoFn = Arc<dyn Fn() -> serde_json::Value + Send + Sync>;

const CHECK_TIMEOUT: Duration = Duration::from_secs(2);

/// Whether a failing dependency makes the process unready.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Need {
    /// The process cannot do its job without it.
    Required,
    /// The process works around it (a degraded mode): reported, never unready.
    Degradable,
}

/// What `/readyz` says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReadyState {
    Ready,
    /// Ready, with a dependency it works around failing.
    Degraded,
    NotReady,
}

impl ReadyState {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Ready => "ready",
            Self::Degraded => "degraded",
            Self::NotReady => "not_ready",
        }
    }
}

/// The named dependency checks that decide readiness.
#[derive(Clone, Default)]
pub struct Readiness {
    checks: Vec<(String, Need, CheckFn)>,
    /// Reported beside the checks without deciding readiness (an open circuit to one provider must not
    /// take every replica out of service).
    infos: Vec<(String, InfoFn)>,
}

impl Readiness {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn with_check<F, Fut>(mut self, name: impl Into<String>, check: F) -> Self
    where
        F: Fn() -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<(), String>> + Send + 'static,
    {
        self.checks.push((name.into(), Need::Required, Arc::new(move || Box::pin(check()))));
        self
    }

    /// A dependency the process degrades around: its state is reported, but a failure leaves the
    /// process ready (`degraded`).
    pub fn with_degradable<F, Fut>(mut self, name: impl Into<String>, check: F) -> Self
    where
        F: Fn() -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<(), String>> + Send + 'static,
    {
        self.checks.push((name.into(), Need::Degradable, Arc::new(move || Box::pin(check()))));
        self
    }

    pub fn with_info(
        mut self,
        name: impl Into<String>,
        info: impl Fn() -> serde_json::Value + Send + Sync + 'static,
    ) -> Self {
        self.infos.push((name.into(), Arc::new(info)));
        self
    }

    /// Runs every check concurrently: each one's name, whether readiness needs it, and whether it
    /// passed (the public status page's view, which names no failure).
    pub async fn check_each(&self) -> Vec<(String, bool, bool)> {
        let outcomes = self.run_checks().await;
        outcomes.into_iter().map(|(name, need, outcome)| (name, need == Need::Required, outcome.is_ok())).collect()
    }

    /// Runs every check concurrently, each within `CHECK_TIMEOUT`.
    async fn run_checks(&self) -> Vec<(String, Need, Result<(), String>)> {
        let runs = self.checks.iter().map(|(name, need, check)| {
            let check = check.clone();
            async move {
                let outcome = match tokio::time::timeout(CHECK_TIMEOUT, check()).await {
                    Ok(Ok(())) => Ok(()),
                    Ok(Err(error)) => Err(error),
                    Err(_) => Err(format!("no answer within {} ms", CHECK_TIMEOUT.as_millis())),
                };
                (name.clone(), *need, outcome)
            }
        });
        futures::future::join_all(runs).await
    }

    /// Runs every check concurrently; the map holds "ok" or the failure for each.
    pub async fn check(&self) -> (ReadyState, BTreeMap<String, String>) {
        let outcomes = self.run_checks().await;
        let failing = |wanted: Need| outcomes.iter().any(|(_, need, outcome)| *need == wanted && outcome.is_err());
        let state = if failing(Need::Required) {
            ReadyState::NotReady
        } else if failing(Need::Degradable) {
            ReadyState::Degraded
        } else {
            ReadyState::Ready
        };
        let report = outcomes
            .into_iter()
            .map(|(name, _, outcome)| (name, outcome.err().unwrap_or_else(|| "ok".to_owned())))
            .collect();
        (state, report)
    }

    pub async fn response(&self) -> Response {
        let (state, checks) = self.check().await;
        let mut body = json!({"status": state.as_str(), "checks": checks});
        for (name, info) in &self.infos {
            body[name.as_str()] = info();
        }
        if state != ReadyState::NotReady {
            return (StatusCode::OK, Json(body)).into_response();
        }
        let failing: Vec<&String> = checks.iter().filter(|(_, v)| *v != "ok").map(|(k, _)| k).collect();
        tracing::warn!(?failing, "not ready");
        (StatusCode::SERVICE_UNAVAILABLE, Json(body)).into_response()
    }
}

pub fn postgres_check(pool: sqlx::PgPool) -> impl Fn() -> BoxFuture<'static, Result<(), String>> + Send + Sync {
    move || {
        let pool = pool.clone();
        Box::pin(
            async move { sqlx::query("SELECT 1").execute(&pool).await.map(|_| ()).map_err(|error| error.to_string()) },
        )
    }
}

pub fn nats_check(client: async_nats::Client) -> impl Fn() -> BoxFuture<'static, Result<(), String>> + Send + Sync {
    move || {
        let state = client.connection_state();
        Box::pin(async move {
            match state {
                async_nats::connection::State::Connected => Ok(()),
                other => Err(format!("connection {other}")),
            }
        })
    }
}

pub fn redis_check(
    connection: redis::aio::ConnectionManager,
) -> impl Fn() -> BoxFuture<'static, Result<(), String>> + Send + Sync {
    move || {
        let mut connection = connection.clone();
        Box::pin(async move {
            redis::cmd("PING").query_async::<String>(&mut connection).await.map(|_| ()).map_err(|e| e.to_string())
        })
    }
}

/// Checks a peer's `grpc.health.v1` status for one service name.
pub fn grpc_check(
    channel: crate::balance::Balanced,
    service: &'static str,
) -> impl Fn() -> BoxFuture<'static, Result<(), String>> + Send + Sync {
    move || {
        let mut client = tonic_health::pb::health_client::HealthClient::new(channel.clone());
        Box::pin(async move {
            let request = tonic_health::pb::HealthCheckRequest { service: service.to_owned() };
            let response = client.check(request).await.map_err(|status| status.code().to_string())?;
            match response.into_inner().status() {
                tonic_health::pb::health_check_response::ServingStatus::Serving => Ok(()),
                other => Err(format!("{other:?}")),
            }
        })
    }
}

/// `/healthz`, `/readyz` and `/metrics`, for services whose main port speaks gRPC.
pub fn admin_router(readiness: Readiness) -> axum::Router {
    let readiness = Arc::new(readiness);
    axum::Router::new()
        .route("/healthz", get(healthz))
        .route(
            "/readyz",
            get(move || {
                let readiness = readiness.clone();
                async move { readiness.response().await }
            }),
        )
        .route("/metrics", get(metrics))
}

pub async fn healthz() -> Response {
    Json(json!({"status": "ok"})).into_response()
}

pub async fn metrics() -> Response {
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], crate::telemetry::render_metrics()).into_response()
}
