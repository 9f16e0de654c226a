#!/usr/bin/env bash
# Reproduce MVC on caltech101 (full profile, GPU). Extra arguments are config overrides.
exec "$(dirname "$0")/_reproduce.sh" configs/caltech101.yaml "$@"
