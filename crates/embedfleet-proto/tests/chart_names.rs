//! The Helm chart spells the stream and consumer names KEDA reads; they must be this crate's.
//!
//! A consumer renamed here but not in `deploy/helm/embedfleet/templates/_helpers.tpl` would leave
//! every ScaledObject reading a consumer that no longer exists: KEDA's fallback replicas forever,
//! never scaling. `scripts/chart-test.sh` checks the rendered triggers the same way.

use std::path::Path;

use embedfleet_proto::subjects::{model_consumer_name, JOB_STREAM};

/// The body of `{{- define "<name>" -}}...{{- end -}}` in the chart's helpers.
fn chart_define(name: &str) -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../deploy/helm/embedfleet/templates/_helpers.tpl");
    let helpers = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
    let open = format!("{{{{- define \"{name}\" -}}}}");
    let start = helpers
        .find(&open)
        .unwrap_or_else(|| panic!("no define {name:?} in {}", path.display()))
        + open.len();
    let end = helpers[start..]
        .find("{{- end -}}")
        .unwrap_or_else(|| panic!("define {name:?} is not closed"));
    helpers[start..start + end].to_string()
}

#[test]
fn the_chart_names_the_job_stream_as_the_code_does() {
    assert_eq!(chart_define("embedfleet.jobStream"), JOB_STREAM);
}

#[test]
fn the_chart_names_each_model_consumer_as_the_code_does() {
    let prefix = chart_define("embedfleet.consumerPrefix");
    for model in ["minilm", "mpnet", "e5-mistral", "sentence-t5-xxl"] {
        assert_eq!(format!("{prefix}{model}"), model_consumer_name(model));
    }
}
