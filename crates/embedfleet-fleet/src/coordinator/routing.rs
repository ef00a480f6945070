//! Partial routing: one subscription per coordinator, each partial handed to the job waiting
//! for it by job id.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use futures::StreamExt;

use super::Coordinator;
use crate::job::{self, PartialResult};

impl Coordinator {
    /// Forwards each partial to the job waiting for it; partials for no waiting job (late or
    /// duplicate) are dropped, since the request they belonged to is already answered.
    pub(super) async fn route_partials(self: Arc<Self>, mut subscription: async_nats::Subscriber) {
        while let Some(message) = subscription.next().await {
            let partial: PartialResult = match job::decode(&message.payload) {
                Ok(partial) => partial,
                Err(error) => {
                    tracing::warn!(%error, subject = %message.subject, "undecodable partial dropped");
                    continue;
                }
            };
            let waiting = self
                .pending
                .lock()
                .expect("pending poisoned")
                .remove(&partial.job_id);
            match waiting {
                Some(sender) => {
                    let _ = sender.send(partial);
                }
                None => {
                    self.stats.stray_partials.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
    }
}

/// Removes a job from `pending` when its `run_job` ends, however it ends.
pub(super) struct PendingGuard<'a> {
    pub(super) coordinator: &'a Coordinator,
    pub(super) job_id: u64,
}

impl Drop for PendingGuard<'_> {
    fn drop(&mut self) {
        self.coordinator
            .pending
            .lock()
            .expect("pending poisoned")
            .remove(&self.job_id);
    }
}
