#!/usr/bin/env bash
# Fetches the women's clothing reviews (../shared/notes/datasets.md) and prepares
# them for the `lr` app: DIR/train.libsvm, DIR/test.libsvm and DIR/vocab.txt
# (the note's tokens, vocabulary and split; feature V+1 is the bias). Never
# commit the data. Idempotent.
#   scripts/fetch-clothing.sh [DIR]      (default: data/clothing)
#   PSLAB=path/to/pslab to use a built binary instead of `cargo run --release`
set -euo pipefail
cd "$(dirname "$0")/.."
dir=${1:-data/clothing}
scripts/fetch-widedeep.sh clothing "$dir"
if [ -s "$dir/train.libsvm" ] && [ -s "$dir/test.libsvm" ]; then
  echo "$dir/train.libsvm and test.libsvm are there"
  exit 0
fi
if [ -n "${PSLAB:-}" ]; then
  "$PSLAB" prepare clothing --dir "$dir"
else
  cargo run --locked --release --quiet -- prepare clothing --dir "$dir"
fi
