"""TP/PP head mapping: shard real weights the way each engine does, mark the per-rank local
rows, gather back, and check exactly the selected heads' rows are marked; pipeline places
against megatron-core's own offset code; the ``alps-ds layout`` CLI."""

from __future__ import annotations

import json
import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from alps_ds.arch import AttentionSpec
from alps_ds.choose import top_k
from alps_ds.cli import main
from alps_ds.errors import AlpsError
from alps_ds.parallel.mapping import PipelineSplit, TensorParallel, local_rows, plan, rebalance
from alps_ds.selection import HeadSelection, Provenance


def make_spec(layers: int, n: int, g: int, hd: int, model_type: str = "llama") -> AttentionSpec:
    cfg = dict(
        model_type=model_type,
        num_hidden_layers=layers,
        hidden_size=n * hd,
        num_attention_heads=n,
        num_key_value_heads=g,
        head_dim=hd,
    )
    return AttentionSpec.from_config(cfg)


# ---- independent model of each engine's weights ------------------------------------------
# Every row carries a label: its index in the HF fused order [Q; K; V]. Each layout's full
# weight is built from the HF q/k/v row blocks the way that engine's converter does, so the
# expected set of labels never goes through mapping.py.


def hf_blocks(n: int, g: int, hd: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    labels = torch.arange((n + 2 * g) * hd)
    return labels[: n * hd], labels[n * hd : (n + g) * hd], labels[(n + g) * hd :]


def full_weights(layout: str, n: int, g: int, hd: int) -> dict[str, torch.Tensor]:
    q, k, v = hf_blocks(n, g, hd)
    if layout in ("hf", "autotp"):
        return {"q_proj": q, "k_proj": k, "v_proj": v}
    if layout == "fused":
        return {"qkv_proj": torch.cat([q, k, v])}
    if layout == "neox":  # per head [q_h; k_h; v_h]
        return {
            "query_key_value": torch.cat(
                [
                    torch.cat([q[h * hd : (h + 1) * hd], k[h * hd : (h + 1) * hd], v[h * hd : (h + 1) * hd]])
                    for h in range(n)
                ]
            )
        }
    m = n // g  # megatron: per group [q of its m heads; k_j; v_j]
    return {
        "linear_qkv": torch.cat(
            [
                torch.cat([q[j * m * hd : (j + 1) * m * hd], k[j * hd : (j + 1) * hd], v[j * hd : (j + 1) * hd]])
                for j in range(g)
            ]
        )
    }


def shard(layout: str, module: str, w: torch.Tensor, T: int, n: int, g: int) -> list[torch.Tensor]:
    """Split a full weight over T ranks exactly as the engine does."""
    if layout == "autotp":
        from deepspeed.module_inject.tp_shard import AutoTPMeta, get_shard_size_list

        meta = AutoTPMeta(num_kv_heads=g, num_attention_heads=n)
        sizes = get_shard_size_list(w.shape[0], T, meta, f"model.layers.0.self_attn.{module}")
        return list(torch.split(w, sizes))
    if layout == "fused":  # rank t: [Q_t; K_t; V_t]
        hd = w.shape[0] // (n + 2 * g)
        q, k, v = w[: n * hd], w[n * hd : (n + g) * hd], w[(n + g) * hd :]
        return [torch.cat(parts) for parts in zip(q.chunk(T), k.chunk(T), v.chunk(T))]
    return list(w.chunk(T))  # hf colwise, neox, megatron: contiguous t-th 1/T


def unshard(layout: str, shards: list[torch.Tensor], n: int, g: int) -> torch.Tensor:
    if layout != "fused":
        return torch.cat(shards)
    T = len(shards)
    hd = sum(s.shape[0] for s in shards) // (n + 2 * g)
    q, kv = n * hd // T, g * hd // T
    return torch.cat([s[:q] for s in shards] + [s[q : q + kv] for s in shards] + [s[q + kv :] for s in shards])


def expected_labels(heads, n: int, g: int, hd: int, kv: str) -> dict[int, set[int]]:
    q, k, v = hf_blocks(n, g, hd)
    out: dict[int, set[int]] = {}
    for layer, h in heads:
        rows = set(q[h * hd : (h + 1) * hd].tolist())
        if kv == "group":
            j = h // (n // g)
            rows |= set(k[j * hd : (j + 1) * hd].tolist()) | set(v[j * hd : (j + 1) * hd].tolist())
        out.setdefault(layer, set()).update(rows)
    return out


@st.composite
def geometries(draw):
    """(layout, n, g, hd, T) allowed by the layout's rules."""
    layout = draw(st.sampled_from(["hf", "fused", "neox", "megatron", "autotp"]))
    T = draw(st.integers(1, 8))
    hd = draw(st.sampled_from([2, 4, 8]))
    if layout in ("hf", "fused"):
        g = T * draw(st.integers(1, 3))
        n = g * draw(st.integers(1, 3))
    elif layout == "neox":
        n = g = T * draw(st.integers(1, 3))
    elif layout == "megatron":
        if draw(st.booleans()):
            g = T * draw(st.integers(1, 3))
            n = g * draw(st.integers(1, 3))
        else:  # fewer groups than ranks: heads straddle ranks
            g = draw(st.sampled_from([d for d in range(1, T + 1) if T % d == 0]))
            n = T * draw(st.integers(1, 3))
            hd = 2 * T  # (n + 2g) * hd must divide by T
    else:  # autotp: any T, uneven groups, possibly more ranks than groups
        g = draw(st.integers(1, 8))
        n = g * draw(st.integers(1, 3))
    return layout, n, g, hd, T


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(geo=geometries(), layers=st.integers(1, 3), kv=st.sampled_from(["group", "none"]), data=st.data())
def test_sharded_marks_gather_to_exactly_the_selected_rows(geo, layers, kv, data):
    layout, n, g, hd, T = geo
    spec = make_spec(layers, n, g, hd, "gpt_neox" if layout == "neox" else "llama")
    heads = data.draw(st.sets(st.tuples(st.integers(0, layers - 1), st.integers(0, n - 1))))
    p = plan(spec, heads, tp=T, layout=layout, kv=kv)
    last = local_rows(spec, heads, layout=layout, tp=T, tp_rank=T - 1, kv=kv)  # one rank's view
    assert last == {(e.layer, e.module): e.rows for e in p.entries if e.tp_rank == T - 1}
    want = expected_labels(heads, n, g, hd, kv)
    for layer in range(layers):
        marked: set[int] = set()
        for module, w in full_weights(layout, n, g, hd).items():
            shards = shard(layout, module, w, T, n, g)
            marks = [torch.zeros(s.shape[0], dtype=torch.int64) for s in shards]
            for e in p.entries:
                if e.layer == layer and e.module == module:
                    assert e.rows and all(0 <= a < b <= shards[e.tp_rank].shape[0] for a, b in e.rows)
                    marks[e.tp_rank][e.indices()] += 1
            full_marks = unshard(layout, marks, n, g)
            assert torch.equal(unshard(layout, shards, n, g), w)  # the sharding model is a real split
            assert full_marks.max().item() <= 1 if full_marks.numel() else True  # nothing marked twice
            marked |= set(w[full_marks == 1].tolist())
        assert marked == want.get(layer, set())


def test_autotp_sizes_match_deepspeed_and_ranks_past_groups_are_empty():
    from deepspeed.module_inject.tp_shard import AutoTPMeta, get_shard_size_list

    spec = make_spec(1, 6, 3, 4)
    tensor = TensorParallel(spec, "autotp", 4)
    for module in ("q_proj", "k_proj", "v_proj"):
        ds = get_shard_size_list(spec.module_rows(module), 4, AutoTPMeta(num_kv_heads=3), f"self_attn.{module}")
        assert tensor.shard_sizes(module) == list(ds)
    assert tensor.shard_sizes("q_proj") == [8, 8, 8, 0]
    p = plan(spec, [(0, h) for h in range(6)], tp=4, layout="autotp")
    assert {e.tp_rank for e in p.entries} == {0, 1, 2}


@given(geo=geometries(), data=st.data())
def test_globalize_undoes_localize_on_every_rank(geo, data):
    layout, n, g, hd, T = geo
    spec = make_spec(1, n, g, hd, "gpt_neox" if layout == "neox" else "llama")
    tensor = TensorParallel(spec, layout, T)
    for module in tensor.modules:
        total = tensor.module_rows(module)
        rows = set(data.draw(st.lists(st.integers(0, total - 1), max_size=total)))
        ranges = [(r, r + 1) for r in sorted(rows)]
        for rank in range(T):
            held = {r for a, b in tensor.segments(module, rank) for r in range(a, b)}
            back = tensor.globalize(module, rank, tensor.localize(module, rank, ranges))
            assert {r for a, b in back for r in range(a, b)} == rows & held


def test_megatron_heads_straddle_ranks_when_groups_fewer_than_tp():
    spec = make_spec(1, 4, 1, 8)  # rows (4 + 2) * 8 = 48, 12 per rank at T=4
    p = plan(spec, [(0, 1)], tp=4, layout="megatron", kv="none")
    assert [(e.tp_rank, e.rows) for e in p.entries] == [(0, ((8, 12),)), (1, ((0, 4),))]


# ---- pipeline -------------------------------------------------------------------------------


@st.composite
def pipelines(draw):
    P = draw(st.integers(1, 4))
    V = draw(st.integers(1, 3)) if P > 1 else 1  # megatron: virtual stages need pipelining
    first = last = None
    if P > 2 and draw(st.booleans()):
        first = V * draw(st.integers(0, 3))
    if P > 2 and draw(st.booleans()):
        last = V * draw(st.integers(0, 3))
    middle = P - (first is not None) - (last is not None)
    L = (first or 0) + (last or 0) + middle * V * draw(st.integers(1, 3))
    return L, P, V, first, last


@settings(max_examples=80, deadline=None)
@given(pipelines())
def test_pipeline_places_match_megatron_core(geo):
    """Global layer = megatron-core's own offset of (stage, virtual stage) + local index."""
    pytest.importorskip("megatron.core")
    from types import SimpleNamespace

    from megatron.core.transformer.transformer_block import get_num_layers_to_build
    from megatron.core.transformer.transformer_layer import get_transformer_layer_offset

    L, P, V, first, last = geo
    cfg = SimpleNamespace(
        num_layers=L,
        pipeline_model_parallel_size=P,
        virtual_pipeline_model_parallel_size=V if V > 1 else None,
        pipeline_model_parallel_layout=None,
        num_layers_in_first_pipeline_stage=first,
        num_layers_in_last_pipeline_stage=last,
        account_for_embedding_in_pipeline_split=False,
        account_for_loss_in_pipeline_split=False,
        mtp_num_layers=None,
    )
    split = PipelineSplit.megatron(L, P, V, first=first, last=last)
    seen = []
    for p in range(P):
        for v in range(V):
            vp = v if V > 1 else None
            offset = get_transformer_layer_offset(cfg, vp_stage=vp, pp_rank=p)
            count = get_num_layers_to_build(cfg, vp_stage=vp, pp_rank=p)
            for i in range(count):
                place = split.place(offset + i)
                assert (place.pp_rank, place.vpp_rank, place.local_layer) == (p, v, i)
                seen.append(offset + i)
    assert sorted(seen) == list(range(L))


def test_pipeline_from_deepspeed_partition():
    from deepspeed.runtime.utils import partition_uniform

    L = 7
    parts = partition_uniform(L + 2, 3)  # layer specs: embedding, 7 blocks, head
    split = PipelineSplit.from_boundaries(parts, L, first_layer=1)
    for layer in range(L):
        idx = layer + 1
        stage = next(s for s in range(3) if parts[s] <= idx < parts[s + 1])
        on_stage = [i for i in range(L) if parts[stage] <= i + 1 < parts[stage + 1]]
        place = split.place(layer)
        assert (place.pp_rank, place.vpp_rank, place.local_layer) == (stage, 0, on_stage.index(layer))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(tp=4, layout="hf"), "query heads do not split over tp 4"),
        (dict(tp=3, layout="hf"), "kv heads do not split"),
        (dict(tp=3, layout="megatron"), "need g % T == 0 or T % g == 0"),
        (dict(tp=2, layout="neox"), "num_kv_heads == num_heads"),
        (dict(tp=0, layout="autotp"), "positive integer"),
    ],
)
def test_incompatible_tp_is_one_line_error(kwargs, message):
    spec = make_spec(2, 6, 2, 4)
    with pytest.raises(AlpsError, match=message):
        plan(spec, [(0, 0)], **kwargs)


def test_heads_outside_model_and_bad_pipeline_are_errors():
    spec = make_spec(2, 4, 2, 4)
    with pytest.raises(AlpsError, match=r"head \[2, 0\] is outside the model"):
        plan(spec, [(2, 0)], tp=2, layout="megatron")
    with pytest.raises(AlpsError, match="do not split over 3 pipeline stages"):
        PipelineSplit.megatron(4, 3)
    with pytest.raises(AlpsError, match="do not split into vpp 4 virtual stages"):
        PipelineSplit.megatron(4, 2, 4)


def test_library_errors_name_the_argument_not_a_flag():
    """``alps-ds layout`` checks --pp/--vpp/--rebalance itself first; the library names its arguments."""
    spec = make_spec(2, 4, 2, 4)
    tensor, pipeline = TensorParallel(spec, "hf", 2), PipelineSplit.even(2, 2)
    cases = [
        (lambda: PipelineSplit.megatron(4, 0), "^pp 0 must be a positive integer"),
        (lambda: PipelineSplit.megatron(4, 2, 0), "^vpp 0 must be a positive integer"),
        (lambda: PipelineSplit.megatron(4, 2, first=-1), "^first -1 / last None: pipeline stage layer counts"),
        (lambda: rebalance([[1.0] * 4] * 2, [(0, 0)], tensor, pipeline, cap=0), "^rebalance: cap 0 must be >= 1"),
        (
            lambda: rebalance([[1.0] * 4] * 2, [(i, h) for i in range(2) for h in range(4)], tensor, pipeline, cap=1),
            "^rebalance: cap 1 fits only 4 of 8 heads",  # one head on each of 2 x 2 ranks
        ),
    ]
    for build, message in cases:
        with pytest.raises(AlpsError, match=message) as e:
            build()
        assert "--" not in str(e.value)


# ---- rebalance ------------------------------------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(geo=geometries(), data=st.data())
def test_rebalance_keeps_count_respects_cap_and_is_optimal(geo, data):
    layout, n, g, hd, T = geo
    spec = make_spec(2, n, g, hd, "gpt_neox" if layout == "neox" else "llama")
    scores = data.draw(
        st.lists(st.lists(st.floats(0, 1, allow_nan=False), min_size=n, max_size=n), min_size=2, max_size=2)
    )
    k = data.draw(st.integers(1, 2 * n))
    heads = top_k(scores, k)
    tensor, pipe = TensorParallel(spec, layout, T), PipelineSplit.even(2)
    from alps_ds.parallel.mapping import balanced_cap, head_owners

    cap = balanced_cap(k, tensor, pipe)
    r = rebalance(scores, heads, tensor, pipe)
    assert len(r.heads) == k and r.cap >= cap
    counts: dict = {}
    for layer, h in r.heads:
        for o in head_owners(tensor, pipe, layer, h):
            counts[o] = counts.get(o, 0) + 1
    assert max(counts.values()) <= r.cap
    assert r.score_given_up >= -1e-12  # top-k is the unconstrained optimum
    owners_single = all(len(head_owners(tensor, pipe, layer, h)) == 1 for layer in range(2) for h in range(n))
    if owners_single:  # partition matroid: the capacity bound is tight, per-rank best `cap` heads optimal
        assert r.cap == cap
        per_rank: dict = {}
        for layer in range(2):
            for h in range(n):
                per_rank.setdefault(head_owners(tensor, pipe, layer, h)[0], []).append(scores[layer][h])
        best = sorted((s for v in per_rank.values() for s in sorted(v, reverse=True)[: r.cap]), reverse=True)[:k]
        assert math.isclose(r.score_after, sum(best), rel_tol=1e-9, abs_tol=1e-12)


# ---- CLI ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from alps_ds.tiny import tiny_config

    d = tmp_path_factory.mktemp("model")
    tiny_config("llama", layers=4, hidden=64, heads=8, kv_heads=2, head_dim=8).save_pretrained(d)
    return d


@pytest.fixture()
def heads_file(model_dir, tmp_path):
    spec = AttentionSpec.from_pretrained(model_dir)
    scores = [[float((7 * layer + 3 * h) % 11) for h in range(8)] for layer in range(4)]
    heads = top_k(scores, 6)
    sel = HeadSelection(spec.fingerprint, tuple(heads), Provenance("top-k", ratio=6 / 32), tuple(map(tuple, scores)))
    return sel.save(tmp_path / "heads.json")


def test_cli_json_matches_plan(model_dir, heads_file, capsys):
    args = ["layout", "--heads", str(heads_file), "--model", str(model_dir), "--tp", "4", "--pp", "2"]
    assert main([*args, "--layout", "megatron", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    spec = AttentionSpec.from_pretrained(model_dir)
    sel = HeadSelection.load(heads_file)
    expect = plan(spec, sel.heads, tp=4, layout="megatron", pipeline=PipelineSplit.even(4, 2))
    assert rows == [e.to_dict() for e in expect.entries]
    assert {"pp_rank", "tp_rank", "layer", "module", "rows"} <= set(rows[0])
    assert {r["pp_rank"] for r in rows} <= {0, 1} and all(r["module"] == "linear_qkv" for r in rows)
    # every selected layer appears, rows are local to a 1/4 shard of (8 + 4) * 8 rows
    assert {r["layer"] for r in rows} == {layer for layer, _ in sel.heads}
    assert all(0 <= a < b <= 24 for r in rows for a, b in r["rows"])


def test_cli_text_reports_ranks_elements_and_imbalance(model_dir, heads_file, capsys):
    assert main(["layout", "--heads", str(heads_file), "--model", str(model_dir), "--tp", "2"]) == 0
    out = capsys.readouterr().out
    spec = AttentionSpec.from_pretrained(model_dir)
    p = plan(spec, HeadSelection.load(heads_file).heads, tp=2, layout="hf")
    for (pp_rank, tp_rank), elements in p.rank_elements().items():
        assert f"pp {pp_rank} tp {tp_rank}: {elements:,} trainable elements" in out
    assert f"imbalance (max/mean trainable elements over 2 ranks): {p.imbalance():.3f}" in out
    assert "q_proj: rows [" in out


def test_cli_rebalance_writes_new_selection(model_dir, heads_file, tmp_path, capsys):
    out_file = tmp_path / "balanced.json"
    before = heads_file.read_bytes()
    args = ["layout", "--heads", str(heads_file), "--model", str(model_dir), "--tp", "2", "--pp", "2"]
    assert main([*args, "--layout", "megatron", "--rebalance", "--out", str(out_file)]) == 0
    text = capsys.readouterr().out
    assert heads_file.read_bytes() == before
    new = HeadSelection.load(out_file)
    old = HeadSelection.load(heads_file)
    assert len(new) == len(old) and new.provenance.select == "top-k+rebalance"
    spec = AttentionSpec.from_pretrained(model_dir)
    r = rebalance(old.scores, old.heads, TensorParallel(spec, "megatron", 2), PipelineSplit.even(4, 2))
    assert new.heads == r.heads and f"given up {r.score_given_up:.6g}" in text
    assert r.cap == 2  # 6 heads on 2 x 2 ranks
    assert "at most 2 per rank" in text


def test_cli_errors(model_dir, heads_file, tmp_path, capsys):
    base = ["layout", "--heads", str(heads_file), "--model", str(model_dir)]
    assert main([*base, "--tp", "3"]) == 2
    assert "do not split over tp 3" in capsys.readouterr().err
    other = tmp_path / "other"
    from alps_ds.tiny import tiny_config

    tiny_config("llama", layers=2, hidden=64, heads=8, kv_heads=2, head_dim=8).save_pretrained(other)
    assert main(["layout", "--heads", str(heads_file), "--model", str(other)]) == 2
    err = capsys.readouterr().err
    assert "made for another model" in err and "num_layers: 4 != 2" in err and err.count("\n") == 1
    no_scores = tmp_path / "noscores.json"
    HeadSelection(HeadSelection.load(heads_file).model, ((0, 0),), Provenance("explicit")).save(no_scores)
    assert main(["layout", "--heads", str(no_scores), "--model", str(model_dir), "--rebalance"]) == 2
    assert "needs the 'scores' matrix" in capsys.readouterr().err


def test_cli_uneven_and_virtual_pipeline(model_dir, heads_file, capsys):
    base = ["layout", "--heads", str(heads_file), "--model", str(model_dir), "--layout", "autotp", "--json"]
    assert main([*base, "--tp", "3", "--pp", "3", "--first-stage-layers", "2"]) == 0
    rows = json.loads(capsys.readouterr().out)
    stage_of = {r["layer"]: r["pp_rank"] for r in rows}
    assert all(stage_of[layer] == [0, 0, 1, 2][layer] for layer in stage_of)  # 4 layers as 2 + 1 + 1
    assert {r["tp_rank"] for r in rows} <= {0, 1}  # 2 kv groups over 3 ranks: rank 2 holds nothing
    assert main([*base, "--tp", "2", "--pp", "2", "--vpp", "2"]) == 0
    rows = json.loads(capsys.readouterr().out)
    place = {r["layer"]: (r["pp_rank"], r["vpp_rank"], r["local_layer"]) for r in rows}
    expect = {0: (0, 0, 0), 1: (1, 0, 0), 2: (0, 1, 0), 3: (1, 1, 0)}
    assert all(place[layer] == expect[layer] for layer in place)
    assert main([*base, "--tp", "2", "--pp", "3"]) == 2
    assert "do not split over 3 pipeline stages" in capsys.readouterr().err
