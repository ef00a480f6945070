#!/usr/bin/env python3
"""Python side of the side-by-side benchmark: sentence-transformers on CPU.

Measures, for minilm and mpnet on the local checkpoints (scripts/fetch-models.sh), with the same
sentences the criterion benches read (benches/data/sentences.txt):

  - single-input latency: median wall time of encode([s]) over --single-runs calls, cycling
    through the sentences;
  - batch-32 throughput: the first 32 sentences in one encode(batch_size=32) call, median of
    --batch-runs calls, reported as sentences per second.

Prints a table to stdout, then one JSON line (the last line of stdout) that a
script can combine with criterion's output. Progress goes to stderr.

Environment (once, from the repo root; .venv* is git-ignored):

    python3 -m venv .venv-ref && .venv-ref/bin/pip install sentence-transformers torch
    scripts/fetch-models.sh
    .venv-ref/bin/python scripts/bench-sentence-transformers.py --threads 2

Run it with nothing else heavy on the machine; the JSON records the load average at the start.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MODELS = ("minilm", "mpnet")
BATCH = 32


def progress(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="torch.set_num_threads (default: all cores)")
    parser.add_argument(
        "--models-dir",
        type=Path,
        default=Path(os.environ.get("EMBEDFLEET_MODELS_DIR", ROOT / "models")),
    )
    parser.add_argument("--sentences", type=Path, default=ROOT / "benches/data/sentences.txt")
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    parser.add_argument("--single-runs", type=int, default=50, help="encode([s]) calls per model (>= 30)")
    parser.add_argument("--batch-runs", type=int, default=10, help="batch-32 calls per model (>= 10)")
    parser.add_argument("--warmup", type=int, default=5, help="untimed single and batch calls per model")
    args = parser.parse_args()

    sentences = [line.strip() for line in args.sentences.read_text(encoding="utf-8").splitlines() if line.strip()]
    if len(sentences) < BATCH:
        sys.exit(f"error: {args.sentences} has {len(sentences)} sentences, need at least {BATCH}")
    for name in args.models:
        if not (args.models_dir / name / "model.safetensors").is_file():
            sys.exit(f"error: {args.models_dir / name} has no checkpoint; run scripts/fetch-models.sh")

    import sentence_transformers
    import torch
    from sentence_transformers import SentenceTransformer

    torch.set_num_threads(args.threads)
    load = os.getloadavg()
    progress(f"torch {torch.__version__}, {torch.get_num_threads()} threads, load average {load[0]:.2f}")

    batch = sentences[:BATCH]
    results = {}
    for name in args.models:
        progress(f"{name}: loading")
        model = SentenceTransformer(str(args.models_dir / name), device="cpu")
        encode = lambda texts, bs=BATCH: model.encode(texts, batch_size=bs, show_progress_bar=False)  # noqa: E731

        progress(f"{name}: warm-up ({args.warmup} single + {args.warmup} batch)")
        with torch.inference_mode():
            for i in range(args.warmup):
                encode([sentences[i % len(sentences)]])
                encode(batch)

            progress(f"{name}: single-input latency, {args.single_runs} runs")
            single = [timed(lambda s=sentences[i % len(sentences)]: encode([s])) for i in range(args.single_runs)]

            progress(f"{name}: batch-{BATCH} throughput, {args.batch_runs} runs")
            batched = [timed(lambda: encode(batch)) for _ in range(args.batch_runs)]

        results[name] = {
            "single_ms_median": round(statistics.median(single) * 1e3, 3),
            "single_ms_p90": round(sorted(single)[int(0.9 * (len(single) - 1))] * 1e3, 3),
            "single_runs": len(single),
            "batch32_ms_median": round(statistics.median(batched) * 1e3, 3),
            "batch32_sentences_per_s": round(BATCH / statistics.median(batched), 2),
            "batch_runs": len(batched),
        }
        del model

    print(f"sentence-transformers {sentence_transformers.__version__}, torch {torch.__version__}, "
          f"{args.threads} threads, load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
    print(f"{'model':<8} {'single median ms':>17} {'single p90 ms':>14} {'batch-32 ms':>12} {'batch-32 sent/s':>16}")
    for name, r in results.items():
        print(f"{name:<8} {r['single_ms_median']:>17.2f} {r['single_ms_p90']:>14.2f} "
              f"{r['batch32_ms_median']:>12.1f} {r['batch32_sentences_per_s']:>16.1f}")
    print(json.dumps({
        "bench": "sentence-transformers",
        "sentence_transformers": sentence_transformers.__version__,
        "torch": torch.__version__,
        "threads": args.threads,
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "load_average": [round(x, 2) for x in load],
        "sentences": str(args.sentences.relative_to(ROOT)) if args.sentences.is_relative_to(ROOT) else str(args.sentences),
        "results": results,
    }))
    return 0


if __name__ == "__main__":
    sys.exit(main())
