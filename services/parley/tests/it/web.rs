//! The web client's files and the public status page as the gateway serves them: pages with a content
//! security policy and never cached, hashed assets cached for good, no way out of the web directory,
//! a clear 404 when the client is not built, and `/v1/status` with each component and the error rate.

use std::time::Duration;

use reqwest::StatusCode;
use serde_json::Value;

use crate::harness::{TestPlatform, assert_problem, read};

/// GET `path` exactly as written on the request line; the whole answer as text.
async fn raw_get(base: &str, path: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let address = base.trim_start_matches("http://");
    let mut stream = tokio::net::TcpStream::connect(address).await.unwrap();
    let request = format!("GET {path} HTTP/1.1\r\nHost: {address}\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut answer = Vec::new();
    stream.read_to_end(&mut answer).await.unwrap();
    String::from_utf8_lossy(&answer).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_gateway_serves_the_built_web_client_and_the_status_page() {
    let web = std::env::temp_dir().join(format!("parley-web-{}", uuid::Uuid::now_v7()));
    std::fs::create_dir_all(web.join("assets")).unwrap();
    std::fs::write(web.join("index.html"), "<!doctype html><title>Parley</title>").unwrap();
    std::fs::write(web.join("status.html"), "<!doctype html><title>Parley status</title>").unwrap();
    std::fs::write(web.join("assets/app-1a2b.js"), "console.log('parley')").unwrap();
    std::fs::write(web.join("secret.txt"), "outside assets").unwrap();
    let dir = web.to_str().unwrap().to_owned();
    let t = TestPlatform::start_with(move |config| config.http.web_dir = dir.clone(), &parley::Service::ALL).await;

    for (path, title) in [("/", "<title>Parley</title>"), ("/status", "<title>Parley status</title>")] {
        let response = t.http.get(t.url(path)).send().await.unwrap();
        assert_eq!(response.status(), StatusCode::OK, "{path}");
        assert!(response.headers()["content-type"].to_str().unwrap().starts_with("text/html"));
        assert_eq!(response.headers()["cache-control"], "no-cache");
        let policy = response.headers()["content-security-policy"].to_str().unwrap().to_owned();
        assert!(policy.contains("script-src 'self'") && policy.contains("frame-ancestors 'none'"), "{policy}");
        let validator = response.headers()["last-modified"].clone();
        assert!(response.text().await.unwrap().contains(title));
        // A page the browser holds already is not sent again (and is not taken for a missing one).
        let again = t.http.get(t.url(path)).header("if-modified-since", validator).send().await.unwrap();
        assert_eq!(again.status(), StatusCode::NOT_MODIFIED, "{path}");
    }
    let response = t.http.get(t.url("/assets/app-1a2b.js")).send().await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert!(response.headers()["cache-control"].to_str().unwrap().contains("immutable"));
    assert!(response.headers()["content-type"].to_str().unwrap().contains("javascript"));
    // Only what is under assets/, and nothing above the web directory, whatever the request line says
    // (sent as written: an HTTP client would tidy the dots away first).
    for path in ["/assets/missing.js", "/assets/../secret.txt", "/assets/%2e%2e/secret.txt", "/assets/..%2fsecret.txt"]
    {
        let answer = raw_get(&t.base, path).await;
        assert!(answer.starts_with("HTTP/1.1 404"), "{path}: {answer}");
        assert!(!answer.contains("outside assets"), "{path}: {answer}");
    }
    let (status, body) = read(t.http.get(t.url("/assets/missing.js")).send().await.unwrap()).await;
    assert_problem(status, &body, 404, "not_found");
    // A range of an asset is served as one.
    let part = t.http.get(t.url("/assets/app-1a2b.js")).header("range", "bytes=0-6").send().await.unwrap();
    assert_eq!(part.status(), StatusCode::PARTIAL_CONTENT);
    assert_eq!(part.text().await.unwrap(), "console");

    // The status page's facts, for anyone: every component up once the agent is pulling jobs (an
    // answer is kept for 5 seconds).
    let report = crate::harness::eventually("every component operational", Duration::from_secs(20), || async {
        let (status, report) = read(t.http.get(t.url("/v1/status")).send().await.unwrap()).await;
        assert_eq!(status, StatusCode::OK, "{report}");
        (report["status"] == "operational").then_some(report)
    })
    .await;
    let components: Vec<(&str, &str)> = report["components"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| (c["id"].as_str().unwrap(), c["status"].as_str().unwrap()))
        .collect();
    for id in ["api", "accounts", "conversations", "quotas", "messaging", "cache", "replies"] {
        assert!(components.contains(&(id, "operational")), "{id}: {components:?}");
    }
    assert_eq!(report["error_rate"]["window_seconds"], 900);
    assert!(report["error_rate"]["ratio"].as_f64().unwrap() < 0.05);
    assert!(!report.to_string().contains("error:"), "no failure text: {report}");
    std::fs::remove_dir_all(&web).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_built_client_the_pages_say_so_and_the_api_works() {
    let t = TestPlatform::start_with(
        |config| config.http.web_dir = "/nonexistent/parley-web".to_owned(),
        &parley::Service::ALL,
    )
    .await;
    for path in ["/", "/status", "/assets/app.js"] {
        let (status, body): (StatusCode, Value) = read(t.http.get(t.url(path)).send().await.unwrap()).await;
        assert_problem(status, &body, 404, "not_found");
    }
    let (_, body) = read(t.http.get(t.url("/")).send().await.unwrap()).await;
    assert!(body["detail"].as_str().unwrap().contains("not built"), "{body}");
    let (status, _) = read(t.http.get(t.url("/v1/status")).send().await.unwrap()).await;
    assert_eq!(status, StatusCode::OK);
}
