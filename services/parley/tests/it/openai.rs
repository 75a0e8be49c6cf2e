//! The OpenAI-compatible API, driven by the official OpenAI Python and Node SDKs and by hand for error
//! shapes.

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use parley_fake_llm::Knobs;
use reqwest::StatusCode;
use serde_json::json;

use crate::harness::{TestPlatform, eventually, read};

/// Where the tests' tools live (`make tools`).
pub(crate) fn tools_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../.tools")
}

/// Runs an official SDK's script (`tests/sdk/<script>`) with `program` against `t`, with an API key of
/// a new user, as SDK users authenticate; fails the test with the script's output when it fails.
/// Returns the user's session.
pub(crate) async fn run_sdk_script(
    t: &TestPlatform,
    email: &str,
    program: PathBuf,
    script: &str,
    env: Vec<(&'static str, String)>,
) -> crate::harness::Session {
    // A bare name (node) is looked up on the PATH when it runs.
    assert!(!program.is_absolute() || program.exists(), "{} is not installed: run `make tools`", program.display());
    let session = t.register(email).await;
    let (status, created) = t.post(&session, "/v1/api-keys", serde_json::json!({"name": "sdk"})).await;
    assert_eq!(status, StatusCode::CREATED);
    let api_key = created["key"].as_str().unwrap().to_owned();
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/sdk").join(script);
    let base = t.base.clone();
    let output = tokio::task::spawn_blocking(move || {
        Command::new(program)
            .arg(script)
            .env("PARLEY_BASE_URL", base)
            .env("PARLEY_TOKEN", api_key)
            .env("PARLEY_MODEL", "parley-fake")
            .env("PARLEY_EXPECTED", parley_fake_llm::reply_for("hello from the sdk"))
            .envs(env)
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    assert!(
        output.status.success(),
        "stdout: {}\nstderr: {}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    session
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_official_openai_sdk_works_unchanged() {
    let t = TestPlatform::start().await;
    let python = tools_dir().join("venv/bin/python");
    let image = ("PARLEY_EXPECTED_IMAGE", parley_fake_llm::reply_with_images("what is this", 1));
    let embeddings_model = ("PARLEY_EMBEDDINGS_MODEL", parley_platform::config::FAKE_EMBEDDINGS_MODEL.to_owned());
    let vector = parley_fake_llm::embedding_for("hello from the sdk", parley_fake_llm::EMBEDDING_DIMENSIONS);
    let vector = ("PARLEY_EXPECTED_EMBEDDING", serde_json::to_string(&vector).unwrap());
    let env = vec![image, embeddings_model, vector];
    let session = run_sdk_script(&t, "sdk@example.com", python, "openai_client.py", env).await;

    // Completions are accounted like chat messages, and do not show up as conversations.
    let (_, conversations) = t.get(&session, "/v1/conversations").await;
    assert_eq!(conversations["data"].as_array().unwrap().len(), 0);
    let usage = eventually("usage of the SDK calls", std::time::Duration::from_secs(10), || async {
        let (_, usage) = t.get(&session, "/v1/usage").await;
        (usage["totals"]["requests"].as_i64()? >= 11).then_some(usage)
    })
    .await;
    // Two plain completions, the stopped one, the JSON one, three with tools, one with log probabilities,
    // one with an image and two of embeddings; the refused ones cost nothing.
    assert_eq!(usage["totals"]["requests"], 11);
    t.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_official_openai_node_sdk_works_unchanged() {
    let t = TestPlatform::start().await;
    let modules = tools_dir().join("node-sdk/node_modules");
    let node_path = ("NODE_PATH", modules.display().to_string());
    assert!(modules.join("openai").exists(), "the OpenAI Node SDK is not installed: run `make tools`");
    run_sdk_script(&t, "node-sdk@example.com", PathBuf::from("node"), "openai_client.cjs", vec![node_path]).await;
    t.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openai_errors_use_the_openai_shape() {
    let t = TestPlatform::start().await;
    let session = t.register("shape@example.com").await;
    let post = |body: serde_json::Value| {
        t.http.post(t.url("/v1/chat/completions")).bearer_auth(&session.token).json(&body).send()
    };
    let (status, body) =
        read(post(json!({"model": "nope", "messages": [{"role": "user", "content": "x"}]})).await.unwrap()).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_eq!(body["error"]["code"], "model_not_found");
    assert_eq!(body["error"]["type"], "invalid_request_error");
    let (status, body) = read(post(json!({"model": "parley-fake"})).await.unwrap()).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(body["error"]["message"].as_str().unwrap().contains("messages"), "{body}");
    let (status, body) =
        read(post(json!({"model": "parley-fake", "messages": [{"role": "wizard", "content": "x"}]})).await.unwrap())
            .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(body["error"]["message"].as_str().unwrap().contains("messages[0].role"), "{body}");
    assert_eq!(body["error"]["param"], "messages[0].role", "{body}");
    for param in ["max_tokens", "max_completion_tokens"] {
        let request = json!({"model": "parley-fake", "messages": [{"role": "user", "content": "x"}], param: 0});
        let (status, body) = read(post(request).await.unwrap()).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
        assert_eq!(body["error"]["param"], param, "{body}");
    }
    let response = t.http.get(t.url("/v1/models")).send().await.unwrap();
    let (status, body) = read(response).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert_eq!(body["error"]["type"], "authentication_error");
    t.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_completion_is_charged_once_and_a_failed_one_releases_its_reservation() {
    let t = TestPlatform::start().await;
    let session = t.register("charge@example.com").await;
    let ask = |content: &str| {
        t.post(
            &session,
            "/v1/chat/completions",
            json!({"model": "parley-fake", "messages": [{"role": "user", "content": content}]}),
        )
    };
    let (status, body) = ask("charge me").await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["choices"][0]["message"]["content"], parley_fake_llm::reply_for("charge me"));
    let tokens = body["usage"]["total_tokens"].as_i64().unwrap();
    assert!(tokens > 0, "{body}");
    let settled = |used: i64| {
        let t = &t;
        let session = &session;
        move || async move {
            let (_, usage) = t.get(session, "/v1/usage").await;
            (usage["budget"]["day"]["reserved"] == 0 && usage["budget"]["day"]["used"] == used).then_some(())
        }
    };
    eventually("the reply's tokens to be charged", Duration::from_secs(10), settled(tokens)).await;

    // Every provider down: 503, nothing charged, and the reservation is given back at once.
    t.fake.set_knobs(Knobs { error_rate: 1.0, ..t.fake.knobs() });
    let (status, body) = ask("this will fail").await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    assert_eq!(body["error"]["code"], "upstream_unavailable");
    eventually("the failed completion's reservation to be released", Duration::from_secs(10), settled(tokens)).await;
    t.stop().await;
}
