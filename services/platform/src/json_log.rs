//! The JSON log line format: one object per event with `timestamp`, `level`, `target`, the event's
//! fields, and, lifted to the top level from the spans the event happened in, `trace_id`,
//! `request_id` and `service` (the innermost span that has one wins), plus `span`, the innermost
//! span's name. An SRE can then filter a whole request or trace with one `jq 'select(.trace_id == ...)'`.

use std::fmt;

use serde_json::{Map, Value};
use tracing::field::{Field, Visit};
use tracing::{Event, Subscriber};
use tracing_subscriber::fmt::format::{JsonFields, Writer};
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormattedFields};
use tracing_subscriber::registry::LookupSpan;

/// Span fields copied to the top level of every line logged inside the span.
const LIFTED: &[&str] = &["trace_id", "request_id", "service"];

/// Formats events as described in the module documentation; use with [`JsonFields`] as the field
/// formatter, so span fields are stored as JSON.
pub struct JsonLines;

struct FieldsVisitor<'a>(&'a mut Map<String, Value>);

impl Visit for FieldsVisitor<'_> {
    fn record_str(&mut self, field: &Field, value: &str) {
        self.0.insert(field.name().to_owned(), Value::from(value));
    }
    fn record_i64(&mut self, field: &Field, value: i64) {
        self.0.insert(field.name().to_owned(), Value::from(value));
    }
    fn record_u64(&mut self, field: &Field, value: u64) {
        self.0.insert(field.name().to_owned(), Value::from(value));
    }
    fn record_f64(&mut self, field: &Field, value: f64) {
        self.0.insert(field.name().to_owned(), Value::from(value));
    }
    fn record_bool(&mut self, field: &Field, value: bool) {
        self.0.insert(field.name().to_owned(), Value::from(value));
    }
    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        self.0.insert(field.name().to_owned(), Value::from(format!("{value:?}")));
    }
}

impl<S> FormatEvent<S, JsonFields> for JsonLines
where
    S: Subscriber + for<'a> LookupSpan<'a>,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, JsonFields>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        let mut line = Map::new();
        let timestamp =
            time::OffsetDateTime::now_utc().format(&time::format_description::well_known::Rfc3339).unwrap_or_default();
        line.insert("timestamp".to_owned(), Value::from(timestamp));
        line.insert("level".to_owned(), Value::from(event.metadata().level().as_str()));
        line.insert("target".to_owned(), Value::from(event.metadata().target()));
        if let Some(scope) = ctx.event_scope() {
            let mut innermost = None;
            // From the root outwards to the innermost span, so inner values overwrite outer ones.
            for span in scope.from_root() {
                innermost = Some(span.name());
                let extensions = span.extensions();
                let Some(fields) = extensions.get::<FormattedFields<JsonFields>>() else { continue };
                let Ok(Value::Object(fields)) = serde_json::from_str::<Value>(fields.as_str()) else { continue };
                for key in LIFTED {
                    if let Some(value) = fields.get(*key).filter(|value| value.as_str() != Some("")) {
                        line.insert((*key).to_owned(), value.clone());
                    }
                }
            }
            if let Some(name) = innermost {
                line.insert("span".to_owned(), Value::from(name));
            }
        }
        event.record(&mut FieldsVisitor(&mut line));
        let text = serde_json::to_string(&line).map_err(|_| fmt::Error)?;
        writeln!(writer, "{text}")
    }
}

#[cfg(test)]
mod tests {
    use std::io;
    use std::sync::{Arc, Mutex};

    use tracing_subscriber::layer::SubscriberExt;

    use super::*;

    #[derive(Clone, Default)]
    struct Buffer(Arc<Mutex<Vec<u8>>>);

    impl io::Write for Buffer {
        fn write(&mut self, bytes: &[u8]) -> io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(bytes);
            Ok(bytes.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn request_and_trace_ids_are_top_level_fields() {
        let buffer = Buffer::default();
        let writer = buffer.clone();
        let layer = tracing_subscriber::fmt::layer()
            .fmt_fields(JsonFields::new())
            .event_format(JsonLines)
            .with_writer(move || writer.clone());
        let subscriber = tracing_subscriber::registry().with(layer);
        tracing::subscriber::with_default(subscriber, || {
            let outer = tracing::info_span!(
                "http.request",
                service = "api-gateway",
                request_id = "r-1",
                trace_id = tracing::field::Empty
            );
            outer.record("trace_id", "4bf92f3577b34da6a3ce929d0e0e4736");
            let _outer = outer.enter();
            let inner = tracing::info_span!("grpc.call", service = "chat");
            let _inner = inner.enter();
            tracing::info!(conversation_id = "c-9", attempts = 2, "conversation created");
        });
        let text = String::from_utf8(buffer.0.lock().unwrap().clone()).unwrap();
        let line: Value = serde_json::from_str(text.trim()).unwrap();
        assert_eq!(line["message"], "conversation created");
        assert_eq!(line["level"], "INFO");
        assert_eq!(line["trace_id"], "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(line["request_id"], "r-1");
        assert_eq!(line["service"], "chat", "the innermost span's service wins");
        assert_eq!(line["span"], "grpc.call");
        assert_eq!(line["conversation_id"], "c-9");
        assert_eq!(line["attempts"], 2);
    }
}
