//! Cache keys of partials and fused vectors, and the writes a request leaves for after its reply.

use embedfleet_cache::CacheKey;
use embedfleet_proto::{ContentKey, Input};

use super::request::RequestWork;
use super::Coordinator;

impl Coordinator {
    pub(super) async fn cache_writes(&self, writes: CacheWrites) {
        if writes.entries.is_empty() {
            return;
        }
        let entries: Vec<(CacheKey, &[f32])> = writes
            .entries
            .iter()
            .map(|(key, vector)| (key.clone(), vector.as_slice()))
            .collect();
        self.cache.put_many(&entries).await;
    }
}

/// New vectors to store once the reply is out.
#[derive(Default)]
pub(super) struct CacheWrites {
    pub(super) entries: Vec<(CacheKey, Vec<f32>)>,
}

/// Cache key of one model's raw partial for one input.
pub(super) fn partial_key(
    work: &RequestWork,
    model: &str,
    revision: &str,
    input: &Input,
) -> CacheKey {
    let content = ContentKey::new(input, work.instruction.as_deref(), model, revision);
    CacheKey::partial(model, revision, &content)
}

/// Cache key of a fused vector: the input and instruction, the whole model set with each
/// model's revision, whether the partials were normalised before fusion, and (in the key's
/// namespace) the fusion layer's version. Anything that changes the vector changes the key.
pub(super) fn fused_key(
    work: &RequestWork,
    fusion_version: &str,
    revisions: &[String],
    input: &Input,
) -> CacheKey {
    let set = work
        .models
        .iter()
        .map(|s| s.name)
        .collect::<Vec<_>>()
        .join("+");
    let model = format!(
        "{set}:{}",
        if work.normalize { "normalized" } else { "raw" }
    );
    let content = ContentKey::new(
        input,
        work.instruction.as_deref(),
        &model,
        &revisions.join("+"),
    );
    CacheKey::fused(fusion_version, &content)
}
