//! The token bucket behind `Limits.publish_rate` and `Limits.frame_rate`: nodes enforce it
//! per connection, clients pace themselves with the same rule.
//!
//! A bucket holds at most `burst` tokens and refills at `rate` per second; each publish (or
//! frame) takes one. An empty bucket refuses, and says how long until the next token, so
//! a refusal can carry a `retry_after_ms`.

use std::time::{Duration, Instant};

/// A token bucket.
#[derive(Debug, Clone)]
pub struct TokenBucket {
    rate: f64,
    burst: f64,
    tokens: f64,
    last: Instant,
}

impl TokenBucket {
    /// A full bucket: `burst` tokens, refilled at `rate` per second (both at least 1).
    pub fn new(rate: u32, burst: u32) -> Self {
        let burst = f64::from(burst.max(1));
        Self { rate: f64::from(rate.max(1)), burst, tokens: burst, last: Instant::now() }
    }

    /// Tokens per second.
    pub fn rate(&self) -> f64 {
        self.rate
    }

    /// Whether the bucket would be full at `now` (its owner has been idle).
    pub fn is_full(&self, now: Instant) -> bool {
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.tokens + elapsed * self.rate >= self.burst
    }

    /// Takes one token at `now`, or says how long until one is available.
    pub fn take(&mut self, now: Instant) -> Result<(), Duration> {
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.last = now;
        self.tokens = (self.tokens + elapsed * self.rate).min(self.burst);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            Ok(())
        } else {
            Err(Duration::from_secs_f64((1.0 - self.tokens) / self.rate))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_burst_then_the_rate() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(10, 3);
        for _ in 0..3 {
            assert!(b.take(t0).is_ok());
        }
        let wait = b.take(t0).unwrap_err();
        assert_eq!(wait, Duration::from_millis(100));
        // A tenth of a second later exactly one more token has come.
        let t1 = t0 + Duration::from_millis(100);
        assert!(b.take(t1).is_ok());
        assert!(b.take(t1).is_err());
        // A long pause refills to the burst, not beyond.
        let t2 = t1 + Duration::from_secs(60);
        for _ in 0..3 {
            assert!(b.take(t2).is_ok());
        }
        assert!(b.take(t2).is_err());
    }

    #[test]
    fn a_bucket_is_full_again_after_idling() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(10, 2);
        assert!(b.is_full(t0));
        b.take(t0).unwrap();
        assert!(!b.is_full(t0));
        assert!(!b.is_full(t0 + Duration::from_millis(50)));
        assert!(b.is_full(t0 + Duration::from_millis(100)));
    }

    #[test]
    fn refusals_do_not_cost_tokens() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(1, 1);
        assert!(b.take(t0).is_ok());
        for _ in 0..100 {
            assert!(b.take(t0).is_err());
        }
        assert!(b.take(t0 + Duration::from_secs(1)).is_ok());
    }
}
