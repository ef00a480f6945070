#!/usr/bin/env bash
# Converts the shared labelled sets into the pair files and held-out splits that
# `embedfleet fusion train` and `embedfleet eval` read (docs/fusion.md, "Training").
#
#   scripts/fusion/prepare-data.sh [EVAL_DIR] [OUT_DIR]
#
# EVAL_DIR: the shared data (default ../shared/eval: stsb/ and scifact/ as described in its
# README). OUT_DIR (default target/fusion-data) receives:
#   stsb-train.jsonl       STS-B train, a sample of what is not held out (training)
#   stsb-heldout.jsonl     a seeded tenth of STS-B train             (model selection)
#   stsb-dev.jsonl         a sample of STS-B dev                     (final evaluation only)
#   scifact/train-pairs.jsonl   60 % of the SciFact training queries (training)
#   scifact/validation/         15 %, BEIR layout                    (model selection)
#   scifact/test/               25 %, BEIR layout                    (final evaluation only)
# Licences: STS-B scores CC BY-SA 4.0 (LICENSE copied beside the files); SciFact CC BY-NC 2.0
# (research and evaluation use).
set -euo pipefail
EVAL_DIR=${1:-../shared/eval}
OUT=${2:-target/fusion-data}
BIN=${EMBEDFLEET_BIN:-target/release/embedfleet}
SEED=14
# Sizes bound the embedding time on the project's shared 2-core machine (mpnet ran at ~6
# sentences/s there while seven engineers built): every model sees the same texts, so the
# comparisons hold, but the absolute figures are not MTEB's.
# - SciFact documents are cut to their first 40 words (title first), and the corpus to 600
#   documents: all 565 documents relevant to a training query, plus an even sample of the rest.
# - STS-B: the held-out tenth is drawn from all 5,749 training pairs; training uses an evenly spaced
#   1,000 of the rest, the final evaluation an evenly spaced 500 of the 1,500 dev pairs.
MAX_DOC_WORDS=40
MAX_CORPUS=600
STS_TRAIN_PAIRS=1000
STS_DEV_PAIRS=500

mkdir -p "$OUT"
install -m 0644 "$EVAL_DIR/stsb/LICENSE" "$OUT/STSB-LICENSE"
"$BIN" fusion prepare-sts "$EVAL_DIR/stsb/stsb-en-train.csv" \
  --out "$OUT/stsb-train.jsonl" --held-out "$OUT/stsb-heldout.jsonl" \
  --held-out-fraction 0.1 --seed "$SEED" --max-pairs "$STS_TRAIN_PAIRS"
"$BIN" fusion prepare-sts "$EVAL_DIR/stsb/stsb-en-dev.csv" --out "$OUT/stsb-dev.jsonl" \
  --seed "$SEED" --max-pairs "$STS_DEV_PAIRS"
"$BIN" fusion prepare-beir "$EVAL_DIR/scifact" --out-dir "$OUT/scifact" \
  --validation 0.15 --test 0.25 --seed "$SEED" --max-doc-words "$MAX_DOC_WORDS" \
  --max-corpus "$MAX_CORPUS"
