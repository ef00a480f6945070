//! The fleet: how models, fusion and (soon) NATS wire together.
//!
//! # Layout
//! - [`pipeline`]: library mode. Every component in one process, no NATS: what `embedfleet
//!   embed` runs and what the per-component benches measure. The NATS roles reuse its steps.

pub mod pipeline;

pub use pipeline::{Pipeline, PipelineError, PipelineOutput, PipelineRequest, DEFAULT_FUSION_SEED};
