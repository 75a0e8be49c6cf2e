//! Tool calling through the OpenAI-compatible API: the model calls a tool, the caller sends its result
//! back, the model answers with it; plain and streamed, on both provider wire formats.

use reqwest::StatusCode;
use serde_json::{Value, json};

use crate::harness::{Session, TestPlatform, read, start_with_anthropic};

fn tools() -> Value {
    json!([{
        "type": "function",
        "function": {
            "name": "lookup",
            "description": "Looks a text up.",
            "parameters": {"type": "object", "properties": {"text": {"type": "string"}}},
        },
    }, {
        "type": "function",
        "function": {"name": "other", "parameters": {"type": "object"}},
    }])
}

async fn complete(t: &TestPlatform, session: &Session, body: Value) -> (StatusCode, Value) {
    read(t.http.post(t.url("/v1/chat/completions")).bearer_auth(&session.token).json(&body).send().await.unwrap()).await
}

/// The `data:` payloads of a streamed completion, up to `[DONE]`.
async fn stream_chunks(t: &TestPlatform, session: &Session, body: Value) -> Vec<Value> {
    let response =
        t.http.post(t.url("/v1/chat/completions")).bearer_auth(&session.token).json(&body).send().await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let text = response.text().await.unwrap();
    text.lines()
        .filter_map(|line| line.strip_prefix("data: "))
        .take_while(|data| *data != "[DONE]")
        .map(|data| serde_json::from_str(data).unwrap())
        .collect()
}

/// Calls a tool, answers it and calls it again streamed, through `model`.
async fn round_trip(t: &TestPlatform, session: &Session, model: &str) {
    let question = json!([{"role": "user", "content": "find the answer"}]);
    let body = json!({"model": model, "messages": question, "tools": tools(),
        "tool_choice": {"type": "function", "function": {"name": "lookup"}}});
    let (status, called) = complete(t, session, body).await;
    assert_eq!(status, StatusCode::OK, "{called}");
    let choice = &called["choices"][0];
    assert_eq!(choice["finish_reason"], "tool_calls", "{called}");
    assert_eq!(choice["message"]["content"], Value::Null);
    let call = &choice["message"]["tool_calls"][0];
    assert_eq!(call["type"], "function");
    assert_eq!(call["function"]["name"], "lookup");
    let arguments: Value = serde_json::from_str(call["function"]["arguments"].as_str().unwrap()).unwrap();
    assert_eq!(arguments, json!({"text": "find the answer"}));
    assert!(called["usage"]["completion_tokens"].as_i64().unwrap() > 0);

    let mut thread = question.as_array().unwrap().clone();
    thread.push(json!({"role": "assistant", "content": null, "tool_calls": [call]}));
    thread.push(json!({"role": "tool", "tool_call_id": call["id"], "content": "forty-two"}));
    let (status, answered) = complete(t, session, json!({"model": model, "messages": thread, "tools": tools()})).await;
    assert_eq!(status, StatusCode::OK, "{answered}");
    assert_eq!(answered["choices"][0]["message"]["content"], "The tool said: forty-two");
    assert_eq!(answered["choices"][0]["finish_reason"], "stop");
    assert!(answered["choices"][0]["message"].get("tool_calls").is_none());

    // Streamed: the first piece of the call has its id and name, the pieces' arguments add up.
    let body = json!({"model": model, "messages": question, "tools": tools(), "stream": true});
    let chunks = stream_chunks(t, session, body).await;
    let pieces: Vec<&Value> =
        chunks.iter().filter_map(|chunk| chunk["choices"][0]["delta"]["tool_calls"].get(0)).collect();
    assert!(pieces.len() >= 2, "the call came in pieces: {chunks:?}");
    assert_eq!(pieces[0]["function"]["name"], "lookup");
    assert!(pieces[0]["id"].as_str().is_some_and(|id| !id.is_empty()));
    assert!(pieces[1..].iter().all(|piece| piece.get("id").is_none()), "{pieces:?}");
    let streamed: String = pieces.iter().map(|piece| piece["function"]["arguments"].as_str().unwrap()).collect();
    assert_eq!(serde_json::from_str::<Value>(&streamed).unwrap(), json!({"text": "find the answer"}));
    let finish = chunks.iter().find_map(|chunk| chunk["choices"][0]["finish_reason"].as_str());
    assert_eq!(finish, Some("tool_calls"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_model_calls_a_tool_and_answers_with_its_result() {
    let t = TestPlatform::start().await;
    let session = t.register("tools@example.com").await;
    round_trip(&t, &session, "parley-fake").await;
    // What reached the provider: the tools and the choice as sent, the call and its result in the thread.
    let question = json!([{"role": "user", "content": "x"}]);
    let body = json!({"model": "parley-fake", "messages": question, "tools": tools(), "tool_choice": "auto",
        "parallel_tool_calls": false});
    assert_eq!(complete(&t, &session, body).await.0, StatusCode::OK);
    let upstream = t.fake.last_body().unwrap();
    assert_eq!(upstream["tools"], tools());
    assert_eq!(upstream["tool_choice"], "auto");
    assert_eq!(upstream["parallel_tool_calls"], false);
    let thread = json!([
        {"role": "user", "content": "x"},
        {"role": "assistant", "content": "", "tool_calls": [{"id": "call_9", "type": "function",
            "function": {"name": "lookup", "arguments": "{\"text\":\"x\"}"}}]},
        {"role": "tool", "tool_call_id": "call_9", "content": "found"},
    ]);
    let (status, _) =
        complete(&t, &session, json!({"model": "parley-fake", "messages": thread, "tools": tools()})).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(t.fake.last_body().unwrap()["messages"], thread);

    // A tool's result must say which call it answers.
    let orphan = json!([{"role": "user", "content": "x"}, {"role": "tool", "content": "found"}]);
    let (status, error) = complete(&t, &session, json!({"model": "parley-fake", "messages": orphan})).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{error}");
    assert_eq!(error["error"]["param"], "messages[1].tool_call_id", "{error}");
    t.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tools_are_mapped_to_and_from_anthropic() {
    let (t, anthropic) = start_with_anthropic(|_| {}).await;
    let session = t.register("anthropic-tools@example.com").await;
    round_trip(&t, &session, "claude-fake").await;
    // The round trip's last request (streamed) offered the tools in Anthropic's shape.
    let upstream = anthropic.last_body().unwrap();
    assert_eq!(upstream["tools"][0]["name"], "lookup");
    assert_eq!(upstream["tools"][0]["description"], "Looks a text up.");
    assert_eq!(upstream["tools"][0]["input_schema"], tools()[0]["function"]["parameters"]);
    assert_eq!(upstream["tools"][1]["input_schema"], json!({"type": "object"}));

    let thread = json!([
        {"role": "user", "content": "x"},
        {"role": "assistant", "content": null, "tool_calls": [{"id": "toolu_9", "type": "function",
            "function": {"name": "lookup", "arguments": "{\"text\":\"x\"}"}}]},
        {"role": "tool", "tool_call_id": "toolu_9", "content": "found"},
    ]);
    let body = json!({"model": "claude-fake", "messages": thread, "tools": tools(), "tool_choice": "required",
        "parallel_tool_calls": false});
    let (status, answered) = complete(&t, &session, body).await;
    assert_eq!(status, StatusCode::OK, "{answered}");
    assert_eq!(answered["choices"][0]["message"]["content"], "The tool said: found");
    let upstream = anthropic.last_body().unwrap();
    assert_eq!(upstream["tool_choice"], json!({"type": "any", "disable_parallel_tool_use": true}));
    assert_eq!(
        upstream["messages"][1]["content"],
        json!([{"type": "tool_use", "id": "toolu_9", "name": "lookup", "input": {"text": "x"}}])
    );
    assert_eq!(
        upstream["messages"][2]["content"],
        json!([{"type": "tool_result", "tool_use_id": "toolu_9", "content": "found"}])
    );
    t.stop().await;
}
