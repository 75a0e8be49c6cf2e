//! Prompts as clients send them: the roles a chat message may have.

use crate::ServiceError;

/// The role a prompt message has for the model: `system` (OpenAI's `developer` is the same), `user` or
/// `assistant`; anything else is a 400 naming `messages[index].role`.
pub fn role(index: usize, role: &str) -> Result<&'static str, ServiceError> {
    match role {
        "system" | "developer" => Ok("system"),
        "user" => Ok("user"),
        "assistant" => Ok("assistant"),
        _ => Err(ServiceError::invalid_field(
            format!("messages[{index}].role"),
            "must be system, developer, user or assistant",
        )),
    }
}

/// [`role`], where a message may also be a tool's result (`tool`): the OpenAI-compatible completions,
/// which carry tool calls.
pub fn role_with_tools(index: usize, role: &str) -> Result<&'static str, ServiceError> {
    match role {
        "tool" => Ok("tool"),
        other => self::role(index, other).map_err(|_| {
            ServiceError::invalid_field(
                format!("messages[{index}].role"),
                "must be system, developer, user, assistant or tool",
            )
        }),
    }
}
