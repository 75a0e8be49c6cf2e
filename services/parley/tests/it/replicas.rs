//! Read replicas, against a real streaming replica of the local PostgreSQL (scripts/test-replica.sh,
//! port 5433): listings and usage reports are served by the replica; a user reads their own writes
//! at once; a replica whose replay is paused is used while it is within the lag bound and skipped
//! beyond it; a stopped replica costs reads nothing. These tests pause and stop the one shared replica,
//! so nextest runs them one at a time (.config/nextest.toml, test group `replica`).

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use parley::Service;
use reqwest::StatusCode;
use serde_json::Value;

use crate::harness::{Session, TestPlatform, eventually};

const REPLICA: &str = "127.0.0.1:5433";
const MAX_LAG_MS: u64 = 3_000;

fn script() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../scripts/test-replica.sh")
}

fn replica(action: &str) {
    let status = Command::new(script()).arg(action).status().expect("scripts/test-replica.sh runs");
    assert!(status.success(), "scripts/test-replica.sh {action} failed");
}

fn replica_sql(statement: &str) {
    let status = Command::new("psql")
        .args(["-h", "127.0.0.1", "-p", "5433", "-U", "postgres", "-d", "postgres", "-qAtc", statement])
        .stdout(std::process::Stdio::null())
        .status()
        .expect("psql runs");
    assert!(status.success(), "{statement} failed on the replica");
}

/// Leaves the replica running and replaying whatever happens to the test.
struct Restore;

impl Drop for Restore {
    fn drop(&mut self) {
        let _ = Command::new(script()).arg("resume").status();
        let _ = Command::new("psql")
            .args(["-h", "127.0.0.1", "-p", "5433", "-U", "postgres", "-qAtc", "SELECT pg_wal_replay_resume()"])
            .stdout(std::process::Stdio::null())
            .status();
    }
}

async fn start() -> (TestPlatform, Restore) {
    replica("start");
    replica_sql("SELECT pg_wal_replay_resume()");
    let t = TestPlatform::start_with(
        |config| {
            let replica_url = config.database.url.replace("127.0.0.1:5432", REPLICA);
            config.database.replica_urls = vec![replica_url];
            config.database.replica_max_lag_ms = MAX_LAG_MS;
            config.database.replica_check_interval_ms = 100;
        },
        &Service::ALL,
    )
    .await;
    wait_in_rotation(&t, true).await;
    (t, Restore)
}

async fn wait_in_rotation(t: &TestPlatform, wanted: bool) {
    let series = format!("parley_db_replica_in_rotation{{replica=\"{REPLICA}\"}}");
    eventually(&format!("the replica in rotation: {wanted}"), Duration::from_secs(20), || async {
        let value = t.metric(&series).await?;
        ((value == 1.0) == wanted).then_some(())
    })
    .await;
}

async fn replica_reads(t: &TestPlatform) -> f64 {
    t.metric("parley_db_reads_total{target=\"replica\"}").await.unwrap_or(0.0)
}

async fn titles(t: &TestPlatform, session: &Session) -> Vec<String> {
    let (status, body) = t.get(session, "/v1/conversations?limit=100").await;
    assert_eq!(status, StatusCode::OK, "{body}");
    body["data"].as_array().unwrap().iter().map(|c| c["title"].as_str().unwrap_or_default().to_owned()).collect()
}

/// Waits until `session`'s listings are served by the replica.
async fn listings_reach_the_replica(t: &TestPlatform, session: &Session) {
    eventually("listings to be served by the replica", Duration::from_secs(10), || async {
        let reads = replica_reads(t).await;
        titles(t, session).await;
        (replica_reads(t).await > reads).then_some(())
    })
    .await;
}

/// A conversation written straight into the primary, as another writer would: no write mark.
async fn insert_behind_the_platforms_back(t: &TestPlatform, session: &Session, title: &str) {
    let pool = sqlx::PgPool::connect(&t.config.database.url).await.unwrap();
    sqlx::query("INSERT INTO chat.conversations (id, user_id, title, model) VALUES ($1, $2, $3, 'parley-fake')")
        .bind(uuid::Uuid::now_v7())
        .bind(uuid::Uuid::parse_str(&session.user_id).unwrap())
        .bind(title)
        .execute(&pool)
        .await
        .unwrap();
    pool.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_serve_listings_users_read_their_writes_and_a_lagging_replica_is_skipped() {
    let (t, _restore) = start().await;
    let alice = t.register("alice@example.com").await;
    let bob = t.register("bob@example.com").await;

    // Every write is visible to its writer on the very next read, whichever server answers.
    for n in 0..10 {
        t.create_conversation(&alice, &format!("mine {n}")).await;
        assert_eq!(titles(&t, &alice).await.len(), n + 1, "alice reads her own write {n}");
    }
    // Usage reports may trail by the replica's lag, so they go to the replica.
    let reads = replica_reads(&t).await;
    let (status, _) = t.get(&alice, "/v1/usage?group_by=model").await;
    assert_eq!(status, StatusCode::OK);
    assert!(replica_reads(&t).await > reads, "the usage report was served by the replica");
    // Once the replica has replayed alice's writes, her listings go to it too.
    eventually("alice's listings to be served by the replica", Duration::from_secs(10), || async {
        let reads = replica_reads(&t).await;
        let listed = titles(&t, &alice).await;
        (replica_reads(&t).await > reads && listed.len() == 10).then_some(())
    })
    .await;

    // Replay paused: the replica keeps serving while it is within the bound, so a row written behind
    // the platform's back is not seen yet...
    replica_sql("SELECT pg_wal_replay_pause()");
    insert_behind_the_platforms_back(&t, &alice, "unseen").await;
    let reads = replica_reads(&t).await;
    let listed = titles(&t, &alice).await;
    assert!(replica_reads(&t).await > reads, "a replica within the lag bound still serves");
    assert!(!listed.contains(&"unseen".to_owned()), "the paused replica cannot have the new row: {listed:?}");
    // ...but alice's own write is, at once: her reads go where it is.
    t.create_conversation(&alice, "while paused").await;
    let listed = titles(&t, &alice).await;
    assert!(listed.contains(&"while paused".to_owned()), "{listed:?}");

    // Beyond the bound the replica leaves the rotation: everyone reads the primary, nobody errs.
    wait_in_rotation(&t, false).await;
    let lag = t.metric(&format!("parley_db_replica_lag_seconds{{replica=\"{REPLICA}\"}}")).await.unwrap();
    assert!(lag * 1000.0 > MAX_LAG_MS as f64, "lag {lag}s is exported");
    insert_behind_the_platforms_back(&t, &bob, "bob's fresh row").await;
    assert_eq!(titles(&t, &bob).await, vec!["bob's fresh row".to_owned()], "a skipped replica serves nobody");
    let reads = replica_reads(&t).await;
    titles(&t, &alice).await;
    assert_eq!(replica_reads(&t).await, reads, "no read goes to the lagging replica");

    // Replay resumes: the replica catches up and returns to the rotation.
    replica_sql("SELECT pg_wal_replay_resume()");
    wait_in_rotation(&t, true).await;
    listings_reach_the_replica(&t, &bob).await;
    t.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopped_replica_sends_reads_to_the_primary_without_an_error() {
    let (t, _restore) = start().await;
    let alice = t.register("alice@example.com").await;
    let conversation = t.create_conversation(&alice, "kept").await;
    listings_reach_the_replica(&t, &alice).await;

    replica("stop");
    // Straight away, before the monitor has noticed: every read still answers, from the primary.
    for _ in 0..20 {
        assert_eq!(titles(&t, &alice).await, vec!["kept".to_owned()]);
        let (status, body) = t.get(&alice, &format!("/v1/conversations/{conversation}/messages")).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        assert_eq!(body["data"], Value::Array(Vec::new()));
    }
    wait_in_rotation(&t, false).await;
    assert_eq!(t.metric(&format!("parley_db_replica_up{{replica=\"{REPLICA}\"}}")).await, Some(0.0));
    let (status, _) = t.get(&alice, "/v1/usage").await;
    assert_eq!(status, StatusCode::OK, "usage reports fall back to the primary too");

    replica("resume");
    wait_in_rotation(&t, true).await;
    listings_reach_the_replica(&t, &alice).await;
    t.stop().await;
}
