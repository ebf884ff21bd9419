#!/usr/bin/env bash
# The CUDA paths the CPU-only test suite never runs, in one short script (< 8 min on one H200):
#   1. localize on CUDA vs CPU: the same heads and scores, and how much faster
#   2. `alps-ds train` bf16 ZeRO-3 on one GPU, then the bit-exact check of OUT/merged against
#      OUT/base (every tensor and every non-selected q/k/v row identical, the selected rows moved)
#   3. benchmarks/bench_peers.py on CUDA (bf16, ranks = min(2, GPUs))
# Every part's result is recorded even when another part fails; the exit status is 1 if any failed.
#
# usage: bash benchmarks/gpu_check.sh [RESULTS_FILE]
#   RESULTS_FILE defaults to $OUT/gpu_check.txt when $OUT is set, else ./gpu_check.txt.
#   GPU_CHECK_DEVICE=cpu runs the same parts on CPU (to check the script itself; numbers mean little).
#   GPU_CHECK_PARTS="localize train peers megatron-te" picks parts; GPU_CHECK_QUICK=1 shrinks parts 1 and 3.
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
RESULT=${1:-${OUT:-.}/gpu_check.txt}
DEVICE=${GPU_CHECK_DEVICE:-cuda}
PARTS=${GPU_CHECK_PARTS:-localize train peers megatron-te}
QUICK=${GPU_CHECK_QUICK:-0}
PART_LIMIT=${GPU_CHECK_PART_LIMIT:-200}  # seconds per part
WORK=$(mktemp -d "${TMPDIR:-/tmp}/alps-gpu-check.XXXXXX")
trap 'rm -rf "$WORK"' EXIT

mkdir -p "$(dirname "$RESULT")"
: >"$RESULT"
cd "$REPO"
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}" TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1
export TRANSFORMERS_VERBOSITY=error OMP_NUM_THREADS=${OMP_NUM_THREADS:-8}
if [[ $DEVICE == cpu ]]; then export DS_ACCELERATOR=cpu; else unset DS_ACCELERATOR; fi
PY=${PYTHON:-python}
FAILED=()

log() { printf '%s\n' "$*" | tee -a "$RESULT"; }

# run_part NAME FUNCTION: run FUNCTION with a time limit, its output into the results file;
# PASS/FAIL and the seconds it took are recorded whatever happens.
run_part() {
  local name=$1 fn=$2 start=$SECONDS rc=0
  log ""
  log "== $name"
  timeout --kill-after=10 "$PART_LIMIT" bash -c "set -euo pipefail; $fn" >>"$RESULT" 2>"$WORK/$name.err" || rc=$?
  if ((rc == 0)); then
    log "== $name: PASS ($((SECONDS - start)) s)"
  else
    [[ $rc == 124 || $rc == 137 ]] && log "   (stopped after the ${PART_LIMIT} s part limit)"
    log "== $name: FAIL (exit $rc, $((SECONDS - start)) s); last lines of stderr:"
    tail -n 30 "$WORK/$name.err" | sed 's/^/   | /' | tee -a "$RESULT"
    FAILED+=("$name")
  fi
}

part_env() {
  if command -v nvidia-smi >/dev/null; then
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  else
    echo "nvidia-smi: not installed"
  fi
  "$PY" - <<'EOF'
import deepspeed, torch, transformers
print(f"torch {torch.__version__} (CUDA {torch.version.cuda}), deepspeed {deepspeed.__version__}, "
      f"transformers {transformers.__version__}; cuda available: {torch.cuda.is_available()}, "
      f"devices: {torch.cuda.device_count()}")
EOF
  if [[ $DEVICE == cuda ]]; then
    "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'no CUDA device visible to torch')"
  fi
}

part_localize() {
  "$PY" - "$WORK" "$DEVICE" "$QUICK" <<'EOF'
import json, subprocess, sys, time
from pathlib import Path
import torch
from alps_ds.arch import AttentionSpec
from alps_ds.tiny import build_model, save_model, tiny_config

work, device, quick = Path(sys.argv[1]), sys.argv[2], sys.argv[3] == "1"
layers, hidden, heads, kv, hd = (4, 512, 8, 2, 64) if quick else (8, 2048, 16, 4, 128)
cfg = tiny_config("llama", layers=layers, hidden=hidden, heads=heads, kv_heads=kv, head_dim=hd,
                  vocab=256, intermediate=256)
spec = AttentionSpec.from_config(cfg)
base = build_model(cfg, seed=0)
save_model(base, work / "base")
# The task model: every q/k/v weight moved a little, one query head per layer much more (its
# q rows only: moving k/v rows would move every query head of that kv group alike).
g = torch.Generator().manual_seed(1)
moved = [(l, (3 * l + 1) % heads) for l in range(layers)]
with torch.no_grad():
    for l in range(layers):
        for m in spec.modules:
            w = base.get_submodule(spec.module_path(l, m)).weight
            w.add_(1e-3 * torch.randn(w.shape, generator=g))
        r = spec.rows("q", moved[l][1])
        w = base.get_submodule(spec.module_path(l, r.module)).weight
        w[r.start : r.stop] += 0.05 * torch.randn((len(r), w.shape[1]), generator=g)
save_model(base, work / "task")
print(f"models: llama {layers} layers, hidden {hidden}, {heads} heads / {kv} kv, head_dim {hd}")

out = {}
for dev in ("cpu", device):
    t = time.perf_counter()
    subprocess.run(["alps-ds", "localize", "--base", str(work / "base"), "--task", str(work / "task"),
                    "--out", str(work / f"loc-{dev}"), "--device", dev, "--quiet"], check=True)
    out[dev] = (time.perf_counter() - t, json.loads((work / f"loc-{dev}" / "heads.json").read_text()))
(t_cpu, cpu), (t_dev, dev) = out["cpu"], out[device]
a, b = torch.tensor(cpu["scores"], dtype=torch.float64), torch.tensor(dev["scores"], dtype=torch.float64)
rel = ((a - b).abs() / a.abs().clamp_min(1e-30)).max().item()
print(f"localize wall time (whole command): cpu {t_cpu:.1f} s, {device} {t_dev:.1f} s ({t_cpu / t_dev:.1f}x)")
print(f"max relative score difference {device} vs cpu: {rel:.2e}; same heads: {cpu['heads'] == dev['heads']}")
print(f"the {len(moved)} planted heads are among the {len(dev['heads'])} selected: {all(list(h) in dev['heads'] for h in moved)}")
if cpu["heads"] != dev["heads"] or rel > 1e-4:
    sys.exit(f"localize on {device} disagrees with cpu (max rel diff {rel:.2e})")
EOF
}

part_train() {
  local out="$WORK/train"
  # The shipped ZeRO-3 JSON with bf16 switched on (--set cannot reach into a JSON file).
  "$PY" -c 'import json, sys; c = json.load(open("configs/ds_zero3.json")); c["bf16"] = {"enabled": True}
json.dump(c, open(sys.argv[1], "w"))' "$WORK/ds_zero3_bf16.json"
  alps-ds train --config configs/tiny.yaml --set deepspeed="$WORK/ds_zero3_bf16.json" \
    --set output.dir="$out" --set logging.progress=false
  "$PY" - "$out" <<'EOF'
import json, sys
from pathlib import Path
import torch
from safetensors.torch import load_file
from alps_ds.arch import AttentionSpec
from alps_ds.layout import trainable_rows
from alps_ds.selection import HeadSelection

out = Path(sys.argv[1])
s = json.loads((out / "summary.json").read_text())
print(f"summary: zero_stage {s['zero_stage']}, dtype {s['dtype']}, world {s['world_size']}, steps {s['steps']}, "
      f"loss {s['first_loss']:.4f} -> {s['final_loss']:.4f}, trainable {s['trainable_elements']:,}")
problems = []
if s["zero_stage"] != 3 or "bfloat16" not in str(s["dtype"]):
    problems.append(f"expected ZeRO-3 bf16, summary says stage {s['zero_stage']} dtype {s['dtype']}")
if not s["final_loss"] < s["first_loss"]:
    problems.append("loss did not fall")
cfg = json.loads((out / "base" / "config.json").read_text())
spec = AttentionSpec.from_config(cfg)
sel = HeadSelection.load(out / "heads.json")
rows = {spec.module_path(r.layer, r.module) + ".weight": r.indices() for r in trainable_rows(spec, sel.heads, "group")}
load = lambda d: {k: v for f in sorted(d.glob("*.safetensors")) for k, v in load_file(f).items()}
base, merged = load(out / "base"), load(out / "merged")
if base.keys() != merged.keys():
    problems.append(f"tensor names differ: {sorted(base.keys() ^ merged.keys())[:5]}")
for name, b in base.items():
    m = merged.get(name)
    if m is None or m.dtype != b.dtype or m.shape != b.shape:
        problems.append(f"{name}: missing or dtype/shape changed"); continue
    keep = torch.ones(b.shape[0], dtype=torch.bool)
    if name in rows:
        keep[rows[name]] = False
        if not (m[~keep] != b[~keep]).any(dim=-1).all():
            problems.append(f"{name}: a selected row did not change")
    if not torch.equal(m[keep], b[keep]):
        problems.append(f"{name}: a frozen value changed")
print(f"bit-exact check: {len(base)} tensors, {len(rows)} with trained rows, {len(sel)} heads: "
      + ("OK" if not problems else f"{len(problems)} problem(s)"))
if problems:
    sys.exit("; ".join(problems[:10]))
EOF
}

part_peers() {
  local args=(--json "$WORK/peers.json")
  [[ $QUICK == 1 ]] && args+=(--quick --no-memory)
  "$PY" benchmarks/bench_peers.py "${args[@]}"
  echo "--- bench_peers JSON"
  cat "$WORK/peers.json"
}

# The megatron-core hook on Transformer Engine's TELayerNormColumnParallelLinear (CUDA + transformer_engine):
# the wrapped layer's output is unchanged before training, frozen rows stay bit-exact after it.
part_megatron_te() {
  "$PY" -c "import transformer_engine" 2>/dev/null || { echo "SKIP: transformer_engine is not installed"; return 0; }
  "$PY" -m torch.distributed.run --nproc_per_node 1 benchmarks/gpu_check_megatron.py
}

export -f part_env part_localize part_train part_peers part_megatron_te
export PY WORK DEVICE QUICK
log "alps-ds GPU check, $(date -u +%Y-%m-%dT%H:%M:%SZ), commit $(git -C "$REPO" rev-parse --short HEAD 2>/dev/null || echo unknown), device $DEVICE"
run_part env part_env
for p in $PARTS; do
  case $p in
    localize) run_part localize part_localize ;;
    train) run_part train part_train ;;
    peers) run_part peers part_peers ;;
    megatron-te) run_part megatron-te part_megatron_te ;;
    *) log "unknown part '$p' (choose from: localize train peers megatron-te)"; FAILED+=("$p") ;;
  esac
done
log ""
log "== done: ${#FAILED[@]} part(s) failed${FAILED[*]:+: ${FAILED[*]}}; results in $RESULT"
((${#FAILED[@]} == 0))
