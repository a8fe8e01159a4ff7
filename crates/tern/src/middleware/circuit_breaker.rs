//! A circuit breaker: stop calling a failing dependency for a while.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;
use tower::Layer;

use super::{around, call, Pipeline};
use crate::error::HandlerError;

/// Opens after `threshold` consecutive failed attempts. While open, messages
/// are deferred for the rest of the open period without running the
/// handler or spending an attempt, so an outage of a downstream dependency
/// does not burn through retries into the dead-letter queue. When the
/// period ends, one probe runs (half-open): its success closes the circuit,
/// its failure opens it again.
#[derive(Debug, Clone)]
pub struct CircuitBreaker {
    threshold: u32,
    open_for: Duration,
    state: Arc<Mutex<State>>,
}

/// Where a circuit breaker is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CircuitState {
    /// Calls pass.
    Closed,
    /// Calls are deferred.
    Open,
    /// One probe call is allowed to test the dependency.
    HalfOpen,
}

#[derive(Debug)]
enum State {
    Closed { failures: u32 },
    Open { until: Instant },
    HalfOpen { probing: bool },
}

enum Admission {
    Pass,
    Probe,
    Defer(Duration),
}

impl CircuitBreaker {
    /// Opens after `threshold` consecutive failures, for `open_for`.
    pub fn new(threshold: u32, open_for: Duration) -> CircuitBreaker {
        CircuitBreaker {
            threshold: threshold.max(1),
            open_for,
            state: Arc::new(Mutex::new(State::Closed { failures: 0 })),
        }
    }

    /// The current state.
    pub fn state(&self) -> CircuitState {
        match *self.lock() {
            State::Closed { .. } => CircuitState::Closed,
            State::Open { until } if Instant::now() < until => CircuitState::Open,
            State::Open { .. } | State::HalfOpen { .. } => CircuitState::HalfOpen,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn admit(&self) -> Admission {
        let mut state = self.lock();
        let now = Instant::now();
        match *state {
            State::Closed { .. } => Admission::Pass,
            State::Open { until } if now < until => Admission::Defer(until - now),
            State::Open { .. } | State::HalfOpen { probing: false } => {
                *state = State::HalfOpen { probing: true };
                Admission::Probe
            }
            // Another message is probing; wait about as long as a probe takes.
            State::HalfOpen { probing: true } => Admission::Defer(self.open_for / 4),
        }
    }

    fn record(&self, success: bool, probe: bool) {
        let mut state = self.lock();
        *state = match (&*state, success) {
            (_, true) => State::Closed { failures: 0 },
            (State::Closed { failures }, false) if !probe && failures + 1 < self.threshold => {
                State::Closed {
                    failures: failures + 1,
                }
            }
            (_, false) => State::Open {
                until: Instant::now() + self.open_for,
            },
        };
    }
}

impl Layer<Pipeline> for CircuitBreaker {
    type Service = Pipeline;

    fn layer(&self, inner: Pipeline) -> Pipeline {
        let breaker = self.clone();
        around(inner, move |inner, handling| {
            let breaker = breaker.clone();
            async move {
                let probe = match breaker.admit() {
                    Admission::Pass => false,
                    Admission::Probe => true,
                    Admission::Defer(delay) => {
                        return Err(HandlerError::deferred("the circuit breaker is open", delay));
                    }
                };
                let result = call(inner, handling).await;
                // A permanent error is the message's fault, not the
                // dependency's, so it does not count against the circuit.
                let success = match &result {
                    Ok(_) => true,
                    Err(e) => e.is_permanent(),
                };
                breaker.record(success, probe);
                result
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn opens_after_the_threshold_then_probes_once_then_closes() {
        let breaker = CircuitBreaker::new(3, Duration::from_secs(10));
        for _ in 0..2 {
            assert!(matches!(breaker.admit(), Admission::Pass));
            breaker.record(false, false);
        }
        assert_eq!(breaker.state(), CircuitState::Closed);
        breaker.record(false, false);
        assert_eq!(breaker.state(), CircuitState::Open);
        assert!(matches!(breaker.admit(), Admission::Defer(d) if d <= Duration::from_secs(10)));

        tokio::time::advance(Duration::from_secs(11)).await;
        assert!(matches!(breaker.admit(), Admission::Probe));
        assert!(
            matches!(breaker.admit(), Admission::Defer(_)),
            "only one probe at a time"
        );
        breaker.record(false, true);
        assert_eq!(
            breaker.state(),
            CircuitState::Open,
            "a failed probe reopens"
        );

        tokio::time::advance(Duration::from_secs(11)).await;
        assert!(matches!(breaker.admit(), Admission::Probe));
        breaker.record(true, true);
        assert_eq!(breaker.state(), CircuitState::Closed);
    }
}
