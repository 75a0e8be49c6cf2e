//! gRPC plumbing shared by every service: lazily connected client channels that carry trace context
//! and the request id, and a server that opens a span per call (joined to the caller's trace),
//! records metrics, serves `grpc.health.v1` and stops gracefully.

use std::task::{Context, Poll};
use std::time::Instant;

use futures::future::BoxFuture;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tonic::service::Interceptor;
use tonic::service::interceptor::InterceptedService;

use crate::balance::{Balanced, InvalidTarget};
use crate::telemetry;

tokio::task_local! {
    /// The id of the public request being served, set by the gateway and carried to every service.
    pub static REQUEST_ID: String;
}

const REQUEST_ID_HEADER: &str = "x-request-id";

/// The largest message a chat call carries between the gateway and chat (tonic's default is 4 MiB): a
/// stored completion with its request, which the gateway's body limit allows up to 100 MiB, or a page
/// of a hundred long replies.
pub const MAX_CHAT_MESSAGE_BYTES: usize = 128 * 1024 * 1024;

/// Adds the current trace context and request id to every outgoing call.
#[derive(Clone, Copy, Default)]
pub struct PropagateContext;

impl Interceptor for PropagateContext {
    fn call(&mut self, mut request: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        telemetry::inject_current(&mut telemetry::MetadataCarrier(request.metadata_mut()));
        if let Ok(Ok(value)) = REQUEST_ID.try_with(|id| tonic::metadata::MetadataValue::try_from(id.as_str())) {
            request.metadata_mut().insert(REQUEST_ID_HEADER, value);
        }
        Ok(request)
    }
}

/// The channel type every generated client is built on.
pub type ClientChannel = InterceptedService<Balanced, PropagateContext>;

/// A channel to every replica of the service at `url`, connecting on first use and reconnecting by
/// itself, so services can start in any order; calls are spread over the replicas
/// ([`crate::balance`]).
pub fn lazy_channel(url: &str) -> Result<Balanced, InvalidTarget> {
    Balanced::new(url)
}

pub fn with_context(channel: Balanced) -> ClientChannel {
    InterceptedService::new(channel, PropagateContext)
}

/// The span of one incoming call, child of the caller's trace.
pub fn server_span(service: &'static str) -> impl Fn(&http::Request<()>) -> tracing::Span + Clone {
    move |request| {
        let request_id = request.headers().get(REQUEST_ID_HEADER).and_then(|v| v.to_str().ok()).unwrap_or("");
        let span = tracing::info_span!(
            "grpc.server",
            otel.kind = "server",
            rpc.system = "grpc",
            rpc.method = %request.uri().path(),
            service,
            request_id,
            trace_id = tracing::field::Empty,
        );
        telemetry::set_parent_from(&span, &telemetry::HeaderCarrier(request.headers()));
        span.record("trace_id", telemetry::trace_id_of(&span));
        span
    }
}

/// Records `parley_grpc_server_requests_total` and `parley_grpc_server_duration_seconds` per method and
/// status code.
#[derive(Clone, Copy)]
pub struct MetricsLayer {
    service: &'static str,
}

impl MetricsLayer {
    pub fn new(service: &'static str) -> Self {
        Self { service }
    }
}

impl<S> tower::Layer<S> for MetricsLayer {
    type Service = MetricsService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        MetricsService { inner, service: self.service }
    }
}

#[derive(Clone)]
pub struct MetricsService<S> {
    inner: S,
    service: &'static str,
}

impl<S, B, ResBody> tower::Service<http::Request<B>> for MetricsService<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<ResBody>> + Send,
    S::Future: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = BoxFuture<'static, Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        let method = request.uri().path().to_owned();
        let service = self.service;
        let started = Instant::now();
        let future = self.inner.call(request);
        Box::pin(async move {
            let result = future.await;
            // A failed unary call is "trailers only": its status is in the headers. A success carries
            // its status in the trailers, which this layer does not wait for, so no header means OK.
            let code = match &result {
                Ok(response) => response
                    .headers()
                    .get("grpc-status")
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.parse::<i32>().ok())
                    .map(|code| format!("{:?}", tonic::Code::from_i32(code)))
                    .unwrap_or_else(|| "Ok".to_owned()),
                Err(_) => "TransportError".to_owned(),
            };
            let labels = [("service", service.to_owned()), ("method", method), ("code", code)];
            metrics::counter!(crate::metrics::GRPC_SERVER_REQUESTS, &labels).increment(1);
            metrics::histogram!(crate::metrics::GRPC_SERVER_DURATION, &labels[..2])
                .record(started.elapsed().as_secs_f64());
            result
        })
    }
}

/// Serves `routes` (plus `grpc.health.v1`, reporting `health_names` as serving) on `listener` until
/// `shutdown` is cancelled, then finishes in-flight calls.
pub async fn serve(
    service: &'static str,
    listener: TcpListener,
    routes: tonic::service::Routes,
    health_names: &[&'static str],
    shutdown: CancellationToken,
) -> Result<(), tonic::transport::Error> {
    let (health_reporter, health_service) = tonic_health::server::health_reporter();
    for name in health_names {
        health_reporter.set_service_status(*name, tonic_health::ServingStatus::Serving).await;
    }
    health_reporter.set_service_status("", tonic_health::ServingStatus::Serving).await;
    let routes = routes.add_service(health_service);
    tonic::transport::Server::builder()
        .trace_fn(server_span(service))
        .layer(MetricsLayer::new(service))
        .add_routes(routes)
        .serve_with_incoming_shutdown(crate::net::grpc_incoming(listener), shutdown.cancelled_owned())
        .await
}
