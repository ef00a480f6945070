//! Request planning, one path for the in-process [`Pipeline`](crate::Pipeline) and the
//! coordinator: the model set a request names (catalogue names → slot order), the check that
//! every input is taken by one of its models, and (in [`crate::fusion::build_layer`]) the fusion
//! layer for the set. A rule about which requests may run is written here once.

use embedfleet_models::{catalogue, ModelError, ModelSpec};
use embedfleet_proto::{Input, Modality};

/// The catalogue entries of `names` in fusion slot order, duplicates dropped; an unknown name is
/// [`ModelError::UnknownModel`], which lists the known ones.
pub fn resolve_models(names: &[String]) -> Result<Vec<&'static ModelSpec>, ModelError> {
    let specs = names
        .iter()
        .map(|name| embedfleet_models::registry::lookup(name))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(catalogue::in_slot_order(specs))
}

/// An input that none of the set's models takes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UntakenInput {
    /// Position within the inputs checked.
    pub index: usize,
    pub modality: Modality,
    /// The set, comma-separated, for the message.
    pub models: String,
}

/// The first input no model of `models` takes, if any.
pub fn check_modalities(
    inputs: &[Input],
    models: &[&'static ModelSpec],
) -> Result<(), UntakenInput> {
    match inputs
        .iter()
        .position(|input| !models.iter().any(|spec| spec.takes(input.modality())))
    {
        None => Ok(()),
        Some(index) => Err(UntakenInput {
            index,
            modality: inputs[index].modality(),
            models: models
                .iter()
                .map(|spec| spec.name)
                .collect::<Vec<_>>()
                .join(", "),
        }),
    }
}

/// The model sets a coordinator fuses: its configured sets (the default set among them), and,
/// when `subsets` is on, any subset of one, fused by that set's layer with the absent models
/// masked (FuseMoE's gate reads a presence mask, as it does for a model that does not take an
/// input's modality). Any other set is refused before any work, so a client cannot make a
/// coordinator build a layer per subset of the catalogue.
#[derive(Debug, Clone)]
pub struct FusableSets {
    sets: Vec<Vec<&'static ModelSpec>>,
    subsets: bool,
}

impl FusableSets {
    /// The sets named (each resolved to slot order; repeats dropped).
    pub fn new(sets: &[Vec<String>], subsets: bool) -> Result<Self, ModelError> {
        let mut resolved: Vec<Vec<&'static ModelSpec>> = Vec::new();
        for set in sets {
            let set = resolve_models(set)?;
            if !set.is_empty() && !resolved.contains(&set) {
                resolved.push(set);
            }
        }
        Ok(FusableSets {
            sets: resolved,
            subsets,
        })
    }

    /// The configured sets, slot order each.
    pub fn sets(&self) -> &[Vec<&'static ModelSpec>] {
        &self.sets
    }

    /// Whether `model` belongs to a configured set.
    pub fn configures(&self, model: &str) -> bool {
        self.sets.iter().flatten().any(|spec| spec.name == model)
    }

    /// The configured set whose layer fuses `models` (slot order): the set itself, or with
    /// subsets on, the smallest configured set holding all of them. `None`: not fusable here.
    pub fn layer_set(&self, models: &[&'static ModelSpec]) -> Option<&[&'static ModelSpec]> {
        if let Some(exact) = self.sets.iter().find(|set| set.as_slice() == models) {
            return Some(exact);
        }
        if !self.subsets {
            return None;
        }
        self.sets
            .iter()
            .filter(|set| models.iter().all(|spec| set.contains(spec)))
            .min_by_key(|set| set.len())
            .map(Vec::as_slice)
    }

    /// The sets as a message shows them: `[minilm, mpnet]; [minilm, mpnet, bge-large]`.
    pub fn describe(&self) -> String {
        self.sets
            .iter()
            .map(|set| {
                let names: Vec<&str> = set.iter().map(|spec| spec.name).collect();
                format!("[{}]", names.join(", "))
            })
            .collect::<Vec<_>>()
            .join("; ")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(set: &[&'static ModelSpec]) -> Vec<&'static str> {
        set.iter().map(|spec| spec.name).collect()
    }

    #[test]
    fn configured_sets_and_their_subsets_are_fusable_nothing_else() {
        let configured = vec![
            vec!["mpnet".to_string(), "minilm".to_string()],
            vec!["minilm".into(), "mpnet".into(), "bge-large".into()],
        ];
        let sets = FusableSets::new(&configured, true).unwrap();
        let resolve = |names: &[&str]| {
            resolve_models(&names.iter().map(|s| s.to_string()).collect::<Vec<_>>()).unwrap()
        };
        let pair = resolve(&["minilm", "mpnet"]);
        assert_eq!(names(sets.layer_set(&pair).unwrap()), ["minilm", "mpnet"]);
        // A subset goes to the smallest set holding it.
        assert_eq!(
            names(sets.layer_set(&resolve(&["mpnet"])).unwrap()),
            ["minilm", "mpnet"]
        );
        assert_eq!(
            names(sets.layer_set(&resolve(&["bge-large"])).unwrap()).len(),
            3
        );
        assert!(sets.layer_set(&resolve(&["minilm", "codebert"])).is_none());
        assert!(sets.configures("bge-large") && !sets.configures("codebert"));

        let exact_only = FusableSets::new(&configured, false).unwrap();
        assert!(exact_only.layer_set(&resolve(&["mpnet"])).is_none());
        assert!(exact_only.layer_set(&pair).is_some());
        assert!(FusableSets::new(&[vec!["nope".into()]], true).is_err());
    }
}
