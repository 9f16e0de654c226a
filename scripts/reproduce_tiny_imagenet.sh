#!/usr/bin/env bash
# Reproduce MVC on tiny_imagenet (full profile, GPU). Extra arguments are config overrides.
exec "$(dirname "$0")/_reproduce.sh" configs/tiny_imagenet.yaml "$@"
