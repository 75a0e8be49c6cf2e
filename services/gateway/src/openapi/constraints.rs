//! What the server checks that the types alone do not say, written into the served document: lengths,
//! patterns, ranges and enums of the bodies, headers and queries, the configured models and tiers,
//! and the request bodies of the OpenAI- and Anthropic-compatible routes (whose handlers read their
//! own wire formats). Each rule names the limit the services enforce, so that a schema fuzzer's valid
//! requests are accepted and its invalid ones refused (`make test` runs one over every operation).

use parley_platform::Config;
use parley_platform::limits::{
    MAX_API_KEY_NAME_CHARS, MAX_DISPLAY_NAME_CHARS, MAX_EMAIL_CHARS, MAX_FEEDBACK_COMMENT_CHARS,
    MAX_IDEMPOTENCY_KEY_CHARS, MAX_METADATA_KEY_CHARS, MAX_METADATA_PAIRS, MAX_METADATA_VALUE_CHARS,
    MAX_PASSWORD_CHARS, MAX_SEARCH_QUERY_CHARS, MAX_SYSTEM_PROMPT_CHARS, MAX_TITLE_CHARS, MIN_PASSWORD_CHARS,
};
use parley_platform::sampling::{MAX_LOGIT_BIAS, MAX_STOP_CHARS, MAX_STOP_SEQUENCES, MAX_TOOLS, MAX_USER_CHARS};
use serde_json::{Value, json};

/// No NUL (PostgreSQL's text cannot hold it).
const NO_NUL: &str = "^[^\\x00]*$";
/// No control characters (Unicode's Cc), and something besides white space.
const NAME: &str = "^[^\\x00-\\x1f\\x7f-\\x9f]*[^\\s\\x00-\\x1f\\x7f-\\x9f][^\\x00-\\x1f\\x7f-\\x9f]*$";
/// Something besides white space, and no NUL.
const NOT_BLANK: &str = "^[^\\x00]*[^\\s\\x00][^\\x00]*$";
/// One address, `local@domain.tld`, no white space (the user service's check).
const EMAIL: &str =
    "^[^\\s@\\x00-\\x1f\\x7f-\\x9f]+@[^\\s@.\\x00-\\x1f\\x7f-\\x9f]+(\\.[^\\s@.\\x00-\\x1f\\x7f-\\x9f]+)+$";

/// Applies the rules to `document` (the generated one, as JSON).
pub fn apply(document: &mut Value, config: &Config) {
    let chat_models: Vec<&String> = config.models.keys().filter(|model| config.serves_chat(model)).collect();
    let embeddings_models: Vec<&String> =
        config.models.keys().filter(|model| config.serves_embeddings(model)).collect();
    let tiers: Vec<&String> = config.tiers.keys().collect();
    let max_message_chars = config.chat.max_message_chars as u64;

    let schemas = &mut document["components"]["schemas"];
    // Any JSON without NUL, in its strings or its keys.
    schemas["JsonValue"] = json!({"anyOf": [
        {"type": ["null", "boolean", "number"]},
        {"type": "string", "pattern": NO_NUL},
        {"type": "array", "items": {"$ref": "#/components/schemas/JsonValue"}},
        json_object(),
    ]});
    for body in [
        "RegisterBody",
        "LoginBody",
        "RefreshBody",
        "ConversationBody",
        "SendMessageBody",
        "CreateApiKeyBody",
        "TierBody",
    ] {
        schemas[body]["type"] = json!("object");
    }
    let mut property = |schema: &str, name: &str, rules: Value| {
        if let (Some(target), Some(rules)) = (schemas[schema]["properties"][name].as_object_mut(), rules.as_object()) {
            target.extend(rules.clone());
        }
    };
    property("RegisterBody", "email", json!({"maxLength": MAX_EMAIL_CHARS, "pattern": EMAIL}));
    property("RegisterBody", "password", json!({"minLength": MIN_PASSWORD_CHARS, "maxLength": MAX_PASSWORD_CHARS}));
    property(
        "RegisterBody",
        "display_name",
        json!({"maxLength": MAX_DISPLAY_NAME_CHARS, "pattern": "^[^\\x00-\\x1f\\x7f-\\x9f]*$"}),
    );
    property("LoginBody", "email", json!({"maxLength": MAX_EMAIL_CHARS, "pattern": EMAIL}));
    property("LoginBody", "password", json!({"minLength": 1, "maxLength": MAX_PASSWORD_CHARS}));
    property("CreateApiKeyBody", "name", json!({"maxLength": MAX_API_KEY_NAME_CHARS, "pattern": NAME}));
    property("ConversationBody", "title", json!({"maxLength": MAX_TITLE_CHARS, "pattern": NO_NUL}));
    property("ConversationBody", "system_prompt", json!({"maxLength": MAX_SYSTEM_PROMPT_CHARS, "pattern": NO_NUL}));
    property("ConversationBody", "model", json!({"enum": nullable(&chat_models)}));
    property(
        "SendMessageBody",
        "content",
        json!({"minLength": 1, "maxLength": max_message_chars, "pattern": NOT_BLANK}),
    );
    property("SendMessageBody", "model", json!({"enum": nullable(&chat_models)}));
    property("FeedbackBody", "rating", json!({"enum": ["up", "down"]}));
    property("FeedbackBody", "comment", json!({"maxLength": MAX_FEEDBACK_COMMENT_CHARS, "pattern": NO_NUL}));
    for (name, low, high) in [
        ("temperature", 0.0, 2.0),
        ("top_p", 0.0, 1.0),
        ("presence_penalty", -2.0, 2.0),
        ("frequency_penalty", -2.0, 2.0),
    ] {
        property("SendMessageBody", name, json!({"minimum": low, "maximum": high}));
    }
    property("SendMessageBody", "max_tokens", json!({"minimum": 1, "maximum": i64::MAX}));
    property("SendMessageBody", "seed", json!({"minimum": i64::MIN, "maximum": i64::MAX}));
    property("SendMessageBody", "stop", json!({"oneOf": [{"type": "null"}, stop_sequence(), stop_list()]}));
    property("SendMessageBody", "logit_bias", logit_bias());
    property("SendMessageBody", "response_format", response_format());
    property("TierBody", "tier", json!({"enum": tiers}));

    // A query parameter given empty is the same as one not given.
    let or_empty = |rules: Value| json!({"anyOf": [rules, {"type": "string", "maxLength": 0}]});
    let time = || or_empty(json!({"type": "string", "format": "date-time"}));
    for (path, method, name, rules) in [
        (
            "/v1/conversations/{id}",
            "patch",
            "If-Match",
            json!({"type": "string", "pattern": "^(\\*|\"[+-]?[0-9]{1,18}\")$"}),
        ),
        (
            "/v1/conversations/{id}/messages",
            "post",
            "Idempotency-Key",
            // Spaces at either end are HTTP's to trim, so only something besides them counts.
            json!({"type": "string", "minLength": 1, "maxLength": MAX_IDEMPOTENCY_KEY_CHARS, "pattern": "^[\\x20-\\x7e]*[\\x21-\\x7e][\\x20-\\x7e]*$"}),
        ),
        ("/v1/messages/{id}/events", "get", "Last-Event-ID", json!({"type": "string", "pattern": "^[0-9]{1,18}$"})),
        ("/v1/usage", "get", "group_by", json!({"enum": ["", "day", "model"]})),
        ("/v1/admin/usage", "get", "group_by", json!({"enum": ["", "day", "model", "user"]})),
        ("/v1/usage", "get", "from", time()),
        ("/v1/usage", "get", "to", time()),
        ("/v1/admin/usage", "get", "from", time()),
        ("/v1/admin/usage", "get", "to", time()),
        ("/v1/api-keys", "get", "limit", or_empty(json!({"type": "integer", "minimum": 1, "maximum": 100}))),
        ("/v1/admin/audit", "get", "limit", or_empty(json!({"type": "integer", "minimum": 1, "maximum": 100}))),
        ("/v1/admin/audit", "get", "from", time()),
        ("/v1/admin/audit", "get", "to", time()),
        ("/v1/admin/audit", "get", "account", json!({"type": "string", "pattern": NO_NUL})),
        ("/v1/admin/audit", "get", "event", json!({"type": "string", "pattern": NO_NUL})),
        ("/v1/conversations", "get", "limit", or_empty(json!({"type": "integer", "minimum": 1, "maximum": 100}))),
        ("/v1/admin/feedback", "get", "from", time()),
        ("/v1/admin/feedback", "get", "to", time()),
        ("/v1/admin/feedback", "get", "model", json!({"type": "string", "pattern": NO_NUL})),
        ("/v1/admin/feedback", "get", "limit", or_empty(json!({"type": "integer", "minimum": 1, "maximum": 100}))),
        ("/v1/admin/feedback/summary", "get", "from", time()),
        ("/v1/admin/feedback/summary", "get", "to", time()),
        // (It must hold a word, a letter or a digit in Unicode's sense, which no pattern every JSON
        // Schema validator reads alike can say.)
        ("/v1/search", "get", "q", json!({"type": "string", "minLength": 1, "maxLength": MAX_SEARCH_QUERY_CHARS})),
        ("/v1/search", "get", "limit", or_empty(json!({"type": "integer", "minimum": 1, "maximum": 100}))),
        (
            "/v1/conversations/{id}/messages",
            "get",
            "limit",
            or_empty(json!({"type": "integer", "minimum": 1, "maximum": 100})),
        ),
    ] {
        parameter(document, path, method, name, rules);
    }
    // Where a send's reply can be read: links, so that a fuzzer reaches the reads with real ids.
    let reply =
        |target: &str| json!({"operationRef": target, "parameters": {"id": "$response.body#/assistant_message/id"}});
    for status in ["200", "202"] {
        document["paths"]["/v1/conversations/{id}/messages"]["post"]["responses"][status]["links"] = json!({
            "ReadReply": reply("#/paths/~1v1~1messages~1{id}/get"),
            "StreamReply": reply("#/paths/~1v1~1messages~1{id}~1events/get"),
        });
    }
    // A conversation may be started without a body; a body, when there is one, is an object.
    document["paths"]["/v1/conversations"]["post"]["requestBody"] = json!({
        "required": false,
        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/ConversationBody"}}},
    });
    // A stored completion's update carries its new metadata and nothing else.
    let update = json!({"type": "object", "required": ["metadata"], "additionalProperties": false,
        "properties": {"metadata": metadata()}});
    document["paths"]["/v1/chat/completions/{id}"]["post"]["requestBody"] =
        json!({"required": true, "content": {"application/json": {"schema": update}}});
    for (path, rules) in [
        ("/v1/chat/completions", chat_completion(&chat_models, max_message_chars)),
        ("/v1/messages", anthropic_message(&chat_models, max_message_chars, true)),
        ("/v1/messages/count_tokens", anthropic_message(&chat_models, max_message_chars, false)),
        ("/v1/embeddings", embeddings(&embeddings_models, max_message_chars)),
    ] {
        let operation = &mut document["paths"][path]["post"];
        operation["requestBody"] = json!({"required": true, "content": {"application/json": {"schema": rules}}});
        for (status, description) in [("400", "Invalid input"), ("413", "The body is larger than the limit")] {
            if operation["responses"].get(status).is_none() {
                operation["responses"][status] =
                    json!({"description": description, "content": {"application/json": {}}});
            }
        }
    }
}

/// Merges `rules` into the schema of an operation's parameter.
fn parameter(document: &mut Value, path: &str, method: &str, name: &str, rules: Value) {
    let Some(parameters) = document["paths"][path][method]["parameters"].as_array_mut() else {
        return;
    };
    for parameter in parameters.iter_mut().filter(|parameter| parameter["name"] == name) {
        // The rules say everything about the value: they replace the generated schema.
        parameter["schema"] = rules.clone();
    }
}

fn nullable(values: &[&String]) -> Vec<Value> {
    values.iter().map(|value| json!(value)).chain([Value::Null]).collect()
}

fn stop_sequence() -> Value {
    json!({"type": "string", "minLength": 1, "maxLength": MAX_STOP_CHARS, "pattern": NO_NUL})
}

fn stop_list() -> Value {
    json!({"type": "array", "maxItems": MAX_STOP_SEQUENCES, "items": stop_sequence()})
}

fn logit_bias() -> Value {
    json!({
        "type": ["object", "null"],
        "maxProperties": MAX_LOGIT_BIAS,
        "propertyNames": {"pattern": "^[0-9]{1,9}$"},
        "additionalProperties": {"type": "integer", "minimum": -100, "maximum": 100},
    })
}

/// A JSON object without NUL.
fn json_object() -> Value {
    json!({
        "type": "object",
        "propertyNames": {"pattern": NO_NUL},
        "additionalProperties": {"$ref": "#/components/schemas/JsonValue"},
    })
}

fn response_format() -> Value {
    json!({"oneOf": [
        {"type": "null"},
        // Other keys beside `type` are not read.
        {"type": "object", "required": ["type"], "properties": {"type": {"enum": ["text", "json_object"]}}},
        {"type": "object", "required": ["type", "json_schema"], "additionalProperties": false,
         "properties": {
             "type": {"const": "json_schema"},
             "json_schema": {
                 "type": "object",
                 "required": ["name"],
                 "propertyNames": {"pattern": NO_NUL},
                 "additionalProperties": {"$ref": "#/components/schemas/JsonValue"},
                 "properties": {
                     "name": {"type": "string", "pattern": "^[A-Za-z0-9_-]{1,64}$"},
                     "schema": json_object(),
                     "strict": {"type": ["boolean", "null"]},
                     "description": {"type": "string", "pattern": NO_NUL},
                 },
             },
         }},
    ]})
}

/// A message's content: a string, or a list of text parts (`{"type": "text", "text"}`). Images and
/// tool calls are served too, as the README says; a fuzzer's made-up ones would be refused.
fn content(max_chars: u64, nullable: bool) -> Value {
    let part = json!({
        "type": "object",
        "required": ["type", "text"],
        "properties": {"type": {"const": "text"}, "text": {"type": "string", "maxLength": max_chars}},
    });
    let mut kinds = vec![json!({"type": "string", "maxLength": max_chars}), json!({"type": "array", "items": part})];
    if nullable {
        kinds.push(json!({"type": "null"}));
    }
    json!({"oneOf": kinds})
}

/// A 64-bit integer, as the server reads one.
fn long(minimum: i64) -> Value {
    json!({"type": ["integer", "null"], "minimum": minimum, "maximum": i64::MAX})
}

/// `POST /v1/chat/completions`: the parameters most clients send (the rest are in the README and
/// refused or passed as described there; an unknown one is a 400).
fn chat_completion(models: &[&String], max_chars: u64) -> Value {
    json!({
        "type": "object",
        "required": ["model", "messages"],
        "additionalProperties": false,
        "properties": {
            "model": {"enum": models},
            "messages": {
                "type": "array",
                "minItems": 1,
                "items": {
                    "type": "object",
                    "required": ["role"],
                    "properties": {
                        "role": {"enum": ["system", "developer", "user", "assistant"]},
                        "content": content(max_chars, true),
                    },
                },
            },
            "stream": {"type": "boolean"},
            "max_completion_tokens": long(1),
            "max_tokens": long(1),
            "temperature": {"type": ["number", "null"], "minimum": 0, "maximum": 2},
            "top_p": {"type": ["number", "null"], "minimum": 0, "maximum": 1},
            "presence_penalty": {"type": ["number", "null"], "minimum": -2, "maximum": 2},
            "frequency_penalty": {"type": ["number", "null"], "minimum": -2, "maximum": 2},
            "seed": long(i64::MIN),
            "stop": {"oneOf": [{"type": "null"}, stop_sequence(), stop_list()]},
            "logit_bias": logit_bias(),
            "user": {"type": ["string", "null"], "maxLength": MAX_USER_CHARS, "pattern": NO_NUL},
            "n": {"enum": [1, null]},
            "response_format": response_format(),
            "store": {"type": ["boolean", "null"]},
            "metadata": metadata(),
        },
    })
}

/// OpenAI's `metadata` of a stored completion: up to 16 string pairs, keys of at most 64 characters,
/// values of at most 512, no NUL (PostgreSQL's jsonb cannot hold it).
fn metadata() -> Value {
    json!({
        "type": ["object", "null"],
        "maxProperties": MAX_METADATA_PAIRS,
        "propertyNames": {"maxLength": MAX_METADATA_KEY_CHARS, "pattern": NO_NUL},
        "additionalProperties": {"type": "string", "maxLength": MAX_METADATA_VALUE_CHARS, "pattern": NO_NUL},
    })
}

/// `POST /v1/messages` (and, without `max_tokens` and `stream`, `count_tokens`).
fn anthropic_message(models: &[&String], max_chars: u64, generates: bool) -> Value {
    let mut body = json!({
        "type": "object",
        "required": ["model", "messages"],
        "additionalProperties": false,
        "properties": {
            "model": {"enum": models},
            "messages": {
                "type": "array",
                "minItems": 1,
                "items": {
                    "type": "object",
                    "required": ["role", "content"],
                    "additionalProperties": false,
                    "properties": {
                        "role": {"enum": ["user", "assistant"]},
                        "content": content(max_chars, false),
                    },
                },
            },
            "system": content(max_chars, true),
            "stop_sequences": stop_list(),
            "temperature": {"type": ["number", "null"], "minimum": 0, "maximum": 1},
            "top_p": {"type": ["number", "null"], "minimum": 0, "maximum": 1},
            "metadata": {
                "type": ["object", "null"],
                "additionalProperties": false,
                "properties": {"user_id": {"type": ["string", "null"], "maxLength": MAX_USER_CHARS, "pattern": NO_NUL}},
            },
            "tools": {"type": "array", "maxItems": MAX_TOOLS, "items": {
                "type": "object",
                "required": ["name", "input_schema"],
                "properties": {
                    "type": {"enum": ["custom", null]},
                    "name": {"type": "string", "pattern": "^[A-Za-z0-9_-]{1,64}$"},
                    "description": {"$ref": "#/components/schemas/JsonValue"},
                    "input_schema": json_object(),
                },
            }},
        },
    });
    if generates {
        body["required"] = json!(["model", "messages", "max_tokens"]);
        body["properties"]["max_tokens"] = json!({"type": "integer", "minimum": 1, "maximum": i64::MAX});
        body["properties"]["stream"] = json!({"type": "boolean"});
    }
    body
}

/// `POST /v1/embeddings`.
fn embeddings(models: &[&String], max_chars: u64) -> Value {
    let input = json!({"type": "string", "minLength": 1, "maxLength": max_chars});
    json!({
        "type": "object",
        "required": ["model", "input"],
        "additionalProperties": false,
        "properties": {
            "model": {"enum": models},
            "input": {"oneOf": [input, {"type": "array", "minItems": 1, "maxItems": 2048, "items": input}]},
            "encoding_format": {"enum": ["float", "base64", null]},
            "dimensions": {"type": ["integer", "null"], "minimum": 1, "maximum": crate::routes::embeddings::MAX_DIMENSIONS},
            "user": {"type": ["string", "null"], "maxLength": MAX_USER_CHARS, "pattern": NO_NUL},
        },
    })
}
