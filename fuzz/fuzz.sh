#!/usr/bin/env bash
# Runs `cargo fuzz ARGS...` for this repository, first installing what is missing, and only that:
# cargo-fuzz (from crates.io, at the version below) and a toolchain to build the targets with.
# The targets build with the nightly toolchain and AddressSanitizer when nightly is installed; a
# machine with only a stable Rust builds them with `--sanitizer none` (cargo-fuzz supports that on
# stable), so `make test` never needs more than crates.io.
#   fuzz/fuzz.sh setup      install what is missing and say what will be used
#   fuzz/fuzz.sh build      cargo fuzz build, with the chosen toolchain
#   fuzz/fuzz.sh run T ...  cargo fuzz run T ..., likewise
set -euo pipefail
cd "$(dirname "$0")"

CARGO_FUZZ_VERSION=0.13.2
CARGO=${CARGO:-cargo}

have_cargo_fuzz() {
  "$CARGO" fuzz --version 2>/dev/null | grep -q "cargo-fuzz $CARGO_FUZZ_VERSION"
}

if ! have_cargo_fuzz; then
  echo "fuzz.sh: installing cargo-fuzz $CARGO_FUZZ_VERSION from crates.io (once; about a minute on 2 cores)" >&2
  if ! "$CARGO" install cargo-fuzz --version "$CARGO_FUZZ_VERSION" --locked --quiet; then
    echo "fuzz.sh: error: could not install cargo-fuzz $CARGO_FUZZ_VERSION." >&2
    echo "  The fuzz step needs it; install it by hand with" >&2
    echo "  'cargo install cargo-fuzz --version $CARGO_FUZZ_VERSION --locked' and run make again." >&2
    exit 1
  fi
fi

# A toolchain: nightly if rustup has one (AddressSanitizer), else try to add it, else stable
# without a sanitizer. An installed nightly is used as it is; `rustup` needs no network then.
toolchain=() sanitizer=()
if command -v rustup >/dev/null 2>&1 && rustup toolchain list | grep -q '^nightly'; then
  toolchain=(+nightly)
elif command -v rustup >/dev/null 2>&1 && rustup toolchain install nightly --profile minimal >/dev/null 2>&1; then
  echo "fuzz.sh: installed the nightly toolchain (minimal profile)" >&2
  toolchain=(+nightly)
else
  echo "fuzz.sh: no nightly toolchain could be had: building the fuzz targets on stable without a sanitizer" >&2
  sanitizer=(--sanitizer none)
fi

case "${1:-setup}" in
  setup)
    echo "fuzz.sh: $("$CARGO" fuzz --version), toolchain ${toolchain[*]:-stable}${sanitizer:+ (no sanitizer)}" >&2
    ;;
  *)
    sub=$1
    shift
    exec "$CARGO" "${toolchain[@]}" fuzz "$sub" "${sanitizer[@]}" "$@"
    ;;
esac
