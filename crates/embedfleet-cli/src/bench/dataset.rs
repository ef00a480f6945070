//! The harness's requests: a deterministic synthetic tier (`small`, `medium`), or a trace of
//! real requests (`--trace FILE`, JSONL, one embed.v1 request per line) that replaces it.
//!
//! Synthetic texts are built from a fixed vocabulary with a fixed seed, so every run of a tier
//! sends the same texts (the warm mode relies on it, and runs stay comparable). Lengths are
//! mixed the way search traffic is: mostly short queries, some paragraphs, a few long passages
//! that reach the models' truncation limit. Text only: the models in the fleet today take text;
//! other modalities come in through a trace.

use std::io::BufRead;
use std::path::Path;

use anyhow::{bail, Context};
use embedfleet_proto::{EmbedRequest, TextInput};

/// Lines read from a trace at most: a trace is replayed from memory.
const MAX_TRACE_REQUESTS: usize = 1_000_000;

/// A named synthetic dataset and the load the tier runs by default.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Tier {
    /// 64 texts, one model (minilm): seconds on a laptop, what CI runs.
    Small,
    /// 1,024 texts with long passages, minilm + mpnet: minutes, for sizing.
    Medium,
}

/// Defaults a tier gives every flag the command line leaves out.
pub struct TierDefaults {
    pub texts: usize,
    pub seed: u64,
    pub models: &'static str,
    pub concurrency: &'static [usize],
    pub batch: &'static [usize],
    pub requests: u64,
    pub warmup: u64,
}

impl Tier {
    pub fn name(self) -> &'static str {
        match self {
            Tier::Small => "small",
            Tier::Medium => "medium",
        }
    }

    pub fn defaults(self) -> TierDefaults {
        match self {
            Tier::Small => TierDefaults {
                texts: 64,
                seed: 0x5EED_0001,
                models: "minilm",
                concurrency: &[1, 4],
                batch: &[1, 8],
                requests: 40,
                warmup: 4,
            },
            Tier::Medium => TierDefaults {
                texts: 1024,
                seed: 0x5EED_0002,
                models: "minilm,mpnet",
                concurrency: &[1, 4, 16],
                batch: &[1, 8, 32],
                requests: 200,
                warmup: 16,
            },
        }
    }
}

/// Where a run's requests come from.
pub enum Dataset {
    /// Texts, `batch` consecutive ones per request, all with the run's models.
    Synthetic {
        name: String,
        texts: Vec<String>,
        models: Vec<String>,
    },
    /// Recorded requests, sent as they are (their own inputs, models and options).
    Trace {
        name: String,
        requests: Vec<EmbedRequest>,
    },
}

impl Dataset {
    pub fn synthetic(tier: Tier, models: Vec<String>, seed: Option<u64>) -> Dataset {
        let defaults = tier.defaults();
        Dataset::Synthetic {
            name: tier.name().to_string(),
            texts: synthetic_texts(defaults.texts, seed.unwrap_or(defaults.seed)),
            models,
        }
    }

    /// Reads a JSONL trace; a bad line fails the run with its line number, before any load.
    pub fn trace(path: &Path) -> anyhow::Result<Dataset> {
        let file = std::fs::File::open(path)
            .with_context(|| format!("cannot open the trace {}", path.display()))?;
        let mut requests = Vec::new();
        for (n, line) in std::io::BufReader::new(file).lines().enumerate() {
            let line = line.with_context(|| format!("{}: line {}", path.display(), n + 1))?;
            if line.trim().is_empty() {
                continue;
            }
            if requests.len() == MAX_TRACE_REQUESTS {
                bail!(
                    "{}: more than {MAX_TRACE_REQUESTS} requests; split the trace",
                    path.display()
                );
            }
            let request: EmbedRequest = serde_json::from_str(&line).with_context(|| {
                format!(
                    "{}: line {} is not an embed.v1 request",
                    path.display(),
                    n + 1
                )
            })?;
            requests.push(request);
        }
        if requests.is_empty() {
            bail!("{}: the trace has no requests", path.display());
        }
        let name = path
            .file_name()
            .map(|n| format!("trace:{}", n.to_string_lossy()))
            .unwrap_or_else(|| "trace".to_string());
        Ok(Dataset::Trace { name, requests })
    }

    pub fn name(&self) -> &str {
        match self {
            Dataset::Synthetic { name, .. } | Dataset::Trace { name, .. } => name,
        }
    }

    /// Texts (synthetic) or requests (trace) in the set.
    pub fn len(&self) -> usize {
        match self {
            Dataset::Synthetic { texts, .. } => texts.len(),
            Dataset::Trace { requests, .. } => requests.len(),
        }
    }

    /// Request `n` of a load point at `batch` inputs (ignored for a trace). With a `salt`
    /// (cold mode), every text gets the salt and its place appended, so no cache in the fleet
    /// has seen it: the request costs what a miss costs, even against a fleet that ran this
    /// tier before.
    pub fn request(&self, n: u64, batch: usize, salt: Option<&str>) -> EmbedRequest {
        match self {
            Dataset::Synthetic { texts, models, .. } => {
                let start = n as usize * batch;
                let batch_texts = (0..batch).map(|i| {
                    let text = &texts[(start + i) % texts.len()];
                    salted(text, salt, n, i)
                });
                EmbedRequest::texts(batch_texts.collect::<Vec<_>>()).with_models(models)
            }
            Dataset::Trace { requests, .. } => {
                let mut request = requests[n as usize % requests.len()].clone();
                if let (Some(_), Some(input)) = (salt, &mut request.input) {
                    let texts = input.as_slice().iter().enumerate();
                    let salted_texts = texts.map(|(i, t)| salted(t, salt, n, i)).collect();
                    *input = TextInput::Many(salted_texts);
                }
                request
            }
        }
    }
}

/// Inputs in a request: what throughput counts.
pub fn items(request: &EmbedRequest) -> usize {
    match (&request.input, &request.inputs) {
        (Some(input), _) => input.as_slice().len(),
        (None, Some(items)) => items.len(),
        (None, None) => 0,
    }
}

fn salted(text: &str, salt: Option<&str>, request: u64, input: usize) -> String {
    match salt {
        Some(salt) => format!("{text} [{salt} {request}.{input}]"),
        None => text.to_string(),
    }
}

/// `count` texts from `seed`: 60 % short (4–16 words), 30 % medium (17–64), 10 % long
/// (65–320, past the 256-token limit of minilm and mpnet, so truncation is exercised).
pub fn synthetic_texts(count: usize, seed: u64) -> Vec<String> {
    let mut rng = SplitMix(seed);
    (0..count)
        .map(|_| {
            let words = match rng.below(10) {
                0..=5 => 4 + rng.below(13),
                6..=8 => 17 + rng.below(48),
                _ => 65 + rng.below(256),
            };
            let mut text = String::new();
            for w in 0..words {
                if w > 0 {
                    text.push(' ');
                }
                text.push_str(VOCABULARY[rng.below(VOCABULARY.len())]);
            }
            text.push('.');
            text
        })
        .collect()
}

/// splitmix64: tiny, fast, and the same numbers on every platform.
struct SplitMix(u64);

impl SplitMix {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

/// Everyday English words, some long and rare, so the tokenizer splits some into word pieces.
const VOCABULARY: [&str; 96] = [
    "the",
    "of",
    "and",
    "to",
    "in",
    "is",
    "for",
    "on",
    "with",
    "that",
    "by",
    "from",
    "at",
    "as",
    "an",
    "be",
    "this",
    "which",
    "or",
    "are",
    "was",
    "it",
    "not",
    "but",
    "have",
    "new",
    "more",
    "data",
    "model",
    "search",
    "query",
    "document",
    "embedding",
    "vector",
    "server",
    "network",
    "latency",
    "throughput",
    "cluster",
    "storage",
    "memory",
    "request",
    "reply",
    "customer",
    "invoice",
    "payment",
    "shipping",
    "warehouse",
    "quarterly",
    "revenue",
    "growth",
    "market",
    "museum",
    "sculpture",
    "orchestra",
    "symphony",
    "river",
    "mountain",
    "weather",
    "forecast",
    "recipe",
    "flour",
    "butter",
    "kitchen",
    "engine",
    "filter",
    "mechanic",
    "flight",
    "airport",
    "delay",
    "password",
    "account",
    "settings",
    "privacy",
    "photosynthesis",
    "chlorophyll",
    "glucose",
    "molecule",
    "protein",
    "kubernetes",
    "deployment",
    "replica",
    "autoscaling",
    "observability",
    "transformer",
    "attention",
    "tokenizer",
    "multilingual",
    "retrieval",
    "ranking",
    "relevance",
    "benchmark",
    "regression",
    "percentile",
    "distribution",
    "uncharacteristically",
];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_tier_is_the_same_texts_every_run_with_mixed_lengths() {
        let a = synthetic_texts(200, 7);
        assert_eq!(a, synthetic_texts(200, 7));
        assert_ne!(a, synthetic_texts(200, 8));
        let words: Vec<usize> = a.iter().map(|t| t.split(' ').count()).collect();
        assert!(words.iter().any(|&w| w <= 16), "short texts");
        assert!(
            words.iter().any(|&w| (17..=64).contains(&w)),
            "medium texts"
        );
        assert!(words.iter().any(|&w| w > 64), "long texts");
    }

    #[test]
    fn cold_requests_are_unique_warm_requests_repeat() {
        let data = Dataset::synthetic(Tier::Small, vec!["minilm".into()], None);
        let texts = |r: &EmbedRequest| r.input.as_ref().unwrap().as_slice().to_vec();
        let warm = data.request(3, 4, None);
        assert_eq!(warm, data.request(3, 4, None));
        assert_eq!(items(&warm), 4);
        assert_eq!(warm.models.as_deref(), Some(&["minilm".to_string()][..]));
        // Request 16 at batch 4 wraps around to the first texts of the 64.
        assert_eq!(
            texts(&data.request(16, 4, None)),
            texts(&data.request(0, 4, None))
        );
        let cold = texts(&data.request(16, 4, Some("r1")));
        assert_ne!(cold, texts(&data.request(0, 4, Some("r1"))));
        assert!(cold[0].ends_with("[r1 16.0]"), "{cold:?}");
    }

    #[test]
    fn a_trace_replays_its_requests_and_names_a_bad_line() {
        let dir = tempfile::tempdir().expect("tempdir");
        let good = dir.path().join("good.jsonl");
        std::fs::write(
            &good,
            "{\"input\":\"hello\"}\n\n{\"input\":[\"a\",\"b\"],\"models\":[\"minilm\"]}\n",
        )
        .expect("write");
        let trace = Dataset::trace(&good).expect("trace");
        assert_eq!((trace.len(), trace.name()), (2, "trace:good.jsonl"));
        assert_eq!(items(&trace.request(1, 99, None)), 2);
        assert_eq!(trace.request(2, 1, None), trace.request(0, 1, None));
        let salted = trace.request(0, 1, Some("s"));
        assert_eq!(
            salted.input,
            Some(TextInput::Many(vec!["hello [s 0.0]".into()]))
        );

        let bad = dir.path().join("bad.jsonl");
        std::fs::write(&bad, "{\"input\":\"ok\"}\n{\"input\":3}\n").expect("write");
        let error = Dataset::trace(&bad).err().expect("bad line").to_string();
        assert!(error.contains("line 2"), "{error}");
    }
}
