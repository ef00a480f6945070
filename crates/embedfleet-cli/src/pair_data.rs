//! Labelled data for `embedfleet eval` and `embedfleet fusion train`: pair files (JSONL), BEIR
//! retrieval directories, the converters from the shared sets (STS Benchmark CSV, BEIR SciFact)
//! and the seeded held-out splits.
//!
//! Pair files, one JSON object per line:
//! - scored pairs `{"a": TEXT, "b": TEXT, "score": NUMBER}` (STS);
//! - retrieval pairs `{"query": TEXT, "positive": TEXT, "negative": TEXT?}`.
//!
//! A BEIR directory holds `corpus.jsonl` (`_id`, `title`?, `text`), `queries.jsonl` (`_id`,
//! `text`) and `qrels.tsv` (`query-id corpus-id score`, with a header line).
//!
//! Every malformed file is a [`DataError`] naming the file and line; nothing here panics on
//! input.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// Why a data file could not be used.
#[derive(Debug, thiserror::Error)]
pub enum DataError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: line {line} is not valid UTF-8")]
    NotUtf8 { path: PathBuf, line: usize },
    #[error("{path}: line {line}: {reason}")]
    BadLine {
        path: PathBuf,
        line: usize,
        reason: String,
    },
    #[error("{path}: no pairs in the file")]
    Empty { path: PathBuf },
    #[error("held-out split of {what} is empty ({total} items, fraction {fraction}): use a larger fraction or more data")]
    EmptySplit {
        what: String,
        total: usize,
        fraction: f64,
    },
    #[error("split fractions must be in [0, 1) and sum below 1, got {0}")]
    BadFraction(String),
}

/// One scored pair (STS): the gold similarity of `a` and `b`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ScoredPair {
    pub a: String,
    pub b: String,
    pub score: f64,
}

/// One retrieval pair: a query and a relevant document, optionally a hard negative.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RetrievalPair {
    pub query: String,
    pub positive: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub negative: Option<String>,
}

/// A BEIR-style retrieval set, loaded.
#[derive(Debug, Clone)]
pub struct BeirSet {
    /// `(id, text)`; text is the title and body joined, as the BEIR evaluation embeds them.
    pub corpus: Vec<(String, String)>,
    pub queries: Vec<(String, String)>,
    /// query id → document id → relevance grade (> 0 is relevant).
    pub qrels: HashMap<String, HashMap<String, u32>>,
}

fn io_error(path: &Path) -> impl Fn(std::io::Error) -> DataError + '_ {
    move |source| DataError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Non-empty lines of a text file as `(1-based line number, text)`; invalid UTF-8 is an error.
fn read_lines(path: &Path) -> Result<Vec<(usize, String)>, DataError> {
    let file = std::fs::File::open(path).map_err(io_error(path))?;
    let mut lines = Vec::new();
    for (n, bytes) in std::io::BufReader::new(file).split(b'\n').enumerate() {
        let mut bytes = bytes.map_err(io_error(path))?;
        if bytes.last() == Some(&b'\r') {
            bytes.pop();
        }
        let text = String::from_utf8(bytes).map_err(|_| DataError::NotUtf8 {
            path: path.to_path_buf(),
            line: n + 1,
        })?;
        if !text.trim().is_empty() {
            lines.push((n + 1, text));
        }
    }
    Ok(lines)
}

fn read_jsonl<T: serde::de::DeserializeOwned>(
    path: &Path,
    check: impl Fn(&T) -> Option<&'static str>,
) -> Result<Vec<T>, DataError> {
    let mut items = Vec::new();
    for (line, text) in read_lines(path)? {
        let bad = |reason: String| DataError::BadLine {
            path: path.to_path_buf(),
            line,
            reason,
        };
        let item: T = serde_json::from_str(&text).map_err(|e| bad(e.to_string()))?;
        if let Some(reason) = check(&item) {
            return Err(bad(reason.to_string()));
        }
        items.push(item);
    }
    if items.is_empty() {
        return Err(DataError::Empty {
            path: path.to_path_buf(),
        });
    }
    Ok(items)
}

/// Reads a scored-pair file; empty texts and non-finite scores are errors.
pub fn read_scored(path: &Path) -> Result<Vec<ScoredPair>, DataError> {
    read_jsonl(path, |p: &ScoredPair| {
        if p.a.is_empty() || p.b.is_empty() {
            Some("empty text")
        } else if !p.score.is_finite() {
            Some("score is not a finite number")
        } else {
            None
        }
    })
}

/// Reads a retrieval-pair file; empty texts are errors.
pub fn read_retrieval(path: &Path) -> Result<Vec<RetrievalPair>, DataError> {
    read_jsonl(path, |p: &RetrievalPair| {
        if p.query.is_empty() || p.positive.is_empty() || p.negative.as_deref() == Some("") {
            Some("empty text")
        } else {
            None
        }
    })
}

pub fn write_jsonl<T: Serialize>(path: &Path, items: &[T]) -> Result<(), DataError> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(io_error(dir))?;
    }
    let file = std::fs::File::create(path).map_err(io_error(path))?;
    let mut out = std::io::BufWriter::new(file);
    for item in items {
        // Serialising plain structs of strings and numbers cannot fail.
        serde_json::to_writer(&mut out, item).map_err(|e| DataError::Io {
            path: path.to_path_buf(),
            source: e.into(),
        })?;
        out.write_all(b"\n").map_err(io_error(path))?;
    }
    out.flush().map_err(io_error(path))
}

#[derive(Deserialize)]
struct BeirDoc {
    #[serde(rename = "_id")]
    id: String,
    #[serde(default)]
    title: String,
    text: String,
}

/// BEIR's document text: title and body joined by a space (as sentence-transformers' BEIR
/// evaluation does), cut to the first `max_words` words when given.
pub fn document_text(title: &str, body: &str, max_words: Option<usize>) -> String {
    let joined = if title.is_empty() {
        body.trim().to_string()
    } else {
        format!("{} {}", title.trim(), body.trim())
    };
    match max_words {
        Some(max) => joined
            .split_whitespace()
            .take(max)
            .collect::<Vec<_>>()
            .join(" "),
        None => joined,
    }
}

fn read_beir_docs(
    path: &Path,
    max_words: Option<usize>,
) -> Result<Vec<(String, String)>, DataError> {
    let docs: Vec<BeirDoc> = read_jsonl(path, |d: &BeirDoc| {
        (d.id.is_empty() || (d.title.is_empty() && d.text.is_empty()))
            .then_some("empty _id or text")
    })?;
    Ok(docs
        .into_iter()
        .map(|d| {
            let text = document_text(&d.title, &d.text, max_words);
            (d.id, text)
        })
        .collect())
}

/// `query-id corpus-id score` lines after a header; tab or space separated.
fn read_qrels(path: &Path) -> Result<HashMap<String, HashMap<String, u32>>, DataError> {
    let mut qrels: HashMap<String, HashMap<String, u32>> = HashMap::new();
    for (line, text) in read_lines(path)?.into_iter().skip(1) {
        let fields: Vec<&str> = text.split_whitespace().collect();
        let bad = |reason: &str| DataError::BadLine {
            path: path.to_path_buf(),
            line,
            reason: reason.to_string(),
        };
        let [query, doc, score] = fields[..] else {
            return Err(bad("expected `query-id corpus-id score`"));
        };
        let score: u32 = score.parse().map_err(|_| bad("score is not an integer"))?;
        qrels
            .entry(query.to_string())
            .or_default()
            .insert(doc.to_string(), score);
    }
    if qrels.is_empty() {
        return Err(DataError::Empty {
            path: path.to_path_buf(),
        });
    }
    Ok(qrels)
}

impl BeirSet {
    /// Loads `dir/{corpus.jsonl, queries.jsonl, qrels.tsv}`; queries without a relevant
    /// document are dropped (BEIR does the same).
    pub fn load(dir: &Path) -> Result<BeirSet, DataError> {
        BeirSet::load_files(
            &dir.join("corpus.jsonl"),
            &dir.join("queries.jsonl"),
            &dir.join("qrels.tsv"),
            None,
        )
    }

    pub fn load_files(
        corpus: &Path,
        queries: &Path,
        qrels: &Path,
        max_doc_words: Option<usize>,
    ) -> Result<BeirSet, DataError> {
        let corpus_docs = read_beir_docs(corpus, max_doc_words)?;
        let qrels = read_qrels(qrels)?;
        let queries: Vec<(String, String)> = read_beir_docs(queries, None)?
            .into_iter()
            .filter(|(id, _)| qrels.get(id).is_some_and(|r| r.values().any(|&g| g > 0)))
            .collect();
        if queries.is_empty() {
            return Err(DataError::Empty {
                path: queries_path_hint(corpus),
            });
        }
        Ok(BeirSet {
            corpus: corpus_docs,
            queries,
            qrels,
        })
    }
}

fn queries_path_hint(corpus: &Path) -> PathBuf {
    corpus.with_file_name("queries.jsonl (no query has a relevant document)")
}

/// A stable pseudo-random rank of `key` under `seed`: the split does not depend on file order
/// or platform.
fn split_rank(seed: u64, key: &str) -> u64 {
    xxhash_rust::xxh3::xxh3_64_with_seed(key.as_bytes(), seed)
}

/// Splits `items` into parts with the given fractions of the whole (the rest is the first
/// part), deterministically by `seed` and each item's key. Every later part must be non-empty.
pub fn seeded_split<T: Clone>(
    items: &[T],
    key: impl Fn(&T) -> String,
    fractions: &[f64],
    seed: u64,
    what: &str,
) -> Result<Vec<Vec<T>>, DataError> {
    let total: f64 = fractions.iter().sum();
    if fractions.iter().any(|f| !(0.0..1.0).contains(f)) || total >= 1.0 {
        return Err(DataError::BadFraction(format!("{fractions:?}")));
    }
    let mut order: Vec<(u64, usize)> = items
        .iter()
        .enumerate()
        .map(|(i, item)| (split_rank(seed, &key(item)), i))
        .collect();
    order.sort_unstable();
    let mut parts = vec![Vec::new(); fractions.len() + 1];
    let mut at = 0;
    for (p, &fraction) in fractions.iter().enumerate() {
        let count = (fraction * items.len() as f64).round() as usize;
        if count == 0 {
            return Err(DataError::EmptySplit {
                what: what.to_string(),
                total: items.len(),
                fraction,
            });
        }
        parts[p + 1] = order[at..at + count]
            .iter()
            .map(|&(_, i)| items[i].clone())
            .collect();
        at += count;
    }
    parts[0] = order[at..].iter().map(|&(_, i)| items[i].clone()).collect();
    Ok(parts)
}

/// At most `max` of `items`, evenly spaced (item `⌊j·n/max⌋` for `j < max`), in their order.
/// Deterministic and reproducible by hand: the split before it already shuffled by seed.
pub fn even_sample<T: Clone>(items: &[T], max: usize) -> Vec<T> {
    let n = items.len();
    if max >= n {
        return items.to_vec();
    }
    (0..max).map(|j| items[j * n / max].clone()).collect()
}

/// The corpus cut to at most `max` documents: every document relevant to one of the set's
/// queries, then an even sample of the rest (corpus order is kept).
pub fn corpus_sample(set: &BeirSet, max: usize) -> Vec<(String, String)> {
    let relevant: HashSet<&str> = set
        .queries
        .iter()
        .filter_map(|(q, _)| set.qrels.get(q))
        .flat_map(|docs| docs.iter().filter(|(_, &g)| g > 0).map(|(d, _)| d.as_str()))
        .collect();
    let others: Vec<&(String, String)> = set
        .corpus
        .iter()
        .filter(|(id, _)| !relevant.contains(id.as_str()))
        .collect();
    let room = max.saturating_sub(relevant.len());
    let chosen: HashSet<&str> = even_sample(&others, room)
        .into_iter()
        .map(|(id, _)| id.as_str())
        .collect();
    set.corpus
        .iter()
        .filter(|(id, _)| relevant.contains(id.as_str()) || chosen.contains(id.as_str()))
        .cloned()
        .collect()
}

/// STS Benchmark CSV (no header: sentence1, sentence2, score 0–5; fields may be quoted) →
/// scored pairs.
pub fn read_sts_csv(path: &Path) -> Result<Vec<ScoredPair>, DataError> {
    let mut pairs = Vec::new();
    for (line, text) in read_lines(path)? {
        let bad = |reason: &str| DataError::BadLine {
            path: path.to_path_buf(),
            line,
            reason: reason.to_string(),
        };
        let fields = split_csv(&text).ok_or_else(|| bad("unbalanced quotes"))?;
        let [a, b, score] = &fields[..] else {
            return Err(bad("expected 3 fields: sentence1, sentence2, score"));
        };
        let score: f64 = score
            .trim()
            .parse()
            .map_err(|_| bad("score is not a number"))?;
        if a.is_empty() || b.is_empty() || !score.is_finite() {
            return Err(bad("empty sentence or non-finite score"));
        }
        pairs.push(ScoredPair {
            a: a.clone(),
            b: b.clone(),
            score,
        });
    }
    if pairs.is_empty() {
        return Err(DataError::Empty {
            path: path.to_path_buf(),
        });
    }
    Ok(pairs)
}

/// One CSV record (RFC 4180 quoting, `""` inside quotes); `None` on an unterminated quote.
fn split_csv(line: &str) -> Option<Vec<String>> {
    let mut fields = Vec::new();
    let mut field = String::new();
    let mut chars = line.chars().peekable();
    let mut quoted = false;
    while let Some(c) = chars.next() {
        match (quoted, c) {
            (true, '"') if chars.peek() == Some(&'"') => {
                chars.next();
                field.push('"');
            }
            (true, '"') => quoted = false,
            (false, '"') if field.is_empty() => quoted = true,
            (false, ',') => fields.push(std::mem::take(&mut field)),
            (_, c) => field.push(c),
        }
    }
    if quoted {
        return None;
    }
    fields.push(field);
    Some(fields)
}

/// Writes a BEIR directory with the given queries (and their qrels) over `corpus`.
pub fn write_beir(
    dir: &Path,
    corpus: &[(String, String)],
    queries: &[(String, String)],
    qrels: &HashMap<String, HashMap<String, u32>>,
) -> Result<(), DataError> {
    #[derive(Serialize)]
    struct Doc<'a> {
        #[serde(rename = "_id")]
        id: &'a str,
        text: &'a str,
    }
    let docs: Vec<Doc> = corpus.iter().map(|(id, text)| Doc { id, text }).collect();
    write_jsonl(&dir.join("corpus.jsonl"), &docs)?;
    let qs: Vec<Doc> = queries.iter().map(|(id, text)| Doc { id, text }).collect();
    write_jsonl(&dir.join("queries.jsonl"), &qs)?;
    let path = dir.join("qrels.tsv");
    let mut out = String::from("query-id\tcorpus-id\tscore\n");
    for (query, _) in queries {
        let ordered: BTreeMap<&String, &u32> = qrels[query].iter().collect();
        for (doc, score) in ordered {
            out.push_str(&format!("{query}\t{doc}\t{score}\n"));
        }
    }
    std::fs::write(&path, out).map_err(io_error(&path))
}

/// Retrieval pairs from queries and qrels: one pair per relevant (query, document).
pub fn retrieval_pairs(set: &BeirSet, queries: &[(String, String)]) -> Vec<RetrievalPair> {
    let docs: HashMap<&str, &str> = set
        .corpus
        .iter()
        .map(|(id, text)| (id.as_str(), text.as_str()))
        .collect();
    let mut pairs = Vec::new();
    for (qid, text) in queries {
        let ordered: BTreeMap<&String, &u32> = set.qrels[qid].iter().collect();
        for (doc, &grade) in ordered {
            if let (true, Some(positive)) = (grade > 0, docs.get(doc.as_str())) {
                pairs.push(RetrievalPair {
                    query: text.clone(),
                    positive: positive.to_string(),
                    negative: None,
                });
            }
        }
    }
    pairs
}

/// Distinct texts in first-seen order (what the partial cache is asked for).
pub fn distinct<'a>(texts: impl IntoIterator<Item = &'a str>) -> Vec<String> {
    let mut seen = HashSet::new();
    texts
        .into_iter()
        .filter(|t| seen.insert(*t))
        .map(str::to_string)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn csv_fields_follow_rfc_4180_quoting() {
        assert_eq!(
            split_csv(r#"a,"b, c",3.5"#).unwrap(),
            vec!["a", "b, c", "3.5"]
        );
        assert_eq!(split_csv(r#""say ""hi""",x,1"#).unwrap()[0], r#"say "hi""#);
        assert!(split_csv(r#""open,x,1"#).is_none());
    }

    #[test]
    fn split_is_deterministic_disjoint_and_refuses_an_empty_part() {
        let items: Vec<u32> = (0..100).collect();
        let a = seeded_split(&items, |i| i.to_string(), &[0.1, 0.2], 7, "x").unwrap();
        let b = seeded_split(&items, |i| i.to_string(), &[0.1, 0.2], 7, "x").unwrap();
        assert_eq!(a, b);
        assert_eq!((a[0].len(), a[1].len(), a[2].len()), (70, 10, 20));
        let all: HashSet<u32> = a.iter().flatten().copied().collect();
        assert_eq!(all.len(), 100);
        let other = seeded_split(&items, |i| i.to_string(), &[0.1, 0.2], 8, "x").unwrap();
        assert_ne!(a[1], other[1]);
        assert!(matches!(
            seeded_split(&items[..3], |i| i.to_string(), &[0.1], 7, "x"),
            Err(DataError::EmptySplit { .. })
        ));
        assert!(matches!(
            seeded_split(&items, |i| i.to_string(), &[0.6, 0.5], 7, "x"),
            Err(DataError::BadFraction(_))
        ));
    }

    #[test]
    fn document_text_joins_title_and_cuts_words() {
        assert_eq!(document_text("T", " one two  three ", Some(3)), "T one two");
        assert_eq!(document_text("", "x y", None), "x y");
    }
}
