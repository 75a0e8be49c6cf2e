//! The response cache: exact matches on model, prompt and output limit, for deterministic requests
//! (temperature 0). Entries live in Redis with a TTL, behind a small in-process LRU that also answers
//! while Redis is down. Identical requests in flight at once are coalesced into one upstream call.

use std::collections::HashMap;
use std::num::NonZeroUsize;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use lru::LruCache;
use parley_platform::config::CacheConfig;
use parley_platform::sampling::Sampling;
use serde::{Deserialize, Serialize};
use tokio::sync::OnceCell;

use crate::provider::PromptMessage;

/// A reply as the cache keeps it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct CachedReply {
    pub content: String,
    pub input_tokens: i64,
    pub output_tokens: i64,
}

type Flight = Arc<OnceCell<Option<CachedReply>>>;

pub struct ResponseCache {
    redis: Option<redis::aio::ConnectionManager>,
    prefix: String,
    ttl: Duration,
    local: Mutex<LruCache<String, CachedReply>>,
    in_flight: Mutex<HashMap<String, Flight>>,
}

/// The cache key of a request: SHA-256 over the model, the exact prompt, the output limit and every
/// sampling parameter that can change the reply.
pub fn key(model: &str, prompt: &[PromptMessage], max_tokens: u32, sampling: &Sampling) -> String {
    let canonical = serde_json::json!({
        "model": model,
        "messages": prompt,
        "max_tokens": max_tokens,
        "sampling": sampling.cache_identity(),
    });
    let digest = ring::digest::digest(&ring::digest::SHA256, canonical.to_string().as_bytes());
    hex::encode(digest)
}

impl ResponseCache {
    pub fn new(config: &CacheConfig, redis: Option<redis::aio::ConnectionManager>, prefix: &str) -> Self {
        let capacity = NonZeroUsize::new(config.local_entries.max(1)).unwrap_or(NonZeroUsize::MIN);
        Self {
            redis,
            prefix: prefix.to_owned(),
            ttl: Duration::from_secs(config.ttl_secs),
            local: Mutex::new(LruCache::new(capacity)),
            in_flight: Mutex::new(HashMap::new()),
        }
    }

    fn redis_key(&self, key: &str) -> String {
        format!("{}:cache:{key}", self.prefix)
    }

    pub async fn get(&self, key: &str) -> Option<CachedReply> {
        if let Some(reply) = self.local.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).get(key) {
            return Some(reply.clone());
        }
        let mut redis = self.redis.clone()?;
        let stored: Option<String> = match redis::cmd("GET").arg(self.redis_key(key)).query_async(&mut redis).await {
            Ok(stored) => stored,
            Err(error) => {
                tracing::warn!(%error, "response cache: redis unavailable, using the local cache only");
                return None;
            }
        };
        let reply: CachedReply = serde_json::from_str(&stored?).ok()?;
        self.local.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).put(key.to_owned(), reply.clone());
        Some(reply)
    }

    pub async fn put(&self, key: &str, reply: &CachedReply) {
        self.local.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).put(key.to_owned(), reply.clone());
        let (Some(mut redis), Ok(value)) = (self.redis.clone(), serde_json::to_string(reply)) else {
            return;
        };
        let stored: Result<(), redis::RedisError> = redis::cmd("SET")
            .arg(self.redis_key(key))
            .arg(value)
            .arg("EX")
            .arg(self.ttl.as_secs().max(1))
            .query_async(&mut redis)
            .await;
        if let Err(error) = stored {
            tracing::warn!(%error, "response cache: could not store in redis");
        }
    }

    /// Runs `call` once for every concurrent caller with the same key. The caller whose `call` ran
    /// gets its own result (`Ok(Some(..))`); the others get what it produced as a cached reply
    /// (`Err(Some(..))`), or `Err(None)` if it failed, so they can try for themselves.
    pub async fn coalesce<T, F, Fut>(&self, key: &str, call: F) -> Result<T, Option<CachedReply>>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = (T, Option<CachedReply>)>,
    {
        let flight = {
            let mut in_flight = self.in_flight.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
            in_flight.entry(key.to_owned()).or_default().clone()
        };
        let mut own = None;
        let shared = flight
            .get_or_init(|| async {
                let (result, reply) = call().await;
                own = Some(result);
                reply
            })
            .await
            .clone();
        match own {
            Some(result) => {
                self.in_flight.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).remove(key);
                Ok(result)
            }
            None => Err(shared),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn prompt(text: &str) -> Vec<PromptMessage> {
        vec![PromptMessage::new("user", text)]
    }

    #[test]
    fn keys_depend_on_model_prompt_limit_and_sampling() {
        let plain = Sampling { temperature: Some(0.0), ..Sampling::default() };
        let base = key("m", &prompt("hi"), 100, &plain);
        assert_eq!(base, key("m", &prompt("hi"), 100, &plain));
        assert_ne!(base, key("n", &prompt("hi"), 100, &plain));
        assert_ne!(base, key("m", &prompt("hi!"), 100, &plain));
        assert_ne!(base, key("m", &prompt("hi"), 101, &plain));
        let stopped = Sampling { stop: vec!["x".into()], ..plain.clone() };
        assert_ne!(base, key("m", &prompt("hi"), 100, &stopped));
        let seeded = Sampling { seed: Some(1), ..plain.clone() };
        assert_ne!(base, key("m", &prompt("hi"), 100, &seeded));
        // Who the end user is does not change the reply.
        let named = Sampling { user: Some("someone".into()), ..plain.clone() };
        assert_eq!(base, key("m", &prompt("hi"), 100, &named));
        assert_eq!(base.len(), 64);
    }

    #[tokio::test]
    async fn the_local_cache_answers_without_redis() {
        let cache = ResponseCache::new(&CacheConfig::default(), None, "t");
        let reply = CachedReply { content: "x".into(), input_tokens: 1, output_tokens: 2 };
        assert_eq!(cache.get("k").await, None);
        cache.put("k", &reply).await;
        assert_eq!(cache.get("k").await, Some(reply));
    }

    #[tokio::test]
    async fn concurrent_identical_calls_run_once() {
        let cache = Arc::new(ResponseCache::new(&CacheConfig::default(), None, "t"));
        let calls = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let reply = CachedReply { content: "shared".into(), input_tokens: 1, output_tokens: 1 };
        let runs = (0..5).map(|_| {
            let (cache, calls, reply) = (cache.clone(), calls.clone(), reply.clone());
            async move {
                cache
                    .coalesce("same", || async move {
                        calls.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        ("leader", Some(reply))
                    })
                    .await
            }
        });
        let outcomes = futures::future::join_all(runs).await;
        assert_eq!(calls.load(std::sync::atomic::Ordering::SeqCst), 1);
        assert_eq!(outcomes.iter().filter(|outcome| outcome.is_ok()).count(), 1);
        assert!(outcomes.iter().filter_map(|outcome| outcome.as_ref().err()).all(|shared| shared.is_some()));
    }
}
