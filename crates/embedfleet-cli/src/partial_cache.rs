//! The on-disk cache of per-model partial vectors that `embedfleet eval` and `embedfleet fusion
//! train` share: each text goes through each model once, however many runs follow.
//!
//! Why a cache: mpnet over 5,000 SciFact abstracts takes tens of minutes on a 2-core machine,
//! while training the fusion layer takes seconds per epoch; every training run and every
//! evaluation reads the same partials.
//!
//! Layout: `<dir>/<model>-<revision hash>.partials`, an append-only run of records
//! `[16-byte xxh3-128 of (input type, text)] [dim × f32 little-endian]`. Vectors are what the
//! in-process pipeline's models produce (truncated, L2-normalised, as the fleet computes them).
//! New texts are appended after every batch, so an interrupted run keeps what it computed; a
//! torn last record is dropped on open. A new checkpoint revision gets a new file.
//!
//! Where missing partials come from ([`PartialSource`]): the models loaded in this process, or
//! a running fleet (`--nats-url`, `partial_fleet.rs`), whose workers' vectors are the same and
//! are filed under the revision the workers announce.

use std::collections::HashMap;
use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use embedfleet_models::{
    catalogue, Device, EmbedOptions, EmbeddingModel, ModelDtypes, ModelInput, ModelRegistry,
    ModelSpec, WeightResolver,
};
use embedfleet_proto::InputType;

use crate::partial_fleet::FleetPartials;

/// Where the vectors of texts not cached yet are computed.
pub enum PartialSource {
    /// The models, loaded here from `model_dir` (or the usual resolver) at `dtypes`.
    InProcess {
        model_dir: Option<PathBuf>,
        dtypes: ModelDtypes,
    },
    /// A running fleet's workers.
    Fleet(Box<FleetPartials>),
}

/// Texts embedded per model call while filling the cache.
const BATCH: usize = 32;

/// What computes one model's missing partials.
enum Embedder {
    Local(Arc<dyn EmbeddingModel>),
    /// The fleet, and the revision its workers announced when the cache was opened.
    Fleet {
        fleet: Arc<FleetPartials>,
        revision: String,
    },
}

/// One model's cached partials, in memory.
struct ModelPartials {
    spec: &'static ModelSpec,
    embedder: Embedder,
    path: PathBuf,
    dim: usize,
    index: HashMap<u128, usize>,
    values: Vec<f32>,
}

/// The partials of the active models (slot order), loaded from and appended to `dir`.
pub struct PartialCache {
    models: Vec<ModelPartials>,
}

fn text_key(input_type: InputType, text: &str) -> u128 {
    let mut hasher = xxhash_rust::xxh3::Xxh3::new();
    hasher.update(input_type.as_str().as_bytes());
    hasher.update(&[0]);
    hasher.update(text.as_bytes());
    hasher.digest128()
}

impl PartialCache {
    /// Opens (or creates) the cache for `model_names` (any order; slot order is restored), with
    /// missing partials computed by `source`.
    pub fn open(dir: &Path, model_names: &[String], source: PartialSource) -> anyhow::Result<Self> {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let specs = model_names
            .iter()
            .map(|name| embedfleet_models::registry::lookup(name))
            .collect::<Result<Vec<_>, _>>()?;
        let specs = catalogue::in_slot_order(specs);
        let embedders: Vec<(Embedder, usize)> = match source {
            PartialSource::InProcess { model_dir, dtypes } => {
                let registry = ModelRegistry::new(WeightResolver::from_env(model_dir), Device::Cpu)
                    .with_dtypes(dtypes);
                specs
                    .iter()
                    .map(|spec| {
                        let model = registry.get(spec.name)?;
                        let dim = model.dim();
                        Ok((Embedder::Local(model), dim))
                    })
                    .collect::<anyhow::Result<_>>()?
            }
            PartialSource::Fleet(fleet) => {
                let fleet: Arc<FleetPartials> = Arc::from(fleet);
                specs
                    .iter()
                    .map(|spec| {
                        let announcement = fleet.announcement(spec.name)?;
                        let dim = announcement.dim.with_context(|| {
                            format!(
                                "the fleet's {} worker does not announce its width: upgrade it",
                                spec.name
                            )
                        })?;
                        let fleet = fleet.clone();
                        let revision = announcement.revision;
                        Ok((Embedder::Fleet { fleet, revision }, dim))
                    })
                    .collect::<anyhow::Result<_>>()?
            }
        };
        let mut models = Vec::new();
        for (spec, (embedder, dim)) in specs.into_iter().zip(embedders) {
            let revision = xxhash_rust::xxh3::xxh3_64(embedder.revision().as_bytes());
            let path = dir.join(format!("{}-{revision:016x}.partials", spec.name));
            let (index, values) = read_records(&path, dim)?;
            models.push(ModelPartials {
                spec,
                embedder,
                path,
                dim,
                index,
                values,
            });
        }
        Ok(PartialCache { models })
    }

    pub fn specs(&self) -> Vec<&'static ModelSpec> {
        self.models.iter().map(|m| m.spec).collect()
    }

    pub fn dims(&self) -> Vec<usize> {
        self.models.iter().map(|m| m.dim).collect()
    }

    /// Embeds every text not cached yet, model by model, with progress on stderr.
    pub fn fill(
        &mut self,
        texts: &[String],
        input_type: InputType,
        label: &str,
    ) -> anyhow::Result<()> {
        for m in &mut self.models {
            let missing: Vec<&String> = {
                let mut seen = std::collections::HashSet::new();
                texts
                    .iter()
                    .filter(|t| {
                        let key = text_key(input_type, t);
                        !m.index.contains_key(&key) && seen.insert(key)
                    })
                    .collect()
            };
            if missing.is_empty() {
                continue;
            }
            m.fill(&missing, input_type, label)?;
        }
        Ok(())
    }

    /// Each text's partials, one slot per model (slot order). Every text must have been filled.
    pub fn rows(
        &self,
        texts: &[String],
        input_type: InputType,
    ) -> anyhow::Result<Vec<Vec<Vec<f32>>>> {
        texts
            .iter()
            .map(|text| {
                let key = text_key(input_type, text);
                self.models
                    .iter()
                    .map(|m| {
                        let at = *m.index.get(&key).with_context(|| {
                            format!("{}: no cached partial for {text:?}", m.spec.name)
                        })?;
                        Ok(m.values[at * m.dim..(at + 1) * m.dim].to_vec())
                    })
                    .collect()
            })
            .collect()
    }
}

impl Embedder {
    /// The weights' revision the partials are filed under.
    fn revision(&self) -> &str {
        match self {
            Embedder::Local(model) => model.revision(),
            Embedder::Fleet { revision, .. } => revision,
        }
    }
}

impl ModelPartials {
    fn fill(
        &mut self,
        texts: &[&String],
        input_type: InputType,
        label: &str,
    ) -> anyhow::Result<()> {
        let name = self.spec.name;
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.path)
            .with_context(|| format!("opening {}", self.path.display()))?;
        let start_len = file.metadata()?.len();
        let start_records = self.values.len() / self.dim;
        let mut out = std::io::BufWriter::new(file);
        let mut progress = Progress::new(format!("partials {label} {name}"), texts.len());
        let (dim, index, values) = (self.dim, &mut self.index, &mut self.values);
        let mut store = |chunk: &[&String], vectors: Vec<Vec<f32>>| -> anyhow::Result<()> {
            for (text, vector) in chunk.iter().zip(vectors) {
                anyhow::ensure!(
                    vector.len() == dim,
                    "{name}: a {}-wide vector where the cache holds {dim}-wide ones",
                    vector.len()
                );
                let key = text_key(input_type, text);
                out.write_all(&key.to_le_bytes())?;
                for v in &vector {
                    out.write_all(&v.to_le_bytes())?;
                }
                index.insert(key, values.len() / dim);
                values.extend_from_slice(&vector);
            }
            out.flush()?;
            progress.advance(chunk.len());
            Ok(())
        };
        match &self.embedder {
            Embedder::Local(model) => {
                let options = EmbedOptions {
                    input_type,
                    ..EmbedOptions::default()
                };
                for chunk in texts.chunks(BATCH) {
                    let inputs: Vec<ModelInput> = chunk
                        .iter()
                        .map(|t| ModelInput::Text((*t).clone()))
                        .collect();
                    let vectors = model.embed_batch(&inputs, &options)?;
                    store(chunk, vectors.into_iter().map(|e| e.vector).collect())?;
                }
            }
            Embedder::Fleet { fleet, revision } => {
                let filled = fleet.embed(name, texts, input_type, &mut store);
                // A lost connection fails both: report the fill's own error first.
                let now = match fleet.announcement(name) {
                    Ok(announcement) => announcement.revision,
                    Err(error) => return Err(filled.err().unwrap_or(error)),
                };
                if &now != revision {
                    // Some of what was appended may be the new weights' vectors: cut it all.
                    let file = out.into_inner().map_err(|e| e.into_error())?;
                    file.set_len(start_len)?;
                    self.index.retain(|_, &mut at| at < start_records);
                    self.values.truncate(start_records * self.dim);
                    anyhow::bail!(
                        "{name}'s revision on the fleet changed from {revision} to {now} during the fill; \
                         its vectors were dropped: run again"
                    );
                }
                filled?;
            }
        }
        progress.finish();
        Ok(())
    }
}

/// A progress line on stderr: redrawn in place on a terminal, every 15 s in a log.
struct Progress {
    label: String,
    total: usize,
    done: usize,
    started: Instant,
    last_report: Instant,
    terminal: bool,
}

impl Progress {
    fn new(label: String, total: usize) -> Self {
        Progress {
            label,
            total,
            done: 0,
            started: Instant::now(),
            last_report: Instant::now(),
            terminal: std::io::stderr().is_terminal(),
        }
    }

    fn advance(&mut self, n: usize) {
        self.done += n;
        let (done, total) = (self.done, self.total);
        if self.terminal || self.last_report.elapsed() > Duration::from_secs(15) || done == total {
            self.last_report = Instant::now();
            let rate = done as f64 / self.started.elapsed().as_secs_f64().max(1e-9);
            let eta = total.saturating_sub(done) as f64 / rate.max(1e-9);
            let line = format!(
                "{}: {done}/{total} ({rate:.1}/s, eta {eta:.0}s)",
                self.label
            );
            if self.terminal {
                eprint!("\r{line}   ");
            } else {
                eprintln!("{line}");
            }
        }
    }

    fn finish(&self) {
        if self.terminal {
            eprintln!();
        }
    }
}

/// Reads whole records; a torn tail (an interrupted append) is ignored and overwritten later.
fn read_records(path: &Path, dim: usize) -> anyhow::Result<(HashMap<u128, usize>, Vec<f32>)> {
    let bytes = match std::fs::read(path) {
        Ok(bytes) => bytes,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
        Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
    };
    let record = 16 + 4 * dim;
    let whole = bytes.len() / record;
    if whole * record != bytes.len() {
        // Drop the torn tail so appends start on a record boundary.
        let file = std::fs::OpenOptions::new().write(true).open(path)?;
        file.set_len((whole * record) as u64)?;
    }
    let mut index = HashMap::with_capacity(whole);
    let mut values = Vec::with_capacity(whole * dim);
    for r in bytes[..whole * record].chunks_exact(record) {
        let key = u128::from_le_bytes(r[..16].try_into().expect("16 bytes"));
        index.insert(key, values.len() / dim);
        values.extend(
            r[16..]
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])),
        );
    }
    Ok((index, values))
}
