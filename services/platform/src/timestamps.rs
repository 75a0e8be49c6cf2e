//! Conversions between `time`, protobuf timestamps and RFC 3339 strings.

use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

pub fn to_proto(at: OffsetDateTime) -> prost_types::Timestamp {
    prost_types::Timestamp { seconds: at.unix_timestamp(), nanos: at.nanosecond() as i32 }
}

pub fn from_proto(at: &prost_types::Timestamp) -> Option<OffsetDateTime> {
    let nanos = i128::from(at.seconds) * 1_000_000_000 + i128::from(at.nanos);
    OffsetDateTime::from_unix_timestamp_nanos(nanos).ok()
}

/// RFC 3339 in UTC, as the public API writes every time.
pub fn rfc3339(at: OffsetDateTime) -> String {
    at.to_offset(time::UtcOffset::UTC).format(&Rfc3339).unwrap_or_default()
}

pub fn proto_to_rfc3339(at: Option<&prost_types::Timestamp>) -> Option<String> {
    at.and_then(from_proto).map(rfc3339)
}

pub fn parse_rfc3339(text: &str) -> Option<OffsetDateTime> {
    OffsetDateTime::parse(text, &Rfc3339).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proto_round_trip_keeps_microseconds() {
        let at = OffsetDateTime::from_unix_timestamp_nanos(1_764_000_000_123_456_000).unwrap();
        assert_eq!(from_proto(&to_proto(at)), Some(at));
        assert_eq!(rfc3339(at), "2025-11-24T16:00:00.123456Z");
        assert_eq!(parse_rfc3339("2025-11-24T16:00:00.123456Z"), Some(at));
    }
}
