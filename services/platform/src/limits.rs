//! The limits on what clients write, in characters: defined once, enforced by the services that own
//! the data (user, chat, gateway) and stated by the served OpenAPI document from these same values.

/// An account's email (RFC 5321's longest path).
pub const MAX_EMAIL_CHARS: usize = 254;
pub const MIN_PASSWORD_CHARS: usize = 10;
pub const MAX_PASSWORD_CHARS: usize = 1024;
pub const MAX_DISPLAY_NAME_CHARS: usize = 100;
pub const MAX_API_KEY_NAME_CHARS: usize = 100;
pub const MAX_TITLE_CHARS: usize = 200;
/// Longest search query (`GET /v1/search?q=`), in characters.
pub const MAX_SEARCH_QUERY_CHARS: usize = 500;
/// Longest comment on a reply's rating, in characters.
pub const MAX_FEEDBACK_COMMENT_CHARS: usize = 2_000;
pub const MAX_SYSTEM_PROMPT_CHARS: usize = 32_000;
pub const MAX_IDEMPOTENCY_KEY_CHARS: usize = 255;

/// A stored completion's `metadata` (OpenAI's limits): at most this many pairs...
pub const MAX_METADATA_PAIRS: usize = 16;
/// ...under keys of at most this many characters...
pub const MAX_METADATA_KEY_CHARS: usize = 64;
/// ...with string values of at most this many.
pub const MAX_METADATA_VALUE_CHARS: usize = 512;

/// A stored completion's `metadata`, checked: a JSON object (null is none) within the limits above,
/// with no NUL in its keys or values (PostgreSQL's jsonb cannot hold it). `Err`: why not, for the
/// client.
pub fn metadata(value: &serde_json::Value) -> Result<serde_json::Map<String, serde_json::Value>, String> {
    let map = match value {
        serde_json::Value::Null => return Ok(serde_json::Map::new()),
        serde_json::Value::Object(map) => map,
        _ => return Err("must be an object of strings".to_owned()),
    };
    if map.len() > MAX_METADATA_PAIRS {
        return Err(format!("at most {MAX_METADATA_PAIRS} pairs"));
    }
    for (key, value) in map {
        let Some(text) = value.as_str() else {
            return Err(format!("the value of {key:?} must be a string"));
        };
        if key.contains('\0') || text.contains('\0') {
            return Err("keys and values must not contain NUL".to_owned());
        }
        if key.chars().count() > MAX_METADATA_KEY_CHARS {
            return Err(format!("the key {key:?} is longer than {MAX_METADATA_KEY_CHARS} characters"));
        }
        if text.chars().count() > MAX_METADATA_VALUE_CHARS {
            return Err(format!("the value of {key:?} is longer than {MAX_METADATA_VALUE_CHARS} characters"));
        }
    }
    Ok(map.clone())
}
