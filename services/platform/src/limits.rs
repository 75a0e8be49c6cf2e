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
