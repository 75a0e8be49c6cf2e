//! One trace per chat message: an in-process OTLP receiver collects the spans, and a single trace id
//! covers the gateway, chat, the agent, quota and analytics, across gRPC and NATS hops, with GenAI
//! attributes on the model call.

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{TraceService, TraceServiceServer};
use opentelemetry_proto::tonic::collector::trace::v1::{ExportTraceServiceRequest, ExportTraceServiceResponse};
use opentelemetry_proto::tonic::common::v1::any_value::Value as AnyValue;
use opentelemetry_proto::tonic::trace::v1::Span;
use parley_platform::config::TelemetryConfig;
use reqwest::StatusCode;
use serde_json::json;

use crate::harness::{TestPlatform, eventually};

#[derive(Clone, Default)]
struct Collector {
    spans: Arc<Mutex<Vec<Span>>>,
}

#[tonic::async_trait]
impl TraceService for Collector {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let mut spans = self.spans.lock().unwrap();
        for resource in request.into_inner().resource_spans {
            for scope in resource.scope_spans {
                spans.extend(scope.spans);
            }
        }
        Ok(tonic::Response::new(ExportTraceServiceResponse { partial_success: None }))
    }
}

fn attribute(span: &Span, key: &str) -> Option<String> {
    span.attributes.iter().find(|attribute| attribute.key == key).and_then(|attribute| {
        match attribute.value.as_ref()?.value.as_ref()? {
            AnyValue::StringValue(text) => Some(text.clone()),
            AnyValue::IntValue(number) => Some(number.to_string()),
            _ => None,
        }
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_trace_covers_a_message_across_every_service() {
    let collector = Collector::default();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let endpoint = format!("http://{}", listener.local_addr().unwrap());
    let receiver = tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(TraceServiceServer::new(collector.clone()))
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );
    // Telemetry is set up once per process: exporting to the receiver before the platform starts.
    let config =
        TelemetryConfig { otlp_endpoint: Some(endpoint), log_filter: "info".to_owned(), ..TelemetryConfig::default() };
    let telemetry = parley_platform::telemetry::init("parley-test", &config).unwrap();

    let t = TestPlatform::start().await;
    let session = t.register("traced@example.com").await;
    let conversation = t.create_conversation(&session, "traced").await;
    let (status, _) =
        t.post(&session, &format!("/v1/conversations/{conversation}/messages"), json!({"content": "trace me"})).await;
    assert_eq!(status, StatusCode::OK);
    eventually("the usage event to be stored", Duration::from_secs(10), || async {
        let (_, usage) = t.get(&session, "/v1/usage").await;
        (usage["totals"]["requests"] == 1).then_some(())
    })
    .await;
    t.stop().await;
    telemetry.shutdown();

    let spans = collector.spans.lock().unwrap().clone();
    let send = spans
        .iter()
        .find(|span| {
            span.name == "http.request"
                && attribute(span, "http.route").as_deref() == Some("/v1/conversations/{id}/messages")
        })
        .expect("the gateway's span for the send");
    let trace: Vec<&Span> = spans.iter().filter(|span| span.trace_id == send.trace_id).collect();
    let services: BTreeSet<String> = trace.iter().filter_map(|span| attribute(span, "service")).collect();
    for service in ["api-gateway", "chat", "agent", "quota", "analytics"] {
        assert!(services.contains(service), "{service} is missing from the trace: {services:?}");
    }
    let model_call = trace.iter().find(|span| span.name == "gen_ai.chat").expect("the model call's span");
    assert_eq!(attribute(model_call, "gen_ai.request.model").as_deref(), Some("fake-echo"));
    assert!(attribute(model_call, "gen_ai.usage.output_tokens").is_some());
    receiver.abort();
}
