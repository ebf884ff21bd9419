"""The ALPS hook under DeepSpeed AutoTP training (autotp_size 2, ZeRO 1 and 2, CPU/gloo).

A tiny Llama with 6 query and 3 kv heads (AutoTP splits q/k/v unevenly: 2 kv groups on rank 0,
1 on rank 1) trains 4 AdamW steps (weight decay 0.1, clipping); tests/scripts/autotp_train.py
gathers q/k/v back. Checked: only the selected heads' rows changed, frozen rows bit-identical,
and the TP run reproduces the same training in one process without TP (losses, gradient norms,
trained rows).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from dist import run_ranks
from test_parallel_mapping import expected_labels

SCRIPT = Path(__file__).parent / "scripts" / "autotp_train.py"
STAGES = ["zero1", "zero2"]


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    out = tmp_path_factory.mktemp("autotp") / "results.json"
    run_ranks(SCRIPT, str(out), nproc=2, timeout=600)
    return json.loads(out.read_text())


def label_offset(module: str, n: int, g: int, hd: int) -> int:
    """Row r of q/k/v_proj has label offset + r in the HF fused [Q; K; V] order."""
    return {"q_proj": 0, "k_proj": n * hd, "v_proj": (n + g) * hd}[module]


@pytest.mark.slow
@pytest.mark.parametrize("stage", STAGES)
def test_only_selected_rows_change_and_frozen_rows_are_bit_identical(results, stage):
    c = results[stage]
    n, g, hd = c["n"], c["g"], c["hd"]
    want = expected_labels([tuple(h) for h in c["heads"]], n, g, hd, "group")
    assert set(c["after"]) == set(c["before"]) and len(c["before"]) == 6  # 2 layers x q/k/v
    for key, before in c["before"].items():
        before, after = torch.tensor(before), torch.tensor(c["after"][key])
        layer, module = int(key.split(".")[2]), key.split(".")[-2]
        labels = label_offset(module, n, g, hd) + torch.arange(before.shape[0])
        selected = torch.tensor([int(x) in want.get(layer, set()) for x in labels])
        assert before.shape == after.shape  # gathered back to the full, unsharded weight
        assert torch.equal((before != after).any(dim=1), selected), key
        assert torch.equal(before[~selected], after[~selected])


@pytest.mark.slow
@pytest.mark.parametrize("stage", STAGES)
def test_tp_training_matches_single_process_training(results, stage):
    c = results[stage]
    assert c["logits_max_diff"] < 1e-5  # the sharded, hooked model computes what the full one does
    assert c["losses"] == pytest.approx(c["ref_losses"], rel=1e-5)
    assert c["losses"][-1] < c["losses"][0]
    # the engine's global gradient norm counts each rank's slice once (tensor_model_parallel)
    assert c["norms"] == pytest.approx(c["ref_norms"], rel=1e-4)
    for key, ref in c["ref_after"].items():
        torch.testing.assert_close(torch.tensor(c["after"][key]), torch.tensor(ref), atol=1e-5, rtol=0)


@pytest.mark.slow
def test_each_rank_trains_only_its_local_share(results):
    ranks = {r["rank"]: r for r in results["zero2"]["ranks"]}
    # heads (0, 1) -> kv group 0 on rank 0; (1, 4), (1, 5) -> kv group 2 on rank 1 (local rows 0..)
    assert ranks[0]["hooked"] == {
        "model.layers.0.self_attn.q_proj": [[8, 16]],
        "model.layers.0.self_attn.k_proj": [[0, 8]],
        "model.layers.0.self_attn.v_proj": [[0, 8]],
    }
    assert ranks[1]["hooked"]["model.layers.1.self_attn.q_proj"] == [[0, 16]]
    assert ranks[0]["trainable"] == 3 * 8 * 48 and ranks[1]["trainable"] == 4 * 8 * 48
    # the trainable report sorts each rank's slice rows into q/k/v, none into "others"
    assert ranks[0]["per_kind"] == {"q": 8 * 48, "k": 8 * 48, "v": 8 * 48, "others": 0}
    assert ranks[1]["per_kind"] == {"q": 16 * 48, "k": 8 * 48, "v": 8 * 48, "others": 0}
    assert all(r["report_per_kind"] == r["per_kind"] for r in ranks.values())  # apply's report agrees
    # deepspeed.initialize kept the hooked modules (AutoTP did not re-shard them away)
    assert all(sorted(r["still_hooked"]) == sorted(r["hooked"]) for r in ranks.values())


@pytest.mark.slow
@pytest.mark.parametrize("stage", STAGES)
def test_autotp_and_hf_engines_report_the_same_hook(results, stage):
    """One contract: the AutoTP ranks' reports add up to the HF engine's report of the same selection
    (per kind), their local ranges map back to exactly its global rows, and merge unhooks every engine."""
    c = results[stage]
    ranks = c["ranks"]
    total = {k: sum(r["report_per_kind"][k] for r in ranks) for k in c["ref_per_kind"]}
    assert total == c["ref_per_kind"]
    merged_rows: dict[str, list] = {}
    for r in ranks:
        for name, rows in r["report_global"].items():
            merged_rows.setdefault(name, []).extend(rows)
    from alps_ds.layout import merge_ranges

    assert {k: [list(r) for r in merge_ranges(map(tuple, v))] for k, v in merged_rows.items()} == c["ref_rows"]
    assert all(r["merge_kept_rows"] and r["left_hooked"] == 0 for r in ranks)


def test_rank_without_selected_rows_is_refused_before_sharding():
    """With 1 kv head and autotp_size 2, rank 1 holds no attention rows: DeepSpeed ZeRO would stop
    it with 'zero stage 2 requires an optimizer' while rank 0 waits; every rank gets this instead."""
    from alps_ds.arch import AttentionSpec
    from alps_ds.errors import AlpsError
    from alps_ds.parallel import autotp
    from alps_ds.selection import HeadSelection, Provenance
    from alps_ds.tiny import build_model, tiny_config

    config = tiny_config("llama", layers=2, hidden=48, heads=4, kv_heads=1, head_dim=12, vocab=64, intermediate=64)
    model = build_model(config)
    spec = AttentionSpec.from_config(config)
    selection = HeadSelection(spec.fingerprint, ((0, 2), (1, 0)), Provenance("explicit"))
    with pytest.raises(AlpsError, match=r"tp rank\(s\) \[1\] of 2 hold none of the selected rows"):
        autotp.shard(model, 2, selection=selection)
    assert type(model.model.layers[0].self_attn.q_proj) is torch.nn.Linear  # nothing was sharded


def test_apply_on_an_unsharded_model_is_refused_and_changes_nothing():
    """AutoTP apply hooks local rows of a sharded model; on a plain one it would train wrong rows."""
    from alps_ds.arch import AttentionSpec
    from alps_ds.errors import AlpsError
    from alps_ds.parallel import autotp
    from alps_ds.selection import HeadSelection, Provenance
    from alps_ds.tiny import build_model, tiny_config

    config = tiny_config("llama", layers=2, hidden=48, heads=4, kv_heads=2, head_dim=12, vocab=64, intermediate=64)
    model = build_model(config)
    spec = AttentionSpec.from_config(config)
    selection = HeadSelection(spec.fingerprint, ((0, 2),), Provenance("explicit"))
    with pytest.raises(AlpsError, match=r"not sharded; call alps_ds\.parallel\.autotp\.shard"):
        autotp.apply(model, selection)
    assert all(p.requires_grad for p in model.parameters())  # nothing frozen, nothing hooked
    assert type(model.model.layers[0].self_attn.q_proj) is torch.nn.Linear
