//! Parley's token estimate, for where a model's own tokenizer is not at hand: budget reservations at
//! the gateway, models without a known tokenizer, and providers that report no usage. About four
//! characters a token, as providers' tokenizers average on English text, rounded up.

/// Tokens a chat message costs beyond its text (its role and separators).
pub const PER_MESSAGE_OVERHEAD: u32 = 4;

/// What an image in a prompt is counted as: about what the larger providers charge for one of about
/// a megapixel (OpenAI's high detail at 1024x1024 is 765 tokens, Anthropic's 1.15 megapixels about
/// 1,600), so that a reservation covers it. The provider's own count is what is charged.
pub const IMAGE_ESTIMATE: u32 = 1_600;

/// The estimated tokens of `text`.
pub fn estimate(text: &str) -> u32 {
    u32::try_from(text.chars().count().div_ceil(4)).unwrap_or(u32::MAX)
}

/// The estimated tokens of a chat message with `text`, overhead included.
pub fn estimate_message(text: &str) -> u32 {
    estimate(text).saturating_add(PER_MESSAGE_OVERHEAD)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn four_characters_a_token_rounded_up() {
        assert_eq!(estimate(""), 0);
        assert_eq!(estimate("abcd"), 1);
        assert_eq!(estimate("abcde"), 2);
        assert_eq!(estimate("héllo"), 2, "characters, not bytes");
        assert_eq!(estimate_message("abcd"), 1 + PER_MESSAGE_OVERHEAD);
    }
}
