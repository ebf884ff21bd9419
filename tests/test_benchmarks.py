"""benchmarks/bench_peers.py end to end on its smallest setting: it launches its own 2 ranks, and the
optimizer bytes it reads from the DeepSpeed engines are the real ones (ALPS holds <= 1/5 of what
gradient masking holds). Timing goals are the benchmark's business, not this test's."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

from alps_ds.arch import AttentionSpec
from alps_ds.choose import count_for_ratio, random_heads
from alps_ds.layout import trainable_rows

sys.path.insert(0, str(Path(__file__).parent))
from dist import rank_env  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "bench_peers.py"


def bench_module():
    spec = importlib.util.spec_from_file_location("bench_peers", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_bench_peers_quick_reads_the_engines_optimizer_state(tmp_path):
    out = tmp_path / "peers.json"
    cmd = [sys.executable, str(SCRIPT), "--quick", "--no-memory"]
    cmd += ["--arms", "grad-mask,alps-heads", "--stages", "2", "--repeat", "1", "--json", str(out)]
    proc = subprocess.run(cmd, cwd=REPO, env=rank_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    res = json.loads(out.read_text())
    arms = res["stages"]["2"]
    assert res["meta"]["world"] == 2 and res["meta"]["dtype"] == "fp32"

    # The arms train what they should: the selected heads' q/k/v rows vs. all of q/k/v.
    bench = bench_module()
    cfg = bench.model_config(bench.parse_args(["--quick"]))
    spec = AttentionSpec.from_config(cfg)
    heads = random_heads(spec.num_layers, spec.num_heads, count_for_ratio(0.1, spec.num_layers, spec.num_heads), 0)
    rows = sum(r.num_rows for r in trainable_rows(spec, heads, "group"))
    assert arms["alps-heads"]["trainable"] == rows * spec.hidden_size
    qkv = (spec.num_heads + 2 * spec.num_kv_heads) * spec.head_dim * spec.hidden_size * spec.num_layers
    assert arms["grad-mask"]["trainable"] == qkv

    # fp32 ZeRO-2 over 2 ranks: each rank holds half of fp32 master + Adam m + v (12 bytes an element).
    for arm in ("alps-heads", "grad-mask"):
        per_rank = arms[arm]["opt_bytes_per_rank"]
        assert len(per_rank) == 2 and all(b > 0 for b in per_rank)
        assert sum(per_rank) == 12 * arms[arm]["trainable"], (arm, per_rank)
        assert arms[arm]["step_s"] > 0
    ratio = max(arms["alps-heads"]["opt_bytes_per_rank"]) / max(arms["grad-mask"]["opt_bytes_per_rank"])
    assert ratio <= 0.2, ratio
    assert "alps-heads / grad-mask optimizer bytes" in proc.stdout


def test_gpu_check_script_parses():
    """The GPU check cannot run here (no GPU); its shell must at least parse (bash -n)."""
    proc = subprocess.run(["bash", "-n", str(REPO / "benchmarks" / "gpu_check.sh")], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
