#!/usr/bin/env bash
# GPU check of the megatron-core ALPS hook on Transformer Engine layers (needs CUDA, megatron-core and
# transformer_engine; not runnable on the CPU CI). Usage: benchmarks/gpu_check_megatron.sh [NGPUS]
set -euo pipefail
cd "$(dirname "$0")/.."
exec torchrun --nproc_per_node "${1:-2}" benchmarks/gpu_check_megatron.py
