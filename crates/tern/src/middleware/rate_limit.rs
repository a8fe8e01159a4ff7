//! At most N handler calls per second.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Mutex;
use tokio::time::Instant;
use tower::Layer;

use super::{around, call, Pipeline};

/// Spaces handler calls so that one router instance starts at most
/// `per_second` of them each second. A message waiting for its turn holds
/// its prefetch slot, so a limited service also takes fewer messages from
/// the broker and the rest wait there.
#[derive(Debug, Clone)]
pub struct RateLimit {
    interval: Duration,
    next: Arc<Mutex<Option<Instant>>>,
}

impl RateLimit {
    /// At most `per_second` calls per second (at least one).
    pub fn per_second(per_second: u32) -> RateLimit {
        RateLimit {
            interval: Duration::from_secs(1) / per_second.max(1),
            next: Arc::default(),
        }
    }
}

impl Layer<Pipeline> for RateLimit {
    type Service = Pipeline;

    fn layer(&self, inner: Pipeline) -> Pipeline {
        let limit = self.clone();
        around(inner, move |inner, handling| {
            let limit = limit.clone();
            async move {
                let start = {
                    let mut next = limit.next.lock().await;
                    let now = Instant::now();
                    let start = next.map_or(now, |n| n.max(now));
                    *next = Some(start + limit.interval);
                    start
                };
                tokio::time::sleep_until(start).await;
                call(inner, handling).await
            }
        })
    }
}
