#!/usr/bin/env python3
"""Reference embeddings for the real-weight tests of embedfleet-models.

Runs sentence-transformers on the same local checkpoints the Rust code loads (models/minilm and
models/mpnet, from scripts/fetch-models.sh) and writes
crates/embedfleet-models/tests/fixtures/reference_embeddings.json:

    {"generator": {"sentence_transformers": ..., "torch": ..., "transformers": ...},
     "inputs": [...],
     "models": {"minilm": {"dim": 384, "max_seq_length": 256,
                           "token_counts": [...], "embeddings": [[...], ...]},
                "mpnet":  {...}}}

Embeddings are L2-normalised (normalize_embeddings=True) and rounded to 7 significant digits.
token_counts are the tokens each input keeps after truncation to max_seq_length, special tokens
included (from model.tokenize), so the Rust tokenizer can be checked on its own.

Environment (once, from the repo root; .venv* is git-ignored):

    python3 -m venv .venv-ref && .venv-ref/bin/pip install sentence-transformers torch
    scripts/fetch-models.sh
    .venv-ref/bin/python scripts/make-reference-fixtures.py

The inputs are the list below, so the fixture can be regenerated; change the list, rerun, and
commit the script and the fixture together.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = ROOT / "crates/embedfleet-models/tests/fixtures/reference_embeddings.json"
MODELS = ("minilm", "mpnet")

# --- long inputs: each is well past 512 tokens, so truncation (256 for minilm, 384 for mpnet) is
# exercised and the tail of the text must make no difference.

LONG_PROSE = (
    "The history of distributed computing is, in large part, a history of learning to live with "
    "partial failure. A single machine either works or it does not; a fleet of machines is almost "
    "always partly broken. Messages arrive late, twice, or never. Clocks drift. A process that "
    "looks dead may merely be slow, and a process that looks alive may be stuck in a loop that "
    "will never finish. Early systems tried to hide all of this behind the illusion of a single "
    "computer, and they were fragile precisely because the illusion broke in ways nobody had "
    "planned for. Later designs took the opposite view: make failure ordinary, expected, and "
    "cheap. Work is acknowledged only after it is done, so that a crash causes a retry rather "
    "than a loss. Results are keyed by their content, so that doing the same work twice is "
    "harmless. Queues are bounded, so that a surge of requests turns into back-pressure instead "
    "of an out-of-memory kill. "
    "Embedding services inherit every one of these concerns and add a few of their own. A "
    "transformer forward pass is expensive and its cost grows with the length of the input, so a "
    "scheduler has to batch requests by token count rather than by number of requests. Models "
    "differ in size by two orders of magnitude: a six-layer encoder with twenty-two million "
    "parameters answers in a few milliseconds on a laptop, while a seven-billion-parameter "
    "decoder needs a data-centre accelerator and still takes a noticeable fraction of a second. "
    "Placing those models on devices is a bin-packing problem with memory as the bin and "
    "latency as the penalty for getting it wrong. "
    "Caching helps more than one might expect. Real traffic is repetitive: the same product "
    "titles, the same support questions, the same boilerplate paragraphs at the top of every "
    "document. A content-addressed cache in front of the fleet turns those repeats into a hash "
    "lookup and a network round trip. The cache must, however, be honest about what it stores: "
    "a vector produced by one version of a model is not interchangeable with a vector produced "
    "by another, and the key has to say so. "
    "Finally, there is the question of measurement. A benchmark that reports only the best case "
    "misleads; one that reports only throughput hides the tail latency that users actually feel. "
    "Good reports give the median and the ninety-ninth percentile, the batch size, the number of "
    "threads, and the load on the machine at the time, so that someone else can reproduce the "
    "figures or at least understand why theirs differ. Without that context a number is an "
    "anecdote, and anecdotes are a poor foundation for capacity planning."
)

LONG_RUST = '''\
//! A bounded, token-budgeted batch queue.
use std::collections::VecDeque;
use std::time::{Duration, Instant};

/// One request waiting for a forward pass.
#[derive(Debug)]
pub struct Entry {
    pub id: u64,
    pub tokens: usize,
    pub enqueued_at: Instant,
}

/// Fills batches up to a token budget; never holds more than `capacity` entries.
pub struct BatchQueue {
    entries: VecDeque<Entry>,
    capacity: usize,
    max_batch_tokens: usize,
    max_wait: Duration,
}

#[derive(Debug, thiserror::Error)]
pub enum QueueError {
    #[error("queue is full ({0} entries)")]
    Full(usize),
    #[error("entry of {tokens} tokens exceeds the batch budget of {budget}")]
    TooLarge { tokens: usize, budget: usize },
}

impl BatchQueue {
    pub fn new(capacity: usize, max_batch_tokens: usize, max_wait: Duration) -> Self {
        Self { entries: VecDeque::with_capacity(capacity), capacity, max_batch_tokens, max_wait }
    }

    pub fn push(&mut self, entry: Entry) -> Result<(), QueueError> {
        if entry.tokens > self.max_batch_tokens {
            return Err(QueueError::TooLarge { tokens: entry.tokens, budget: self.max_batch_tokens });
        }
        if self.entries.len() >= self.capacity {
            return Err(QueueError::Full(self.capacity));
        }
        self.entries.push_back(entry);
        Ok(())
    }

    /// A batch is ready when the budget is reached or the oldest entry has waited long enough.
    pub fn ready(&self, now: Instant) -> bool {
        let queued: usize = self.entries.iter().map(|e| e.tokens).sum();
        queued >= self.max_batch_tokens
            || self.entries.front().is_some_and(|e| now.duration_since(e.enqueued_at) >= self.max_wait)
    }

    pub fn next_batch(&mut self) -> Vec<Entry> {
        let mut batch = Vec::new();
        let mut used = 0usize;
        while let Some(front) = self.entries.front() {
            if used + front.tokens > self.max_batch_tokens && !batch.is_empty() {
                break;
            }
            used += front.tokens;
            batch.extend(self.entries.pop_front());
        }
        batch
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn respects_the_token_budget() {
        let mut q = BatchQueue::new(8, 100, Duration::from_millis(5));
        let now = Instant::now();
        for id in 0..4 {
            q.push(Entry { id, tokens: 40, enqueued_at: now }).unwrap();
        }
        assert!(q.ready(now));
        assert_eq!(q.next_batch().len(), 2);
        assert_eq!(q.next_batch().len(), 2);
        assert!(q.next_batch().is_empty());
    }
}
'''

LONG_MULTILINGUAL = (
    "分布式系统中的每一个组件都可能在任何时候失败，因此设计者必须假设网络会丢失消息、重复消息或延迟消息。"
    "向量嵌入服务把文本转换成固定长度的数字表示，用于语义搜索、聚类和推荐。"
    "为了降低延迟，服务会把多个请求合并成一个批次，并根据词元数量而不是请求数量来限制批次大小。"
    "缓存可以避免重复计算，但缓存的键必须包含模型的名称和版本。"
    "在只有两个处理器核心的机器上，单个请求的延迟和批量吞吐量之间需要权衡。"
    "测试应当使用真实的消息服务器和真实的缓存服务器，而不是模拟对象。"
    "当工作进程在处理批次的过程中被终止时，未确认的任务会被重新投递，因此不会丢失任何结果。"
    "Распределённая система должна продолжать работу, даже если часть узлов недоступна. "
    "Векторные представления текста позволяют искать документы по смыслу, а не по совпадению слов. "
    "Очередь задач ограничена по размеру, чтобы всплеск запросов превращался в обратное давление. "
    "नमस्ते, यह एक लंबा हिंदी अनुच्छेद है जो यह जाँचने के लिए लिखा गया है कि मॉडल लंबे इनपुट को "
    "कैसे काटता है और देवनागरी लिपि को टोकन में कैसे बदलता है। "
    "これは長い日本語の文章で、モデルが入力を最大長で切り詰めることを確認するために書かれています。"
    "埋め込みベクトルは意味検索やクラスタリングに使われます。"
    "هذه فقرة عربية طويلة تهدف إلى اختبار كيفية تقسيم النص إلى رموز وكيفية قطع المدخلات الطويلة "
    "عند الحد الأقصى لطول النموذج."
)

# Order is part of the fixture: tests index into it.
INPUTS: list[str] = [
    # short
    "Hello, world!",
    "a",
    "The quick brown fox jumps over the lazy dog.",
    "How do I reset my password?",
    # medium
    "Embedding models map sentences with similar meanings to nearby points in a vector space, "
    "which makes semantic search possible without keyword overlap.",
    "The coordinator splits each request into one job per model, publishes the jobs to a "
    "JetStream work queue, and waits for the partial embeddings before fusing them.",
    "She sells seashells by the seashore, and the shells she sells are surely seashells.",
    # mixed case, punctuation, whitespace, accents
    "WHY is THIS sentence ShOuTiNg?!?! ... (nobody knows) -- [citation needed]; {really}.",
    "  leading spaces, trailing spaces,\ttabs\tand\nnewlines  \n",
    "Café, naïve, résumé, Zürich, São Paulo, Ångström, façade, jalapeño.",
    "e-mail: someone@example.com, url: https://example.org/a/b?c=1&d=2#frag, path: /usr/local/bin",
    # numbers
    "In 2023, revenue grew 17.5% to $4,321,987.65, up from 3.14e6 in 2022 (±0.5%).",
    "Call +1 (555) 010-9999 before 23:59 on 2024-02-29; order #00042, PIN 8675309.",
    # emoji
    "I love this! 😍🔥🚀 Best day ever 🎉🎉🎉",
    "👍",
    "Weather today: ☀️ then 🌧️, 12°C → 7°C. Don't forget your ☂!",
    # non-Latin scripts
    "今天天气很好，我们去公园散步吧。",
    "مرحبا بكم في عالم تعلم الآلة ومعالجة اللغات الطبيعية.",
    "Москва — столица России, крупнейший город страны.",
    "मुझे हिंदी में किताबें पढ़ना बहुत पसंद है।",
    "東京は日本の首都であり、世界最大の都市圏の一つです。",
    # code
    'fn main() {\n    let v: Vec<u32> = (1..=10).filter(|x| x % 2 == 0).collect();\n    println!("{v:?}");\n}',
    "def fib(n: int) -> int:\n    return n if n < 2 else fib(n - 1) + fib(n - 2)\n",
    "SELECT u.id, COUNT(o.id) AS orders FROM users u LEFT JOIN orders o ON o.user_id = u.id "
    "WHERE u.created_at >= '2024-01-01' GROUP BY u.id HAVING COUNT(o.id) > 3 ORDER BY orders DESC;",
    # long: past 512 tokens
    LONG_PROSE,
    LONG_RUST,
    LONG_MULTILINGUAL,
]


def round_sig(x: float, digits: int = 7) -> float:
    return float(f"{x:.{digits}g}")


def dump(fixture: dict) -> str:
    """Pretty JSON with each embedding kept on one line, so the file diffs sensibly."""
    rows: dict[str, list[float]] = {}
    shaped = json.loads(json.dumps(fixture))
    for name, model in shaped["models"].items():
        placeholders = []
        for i, row in enumerate(model["embeddings"]):
            key = f"@@{name}:{i}@@"
            rows[key] = row
            placeholders.append(key)
        model["embeddings"] = placeholders
    text = json.dumps(shaped, indent=2, ensure_ascii=False)
    for key, row in rows.items():
        text = text.replace(f'"{key}"', json.dumps(row, separators=(",", ":")), 1)
    return text + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--models-dir",
        type=Path,
        default=Path(os.environ.get("EMBEDFLEET_MODELS_DIR", ROOT / "models")),
        help="directory holding minilm/ and mpnet/ (default: $EMBEDFLEET_MODELS_DIR or models/)",
    )
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args()

    for name in MODELS:
        if not (args.models_dir / name / "model.safetensors").is_file():
            sys.exit(f"error: {args.models_dir / name} has no checkpoint; run scripts/fetch-models.sh")

    import sentence_transformers
    import torch
    import transformers
    from sentence_transformers import SentenceTransformer

    torch.manual_seed(0)
    fixture: dict = {
        "generator": {
            "sentence_transformers": sentence_transformers.__version__,
            "torch": torch.__version__,
            "transformers": transformers.__version__,
        },
        "inputs": INPUTS,
        "models": {},
    }
    for name in MODELS:
        print(f"{name}: loading", file=sys.stderr)
        model = SentenceTransformer(str(args.models_dir / name), device="cpu")
        features = model.tokenize(INPUTS)
        token_counts = [int(n) for n in features["attention_mask"].sum(dim=1)]
        print(f"{name}: encoding {len(INPUTS)} inputs", file=sys.stderr)
        embeddings = model.encode(INPUTS, normalize_embeddings=True, convert_to_numpy=True)
        fixture["models"][name] = {
            "dim": int(embeddings.shape[1]),
            "max_seq_length": int(model.max_seq_length),
            "token_counts": token_counts,
            "embeddings": [[round_sig(float(x)) for x in row] for row in embeddings],
        }
        print(f"{name}: dim {embeddings.shape[1]}, token counts {token_counts}", file=sys.stderr)

    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(dump(fixture), encoding="utf-8")
    print(f"wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
