//! The planner on the real catalogue: the cases operators ask about, and the edges of packing.

use std::collections::BTreeMap;

use embedfleet_models::catalogue::{self, CATALOGUE};
use embedfleet_placement::{
    parse_devices, plan, render, Dtype, MemoryModel, PlanError, PlanRequest,
};

fn request(gpus: &str) -> PlanRequest {
    PlanRequest {
        devices: parse_devices(gpus).unwrap(),
        models: CATALOGUE.iter().collect(),
        pinned: BTreeMap::new(),
        replicas: BTreeMap::new(),
        memory_fraction: 0.9,
        memory: MemoryModel::default(),
    }
}

fn placed(plan: &embedfleet_placement::Plan) -> Vec<(&'static str, usize)> {
    let mut all: Vec<_> = plan
        .devices
        .iter()
        .flat_map(|d| d.models.iter().map(move |a| (a.model, d.device.index)))
        .collect();
    all.sort();
    all
}

fn assert_every_device_holds_its_load(plan: &embedfleet_placement::Plan) {
    for device in &plan.devices {
        assert!(device.used(&plan.memory) <= device.usable, "{device:?}");
    }
}

#[test]
fn all_twelve_fit_on_one_16gb_card_once_the_two_giants_are_quantised() {
    let plan = plan(&request("16GB")).unwrap();
    assert_eq!(placed(&plan).len(), 12);
    assert_every_device_holds_its_load(&plan);
    let quantised: Vec<&str> = plan.quantized.iter().map(|(m, _)| *m).collect();
    assert!(quantised.contains(&"e5-mistral"), "{quantised:?}");
    assert!(quantised.contains(&"sentence-t5-xxl"), "{quantised:?}");
    // The small models keep half precision: quantising goes largest first.
    let minilm = plan.devices[0]
        .models
        .iter()
        .find(|a| a.model == "minilm")
        .unwrap();
    assert_eq!(minilm.dtype, Dtype::F16);
}

#[test]
fn an_80gb_and_a_24gb_card_need_no_quantisation_and_fewest_devices_wins() {
    let plan = plan(&request("80GB,24GB")).unwrap();
    assert!(plan.quantized.is_empty(), "{:?}", plan.quantized);
    assert_eq!(plan.used_devices().count(), 1, "{}", render::table(&plan));
    assert_eq!(plan.devices[0].models.len(), 12);
    assert_every_device_holds_its_load(&plan);
}

#[test]
fn three_small_cards_spread_the_models_and_balance_by_load() {
    let plan = plan(&request("24GB,24GB,24GB")).unwrap();
    assert_every_device_holds_its_load(&plan);
    assert_eq!(placed(&plan).len(), 12);
    // e5-mistral and sentence-t5-xxl do not share a 24 GB card at half precision.
    let home = |model: &str| {
        placed(&plan)
            .into_iter()
            .find(|(m, _)| *m == model)
            .unwrap()
            .1
    };
    assert_ne!(home("e5-mistral"), home("sentence-t5-xxl"));
}

#[test]
fn a_model_too_big_for_every_device_is_named_with_its_need() {
    let mut req = request("4GB,2GB");
    req.models = vec![catalogue::find("e5-mistral").unwrap()];
    req.pinned.insert("e5-mistral", Dtype::F16);
    match plan(&req) {
        Err(PlanError::FitsNowhere {
            model,
            dtype,
            need_gib,
            biggest_gib,
        }) => {
            assert_eq!((model, dtype), ("e5-mistral", Dtype::F16));
            assert!(
                need_gib > 13.0 && (biggest_gib - 3.6).abs() < 0.01,
                "{need_gib} {biggest_gib}"
            );
        }
        other => panic!("expected FitsNowhere, got {other:?}"),
    }
    // Unpinned, it is quantised as far as q4k and still does not fit 4 GB: same error at q4k.
    req.pinned.clear();
    let error = plan(&req).unwrap_err();
    assert!(
        matches!(
            error,
            PlanError::FitsNowhere {
                dtype: Dtype::Q4k,
                ..
            }
        ),
        "{error}"
    );
    assert!(error.to_string().contains("e5-mistral"));
}

#[test]
fn replicas_land_on_distinct_devices_and_too_many_replicas_is_an_error() {
    let mut req = request("24GB,24GB");
    req.models = vec![
        catalogue::find("minilm").unwrap(),
        catalogue::find("mpnet").unwrap(),
    ];
    req.replicas.insert("minilm", 2);
    let plan = plan(&req).unwrap();
    let homes: Vec<usize> = placed(&plan)
        .into_iter()
        .filter(|(m, _)| *m == "minilm")
        .map(|(_, d)| d)
        .collect();
    assert_eq!(homes, [0, 1]);
    req.replicas.insert("minilm", 3);
    assert!(matches!(
        embedfleet_placement::plan(&req),
        Err(PlanError::TooFewDevicesForReplicas { replicas: 3, .. })
    ));
}

#[test]
fn the_plan_is_deterministic_and_ignores_the_order_models_are_named_in() {
    let first = plan(&request("24GB,16GB,16GB")).unwrap();
    let mut reversed = request("24GB,16GB,16GB");
    reversed.models.reverse();
    let second = plan(&reversed).unwrap();
    assert_eq!(first, second);
    assert_eq!(render::table(&first), render::table(&second));
}

#[test]
fn pinned_dtypes_are_kept_and_a_plan_that_cannot_fit_says_why() {
    let mut req = request("16GB");
    for spec in CATALOGUE {
        req.pinned
            .insert(spec.name, Dtype::F32.max(Dtype::default_for(spec)));
    }
    req.pinned.insert("e5-mistral", Dtype::Q4k);
    req.pinned.insert("sentence-t5-xxl", Dtype::Q4k);
    let error = plan(&req).unwrap_err();
    assert!(matches!(error, PlanError::DoesNotFit { .. }), "{error}");
    assert!(error.to_string().contains("GiB"), "{error}");
}

#[test]
fn bad_requests_are_errors() {
    let mut req = request("16GB");
    req.memory_fraction = 1.5;
    assert!(matches!(plan(&req), Err(PlanError::BadFraction(_))));
    req.memory_fraction = 0.9;
    req.models.clear();
    assert!(matches!(plan(&req), Err(PlanError::NoModels)));
}

#[test]
fn renderings_name_every_device_model_and_dtype() {
    let plan = plan(&request("24GB,24GB,24GB")).unwrap();
    let commands = render::commands(&plan);
    assert_eq!(commands.len(), plan.used_devices().count());
    for command in &commands {
        assert!(
            command.starts_with("embedfleet worker --device cuda:"),
            "{command}"
        );
    }
    let all: String = commands.join("\n");
    for spec in CATALOGUE {
        assert!(all.contains(spec.name), "{} missing from {all}", spec.name);
    }
    let values = render::helm_values(&plan);
    assert!(values.starts_with("workerGroups:\n"));
    assert_eq!(
        values.matches("  - name: gpu").count(),
        plan.used_devices().count()
    );
    // Only keys the chart's values.schema.json allows in a worker group (it rejects others).
    for line in values
        .lines()
        .skip(1)
        .filter(|l| !l.trim_start().starts_with('#'))
    {
        let key = line
            .trim_start()
            .trim_start_matches("- ")
            .split(':')
            .next()
            .unwrap();
        assert!(["name", "models", "dtype", "gpu"].contains(&key), "{line}");
    }
    assert!(values.contains("minilm=f16"), "{values}");
    let json = serde_json::to_value(&plan).unwrap();
    assert_eq!(json["devices"].as_array().unwrap().len(), 3);
}
