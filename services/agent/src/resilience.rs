//! What keeps one failing provider from taking replies down: a circuit breaker per provider, a pool of
//! API keys per provider, and exponential backoff with full jitter between retries.

use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use parley_platform::config::{BreakerConfig, RetryConfig};
use ring::rand::SecureRandom;

/// Closed (calls flow), open (calls are refused until the cool-down ends), half-open (one probe call).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BreakerState {
    Closed,
    Open,
    HalfOpen,
}

impl BreakerState {
    pub fn as_str(self) -> &'static str {
        match self {
            BreakerState::Closed => "closed",
            BreakerState::Open => "open",
            BreakerState::HalfOpen => "half_open",
        }
    }

    /// The value of `parley_llm_breaker_state`: 0 closed, 1 half-open, 2 open.
    fn gauge(self) -> f64 {
        match self {
            BreakerState::Closed => 0.0,
            BreakerState::HalfOpen => 1.0,
            BreakerState::Open => 2.0,
        }
    }
}

#[derive(Debug)]
struct BreakerInner {
    state: BreakerState,
    consecutive_failures: u32,
    opened_at: Option<Instant>,
    probe_in_flight: bool,
}

#[derive(Debug)]
pub struct Breaker {
    provider: String,
    config: BreakerConfig,
    inner: Mutex<BreakerInner>,
}

impl Breaker {
    pub fn new(provider: &str, config: BreakerConfig) -> Self {
        let breaker = Self {
            provider: provider.to_owned(),
            config,
            inner: Mutex::new(BreakerInner {
                state: BreakerState::Closed,
                consecutive_failures: 0,
                opened_at: None,
                probe_in_flight: false,
            }),
        };
        breaker.publish(BreakerState::Closed);
        breaker
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BreakerInner> {
        self.inner.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn publish(&self, state: BreakerState) {
        metrics::gauge!(crate::metrics::LLM_BREAKER_STATE, "provider" => self.provider.clone()).set(state.gauge());
    }

    pub fn state(&self) -> BreakerState {
        self.lock().state
    }

    /// Whether a call may go ahead now. An open breaker whose cool-down has passed lets one probe through.
    pub fn allow(&self) -> bool {
        let mut inner = self.lock();
        match inner.state {
            BreakerState::Closed => true,
            BreakerState::Open => {
                let cooled =
                    inner.opened_at.is_none_or(|at| at.elapsed() >= Duration::from_secs(self.config.cool_down_secs));
                if cooled {
                    inner.state = BreakerState::HalfOpen;
                    inner.probe_in_flight = true;
                    drop(inner);
                    self.publish(BreakerState::HalfOpen);
                    tracing::info!(provider = %self.provider, "circuit half-open: probing");
                }
                cooled
            }
            BreakerState::HalfOpen if inner.probe_in_flight => false,
            BreakerState::HalfOpen => {
                inner.probe_in_flight = true;
                true
            }
        }
    }

    pub fn record_success(&self) {
        let mut inner = self.lock();
        let was = inner.state;
        inner.state = BreakerState::Closed;
        inner.consecutive_failures = 0;
        inner.opened_at = None;
        inner.probe_in_flight = false;
        drop(inner);
        if was != BreakerState::Closed {
            tracing::info!(provider = %self.provider, "circuit closed");
            self.publish(BreakerState::Closed);
        }
    }

    /// A probe that reached the provider and got a client error (4xx) still shows it is up.
    pub fn record_success_if_probing(&self) {
        if self.state() == BreakerState::HalfOpen {
            self.record_success();
        }
    }

    pub fn record_failure(&self) {
        let mut inner = self.lock();
        inner.consecutive_failures += 1;
        let trips =
            inner.state == BreakerState::HalfOpen || inner.consecutive_failures >= self.config.failure_threshold;
        if trips && inner.state != BreakerState::Open {
            inner.state = BreakerState::Open;
            inner.opened_at = Some(Instant::now());
            inner.probe_in_flight = false;
            drop(inner);
            tracing::warn!(provider = %self.provider, "circuit open");
            self.publish(BreakerState::Open);
        }
    }
}

/// What a key's call came to, for the pool's bookkeeping.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyOutcome {
    Worked,
    /// 401 or 403: the key is wrong or revoked.
    Rejected,
    /// 429: the key's own limit.
    Throttled,
}

/// Failures in a row after which a key is benched.
const BENCH_AFTER: u32 = 3;
const BENCH_FOR: Duration = Duration::from_secs(60);

#[derive(Debug)]
struct PooledKey {
    secret: String,
    consecutive_failures: u32,
    benched_until: Option<Instant>,
}

/// A provider's API keys, used in turn. A key answered 401 or 429 gives way to the next one at once; a
/// key that keeps failing is benched for a minute.
#[derive(Debug)]
pub struct KeyPool {
    provider: String,
    keys: Mutex<Vec<PooledKey>>,
    next: AtomicUsize,
}

impl KeyPool {
    pub fn new(provider: &str, secrets: Vec<String>) -> Self {
        let keys = secrets
            .into_iter()
            .map(|secret| PooledKey { secret, consecutive_failures: 0, benched_until: None })
            .collect();
        Self { provider: provider.to_owned(), keys: Mutex::new(keys), next: AtomicUsize::new(0) }
    }

    pub fn len(&self) -> usize {
        self.keys.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).len()
    }

    /// The next key to use (index and secret), skipping benched keys unless every key is benched.
    pub fn pick(&self) -> Option<(usize, String)> {
        let keys = self.keys.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        if keys.is_empty() {
            return None;
        }
        let now = Instant::now();
        let start = self.next.fetch_add(1, Ordering::Relaxed);
        let available = (0..keys.len())
            .map(|offset| (start + offset) % keys.len())
            .find(|&index| keys[index].benched_until.is_none_or(|until| until <= now));
        let index =
            available.unwrap_or_else(|| (0..keys.len()).min_by_key(|&index| keys[index].benched_until).unwrap_or(0));
        Some((index, keys[index].secret.clone()))
    }

    pub fn report(&self, index: usize, outcome: KeyOutcome) {
        let mut keys = self.keys.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        let Some(key) = keys.get_mut(index) else {
            return;
        };
        match outcome {
            KeyOutcome::Worked => {
                key.consecutive_failures = 0;
                key.benched_until = None;
            }
            KeyOutcome::Rejected | KeyOutcome::Throttled => {
                key.consecutive_failures += 1;
                if key.consecutive_failures >= BENCH_AFTER {
                    key.benched_until = Some(Instant::now() + BENCH_FOR);
                    tracing::warn!(provider = %self.provider, key = index, ?outcome, "API key benched");
                    metrics::counter!(crate::metrics::LLM_KEYS_BENCHED, "provider" => self.provider.clone())
                        .increment(1);
                }
            }
        }
    }
}

/// The delay before retry number `attempt` (1 for the first retry): a uniform draw between zero and an
/// exponentially growing ceiling (full jitter), or what the provider asked for with `Retry-After`.
pub fn backoff(config: &RetryConfig, attempt: u32, retry_after: Option<Duration>) -> Duration {
    if let Some(asked) = retry_after {
        return asked.min(Duration::from_millis(config.max_delay_ms));
    }
    let ceiling = parley_platform::backoff::exponential(
        Duration::from_millis(config.base_delay_ms),
        Duration::from_millis(config.max_delay_ms),
        attempt,
    );
    Duration::from_millis(random_below(ceiling.as_millis() as u64 + 1))
}

fn random_below(bound: u64) -> u64 {
    let mut bytes = [0u8; 8];
    if bound == 0 || ring::rand::SystemRandom::new().fill(&mut bytes).is_err() {
        return bound / 2;
    }
    u64::from_le_bytes(bytes) % bound
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_breaker_opens_after_the_threshold_and_half_opens_after_the_cool_down() {
        let breaker = Breaker::new("p", BreakerConfig { failure_threshold: 2, cool_down_secs: 0 });
        assert!(breaker.allow());
        breaker.record_failure();
        assert_eq!(breaker.state(), BreakerState::Closed);
        breaker.record_failure();
        assert_eq!(breaker.state(), BreakerState::Open);
        // Cool-down of zero: the next call is the probe, and only one probe at a time.
        assert!(breaker.allow());
        assert_eq!(breaker.state(), BreakerState::HalfOpen);
        assert!(!breaker.allow());
        // A failed probe opens it again; a successful one closes it.
        breaker.record_failure();
        assert_eq!(breaker.state(), BreakerState::Open);
        assert!(breaker.allow());
        breaker.record_success();
        assert_eq!(breaker.state(), BreakerState::Closed);
        assert!(breaker.allow());
    }

    #[test]
    fn an_open_breaker_refuses_calls_during_its_cool_down() {
        let breaker = Breaker::new("p", BreakerConfig { failure_threshold: 1, cool_down_secs: 3600 });
        breaker.record_failure();
        assert!(!breaker.allow());
        assert_eq!(breaker.state(), BreakerState::Open);
    }

    #[test]
    fn keys_rotate_and_a_failing_key_is_benched() {
        let pool = KeyPool::new("p", vec!["a".into(), "b".into()]);
        let first = pool.pick().unwrap();
        let second = pool.pick().unwrap();
        assert_ne!(first.0, second.0, "keys are used in turn");
        for _ in 0..BENCH_AFTER {
            pool.report(0, KeyOutcome::Rejected);
        }
        for _ in 0..4 {
            assert_eq!(pool.pick().unwrap().1, "b", "the benched key is skipped");
        }
        pool.report(0, KeyOutcome::Worked);
        let picks: Vec<String> = (0..4).map(|_| pool.pick().unwrap().1).collect();
        assert!(picks.contains(&"a".to_owned()));
        assert!(KeyPool::new("p", Vec::new()).pick().is_none());
    }

    #[test]
    fn backoff_is_jittered_below_a_growing_ceiling_and_honours_retry_after() {
        let config = RetryConfig { max_attempts: 5, base_delay_ms: 100, max_delay_ms: 1000, max_elapsed_ms: 10_000 };
        for attempt in 1..=6 {
            let ceiling = (100u64 << (attempt - 1)).min(1000);
            for _ in 0..50 {
                assert!(backoff(&config, attempt, None) <= Duration::from_millis(ceiling));
            }
        }
        assert_eq!(backoff(&config, 1, Some(Duration::from_millis(700))), Duration::from_millis(700));
        assert_eq!(backoff(&config, 1, Some(Duration::from_secs(60))), Duration::from_millis(1000));
    }
}
