//! The partial table of one request: each model's vector for each input, and where it came from.

use std::collections::BTreeMap;

use embedfleet_models::ModelSpec;

#[derive(Clone, Copy, PartialEq)]
pub(super) enum Source {
    Cached,
    Fresh,
}

/// One model's vector for one input, and where it came from.
type Cell = Option<(Vec<f32>, Source)>;

/// partials[slot][input] for one request.
pub(super) struct PartialTable {
    cells: Vec<Vec<Cell>>,
    pub(super) tokens: u64,
}

impl PartialTable {
    pub(super) fn new(slots: usize, inputs: usize) -> Self {
        PartialTable {
            cells: vec![vec![None; inputs]; slots],
            tokens: 0,
        }
    }

    pub(super) fn set(&mut self, slot: usize, input: usize, vector: Vec<f32>, source: Source) {
        self.cells[slot][input] = Some((vector, source));
    }

    pub(super) fn normalize(&mut self) {
        for (vector, _) in self.cells.iter_mut().flatten().flatten() {
            embedfleet_models::model::l2_normalize(vector);
        }
    }

    pub(super) fn row(&self, input: usize) -> Vec<Option<&[f32]>> {
        self.cells
            .iter()
            .map(|slot| slot[input].as_ref().map(|(v, _)| v.as_slice()))
            .collect()
    }

    pub(super) fn all_cached(&self, input: usize) -> bool {
        let mut present = self
            .cells
            .iter()
            .filter_map(|slot| slot[input].as_ref())
            .peekable();
        present.peek().is_some() && present.all(|(_, source)| *source == Source::Cached)
    }

    pub(super) fn take_named(
        &mut self,
        input: usize,
        models: &[&'static ModelSpec],
    ) -> BTreeMap<String, Vec<f32>> {
        models
            .iter()
            .zip(&mut self.cells)
            .filter_map(|(spec, slot)| slot[input].take().map(|(v, _)| (spec.name.to_string(), v)))
            .collect()
    }
}
