//! The operator's commands, run as the real `parley` binary: migrate, check-config, admin.

use reqwest::StatusCode;
use serde_json::json;

use crate::harness::{TestPlatform, run_parley as parley};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migrate_is_idempotent_and_admin_commands_follow_the_api_rules() {
    let t = TestPlatform::start().await;
    let database = t.config.database.url.clone();
    let env = [("DATABASE_URL", database.as_str()), ("PARLEY_NATS_PREFIX", t.config.nats.prefix.as_str())];

    // The platform already migrated this database; migrating again changes nothing and succeeds.
    for _ in 0..2 {
        let output = parley(&env, &["migrate"]);
        assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    }

    let session = t.register("operator@example.com").await;
    let customer = t.register("early-customer@example.com").await;
    let promote = |token: &str| {
        t.http
            .put(t.url(&format!("/v1/admin/users/{}/tier", customer.user_id)))
            .bearer_auth(token.to_owned())
            .json(&json!({"tier": "pro"}))
            .send()
    };
    assert_eq!(promote(&session.token).await.unwrap().status(), StatusCode::FORBIDDEN);
    let output = parley(&env, &["admin", "set-tier", "--email", "operator@example.com", "--tier", "pro"]);
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let output = parley(&env, &["admin", "set-role", "--email", "OPERATOR@example.com", "--role", "admin"]);
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    // The new role applies to the token issued before it, on the next request.
    crate::harness::eventually("the role change to reach the gateway", std::time::Duration::from_secs(2), || async {
        (promote(&session.token).await.unwrap().status() == StatusCode::OK).then_some(())
    })
    .await;

    // The same rules as the API: unknown tiers and roles are refused, naming what is wrong.
    let output = parley(&env, &["admin", "set-tier", "--email", "operator@example.com", "--tier", "platinum"]);
    assert!(!output.status.success());
    assert!(String::from_utf8_lossy(&output.stderr).contains("tier"));
    let output = parley(&env, &["admin", "set-role", "--email", "nobody@example.com", "--role", "admin"]);
    assert!(!output.status.success());
    assert!(String::from_utf8_lossy(&output.stderr).contains("not found"));

    // A new token carries the new tier and role; the admin can now change another user's tier by API.
    let response = t
        .http
        .post(t.url("/v1/auth/login"))
        .json(&json!({"email": "operator@example.com", "password": "correct horse battery"}))
        .send()
        .await
        .unwrap();
    let login: serde_json::Value = response.json().await.unwrap();
    assert_eq!(login["user"]["tier"], "pro");
    assert_eq!(login["user"]["role"], "admin");
    let admin = crate::harness::Session {
        token: login["access_token"].as_str().unwrap().to_owned(),
        refresh_token: String::new(),
        user_id: session.user_id.clone(),
    };
    let other = t.register("customer@example.com").await;
    let response = t
        .http
        .put(t.url(&format!("/v1/admin/users/{}/tier", other.user_id)))
        .bearer_auth(&admin.token)
        .json(&json!({"tier": "enterprise"}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let response = t
        .http
        .put(t.url(&format!("/v1/admin/users/{}/tier", admin.user_id)))
        .bearer_auth(&other.token)
        .json(&json!({"tier": "free"}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::FORBIDDEN, "a non-admin may not change tiers");
    t.stop().await;
}

#[test]
fn check_config_names_the_bad_field() {
    let output = parley(&[], &["check-config"]);
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    assert!(String::from_utf8_lossy(&output.stdout).contains("configuration is valid"));

    let output = parley(&[("REDIS_URL", "http://not-redis")], &["check-config"]);
    assert!(!output.status.success());
    assert!(String::from_utf8_lossy(&output.stderr).contains("redis.url"));

    let dir = std::env::temp_dir().join(format!("parley-config-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("parley.toml");
    std::fs::write(&file, "[databse]\nurl = \"postgres://x/y\"\n").unwrap();
    let output = parley(&[("PARLEY_CONFIG", file.to_str().unwrap())], &["check-config"]);
    assert!(!output.status.success());
    assert!(String::from_utf8_lossy(&output.stderr).contains("databse"));
    std::fs::remove_dir_all(&dir).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn probe_succeeds_only_on_a_ready_answer() {
    let t = TestPlatform::start().await;
    let ready = parley(&[], &["probe", &t.url("/readyz")]);
    assert!(ready.status.success(), "{}", String::from_utf8_lossy(&ready.stderr));
    assert!(String::from_utf8_lossy(&ready.stdout).starts_with("200"));
    let missing = parley(&[], &["probe", &t.url("/no-such-page")]);
    assert!(!missing.status.success());
    assert!(String::from_utf8_lossy(&missing.stderr).contains("404"));
    t.stop().await;
    let gone = parley(&[], &["probe", "--timeout-secs", "1", "http://127.0.0.1:9/readyz"]);
    assert!(!gone.status.success());
}
