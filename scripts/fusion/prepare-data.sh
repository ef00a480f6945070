#!/usr/bin/env bash
# Converts the shared labelled sets into the pair files and held-out splits that
# `embedfleet fusion train` and `embedfleet eval` read (docs/fusion.md, "Training").
#
#   scripts/fusion/prepare-data.sh [EVAL_DIR] [OUT_DIR]
#
# EVAL_DIR: the shared data (default ../shared/eval: stsb/ and scifact/ as described in its
# README). OUT_DIR (default target/fusion-data) receives:
#   stsb-train.jsonl       STS-B train less the held-out tenth       (training)
#   stsb-heldout.jsonl     a seeded tenth of STS-B train             (model selection)
#   stsb-dev.jsonl         STS-B dev, all 1,500 pairs                (final evaluation only)
#   scifact/train-pairs.jsonl   60 % of the SciFact training queries (training)
#   scifact/validation/         15 %, BEIR layout                    (model selection)
#   scifact/test/               25 %, BEIR layout                    (final evaluation only)
# Licences: STS-B scores CC BY-SA 4.0 (LICENSE copied beside the files); SciFact CC BY-NC 2.0
# (research and evaluation use; its README, which states the licence, is copied beside it).
set -euo pipefail
EVAL_DIR=${1:-../shared/eval}
OUT=${2:-target/fusion-data}
BIN=${EMBEDFLEET_BIN:-target/release/embedfleet}
SEED=14
# Sizes bound the embedding time on the project's shared 2-core machine (mpnet reads ~500
# tokens/s there while other engineers build): every model sees the same texts, so the
# comparisons hold, but the absolute SciFact figures are not MTEB's (full 5,183-document corpus,
# whole abstracts, the unreleased test queries).
# - SciFact documents are cut to their first 128 words (title first; the median abstract is
#   ~200 words, mpnet reads at most 384 tokens anyway), and the corpus to 1,500 documents: every
#   document relevant to some query (all splits), plus an evenly spaced sample of the others
#   as distractors.
# - STS-B is used whole: the held-out tenth is drawn from the 5,749 training pairs, training
#   uses the rest, the final evaluation all 1,500 dev pairs.
MAX_DOC_WORDS=128
MAX_CORPUS=1500

mkdir -p "$OUT"
install -m 0644 "$EVAL_DIR/stsb/LICENSE" "$OUT/STSB-LICENSE"
mkdir -p "$OUT/scifact"
install -m 0644 "$EVAL_DIR/README.md" "$OUT/scifact/SOURCE-AND-LICENCE.md"
"$BIN" fusion prepare-sts "$EVAL_DIR/stsb/stsb-en-train.csv" \
  --out "$OUT/stsb-train.jsonl" --held-out "$OUT/stsb-heldout.jsonl" \
  --held-out-fraction 0.1 --seed "$SEED"
"$BIN" fusion prepare-sts "$EVAL_DIR/stsb/stsb-en-dev.csv" --out "$OUT/stsb-dev.jsonl" \
  --seed "$SEED"
"$BIN" fusion prepare-beir "$EVAL_DIR/scifact" --out-dir "$OUT/scifact" \
  --validation 0.15 --test 0.25 --seed "$SEED" --max-doc-words "$MAX_DOC_WORDS" \
  --max-corpus "$MAX_CORPUS"
