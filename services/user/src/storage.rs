//! Reads and writes of the `identity` schema.

use parley_platform::cursor::Position;
use sqlx::PgPool;
use time::OffsetDateTime;
use uuid::Uuid;

#[derive(Debug, Clone, sqlx::FromRow)]
pub struct UserRow {
    pub id: Uuid,
    pub email: String,
    pub display_name: Option<String>,
    pub password_hash: String,
    pub role: String,
    pub tier: String,
    pub created_at: OffsetDateTime,
}

#[derive(Debug, Clone, sqlx::FromRow)]
pub struct ApiKeyRow {
    pub id: Uuid,
    pub name: String,
    pub prefix: String,
    pub require_signature: bool,
    pub created_at: OffsetDateTime,
    pub last_used_at: Option<OffsetDateTime>,
}

/// One audit log entry, as read back.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct AuditRow {
    pub id: Uuid,
    pub at: OffsetDateTime,
    pub event: String,
    pub user_id: Option<Uuid>,
    pub actor_id: Option<Uuid>,
    pub email: Option<String>,
    pub client_ip: Option<String>,
    pub detail: serde_json::Value,
}

/// Which audit entries to read: each filter set narrows them.
#[derive(Debug, Default, Clone)]
pub struct AuditFilter {
    pub user_id: Option<Uuid>,
    pub email: Option<String>,
    pub event: Option<String>,
    pub from: Option<OffsetDateTime>,
    pub to: Option<OffsetDateTime>,
}

/// The owner of a live API key.
#[derive(Debug, sqlx::FromRow)]
pub struct ApiKeyOwner {
    pub api_key_id: Uuid,
    pub user_id: Uuid,
    pub role: String,
    pub tier: String,
    pub require_signature: bool,
    pub signing_secret_sealed: Option<Vec<u8>>,
}

#[derive(Debug, sqlx::FromRow)]
pub struct SigningKeyRow {
    pub kid: String,
    pub private_key: Vec<u8>,
    pub public_key: Vec<u8>,
    pub private_key_sealed: bool,
}

/// One security event for the audit log.
pub struct AuditEvent<'a> {
    pub event: &'static str,
    pub user_id: Option<Uuid>,
    pub actor_id: Option<Uuid>,
    pub email: Option<&'a str>,
    pub client_ip: Option<&'a str>,
    pub detail: serde_json::Value,
}

impl<'a> AuditEvent<'a> {
    pub fn new(event: &'static str) -> Self {
        Self { event, user_id: None, actor_id: None, email: None, client_ip: None, detail: serde_json::Value::Null }
    }

    pub fn user(mut self, user_id: Uuid) -> Self {
        self.user_id = Some(user_id);
        self
    }

    pub fn email(mut self, email: &'a str) -> Self {
        self.email = Some(email);
        self
    }

    pub fn ip(mut self, client_ip: &'a str) -> Self {
        self.client_ip = Some(client_ip).filter(|ip| !ip.is_empty());
        self
    }

    pub fn detail(mut self, detail: serde_json::Value) -> Self {
        self.detail = detail;
        self
    }
}

/// What presenting a refresh token led to.
pub enum RefreshOutcome {
    Rotated {
        user: UserRow,
        family_id: Uuid,
    },
    /// Unknown, expired or revoked.
    Invalid,
    /// Already rotated: the family has now been revoked.
    Reused {
        user_id: Uuid,
    },
}

/// user_id, family_id, expires_at, rotated_at, revoked_at of a refresh token.
type TokenState = (Uuid, Uuid, OffsetDateTime, Option<OffsetDateTime>, Option<OffsetDateTime>);

const USER_COLUMNS: &str = "id, email, display_name, password_hash, role, tier, created_at";

/// Failed logins to one account within the lockout window.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RecentFailures {
    /// From the address now trying.
    pub from_address: i64,
    /// From every address.
    pub for_account: i64,
    pub last: Option<time::OffsetDateTime>,
}

#[derive(Clone)]
pub struct Storage {
    pool: PgPool,
}

impl Storage {
    pub fn new(pool: PgPool) -> Self {
        Self { pool }
    }

    /// Inserts a user; `Ok(None)` when the email is taken.
    pub async fn insert_user(
        &self,
        email: &str,
        display_name: Option<&str>,
        password_hash: &str,
        role: &str,
        tier: &str,
    ) -> Result<Option<UserRow>, sqlx::Error> {
        let sql = format!(
            "INSERT INTO identity.users (id, email, display_name, password_hash, role, tier)
             VALUES ($1, $2, $3, $4, $5, $6)
             ON CONFLICT ((lower(email))) DO NOTHING
             RETURNING {USER_COLUMNS}"
        );
        sqlx::query_as::<_, UserRow>(sqlx::AssertSqlSafe(sql))
            .bind(Uuid::now_v7())
            .bind(email)
            .bind(display_name)
            .bind(password_hash)
            .bind(role)
            .bind(tier)
            .fetch_optional(&self.pool)
            .await
    }

    pub async fn user_by_email(&self, email: &str) -> Result<Option<UserRow>, sqlx::Error> {
        let sql = format!("SELECT {USER_COLUMNS} FROM identity.users WHERE lower(email) = lower($1)");
        sqlx::query_as::<_, UserRow>(sqlx::AssertSqlSafe(sql)).bind(email).fetch_optional(&self.pool).await
    }

    pub async fn user_by_id(&self, id: Uuid) -> Result<Option<UserRow>, sqlx::Error> {
        let sql = format!("SELECT {USER_COLUMNS} FROM identity.users WHERE id = $1");
        sqlx::query_as::<_, UserRow>(sqlx::AssertSqlSafe(sql)).bind(id).fetch_optional(&self.pool).await
    }

    pub async fn set_role(&self, id: Uuid, role: &str) -> Result<Option<UserRow>, sqlx::Error> {
        let sql =
            format!("UPDATE identity.users SET role = $2, updated_at = now() WHERE id = $1 RETURNING {USER_COLUMNS}");
        sqlx::query_as::<_, UserRow>(sqlx::AssertSqlSafe(sql)).bind(id).bind(role).fetch_optional(&self.pool).await
    }

    pub async fn set_tier(&self, id: Uuid, tier: &str) -> Result<Option<UserRow>, sqlx::Error> {
        let sql =
            format!("UPDATE identity.users SET tier = $2, updated_at = now() WHERE id = $1 RETURNING {USER_COLUMNS}");
        sqlx::query_as::<_, UserRow>(sqlx::AssertSqlSafe(sql)).bind(id).bind(tier).fetch_optional(&self.pool).await
    }

    pub async fn insert_refresh_token(
        &self,
        user_id: Uuid,
        family_id: Uuid,
        token_hash: &[u8],
        expires_at: OffsetDateTime,
    ) -> Result<(), sqlx::Error> {
        sqlx::query(
            "INSERT INTO identity.refresh_tokens (id, user_id, family_id, token_hash, expires_at)
             VALUES ($1, $2, $3, $4, $5)",
        )
        .bind(Uuid::now_v7())
        .bind(user_id)
        .bind(family_id)
        .bind(token_hash)
        .bind(expires_at)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Rotates the token with `old_hash` to `new_hash` in one transaction, or revokes its whole family
    /// when it was already rotated (a stolen token being replayed, or the thief's copy).
    pub async fn rotate_refresh_token(
        &self,
        old_hash: &[u8],
        new_hash: &[u8],
        new_expires_at: OffsetDateTime,
    ) -> Result<RefreshOutcome, sqlx::Error> {
        let mut tx = self.pool.begin().await?;
        let row: Option<TokenState> = sqlx::query_as(
            "SELECT user_id, family_id, expires_at, rotated_at, revoked_at
             FROM identity.refresh_tokens WHERE token_hash = $1 FOR UPDATE",
        )
        .bind(old_hash)
        .fetch_optional(&mut *tx)
        .await?;
        let Some((user_id, family_id, expires_at, rotated_at, revoked_at)) = row else {
            return Ok(RefreshOutcome::Invalid);
        };
        if revoked_at.is_some() || expires_at <= OffsetDateTime::now_utc() {
            return Ok(RefreshOutcome::Invalid);
        }
        if rotated_at.is_some() {
            sqlx::query(
                "UPDATE identity.refresh_tokens SET revoked_at = now() WHERE family_id = $1 AND revoked_at IS NULL",
            )
            .bind(family_id)
            .execute(&mut *tx)
            .await?;
            tx.commit().await?;
            return Ok(RefreshOutcome::Reused { user_id });
        }
        sqlx::query("UPDATE identity.refresh_tokens SET rotated_at = now() WHERE token_hash = $1")
            .bind(old_hash)
            .execute(&mut *tx)
            .await?;
        sqlx::query(
            "INSERT INTO identity.refresh_tokens (id, user_id, family_id, token_hash, expires_at)
             VALUES ($1, $2, $3, $4, $5)",
        )
        .bind(Uuid::now_v7())
        .bind(user_id)
        .bind(family_id)
        .bind(new_hash)
        .bind(new_expires_at)
        .execute(&mut *tx)
        .await?;
        let sql = format!("SELECT {USER_COLUMNS} FROM identity.users WHERE id = $1");
        let user =
            sqlx::query_as::<_, UserRow>(sqlx::AssertSqlSafe(sql)).bind(user_id).fetch_optional(&mut *tx).await?;
        tx.commit().await?;
        Ok(match user {
            Some(user) => RefreshOutcome::Rotated { user, family_id },
            None => RefreshOutcome::Invalid,
        })
    }

    /// Revokes the family of the token with `hash` (logout ends the whole session, not one link).
    pub async fn revoke_refresh_family(&self, hash: &[u8]) -> Result<(), sqlx::Error> {
        sqlx::query(
            "UPDATE identity.refresh_tokens SET revoked_at = now()
             WHERE revoked_at IS NULL
               AND family_id = (SELECT family_id FROM identity.refresh_tokens WHERE token_hash = $1)",
        )
        .bind(hash)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    pub async fn insert_api_key(
        &self,
        user_id: Uuid,
        name: &str,
        prefix: &str,
        key_hash: &[u8],
        signing_secret_sealed: Option<&[u8]>,
    ) -> Result<ApiKeyRow, sqlx::Error> {
        sqlx::query_as(
            "INSERT INTO identity.api_keys (id, user_id, name, prefix, key_hash, require_signature, signing_secret_sealed)
             VALUES ($1, $2, $3, $4, $5, $6, $7)
             RETURNING id, name, prefix, require_signature, created_at, last_used_at",
        )
        .bind(Uuid::now_v7())
        .bind(user_id)
        .bind(name)
        .bind(prefix)
        .bind(key_hash)
        .bind(signing_secret_sealed.is_some())
        .bind(signing_secret_sealed)
        .fetch_one(&self.pool)
        .await
    }

    /// A user's live keys, newest first.
    pub async fn api_keys(
        &self,
        user_id: Uuid,
        after: Option<Position>,
        limit: i64,
    ) -> Result<Vec<ApiKeyRow>, sqlx::Error> {
        sqlx::query_as(
            "SELECT id, name, prefix, require_signature, created_at, last_used_at FROM identity.api_keys
             WHERE user_id = $1 AND revoked_at IS NULL
               AND ($2::timestamptz IS NULL OR (created_at, id) < ($2, $3))
             ORDER BY created_at DESC, id DESC LIMIT $4",
        )
        .bind(user_id)
        .bind(after.map(|position| position.at))
        .bind(after.map(|position| position.id))
        .bind(limit)
        .fetch_all(&self.pool)
        .await
    }

    /// Audit entries matching `filter`, newest first, after `after`.
    pub async fn audit_entries(
        &self,
        filter: &AuditFilter,
        after: Option<Position>,
        limit: i64,
    ) -> Result<Vec<AuditRow>, sqlx::Error> {
        sqlx::query_as(
            "SELECT id, at, event, user_id, actor_id, email, client_ip, detail FROM identity.audit_log
             WHERE ($1::uuid IS NULL OR user_id = $1)
               AND ($2::text IS NULL OR email = lower($2))
               AND ($3::text IS NULL OR event = $3)
               AND ($4::timestamptz IS NULL OR at >= $4)
               AND ($5::timestamptz IS NULL OR at < $5)
               AND ($6::timestamptz IS NULL OR (at, id) < ($6, $7))
             ORDER BY at DESC, id DESC LIMIT $8",
        )
        .bind(filter.user_id)
        .bind(filter.email.as_deref())
        .bind(filter.event.as_deref())
        .bind(filter.from)
        .bind(filter.to)
        .bind(after.map(|position| position.at))
        .bind(after.map(|position| position.id))
        .bind(limit)
        .fetch_all(&self.pool)
        .await
    }

    /// Revokes one of the user's keys; false when they have no such live key.
    pub async fn revoke_api_key(&self, user_id: Uuid, id: Uuid) -> Result<bool, sqlx::Error> {
        let result = sqlx::query(
            "UPDATE identity.api_keys SET revoked_at = now() WHERE id = $1 AND user_id = $2 AND revoked_at IS NULL",
        )
        .bind(id)
        .bind(user_id)
        .execute(&self.pool)
        .await?;
        Ok(result.rows_affected() > 0)
    }

    /// Deletes an account with its API keys and refresh tokens, and takes its email and addresses out
    /// of the audit log (the entries stay, under the account's id alone), in one transaction. The ids
    /// of the keys that were live; `None` when there is no such account.
    pub async fn delete_account(&self, user_id: Uuid) -> Result<Option<Vec<Uuid>>, sqlx::Error> {
        let mut tx = self.pool.begin().await?;
        let email: Option<(String,)> =
            sqlx::query_as("SELECT lower(email) FROM identity.users WHERE id = $1 FOR UPDATE")
                .bind(user_id)
                .fetch_optional(&mut *tx)
                .await?;
        let Some((email,)) = email else {
            return Ok(None);
        };
        let live_keys: Vec<(Uuid,)> =
            sqlx::query_as("SELECT id FROM identity.api_keys WHERE user_id = $1 AND revoked_at IS NULL")
                .bind(user_id)
                .fetch_all(&mut *tx)
                .await?;
        sqlx::query("UPDATE identity.audit_log SET email = NULL, client_ip = NULL WHERE user_id = $1 OR email = $2")
            .bind(user_id)
            .bind(&email)
            .execute(&mut *tx)
            .await?;
        // API keys and refresh tokens go with the account (ON DELETE CASCADE).
        sqlx::query("DELETE FROM identity.users WHERE id = $1").bind(user_id).execute(&mut *tx).await?;
        tx.commit().await?;
        Ok(Some(live_keys.into_iter().map(|(id,)| id).collect()))
    }

    /// The owner of the live key with this hash, noting that it was used (at most once a minute).
    pub async fn api_key_owner(&self, key_hash: &[u8]) -> Result<Option<ApiKeyOwner>, sqlx::Error> {
        sqlx::query_as(
            "WITH key AS (
                 UPDATE identity.api_keys SET last_used_at = now()
                 WHERE key_hash = $1 AND revoked_at IS NULL
                   AND (last_used_at IS NULL OR last_used_at < now() - interval '1 minute')
                 RETURNING id
             )
             SELECT k.id AS api_key_id, u.id AS user_id, u.role, u.tier, k.require_signature, k.signing_secret_sealed
             FROM identity.api_keys k JOIN identity.users u ON u.id = k.user_id
             WHERE k.key_hash = $1 AND k.revoked_at IS NULL",
        )
        .bind(key_hash)
        .fetch_optional(&self.pool)
        .await
    }

    /// Published signing keys (not yet retired), newest first.
    pub async fn signing_keys(&self) -> Result<Vec<SigningKeyRow>, sqlx::Error> {
        sqlx::query_as::<_, SigningKeyRow>(
            "SELECT kid, private_key, public_key, private_key_sealed FROM identity.signing_keys
             WHERE retired_at IS NULL OR retired_at > now() ORDER BY created_at DESC, kid",
        )
        .fetch_all(&self.pool)
        .await
    }

    /// Private keys stored before sealing existed, to seal them.
    pub async fn unsealed_signing_keys(&self) -> Result<Vec<(String, Vec<u8>)>, sqlx::Error> {
        sqlx::query_as("SELECT kid, private_key FROM identity.signing_keys WHERE NOT private_key_sealed")
            .fetch_all(&self.pool)
            .await
    }

    pub async fn seal_signing_key(&self, kid: &str, sealed: &[u8]) -> Result<(), sqlx::Error> {
        sqlx::query(
            "UPDATE identity.signing_keys SET private_key = $2, private_key_sealed = true
             WHERE kid = $1 AND NOT private_key_sealed",
        )
        .bind(kid)
        .bind(sealed)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// The key that signs now: the newest one already active.
    pub async fn active_signing_key(&self) -> Result<Option<SigningKeyRow>, sqlx::Error> {
        sqlx::query_as::<_, SigningKeyRow>(
            "SELECT kid, private_key, public_key, private_key_sealed FROM identity.signing_keys
             WHERE activates_at <= now() AND (retired_at IS NULL OR retired_at > now())
             ORDER BY activates_at DESC, created_at DESC LIMIT 1",
        )
        .fetch_optional(&self.pool)
        .await
    }

    /// Adds a key that signs from `activate_in` on, and schedules every older key's retirement for when
    /// the last token it can still sign has expired.
    pub async fn rotate_signing_key(
        &self,
        kid: &str,
        private_key: &[u8],
        public_key: &[u8],
        activate_in: time::Duration,
        token_lifetime: time::Duration,
    ) -> Result<(), sqlx::Error> {
        let mut tx = self.pool.begin().await?;
        sqlx::query(
            "UPDATE identity.signing_keys SET retired_at = now() + $1 + $2
             WHERE retired_at IS NULL OR retired_at > now() + $1 + $2",
        )
        .bind(activate_in)
        .bind(token_lifetime)
        .execute(&mut *tx)
        .await?;
        sqlx::query(
            "INSERT INTO identity.signing_keys (kid, algorithm, private_key, public_key, activates_at, private_key_sealed)
             VALUES ($1, 'EdDSA', $2, $3, now() + $4, true)",
        )
        .bind(kid)
        .bind(private_key)
        .bind(public_key)
        .bind(activate_in)
        .execute(&mut *tx)
        .await?;
        tx.commit().await
    }

    /// Records a security event. Failing to record one is logged, never fatal to the request.
    pub async fn audit(&self, event: AuditEvent<'_>) {
        let result = sqlx::query(
            "INSERT INTO identity.audit_log (id, event, user_id, actor_id, email, client_ip, detail)
             VALUES ($1, $2, $3, $4, lower($5), $6, $7)",
        )
        .bind(Uuid::now_v7())
        .bind(event.event)
        .bind(event.user_id)
        .bind(event.actor_id)
        .bind(event.email)
        .bind(event.client_ip)
        .bind(sqlx::types::Json(event.detail))
        .execute(&self.pool)
        .await;
        if let Err(error) = result {
            tracing::error!(%error, event = event.event, "could not write the audit log");
        }
    }

    /// Failed logins for `email` within `window`.
    /// The failed logins to `email` within `window`: from `client_ip`, from anywhere, and the last one.
    pub async fn recent_failed_logins(
        &self,
        email: &str,
        client_ip: &str,
        window: time::Duration,
    ) -> Result<RecentFailures, sqlx::Error> {
        let (from_address, for_account, last): (i64, i64, Option<time::OffsetDateTime>) = sqlx::query_as(
            "SELECT count(*) FILTER (WHERE client_ip = $2), count(*), max(at) FROM identity.audit_log
             WHERE event = 'login_failed' AND email = lower($1) AND at > now() - $3",
        )
        .bind(email)
        .bind(client_ip)
        .bind(window)
        .fetch_one(&self.pool)
        .await?;
        Ok(RecentFailures { from_address, for_account, last })
    }

    pub async fn insert_signing_key(
        &self,
        kid: &str,
        private_key: &[u8],
        public_key: &[u8],
    ) -> Result<(), sqlx::Error> {
        sqlx::query(
            "INSERT INTO identity.signing_keys (kid, algorithm, private_key, public_key, private_key_sealed)
             VALUES ($1, 'EdDSA', $2, $3, true)
             ON CONFLICT (kid) DO NOTHING",
        )
        .bind(kid)
        .bind(private_key)
        .bind(public_key)
        .execute(&self.pool)
        .await?;
        Ok(())
    }
}

/// What retention removed from the identity schema.
#[derive(Debug, Default, Clone, Copy)]
pub struct IdentityPruned {
    pub refresh_tokens: u64,
    pub audit_entries: u64,
    pub signing_keys: u64,
}

/// Retention for the identity schema: refresh tokens a day past their expiry (until then a reused,
/// rotated token still revokes its family), audit entries older than `audit_days`, and signing keys a
/// month after they were retired (no token they signed is still alive by then).
pub async fn prune(pool: &PgPool, audit_days: u32) -> Result<IdentityPruned, sqlx::Error> {
    use parley_platform::db::delete_in_batches;
    let days = |days: u32| i32::try_from(days).unwrap_or(i32::MAX);
    let past = "expires_at < now() - make_interval(days => $1)";
    let refresh_tokens = delete_in_batches(pool, "identity.refresh_tokens", past, 1).await?;
    let older = "at < now() - make_interval(days => $1)";
    let audit_entries = delete_in_batches(pool, "identity.audit_log", older, days(audit_days)).await?;
    let retired = "retired_at < now() - make_interval(days => $1)";
    let signing_keys = delete_in_batches(pool, "identity.signing_keys", retired, 30).await?;
    Ok(IdentityPruned { refresh_tokens, audit_entries, signing_keys })
}

#[cfg(test)]
mod tests;
