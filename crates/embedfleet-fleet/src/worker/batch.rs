//! Forming forward batches: the jobs a worker holds, the limits a batch is formed within, and
//! the token estimate those limits are measured in.

use async_nats::jetstream::Message;

use embedfleet_proto::Input;

use crate::config::BatchConfig;
use crate::job::{self, ModelJob};

/// Tokens a text input costs on top of its content (`[CLS]`/`[SEP]` and the like).
const SPECIAL_TOKENS: usize = 2;

/// A delivered, decoded job waiting for or in a batch.
pub(super) struct Pending {
    pub(super) message: Message,
    pub(super) job: ModelJob,
    /// [`estimate_tokens`] summed over the job's inputs.
    pub(super) tokens: usize,
    /// The trace the job's `traceparent` carries (the coordinator's job span); empty when
    /// none. The batch span links to it, the job's reply span is its child.
    pub(super) trace: opentelemetry::Context,
}

impl Pending {
    /// Jobs batch together only when the model would run them with the same options.
    pub(super) fn same_options(&self, other: &Pending) -> bool {
        self.job.truncate == other.job.truncate
            && self.job.instruction == other.job.instruction
            && self.job.input_type == other.job.input_type
    }

    /// Deliveries so far, this one included (1 when the ack subject cannot be parsed).
    pub(super) fn delivered(&self) -> i64 {
        self.message.info().map(|info| info.delivered).unwrap_or(1)
    }

    /// Jobs the consumer still had queued when this one was delivered (1 when unknown, so an
    /// unparsable ack subject errs towards gathering).
    pub(super) fn queued_behind(&self) -> u64 {
        self.message.info().map_or(1, |info| info.pending)
    }

    pub(super) fn expired(&self) -> bool {
        self.job.deadline_unix_ms <= job::unix_ms_now()
    }
}

/// A forward batch being formed.
#[derive(Default)]
pub(super) struct Batch {
    pub(super) jobs: Vec<Pending>,
    pub(super) inputs: usize,
    tokens: usize,
    /// A compatible job did not fit: stop gathering.
    pub(super) full: bool,
}

impl Batch {
    /// Takes `pending` if it may join; hands it back otherwise.
    pub(super) fn offer(&mut self, pending: Pending, limits: &BatchConfig) -> Option<Pending> {
        if let Some(first) = self.jobs.first() {
            if !first.same_options(&pending) {
                return Some(pending);
            }
        }
        let empty = self.jobs.is_empty();
        let (inputs, tokens) = (pending.job.inputs.len(), pending.tokens);
        if !fits(self.inputs, self.tokens, inputs, tokens, empty, limits) {
            self.full = true;
            return Some(pending);
        }
        self.inputs += inputs;
        self.tokens += tokens;
        self.jobs.push(pending);
        None
    }
}

/// Whether a job of `inputs`/`tokens` may join a batch holding `batch_inputs`/`batch_tokens`.
/// The first job of a batch always may, however big: it then runs alone rather than never.
fn fits(
    batch_inputs: usize,
    batch_tokens: usize,
    inputs: usize,
    tokens: usize,
    batch_empty: bool,
    limits: &BatchConfig,
) -> bool {
    batch_empty
        || (batch_inputs + inputs <= limits.max_inputs
            && batch_tokens + tokens <= limits.token_budget)
}

/// Estimated tokens of one input, for the batch budget only: the model counts exact tokens and
/// splits its own forward passes. Text and code take about 3 bytes per token in the WordPiece and
/// BPE vocabularies here, plus the special tokens; when truncating, no input costs more than the
/// model's `max_seq_len`, since that is all it reads. A media input costs a full sequence.
pub fn estimate_tokens(input: &Input, max_seq_len: usize, truncate: bool) -> usize {
    let estimate = match input.text() {
        Some(text) => text.len() / 3 + SPECIAL_TOKENS,
        None => max_seq_len,
    };
    if truncate {
        estimate.min(max_seq_len)
    } else {
        estimate
    }
}

/// The job (position in `jobs`) and input within it that batch input `index` belongs to.
pub(super) fn locate(
    input_counts: impl IntoIterator<Item = usize>,
    index: usize,
) -> Option<(usize, usize)> {
    let mut start = 0;
    for (job, count) in input_counts.into_iter().enumerate() {
        if index < start + count {
            return Some((job, index - start));
        }
        start += count;
    }
    None
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn token_estimate_is_capped_only_when_truncating() {
        let long = Input::Text("x".repeat(3000));
        assert_eq!(estimate_tokens(&long, 256, true), 256);
        assert_eq!(estimate_tokens(&long, 256, false), 1002);
        assert_eq!(estimate_tokens(&Input::Text("abcdef".into()), 256, true), 4);
        let image = Input::Image {
            bytes: vec![0; 10],
            format: None,
        };
        assert_eq!(estimate_tokens(&image, 77, true), 77);
    }

    #[test]
    fn batch_indices_map_onto_jobs() {
        let counts = [2, 0, 3];
        assert_eq!(locate(counts, 0), Some((0, 0)));
        assert_eq!(locate(counts, 1), Some((0, 1)));
        assert_eq!(locate(counts, 2), Some((2, 0)));
        assert_eq!(locate(counts, 4), Some((2, 2)));
        assert_eq!(locate(counts, 5), None);
    }

    #[test]
    fn a_job_over_the_budget_still_runs_alone() {
        let limits = BatchConfig {
            max_inputs: 4,
            token_budget: 100,
            max_wait: Duration::ZERO,
            ..BatchConfig::default()
        };
        assert!(fits(0, 0, 10, 1000, true, &limits));
        assert!(!fits(1, 10, 1, 91, false, &limits));
        assert!(fits(1, 10, 1, 90, false, &limits));
        assert!(!fits(3, 10, 2, 10, false, &limits));
    }
}
