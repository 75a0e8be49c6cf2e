//! `parley.user.v1.UserService`.

use std::sync::Arc;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use parley_platform::access_token::{ALGORITHM, AccessClaims};
use parley_platform::config::DEFAULT_TIER;
use parley_platform::cursor::{CursorCodec, CursorKind, Position, page_size};
use parley_platform::limits::MAX_API_KEY_NAME_CHARS;
use parley_platform::{Config, ErrorCode, ServiceError, timestamps};
use parley_proto::user::v1 as pb;
use ring::rand::SecureRandom;
use sqlx::PgPool;
use time::OffsetDateTime;
use tokio::sync::RwLock;
use tonic::{Request, Response, Status};
use uuid::Uuid;

use crate::sealing::Sealer;
use crate::signing::{self, ActiveKey};
use crate::storage::{ApiKeyRow, AuditEvent, RefreshOutcome, Storage, UserRow};
use crate::{UserError, passwords, validation};

const REFRESH_TOKEN_PREFIX: &str = "prt_";
const API_KEY_PREFIX: &str = "pk_";
const SIGNING_SECRET_PREFIX: &str = "pss_";
/// How much of a key is kept in clear to tell keys apart: the `pk_` and eight more characters.
const API_KEY_SHOWN_CHARS: usize = 11;
/// The window in which failed logins for one account are counted.
const FAILED_LOGIN_WINDOW: time::Duration = time::Duration::minutes(15);
/// Leeway past a token's expiry during which gateways still accept it (clock skew).
const VERIFY_LEEWAY: time::Duration = time::Duration::seconds(60);

#[derive(Clone)]
pub struct UserService {
    config: Arc<Config>,
    storage: Storage,
    active_key: Arc<RwLock<Arc<ActiveKey>>>,
    sealer: Arc<Sealer>,
    cursors: CursorCodec,
}

impl UserService {
    /// Loads the newest signing key, creating the first one on a fresh database.
    pub async fn new(config: Arc<Config>, pool: PgPool) -> Result<Self, UserError> {
        let storage = Storage::new(pool);
        let sealer = Arc::new(Sealer::new(&config.auth.secrets_key)?);
        let active = load_or_create_active_key(&storage, &sealer).await?;
        let cursors = CursorCodec::new(&config.chat.cursor_secret);
        Ok(Self { config, storage, active_key: Arc::new(RwLock::new(Arc::new(active))), sealer, cursors })
    }

    /// The key that signs now. Read per issuance (logins and refreshes, not per request), so a rotation
    /// takes effect on every replica at its activation time.
    async fn signing_key(&self) -> Result<Arc<ActiveKey>, UserError> {
        match self.storage.active_signing_key().await? {
            Some(row) => {
                let cached = self.active_key.read().await.clone();
                if cached.kid() == row.kid {
                    return Ok(cached);
                }
                let private_key = private_key_of(&self.sealer, &row)?;
                let key = Arc::new(ActiveKey::from_pkcs8(row.kid, &private_key)?);
                *self.active_key.write().await = key.clone();
                Ok(key)
            }
            None => Ok(self.active_key.read().await.clone()),
        }
    }

    /// Adds a new signing key, published at once and signing after `activate_in`; older keys stay
    /// published until every token they signed has expired. Returns the new key's id.
    pub async fn rotate_signing_key(&self, activate_in: std::time::Duration) -> Result<String, UserError> {
        let key = signing::generate()?;
        let activate_in = time::Duration::try_from(activate_in).unwrap_or(time::Duration::ZERO);
        let lifetime = time::Duration::seconds(self.config.auth.access_token_ttl_secs) + VERIFY_LEEWAY;
        let sealed = self.sealer.seal(&key.private_pkcs8)?;
        self.storage.rotate_signing_key(&key.kid, &sealed, &key.public_key, activate_in, lifetime).await?;
        let detail = serde_json::json!({"kid": key.kid, "activates_in_secs": activate_in.whole_seconds()});
        self.storage.audit(AuditEvent::new("signing_key_rotated").detail(detail)).await;
        tracing::info!(kid = %key.kid, "signing key rotated");
        Ok(key.kid)
    }

    fn is_admin_email(&self, email: &str) -> bool {
        self.config.auth.admin_emails.iter().any(|admin| admin.eq_ignore_ascii_case(email))
    }

    /// Issues an access token and a new refresh token in `family_id`.
    async fn issue(&self, user: &UserRow, family_id: Uuid) -> Result<pb::AuthResponse, UserError> {
        let (refresh_token, refresh_hash) = new_refresh_token()?;
        let now = OffsetDateTime::now_utc();
        let expires_at = now + time::Duration::seconds(self.config.auth.refresh_token_ttl_secs);
        self.storage.insert_refresh_token(user.id, family_id, &refresh_hash, expires_at).await?;
        self.issue_with_refresh(user, refresh_token).await
    }

    async fn issue_with_refresh(&self, user: &UserRow, refresh_token: String) -> Result<pb::AuthResponse, UserError> {
        let now = OffsetDateTime::now_utc().unix_timestamp();
        let ttl = self.config.auth.access_token_ttl_secs;
        let claims = AccessClaims {
            sub: user.id.to_string(),
            iss: self.config.auth.issuer.clone(),
            aud: self.config.auth.audience.clone(),
            iat: now,
            exp: now + ttl,
            jti: Uuid::now_v7().to_string(),
            role: user.role.clone(),
            tier: user.tier.clone(),
        };
        let key = self.signing_key().await?;
        let access_token = key.sign(&claims)?;
        Ok(pb::AuthResponse { user: Some(to_proto(user)), access_token, refresh_token, expires_in: ttl })
    }

    async fn find_user(&self, email: &str, user_id: &str) -> Result<UserRow, UserError> {
        let user = if !user_id.is_empty() {
            let id = Uuid::parse_str(user_id).map_err(|_| ServiceError::invalid_field("user_id", "must be a UUID"))?;
            self.storage.user_by_id(id).await?
        } else if !email.is_empty() {
            self.storage.user_by_email(email.trim()).await?
        } else {
            return Err(ServiceError::invalid_field("email", "name the account by email or id").into());
        };
        user.ok_or_else(|| ServiceError::not_found("user").into())
    }
}

/// Seals keys stored in clear by earlier versions, creates the first key on a fresh database, and
/// loads the newest.
async fn load_or_create_active_key(storage: &Storage, sealer: &Sealer) -> Result<ActiveKey, UserError> {
    for (kid, private_key) in storage.unsealed_signing_keys().await? {
        storage.seal_signing_key(&kid, &sealer.seal(&private_key)?).await?;
        tracing::info!(%kid, "sealed a signing key stored in clear");
    }
    if storage.signing_keys().await?.is_empty() {
        let key = signing::generate()?;
        storage.insert_signing_key(&key.kid, &sealer.seal(&key.private_pkcs8)?, &key.public_key).await?;
        tracing::info!(kid = %key.kid, "created the first access-token signing key");
    }
    let keys = storage.signing_keys().await?;
    let newest = keys.first().ok_or_else(|| UserError::SigningKey("no signing key after creating one".into()))?;
    ActiveKey::from_pkcs8(newest.kid.clone(), &private_key_of(sealer, newest)?)
}

fn private_key_of(sealer: &Sealer, row: &crate::storage::SigningKeyRow) -> Result<Vec<u8>, UserError> {
    if row.private_key_sealed { sealer.open(&row.private_key) } else { Ok(row.private_key.clone()) }
}

/// A new random secret with `prefix`, and its hash.
fn new_secret(prefix: &str) -> Result<(String, Vec<u8>), UserError> {
    let mut bytes = [0u8; 32];
    ring::rand::SystemRandom::new().fill(&mut bytes).map_err(|_| UserError::SigningKey("no randomness".into()))?;
    let secret = format!("{prefix}{}", URL_SAFE_NO_PAD.encode(bytes));
    let hash = hash_token(&secret);
    Ok((secret, hash))
}

fn new_refresh_token() -> Result<(String, Vec<u8>), UserError> {
    new_secret(REFRESH_TOKEN_PREFIX)
}

fn api_key_to_proto(key: ApiKeyRow) -> pb::ApiKey {
    pb::ApiKey {
        id: key.id.to_string(),
        name: key.name,
        prefix: key.prefix,
        require_signature: key.require_signature,
        created_at: Some(timestamps::to_proto(key.created_at)),
        last_used_at: key.last_used_at.map(timestamps::to_proto),
    }
}

fn parse_user_id(user_id: &str) -> Result<Uuid, UserError> {
    Uuid::parse_str(user_id).map_err(|_| ServiceError::invalid_field("user_id", "must be a UUID").into())
}

fn hash_token(token: &str) -> Vec<u8> {
    ring::digest::digest(&ring::digest::SHA256, token.as_bytes()).as_ref().to_vec()
}

fn to_proto(user: &UserRow) -> pb::User {
    pb::User {
        id: user.id.to_string(),
        email: user.email.clone(),
        display_name: user.display_name.clone(),
        tier: user.tier.clone(),
        role: user.role.clone(),
        created_at: Some(timestamps::to_proto(user.created_at)),
    }
}

/// The longest an account's owner waits because others guessed at its password.
const MAX_ACCOUNT_DELAY: time::Duration = time::Duration::minutes(1);

/// Whether a login may be tried now, and if not how long to wait and why. From an address with `max`
/// failures on this account in the window, not until the window has passed: that address is guessing.
/// From any other, once the account has `max` failures from anywhere, only a while after the last one,
/// a second doubled for each failure past `max`, up to a minute: many addresses can only guess slowly,
/// and the owner is delayed, never locked out.
fn login_wait(
    failures: &crate::storage::RecentFailures,
    max: i64,
    now: time::OffsetDateTime,
) -> Option<(time::Duration, &'static str)> {
    if failures.from_address >= max {
        return Some((
            FAILED_LOGIN_WINDOW,
            "too many failed logins to this account from this address; try again later",
        ));
    }
    let beyond = failures.for_account - max;
    let last = failures.last?;
    if beyond < 0 {
        return None;
    }
    let delay = parley_platform::backoff::exponential(
        std::time::Duration::from_secs(1),
        MAX_ACCOUNT_DELAY.unsigned_abs(),
        u32::try_from(beyond + 1).unwrap_or(u32::MAX),
    );
    let delay = time::Duration::try_from(delay).unwrap_or(MAX_ACCOUNT_DELAY);
    let wait = last + delay - now;
    wait.is_positive().then_some((wait, "many failed logins to this account; try again in a moment"))
}

fn wrong_credentials() -> UserError {
    ServiceError::new(ErrorCode::Unauthorized, "invalid email or password").into()
}

fn invalid_refresh_token() -> UserError {
    ServiceError::new(ErrorCode::Unauthorized, "invalid or expired refresh token").into()
}

#[tonic::async_trait]
impl pb::user_service_server::UserService for UserService {
    async fn register(&self, request: Request<pb::RegisterRequest>) -> Result<Response<pb::AuthResponse>, Status> {
        let request = request.into_inner();
        let email = validation::email(&request.email).map_err(UserError::from)?;
        validation::password(&request.password).map_err(UserError::from)?;
        let display_name = validation::display_name(request.display_name.as_deref()).map_err(UserError::from)?;
        let password_hash = passwords::hash(request.password).await?;
        let role = if self.is_admin_email(&email) { "admin" } else { "user" };
        let Some(user) = self
            .storage
            .insert_user(&email, display_name.as_deref(), &password_hash, role, DEFAULT_TIER)
            .await
            .map_err(UserError::from)?
        else {
            return Err(ServiceError::new(ErrorCode::Conflict, "an account with this email already exists").into());
        };
        tracing::info!(user_id = %user.id, client_ip = %request.client_ip, "user registered");
        self.storage.audit(AuditEvent::new("registered").user(user.id).email(&user.email).ip(&request.client_ip)).await;
        Ok(Response::new(self.issue(&user, Uuid::now_v7()).await?))
    }

    async fn login(&self, request: Request<pb::LoginRequest>) -> Result<Response<pb::AuthResponse>, Status> {
        let request = request.into_inner();
        // An address that could not have registered is refused before it reaches the database (which
        // cannot hold some characters, NUL among them).
        let email = validation::email(&request.email).map_err(UserError::from)?;
        let failures = self
            .storage
            .recent_failed_logins(&email, &request.client_ip, FAILED_LOGIN_WINDOW)
            .await
            .map_err(UserError::from)?;
        let now = time::OffsetDateTime::now_utc();
        if let Some((wait, why)) = login_wait(&failures, self.config.auth.max_failed_logins, now) {
            self.storage.audit(AuditEvent::new("login_locked").email(&email).ip(&request.client_ip)).await;
            let error = ServiceError::new(ErrorCode::RateLimited, why).retry_after(wait.whole_seconds().max(1) as u64);
            return Err(UserError::from(error).into());
        }
        let user = self.storage.user_by_email(&email).await.map_err(UserError::from)?;
        let stored_hash = user.as_ref().map(|user| user.password_hash.clone());
        let matches = passwords::verify(request.password, stored_hash).await?;
        let known_user_id = user.as_ref().map(|user| user.id);
        let Some(mut user) = user.filter(|_| matches) else {
            tracing::info!(client_ip = %request.client_ip, "login failed");
            let mut event = AuditEvent::new("login_failed").email(&email).ip(&request.client_ip);
            event.user_id = known_user_id;
            self.storage.audit(event).await;
            return Err(wrong_credentials().into());
        };
        if user.role != "admin"
            && self.is_admin_email(&user.email)
            && let Some(promoted) = self.storage.set_role(user.id, "admin").await.map_err(UserError::from)?
        {
            user = promoted;
        }
        tracing::info!(user_id = %user.id, client_ip = %request.client_ip, "login succeeded");
        self.storage
            .audit(AuditEvent::new("login_succeeded").user(user.id).email(&user.email).ip(&request.client_ip))
            .await;
        Ok(Response::new(self.issue(&user, Uuid::now_v7()).await?))
    }

    async fn refresh(&self, request: Request<pb::RefreshRequest>) -> Result<Response<pb::AuthResponse>, Status> {
        let request = request.into_inner();
        if !request.refresh_token.starts_with(REFRESH_TOKEN_PREFIX) {
            return Err(invalid_refresh_token().into());
        }
        let (new_token, new_hash) = new_refresh_token()?;
        let expires_at = OffsetDateTime::now_utc() + time::Duration::seconds(self.config.auth.refresh_token_ttl_secs);
        let outcome = self
            .storage
            .rotate_refresh_token(&hash_token(&request.refresh_token), &new_hash, expires_at)
            .await
            .map_err(UserError::from)?;
        match outcome {
            RefreshOutcome::Rotated { user, family_id } => {
                tracing::debug!(user_id = %user.id, %family_id, "refresh token rotated");
                Ok(Response::new(self.issue_with_refresh(&user, new_token).await?))
            }
            RefreshOutcome::Reused { user_id } => {
                tracing::warn!(%user_id, client_ip = %request.client_ip, "refresh token reused; family revoked");
                self.storage.audit(AuditEvent::new("refresh_token_reused").user(user_id).ip(&request.client_ip)).await;
                Err(invalid_refresh_token().into())
            }
            RefreshOutcome::Invalid => Err(invalid_refresh_token().into()),
        }
    }

    async fn logout(&self, request: Request<pb::LogoutRequest>) -> Result<Response<pb::LogoutResponse>, Status> {
        let token = request.into_inner().refresh_token;
        if token.starts_with(REFRESH_TOKEN_PREFIX) {
            self.storage.revoke_refresh_family(&hash_token(&token)).await.map_err(UserError::from)?;
        }
        Ok(Response::new(pb::LogoutResponse {}))
    }

    async fn get_user(&self, request: Request<pb::GetUserRequest>) -> Result<Response<pb::User>, Status> {
        let user = self.find_user("", &request.into_inner().user_id).await?;
        Ok(Response::new(to_proto(&user)))
    }

    async fn get_signing_keys(
        &self,
        _request: Request<pb::GetSigningKeysRequest>,
    ) -> Result<Response<pb::SigningKeys>, Status> {
        let keys = self.storage.signing_keys().await.map_err(UserError::from)?;
        let keys = keys
            .into_iter()
            .map(|key| pb::SigningKey {
                kid: key.kid,
                alg: ALGORITHM.to_owned(),
                crv: "Ed25519".to_owned(),
                x: signing::public_key_x(&key.public_key),
            })
            .collect();
        Ok(Response::new(pb::SigningKeys { keys }))
    }

    async fn set_role(&self, request: Request<pb::SetRoleRequest>) -> Result<Response<pb::User>, Status> {
        let request = request.into_inner();
        let role = validation::role(&request.role).map_err(UserError::from)?;
        let user = self.find_user(&request.email, &request.user_id).await?;
        let updated = self.storage.set_role(user.id, role).await.map_err(UserError::from)?;
        let updated = updated.ok_or_else(|| UserError::from(ServiceError::not_found("user")))?;
        tracing::info!(user_id = %updated.id, role, "role changed");
        let mut event =
            AuditEvent::new("role_changed").user(updated.id).detail(serde_json::json!({"from": user.role, "to": role}));
        event.actor_id = Uuid::parse_str(&request.actor_id).ok();
        self.storage.audit(event).await;
        Ok(Response::new(to_proto(&updated)))
    }

    async fn create_api_key(
        &self,
        request: Request<pb::CreateApiKeyRequest>,
    ) -> Result<Response<pb::CreatedApiKey>, Status> {
        let request = request.into_inner();
        let user_id = parse_user_id(&request.user_id)?;
        let name = request.name.trim();
        if name.is_empty() || name.chars().count() > MAX_API_KEY_NAME_CHARS {
            let message = format!("must be 1 to {MAX_API_KEY_NAME_CHARS} characters");
            return Err(UserError::from(ServiceError::invalid_field("name", message)).into());
        }
        if name.chars().any(char::is_control) {
            let message = "must not contain control characters";
            return Err(UserError::from(ServiceError::invalid_field("name", message)).into());
        }
        let (key, hash) = new_secret(API_KEY_PREFIX)?;
        let prefix: String = key.chars().take(API_KEY_SHOWN_CHARS).collect();
        let signing_secret = if request.require_signature { Some(new_secret(SIGNING_SECRET_PREFIX)?.0) } else { None };
        let sealed = signing_secret.as_ref().map(|secret| self.sealer.seal(secret.as_bytes())).transpose()?;
        let row = self
            .storage
            .insert_api_key(user_id, name, &prefix, &hash, sealed.as_deref())
            .await
            .map_err(UserError::from)?;
        tracing::info!(%user_id, api_key_id = %row.id, "API key created");
        let detail = serde_json::json!({"api_key_id": row.id, "name": row.name});
        self.storage
            .audit(AuditEvent::new("api_key_created").user(user_id).ip(&request.client_ip).detail(detail))
            .await;
        Ok(Response::new(pb::CreatedApiKey { api_key: Some(api_key_to_proto(row)), key, signing_secret }))
    }

    async fn list_api_keys(&self, request: Request<pb::ListApiKeysRequest>) -> Result<Response<pb::ApiKeys>, Status> {
        let request = request.into_inner();
        let user_id = parse_user_id(&request.user_id)?;
        let after = self.cursors.read(CursorKind::ApiKeys, request.cursor.as_deref()).map_err(UserError::from)?;
        let limit = page_size(request.limit);
        let mut keys = self.storage.api_keys(user_id, after, i64::from(limit) + 1).await.map_err(UserError::from)?;
        let next_cursor = self
            .cursors
            .next_page(CursorKind::ApiKeys, &mut keys, limit, |last| Position { at: last.created_at, id: last.id });
        Ok(Response::new(pb::ApiKeys { api_keys: keys.into_iter().map(api_key_to_proto).collect(), next_cursor }))
    }

    async fn list_audit(&self, request: Request<pb::ListAuditRequest>) -> Result<Response<pb::AuditEntries>, Status> {
        let request = request.into_inner();
        let time = |field: &str, at: Option<&prost_types::Timestamp>| match at {
            None => Ok(None),
            Some(at) => timestamps::from_proto(at)
                .map(Some)
                .ok_or_else(|| UserError::from(ServiceError::invalid_field(field, "is not a time"))),
        };
        let account = request.account.as_deref().map(str::trim).filter(|account| !account.is_empty());
        let (user_id, email) = match account.map(|account| (Uuid::parse_str(account), account)) {
            None => (None, None),
            Some((Ok(id), _)) => (Some(id), None),
            Some((Err(_), email)) => (None, Some(email.to_owned())),
        };
        let filter = crate::storage::AuditFilter {
            user_id,
            email,
            event: request.event.filter(|event| !event.is_empty()),
            from: time("from", request.from.as_ref())?,
            to: time("to", request.to.as_ref())?,
        };
        let after = self.cursors.read(CursorKind::Audit, request.cursor.as_deref()).map_err(UserError::from)?;
        let limit = page_size(request.limit);
        let mut rows =
            self.storage.audit_entries(&filter, after, i64::from(limit) + 1).await.map_err(UserError::from)?;
        let next_cursor =
            self.cursors.next_page(CursorKind::Audit, &mut rows, limit, |last| Position { at: last.at, id: last.id });
        let entries = rows
            .into_iter()
            .map(|row| pb::AuditEntry {
                id: row.id.to_string(),
                at: Some(timestamps::to_proto(row.at)),
                event: row.event,
                user_id: row.user_id.map(|id| id.to_string()),
                actor_id: row.actor_id.map(|id| id.to_string()),
                email: row.email,
                client_ip: row.client_ip,
                detail: if row.detail.is_null() { "{}".to_owned() } else { row.detail.to_string() },
            })
            .collect();
        Ok(Response::new(pb::AuditEntries { entries, next_cursor }))
    }

    async fn revoke_api_key(
        &self,
        request: Request<pb::RevokeApiKeyRequest>,
    ) -> Result<Response<pb::RevokeApiKeyResponse>, Status> {
        let request = request.into_inner();
        let user_id = parse_user_id(&request.user_id)?;
        let revoked = match Uuid::parse_str(&request.api_key_id) {
            Ok(id) => self.storage.revoke_api_key(user_id, id).await.map_err(UserError::from)?,
            Err(_) => false,
        };
        if !revoked {
            return Err(UserError::from(ServiceError::not_found("API key")).into());
        }
        tracing::info!(%user_id, api_key_id = %request.api_key_id, "API key revoked");
        let detail = serde_json::json!({"api_key_id": request.api_key_id});
        self.storage
            .audit(AuditEvent::new("api_key_revoked").user(user_id).ip(&request.client_ip).detail(detail))
            .await;
        Ok(Response::new(pb::RevokeApiKeyResponse {}))
    }

    async fn verify_api_key(
        &self,
        request: Request<pb::VerifyApiKeyRequest>,
    ) -> Result<Response<pb::VerifiedApiKey>, Status> {
        let key = request.into_inner().key;
        let invalid = || UserError::from(ServiceError::new(ErrorCode::Unauthorized, "invalid API key"));
        if !key.starts_with(API_KEY_PREFIX) {
            return Err(invalid().into());
        }
        let owner = self.storage.api_key_owner(&hash_token(&key)).await.map_err(UserError::from)?;
        let owner = owner.ok_or_else(invalid)?;
        let signing_secret = match &owner.signing_secret_sealed {
            Some(sealed) => Some(String::from_utf8_lossy(&self.sealer.open(sealed)?).into_owned()),
            None => None,
        };
        Ok(Response::new(pb::VerifiedApiKey {
            api_key_id: owner.api_key_id.to_string(),
            user_id: owner.user_id.to_string(),
            role: owner.role,
            tier: owner.tier,
            require_signature: owner.require_signature,
            signing_secret,
        }))
    }

    async fn delete_account(
        &self,
        request: Request<pb::DeleteAccountRequest>,
    ) -> Result<Response<pb::DeleteAccountResponse>, Status> {
        let request = request.into_inner();
        let user_id = parse_user_id(&request.user_id)?;
        let Some(revoked) = self.storage.delete_account(user_id).await.map_err(UserError::from)? else {
            // Already gone (a retried deletion): nothing more to do.
            return Ok(Response::new(pb::DeleteAccountResponse { revoked_api_key_ids: Vec::new() }));
        };
        tracing::info!(%user_id, api_keys = revoked.len(), "account deleted");
        // The account's id only: the deletion is recorded without what it deleted.
        self.storage.audit(AuditEvent::new("account_deleted").user(user_id)).await;
        let revoked_api_key_ids = revoked.iter().map(Uuid::to_string).collect();
        Ok(Response::new(pb::DeleteAccountResponse { revoked_api_key_ids }))
    }

    async fn set_tier(&self, request: Request<pb::SetTierRequest>) -> Result<Response<pb::User>, Status> {
        let request = request.into_inner();
        if self.config.tier(&request.tier).is_none() {
            let known: Vec<&String> = self.config.tiers.keys().collect();
            return Err(ServiceError::invalid_field("tier", format!("must be one of {known:?}")).into());
        }
        let user = self.find_user(&request.email, &request.user_id).await?;
        let updated = self.storage.set_tier(user.id, &request.tier).await.map_err(UserError::from)?;
        let updated = updated.ok_or_else(|| UserError::from(ServiceError::not_found("user")))?;
        tracing::info!(user_id = %updated.id, tier = %updated.tier, "tier changed");
        let mut event = AuditEvent::new("tier_changed")
            .user(updated.id)
            .ip(&request.client_ip)
            .detail(serde_json::json!({"from": user.tier, "to": updated.tier}));
        event.actor_id = Uuid::parse_str(&request.actor_id).ok();
        self.storage.audit(event).await;
        Ok(Response::new(to_proto(&updated)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::RecentFailures;

    #[test]
    fn a_guessing_address_is_stopped_and_the_owner_only_waits() {
        let now = time::OffsetDateTime::now_utc();
        let failures = |from_address, for_account, seconds_ago: i64| RecentFailures {
            from_address,
            for_account,
            last: Some(now - time::Duration::seconds(seconds_ago)),
        };
        // Below the threshold, nobody waits.
        assert_eq!(login_wait(&failures(2, 2, 0), 3, now), None);
        // The address that failed three times waits out the window, whatever it sends.
        assert_eq!(login_wait(&failures(3, 3, 600), 3, now).map(|(wait, _)| wait), Some(FAILED_LOGIN_WINDOW));
        // Anyone else: a second after the last failure, doubling with each one past the threshold.
        assert!(login_wait(&failures(0, 3, 0), 3, now).is_some());
        assert_eq!(login_wait(&failures(0, 3, 2), 3, now), None);
        let (wait, _) = login_wait(&failures(0, 5, 1), 3, now).unwrap();
        assert_eq!(wait, time::Duration::seconds(3));
        // Never more than a minute, however many addresses guessed.
        let (wait, _) = login_wait(&failures(0, 500, 0), 3, now).unwrap();
        assert_eq!(wait, MAX_ACCOUNT_DELAY);
        assert_eq!(login_wait(&failures(0, 500, 61), 3, now), None);
    }
}
