#!/usr/bin/env bash
# Reproduce MVC on cifar10 (full profile, GPU). Extra arguments are config overrides.
exec "$(dirname "$0")/_reproduce.sh" configs/cifar10.yaml "$@"
