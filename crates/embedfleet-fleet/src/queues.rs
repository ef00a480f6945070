//! The JetStream objects the roles share: the job stream and one durable pull consumer per
//! model. Either role may be first to start, so both declare what they need, idempotently.

use async_nats::jetstream::{self, consumer, stream};

use embedfleet_proto::{
    model_consumer_name, model_job_subject, JOB_STREAM, MODEL_JOB_SUBJECT_WILDCARD,
};

use crate::config::QueueConfig;

/// The job stream's configuration: a work queue (a job is deleted once acked), on file so that a
/// nats-server restart keeps accepted jobs, bounded in bytes and age and in jobs per model (one
/// subject per model), refusing new jobs when full (per model: `discard_new_per_subject`).
pub fn job_stream_config(queues: &QueueConfig) -> stream::Config {
    stream::Config {
        name: JOB_STREAM.to_string(),
        description: Some("embedfleet per-model embedding jobs".into()),
        subjects: vec![MODEL_JOB_SUBJECT_WILDCARD.to_string()],
        retention: stream::RetentionPolicy::WorkQueue,
        storage: stream::StorageType::File,
        discard: stream::DiscardPolicy::New,
        max_bytes: queues.stream_max_bytes,
        max_age: queues.stream_max_age,
        duplicate_window: queues.duplicate_window,
        max_messages_per_subject: queues.max_jobs_per_model,
        discard_new_per_subject: queues.max_jobs_per_model > 0,
        ..Default::default()
    }
}

/// Creates the job stream, or updates its limits when it exists with other ones.
pub async fn ensure_job_stream(
    js: &jetstream::Context,
    queues: &QueueConfig,
) -> Result<stream::Stream, async_nats::Error> {
    let config = job_stream_config(queues);
    match js.get_stream(JOB_STREAM).await {
        Ok(mut existing) => {
            let info = existing.info().await?;
            if info.config.max_bytes != config.max_bytes
                || info.config.max_age != config.max_age
                || info.config.duplicate_window != config.duplicate_window
                || info.config.max_messages_per_subject != config.max_messages_per_subject
                || info.config.discard_new_per_subject != config.discard_new_per_subject
            {
                js.update_stream(&config).await?;
            }
            Ok(existing)
        }
        Err(_) => Ok(js.get_or_create_stream(config).await?),
    }
}

/// The durable pull consumer of `model`'s jobs: explicit acks, bounded redelivery and pending.
/// Its name (`embedfleet-model-<model>`) is what KEDA's scaler reads; see docs/operations.md.
pub fn model_consumer_config(model: &str, queues: &QueueConfig) -> consumer::pull::Config {
    consumer::pull::Config {
        durable_name: Some(model_consumer_name(model)),
        description: Some(format!("embedfleet jobs for model {model}")),
        filter_subject: model_job_subject(model),
        ack_policy: consumer::AckPolicy::Explicit,
        ack_wait: queues.ack_wait,
        max_deliver: queues.max_deliver,
        max_ack_pending: queues.max_ack_pending,
        ..Default::default()
    }
}

/// Creates `model`'s consumer (or binds the existing one) and applies the configured limits.
pub async fn ensure_model_consumer(
    stream: &stream::Stream,
    model: &str,
    queues: &QueueConfig,
) -> Result<consumer::PullConsumer, async_nats::Error> {
    let config = model_consumer_config(model, queues);
    let name = model_consumer_name(model);
    // create_consumer is idempotent for an identical config and updates a changed one.
    stream.create_consumer(config).await?;
    stream.get_consumer(&name).await
}
