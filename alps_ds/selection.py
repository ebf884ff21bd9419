"""`HeadSelection`: the reusable artifact ALPS produces, stored as a versioned ``heads.json``.

A selection names query heads as 0-based ``[layer, head]`` pairs, carries the fingerprint
of the model it was made for (so it is never applied to the wrong model), how it was made,
and optionally the full ``layers x heads`` score matrix (so it can be re-cut or compared
later without re-reading checkpoints).
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from alps_ds.arch import AttentionSpec, ModelFingerprint
from alps_ds.errors import AlpsError
from alps_ds.fsutil import atomic_write_text

FORMAT = "alps-ds/heads"
VERSION = 1

Head = tuple[int, int]


@dataclass(frozen=True)
class Provenance:
    """How a selection was made. Fields that do not apply stay ``None``."""

    select: str  # top-k | random | layer-consistent | all | none | explicit | union | ...
    metric: str | None = None
    head_repr: str | None = None
    ratio: float | None = None
    seed: int | None = None
    dtype: str | None = None
    base: str | None = None
    task: str | None = None
    inputs: tuple[str, ...] | None = None  # files a combined/resized selection came from
    alps_ds_version: str | None = None

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        if d["inputs"] is not None:
            d["inputs"] = list(d["inputs"])
        return d


@dataclass(frozen=True)
class HeadSelection:
    """Selected query heads of one model (sorted, unique, in range), how they were chosen, and scores."""

    model: ModelFingerprint
    heads: tuple[Head, ...]
    provenance: Provenance
    scores: tuple[tuple[float, ...], ...] | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        heads = tuple(sorted({(int(layer), int(h)) for layer, h in self.heads}))
        object.__setattr__(self, "heads", heads)
        self._check()

    # ---- invariants ------------------------------------------------------------------
    def _check(self, source: str = "selection") -> None:
        L, n = self.model.num_layers, self.model.num_heads
        for layer, h in self.heads:
            if not (0 <= layer < L and 0 <= h < n):
                raise AlpsError(
                    f"{source}: head [{layer}, {h}] is outside the model ({L} layers x {n} heads); "
                    "heads are 0-based [layer, query_head]"
                )
        if self.scores is not None and (len(self.scores) != L or any(len(row) != n for row in self.scores)):
            raise AlpsError(f"{source}: 'scores' must be a {L} x {n} matrix (layers x heads)")

    # ---- views -------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.heads)

    def __contains__(self, head: object) -> bool:
        return head in set(self.heads)

    @property
    def ratio(self) -> float:
        """Fraction of all query heads selected."""
        return len(self.heads) / self.model.total_heads

    def by_layer(self) -> dict[int, tuple[int, ...]]:
        """Selected query heads of each layer that has any, in ascending order."""
        out: dict[int, list[int]] = {}
        for layer, h in self.heads:
            out.setdefault(layer, []).append(h)
        return {layer: tuple(hs) for layer, hs in out.items()}

    def score(self, layer: int, head: int) -> float | None:
        """The stored score of one head, or None when the selection carries no scores."""
        return None if self.scores is None else self.scores[layer][head]

    # ---- checks against a model ----------------------------------------------------------
    def check_model(self, spec: AttentionSpec | ModelFingerprint, *, source: str = "selection") -> None:
        """Fail with one line naming each differing field when made for another model."""
        fp = spec.fingerprint if isinstance(spec, AttentionSpec) else spec
        diff = self.model.diff(fp)
        if diff:
            raise AlpsError(
                f"{source}: made for another model ({'; '.join(diff)}; selection vs model); "
                "localize again for this model or pass the matching selection"
            )

    # ---- (de)serialization ---------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "version": VERSION,
            "model": self.model.to_dict(),
            "provenance": self.provenance.to_dict(),
            "num_heads_selected": len(self.heads),
            "heads": [list(h) for h in self.heads],
            "scores": None if self.scores is None else [list(r) for r in self.scores],
        }

    def to_json(self) -> str:
        """Indented JSON, but one line per 16 heads and per score row, so 512 heads stay readable."""
        items = []
        for key, value in self.to_dict().items():
            if key == "heads" and value:
                lines = [", ".join(json.dumps(h) for h in value[i : i + 16]) for i in range(0, len(value), 16)]
                body = "[\n  " + ",\n  ".join(lines) + "\n ]"
            elif key == "scores" and value:
                body = "[\n  " + ",\n  ".join(json.dumps(row, allow_nan=False) for row in value) + "\n ]"
            else:
                body = json.dumps(value, indent=1, allow_nan=False).replace("\n", "\n ")
            items.append(f" {json.dumps(key)}: {body}")
        return "{\n" + ",\n".join(items) + "\n}\n"

    def save(self, path: str | os.PathLike) -> Path:
        """Write ``path`` atomically (a crash leaves any previous file intact)."""
        path = Path(path)
        atomic_write_text(path, self.to_json())
        return path

    @classmethod
    def from_dict(cls, data: Any, *, source: str = "heads.json") -> HeadSelection:
        """Validate parsed heads.json content; every problem is one AlpsError starting with ``source``."""
        if not isinstance(data, dict):
            raise AlpsError(f"{source}: expected a JSON object; is this a heads.json written by alps-ds?")
        if data.get("format") != FORMAT:
            raise AlpsError(f"{source}: 'format' is {data.get('format')!r}, expected {FORMAT!r}; not a heads.json")
        version = data.get("version")
        if not isinstance(version, int) or isinstance(version, bool) or version < 1:
            raise AlpsError(f"{source}: 'version' must be a positive integer")
        if version > VERSION:
            raise AlpsError(f"{source}: written by a newer alps-ds (version {version} > {VERSION}); upgrade alps-ds")
        model = _fingerprint(data.get("model"), source)
        provenance = _provenance(data.get("provenance"), source)
        heads_raw = data.get("heads")
        if not isinstance(heads_raw, list):
            raise AlpsError(f"{source}: 'heads' must be a list of [layer, head] pairs")
        heads = []
        for i, pair in enumerate(heads_raw):
            if not (isinstance(pair, list) and len(pair) == 2 and all(_is_int(x) for x in pair)):
                raise AlpsError(f"{source}: heads[{i}] is {pair!r}; each entry must be [layer, head] integers")
            heads.append((pair[0], pair[1]))
        if len(set(heads)) != len(heads):
            raise AlpsError(f"{source}: 'heads' lists a head twice; each [layer, head] may appear once")
        scores = data.get("scores")
        if scores is not None:
            if not isinstance(scores, list) or not all(isinstance(r, list) for r in scores):
                raise AlpsError(f"{source}: 'scores' must be null or a list of rows (layers x heads)")
            if not all(_is_finite(x) for r in scores for x in r):
                raise AlpsError(f"{source}: 'scores' holds a non-number or non-finite value")
            scores = tuple(tuple(float(x) for x in r) for r in scores)
        try:
            return cls(model, tuple(heads), provenance, scores)
        except AlpsError as e:
            raise AlpsError(f"{source}: {str(e).removeprefix('selection: ')}") from None

    @classmethod
    def load(cls, path: str | os.PathLike, *, spec: AttentionSpec | None = None) -> HeadSelection:
        """Read and validate ``path`` (or the heads.json in a folder); with ``spec``, also check the model."""
        path = heads_file(path)
        try:
            text = path.read_text()
        except FileNotFoundError:
            raise AlpsError(f"{path}: no such file; run 'alps-ds localize' to make one") from None
        except (OSError, UnicodeDecodeError) as e:
            raise AlpsError(f"{path}: cannot read ({e})") from e
        try:
            data = json.loads(text)
        except (ValueError, RecursionError) as e:
            raise AlpsError(f"{path}: not valid JSON ({e}); restore it or localize again") from e
        sel = cls.from_dict(data, source=str(path))
        if spec is not None:
            sel.check_model(spec, source=str(path))
        return sel

    def with_heads(self, heads: list[Head] | tuple[Head, ...], provenance: Provenance) -> HeadSelection:
        """A new selection of the same model (and scores) with other heads."""
        return replace(self, heads=tuple(heads), provenance=provenance)


def heads_file(path: str | os.PathLike) -> Path:
    """``path``, or the heads.json inside it when it is a folder (what localize --out and train output.dir hold):
    every command that reads a selection accepts both."""
    path = Path(path)
    if path.is_dir():
        if not (path / "heads.json").is_file():
            raise AlpsError(f"{path}: a folder without heads.json; pass a heads.json (alps-ds localize writes one)")
        return path / "heads.json"
    return path


def is_heads_file(path: Path) -> bool:
    """Whether ``path`` holds a valid heads.json (an earlier output that may be replaced)."""
    try:
        HeadSelection.load(path)
    except AlpsError:
        return False
    return True


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_finite(x: Any) -> bool:
    if not isinstance(x, (int, float)) or isinstance(x, bool):
        return False
    try:
        return math.isfinite(x)
    except OverflowError:  # an int too large for a float
        return False


def _fingerprint(d: Any, source: str) -> ModelFingerprint:
    if not isinstance(d, dict):
        raise AlpsError(f"{source}: 'model' must be an object with the model fingerprint")
    values = {}
    for f in fields(ModelFingerprint):
        v = d.get(f.name)
        ok = isinstance(v, str) and v if f.type == "str" else _is_int(v) and v > 0
        if not ok:
            raise AlpsError(f"{source}: model.{f.name} is missing or invalid ({v!r})")
        values[f.name] = v
    return ModelFingerprint(**values)


def _provenance(d: Any, source: str) -> Provenance:
    if not isinstance(d, dict) or not isinstance(d.get("select"), str):
        raise AlpsError(f"{source}: 'provenance' must be an object with at least 'select'")
    known = {f.name for f in fields(Provenance)}
    kwargs = {k: v for k, v in d.items() if k in known}
    if kwargs.get("ratio") is not None and not _is_finite(kwargs["ratio"]):
        raise AlpsError(f"{source}: provenance.ratio must be a number")
    if kwargs.get("seed") is not None and not _is_int(kwargs["seed"]):
        raise AlpsError(f"{source}: provenance.seed must be an integer")
    for key in ("metric", "head_repr", "dtype", "base", "task", "alps_ds_version"):
        if kwargs.get(key) is not None and not isinstance(kwargs[key], str):
            raise AlpsError(f"{source}: provenance.{key} must be a string")
    if kwargs.get("inputs") is not None:
        if not isinstance(kwargs["inputs"], list) or not all(isinstance(x, str) for x in kwargs["inputs"]):
            raise AlpsError(f"{source}: provenance.inputs must be a list of strings")
        kwargs["inputs"] = tuple(kwargs["inputs"])
    return Provenance(**kwargs)
