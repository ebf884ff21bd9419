"""heads.json: round trip, validation of every field, and the check against a model."""

from __future__ import annotations

import json

import pytest

from alps_ds.arch import AttentionSpec, ModelFingerprint
from alps_ds.errors import AlpsError
from alps_ds.selection import FORMAT, VERSION, HeadSelection, Provenance

FP = ModelFingerprint("llama", num_layers=3, num_heads=4, num_kv_heads=2, head_dim=8, hidden_size=32)
PROV = Provenance(select="top-k", metric="w1", head_repr="product", ratio=0.25, dtype="float32", base="b", task="t")
SCORES = tuple(tuple(0.1 * (layer * 4 + h) for h in range(4)) for layer in range(3))


def _sel(**kw) -> HeadSelection:
    return HeadSelection(kw.pop("model", FP), kw.pop("heads", ((2, 3), (0, 1), (1, 0))), kw.pop("prov", PROV), **kw)


def test_round_trip_keeps_every_field(tmp_path):
    sel = _sel(scores=SCORES)
    path = sel.save(tmp_path / "sub" / "heads.json")
    data = json.loads(path.read_text())
    assert data["format"] == FORMAT and data["version"] == VERSION
    assert data["heads"] == [[0, 1], [1, 0], [2, 3]]  # sorted [layer, head] pairs
    assert data["num_heads_selected"] == 3 and data["model"]["num_kv_heads"] == 2
    back = HeadSelection.load(path)
    assert back == sel and back.scores == SCORES and back.provenance == PROV
    assert back.ratio == 3 / 12 and back.by_layer() == {0: (1,), 1: (0,), 2: (3,)}
    assert (2, 3) in back and (2, 2) not in back and back.score(2, 3) == pytest.approx(1.1)
    assert not list(tmp_path.glob("sub/.heads.json.*"))  # no temp file left behind


def test_inputs_and_none_fields_round_trip(tmp_path):
    prov = Provenance(select="union", inputs=("a/heads.json", "b/heads.json"))
    sel = _sel(prov=prov, heads=())
    back = HeadSelection.load(sel.save(tmp_path / "h.json"))
    assert back.provenance.inputs == ("a/heads.json", "b/heads.json") and back.scores is None and len(back) == 0


def _dump(tmp_path, mutate) -> str:
    data = _sel(scores=SCORES).to_dict()
    mutate(data)
    p = tmp_path / "heads.json"
    p.write_text(json.dumps(data))
    return str(p)


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda d: d.update(format="other"), "not a heads.json"),
        (lambda d: d.update(version=VERSION + 1), "newer alps-ds"),
        (lambda d: d.update(version="1"), "'version' must be a positive integer"),
        (lambda d: d["model"].pop("head_dim"), "model.head_dim is missing"),
        (lambda d: d["model"].update(num_layers=0), "model.num_layers"),
        (lambda d: d.update(heads=[[0, 1], [0, 1]]), "lists a head twice"),
        (lambda d: d.update(heads=[[0, 1, 2]]), "heads[0]"),
        (lambda d: d.update(heads=[[3, 0]]), "outside the model (3 layers x 4 heads)"),
        (lambda d: d.update(heads=[[0, -1]]), "outside the model"),
        (lambda d: d.update(heads="0:1"), "'heads' must be a list"),
        (lambda d: d.update(scores=[[1.0] * 4] * 2), "'scores' must be a 3 x 4 matrix"),
        (lambda d: d["scores"][1].__setitem__(2, "x"), "non-finite"),
        (lambda d: d.update(provenance={}), "'provenance' must be an object"),
        (lambda d: d["provenance"].update(seed=1.5), "provenance.seed"),
        (lambda d: d["provenance"].update(metric=3), "provenance.metric"),
    ],
)
def test_invalid_files_fail_with_one_clear_line(tmp_path, mutate, message):
    path = _dump(tmp_path, mutate)
    with pytest.raises(AlpsError) as e:
        HeadSelection.load(path)
    text = str(e.value)
    assert message in text and path in text and "\n" not in text


def test_unreadable_files(tmp_path):
    with pytest.raises(AlpsError, match="no such file; run 'alps-ds localize'"):
        HeadSelection.load(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(AlpsError, match="not valid JSON"):
        HeadSelection.load(tmp_path / "bad.json")
    (tmp_path / "nan.json").write_text(json.dumps(_sel().to_dict()).replace('"scores": null', '"scores": [[NaN]]'))
    with pytest.raises(AlpsError, match="non-finite"):
        HeadSelection.load(tmp_path / "nan.json")


def test_check_model_names_each_difference(tmp_path):
    sel = _sel()
    same = AttentionSpec.from_config(
        dict(model_type="llama", num_hidden_layers=3, hidden_size=32, num_attention_heads=4, num_key_value_heads=2)
    )
    sel.check_model(same)
    path = sel.save(tmp_path / "heads.json")
    HeadSelection.load(path, spec=same)
    other = AttentionSpec.from_config(
        dict(model_type="qwen2", num_hidden_layers=5, hidden_size=32, num_attention_heads=4, num_key_value_heads=2)
    )
    with pytest.raises(AlpsError) as e:
        HeadSelection.load(path, spec=other)
    assert "model_type: llama != qwen2" in str(e.value) and "num_layers: 3 != 5" in str(e.value)
    assert "hidden_size" not in str(e.value)


def test_invalid_selections_in_memory():
    with pytest.raises(AlpsError, match="3 x 4 matrix"):
        _sel(scores=SCORES[:2])
    with pytest.raises(AlpsError, match="outside the model"):
        _sel(heads=((0, 4),))


def test_with_heads_keeps_model_and_scores():
    sel = _sel(scores=SCORES)
    new = sel.with_heads([(0, 0)], Provenance(select="explicit"))
    assert new.heads == ((0, 0),) and new.scores == SCORES and new.model == FP
