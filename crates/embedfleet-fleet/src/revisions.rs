//! Model revisions, announced by workers and watched by coordinators.
//!
//! Every cache key carries the revision of the weights that made the vector, so a coordinator
//! must know each model's current revision before it looks anything up. Partials carry it, but a
//! coordinator whose requests all hit the cache would never see a partial after a worker rolls
//! out new weights, and would keep serving the old vectors. So a worker also writes its revision
//! to the JetStream key-value bucket [`REVISIONS_BUCKET`] (key: model name) each time it binds a
//! model's consumer, and coordinators watch the bucket: a new revision changes the keys at once,
//! and the next request for that model misses the cache and goes to the new weights.
//!
//! The announcement also carries the width the loaded checkpoint produces (the width rule: it
//! may differ from the catalogue's), because the coordinator builds fusion for the widths the
//! workers actually serve, before any partial arrives. The value is JSON,
//! `{"revision": "...", "dim": 384}`; a plain string (a worker older than the width) is a
//! revision alone, and the coordinator then learns the width from the first partial.
//!
//! During a rolling upgrade old and new workers answer side by side: the bucket holds the last
//! announcement, partials teach the revision that actually answered (but not within the
//! coordinator's `max_request_timeout` of an announcement of another one: those are late
//! batches of the old weights), and each vector is cached
//! under the revision in its partial, so nothing is cached under the wrong revision either way.

use std::time::Duration;

use async_nats::jetstream::{self, kv, stream};
use futures::StreamExt;
use tokio_util::sync::CancellationToken;

/// The key-value bucket of model → revision.
pub const REVISIONS_BUCKET: &str = "embedfleet_revisions";

/// Back-off before watching again after the watch ended (server restart, lost connection).
const REWATCH_BACKOFF: Duration = Duration::from_secs(1);

/// Declares the bucket (idempotent) and returns it. One value per model, kept on file.
///
/// The bucket's stream is declared here with the key-value layout (`KV_<bucket>` over
/// `$KV.<bucket>.>`, what `create_key_value` would declare) because `create_key_value` first
/// reads the account info, which async-nats cannot parse from nats-server 2.9, the version
/// Debian ships.
pub async fn revisions_bucket(js: &jetstream::Context) -> Result<kv::Store, async_nats::Error> {
    if let Ok(store) = js.get_key_value(REVISIONS_BUCKET).await {
        return Ok(store);
    }
    js.get_or_create_stream(stream::Config {
        name: format!("KV_{REVISIONS_BUCKET}"),
        description: Some(
            "embedfleet: the revision of each model's weights, written by workers".into(),
        ),
        subjects: vec![format!("$KV.{REVISIONS_BUCKET}.>")],
        max_messages_per_subject: 1,
        storage: stream::StorageType::File,
        allow_rollup: true,
        deny_delete: true,
        allow_direct: true,
        discard: stream::DiscardPolicy::New,
        ..Default::default()
    })
    .await?;
    Ok(js.get_key_value(REVISIONS_BUCKET).await?)
}

/// What a worker says about the model it serves: the bucket's value under the model's name.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Announcement {
    /// The weights' revision (part of every cache key).
    pub revision: String,
    /// The width of the vectors the loaded checkpoint produces; `None` from older workers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dim: Option<usize>,
}

impl Announcement {
    /// The bucket's bytes: JSON, or (older workers) a bare revision string.
    pub fn decode(value: &[u8]) -> Option<Self> {
        if let Ok(announcement) = serde_json::from_slice::<Announcement>(value) {
            return Some(announcement);
        }
        let revision = std::str::from_utf8(value).ok()?;
        Some(Announcement {
            revision: revision.to_string(),
            dim: None,
        })
    }

    pub fn encode(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("an announcement always serialises")
    }
}

/// Writes `model`'s announcement, unless the bucket already holds it (workers re-announce on
/// every bind, and an unchanged value need not wake every coordinator).
pub async fn announce(
    js: &jetstream::Context,
    model: &str,
    announcement: &Announcement,
) -> Result<(), async_nats::Error> {
    let bucket = revisions_bucket(js).await?;
    let value = announcement.encode();
    if bucket.get(model).await?.as_deref() != Some(value.as_slice()) {
        bucket.put(model, value.into()).await?;
    }
    Ok(())
}

/// Calls `learn(model, announcement)` for every model in the bucket, then for every change, until
/// `shutdown`. NATS trouble is ridden out: the watch is started again after a back-off.
pub async fn watch(
    js: jetstream::Context,
    shutdown: CancellationToken,
    learn: impl Fn(&str, &Announcement),
) {
    while !shutdown.is_cancelled() {
        let watched = async {
            let bucket = revisions_bucket(&js).await?;
            Ok::<_, async_nats::Error>(bucket.watch_with_history(">").await?)
        };
        match watched.await {
            Ok(mut entries) => loop {
                let entry = tokio::select! {
                    _ = shutdown.cancelled() => return,
                    entry = entries.next() => entry,
                };
                match entry {
                    Some(Ok(entry)) if entry.operation == kv::Operation::Put => {
                        match Announcement::decode(&entry.value) {
                            Some(announcement) => learn(&entry.key, &announcement),
                            None => {
                                tracing::warn!(model = %entry.key, "revision is not UTF-8; ignored")
                            }
                        }
                    }
                    Some(Ok(_deleted)) => {}
                    Some(Err(error)) => {
                        tracing::debug!(%error, "revision watch broke; watching again");
                        break;
                    }
                    None => break,
                }
            },
            Err(error) => tracing::debug!(%error, "cannot watch the revisions bucket yet"),
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(REWATCH_BACKOFF) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn announcements_carry_the_width_and_old_bare_revisions_still_read() {
        let announcement = Announcement {
            revision: "abc123".into(),
            dim: Some(48),
        };
        let bytes = announcement.encode();
        assert_eq!(bytes, br#"{"revision":"abc123","dim":48}"#);
        assert_eq!(Announcement::decode(&bytes), Some(announcement));
        assert_eq!(
            Announcement::decode(b"local-0123"),
            Some(Announcement {
                revision: "local-0123".into(),
                dim: None
            })
        );
        assert_eq!(Announcement::decode(&[0xff, 0xfe]), None);
    }
}
