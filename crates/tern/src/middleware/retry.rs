//! Retry with exponential backoff and full jitter.

use std::time::Duration;

use rand::Rng;
use tower::Layer;

use super::{around, call, Pipeline};

/// Retries a failed handler after a backoff, up to `max_attempts` in all;
/// then the message is dead-lettered. The delay before attempt `n + 1` is
/// drawn uniformly from `0..=min(cap, base * 2^(n-1))` ("full jitter"),
/// which spreads a burst of failures out instead of retrying them in step.
#[derive(Debug, Clone, Copy)]
pub struct Retry {
    max_attempts: u32,
    base: Duration,
    cap: Duration,
}

impl Default for Retry {
    /// Five attempts, 100 ms base, 30 s cap.
    fn default() -> Retry {
        Retry {
            max_attempts: 5,
            base: Duration::from_millis(100),
            cap: Duration::from_secs(30),
        }
    }
}

impl Retry {
    /// Backoff from `base`, doubling per attempt, never above `cap`.
    pub fn exponential(base: Duration, cap: Duration) -> Retry {
        Retry {
            base,
            cap,
            ..Retry::default()
        }
    }

    /// How many attempts in all (1 means no retry).
    pub fn max_attempts(mut self, attempts: u32) -> Retry {
        self.max_attempts = attempts.max(1);
        self
    }

    /// The configured number of attempts.
    pub fn attempts(&self) -> u32 {
        self.max_attempts
    }

    /// The longest delay before the attempt after `attempt`.
    pub fn ceiling(&self, attempt: u32) -> Duration {
        let doublings = attempt.saturating_sub(1).min(31);
        self.base
            .checked_mul(1u32 << doublings)
            .unwrap_or(self.cap)
            .min(self.cap)
    }

    /// A delay for the attempt after `attempt`, with full jitter.
    pub fn delay(&self, attempt: u32) -> Duration {
        let ceiling = self.ceiling(attempt);
        let millis = u64::try_from(ceiling.as_millis()).unwrap_or(u64::MAX);
        Duration::from_millis(rand::thread_rng().gen_range(0..=millis))
    }
}

impl Layer<Pipeline> for Retry {
    type Service = Pipeline;

    fn layer(&self, inner: Pipeline) -> Pipeline {
        let policy = *self;
        around(inner, move |inner, handling| async move {
            let attempt = handling.ctx.attempt();
            match call(inner, handling).await {
                Ok(answer) => Ok(answer),
                // A deferral or an inner policy already chose; a permanent
                // error and the last attempt are not retried.
                Err(e) if e.is_permanent() || e.retry_after().is_some() => Err(e),
                Err(e) if attempt >= policy.max_attempts => Err(e),
                Err(e) => Err(e.with_retry_after(policy.delay(attempt))),
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_ceiling_doubles_per_attempt_up_to_the_cap() {
        let retry = Retry::exponential(Duration::from_millis(100), Duration::from_secs(1));
        let ceilings: Vec<u128> = (1..=6).map(|a| retry.ceiling(a).as_millis()).collect();
        assert_eq!(ceilings, [100, 200, 400, 800, 1000, 1000]);
        assert_eq!(retry.ceiling(u32::MAX), Duration::from_secs(1));
    }

    #[test]
    fn delays_are_jittered_within_the_ceiling() {
        let retry = Retry::exponential(Duration::from_millis(100), Duration::from_secs(10));
        let delays: Vec<Duration> = (0..200).map(|_| retry.delay(4)).collect();
        assert!(delays.iter().all(|d| *d <= Duration::from_millis(800)));
        let distinct: std::collections::BTreeSet<_> = delays.iter().collect();
        assert!(
            distinct.len() > 50,
            "full jitter spreads delays: {distinct:?}"
        );
    }
}
