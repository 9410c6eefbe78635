//! Token-bucket rate limiting with Firecracker's semantics: a bucket of
//! `size` tokens that refills completely every `refill_time` ms (steadily,
//! not in steps), plus a `one_time_burst` of tokens spent first and never
//! refilled. A [`RateLimiter`] holds a bytes bucket and an operations
//! bucket; an operation passes only if both have the tokens, and a refused
//! one arms a timer for when they will. Time is passed in, so the logic is
//! tested without waiting.

use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use vmm_sys_util::timerfd::TimerFd;

/// One bucket as configured.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenBucketConfig {
    /// Tokens the bucket holds, and refills in `refill_time`.
    pub size: u64,
    /// Tokens spent before the bucket's, once.
    #[serde(default)]
    pub one_time_burst: u64,
    /// Milliseconds to refill an empty bucket.
    pub refill_time: u64,
}

/// A direction's limits: bytes and operations (frames, for a network card).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RateLimiterConfig {
    #[serde(default)]
    pub bandwidth: Option<TokenBucketConfig>,
    #[serde(default)]
    pub ops: Option<TokenBucketConfig>,
}

#[derive(Debug, thiserror::Error)]
pub enum RateLimiterError {
    #[error("a token bucket needs a size and a refill time above 0")]
    EmptyBucket,
    #[error("cannot create the rate limiter's timer")]
    Timer(#[source] std::io::Error),
}

impl TokenBucketConfig {
    pub fn validate(&self) -> Result<(), RateLimiterError> {
        if self.size == 0 || self.refill_time == 0 {
            return Err(RateLimiterError::EmptyBucket);
        }
        Ok(())
    }
}

impl RateLimiterConfig {
    pub fn validate(&self) -> Result<(), RateLimiterError> {
        for b in [&self.bandwidth, &self.ops].into_iter().flatten() {
            b.validate()?;
        }
        Ok(())
    }
}

/// One bucket's state.
#[derive(Debug)]
pub struct TokenBucket {
    size: u64,
    refill_ns: u128,
    budget: u64,
    burst: u64,
    last: Instant,
}

impl TokenBucket {
    /// A full bucket; None for a size or refill time of 0.
    pub fn new(config: &TokenBucketConfig, now: Instant) -> Option<Self> {
        config.validate().ok()?;
        Some(TokenBucket {
            size: config.size,
            refill_ns: u128::from(config.refill_time) * 1_000_000,
            budget: config.size,
            burst: config.one_time_burst,
            last: now,
        })
    }

    fn refill(&mut self, now: Instant) {
        let elapsed = now.saturating_duration_since(self.last).as_nanos();
        // Whole tokens only; the time that made a fraction is kept.
        let tokens = elapsed * u128::from(self.size) / self.refill_ns;
        if tokens == 0 {
            return;
        }
        let used_ns = tokens * self.refill_ns / u128::from(self.size);
        self.last += Duration::from_nanos(u64::try_from(used_ns).unwrap_or(u64::MAX));
        self.budget = u64::try_from(u128::from(self.budget) + tokens)
            .unwrap_or(u64::MAX)
            .min(self.size);
        if self.budget == self.size {
            self.last = now;
        }
    }

    /// Takes `tokens` if the burst and budget hold them. More than the
    /// bucket's size passes only from a full bucket, emptying it: a frame
    /// bigger than the bucket is slowed, never stuck.
    pub fn reduce(&mut self, tokens: u64, now: Instant) -> bool {
        let from_burst = tokens.min(self.burst);
        let rest = tokens - from_burst;
        if rest == 0 {
            self.burst -= from_burst;
            return true;
        }
        self.refill(now);
        if rest > self.size && self.budget == self.size {
            self.burst -= from_burst;
            self.budget = 0;
            return true;
        }
        if rest > self.budget {
            return false;
        }
        self.burst -= from_burst;
        self.budget -= rest;
        true
    }

    /// Gives back `tokens` taken from the budget.
    pub fn replenish(&mut self, tokens: u64) {
        self.budget = self.budget.saturating_add(tokens).min(self.size);
    }

    /// How long until `tokens` (at most a full bucket) are in the budget.
    pub fn wait_for(&self, tokens: u64) -> Duration {
        let need = tokens.min(self.size).saturating_sub(self.budget);
        let ns = u128::from(need) * self.refill_ns / u128::from(self.size) + 1;
        Duration::from_nanos(u64::try_from(ns).unwrap_or(u64::MAX))
    }

    pub fn budget(&self) -> u64 {
        self.budget
    }

    pub fn one_time_burst(&self) -> u64 {
        self.burst
    }
}

/// A direction's buckets and the timer that ends a refusal.
pub struct RateLimiter {
    bandwidth: Option<TokenBucket>,
    ops: Option<TokenBucket>,
    timer: TimerFd,
    blocked: bool,
}

impl RateLimiter {
    pub fn new(config: &RateLimiterConfig) -> Result<Self, RateLimiterError> {
        config.validate()?;
        let now = Instant::now();
        Ok(RateLimiter {
            bandwidth: config.bandwidth.and_then(|c| TokenBucket::new(&c, now)),
            ops: config.ops.and_then(|c| TokenBucket::new(&c, now)),
            timer: TimerFd::new().map_err(|e| RateLimiterError::Timer(e.into()))?,
            blocked: false,
        })
    }

    /// One operation of `bytes`: true if both buckets hold the tokens
    /// (then taken), false if not (nothing taken; the timer is armed for
    /// when they will and [`RateLimiter::is_blocked`] holds until it fires).
    pub fn consume(&mut self, bytes: u64, now: Instant) -> bool {
        if self.blocked {
            return false;
        }
        if let Some(ops) = &mut self.ops {
            if !ops.reduce(1, now) {
                let wait = ops.wait_for(1);
                self.block(wait);
                return false;
            }
        }
        if let Some(bw) = &mut self.bandwidth {
            if !bw.reduce(bytes, now) {
                let wait = bw.wait_for(bytes);
                if let Some(ops) = &mut self.ops {
                    ops.replenish(1);
                }
                self.block(wait);
                return false;
            }
        }
        true
    }

    fn block(&mut self, wait: Duration) {
        self.blocked = true;
        if let Err(e) = self.timer.reset(wait.max(Duration::from_millis(1)), None) {
            // Without the timer nothing would unblock: stay open instead.
            tracing::warn!("rate limiter: cannot arm its timer: {e}");
            self.blocked = false;
        }
    }

    pub fn is_blocked(&self) -> bool {
        self.blocked
    }

    /// The timer fired: reads it and lets operations through again.
    pub fn timer_fired(&mut self) {
        let _ = self.timer.wait();
        self.blocked = false;
    }

    pub fn timer(&self) -> &TimerFd {
        &self.timer
    }

    pub fn bandwidth(&self) -> Option<&TokenBucket> {
        self.bandwidth.as_ref()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bucket(size: u64, burst: u64, refill_ms: u64, now: Instant) -> TokenBucket {
        TokenBucket::new(
            &TokenBucketConfig {
                size,
                one_time_burst: burst,
                refill_time: refill_ms,
            },
            now,
        )
        .unwrap()
    }

    #[test]
    fn a_bucket_refills_steadily_over_its_refill_time() {
        let t0 = Instant::now();
        let mut b = bucket(1000, 0, 100, t0);
        assert!(b.reduce(1000, t0));
        assert!(!b.reduce(1, t0), "empty");
        // Half the refill time: half the tokens.
        let t1 = t0 + Duration::from_millis(50);
        assert!(!b.reduce(501, t1));
        assert!(b.reduce(500, t1));
        // Never more than the size, however long it waits.
        let t2 = t1 + Duration::from_secs(10);
        assert!(b.reduce(1000, t2));
        assert!(!b.reduce(1, t2));
    }

    #[test]
    fn the_one_time_burst_goes_first_and_does_not_come_back() {
        let t0 = Instant::now();
        let mut b = bucket(100, 250, 1000, t0);
        assert!(b.reduce(200, t0));
        assert_eq!((b.one_time_burst(), b.budget()), (50, 100));
        // The last of the burst, then the budget.
        assert!(b.reduce(120, t0));
        assert_eq!((b.one_time_burst(), b.budget()), (0, 30));
        assert!(!b.reduce(31, t0));
        let later = t0 + Duration::from_secs(5);
        assert!(b.reduce(100, later));
        assert_eq!(b.one_time_burst(), 0);
    }

    #[test]
    fn a_refusal_takes_nothing() {
        let t0 = Instant::now();
        let mut b = bucket(100, 10, 1000, t0);
        // The burst first, then the budget.
        assert!(b.reduce(100, t0));
        assert_eq!((b.one_time_burst(), b.budget()), (0, 10));
        assert!(!b.reduce(50, t0));
        assert_eq!((b.one_time_burst(), b.budget()), (0, 10), "nothing taken");
    }

    #[test]
    fn more_than_the_size_passes_only_from_a_full_bucket() {
        let t0 = Instant::now();
        let mut b = bucket(100, 0, 1000, t0);
        assert!(b.reduce(1500, t0));
        assert_eq!(b.budget(), 0);
        let t1 = t0 + Duration::from_millis(500);
        assert!(!b.reduce(1500, t1), "half full");
        assert!(b.reduce(1500, t1 + Duration::from_millis(500)));
    }

    #[test]
    fn wait_for_is_the_time_to_refill_the_shortfall() {
        let t0 = Instant::now();
        let mut b = bucket(1000, 0, 1000, t0);
        assert!(b.reduce(1000, t0));
        let w = b.wait_for(250);
        assert!(
            w >= Duration::from_millis(250) && w < Duration::from_millis(251),
            "{w:?}"
        );
        assert!(
            b.wait_for(5000) <= Duration::from_millis(1001),
            "capped at a bucket"
        );
    }

    #[test]
    fn a_limiter_needs_both_buckets_and_unblocks_on_its_timer() {
        let cfg = RateLimiterConfig {
            bandwidth: Some(TokenBucketConfig {
                size: 1000,
                one_time_burst: 0,
                refill_time: 100,
            }),
            ops: Some(TokenBucketConfig {
                size: 2,
                one_time_burst: 0,
                refill_time: 100,
            }),
        };
        let mut l = RateLimiter::new(&cfg).unwrap();
        let t0 = Instant::now();
        assert!(l.consume(600, t0));
        // Bytes refused: the op is given back.
        assert!(!l.consume(600, t0));
        assert!(l.is_blocked());
        assert!(!l.consume(1, t0), "blocked until the timer");
        assert!(l.timer().is_armed().unwrap());
        l.timer_fired();
        assert!(!l.is_blocked());
        assert!(l.consume(400, t0), "the op given back serves this one");
        // Ops exhausted (2 per 100 ms).
        assert!(!l.consume(0, t0));
        assert!(RateLimiter::new(&RateLimiterConfig {
            bandwidth: Some(TokenBucketConfig {
                size: 0,
                one_time_burst: 0,
                refill_time: 1,
            }),
            ops: None,
        })
        .is_err());
    }
}
