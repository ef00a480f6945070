//! Circuit breakers, one per model: a model whose jobs keep failing (no worker, timeouts,
//! internal errors) is left alone for a cool-down instead of costing every request its deadline.
//!
//! - **closed**: jobs go out; `failure_threshold` consecutive failures open the breaker.
//! - **open**: no jobs for `cool_down`; requests get 503 naming the model (`fallback: "strict"`)
//!   or are answered without it (`fallback: "partial"`).
//! - **half-open**: after the cool-down one request's job goes out as a probe (the others are
//!   treated as open meanwhile); its success closes the breaker, its failure opens it again. A
//!   probe that never reports back (its request was dropped) is replaced after another cool-down.
//!
//! Failures the client caused (an input too long, a modality a model does not take) are not the
//! model's fault and do not count. Every transition is logged and counted in `$SRV.STATS`.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use std::time::Instant;

/// When a breaker opens and for how long.
#[derive(Debug, Clone, PartialEq)]
pub struct BreakerConfig {
    /// Consecutive failed jobs of one model that open its breaker. 0 disables breakers.
    pub failure_threshold: u32,
    /// How long an open breaker sends no jobs before one probe is let through.
    pub cool_down: Duration,
}

impl Default for BreakerConfig {
    fn default() -> Self {
        BreakerConfig {
            failure_threshold: 5,
            cool_down: Duration::from_secs(10),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Closed { failures: u32 },
    Open { since: Instant },
    HalfOpen { probe_since: Instant },
}

/// Whether a request may send a job to a model now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Permit {
    /// Closed: send.
    Send,
    /// Half-open and this request carries the probe: send, and report how it went.
    Probe,
    /// Open (or a probe is already out): send nothing.
    Refused,
}

/// A breaker's state as `$SRV.STATS` shows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum BreakerState {
    Closed,
    Open,
    HalfOpen,
}

/// The breakers of one coordinator, by model.
#[derive(Debug, Default)]
pub struct Breakers {
    config: BreakerConfig,
    states: Mutex<HashMap<String, State>>,
    opened: AtomicU64,
}

impl Breakers {
    pub fn new(config: BreakerConfig) -> Self {
        Breakers {
            config,
            states: Mutex::default(),
            opened: AtomicU64::new(0),
        }
    }

    /// Asks to send a job to `model`.
    pub fn permit(&self, model: &str) -> Permit {
        if self.config.failure_threshold == 0 {
            return Permit::Send;
        }
        let now = Instant::now();
        let mut states = self.states.lock().expect("breakers poisoned");
        let state = states
            .entry(model.to_string())
            .or_insert(State::Closed { failures: 0 });
        match *state {
            State::Closed { .. } => Permit::Send,
            State::Open { since } | State::HalfOpen { probe_since: since }
                if now.duration_since(since) >= self.config.cool_down =>
            {
                tracing::info!(model, "circuit breaker half-open: sending a probe");
                *state = State::HalfOpen { probe_since: now };
                Permit::Probe
            }
            State::Open { .. } | State::HalfOpen { .. } => Permit::Refused,
        }
    }

    /// Reports how a job sent under `permit` went: `true` when the model answered (vectors, or
    /// an error blamed on the input), `false` for no answer, a timeout or an internal failure.
    pub fn record(&self, model: &str, permit: Permit, succeeded: bool) {
        if self.config.failure_threshold == 0 || permit == Permit::Refused {
            return;
        }
        let mut states = self.states.lock().expect("breakers poisoned");
        let state = states
            .entry(model.to_string())
            .or_insert(State::Closed { failures: 0 });
        let next = match (*state, succeeded) {
            (State::HalfOpen { .. }, true) if permit == Permit::Probe => {
                tracing::info!(model, "circuit breaker closed: the probe succeeded");
                State::Closed { failures: 0 }
            }
            (State::HalfOpen { .. }, false) if permit == Permit::Probe => {
                tracing::warn!(
                    model,
                    cool_down_ms = self.config.cool_down.as_millis() as u64,
                    "circuit breaker open again: the probe failed"
                );
                self.opened.fetch_add(1, Ordering::Relaxed);
                State::Open {
                    since: Instant::now(),
                }
            }
            (State::Closed { .. }, true) => State::Closed { failures: 0 },
            (State::Closed { failures }, false) => {
                let failures = failures + 1;
                if failures >= self.config.failure_threshold {
                    tracing::warn!(
                        model,
                        failures,
                        cool_down_ms = self.config.cool_down.as_millis() as u64,
                        "circuit breaker open: consecutive failures"
                    );
                    self.opened.fetch_add(1, Ordering::Relaxed);
                    State::Open {
                        since: Instant::now(),
                    }
                } else {
                    State::Closed { failures }
                }
            }
            // A late report of a job sent before the breaker changed state: the state stands.
            (other, _) => other,
        };
        *state = next;
    }

    /// Every model's breaker state (models never used are closed and not listed).
    pub fn states(&self) -> BTreeMap<String, BreakerState> {
        let states = self.states.lock().expect("breakers poisoned");
        states
            .iter()
            .map(|(model, state)| {
                let shown = match state {
                    State::Closed { .. } => BreakerState::Closed,
                    State::Open { .. } => BreakerState::Open,
                    State::HalfOpen { .. } => BreakerState::HalfOpen,
                };
                (model.clone(), shown)
            })
            .collect()
    }

    /// Times a breaker opened (from closed, or again after a failed probe).
    pub fn opened(&self) -> u64 {
        self.opened.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn opens_after_consecutive_failures_and_stays_open_for_the_cool_down() {
        let breakers = Breakers::new(BreakerConfig {
            failure_threshold: 3,
            cool_down: Duration::from_secs(3600),
        });
        for _ in 0..2 {
            assert_eq!(breakers.permit("m"), Permit::Send);
            breakers.record("m", Permit::Send, false);
        }
        breakers.record("m", Permit::Send, true);
        for _ in 0..3 {
            breakers.record("m", Permit::Send, false);
        }
        assert_eq!(breakers.permit("m"), Permit::Refused);
        assert_eq!(breakers.permit("other"), Permit::Send);
        assert_eq!(breakers.states()["m"], BreakerState::Open);
        assert_eq!(breakers.opened(), 1);
    }

    #[test]
    fn one_probe_after_the_cool_down_closes_or_reopens() {
        let breakers = Breakers::new(BreakerConfig {
            failure_threshold: 1,
            cool_down: Duration::ZERO,
        });
        breakers.record("m", Permit::Send, false);
        assert_eq!(breakers.states()["m"], BreakerState::Open);
        let probe = breakers.permit("m");
        assert_eq!(probe, Permit::Probe);
        // A late report of a job sent while closed changes nothing.
        breakers.record("m", Permit::Send, true);
        assert_eq!(breakers.states()["m"], BreakerState::HalfOpen);
        breakers.record("m", probe, false);
        assert_eq!(breakers.states()["m"], BreakerState::Open);
        assert_eq!(breakers.opened(), 2);
        let probe = breakers.permit("m");
        breakers.record("m", probe, true);
        assert_eq!(breakers.states()["m"], BreakerState::Closed);
        assert_eq!(breakers.permit("m"), Permit::Send);
    }
}
