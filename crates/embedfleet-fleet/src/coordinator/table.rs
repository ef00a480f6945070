//! The partial table of one request: each model's vector for each input, where it came from,
//! and the revision of the weights that made it (what the fused vector's cache key must name).

use std::collections::BTreeMap;
use std::sync::Arc;

use embedfleet_models::ModelSpec;

#[derive(Clone, Copy, PartialEq)]
pub(super) enum Source {
    Cached,
    Fresh,
}

/// One model's vector for one input, where it came from, and its revision.
#[derive(Clone)]
struct Cell {
    vector: Vec<f32>,
    source: Source,
    revision: Arc<str>,
}

/// partials[slot][input] for one request (slots in the request's model order).
pub(super) struct PartialTable {
    cells: Vec<Vec<Option<Cell>>>,
    pub(super) tokens: u64,
}

impl PartialTable {
    pub(super) fn new(slots: usize, inputs: usize) -> Self {
        PartialTable {
            cells: vec![vec![None; inputs]; slots],
            tokens: 0,
        }
    }

    pub(super) fn set(
        &mut self,
        slot: usize,
        input: usize,
        vector: Vec<f32>,
        source: Source,
        revision: Arc<str>,
    ) {
        self.cells[slot][input] = Some(Cell {
            vector,
            source,
            revision,
        });
    }

    pub(super) fn normalize(&mut self) {
        for cell in self.cells.iter_mut().flatten().flatten() {
            embedfleet_models::model::l2_normalize(&mut cell.vector);
        }
    }

    /// One input's vectors in a fusion layer's slot order: `slot_of[layer slot]` is the request
    /// slot that fills it, `None` for a model of the layer's set the request did not name.
    pub(super) fn row(&self, input: usize, slot_of: &[Option<usize>]) -> Vec<Option<&[f32]>> {
        slot_of
            .iter()
            .map(|slot| {
                slot.and_then(|slot| self.cells[slot][input].as_ref())
                    .map(|cell| cell.vector.as_slice())
            })
            .collect()
    }

    /// Whether no model gave this input a vector.
    pub(super) fn row_is_empty(&self, input: usize) -> bool {
        self.cells.iter().all(|slot| slot[input].is_none())
    }

    /// The revision behind each slot's vector of `input` (`None`: no vector).
    pub(super) fn revisions(&self, input: usize) -> Vec<Option<&str>> {
        self.cells
            .iter()
            .map(|slot| slot[input].as_ref().map(|cell| &*cell.revision))
            .collect()
    }

    /// Per slot, the width of the vectors it holds (`None` for a slot with none).
    pub(super) fn widths(&self) -> Vec<Option<usize>> {
        self.cells
            .iter()
            .map(|slot| slot.iter().flatten().map(|cell| cell.vector.len()).next())
            .collect()
    }

    pub(super) fn all_cached(&self, input: usize) -> bool {
        let mut present = self
            .cells
            .iter()
            .filter_map(|slot| slot[input].as_ref())
            .peekable();
        present.peek().is_some() && present.all(|cell| cell.source == Source::Cached)
    }

    pub(super) fn take_named(
        &mut self,
        input: usize,
        models: &[&'static ModelSpec],
    ) -> BTreeMap<String, Vec<f32>> {
        models
            .iter()
            .zip(&mut self.cells)
            .filter_map(|(spec, slot)| {
                slot[input]
                    .take()
                    .map(|cell| (spec.name.to_string(), cell.vector))
            })
            .collect()
    }
}
