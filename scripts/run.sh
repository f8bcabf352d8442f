#!/usr/bin/env bash
# README quick-start command 1: set up .venv (scripts/setup.sh), then run the main job,
# `riemannlora bench`, with its defaults: a real pretrained model fine-tuned on a real task by
# the main optimizers, results in ./bench_out (results.json, results.md, PNG plots).
# Extra arguments go to `riemannlora bench`, e.g. `bash scripts/run.sh --quick`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/riemannlora bench "$@"
