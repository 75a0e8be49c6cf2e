//! The JSON log line format: one object per event with `timestamp`, `level`, `target`, the event's
//! fields, and, lifted to the top level from the spans the event happened in, `trace_id`,
//! `request_id` and `service` (the innermost span that has one wins), plus `span`, the innermost
//! span's name. An SRE can then filter a whole request or trace with one `jq 'select(.trace_id == ...)'`.

use std::fmt;

use serde_json::{Map, Value};
use tracing::field::{Field, Visit};
use tracing::{Event, Subscriber};
use tracing_subscriber::field::RecordFields;
use tracing_subscriber::fmt::format::{FormatFields, Writer};
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormattedFields};
use tracing_subscriber::registry::LookupSpan;

/// Span fields copied to the top level of every line logged inside the span.
const LIFTED: &[&str] = &["trace_id", "request_id", "service"];

/// Formats events as described in the module documentation; use with [`LiftedFields`] as the field
/// formatter, which keeps of each span only what the lines lift from it.
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

/// The span field formatter of [`JsonLines`]: of each span's fields it keeps only the [`LIFTED`] ones,
/// one `name=<JSON value>` line each, appended as they are recorded. Every span of every request
/// passes through it, so it does no more than that: formatting all of a span's fields as JSON, and
/// parsing and rewriting them on each `Span::record`, cost a few percent of a busy gateway's CPU for
/// fields no line showed.
pub struct LiftedFields;

impl LiftedFields {
    /// The lifted fields stored for one span, in the order they were recorded.
    fn read(fields: &FormattedFields<LiftedFields>) -> impl Iterator<Item = (&str, Value)> {
        fields.fields.lines().filter_map(|line| {
            let (key, value) = line.split_once('=')?;
            Some((key, serde_json::from_str(value).ok()?))
        })
    }
}

impl<'writer> FormatFields<'writer> for LiftedFields {
    fn format_fields<R: RecordFields>(&self, mut writer: Writer<'writer>, fields: R) -> fmt::Result {
        let mut visitor = LiftedVisitor { writer: &mut writer, result: Ok(()) };
        fields.record(&mut visitor);
        visitor.result
    }

    fn add_fields(
        &self,
        current: &'writer mut FormattedFields<Self>,
        fields: &tracing::span::Record<'_>,
    ) -> fmt::Result {
        self.format_fields(current.as_writer(), fields)
    }
}

/// Writes the lifted fields it visits as `name=<JSON value>` lines.
struct LiftedVisitor<'a, 'writer> {
    writer: &'a mut Writer<'writer>,
    result: fmt::Result,
}

impl LiftedVisitor<'_, '_> {
    fn write(&mut self, field: &Field, value: Value) {
        if self.result.is_ok() && LIFTED.contains(&field.name()) {
            // JSON escapes line breaks, so one value is one line.
            self.result = writeln!(self.writer, "{}={value}", field.name());
        }
    }
}

impl Visit for LiftedVisitor<'_, '_> {
    fn record_str(&mut self, field: &Field, value: &str) {
        self.write(field, Value::from(value));
    }

    fn record_i64(&mut self, field: &Field, value: i64) {
        self.write(field, Value::from(value));
    }

    fn record_u64(&mut self, field: &Field, value: u64) {
        self.write(field, Value::from(value));
    }

    fn record_bool(&mut self, field: &Field, value: bool) {
        self.write(field, Value::from(value));
    }

    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        if LIFTED.contains(&field.name()) {
            self.write(field, Value::from(format!("{value:?}")));
        }
    }
}

impl<S> FormatEvent<S, LiftedFields> for JsonLines
where
    S: Subscriber + for<'a> LookupSpan<'a>,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, LiftedFields>,
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
                let Some(fields) = extensions.get::<FormattedFields<LiftedFields>>() else { continue };
                // In the order recorded, so a value recorded later overwrites an earlier one.
                for (key, value) in LiftedFields::read(fields) {
                    if value.as_str() != Some("") {
                        line.insert(key.to_owned(), value);
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

    /// The one line `log` writes, formatted as Parley's JSON logs are.
    fn logged_line(log: impl FnOnce()) -> Value {
        let buffer = Buffer::default();
        let writer = buffer.clone();
        let layer = tracing_subscriber::fmt::layer()
            .fmt_fields(LiftedFields)
            .event_format(JsonLines)
            .with_writer(move || writer.clone());
        tracing::subscriber::with_default(tracing_subscriber::registry().with(layer), log);
        let text = String::from_utf8(buffer.0.lock().unwrap().clone()).unwrap();
        serde_json::from_str(text.trim()).unwrap()
    }

    #[test]
    fn request_and_trace_ids_are_top_level_fields() {
        let line = logged_line(|| {
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
        assert_eq!(line["message"], "conversation created");
        assert_eq!(line["level"], "INFO");
        assert_eq!(line["trace_id"], "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(line["request_id"], "r-1");
        assert_eq!(line["service"], "chat", "the innermost span's service wins");
        assert_eq!(line["span"], "grpc.call");
        assert_eq!(line["conversation_id"], "c-9");
        assert_eq!(line["attempts"], 2);
    }

    #[test]
    fn a_span_field_recorded_again_shows_its_last_value_and_odd_text_survives() {
        let line = logged_line(|| {
            let span = tracing::info_span!(
                "agent.job",
                service = "agent",
                request_id = "a=b\nc\"d",
                trace_id = tracing::field::Empty,
                attempts = 1
            );
            span.record("trace_id", "first");
            span.record("trace_id", tracing::field::display("second"));
            span.record("attempts", 2);
            let _entered = span.enter();
            tracing::info!("working");
        });
        assert_eq!(line["trace_id"], "second");
        assert_eq!(line["request_id"], "a=b\nc\"d");
        assert_eq!(line["service"], "agent");
        assert!(line.get("attempts").is_none(), "only the lifted span fields reach the line: {line}");
    }
}
