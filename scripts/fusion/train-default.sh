#!/usr/bin/env bash
# Reproduces the shipped default fusion weights for minilm + mpnet
# (crates/embedfleet-fusion/weights/minilm-mpnet.safetensors, with its training log
# minilm-mpnet.json) and the evaluation table in docs/fusion.md, from a fresh clone:
#
#   cargo build --release -p embedfleet-cli
#   scripts/fusion/train-default.sh [EVAL_DIR]      # EVAL_DIR default ../shared/eval
#
# Needs the real minilm and mpnet checkpoints under models/ (or EMBEDFLEET_MODELS_DIR).
# Partials are cached in target/partials, so a second run embeds nothing.
# Data licences: STS-B CC BY-SA 4.0; SciFact CC BY-NC 2.0 (research and evaluation use).
set -euo pipefail
EVAL_DIR=${1:-../shared/eval}
BIN=${EMBEDFLEET_BIN:-target/release/embedfleet}
D=target/fusion-data
MODELS="--models minilm,mpnet --model-dir ${EMBEDFLEET_MODELS_DIR:-models} --cache-dir target/partials"
OUT=crates/embedfleet-fusion/weights/minilm-mpnet.safetensors

scripts/fusion/prepare-data.sh "$EVAL_DIR" "$D"
"$BIN" fusion train $MODELS \
  --scored "$D/stsb-train.jsonl" --retrieval "$D/scifact/train-pairs.jsonl" \
  --held-out-scored "$D/stsb-heldout.jsonl" --held-out-beir "$D/scifact/validation" \
  --seed 14 --max-epochs 20 --patience 3 --learning-rate 1e-4 --retrieval-weight 8 --out "$OUT"
# The training log sits beside the weights as minilm-mpnet.json; it names the local data paths.
# Final evaluation, on data neither trained nor selected on; the held-out sets are shown too.
"$BIN" eval $MODELS --fusion-weights "$OUT" --with-seeded \
  --sts "$D/stsb-dev.jsonl" --beir "$D/scifact/test" \
  --dims 64,128,256,512,768 --binary-rescore --int8 --json target/fusion-eval-test.json
"$BIN" eval $MODELS --fusion-weights "$OUT" --with-seeded \
  --sts "$D/stsb-heldout.jsonl" --beir "$D/scifact/validation" \
  --dims 256 --json target/fusion-eval-heldout.json
