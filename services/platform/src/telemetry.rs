//! Logs, traces and metrics, set up once per process by [`init`].
//!
//! - Logs are JSON lines (or human-readable with `PARLEY_LOG_FORMAT=pretty`); every request span
//!   carries `request_id`, `trace_id` and `service`, and each JSON line carries them at its top level
//!   ([`crate::json_log`]).
//! - Traces use W3C trace context, so trace ids exist and flow across gRPC metadata and NATS headers
//!   whether or not anything is exported. Spans are exported with OTLP only when an endpoint is
//!   configured; only then does the OpenTelemetry layer build span data. Otherwise a layer of
//!   Parley's own ([`TraceIds`]) gives each span its trace and span id and nothing more: a profile
//!   showed the OpenTelemetry layer spending a noticeable share of the CPU on span data nobody read.
//! - Metrics go to a Prometheus recorder rendered by [`render_metrics`] on each `/metrics` route.

use std::sync::OnceLock;

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use opentelemetry::propagation::{Extractor, Injector, TextMapPropagator};
use opentelemetry::trace::{TraceContextExt, TracerProvider as _};
use opentelemetry_otlp::WithExportConfig;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::registry::{LookupSpan, SpanData};
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer};

use crate::config::{LogFormat, TelemetryConfig};

static PROMETHEUS: OnceLock<PrometheusHandle> = OnceLock::new();
static TRACER_PROVIDER: OnceLock<SdkTracerProvider> = OnceLock::new();
/// Whether this process exports spans (so the OpenTelemetry layer holds the trace context); set by
/// the first [`init`].
static EXPORTING: OnceLock<bool> = OnceLock::new();

/// Flushes exported spans when dropped (or on [`TelemetryGuard::shutdown`]); keep it alive in `main`.
#[must_use = "dropping the guard stops span export"]
pub struct TelemetryGuard {
    provider: Option<SdkTracerProvider>,
}

impl TelemetryGuard {
    pub fn shutdown(mut self) {
        self.flush();
    }

    fn flush(&mut self) {
        if let Some(provider) = self.provider.take()
            && let Err(error) = provider.shutdown()
        {
            tracing::warn!(%error, "failed to flush spans on shutdown");
        }
    }
}

impl Drop for TelemetryGuard {
    fn drop(&mut self) {
        self.flush();
    }
}

/// Sets up logging, tracing and metrics for this process. Calling it again is harmless (tests start
/// many services in one process): the first call wins.
pub fn init(service_name: &str, config: &TelemetryConfig) -> anyhow::Result<TelemetryGuard> {
    install_metrics_recorder();
    opentelemetry::global::set_text_map_propagator(TraceContextPropagator::new());

    // Set only by the call that creates the provider: its guard is the one that flushes it.
    let mut created_exporter = false;
    let provider = TRACER_PROVIDER.get_or_init(|| {
        // OTEL_SERVICE_NAME, when set, names the service on exported spans (a Deployment's own name).
        let name = config.service_name.clone().unwrap_or_else(|| service_name.to_owned());
        let resource = opentelemetry_sdk::Resource::builder().with_service_name(name).build();
        let mut builder = SdkTracerProvider::builder().with_resource(resource);
        if let Some(endpoint) = &config.otlp_endpoint {
            match opentelemetry_otlp::SpanExporter::builder().with_tonic().with_endpoint(endpoint).build() {
                Ok(exporter) => {
                    builder = builder.with_batch_exporter(exporter);
                    created_exporter = true;
                }
                Err(error) => eprintln_warning(&format!("OTLP exporter disabled: {error}")),
            }
        }
        builder.build()
    });
    opentelemetry::global::set_tracer_provider(provider.clone());
    let exporting = *EXPORTING.get_or_init(|| created_exporter);
    let tracer = provider.tracer("parley");

    let filter = EnvFilter::try_new(&config.log_filter).unwrap_or_else(|_| EnvFilter::new("info"));
    // Entering a span does nothing here: Parley reads trace context from the tracing span itself
    // (`inject_current`), never from OpenTelemetry's thread-local current context, so activating it on
    // every poll of every instrumented future, and timing busy and idle time there, is work nobody
    // reads. Spans keep their names, fields, start and end; no thread or source-location attributes.
    let otel_layer = exporting.then(|| {
        tracing_opentelemetry::layer()
            .with_tracer(tracer)
            .with_context_activation(false)
            .with_tracked_inactivity(false)
            .with_threads(false)
            .with_location(false)
    });
    let ids_layer = (!exporting).then_some(TraceIdsLayer);
    let fmt_layer = match config.log_format {
        LogFormat::Json => tracing_subscriber::fmt::layer()
            .fmt_fields(crate::json_log::LiftedFields)
            .event_format(crate::json_log::JsonLines)
            .boxed(),
        LogFormat::Pretty => tracing_subscriber::fmt::layer().with_target(false).boxed(),
    };
    // A second call in one process finds a subscriber already set; that is fine.
    let _already_set =
        tracing_subscriber::registry().with(filter).with(otel_layer).with(ids_layer).with(fmt_layer).try_init();

    Ok(TelemetryGuard { provider: created_exporter.then(|| provider.clone()) })
}

fn eprintln_warning(message: &str) {
    // Logging is not set up yet at this point, and stdout belongs to the program's output.
    use std::io::Write;
    let _ignored = writeln!(std::io::stderr(), "warning: {message}");
}

/// Latency buckets in seconds, from 1 ms to 2 minutes: API calls live at the low end, model calls at the
/// high end.
const LATENCY_BUCKETS: &[f64] =
    &[0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.2, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0];

fn install_metrics_recorder() {
    if PROMETHEUS.get().is_some() {
        return;
    }
    let builder = PrometheusBuilder::new()
        .set_buckets_for_metric(Matcher::Suffix("_seconds".to_owned()), LATENCY_BUCKETS)
        .unwrap_or_else(|_| PrometheusBuilder::new());
    match builder.install_recorder() {
        Ok(handle) => {
            let _lost_race = PROMETHEUS.set(handle);
            crate::metrics::describe();
            metrics::gauge!(crate::metrics::BUILD_INFO, "version" => env!("CARGO_PKG_VERSION")).set(1.0);
        }
        Err(error) => eprintln_warning(&format!("metrics recorder not installed: {error}")),
    }
}

/// The Prometheus text exposition of every metric this process recorded.
pub fn render_metrics() -> String {
    install_metrics_recorder();
    PROMETHEUS.get().map(PrometheusHandle::render).unwrap_or_default()
}

/// The trace id of a span, as 32 hex digits.
pub fn trace_id_of(span: &tracing::Span) -> String {
    if exporting() {
        return span.context().span().span_context().trace_id().to_string();
    }
    TraceIds::of(span).map(|ids| format!("{:032x}", ids.trace_id)).unwrap_or_else(|| "0".repeat(32))
}

/// Makes `span` a child of the trace context found in `carrier` (when there is one).
pub fn set_parent_from(span: &tracing::Span, carrier: &dyn Extractor) {
    let parent = TraceContextPropagator::new().extract(carrier);
    let remote = parent.span().span_context().clone();
    if !remote.is_valid() {
        return;
    }
    if exporting() {
        let _ignored = span.set_parent(parent);
        return;
    }
    let trace_id = u128::from_be_bytes(remote.trace_id().to_bytes());
    span.with_subscriber(|(id, dispatch)| {
        let Some(registry) = dispatch.downcast_ref::<tracing_subscriber::Registry>() else { return };
        if let Some(data) = registry.span_data(id)
            && let Some(ids) = data.extensions_mut().get_mut::<TraceIds>()
        {
            ids.trace_id = trace_id;
        }
    });
}

/// Writes the current span's trace context into `carrier`.
pub fn inject_current(carrier: &mut dyn Injector) {
    if exporting() {
        let context = tracing::Span::current().context();
        TraceContextPropagator::new().inject_context(&context, carrier);
        return;
    }
    if let Some(ids) = TraceIds::of(&tracing::Span::current()) {
        carrier.set("traceparent", format!("00-{:032x}-{:016x}-01", ids.trace_id, ids.span_id));
    }
}

fn exporting() -> bool {
    EXPORTING.get().copied().unwrap_or(false)
}

/// A span's place in its trace, when spans are not exported: the trace's id (its parent's, or the
/// remote caller's after [`set_parent_from`], or a new one) and its own id.
#[derive(Debug, Clone, Copy)]
struct TraceIds {
    trace_id: u128,
    span_id: u64,
}

impl TraceIds {
    fn of(span: &tracing::Span) -> Option<TraceIds> {
        span.with_subscriber(|(id, dispatch)| {
            let registry = dispatch.downcast_ref::<tracing_subscriber::Registry>()?;
            registry.span_data(id)?.extensions().get::<TraceIds>().copied()
        })
        .flatten()
    }
}

/// Gives every new span its [`TraceIds`].
struct TraceIdsLayer;

impl<S> Layer<S> for TraceIdsLayer
where
    S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
{
    fn on_new_span(
        &self,
        _: &tracing::span::Attributes<'_>,
        id: &tracing::span::Id,
        ctx: tracing_subscriber::layer::Context<'_, S>,
    ) {
        let Some(span) = ctx.span(id) else { return };
        let inherited = span.parent().and_then(|parent| parent.extensions().get::<TraceIds>().map(|ids| ids.trace_id));
        let ids = TraceIds { trace_id: inherited.unwrap_or_else(random_nonzero_u128), span_id: random_nonzero_u64() };
        span.extensions_mut().insert(ids);
    }
}

thread_local! {
    /// A fast per-thread generator for ids (splitmix64), seeded once per thread from a UUIDv7's 62
    /// random bits (the OS's generator).
    static ID_STATE: std::cell::Cell<u64> = std::cell::Cell::new(uuid::Uuid::now_v7().as_u64_pair().1);
}

fn random_nonzero_u64() -> u64 {
    ID_STATE.with(|state| {
        let next = state.get().wrapping_add(0x9E37_79B9_7F4A_7C15);
        state.set(next);
        let mut z = next;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        (z ^ (z >> 31)).max(1)
    })
}

fn random_nonzero_u128() -> u128 {
    (u128::from(random_nonzero_u64()) << 64) | u128::from(random_nonzero_u64())
}

/// Trace context in gRPC metadata.
pub struct MetadataCarrier<'a>(pub &'a mut tonic::metadata::MetadataMap);

impl Injector for MetadataCarrier<'_> {
    fn set(&mut self, key: &str, value: String) {
        if let (Ok(key), Ok(value)) =
            (tonic::metadata::MetadataKey::from_bytes(key.as_bytes()), tonic::metadata::MetadataValue::try_from(value))
        {
            self.0.insert(key, value);
        }
    }
}

/// Trace context in HTTP headers (incoming gRPC and REST requests).
pub struct HeaderCarrier<'a>(pub &'a http::HeaderMap);

impl Extractor for HeaderCarrier<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|value| value.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(http::HeaderName::as_str).collect()
    }
}

/// Trace context in NATS message headers.
pub struct NatsHeaderCarrier<'a>(pub &'a mut async_nats::HeaderMap);

impl Injector for NatsHeaderCarrier<'_> {
    fn set(&mut self, key: &str, value: String) {
        self.0.insert(key, value.as_str());
    }
}

/// Reads trace context from NATS headers.
pub struct NatsHeaderReader<'a>(pub &'a async_nats::HeaderMap);

impl Extractor for NatsHeaderReader<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).map(async_nats::HeaderValue::as_str)
    }

    fn keys(&self) -> Vec<&str> {
        self.0.iter().map(|(name, _)| name.as_ref()).collect()
    }
}

/// Trace context as a plain `traceparent` string, for carriers that are database rows.
pub fn current_traceparent() -> Option<String> {
    let mut carrier = std::collections::HashMap::<String, String>::new();
    inject_current(&mut carrier);
    carrier.remove("traceparent")
}

/// Makes `span` a child of the trace context in a plain `traceparent` string (what
/// [`current_traceparent`] wrote), when it is a valid one.
pub fn set_parent_from_traceparent(span: &tracing::Span, traceparent: &str) {
    set_parent_from(span, &Traceparent(traceparent));
}

/// A `traceparent` string as a carrier of its own.
struct Traceparent<'a>(&'a str);

impl Extractor for Traceparent<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        (key == "traceparent").then_some(self.0)
    }

    fn keys(&self) -> Vec<&str> {
        vec!["traceparent"]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The subscriber of a process that exports nothing: trace ids from [`TraceIdsLayer`].
    fn ids_only() -> impl tracing::Subscriber {
        tracing_subscriber::registry().with(TraceIdsLayer)
    }

    #[test]
    fn without_export_children_share_the_trace_and_the_context_travels() {
        tracing::subscriber::with_default(ids_only(), || {
            let parent = tracing::info_span!("parent");
            let child = parent.in_scope(|| tracing::info_span!("child"));
            let trace = trace_id_of(&parent);
            assert_eq!(trace.len(), 32);
            assert_ne!(trace, "0".repeat(32));
            assert_eq!(trace_id_of(&child), trace, "a child is in its parent's trace");
            assert_ne!(trace_id_of(&tracing::info_span!("another root")), trace);

            let traceparent = child.in_scope(current_traceparent).unwrap();
            let parts: Vec<&str> = traceparent.split('-').collect();
            assert_eq!((parts[0], parts[1], parts[3]), ("00", trace.as_str(), "01"));
            assert_eq!(parts[2].len(), 16);

            // A request arriving with that context joins its trace, and so do its children.
            let stored = tracing::info_span!("stored");
            set_parent_from_traceparent(&stored, &traceparent);
            assert_eq!(trace_id_of(&stored), trace, "from the plain string too");
            let carrier = std::collections::HashMap::from([("traceparent".to_owned(), traceparent)]);
            let served = tracing::info_span!("served");
            set_parent_from(&served, &carrier);
            assert_eq!(trace_id_of(&served), trace);
            let inner = served.in_scope(|| tracing::info_span!("inner"));
            assert_eq!(trace_id_of(&inner), trace);

            // No context (or a malformed one) leaves the span's own trace.
            let lone = tracing::info_span!("lone");
            let own = trace_id_of(&lone);
            set_parent_from(&lone, &std::collections::HashMap::from([("traceparent".to_owned(), "junk".to_owned())]));
            assert_eq!(trace_id_of(&lone), own);
            set_parent_from_traceparent(&lone, "junk");
            assert_eq!(trace_id_of(&lone), own);
        });
    }
}
