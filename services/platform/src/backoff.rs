//! Waiting before trying again after a dependency failed: an exponential backoff that doubles from a
//! first wait up to a cap, starts over after a success, and is cut short by shutdown. [`exponential`]
//! is the same rule for callers that count their attempts themselves; every exponential wait in Parley
//! is one of these two.

use std::time::Duration;

use tokio_util::sync::CancellationToken;

/// The wait before try number `attempt` (1 for the first retry): `first`, doubled for each try after
/// it, at most `max`.
pub fn exponential(first: Duration, max: Duration, attempt: u32) -> Duration {
    let doublings = attempt.saturating_sub(1).min(30);
    first.saturating_mul(1 << doublings).min(max)
}

#[derive(Debug, Clone)]
pub struct Backoff {
    first: Duration,
    max: Duration,
    next: Duration,
}

impl Backoff {
    pub fn new(first: Duration, max: Duration) -> Self {
        Self { first, max, next: first }
    }

    /// The wait before the next attempt; each call doubles the one after it, up to the cap.
    pub fn next_wait(&mut self) -> Duration {
        let wait = self.next;
        self.next = exponential(self.next, self.max, 2);
        wait
    }

    /// After a success: the next failure waits the first wait again.
    pub fn reset(&mut self) {
        self.next = self.first;
    }

    /// Sleeps for the next wait; false when `shutdown` came first.
    pub async fn wait(&mut self, shutdown: &CancellationToken) -> bool {
        let wait = self.next_wait();
        tokio::select! {
            _ = shutdown.cancelled() => false,
            _ = tokio::time::sleep(wait) => true,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn waits_double_up_to_the_cap_and_start_over_after_a_success() {
        let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_millis(500));
        let waits: Vec<u64> = (0..5).map(|_| backoff.next_wait().as_millis() as u64).collect();
        assert_eq!(waits, [100, 200, 400, 500, 500]);
        backoff.reset();
        assert_eq!(backoff.next_wait(), Duration::from_millis(100));
    }

    #[test]
    fn counted_attempts_wait_the_same() {
        let (first, max) = (Duration::from_secs(1), Duration::from_secs(30));
        let waits: Vec<u64> = (1..=7).map(|attempt| exponential(first, max, attempt).as_secs()).collect();
        assert_eq!(waits, [1, 2, 4, 8, 16, 30, 30]);
        assert_eq!(exponential(first, max, 0), first);
        assert_eq!(exponential(first, Duration::MAX, u32::MAX), Duration::from_secs(1 << 30));
    }

    #[tokio::test]
    async fn shutdown_cuts_a_wait_short() {
        let shutdown = CancellationToken::new();
        shutdown.cancel();
        let mut backoff = Backoff::new(Duration::from_secs(60), Duration::from_secs(60));
        assert!(!backoff.wait(&shutdown).await);
    }
}
