//! How fast a cloud backend may call its cloud: creates per minute (a
//! sliding window), and the pause after a throttled call.

use std::collections::VecDeque;
use std::sync::Mutex;
use std::time::{Duration, Instant};

const WINDOW: Duration = Duration::from_secs(60);

/// At most `per_minute` creates in any 60 s.
pub struct CreateLimit {
    per_minute: usize,
    recent: Mutex<VecDeque<Instant>>,
}

impl CreateLimit {
    pub fn new(per_minute: u32) -> CreateLimit {
        CreateLimit {
            per_minute: per_minute.max(1) as usize,
            recent: Mutex::new(VecDeque::new()),
        }
    }

    pub fn per_minute(&self) -> u32 {
        self.per_minute as u32
    }

    /// Takes a slot now, or says how long until one frees.
    pub fn try_take(&self, now: Instant) -> Result<(), Duration> {
        let mut recent = self
            .recent
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        while recent
            .front()
            .is_some_and(|t| now.duration_since(*t) >= WINDOW)
        {
            recent.pop_front();
        }
        if recent.len() < self.per_minute {
            recent.push_back(now);
            return Ok(());
        }
        let oldest = recent.front().copied().unwrap_or(now);
        Err(WINDOW.saturating_sub(now.duration_since(oldest)))
    }

    /// Waits for a slot and takes it.
    pub async fn take(&self) {
        loop {
            match self.try_take(Instant::now()) {
                Ok(()) => return,
                Err(wait) => tokio::time::sleep(wait.max(Duration::from_millis(10))).await,
            }
        }
    }
}

/// The pause before retry `attempt` (1, 2, …) of a throttled call:
/// doubling from 500 ms, at most 8 s.
pub fn throttle_pause(attempt: u32) -> Duration {
    Duration::from_millis(500u64.saturating_mul(1 << attempt.saturating_sub(1).min(4)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn creates_are_limited_per_sliding_minute() {
        let limit = CreateLimit::new(2);
        let t0 = Instant::now();
        assert!(limit.try_take(t0).is_ok());
        assert!(limit.try_take(t0 + Duration::from_secs(10)).is_ok());
        let wait = limit.try_take(t0 + Duration::from_secs(20)).unwrap_err();
        assert_eq!(wait, Duration::from_secs(40));
        assert!(limit.try_take(t0 + Duration::from_secs(60)).is_ok());
    }

    #[test]
    fn throttle_pauses_double_up_to_a_cap() {
        assert_eq!(throttle_pause(1), Duration::from_millis(500));
        assert_eq!(throttle_pause(2), Duration::from_secs(1));
        assert_eq!(throttle_pause(5), Duration::from_secs(8));
        assert_eq!(throttle_pause(50), Duration::from_secs(8));
    }
}
