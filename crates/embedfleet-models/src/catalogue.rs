//! The model catalogue: the twelve models of the ensemble and what the rest of the fleet needs to
//! know about each before loading it (dims, limits, pooling, modalities, memory).
//!
//! Public names are part of the wire contract: clients select models by them, cache keys and
//! queue subjects embed them. Never rename one; add a new entry instead.

use std::borrow::Cow;

use embedfleet_proto::{InputType, Modality};

/// How token states become one vector. Kept next to the catalogue because it is a property of the
/// checkpoint's training recipe, not of its architecture (BERT is pooled both ways below).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pooling {
    /// Mean over the sequence's tokens (special tokens included, as sentence-transformers does).
    Mean,
    /// The first token's state (`[CLS]` / `<s>`).
    Cls,
    /// The last token's state (causal decoders, where only it has seen the whole input).
    LastToken,
    /// The model's own projection head (CLIP).
    Projection,
}

/// How a model reads a request's `instruction` and `input_type`. Part of the wire contract
/// (docs/protocol.md): it decides which models' vectors, cache keys and batches the two options
/// change, and for every other model they change nothing. Every embedder builds its prompts here
/// ([`Prompting::instruction_for`], [`Prompting::prompt`]), so a model's recipe is written once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Prompting {
    /// Symmetric: every input is embedded as it is; `instruction` and `input_type` are ignored.
    Plain,
    /// Asymmetric with a fixed query instruction (bge): queries get it prepended, documents are
    /// embedded as they are; `instruction` is ignored.
    QueryPrefix(&'static str),
    /// Instruction-tuned (INSTRUCTOR): every input is embedded as `instruction + text`, with the
    /// request's instruction or `default` without one; `input_type` is ignored. The embedder
    /// leaves the instruction's tokens out of the mean pool (t5_embedder.rs).
    Instruction { default: &'static str },
    /// Instructed queries (e5-mistral): queries are embedded as `Instruct: {task}\nQuery:
    /// {text}` with the request's instruction as the task (`default_task` without one, or with
    /// a blank one); documents as they are.
    InstructedQuery { default_task: &'static str },
}

impl Prompting {
    /// Whether `instruction` can change this model's vectors.
    pub fn uses_instruction(self) -> bool {
        matches!(
            self,
            Self::Instruction { .. } | Self::InstructedQuery { .. }
        )
    }

    /// Whether `input_type` can change this model's vectors.
    pub fn uses_input_type(self) -> bool {
        matches!(self, Self::QueryPrefix(_) | Self::InstructedQuery { .. })
    }

    /// The part of a request's (`instruction`, `input_type`) that reaches this model; the rest
    /// is dropped, so that models which ignore an option share cache entries and batches
    /// whatever it is set to. Cache keys and job messages carry these effective values.
    pub fn effective(
        self,
        instruction: Option<&str>,
        input_type: InputType,
    ) -> (Option<&str>, InputType) {
        match self {
            Self::Plain => (None, InputType::Document),
            Self::QueryPrefix(_) => (None, input_type),
            Self::Instruction { .. } => (instruction, InputType::Document),
            Self::InstructedQuery { .. } => match input_type {
                InputType::Query => (instruction, InputType::Query),
                InputType::Document => (None, InputType::Document),
            },
        }
    }

    /// The instruction this model applies to inputs of `input_type` when the request says
    /// `instruction`: the request's, the model's default, its fixed query prefix, or none (the
    /// text is embedded as it is). INSTRUCTOR takes an empty instruction as "no instruction"
    /// (its plain-string input); e5-mistral takes a blank task as its default task.
    pub fn instruction_for<'a>(
        self,
        instruction: Option<&'a str>,
        input_type: InputType,
    ) -> Option<&'a str> {
        match (self, input_type) {
            (Self::Plain, _)
            | (Self::QueryPrefix(_) | Self::InstructedQuery { .. }, InputType::Document) => None,
            (Self::QueryPrefix(prefix), InputType::Query) => Some(prefix),
            (Self::Instruction { default }, _) => Some(instruction.unwrap_or(default)),
            (Self::InstructedQuery { default_task }, InputType::Query) => Some(
                instruction
                    .map(str::trim)
                    .filter(|task| !task.is_empty())
                    .unwrap_or(default_task),
            ),
        }
    }

    /// `text` as the model reads it under `instruction` (from [`Prompting::instruction_for`]).
    pub fn prompt(self, instruction: &str, text: &str) -> String {
        match self {
            Self::Plain => text.to_string(),
            Self::QueryPrefix(_) => format!("{instruction}{text}"),
            // INSTRUCTOR (`instructor.py`): concatenated as they are, the text stripped, then
            // the whole stripped again.
            Self::Instruction { .. } => format!("{instruction}{}", text.trim()).trim().to_string(),
            Self::InstructedQuery { .. } => format!("Instruct: {instruction}\nQuery: {text}"),
        }
    }

    /// The texts of a batch as the model reads them: prompted when the model applies an
    /// instruction to this input type, borrowed as they are otherwise.
    pub fn apply<'t>(
        self,
        instruction: Option<&str>,
        input_type: InputType,
        texts: &[&'t str],
    ) -> Vec<Cow<'t, str>> {
        match self.instruction_for(instruction, input_type) {
            Some(instruction) => texts
                .iter()
                .map(|text| Cow::Owned(self.prompt(instruction, text)))
                .collect(),
            None => texts.iter().map(|&text| Cow::Borrowed(text)).collect(),
        }
    }
}

/// bge-large-en-v1.5's query instruction, from its model card: prepended to short queries for
/// query-to-passage retrieval, never to the passages.
pub const BGE_QUERY_INSTRUCTION: &str = "Represent this sentence for searching relevant passages: ";

/// instructor-xl's instruction when a request gives none: INSTRUCTOR's retrieval-document form
/// ("Represent the [domain] [text type] for [task]:", README), without a domain, as the common
/// integrations (LangChain's `HuggingFaceInstructEmbeddings`) default to.
pub const INSTRUCTOR_DEFAULT_INSTRUCTION: &str = "Represent the document for retrieval: ";

/// e5-mistral's task for queries when the request names none: the model card's example and
/// sentence-transformers' `web_search_query` prompt.
pub const E5_DEFAULT_QUERY_TASK: &str =
    "Given a web search query, retrieve relevant passages that answer the query";

/// The architecture family of a checkpoint; one file per family under `arch/`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Architecture {
    Bert,
    Roberta,
    MpNet,
    T5Encoder,
    Clip,
    WhisperEncoder,
    Mistral,
}

/// One model of the ensemble.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelSpec {
    /// The short public name (`minilm`), used on the wire, in subjects and in cache keys.
    pub name: &'static str,
    /// The ensemble position of the original specification (E1..E12); also the fusion slot order.
    pub ordinal: u8,
    /// Hugging Face repository id the weights come from.
    pub hf_repo: &'static str,
    /// Width of the pooled embedding.
    pub dim: usize,
    /// Longest input in tokens (audio: encoder frames) the checkpoint was trained for; longer input
    /// is truncated, or rejected with 413 when the request says `truncate: false`.
    pub max_seq_len: usize,
    pub pooling: Pooling,
    pub architecture: Architecture,
    /// Input kinds the model can embed; others get zeros and a mask bit in fusion.
    pub modalities: &'static [Modality],
    /// Parameter count, for placement: memory needed is this times the bytes per weight.
    pub parameters: u64,
    /// How `instruction` and `input_type` reach the model.
    pub prompting: Prompting,
    /// Whether the upstream recipe (model card, sentence-transformers `Normalize` module)
    /// L2-normalises the vectors. Informational: embedfleet normalises by the request's
    /// `normalize` (default on) for every model, since fusion compares in cosine space; callers
    /// who want an unnormalised model's raw scale (contriever, dragon-plus: dot-product
    /// retrievers) ask with `normalize: false`.
    pub normalized_upstream: bool,
}

impl ModelSpec {
    /// Whether the model embeds inputs of this kind.
    pub fn takes(&self, modality: Modality) -> bool {
        self.modalities.contains(&modality)
    }

    /// Weight memory in bytes at the given bytes per parameter (4 for f32, 2 for f16/bf16).
    /// Activations come on top; placement keeps a margin for them.
    pub fn weight_bytes(&self, bytes_per_parameter: u64) -> u64 {
        self.parameters * bytes_per_parameter
    }
}

use Modality::{Audio, Code, Image, Text};

/// The ensemble, in fusion slot order.
pub const CATALOGUE: &[ModelSpec] = &[
    ModelSpec {
        name: "minilm",
        ordinal: 1,
        hf_repo: "sentence-transformers/all-MiniLM-L6-v2",
        dim: 384,
        max_seq_len: 256,
        pooling: Pooling::Mean,
        architecture: Architecture::Bert,
        modalities: &[Text, Code],
        parameters: 22_713_216,
        prompting: Prompting::Plain,
        normalized_upstream: true,
    },
    ModelSpec {
        name: "bge-large",
        ordinal: 2,
        hf_repo: "BAAI/bge-large-en-v1.5",
        dim: 1024,
        max_seq_len: 512,
        pooling: Pooling::Cls,
        architecture: Architecture::Bert,
        modalities: &[Text, Code],
        parameters: 335_141_888,
        prompting: Prompting::QueryPrefix(BGE_QUERY_INSTRUCTION),
        normalized_upstream: true,
    },
    ModelSpec {
        name: "instructor-xl",
        ordinal: 3,
        hf_repo: "hkunlp/instructor-xl",
        dim: 768,
        max_seq_len: 512,
        pooling: Pooling::Mean,
        architecture: Architecture::T5Encoder,
        modalities: &[Text],
        parameters: 1_241_000_000,
        prompting: Prompting::Instruction {
            default: INSTRUCTOR_DEFAULT_INSTRUCTION,
        },
        normalized_upstream: true,
    },
    ModelSpec {
        name: "clip-vit-l",
        ordinal: 4,
        hf_repo: "openai/clip-vit-large-patch14",
        dim: 768,
        max_seq_len: 77,
        pooling: Pooling::Projection,
        architecture: Architecture::Clip,
        modalities: &[Image, Text],
        parameters: 427_616_513,
        prompting: Prompting::Plain,
        normalized_upstream: false,
    },
    ModelSpec {
        name: "whisper-large",
        ordinal: 5,
        hf_repo: "openai/whisper-large-v3",
        dim: 1280,
        max_seq_len: 1500,
        pooling: Pooling::Mean,
        architecture: Architecture::WhisperEncoder,
        modalities: &[Audio],
        parameters: 637_000_000,
        prompting: Prompting::Plain,
        normalized_upstream: false,
    },
    ModelSpec {
        name: "codebert",
        ordinal: 6,
        hf_repo: "microsoft/codebert-base",
        dim: 768,
        max_seq_len: 512,
        pooling: Pooling::Cls,
        architecture: Architecture::Roberta,
        modalities: &[Code, Text],
        parameters: 124_645_632,
        prompting: Prompting::Plain,
        normalized_upstream: false,
    },
    ModelSpec {
        name: "sentence-t5-xxl",
        ordinal: 7,
        hf_repo: "sentence-transformers/sentence-t5-xxl",
        dim: 768,
        max_seq_len: 256,
        pooling: Pooling::Mean,
        architecture: Architecture::T5Encoder,
        modalities: &[Text],
        parameters: 4_865_000_000,
        prompting: Prompting::Plain,
        normalized_upstream: true,
    },
    ModelSpec {
        name: "mpnet",
        ordinal: 8,
        hf_repo: "sentence-transformers/all-mpnet-base-v2",
        dim: 768,
        max_seq_len: 384,
        pooling: Pooling::Mean,
        architecture: Architecture::MpNet,
        modalities: &[Text, Code],
        parameters: 109_486_464,
        prompting: Prompting::Plain,
        normalized_upstream: true,
    },
    ModelSpec {
        name: "contriever",
        ordinal: 9,
        hf_repo: "facebook/contriever-msmarco",
        dim: 768,
        max_seq_len: 512,
        pooling: Pooling::Mean,
        architecture: Architecture::Bert,
        modalities: &[Text],
        parameters: 109_482_240,
        prompting: Prompting::Plain,
        normalized_upstream: false,
    },
    ModelSpec {
        name: "dragon-plus",
        ordinal: 10,
        hf_repo: "facebook/dragon-plus-context-encoder",
        dim: 768,
        max_seq_len: 512,
        pooling: Pooling::Cls,
        architecture: Architecture::Bert,
        modalities: &[Text],
        parameters: 109_482_240,
        prompting: Prompting::Plain,
        normalized_upstream: false,
    },
    ModelSpec {
        name: "gte-large",
        ordinal: 11,
        hf_repo: "thenlper/gte-large",
        dim: 1024,
        max_seq_len: 512,
        pooling: Pooling::Mean,
        architecture: Architecture::Bert,
        modalities: &[Text, Code],
        parameters: 335_141_888,
        prompting: Prompting::Plain,
        normalized_upstream: true,
    },
    // 7.11 B parameters: 26.5 GiB of weights in f32 (the CPU path widens the fp16 checkpoint to
    // f32), 13.2 GiB in bf16/f16 (other devices run bf16). Activations per forward pass of at
    // most 4,096 tokens add about 1 GiB (decoder_embedder.rs). Tiny test checkpoints load in this
    // slot with their own width.
    ModelSpec {
        name: "e5-mistral",
        ordinal: 12,
        hf_repo: "intfloat/e5-mistral-7b-instruct",
        dim: 4096,
        max_seq_len: 4096,
        pooling: Pooling::LastToken,
        architecture: Architecture::Mistral,
        modalities: &[Text, Code],
        parameters: 7_110_660_096,
        prompting: Prompting::InstructedQuery {
            default_task: E5_DEFAULT_QUERY_TASK,
        },
        normalized_upstream: true,
    },
];

/// Looks a model up by its public name.
pub fn find(name: &str) -> Option<&'static ModelSpec> {
    CATALOGUE.iter().find(|spec| spec.name == name)
}

/// The public names, in slot order; used in error messages so a typo shows the choices.
pub fn names() -> impl Iterator<Item = &'static str> {
    CATALOGUE.iter().map(|spec| spec.name)
}

/// Width of the fusion input for an active model set: the sum of their dims.
///
/// Always computed from the set, never a constant: the original specification's 12,954 for all
/// twelve is an arithmetic slip (the dims add up to 13,184), and a fleet may run any subset.
pub fn fusion_input_width<'a>(active: impl IntoIterator<Item = &'a ModelSpec>) -> usize {
    active.into_iter().map(|spec| spec.dim).sum()
}

/// Puts a set of models into catalogue (fusion slot) order, dropping duplicates, so that every
/// node assembles fusion inputs the same way whatever order a request named them in.
pub fn in_slot_order(mut models: Vec<&'static ModelSpec>) -> Vec<&'static ModelSpec> {
    models.sort_by_key(|spec| spec.ordinal);
    models.dedup_by_key(|spec| spec.ordinal);
    models
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn all_twelve_models_fuse_into_13184_inputs() {
        assert_eq!(CATALOGUE.len(), 12);
        assert_eq!(fusion_input_width(CATALOGUE), 13_184);
    }

    #[test]
    fn names_are_unique_and_ordinals_follow_the_slots() {
        for (index, spec) in CATALOGUE.iter().enumerate() {
            assert_eq!(usize::from(spec.ordinal), index + 1, "{}", spec.name);
            assert_eq!(find(spec.name), Some(spec));
        }
        let mut names: Vec<_> = names().collect();
        names.dedup();
        assert_eq!(names.len(), 12);
    }

    #[test]
    fn two_model_set_is_1152_wide_in_slot_order() {
        let set = in_slot_order(vec![
            find("mpnet").unwrap(),
            find("minilm").unwrap(),
            find("mpnet").unwrap(),
        ]);
        assert_eq!(
            set.iter().map(|s| s.name).collect::<Vec<_>>(),
            ["minilm", "mpnet"]
        );
        assert_eq!(fusion_input_width(set), 1152);
    }

    #[test]
    fn modalities_say_what_each_model_takes() {
        assert!(find("whisper-large").unwrap().takes(Modality::Audio));
        assert!(!find("whisper-large").unwrap().takes(Modality::Text));
        assert!(find("clip-vit-l").unwrap().takes(Modality::Image));
        assert!(find("minilm").unwrap().takes(Modality::Code));
        assert!(find("unknown").is_none());
    }
}
