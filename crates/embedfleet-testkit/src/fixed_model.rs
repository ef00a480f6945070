//! [`FixedVectorModel`]: a weight-free stand-in for a catalogue model, for tests and benches of
//! the parts around the models (workers, coordinator, queues). Test support code only: its
//! vectors carry no meaning, they are just deterministic.
//!
//! What it promises, so tests can assert exact results:
//! - the vector of an input is a pure function of (model name, input content, instruction):
//!   xxh3 of those, expanded by splitmix64 into `spec.dim` values in `[-1, 1)`; equal input gives
//!   an equal vector in any batch, on any machine;
//! - tokens are whitespace-separated words + 2 (the two special tokens of a BERT-style model),
//!   capped at `spec.max_seq_len` when truncating; media inputs count `spec.max_seq_len`;
//! - the errors of the real models, with batch indices: [`ModelError::UnsupportedModality`],
//!   [`ModelError::EmptyInput`] for blank text, [`ModelError::InputTooLong`] when truncation is
//!   off and the tokens exceed `spec.max_seq_len`;
//! - a failure hook: a text containing a marker makes the whole call fail with a transient
//!   [`ModelError::Inference`], always or for the first N calls that see it;
//! - an optional delay per call, to make batches take time;
//! - a hang hook: a text containing a marker blocks the call until the test releases a
//!   [`HangLatch`] (a model stuck in a kernel, as far as a worker can tell);
//! - counters of calls and inputs, so tests can see how work was batched.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use embedfleet_models::model::l2_normalize;
use embedfleet_models::registry::lookup;
use embedfleet_models::{
    EmbedOptions, EmbeddingModel, InputType, ModelEmbedding, ModelError, ModelInput, ModelSpec,
};
use xxhash_rust::xxh3::xxh3_64;

/// Tokens a text input gets on top of its words, like `[CLS]` and `[SEP]`.
const SPECIAL_TOKENS: usize = 2;

/// A deterministic, weight-free [`EmbeddingModel`] for one catalogue entry. See the module docs.
#[derive(Debug)]
pub struct FixedVectorModel {
    spec: &'static ModelSpec,
    revision: String,
    /// Slept at the start of every call (the caller runs models on blocking threads).
    delay: Duration,
    failure: Option<FailureHook>,
    hang: Option<(String, Arc<HangLatch>)>,
    calls: AtomicUsize,
    inputs: AtomicUsize,
    largest_batch: AtomicUsize,
}

/// Makes calls fail while an input contains `marker`.
#[derive(Debug)]
struct FailureHook {
    marker: String,
    /// Failing calls left; `None` fails for ever.
    remaining: Option<AtomicUsize>,
}

/// Holds calls that see a hang marker until [`HangLatch::release`].
#[derive(Debug, Default)]
pub struct HangLatch {
    released: Mutex<bool>,
    changed: Condvar,
}

impl HangLatch {
    /// Lets every held call (and every later one) go on.
    pub fn release(&self) {
        *self.released.lock().expect("latch poisoned") = true;
        self.changed.notify_all();
    }

    fn wait(&self) {
        let mut released = self.released.lock().expect("latch poisoned");
        while !*released {
            released = self.changed.wait(released).expect("latch poisoned");
        }
    }
}

impl FixedVectorModel {
    /// The fixed model for catalogue entry `name`, without delay or failures. Its revision is
    /// `fixed-<name>`.
    pub fn new(name: &str) -> Result<Self, ModelError> {
        let spec = lookup(name)?;
        Ok(FixedVectorModel {
            spec,
            revision: format!("fixed-{}", spec.name),
            delay: Duration::ZERO,
            failure: None,
            hang: None,
            calls: AtomicUsize::new(0),
            inputs: AtomicUsize::new(0),
            largest_batch: AtomicUsize::new(0),
        })
    }

    /// Reports `revision` instead of `fixed-<name>`: new weights, as far as cache keys go. The
    /// vectors stay the same, so a test can tell a fresh answer from a cached one only by how
    /// it was answered.
    pub fn with_revision(mut self, revision: impl Into<String>) -> Self {
        self.revision = revision.into();
        self
    }

    /// Sleeps `delay` in every `embed_batch` call.
    pub fn with_delay(mut self, delay: Duration) -> Self {
        self.delay = delay;
        self
    }

    /// Every call with an input whose text contains `marker` blocks until `latch` is released.
    pub fn hanging_on(mut self, marker: impl Into<String>, latch: Arc<HangLatch>) -> Self {
        self.hang = Some((marker.into(), latch));
        self
    }

    /// Every call with an input whose text contains `marker` fails with a transient
    /// [`ModelError::Inference`].
    pub fn failing_on(mut self, marker: impl Into<String>) -> Self {
        self.failure = Some(FailureHook {
            marker: marker.into(),
            remaining: None,
        });
        self
    }

    /// Like [`FixedVectorModel::failing_on`], but only the first `times` such calls fail; later
    /// ones succeed (a transient fault that clears).
    pub fn failing_on_times(mut self, marker: impl Into<String>, times: usize) -> Self {
        self.failure = Some(FailureHook {
            marker: marker.into(),
            remaining: Some(AtomicUsize::new(times)),
        });
        self
    }

    /// The vector this model gives `input` with `instruction`, unnormalised: what `embed_batch`
    /// returns with `normalize: false`.
    pub fn vector_for(&self, input: &ModelInput, instruction: Option<&str>) -> Vec<f32> {
        self.vector_as(input, instruction, InputType::Document)
    }

    /// [`FixedVectorModel::vector_for`] for an input of `input_type`: queries get vectors of
    /// their own, so a test sees whether the input type reached the model.
    pub fn vector_as(
        &self,
        input: &ModelInput,
        instruction: Option<&str>,
        input_type: InputType,
    ) -> Vec<f32> {
        let mut state = content_hash(self.spec.name, input, instruction);
        if input_type == InputType::Query {
            state = splitmix64(&mut state);
        }
        (0..self.spec.dim)
            .map(|_| {
                // The top 24 bits make an exact f32 in [0, 1), mapped onto [-1, 1).
                let unit = (splitmix64(&mut state) >> 40) as f32 / (1u64 << 24) as f32;
                unit * 2.0 - 1.0
            })
            .collect()
    }

    /// `embed_batch` calls started so far, failed ones included.
    pub fn calls(&self) -> usize {
        self.calls.load(Ordering::Relaxed)
    }

    /// Inputs handed to `embed_batch` so far, over all calls.
    pub fn inputs_seen(&self) -> usize {
        self.inputs.load(Ordering::Relaxed)
    }

    /// The most inputs one `embed_batch` call has had.
    pub fn largest_batch(&self) -> usize {
        self.largest_batch.load(Ordering::Relaxed)
    }

    /// Words + special tokens, or the error the real tokenizer step would give.
    fn tokens(
        &self,
        index: usize,
        input: &ModelInput,
        truncate: bool,
    ) -> Result<usize, ModelError> {
        if !self.spec.takes(input.modality()) {
            return Err(ModelError::UnsupportedModality {
                model: self.spec.name.to_string(),
                modality: input.modality(),
            });
        }
        let Some(text) = input.text() else {
            return Ok(self.spec.max_seq_len);
        };
        let words = text.split_whitespace().count();
        if words == 0 {
            return Err(ModelError::EmptyInput { index });
        }
        let tokens = words + SPECIAL_TOKENS;
        match (tokens > self.spec.max_seq_len, truncate) {
            (false, _) => Ok(tokens),
            (true, true) => Ok(self.spec.max_seq_len),
            (true, false) => Err(ModelError::InputTooLong {
                model: self.spec.name.to_string(),
                index,
                tokens,
                max: self.spec.max_seq_len,
            }),
        }
    }

    /// The hook's transient error when it applies to this batch.
    fn injected_failure(&self, inputs: &[ModelInput]) -> Option<ModelError> {
        let hook = self.failure.as_ref()?;
        let marked = inputs
            .iter()
            .any(|input| input.text().is_some_and(|text| text.contains(&hook.marker)));
        if !marked {
            return None;
        }
        if let Some(remaining) = &hook.remaining {
            // Decrement unless already zero: only the first `times` marked calls fail.
            let took = remaining.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |left| {
                left.checked_sub(1)
            });
            if took.is_err() {
                return None;
            }
        }
        Some(ModelError::Inference {
            model: self.spec.name.to_string(),
            source: candle_core::Error::Msg(format!(
                "injected failure: input contains `{}`",
                hook.marker
            )),
        })
    }
}

impl EmbeddingModel for FixedVectorModel {
    fn spec(&self) -> &'static ModelSpec {
        self.spec
    }

    fn revision(&self) -> &str {
        &self.revision
    }

    fn dim(&self) -> usize {
        self.spec.dim
    }

    fn embed_batch(
        &self,
        inputs: &[ModelInput],
        options: &EmbedOptions,
    ) -> Result<Vec<ModelEmbedding>, ModelError> {
        self.calls.fetch_add(1, Ordering::Relaxed);
        self.inputs.fetch_add(inputs.len(), Ordering::Relaxed);
        self.largest_batch
            .fetch_max(inputs.len(), Ordering::Relaxed);
        if !self.delay.is_zero() {
            std::thread::sleep(self.delay);
        }
        if let Some((marker, latch)) = &self.hang {
            let marked = inputs.iter().any(|input| {
                input
                    .text()
                    .is_some_and(|text| text.contains(marker.as_str()))
            });
            if marked {
                latch.wait();
            }
        }
        if let Some(error) = self.injected_failure(inputs) {
            return Err(error);
        }
        // Validate everything first: like the real models, the whole batch fails on the first
        // bad input.
        let tokens = inputs
            .iter()
            .enumerate()
            .map(|(index, input)| self.tokens(index, input, options.truncate))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(inputs
            .iter()
            .zip(tokens)
            .map(|(input, tokens)| {
                let mut vector =
                    self.vector_as(input, options.instruction.as_deref(), options.input_type);
                if options.normalize {
                    l2_normalize(&mut vector);
                }
                ModelEmbedding { vector, tokens }
            })
            .collect())
    }
}

/// xxh3 of (model, modality, content, instruction), each part length-prefixed so that no two
/// different tuples hash the same bytes.
fn content_hash(model: &str, input: &ModelInput, instruction: Option<&str>) -> u64 {
    let content: &[u8] = match input {
        ModelInput::Text(text) => text.as_bytes(),
        ModelInput::Code { code, .. } => code.as_bytes(),
        ModelInput::Image { bytes, .. } | ModelInput::Audio { bytes, .. } => bytes,
    };
    let modality = input.modality().to_string();
    let mut bytes = Vec::with_capacity(content.len() + 64);
    for part in [
        model.as_bytes(),
        modality.as_bytes(),
        content,
        instruction.unwrap_or("").as_bytes(),
    ] {
        bytes.extend_from_slice(&(part.len() as u64).to_le_bytes());
        bytes.extend_from_slice(part);
    }
    bytes.push(u8::from(instruction.is_some()));
    xxh3_64(&bytes)
}

/// One step of splitmix64 (Steele et al.): a well-mixed 64-bit stream from any seed.
fn splitmix64(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn text(s: &str) -> ModelInput {
        ModelInput::Text(s.into())
    }

    fn raw() -> EmbedOptions {
        EmbedOptions {
            normalize: false,
            ..Default::default()
        }
    }

    #[test]
    fn equal_input_gives_equal_vectors_in_any_batch() {
        let model = FixedVectorModel::new("minilm").unwrap();
        let alone = model.embed_batch(&[text("b c")], &raw()).unwrap();
        let batch = model
            .embed_batch(&[text("a"), text("b c")], &raw())
            .unwrap();
        assert_eq!(alone[0], batch[1]);
        assert_eq!(batch[1].tokens, 4);
        assert_eq!(batch[1].vector.len(), 384);
        assert_ne!(batch[0].vector, batch[1].vector);
        assert_eq!(batch[1].vector, model.vector_for(&text("b c"), None));
        assert_ne!(
            model.vector_for(&text("b c"), Some("query")),
            model.vector_for(&text("b c"), None)
        );
    }

    #[test]
    fn bad_inputs_fail_with_their_batch_index() {
        let model = FixedVectorModel::new("minilm").unwrap();
        let long = "w ".repeat(300);
        let strict = EmbedOptions {
            truncate: false,
            ..raw()
        };
        match model.embed_batch(&[text("ok"), text(&long)], &strict) {
            Err(ModelError::InputTooLong { index: 1, .. }) => {}
            other => panic!("expected InputTooLong at 1, got {other:?}"),
        }
        assert_eq!(
            model.embed_batch(&[text(&long)], &raw()).unwrap()[0].tokens,
            256
        );
        assert!(matches!(
            model.embed_batch(&[text("ok"), text("  ")], &raw()),
            Err(ModelError::EmptyInput { index: 1 })
        ));
    }

    #[test]
    fn the_failure_hook_is_transient_and_can_clear() {
        let model = FixedVectorModel::new("minilm")
            .unwrap()
            .failing_on_times("BOOM", 1);
        let error = model.embed_batch(&[text("a BOOM")], &raw()).unwrap_err();
        assert!(!error.is_permanent_for_input());
        assert!(model.embed_batch(&[text("a BOOM")], &raw()).is_ok());
        assert_eq!(model.calls(), 2);
    }
}
