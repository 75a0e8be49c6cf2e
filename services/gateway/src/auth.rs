//! Authentication at the gateway. Access tokens are verified locally against the signing keys the user
//! service publishes, cached here: no call to the user service per request, and tokens keep verifying
//! while the user service is down. An unknown `kid` triggers a refresh (at most one per
//! [`REFRESH_COOLDOWN`]), so a newly rotated key is picked up at once.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::http::header;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use parley_platform::access_token::AccessClaims;
use parley_platform::grpc::ClientChannel;
use parley_proto::user::v1 as pb;
use parley_proto::user::v1::user_service_client::UserServiceClient;
use tokio::sync::{Mutex, RwLock};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::AppState;
use crate::problem::ApiError;

const REFRESH_COOLDOWN: Duration = Duration::from_secs(10);
/// After a failed fetch (user service down), the next attempt waits only this long.
const FAILED_FETCH_BACKOFF: Duration = Duration::from_secs(1);
const LEEWAY_SECS: u64 = 30;

struct CachedKeys {
    published: Vec<pb::SigningKey>,
    decoding: HashMap<String, DecodingKey>,
}

/// The signing keys, as last fetched from the user service.
pub struct KeyCache {
    user: UserServiceClient<ClientChannel>,
    keys: RwLock<CachedKeys>,
    /// When the keys were last fetched successfully, and when a fetch was last attempted.
    last_fetch: Mutex<(Option<Instant>, Option<Instant>)>,
    validation: Validation,
    refresh_every: Duration,
}

impl KeyCache {
    pub fn new(user: UserServiceClient<ClientChannel>, issuer: &str, audience: &str, refresh_every: Duration) -> Self {
        let mut validation = Validation::new(Algorithm::EdDSA);
        validation.set_issuer(&[issuer]);
        validation.set_audience(&[audience]);
        validation.set_required_spec_claims(&["exp", "iss", "aud", "sub"]);
        validation.leeway = LEEWAY_SECS;
        Self {
            user,
            keys: RwLock::new(CachedKeys { published: Vec::new(), decoding: HashMap::new() }),
            last_fetch: Mutex::new((None, None)),
            validation,
            refresh_every,
        }
    }

    /// Fetches the keys unless that was done within the cooldown. Keeps the old keys on failure.
    pub async fn refresh(&self, force: bool) -> Result<(), tonic::Status> {
        let mut last_fetch = self.last_fetch.lock().await;
        let (succeeded, attempted) = *last_fetch;
        let recently_fetched = succeeded.is_some_and(|at| at.elapsed() < REFRESH_COOLDOWN.min(self.refresh_every));
        let recently_failed = attempted.is_some_and(|at| at.elapsed() < FAILED_FETCH_BACKOFF);
        if !force && (recently_fetched || recently_failed) {
            return Ok(());
        }
        last_fetch.1 = Some(Instant::now());
        let published = self.user.clone().get_signing_keys(pb::GetSigningKeysRequest {}).await?.into_inner().keys;
        last_fetch.0 = Some(Instant::now());
        let decoding = published
            .iter()
            .filter(|key| key.alg == parley_platform::access_token::ALGORITHM)
            .filter_map(|key| DecodingKey::from_ed_components(&key.x).ok().map(|decoding| (key.kid.clone(), decoding)))
            .collect();
        *self.keys.write().await = CachedKeys { published, decoding };
        Ok(())
    }

    /// Keeps the cache fresh until `shutdown`.
    pub async fn run_refresher(self: Arc<Self>, shutdown: CancellationToken) {
        loop {
            if let Err(status) = self.refresh(true).await {
                tracing::warn!(code = ?status.code(), "could not refresh signing keys; keeping the cached ones");
            }
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = tokio::time::sleep(self.refresh_every) => {}
            }
        }
    }

    pub async fn published(&self) -> Vec<pb::SigningKey> {
        if self.keys.read().await.published.is_empty() {
            let _keep_empty = self.refresh(false).await;
        }
        self.keys.read().await.published.clone()
    }

    /// The claims of a valid access token; `None` for anything else (forged, expired, wrong key,
    /// wrong algorithm, `alg: none`, wrong audience or issuer).
    pub async fn verify(&self, token: &str) -> Option<AccessClaims> {
        let header = jsonwebtoken::decode_header(token).ok()?;
        if header.alg != Algorithm::EdDSA {
            return None;
        }
        let kid = header.kid?;
        if !self.keys.read().await.decoding.contains_key(&kid) {
            let _stale_is_fine = self.refresh(false).await;
        }
        let keys = self.keys.read().await;
        let key = keys.decoding.get(&kid)?;
        jsonwebtoken::decode::<AccessClaims>(token, key, &self.validation).ok().map(|data| data.claims)
    }
}

/// The credentials of an `Authorization: Bearer ...` header (the scheme's name is case-insensitive),
/// else of an `X-Api-Key` header.
pub fn bearer_token(headers: &axum::http::HeaderMap) -> Option<&str> {
    let bearer = || {
        let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
        let (scheme, token) = value.split_once(' ')?;
        let token = token.trim();
        (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty()).then_some(token)
    };
    // Anthropic's SDKs send the key in `X-Api-Key`.
    let api_key = || headers.get("x-api-key")?.to_str().ok().map(str::trim).filter(|key| !key.is_empty());
    bearer().or_else(api_key)
}

/// The authenticated caller of a request.
#[derive(Debug, Clone)]
pub struct Caller {
    pub user_id: Uuid,
    pub role: String,
    pub tier: String,
    /// The request's rate limit, when it waits to be decided with the request's budget reservation
    /// (`pipeline::reserve_budget`).
    pub(crate) rate_limit: Option<crate::limits::DeferredLimit>,
}

impl Caller {
    pub fn is_admin(&self) -> bool {
        self.role == "admin"
    }
}

impl Caller {
    /// The caller an access token stands for. (API keys go through `pipeline::key_grant`, which
    /// limits unverified ones per client address and shares one verification among concurrent
    /// requests.)
    pub async fn from_token(state: &AppState, token: &str) -> Result<Self, ApiError> {
        let Some(claims) = state.keys.verify(token).await else {
            return Err(ApiError::unauthorized("invalid or expired access token"));
        };
        let Ok(user_id) = Uuid::parse_str(&claims.sub) else {
            return Err(ApiError::unauthorized("invalid access token"));
        };
        let mut caller = Caller { user_id, role: claims.role, tier: claims.tier, rate_limit: None };
        if !state.account_overrides.apply(&mut caller) {
            return Err(ApiError::unauthorized("this account was deleted"));
        }
        Ok(caller)
    }
}

/// How long a verified API key is trusted without asking the user service again. Revocations are
/// broadcast, so this only bounds staleness for a gateway that missed the broadcast.
const API_KEY_TTL: Duration = Duration::from_secs(30);
const API_KEY_CACHE_ENTRIES: usize = 10_000;
/// How long a key the user service did not know is refused without asking it again. Keys are random
/// and made by the user service, so a key unknown now stays unknown: the time only bounds memory.
const UNKNOWN_KEY_TTL: Duration = Duration::from_secs(300);

struct CachedKey {
    api_key_id: String,
    grant: KeyGrant,
    verified_at: Instant,
}

/// What a verified API key grants, and whether its requests must be signed (with which secret).
#[derive(Debug, Clone)]
pub struct KeyGrant {
    pub caller: Caller,
    pub require_signature: bool,
    pub signing_secret: Option<String>,
}

/// The answer to a question about one key that another request is asking the user service, shared
/// with every request that waits for it; `Err` when that request gave up before asking (it was over its
/// address's limit, or its client hung up).
type SharedAnswer =
    futures::future::Shared<tokio::sync::oneshot::Receiver<Result<KeyGrant, parley_platform::ServiceError>>>;

/// API keys verified by the user service, briefly remembered by the hash of the key; and keys it did
/// not know, remembered so that an invented key costs the user service one call, not one per request.
/// Requests that need the same key verified at the same moment (a burst on a new key, or on one whose
/// entry just expired) wait for one question to the user service rather than each asking.
pub struct ApiKeyCache {
    user: UserServiceClient<ClientChannel>,
    entries: std::sync::Mutex<HashMap<Vec<u8>, CachedKey>>,
    unknown: std::sync::Mutex<HashMap<Vec<u8>, Instant>>,
    asking: std::sync::Mutex<HashMap<Vec<u8>, (u64, SharedAnswer)>>,
    next_question: std::sync::atomic::AtomicU64,
}

/// What a request does about a key that is not freshly verified ([`ApiKeyCache::check`]).
pub enum KeyCheck<'a> {
    /// Wait for the answer another request is getting.
    Wait(SharedAnswer),
    /// Ask the user service, for every request that waits meanwhile.
    Ask(Question<'a>),
}

/// The one question under way about a key; dropped unasked, it lets the waiting requests ask again.
pub struct Question<'a> {
    cache: &'a ApiKeyCache,
    hash: Vec<u8>,
    id: u64,
    answer: Option<tokio::sync::oneshot::Sender<Result<KeyGrant, parley_platform::ServiceError>>>,
    /// The key was verified here before (its entry expired): it is not a guess.
    pub known: bool,
}

impl Question<'_> {
    /// Asks the user service about `key` and hands the answer to every request waiting for it.
    pub async fn ask(mut self, key: &str) -> Result<KeyGrant, ApiError> {
        let answer = self.cache.verify_with_user_service(key).await;
        if let Some(waiting) = self.answer.take() {
            let _nobody_waits =
                waiting.send(answer.as_ref().map(Clone::clone).map_err(|ApiError(error)| error.clone()));
        }
        answer
    }
}

impl Drop for Question<'_> {
    fn drop(&mut self) {
        let mut asking = self.cache.asking.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        if asking.get(&self.hash).is_some_and(|(id, _)| *id == self.id) {
            asking.remove(&self.hash);
        }
    }
}

impl ApiKeyCache {
    pub fn new(user: UserServiceClient<ClientChannel>) -> Self {
        Self {
            user,
            entries: std::sync::Mutex::new(HashMap::new()),
            unknown: std::sync::Mutex::new(HashMap::new()),
            asking: std::sync::Mutex::new(HashMap::new()),
            next_question: std::sync::atomic::AtomicU64::new(0),
        }
    }

    /// For a key not freshly verified: wait for the question another request is asking about it, or ask
    /// it (then `known` says whether this gateway verified the key before).
    pub fn check(&self, key: &str) -> KeyCheck<'_> {
        let hash = ring::digest::digest(&ring::digest::SHA256, key.as_bytes()).as_ref().to_vec();
        let mut asking = self.asking.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        if let Some((_, answer)) = asking.get(&hash) {
            return KeyCheck::Wait(answer.clone());
        }
        let (answer, waiting) = tokio::sync::oneshot::channel();
        let id = self.next_question.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        asking.insert(hash.clone(), (id, futures::FutureExt::shared(waiting)));
        drop(asking);
        let known = self.lock().contains_key(&hash);
        KeyCheck::Ask(Question { cache: self, hash, id, answer: Some(answer), known })
    }

    fn unknown(&self) -> std::sync::MutexGuard<'_, HashMap<Vec<u8>, Instant>> {
        self.unknown.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<Vec<u8>, CachedKey>> {
        self.entries.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// What `key` grants, if it was verified lately: then nothing needs asking.
    pub fn cached(&self, key: &str) -> Option<KeyGrant> {
        let hash = ring::digest::digest(&ring::digest::SHA256, key.as_bytes());
        self.lock()
            .get(hash.as_ref())
            .filter(|entry| entry.verified_at.elapsed() < API_KEY_TTL)
            .map(|entry| entry.grant.clone())
    }

    /// Asks the user service about `key` (or remembers it refused it), and caches what it grants.
    async fn verify_with_user_service(&self, key: &str) -> Result<KeyGrant, ApiError> {
        let hash = ring::digest::digest(&ring::digest::SHA256, key.as_bytes()).as_ref().to_vec();
        if self.unknown().get(&hash).is_some_and(|seen| seen.elapsed() < UNKNOWN_KEY_TTL) {
            return Err(ApiError::unauthorized("invalid API key"));
        }
        let verified = match self.user.clone().verify_api_key(pb::VerifyApiKeyRequest { key: key.to_owned() }).await {
            Ok(verified) => verified.into_inner(),
            Err(status) => {
                // Only a refusal is remembered: an unavailable user service decides nothing.
                if status.code() == tonic::Code::Unauthenticated {
                    let mut unknown = self.unknown();
                    if unknown.len() >= API_KEY_CACHE_ENTRIES {
                        unknown.retain(|_, seen| seen.elapsed() < UNKNOWN_KEY_TTL);
                    }
                    if unknown.len() < API_KEY_CACHE_ENTRIES {
                        unknown.insert(hash, Instant::now());
                    }
                }
                return Err(status.into());
            }
        };
        let user_id = Uuid::parse_str(&verified.user_id).map_err(|_| ApiError::unauthorized("invalid API key"))?;
        let caller = Caller { user_id, role: verified.role, tier: verified.tier, rate_limit: None };
        let grant =
            KeyGrant { caller, require_signature: verified.require_signature, signing_secret: verified.signing_secret };
        let mut entries = self.lock();
        if entries.len() >= API_KEY_CACHE_ENTRIES {
            entries.retain(|_, entry| entry.verified_at.elapsed() < API_KEY_TTL);
        }
        if entries.len() < API_KEY_CACHE_ENTRIES {
            let entry =
                CachedKey { api_key_id: verified.api_key_id, grant: grant.clone(), verified_at: Instant::now() };
            entries.insert(hash, entry);
        }
        Ok(grant)
    }

    /// Forgets a revoked key at once.
    pub fn forget(&self, api_key_id: &str) {
        self.lock().retain(|_, entry| entry.api_key_id != api_key_id);
    }

    /// Forgets keys as their revocation is announced on `subject`, until `shutdown`.
    pub async fn follow_revocations(
        self: Arc<Self>,
        nats: async_nats::Client,
        subject: String,
        shutdown: CancellationToken,
    ) {
        use futures::StreamExt;
        let mut subscriber = match nats.subscribe(subject).await {
            Ok(subscriber) => subscriber,
            Err(error) => {
                tracing::error!(%error, "cannot follow API key revocations; revoked keys expire from the cache instead");
                return;
            }
        };
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => break,
                message = subscriber.next() => match message {
                    Some(message) => self.forget(&String::from_utf8_lossy(&message.payload)),
                    None => break,
                },
            }
        }
    }
}

/// Tier and role changes announced since tokens were issued, by user. An entry lives as long as a token issued
/// before the change can (an access token's lifetime), after which tokens carry the new tier anyway.
pub struct AccountOverrides {
    lifetime: Duration,
    entries: std::sync::Mutex<HashMap<Uuid, (AccountState, Instant)>>,
}

/// An account's tier and role as last announced, or its deletion.
#[derive(Debug, Clone)]
struct AccountState {
    tier: String,
    role: String,
    deleted: bool,
}

impl AccountOverrides {
    pub fn new(lifetime: Duration) -> Self {
        Self { lifetime, entries: std::sync::Mutex::new(HashMap::new()) }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<Uuid, (AccountState, Instant)>> {
        self.entries.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Brings `caller` up to its account's announced state; false when the account was deleted.
    pub fn apply(&self, caller: &mut Caller) -> bool {
        if let Some((state, at)) = self.lock().get(&caller.user_id)
            && at.elapsed() < self.lifetime
        {
            if state.deleted {
                return false;
            }
            caller.tier = state.tier.clone();
            caller.role = state.role.clone();
        }
        true
    }

    pub fn record(&self, change: &parley_platform::events::AccountChanged) {
        let mut entries = self.lock();
        entries.retain(|_, (_, at)| at.elapsed() < self.lifetime);
        let state = AccountState { tier: change.tier.clone(), role: change.role.clone(), deleted: change.deleted };
        entries.insert(change.user_id, (state, Instant::now()));
    }

    /// Records tier and role changes as they are announced on `subject`, until `shutdown`.
    pub async fn follow(self: Arc<Self>, nats: async_nats::Client, subject: String, shutdown: CancellationToken) {
        use futures::StreamExt;
        let mut subscriber = match nats.subscribe(subject).await {
            Ok(subscriber) => subscriber,
            Err(error) => {
                tracing::error!(%error, "cannot follow account changes; they apply with the next token instead");
                return;
            }
        };
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => break,
                message = subscriber.next() => match message {
                    Some(message) => match serde_json::from_slice(&message.payload) {
                        Ok(change) => self.record(&change),
                        Err(error) => tracing::warn!(%error, "unreadable account change"),
                    },
                    None => break,
                },
            }
        }
    }
}
