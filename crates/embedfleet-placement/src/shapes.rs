//! The shapes of the real upstream checkpoints, as their `config.json` files give them, for the
//! activation and quantisation estimates of [`crate::memory`].
//!
//! The catalogue holds what every role needs (dims, limits, parameter counts); these numbers only
//! matter for sizing, so they live here. They describe the full-size checkpoints named by each
//! catalogue entry's `hf_repo`, not the small test checkpoints.

/// What sizing needs to know of one checkpoint's transformer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shape {
    /// Width of the residual stream (`hidden_size`, `d_model`).
    pub hidden: u64,
    /// Width of the feed-forward block (`intermediate_size`, `d_ff`).
    pub intermediate: u64,
    /// Gated feed-forward (SwiGLU, gated-GELU): two up-projections live at once.
    pub gated: bool,
    /// Attention heads, for the per-sequence score matrices.
    pub heads: u64,
    /// Token-embedding rows; these stay in half precision when the linear layers are quantised.
    pub vocab: u64,
}

/// The upstream shape of a catalogue model, by its public name.
pub fn of(model: &str) -> Option<Shape> {
    let shape = |hidden, intermediate, gated, heads, vocab| Shape {
        hidden,
        intermediate,
        gated,
        heads,
        vocab,
    };
    Some(match model {
        "minilm" => shape(384, 1536, false, 12, 30_522),
        "bge-large" | "gte-large" => shape(1024, 4096, false, 16, 30_522),
        // T5-XL encoder (hkunlp/instructor-xl), gated-GELU feed-forward.
        "instructor-xl" => shape(2048, 5120, true, 32, 32_128),
        // The vision tower dominates: ViT-L/14, 257 positions at 224 px.
        "clip-vit-l" => shape(1024, 4096, false, 16, 49_408),
        // Whisper large-v3 encoder: a conv stem, no token embeddings.
        "whisper-large" => shape(1280, 5120, false, 20, 0),
        "codebert" => shape(768, 3072, false, 12, 50_265),
        // T5-XXL encoder (sentence-transformers/sentence-t5-xxl).
        "sentence-t5-xxl" => shape(4096, 10_240, true, 64, 32_128),
        "mpnet" => shape(768, 3072, false, 12, 30_527),
        "contriever" | "dragon-plus" => shape(768, 3072, false, 12, 30_522),
        // Mistral-7B: SwiGLU, 32 query heads (8 KV heads; the scores are per query head).
        "e5-mistral" => shape(4096, 14_336, true, 32, 32_000),
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use embedfleet_models::catalogue::CATALOGUE;

    #[test]
    fn every_catalogue_model_has_a_shape_whose_embeddings_fit_its_parameters() {
        for spec in CATALOGUE {
            let shape =
                super::of(spec.name).unwrap_or_else(|| panic!("no shape for {}", spec.name));
            assert!(
                shape.vocab * shape.hidden < spec.parameters,
                "{}",
                spec.name
            );
            assert!(shape.intermediate >= shape.hidden, "{}", spec.name);
        }
    }
}
