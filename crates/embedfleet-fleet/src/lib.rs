//! The fleet: how models, fusion, the cache and NATS wire together.
//!
//! # Layout
//! - [`pipeline`]: library mode. Every component in one process, no NATS: what `embedfleet
//!   embed` runs and what the per-component benches measure. The NATS roles reuse its steps.
//! - [`coordinator`]: the `embedfleet` NATS service (`embed.v1`): validate, cache, fan out one
//!   job per model, gather, fuse, reply.
//! - [`worker`]: a model worker: pulls one model's jobs from JetStream, batches, embeds,
//!   publishes partials, acks.
//! - [`fusion`]: the fusion stage, FuseMoE per active model set (in the coordinator process);
//!   [`fusion_device`]: where it runs (CPU, or a GPU with the CPU as the fallback).
//! - [`plan`]: request planning shared by the pipeline and the coordinator (model set,
//!   modality check; the layer build is [`fusion::build_layer`]).
//! - [`job`]: what the roles say to each other; [`queues`]: the JetStream stream and consumers;
//!   [`config`]: the roles' settings; [`embedded_nats`]: the child nats-server of `serve`;
//!   [`stage_timings`]: a request's stage timings for the perf harness.
//! - [`http`]: `/healthz`, `/readyz`, `/metrics` of every role; [`metrics`]: the Prometheus
//!   metrics they serve; [`trace_context`]: the `traceparent` header across hops (traces).

pub mod config;
pub mod coordinator;
pub mod embedded_nats;
pub mod fusion;
pub mod fusion_device;
pub mod http;
pub mod job;
pub mod metrics;
pub mod pipeline;
pub mod plan;
pub mod queues;
pub mod revisions;
pub mod stage_timings;
pub mod trace_context;
pub mod worker;

pub use config::{BatchConfig, CoordinatorConfig, QueueConfig};
pub use pipeline::{Pipeline, PipelineError, PipelineOutput, PipelineRequest, DEFAULT_FUSION_SEED};
