//! Log throttling: a fault under load says so every few seconds, not per connection.

use std::time::Duration;

use tokio::time::Instant;

/// Lets a repeated warning through at most once per period, so a fault under load logs
/// a line every few seconds rather than one per connection.
pub(super) struct Throttle {
    every: Duration,
    last: Option<Instant>,
}

impl Throttle {
    pub(super) fn new(every: Duration) -> Throttle {
        Throttle { every, last: None }
    }

    pub(super) fn allow(&mut self) -> bool {
        let now = Instant::now();
        if self.last.is_some_and(|last| now - last < self.every) {
            return false;
        }
        self.last = Some(now);
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn once_per_period() {
        let mut throttle = Throttle::new(Duration::from_secs(5));
        assert!(throttle.allow());
        assert!(!throttle.allow());
        tokio::time::advance(Duration::from_millis(4999)).await;
        assert!(!throttle.allow());
        tokio::time::advance(Duration::from_millis(1)).await;
        assert!(throttle.allow());
        assert!(!throttle.allow());
    }
}
