//! The autoscaling signal is real: KEDA's `nats-jetstream` scaler reads a nats-server's
//! monitoring endpoint (`/jsz?acc=<account>&consumers=true&config=true`) and takes, as a
//! worker group's lag, `num_pending + num_ack_pending` of the durable consumer the chart's
//! trigger names. Here a real nats-server with monitoring holds N jobs for a model whose worker
//! is stopped: the lag computed the scaler's way must be N; once a worker starts it must fall to
//! 0 as the jobs are answered.
//!
//! The stream and consumer names are read from the chart (`templates/_helpers.tpl`), so this
//! proves the names the ScaledObjects carry, not only the code's constants.

mod http_support;
mod support;

use std::time::{Duration, Instant};

use futures::StreamExt;
use serde_json::Value;

use embedfleet_fleet::job::{self, ModelJob, PartialOutcome, PartialResult};
use embedfleet_proto::{model_consumer_name, model_job_subject, Input, JOB_STREAM};
use embedfleet_testkit::NatsServer;
use support::*;

/// Jobs queued while no worker runs.
const JOBS: u64 = 24;
/// The model whose queue is measured; one the repository has weights for.
const MODEL: &str = "minilm";
/// Bound on the worker draining the queue (a loaded 2-core machine embeds 24 short texts in
/// well under a second; the margin is for start-up).
const DRAIN_BOUND: Duration = Duration::from_secs(120);

/// The body of `{{- define "<name>" -}}...{{- end -}}` in the chart's helpers.
fn chart_define(name: &str) -> String {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../deploy/helm/embedfleet/templates/_helpers.tpl");
    let helpers = std::fs::read_to_string(&path).expect("the chart's _helpers.tpl");
    let open = format!("{{{{- define \"{name}\" -}}}}");
    let start = helpers.find(&open).expect("the define") + open.len();
    let end = helpers[start..].find("{{- end -}}").expect("its end");
    helpers[start..start + end].to_string()
}

/// The lag KEDA's scaler computes for `consumer` on `stream` (account `$G`, as the chart's
/// default `nats.account`), from the same request it sends; `None` when the consumer is missing
/// (KEDA >= 2.20 reports an error and the ScaledObject's fallback applies).
fn keda_lag(monitoring: &str, stream: &str, consumer: &str) -> Option<u64> {
    let url = format!("{monitoring}/jsz?acc=$G&consumers=true&config=true");
    let (status, body) = http_support::get(&url).expect("the monitoring endpoint answers");
    assert_eq!(status, 200, "{url}: {body}");
    let jsz: Value = serde_json::from_str(&body).expect("/jsz is JSON");
    let accounts = jsz["account_details"].as_array()?;
    let consumer = accounts
        .iter()
        .flat_map(|account| account["stream_detail"].as_array().into_iter().flatten())
        .filter(|s| s["name"] == stream)
        .flat_map(|s| s["consumer_detail"].as_array().into_iter().flatten())
        .find(|c| c["name"] == consumer)?;
    let field = |name: &str| {
        consumer[name]
            .as_u64()
            .unwrap_or_else(|| panic!("{name} in {consumer}"))
    };
    Some(field("num_pending") + field("num_ack_pending"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keda_lag_is_the_queued_jobs_of_a_stopped_worker_and_falls_to_zero_when_one_starts() {
    let stream = chart_define("embedfleet.jobStream");
    let consumer = format!("{}{MODEL}", chart_define("embedfleet.consumerPrefix"));
    assert_eq!(stream, JOB_STREAM);
    assert_eq!(consumer, model_consumer_name(MODEL));

    let nats = NatsServer::start_with_monitoring().expect("start nats-server with monitoring");
    let url = nats.url();
    let monitoring = nats.monitoring_url().expect("monitoring is on");

    // A worker binds the model's consumer, then stops: the queue exists, nobody pulls it.
    let mut worker = start_role(
        "worker (to be stopped)",
        &["worker", "--nats-url", &url, "--models", MODEL, "--no-http"],
    );
    let status = worker.terminate().expect("stop the worker");
    assert!(status.success(), "the worker exits 0 on SIGTERM: {status}");
    assert_eq!(keda_lag(&monitoring, &stream, &consumer), Some(0));
    // A consumer nobody declared is an error for the scaler, not a lag of 0.
    assert_eq!(
        keda_lag(&monitoring, &stream, &model_consumer_name("mpnet")),
        None
    );

    // N jobs, published as a coordinator does, answered on a subject this test reads.
    let client = client(&url).await;
    let js = async_nats::jetstream::new(client.clone());
    let mut partials = client
        .subscribe(job::partial_wildcard("keda-lag-test"))
        .await
        .expect("subscribe");
    for job_id in 0..JOBS {
        let job = ModelJob {
            job_id,
            model: MODEL.to_string(),
            inputs: vec![Input::Text(format!("queued job number {job_id}"))],
            instruction: None,
            input_type: Default::default(),
            truncate: true,
            // Workers answer only on the fleet's partial subjects (a coordinator id, a job id).
            reply_to: job::partial_subject("keda-lag-test", job_id),
            deadline_unix_ms: job::unix_ms_now() + 600_000,
        };
        js.publish(model_job_subject(MODEL), job::encode(&job).into())
            .await
            .expect("publish")
            .await
            .expect("the stream stores the job");
    }
    assert_eq!(
        keda_lag(&monitoring, &stream, &consumer),
        Some(JOBS),
        "KEDA's lag is the number of jobs waiting for the stopped worker"
    );

    // A worker starts (KEDA's scale-from-zero): the lag falls to 0 as the jobs are answered.
    let mut worker = start_role(
        "worker",
        &["worker", "--nats-url", &url, "--models", MODEL, "--no-http"],
    );
    let started = Instant::now();
    let mut answered = 0;
    while answered < JOBS {
        let left = DRAIN_BOUND.saturating_sub(started.elapsed());
        let message = tokio::time::timeout(left, partials.next())
            .await
            .unwrap_or_else(|_| panic!("{answered} of {JOBS} jobs answered in {DRAIN_BOUND:?}"))
            .expect("subscription open");
        let partial: PartialResult = job::decode(&message.payload).expect("a partial");
        assert!(
            matches!(partial.outcome, PartialOutcome::Vectors(_)),
            "{partial:?}"
        );
        answered += 1;
    }
    // The acks follow the partials on the worker's connection; the count catches up at once.
    let mut lag = keda_lag(&monitoring, &stream, &consumer);
    while lag != Some(0) && started.elapsed() < DRAIN_BOUND {
        tokio::time::sleep(Duration::from_millis(100)).await;
        lag = keda_lag(&monitoring, &stream, &consumer);
    }
    assert_eq!(lag, Some(0), "the lag falls to 0 once every job is acked");
    assert_all_running(&mut [&mut worker]);
}
