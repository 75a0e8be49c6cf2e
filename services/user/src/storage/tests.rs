//! The identity schema's SQL against a real PostgreSQL, one fresh database per test (dropped afterwards,
//! also when the test fails).

use parley_platform::test_database::TestDatabase;

use super::*;

async fn storage() -> (Storage, TestDatabase) {
    let database = TestDatabase::create("parley_user_storage").await.unwrap();
    let pool = PgPool::connect(database.url()).await.unwrap();
    crate::migrate(&pool).await.unwrap();
    (Storage::new(pool), database)
}

async fn user(storage: &Storage, email: &str) -> UserRow {
    storage.insert_user(email, None, "hash", "user", "free").await.unwrap().unwrap()
}

#[tokio::test]
async fn emails_are_unique_whatever_their_case_and_tier_and_role_change_in_place() {
    let (storage, _database) = storage().await;
    let ada = user(&storage, "Ada@Example.com").await;
    assert!(storage.insert_user("ada@example.COM", None, "other", "user", "free").await.unwrap().is_none());
    assert_eq!(storage.user_by_email("ADA@example.com").await.unwrap().unwrap().id, ada.id);
    assert_eq!(storage.set_tier(ada.id, "pro").await.unwrap().unwrap().tier, "pro");
    assert_eq!(storage.set_role(ada.id, "admin").await.unwrap().unwrap().role, "admin");
    assert!(storage.set_tier(Uuid::now_v7(), "pro").await.unwrap().is_none());
}

#[tokio::test]
async fn a_refresh_token_rotates_once_and_its_replay_revokes_the_family() {
    let (storage, _database) = storage().await;
    let ada = user(&storage, "ada@example.com").await;
    let later = OffsetDateTime::now_utc() + time::Duration::hours(1);
    let family = Uuid::now_v7();
    storage.insert_refresh_token(ada.id, family, b"first", later).await.unwrap();

    match storage.rotate_refresh_token(b"first", b"second", later).await.unwrap() {
        RefreshOutcome::Rotated { user, family_id } => assert_eq!((user.id, family_id), (ada.id, family)),
        _ => panic!("the first presentation of a live token did not rotate it"),
    }
    // The first token again: a replay. The whole family goes, the token it was rotated to included.
    assert!(matches!(
        storage.rotate_refresh_token(b"first", b"third", later).await.unwrap(),
        RefreshOutcome::Reused { user_id } if user_id == ada.id
    ));
    assert!(matches!(
        storage.rotate_refresh_token(b"second", b"fourth", later).await.unwrap(),
        RefreshOutcome::Invalid
    ));

    // Logout ends a family; an expired or unknown token rotates to nothing.
    let other_family = Uuid::now_v7();
    storage.insert_refresh_token(ada.id, other_family, b"session-2", later).await.unwrap();
    storage.revoke_refresh_family(b"session-2").await.unwrap();
    assert!(matches!(storage.rotate_refresh_token(b"session-2", b"x", later).await.unwrap(), RefreshOutcome::Invalid));
    let past = OffsetDateTime::now_utc() - time::Duration::seconds(1);
    storage.insert_refresh_token(ada.id, Uuid::now_v7(), b"expired", past).await.unwrap();
    assert!(matches!(storage.rotate_refresh_token(b"expired", b"y", later).await.unwrap(), RefreshOutcome::Invalid));
    assert!(matches!(storage.rotate_refresh_token(b"unknown", b"z", later).await.unwrap(), RefreshOutcome::Invalid));
}

#[tokio::test]
async fn an_api_key_finds_its_owner_until_it_is_revoked() {
    let (storage, _database) = storage().await;
    let ada = user(&storage, "ada@example.com").await;
    let grace = user(&storage, "grace@example.com").await;
    let key = storage.insert_api_key(ada.id, "ci", "pk_abc", b"key-hash", Some(b"sealed")).await.unwrap();
    assert!(key.require_signature);

    let owner = storage.api_key_owner(b"key-hash").await.unwrap().unwrap();
    assert_eq!((owner.api_key_id, owner.user_id, owner.tier.as_str()), (key.id, ada.id, "free"));
    assert_eq!(owner.signing_secret_sealed.as_deref(), Some(&b"sealed"[..]));
    assert_eq!(storage.api_keys(ada.id, None, 100).await.unwrap().len(), 1);

    // Only its owner can revoke it, once.
    assert!(!storage.revoke_api_key(grace.id, key.id).await.unwrap());
    assert!(storage.revoke_api_key(ada.id, key.id).await.unwrap());
    assert!(!storage.revoke_api_key(ada.id, key.id).await.unwrap());
    assert!(storage.api_key_owner(b"key-hash").await.unwrap().is_none());
    assert!(storage.api_keys(ada.id, None, 100).await.unwrap().is_empty());
}
