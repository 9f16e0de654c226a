#!/usr/bin/env bash
# Reproduce MVC on brain_tumor (full profile, GPU). Extra arguments are config overrides.
exec "$(dirname "$0")/_reproduce.sh" configs/brain_tumor.yaml "$@"
