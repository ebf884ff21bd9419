"""`alps-ds train` with tensor parallelism (``parallel.tp``, DeepSpeed AutoTP) on real CPU ranks (gloo).

Runs (module fixture, one launch each; 4 optimizer steps on configs/data/tiny.jsonl):
- llama, 6 query / 3 kv heads (AutoTP splits 2 kv groups to TP rank 0, 1 to rank 1), an uneven
  selection: ``tp1`` one plain process; ``tp2`` 2 ranks (tp 2 x dp 1, ZeRO-1) stopped after 2
  steps and resumed; ``tp1dp2`` 2 ranks (tp 1 x dp 2); ``tp2dp2`` 4 ranks (tp 2 x dp 2, ZeRO-2).
  ``tp2dp2`` is stopped after 2 steps too; its checkpoint is resumed at tp 4 x 1 by itself, at tp 1 on 2 ranks
  (``tp2dp2_on2``) and by one plain process (``tp2dp2_on1``), both from the elastic state.
- qwen2 (q/k/v biases), 4 query / 2 kv heads: ``qwen_tp1`` one process; ``qwen_tp2`` 2 ranks, ZeRO-3.

Each tp > 1 run is compared with the tp 1 run of the same data-parallel size: the same examples
then form the same micro-batches, so only float rounding differs (see ``ATOL``).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from dist import REPO, rank_env, run_ranks
from safetensors.torch import load_file

MAIN = REPO / "alps_ds" / "__main__.py"
STEPS = 4
# tp > 1 sums the row-parallel o_proj/down_proj outputs over ranks (an all-reduce) and splits the
# matmuls, so activations differ from tp 1 in the last bits (~1e-7); AdamW's normalized update
# carries that into the trained rows. Measured: at most 3e-7 after 4 steps of ~1.5e-2 each.
ATOL = 1e-5
LLAMA = {"heads": 6, "kv_heads": 3, "hidden": 48, "head_dim": 8}
QWEN = {"heads": 4, "kv_heads": 2, "hidden": 32, "head_dim": 8}
# TP rank 0 holds kv groups 0, 1 (heads 0-3), rank 1 group 2 (heads 4, 5): 72 rows against 24.
LLAMA_HEADS = ((0, 1), (0, 3), (1, 0), (1, 5))
QWEN_HEADS = ((0, 0), (1, 3))


def make_base(root: Path, family: str, shape: dict, heads) -> tuple[Path, Path]:
    """A tiny model folder with the byte tokenizer, and a heads.json of ``heads`` for it."""
    from alps_ds.arch import AttentionSpec
    from alps_ds.selection import HeadSelection, Provenance
    from alps_ds.tiny import build_model, save_model, tiny_config
    from alps_ds.train.tokenizer import BYTE_VOCAB, save_byte_tokenizer

    config = tiny_config(family, vocab=BYTE_VOCAB, max_positions=1024, layers=2, intermediate=64, **shape)
    base = root / family
    save_model(build_model(config, seed=3), base)
    save_byte_tokenizer(base)
    heads_file = root / f"{family}.heads.json"
    HeadSelection(AttentionSpec.from_config(config).fingerprint, heads, Provenance("explicit")).save(heads_file)
    return base, heads_file


def write_run(path: Path, base: Path, heads: Path, out: Path, tp: int, stage: int) -> Path:
    text = f"""\
model: {base}
selection: {heads}
data:
  datasets: [{REPO / "configs" / "data" / "tiny.jsonl"}]
  system: ""
  max_length: 96
train: {{micro_batch: 4, batch: 16, lr: 5.0e-3, max_steps: {STEPS}, seed: 0}}
deepspeed: {{zero_optimization: {{stage: {stage}}}}}
parallel: {{tp: {tp}}}
output: {{dir: {out}, checkpoint_every: 0}}
logging: {{progress: false, tensorboard: false}}
"""
    path.write_text(text)
    return path


def plain(run: Path, *extra: str) -> subprocess.CompletedProcess:
    """``alps-ds train`` as one plain process (no launcher)."""
    env = rank_env()
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    argv = [sys.executable, str(MAIN), "train", "--config", str(run), *extra]
    return subprocess.run(argv, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, dict]:
    root = tmp_path_factory.mktemp("tp")
    llama, llama_heads = make_base(root, "llama", LLAMA, LLAMA_HEADS)
    qwen, qwen_heads = make_base(root, "qwen2", QWEN, QWEN_HEADS)
    cases = {  # name: (base, heads, tp, ranks, ZeRO stage)
        "tp1": (llama, llama_heads, 1, 1, 2),
        "tp2": (llama, llama_heads, 2, 2, 1),
        "tp1dp2": (llama, llama_heads, 1, 2, 2),
        "tp2dp2": (llama, llama_heads, 2, 4, 2),
        "qwen_tp1": (qwen, qwen_heads, 1, 1, 2),
        "qwen_tp2": (qwen, qwen_heads, 2, 2, 3),
    }
    out = {}
    for name, (base, heads, tp, ranks, stage) in cases.items():
        run = write_run(root / f"{name}.yaml", base, heads, root / name, tp, stage)
        if ranks == 1:
            proc = plain(run)
            assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
        elif name in ("tp2", "tp2dp2"):  # stopped half way, resumed from its TP checkpoint
            run_ranks(MAIN, "train", "--config", str(run), "--set", "train.stop_after=2", nproc=ranks, timeout=1200)
            if name == "tp2dp2":
                out.update(resume_elsewhere(run, root / name, base, heads))
            run_ranks(MAIN, "train", "--config", str(run), "--resume", nproc=ranks, timeout=1200)
        else:
            run_ranks(MAIN, "train", "--config", str(run), nproc=ranks, timeout=1200)
        out[name] = {"out": root / name, "base": base, "heads": heads, "run": run, "tp": tp, "ranks": ranks}
    return out


def resume_elsewhere(run: Path, half: Path, base: Path, heads: Path) -> dict[str, dict]:
    """The tp 2 x dp 2 checkpoint at step 2 resumed at tp 1 on 2 ranks and by one plain process (ZeRO-2 both)."""
    out = {}
    for name, ranks in (("tp2dp2_on2", 2), ("tp2dp2_on1", 1)):
        dest = half.parent / name
        subprocess.run(["cp", "-r", str(half), str(dest)], check=True)
        args = ("--resume", "--set", "parallel.tp=1", "--set", f"output.dir={dest}")
        if ranks == 1:
            proc = plain(run, *args)
            assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
        else:
            run_ranks(MAIN, "train", "--config", str(run), *args, nproc=ranks, timeout=1200)
        out[name] = {"out": dest, "base": base, "heads": heads, "run": run, "tp": 1, "ranks": ranks}
    return out


def log_of(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines() if line.strip()]


def trained_rows(base: Path, heads: Path) -> dict[str, list[int]]:
    """Checkpoint key -> rows the selection trains, from heads.json through the layout (not the hook)."""
    from alps_ds.arch import AttentionSpec
    from alps_ds.layout import trainable_rows
    from alps_ds.selection import HeadSelection

    spec = AttentionSpec.from_pretrained(base)
    sel = HeadSelection.load(heads, spec=spec)
    out = {}
    for mr in trainable_rows(spec, sel.heads, "group"):
        for leaf in ("weight", "bias") if spec.qkv_bias else ("weight",):
            out[f"{spec.module_path(mr.layer, mr.module)}.{leaf}"] = mr.indices()
    return out


TP_RUNS = ["tp2", "tp2dp2", "qwen_tp2"]
RESUMED = ["tp2dp2_on2", "tp2dp2_on1"]  # a tp 2 x dp 2 checkpoint resumed at tp 1 (elastic state)
PAIRS = [("tp2", "tp1"), ("tp2dp2", "tp1dp2"), ("qwen_tp2", "qwen_tp1"), *((r, "tp1dp2") for r in RESUMED)]


@pytest.mark.slow
@pytest.mark.parametrize("name", TP_RUNS + RESUMED)
def test_merged_changes_exactly_the_selected_rows(runs, name):
    r = runs[name]
    allowed = trained_rows(r["base"], r["heads"])
    base = load_file(str(r["base"] / "model.safetensors"))
    merged = load_file(str(r["out"] / "merged" / "model.safetensors"))
    assert base.keys() == merged.keys()
    assert any(k.endswith(".bias") for k in allowed) == name.startswith("qwen")
    for key, b in base.items():
        m = merged[key]
        assert m.dtype == b.dtype and m.shape == b.shape, key  # the full HF layout, not a TP shard
        rows = allowed.get(key, [])
        frozen = [i for i in range(b.shape[0]) if i not in rows]
        assert torch.equal(m[frozen], b[frozen]), f"{key}: a frozen row or tensor changed"
        if rows:
            moved = m[rows] != b[rows]
            assert (moved.any(dim=-1) if m.dim() == 2 else moved).all(), f"{key}: a selected row did not train"


@pytest.mark.slow
@pytest.mark.parametrize("name", [*TP_RUNS, *RESUMED, "tp1", "tp1dp2", "qwen_tp1"])
def test_loss_falls(runs, name):
    log = log_of(runs[name]["out"])
    assert [r["step"] for r in log] == list(range(1, STEPS + 1))
    assert log[-1]["loss"] < log[0]["loss"]


@pytest.mark.slow
@pytest.mark.parametrize(("tp", "ref"), PAIRS)
def test_tp_trains_the_same_model_as_tp1(runs, tp, ref):
    a, b = log_of(runs[tp]["out"]), log_of(runs[ref]["out"])
    assert [r["loss"] for r in a] == pytest.approx([r["loss"] for r in b], rel=1e-5)
    assert [r["tokens"] for r in a] == [r["tokens"] for r in b]  # a TP group's shared batch counts once
    ma = load_file(str(runs[tp]["out"] / "merged" / "model.safetensors"))
    mb = load_file(str(runs[ref]["out"] / "merged" / "model.safetensors"))
    for key in ma:
        torch.testing.assert_close(ma[key], mb[key], atol=ATOL, rtol=0, msg=key)


def cli(capsys, *args: str) -> str:
    """What ``alps-ds ARGS`` prints (in this process)."""
    from alps_ds.cli import main

    capsys.readouterr()
    assert main(list(args)) == 0
    return capsys.readouterr().out


@pytest.mark.slow
@pytest.mark.parametrize("name", TP_RUNS)
def test_each_rank_optimizer_holds_its_planned_slice(runs, name, capsys):
    r = runs[name]
    s = json.loads((r["out"] / "summary.json").read_text())
    tp, dp = r["tp"], r["ranks"] // r["tp"]
    assert s["tensor_parallel"] == tp and s["world_size"] == tp * dp
    entries = json.loads(
        cli(
            capsys,
            "layout",
            "--heads",
            str(r["heads"]),
            "--model",
            str(r["base"]),
            "--tp",
            str(tp),
            "--layout",
            "autotp",
            "--json",
        )
    )
    per_row = json.loads((r["base"] / "config.json").read_text())["hidden_size"] + name.startswith("qwen")
    planned = [0] * tp
    for e in entries:
        planned[e["tp_rank"]] += sum(b - a for a, b in e["rows"]) * per_row
    ranks = s["optimizer_bytes_per_rank"]
    assert sorted((x["tp_rank"], x["dp_rank"]) for x in ranks) == [(t, d) for t in range(tp) for d in range(dp)]
    for x in ranks:
        assert x["slice_elements"] == planned[x["tp_rank"]]
        # ZeRO partitions the fp32 master of the TP rank's slices over its dp ranks (fp32 run)
        assert x["param_bytes"] == planned[x["tp_rank"]] // dp * 4
        assert x["state_bytes"] >= planned[x["tp_rank"]] // dp * 8  # exp_avg, exp_avg_sq (+ step counters)
    assert s["trainable_elements"] == sum(planned)
    plan = json.loads(cli(capsys, "plan", "--config", str(r["run"]), "--dp", str(dp), "--json"))
    assert plan["parallel"]["tp"] == tp and plan["parallel"]["zero"] == s["zero_stage"]
    alps = plan["rows"][0]
    assert alps["trainable"] == max(planned)  # the most loaded TP rank
    assert alps["master"] == max(x["param_bytes"] for x in ranks)
    assert alps["optimizer"] == max(x["param_bytes"] for x in ranks) * 2


@pytest.mark.slow
@pytest.mark.parametrize(("tp", "ref"), PAIRS)
def test_adapter_holds_the_full_rows(runs, tp, ref, tmp_path):
    from alps_ds.adapter import merge_adapter_into_checkpoint

    r = runs[tp]
    a = json.loads((r["out"] / "adapter" / "adapter.json").read_text())
    b = json.loads((runs[ref]["out"] / "adapter" / "adapter.json").read_text())
    assert a["modules"] == b["modules"]  # same modules, global rows and kinds as a tp 1 run
    merge_adapter_into_checkpoint(r["base"], r["out"] / "adapter", tmp_path / "m", progress=False)
    got = load_file(str(tmp_path / "m" / "model.safetensors"))
    want = load_file(str(r["out"] / "merged" / "model.safetensors"))
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in got)


@pytest.mark.slow
@pytest.mark.parametrize("name", RESUMED)
def test_a_tp_checkpoint_resumes_at_tp1_elsewhere(runs, name):
    r = runs[name]
    s = json.loads((r["out"] / "summary.json").read_text())
    assert s["resumed_from"] == 2 and s["steps"] == STEPS and s["world_size"] == r["ranks"]
    assert s["tensor_parallel"] == 1
    meta = json.loads((r["out"] / "checkpoints" / "step-00000002" / "alps_elastic.json").read_text())
    assert (meta["tp"], meta["world_size"]) == (2, 4)  # what the resume read: the tp 2 x dp 2 run's state
    # the step count continues: this run logged steps 3 and 4 after the copied 1 and 2
    assert [x["step"] for x in log_of(r["out"])] == list(range(1, STEPS + 1))


@pytest.mark.slow
def test_a_tp_checkpoint_without_elastic_state_resumes_only_on_its_own_grid(runs, tmp_path):
    half = tmp_path / "half"
    subprocess.run(["cp", "-r", str(runs["tp2"]["out"]), str(half)], check=True)
    tag = half / "checkpoints" / f"step-{STEPS:08d}"
    (tag / "alps_elastic.json").unlink()  # as an alps-ds before elastic TP checkpoints wrote it
    run = runs["tp2"]["run"]
    proc = plain(run, "--resume", "--set", f"output.dir={half}", "--set", "parallel.tp=1", "--set", "train.max_steps=6")
    err = proc.stderr.strip().splitlines()
    assert proc.returncode != 0
    want = f"{tag}: this checkpoint has no alps_elastic.json (written without ZeRO or by an older alps-ds), so it "
    assert err[-1] == f"alps-ds: error: {want}resumes only on 2 ranks with ZeRO-1 and parallel.tp 2", err[-1]
    assert json.loads((half / "checkpoints" / "latest.json").read_text())["step"] == STEPS  # left as it was


# ---- the same TP rules in train, check, plan and launch (no ranks started) ---------------------------------------


@pytest.fixture(scope="module")
def small(tmp_path_factory) -> dict[str, Path]:
    """The llama base, a run YAML at parallel.tp 2 and a selection leaving TP rank 1 without rows."""
    root = tmp_path_factory.mktemp("tp_rules")
    from alps_ds.arch import AttentionSpec
    from alps_ds.selection import HeadSelection, Provenance

    base, heads = make_base(root, "llama", LLAMA, LLAMA_HEADS)
    lopsided = root / "lopsided.json"  # kv groups 0 and 1 only: TP rank 0's
    spec = AttentionSpec.from_pretrained(base)
    HeadSelection(spec.fingerprint, ((0, 0), (1, 3)), Provenance("explicit")).save(lopsided)
    run = write_run(root / "run.yaml", base, heads, root / "out", tp=2, stage=2)
    return {"base": base, "heads": heads, "lopsided": lopsided, "run": run}


def test_train_others_is_refused_under_tp_everywhere(small, tmp_path, capsys):
    from alps_ds.arch import AttentionSpec
    from alps_ds.cli import main
    from alps_ds.errors import AlpsError
    from alps_ds.parallel import autotp
    from alps_ds.train.config import load_config

    with pytest.raises(AlpsError, match=r"train_others: not supported with parallel.tp 2"):
        load_config(small["run"], ["train_others=[o_proj]"])  # what alps-ds train (and check, launch, plan) load
    bad = tmp_path / "others.yaml"
    bad.write_text(small["run"].read_text() + "train_others: [o_proj]\n")
    assert main(["check", "--config", str(bad), "--world-size", "2"]) == 2
    assert "train_others: not supported with parallel.tp 2" in capsys.readouterr().err
    spec = AttentionSpec.from_pretrained(small["base"])
    with pytest.raises(AlpsError, match="train_others is not supported under tensor parallelism"):
        autotp.check_rules(spec, 2, train_others=["o_proj"])
    autotp.check_rules(spec, 1, train_others=["o_proj"])  # tp 1 trains them as usual


def test_check_and_launch_take_tp_and_its_rules_from_the_run_config(small, tmp_path, capsys):
    from alps_ds.cli import main

    lopsided = tmp_path / "lopsided.yaml"
    lopsided.write_text(small["run"].read_text().replace(str(small["heads"]), str(small["lopsided"])))
    assert main(["check", "--config", str(lopsided), "--world-size", "4"]) == 1
    err = capsys.readouterr().err
    assert "FAIL tensor parallel: AutoTP: tp rank(s) [1] of 2 hold none of the selected rows" in err
    assert main(["check", "--config", str(small["run"]), "--world-size", "4"]) == 0
    assert "OK   world size: 4 ranks = dp 2 x tp 2 x pp 1" in capsys.readouterr().out
    assert main(["check", "--config", str(small["run"]), "--world-size", "2", "--tp", "1"]) == 1
    assert "--tp 1 disagrees with" in capsys.readouterr().err
    code = main(["launch", "--nproc-per-node", "3", "--", "--config", str(small["run"])])
    err = capsys.readouterr().err
    assert code == 1 and "FAIL world size: 3 ranks are not divisible by tp x pp = 2 x 1" in err


def test_plan_takes_tp_zero_and_dtype_from_the_run_config(small):
    import argparse

    from alps_ds.commands import plan

    parser = argparse.ArgumentParser()
    plan.add_arguments(parser)
    built = plan.build(parser.parse_args(["--config", str(small["run"]), "--dp", "2"]))
    assert (built.parallel.tp, built.parallel.dp, built.parallel.zero) == (2, 2, 2)
    assert built.heads_source == str(small["heads"]) and built.rows[0].master == 72 * 48 // 2 * 4


def test_deepspeed_config_and_batch_follow_parallel_tp(small, tmp_path):
    from alps_ds.errors import AlpsError
    from alps_ds.train.config import gradient_accumulation, load_config
    from alps_ds.train.engine_config import deepspeed_config
    from alps_ds.train.tensor_parallel import grid

    cfg = load_config(small["run"])
    assert gradient_accumulation(cfg, 4) == 2  # 16 = micro 4 x accum 2 x dp 2 (4 ranks / tp 2)
    assert deepspeed_config(cfg, 2)["tensor_parallel"] == {"autotp_size": 2}
    clash = load_config(small["run"], ["deepspeed={tensor_parallel: {autotp_size: 4}}"])
    with pytest.raises(AlpsError, match="tensor_parallel.autotp_size is 4 but parallel.tp is 2"):
        deepspeed_config(clash, 2)
    with pytest.raises(AlpsError, match="parallel.tp: 3 ranks are not divisible by tp 2"):
        grid(cfg, 0, 3)
