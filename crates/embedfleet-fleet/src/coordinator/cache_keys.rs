//! Cache keys of partials and fused vectors, the fused entry's value, and the writes a request
//! leaves for after its reply.

use embedfleet_cache::CacheKey;
use embedfleet_fusion::FuseMoeConfig;
use embedfleet_models::ModelSpec;
use embedfleet_proto::{ContentKey, ExpertSelection, Input, InputType};

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

/// Cache key of one model's raw partial for one input, under the options the model reads.
pub(super) fn partial_key(
    work: &RequestWork,
    spec: &ModelSpec,
    revision: &str,
    input: &Input,
) -> CacheKey {
    let (instruction, input_type) = work.options_for(spec);
    let content = ContentKey::new(input, instruction, input_type, spec.name, revision);
    CacheKey::partial(spec.name, revision, &content)
}

impl RequestWork {
    /// (`instruction`, `input_type`) as `spec`'s model reads them: what its jobs carry and its
    /// partials are keyed by, so models that ignore an option share entries whatever it is.
    pub(super) fn options_for(&self, spec: &ModelSpec) -> (Option<&str>, InputType) {
        spec.prompting
            .effective(self.instruction.as_deref(), self.input_type)
    }

    /// The options that reach any model of the set, for the fused key: the instruction if some
    /// model reads it, `query` if some model reads the input type as one.
    fn fused_options(&self) -> (Option<&str>, InputType) {
        let each: Vec<_> = self
            .models
            .iter()
            .map(|spec| self.options_for(spec))
            .collect();
        let instruction = each.iter().find_map(|(instruction, _)| *instruction);
        let input_type = each
            .iter()
            .map(|(_, input_type)| *input_type)
            .find(|input_type| *input_type == InputType::Query)
            .unwrap_or(InputType::Document);
        (instruction, input_type)
    }
}

/// Cache key of a fused vector: the input and the options any of its models read, the request's model set with the
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
    let (instruction, input_type) = work.fused_options();
    let content = ContentKey::new(input, instruction, input_type, &model, &revisions);
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
