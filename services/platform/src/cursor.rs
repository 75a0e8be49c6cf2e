//! Opaque, tamper-evident keyset cursors for every paginated list: the position (a timestamp and an
//! id) plus an HMAC-SHA256 tag under a secret shared by every replica (`chat.cursor_secret`,
//! `PARLEY_CURSOR_SECRET`). An altered cursor fails verification and is a 400.

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use ring::hmac;
use time::OffsetDateTime;
use uuid::Uuid;

/// Which listing a cursor belongs to, so a cursor from one list is refused by another.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum CursorKind {
    Conversations = 1,
    Messages = 2,
    ApiKeys = 3,
    Audit = 4,
    /// Search results, whose position is a rank, not a time ([`CursorCodec::encode_ranked`]).
    Search = 5,
    /// The feedback export.
    Feedback = 6,
}

/// Page sizes every list honours: the default when the client names none, and the most it may ask.
pub const DEFAULT_PAGE: u32 = 20;
pub const MAX_PAGE: u32 = 100;

/// The page size for a requested `limit` (0: the default), capped.
pub fn page_size(limit: u32) -> u32 {
    match limit {
        0 => DEFAULT_PAGE,
        limit => limit.min(MAX_PAGE),
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Position {
    pub at: OffsetDateTime,
    pub id: Uuid,
}

const PAYLOAD_LEN: usize = 1 + 16 + 16;

#[derive(Clone)]
pub struct CursorCodec {
    key: hmac::Key,
}

impl CursorCodec {
    pub fn new(secret: &str) -> Self {
        Self { key: hmac::Key::new(hmac::HMAC_SHA256, secret.as_bytes()) }
    }

    pub fn encode(&self, kind: CursorKind, position: Position) -> String {
        self.encode_parts(kind, position.at.unix_timestamp_nanos(), position.id)
    }

    /// The cursor after a result of a ranked list (higher ranks first, then higher ids).
    pub fn encode_ranked(&self, kind: CursorKind, rank: f32, id: Uuid) -> String {
        self.encode_parts(kind, i128::from(rank.to_bits()), id)
    }

    /// The rank and id in a client's `cursor` for a ranked list, as [`CursorCodec::read`] does.
    pub fn read_ranked(
        &self,
        kind: CursorKind,
        cursor: Option<&str>,
    ) -> Result<Option<(f32, Uuid)>, crate::ServiceError> {
        match cursor.filter(|cursor| !cursor.is_empty()) {
            None => Ok(None),
            Some(cursor) => self
                .decode_parts(kind, cursor)
                .and_then(|(key, id)| Some((f32::from_bits(u32::try_from(key).ok()?), id)))
                .map(Some)
                .ok_or_else(|| crate::ServiceError::invalid_field("cursor", "is not a cursor this list issued")),
        }
    }

    fn encode_parts(&self, kind: CursorKind, key: i128, id: Uuid) -> String {
        let mut bytes = Vec::with_capacity(PAYLOAD_LEN + 32);
        bytes.push(kind as u8);
        bytes.extend_from_slice(&key.to_be_bytes());
        bytes.extend_from_slice(id.as_bytes());
        let tag = hmac::sign(&self.key, &bytes);
        bytes.extend_from_slice(tag.as_ref());
        URL_SAFE_NO_PAD.encode(bytes)
    }

    /// The position in a client's `cursor` (none or empty: the first page), or a 400 naming the field
    /// when it is malformed, forged or from another listing.
    pub fn read(&self, kind: CursorKind, cursor: Option<&str>) -> Result<Option<Position>, crate::ServiceError> {
        match cursor.filter(|cursor| !cursor.is_empty()) {
            None => Ok(None),
            Some(cursor) => self
                .decode(kind, cursor)
                .map(Some)
                .ok_or_else(|| crate::ServiceError::invalid_field("cursor", "is not a cursor this list issued")),
        }
    }

    /// Cuts `rows`, read with one more than `limit`, to the page, and returns the cursor of the next
    /// page when that extra row showed there is one.
    pub fn next_page<T>(
        &self,
        kind: CursorKind,
        rows: &mut Vec<T>,
        limit: u32,
        position: impl Fn(&T) -> Position,
    ) -> Option<String> {
        if rows.len() <= limit as usize {
            return None;
        }
        rows.truncate(limit as usize);
        rows.last().map(|last| self.encode(kind, position(last)))
    }

    /// The position in `cursor`, or `None` when it is malformed, forged or from another listing.
    pub fn decode(&self, kind: CursorKind, cursor: &str) -> Option<Position> {
        let (nanos, id) = self.decode_parts(kind, cursor)?;
        Some(Position { at: OffsetDateTime::from_unix_timestamp_nanos(nanos).ok()?, id })
    }

    fn decode_parts(&self, kind: CursorKind, cursor: &str) -> Option<(i128, Uuid)> {
        let bytes = URL_SAFE_NO_PAD.decode(cursor).ok()?;
        if bytes.len() != PAYLOAD_LEN + 32 {
            return None;
        }
        let (payload, tag) = bytes.split_at(PAYLOAD_LEN);
        hmac::verify(&self.key, payload, tag).ok()?;
        if payload[0] != kind as u8 {
            return None;
        }
        let key = i128::from_be_bytes(payload[1..17].try_into().ok()?);
        let id = Uuid::from_slice(&payload[17..33]).ok()?;
        Some((key, id))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn position() -> Position {
        Position {
            at: OffsetDateTime::from_unix_timestamp_nanos(1_764_000_000_123_456_000).unwrap(),
            id: Uuid::now_v7(),
        }
    }

    #[test]
    fn ranked_cursors_round_trip_and_stay_in_their_list() {
        let codec = CursorCodec::new("a secret of sixteen+ chars");
        let id = Uuid::now_v7();
        let cursor = codec.encode_ranked(CursorKind::Search, 0.0607927, id);
        assert_eq!(codec.read_ranked(CursorKind::Search, Some(&cursor)).unwrap(), Some((0.0607927, id)));
        assert!(codec.read_ranked(CursorKind::Messages, Some(&cursor)).is_err());
        assert!(codec.read(CursorKind::Search, Some(&codec.encode(CursorKind::Search, position()))).is_ok());
    }

    #[test]
    fn round_trip() {
        let codec = CursorCodec::new("a secret of sixteen+ chars");
        let position = position();
        let cursor = codec.encode(CursorKind::Messages, position);
        assert_eq!(codec.decode(CursorKind::Messages, &cursor), Some(position));
    }

    #[test]
    fn tampering_wrong_kind_and_wrong_key_are_refused() {
        let codec = CursorCodec::new("a secret of sixteen+ chars");
        let cursor = codec.encode(CursorKind::Messages, position());
        let mut bytes = URL_SAFE_NO_PAD.decode(&cursor).unwrap();
        bytes[5] ^= 1;
        assert_eq!(codec.decode(CursorKind::Messages, &URL_SAFE_NO_PAD.encode(bytes)), None);
        assert_eq!(codec.decode(CursorKind::Conversations, &cursor), None);
        assert_eq!(CursorCodec::new("another secret, sixteen+").decode(CursorKind::Messages, &cursor), None);
        assert_eq!(codec.decode(CursorKind::Messages, "not-a-cursor"), None);
        assert_eq!(codec.decode(CursorKind::Messages, ""), None);
    }
}
