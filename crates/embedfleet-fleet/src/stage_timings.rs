//! Stage timings of one request, sent back in the `Embedfleet-Timings` reply header when the
//! request asked for them (the perf harness does; see `TIMINGS_HEADER` in embedfleet-proto).
//!
//! A task-local collector rather than a parameter: the stages are deep in the coordinator's
//! call chain, and a request that did not ask pays one failed task-local lookup per stage.
//! Recording is synchronous (no borrow is held across an await), so the jobs of one request,
//! awaited together on its task, can record side by side.

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::future::Future;
use std::time::Duration;

tokio::task_local! {
    static STAGES: RefCell<BTreeMap<String, Duration>>;
}

/// Runs `work`, collecting the stages it records when `wanted`; returns its output and the
/// header value (`None` when not wanted).
pub async fn collect<F: Future>(wanted: bool, work: F) -> (F::Output, Option<String>) {
    if !wanted {
        return (work.await, None);
    }
    STAGES
        .scope(RefCell::new(BTreeMap::new()), async {
            let output = work.await;
            let header = STAGES.with(|stages| header_value(&stages.borrow()));
            (output, Some(header))
        })
        .await
}

/// Adds `took` to `stage` (`cache_get`, `fusion`) when the current request collects timings.
pub fn record(stage: &str, took: Duration) {
    let _ = STAGES.try_with(|stages| {
        *stages.borrow_mut().entry(stage.to_string()).or_default() += took;
    });
}

/// Adds `took` to `<stage>.<model>` (`jobs.minilm`).
pub fn record_model(stage: &str, model: &str, took: Duration) {
    let _ = STAGES.try_with(|stages| {
        *stages
            .borrow_mut()
            .entry(format!("{stage}.{model}"))
            .or_default() += took;
    });
}

/// `a=1.234,b=0.050`: milliseconds, three decimals, stages in name order.
fn header_value(stages: &BTreeMap<String, Duration>) -> String {
    let mut value = String::new();
    for (stage, took) in stages {
        if !value.is_empty() {
            value.push(',');
        }
        let _ = write!(value, "{stage}={:.3}", took.as_secs_f64() * 1e3);
    }
    value
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn stages_are_summed_only_when_wanted() {
        let work = async {
            record("cache_get", Duration::from_micros(100));
            record("cache_get", Duration::from_micros(50));
            record_model("jobs", "minilm", Duration::from_millis(12));
            7
        };
        let (out, header) = collect(true, work).await;
        assert_eq!(out, 7);
        assert_eq!(
            header.as_deref(),
            Some("cache_get=0.150,jobs.minilm=12.000")
        );

        let (_, header) =
            collect(false, async { record("fusion", Duration::from_millis(1)) }).await;
        assert_eq!(header, None);
        // Outside any collector, recording is a no-op, not a panic.
        record("fusion", Duration::from_millis(1));
    }
}
