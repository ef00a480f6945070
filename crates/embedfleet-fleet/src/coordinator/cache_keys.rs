//! Cache keys of partials and fused vectors, the fused entry's value, and the writes a request
//! leaves for after its reply.

use embedfleet_cache::CacheKey;
use embedfleet_fusion::FuseMoeConfig;
use embedfleet_proto::{ContentKey, ExpertSelection, Input};

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

/// Cache key of a fused vector: the input and instruction, the request's model set with the
/// revision of each model's partial (`-` for a model that does not take the input), whether the
/// partials were normalised before fusion, and (in the key's namespace) the fusion layer's
/// version. Anything that changes the vector changes the key.
pub(super) fn fused_key(
    work: &RequestWork,
    fusion_version: &str,
    revisions: &[Option<&str>],
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
    let revisions = revisions
        .iter()
        .map(|revision| revision.unwrap_or("-"))
        .collect::<Vec<_>>()
        .join("+");
    let content = ContentKey::new(input, work.instruction.as_deref(), &model, &revisions);
    CacheKey::fused(fusion_version, &content)
}

/// A fused vector and the gate's choice, as one cache value: the embedding, then every
/// expert's weight, then the selected experts' indices (small integers, exact even in f16), so a
/// cached reply has the same `experts` as the first.
#[derive(Clone)]
pub(super) struct FusedEntry {
    pub(super) embedding: Vec<f32>,
    pub(super) experts: ExpertSelection,
}

impl FusedEntry {
    pub(super) fn encode(&self) -> Vec<f32> {
        let mut value = self.embedding.clone();
        value.extend_from_slice(&self.experts.weights);
        value.extend(self.experts.selected.iter().map(|&i| i as f32));
        value
    }

    /// The entry in `value`, or `None` when it does not have the layout of `config` (an entry
    /// of an older format, or a corrupt one: a miss, recomputed and overwritten).
    pub(super) fn decode(value: Vec<f32>, config: &FuseMoeConfig) -> Option<Self> {
        let (width, experts) = (config.output_dim, config.num_experts);
        if value.len() <= width + experts || value.len() > width + 2 * experts {
            return None;
        }
        let selected = value[width + experts..]
            .iter()
            .map(|&x| {
                let index = x.round();
                (index >= 0.0 && (index as usize) < experts).then_some(index as usize)
            })
            .collect::<Option<Vec<usize>>>()?;
        Some(FusedEntry {
            embedding: value[..width].to_vec(),
            experts: ExpertSelection {
                weights: value[width..width + experts].to_vec(),
                selected,
            },
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_fused_entry_round_trips_and_other_layouts_are_misses() {
        let config = FuseMoeConfig::for_input_dims(vec![4, 4]);
        let entry = FusedEntry {
            embedding: vec![0.5; config.output_dim],
            experts: ExpertSelection {
                weights: (0..config.num_experts).map(|i| i as f32).collect(),
                selected: vec![3, 1],
            },
        };
        let back = FusedEntry::decode(entry.encode(), &config).unwrap();
        assert_eq!(back.embedding, entry.embedding);
        assert_eq!(back.experts, entry.experts);
        // A bare embedding (the format before experts were cached) is a miss.
        assert!(FusedEntry::decode(vec![0.5; config.output_dim], &config).is_none());
        let mut bad = entry.encode();
        *bad.last_mut().unwrap() = config.num_experts as f32;
        assert!(FusedEntry::decode(bad, &config).is_none());
    }
}
