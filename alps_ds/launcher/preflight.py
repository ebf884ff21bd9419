"""Pre-flight checks (``alps-ds check``, and ``alps-ds launch`` before it starts anything).

Each check yields one :class:`Finding`; a job with any failure is not launched. Checks that
lack their inputs (no model given, master on another host) are reported as skipped, never
silently passed.
"""

from __future__ import annotations

import contextlib
import os
import socket
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from alps_ds.arch import TP_LAYOUTS
from alps_ds.errors import AlpsError
from alps_ds.train.config import DEFAULT_ZERO_STAGE, ZERO_STAGES

Status = Literal["ok", "fail", "warn", "skip"]


@dataclass(frozen=True)
class Finding:
    check: str
    status: Status
    detail: str

    def line(self) -> str:
        return f"{self.status.upper():4} {self.check}: {self.detail}"


@dataclass
class CheckInputs:
    world_size: int
    tp: int = 1
    pp: int = 1
    model: str | None = None  # model folder / config.json
    heads: str | None = None  # heads.json
    ratio: float = 0.1  # for the memory plan when no heads.json is given
    kv: str = "group"
    train_others: tuple[str, ...] = ()
    layout: str | None = None  # tensor-parallel layout (alps_ds.parallel.mapping); None: the model's own
    zero: int = DEFAULT_ZERO_STAGE
    offload: bool = False
    dtype: str = "bf16"  # weights and gradients: bf16, fp16 or fp32 (alps_ds.plan.DTYPE_BYTES)
    gpu_mem_gib: float | None = None
    headroom: float = 0.1
    seq_len: int = 4096
    micro_batch: int = 1
    checkpointing: bool = True
    output_dir: str | None = None
    master_addr: str | None = None
    master_port: int | None = None
    max_imbalance: float | None = None  # fail above this max/mean trainable elements over ranks
    tp_conflict: str | None = None  # a --tp/--tp-layout the run config's parallel.tp contradicts
    run: object | None = None  # the train RunConfig: its inputs, batch, DeepSpeed JSON, data checked as train does
    notes: list[str] = field(default_factory=list)


def _local_addresses() -> set[str]:
    names = {"localhost", "127.0.0.1", "::1", "0.0.0.0", socket.gethostname(), socket.getfqdn()}
    with contextlib.suppress(OSError):
        names.add(socket.gethostbyname(socket.gethostname()))
    return names


def port_free(port: int, addr: str = "") -> bool:
    """True when a TCP listener could bind ``port`` here (what the rendezvous store will do)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind((addr, port))
        except OSError:
            return False
    return True


def writable_dir(path: str) -> str | None:
    """None when files can be created in ``path`` (or, if it does not exist yet, in its nearest
    existing parent); else the reason."""
    p = Path(path).expanduser().absolute()
    probe = p
    while not probe.exists():
        if probe.parent == probe:
            return f"no existing parent of {p}"
        probe = probe.parent
    if not probe.is_dir():
        return f"{probe} is a file, not a folder"
    try:
        fd, tmp = tempfile.mkstemp(prefix=".alps-ds-check.", dir=probe)
        os.close(fd)
        os.unlink(tmp)
    except OSError as e:
        return f"cannot create files in {probe} ({e.strerror})"
    return None


def run_checks(inp: CheckInputs) -> list[Finding]:
    """Every pre-flight check, one Finding each, in the order ``alps-ds check`` prints them."""
    out: list[Finding] = []
    add = out.append
    mp = inp.tp * inp.pp
    _world_check(inp, add)
    cfg, spec, heads = _model_checks(inp, add)
    if spec is not None and inp.pp > spec.num_layers:
        add(Finding("pipeline", "fail", f"--pp {inp.pp} exceeds the model's {spec.num_layers} layers"))
    if inp.tp_conflict:
        add(Finding("tensor parallel", "fail", inp.tp_conflict))
    elif spec is not None:
        _tp_checks(inp, spec, heads, add)
    else:
        add(Finding("tensor parallel", "skip", "no model config given (--model)"))
    if not inp.gpu_mem_gib:
        add(Finding("memory", "skip", "no GPU memory size given (--gpu-mem GIB)"))
    elif spec is None:
        add(Finding("memory", "skip", "no model config given (--model)"))
    elif min(inp.world_size, inp.tp, inp.pp) < 1 or inp.world_size % mp:
        add(Finding("memory", "skip", "the world size does not split over tp x pp"))
    else:
        _memory_check(inp, cfg, heads, add)
    _output_check(inp, add)
    if inp.run is not None:
        _run_checks(inp, add)
    _port_check(inp, add)
    return out


def _output_check(inp: CheckInputs, add) -> None:
    """The output folder can be written and train would accept it (train's own output.dir rules)."""
    if inp.output_dir:
        why = writable_dir(inp.output_dir) or _train_output(inp)
        add(Finding("output dir", "fail" if why else "ok", why or f"{inp.output_dir} is writable"))
    else:
        add(Finding("output dir", "skip", "no output folder given"))


def _world_check(inp: CheckInputs, add) -> None:
    """The world size splits into dp x tp x pp."""
    mp = inp.tp * inp.pp
    if inp.world_size < 1 or inp.tp < 1 or inp.pp < 1:
        add(Finding("world size", "fail", f"world {inp.world_size}, tp {inp.tp}, pp {inp.pp} must all be >= 1"))
    elif inp.world_size % mp:
        add(
            Finding(
                "world size",
                "fail",
                f"{inp.world_size} ranks are not divisible by tp x pp = {inp.tp} x {inp.pp}; "
                "change the node/GPU count or --tp/--pp",
            )
        )
    else:
        add(
            Finding(
                "world size", "ok", f"{inp.world_size} ranks = dp {inp.world_size // mp} x tp {inp.tp} x pp {inp.pp}"
            )
        )


def _model_checks(inp: CheckInputs, add):
    """Read the model config and the selection (made for that model?); returns (config, spec, heads), None if absent.
    TP compatibility, balance and memory need them."""
    cfg = spec = heads = None
    if inp.model:
        try:
            from alps_ds.arch import AttentionSpec
            from alps_ds.plan import load_config

            cfg = load_config(inp.model)
            spec = AttentionSpec.from_config(cfg, source=inp.model)
        except AlpsError as e:
            add(Finding("model", "fail", str(e)))
        else:
            add(_weights_finding(inp.model))
    if spec is None:
        add(Finding("selection", "skip", "no model config given (--model)"))
    elif inp.heads:
        from alps_ds.selection import HeadSelection

        try:
            heads = list(HeadSelection.load(inp.heads, spec=spec).heads)
            add(Finding("selection", "ok", f"{inp.heads}: {len(heads)} heads, made for this model"))
        except AlpsError as e:
            add(Finding("selection", "fail", str(e)))
    else:
        add(Finding("selection", "skip", "no heads.json given (--heads); the plan uses the worst case"))
    return cfg, spec, heads


def _port_check(inp: CheckInputs, add) -> None:
    """The master port is a TCP port and free here (checked only when this host is the master)."""
    if inp.master_port is None:
        add(Finding("master port", "skip", "no master port given"))
    elif not 0 < inp.master_port < 65536:
        add(Finding("master port", "fail", f"{inp.master_port} is not a TCP port (1-65535)"))
    elif inp.master_addr and inp.master_addr not in _local_addresses():
        add(Finding("master port", "skip", f"master {inp.master_addr} is another host; checked there"))
    elif port_free(inp.master_port):
        add(Finding("master port", "ok", f"{inp.master_port} is free here"))
    else:
        add(
            Finding(
                "master port",
                "fail",
                f"{inp.master_port} is in use on this host; pass another --master-port (or stop the old job)",
            )
        )


def _weights_finding(model: str) -> Finding:
    """The weights train and merge will read from a local model folder: present as safetensors, headers sound.
    A folder holding only config.json (planning before the download) is skipped, not passed."""
    from alps_ds.localize.reader import weight_shards

    folder = Path(model).expanduser()
    if not folder.is_dir():
        return Finding("weights", "skip", f"{model} is not a local model folder")
    try:
        shards = weight_shards(folder)
    except AlpsError as e:
        return Finding("weights", "fail", str(e))
    if shards:
        return Finding("weights", "ok", f"{len(set(shards.values()))} safetensors file(s), headers complete")
    if any(folder.glob("*.bin")) or any(folder.glob("*.pt")):
        return Finding("weights", "fail", f"{folder}: pickle weights only; alps-ds trains safetensors checkpoints only")
    return Finding("weights", "skip", f"{folder}: no weight files yet (config only)")


def _train_output(inp: CheckInputs) -> str | None:
    """Why ``alps-ds train`` would refuse the output folder (an input, a file, a folder it did not write)."""
    if inp.run is None:
        return None
    from dataclasses import replace

    from alps_ds.train.config import output_dir

    try:
        output_dir(replace(inp.run, output=replace(inp.run.output, dir=inp.output_dir)))
    except AlpsError as e:
        return str(e)
    return None


def _run_checks(inp: CheckInputs, add) -> None:
    """What ``alps-ds train`` checks of the run before it starts: batch vs ranks, the DeepSpeed JSON, local data."""
    from alps_ds.train.config import gradient_accumulation
    from alps_ds.train.data import check_local_dataset
    from alps_ds.train.engine_config import deepspeed_config

    run = inp.run
    try:
        accum = gradient_accumulation(run, inp.world_size)
        deepspeed_config(run, accum)
        add(
            Finding(
                "batch",
                "ok",
                f"train.batch {run.train.batch} = micro batch {run.train.micro_batch} x "
                f"{accum} accumulation x {inp.world_size} ranks",
            )
        )
    except AlpsError as e:
        add(Finding("batch", "fail", str(e)))
    try:
        for ds in run.data.datasets:
            check_local_dataset(ds)
        add(Finding("data", "ok", f"{len(run.data.datasets)} dataset(s) found (hub names are not checked)"))
    except AlpsError as e:
        add(Finding("data", "fail", str(e)))


def _tp_checks(inp: CheckInputs, spec, heads, add) -> None:
    """n and ng vs TP (alps_ds.parallel.mapping's rules), and per-rank trainable balance."""
    from alps_ds.parallel import mapping

    layout = inp.layout or spec.native_tp_layout
    try:
        mapping.TensorParallel(spec, layout, inp.tp)
        if layout == "autotp":  # the rules alps-ds train (parallel.tp) and the AutoTP hook apply
            from alps_ds.parallel.autotp import check_rules

            check_rules(spec, inp.tp, heads=heads, kv=inp.kv, train_others=inp.train_others)
    except AlpsError as e:
        add(Finding("tensor parallel", "fail", str(e)))
        return
    add(
        Finding(
            "tensor parallel",
            "ok",
            f"{spec.num_heads} heads / {spec.num_kv_heads} kv heads split over tp {inp.tp} ({layout})",
        )
    )
    if heads is None or inp.tp * inp.pp == 1:
        add(Finding("balance", "skip", "needs a heads.json and tp or pp > 1"))
        return
    try:
        pipeline = mapping.PipelineSplit.even(spec.num_layers, inp.pp)
        grid = mapping.plan(spec, heads, tp=inp.tp, layout=layout, pipeline=pipeline, kv=inp.kv)
    except AlpsError as e:
        add(Finding("balance", "fail", str(e)))
        return
    per_rank = grid.rank_elements()
    ratio = grid.imbalance()
    detail = (
        f"trainable elements per (pp, tp) rank: min {min(per_rank.values()):,}, max {max(per_rank.values()):,}; "
        f"max/mean {ratio:.2f}"
        if ratio is not None
        else "no rank trains anything"
    )
    if ratio is not None and inp.max_imbalance is not None and ratio > inp.max_imbalance:
        add(
            Finding("balance", "fail", f"{detail} > --max-imbalance {inp.max_imbalance}; rebalance with alps-ds layout")
        )
    else:
        add(Finding("balance", "warn" if ratio is not None and ratio > 1.5 else "ok", detail))


def _memory_check(inp: CheckInputs, cfg, heads, add) -> None:
    from alps_ds.plan import Activation, GiB, Parallel, make_plan

    try:
        plan = make_plan(
            cfg,
            ratio=inp.ratio,
            heads=heads,
            kv=inp.kv,
            train_others=inp.train_others,
            parallel=Parallel(inp.tp, inp.pp, inp.world_size // (inp.tp * inp.pp), inp.zero, inp.offload),
            activation=Activation(inp.seq_len, inp.micro_batch, inp.checkpointing),
            dtype=inp.dtype,
            gpu_mem_gib=inp.gpu_mem_gib,
            headroom=inp.headroom,
        )
    except AlpsError as e:
        add(Finding("memory", "fail", str(e)))
        return
    alps = plan.rows[0]
    fits = alps.total <= plan.usable
    detail = (
        f"{plan.verdict(alps)} per GPU, ZeRO-{inp.zero}{' + offload' if inp.offload else ''}, {inp.dtype}, "
        f"seq {inp.seq_len} x micro batch {inp.micro_batch}, checkpointing {'on' if inp.checkpointing else 'off'}"
    )
    if not fits:
        untried = [
            remedy
            for remedy, already in (
                ("activation checkpointing", inp.checkpointing),
                ("a smaller micro batch", inp.micro_batch == 1),
                ("ZeRO-3", inp.zero == 3),
                ("--offload", inp.offload),
            )
            if not already
        ]
        detail += f"; non-activation {alps.non_activation / GiB:.1f} GiB: try {', '.join([*untried, 'more GPUs'])}"
    add(Finding("memory", "ok" if fits else "fail", detail))


def failed(findings: list[Finding]) -> bool:
    return any(f.status == "fail" for f in findings)


def add_check_arguments(parser) -> None:
    """Options shared by ``alps-ds check`` and ``alps-ds launch``: what to check the job against."""
    from alps_ds.argtypes import integer, number, ratio

    g = parser.add_argument_group("pre-flight checks")
    g.add_argument("--model", metavar="CONFIG_OR_DIR", help="model folder or config.json (default: from the run YAML)")
    g.add_argument("--heads", metavar="HEADS_JSON", help="head selection (default: from the run YAML)")
    g.add_argument("--ratio", type=ratio, help="head ratio for the memory plan without --heads (default: YAML, 0.1)")
    g.add_argument("--tp", type=integer(1), help="tensor-parallel size (default: the run YAML's parallel.tp, 1)")
    g.add_argument("--pp", type=integer(1), default=1, help="pipeline-parallel size")
    g.add_argument(
        "--tp-layout",
        choices=tuple(TP_LAYOUTS),
        help="how TP splits Q/K/V (default: autotp when the run YAML sets parallel.tp, else the model's own)",
    )
    g.add_argument(
        "--zero",
        type=int,
        choices=ZERO_STAGES,
        help=f"ZeRO stage for the memory plan (default: YAML, {DEFAULT_ZERO_STAGE})",
    )
    g.add_argument("--offload", action="store_true", help="plan with ZeRO optimizer offload")
    g.add_argument("--gpu-mem", type=number(above=0), metavar="GIB", help="GPU memory in GiB; enables the memory check")
    g.add_argument(
        "--seq-len",
        type=integer(1),
        help="sequence length for the activation estimate (default: YAML data.max_length, 4096)",
    )
    g.add_argument("--micro-batch", type=integer(1), help="micro batch for the activation estimate (default: YAML, 1)")
    g.add_argument("--output-dir", metavar="DIR", help="where the job writes (default: from the run YAML)")
    g.add_argument(
        "--max-imbalance", type=number(above=0), help="fail when max/mean trainable elements over ranks exceeds it"
    )


def inputs_from_args(
    args, *, world_size: int, master_addr: str | None, master_port: int | None, run=None
) -> CheckInputs:
    """CheckInputs from CLI options, filling model/heads/output/ZeRO from a train run config ``run``."""
    inp = CheckInputs(
        world_size=world_size,
        tp=args.tp if args.tp is not None else 1,
        pp=args.pp,
        model=args.model,
        heads=args.heads,
        ratio=args.ratio if args.ratio is not None else 0.1,
        layout=args.tp_layout,
        zero=args.zero if args.zero is not None else DEFAULT_ZERO_STAGE,
        offload=args.offload,
        gpu_mem_gib=args.gpu_mem,
        seq_len=args.seq_len if args.seq_len is not None else 4096,
        micro_batch=args.micro_batch if args.micro_batch is not None else 1,
        output_dir=args.output_dir,
        master_addr=master_addr,
        master_port=master_port,
        max_imbalance=args.max_imbalance,
    )
    if run is not None:
        given = {name for name in ("zero", "ratio", "seq_len", "micro_batch", "tp") if getattr(args, name) is not None}
        fill_from_run(inp, run, given)
    return inp


def _tp_from_run(inp: CheckInputs, run, given: set[str]) -> None:
    """The TP size and layout ``alps-ds train`` will use: ``parallel.tp``, AutoTP when above 1."""
    tp = run.parallel.tp
    if "tp" in given and inp.tp != tp:
        inp.tp_conflict = (
            f"--tp {inp.tp} disagrees with {run.source}: parallel.tp {tp}, which alps-ds train uses; "
            "drop --tp or change parallel.tp"
        )
        return
    if tp > 1 and inp.layout not in (None, "autotp"):
        inp.tp_conflict = (
            f"--tp-layout {inp.layout}: alps-ds train shards parallel.tp {tp} with DeepSpeed AutoTP; "
            "drop --tp-layout (or pass autotp)"
        )
        return
    inp.tp = tp
    if tp > 1:
        inp.layout = "autotp"


def fill_from_run(inp: CheckInputs, run, given: set[str]) -> None:
    """Take what the run config (``alps_ds.train.config.RunConfig``) says where no option in ``given``
    overrides it: the shapes the job will train with, and its DeepSpeed config read as train reads it."""
    import json

    import torch

    from alps_ds.train.engine_config import DEFAULT_DS_CONFIG, train_dtype, zero_stage

    path = run.model.path or ""
    if inp.model is None and path and not path.startswith("tiny:"):
        inp.model = path
    if path.startswith("tiny:"):
        inp.notes.append(f"model {path} is built in code: model, selection and memory checks skipped")
    if inp.heads is None and run.selection.heads:
        inp.heads = run.selection.heads
    inp.run = run
    if inp.output_dir is None:
        inp.output_dir = run.output.dir
    inp.kv = run.kv
    inp.train_others = tuple(run.train_others)
    _tp_from_run(inp, run, given)
    if "ratio" not in given:  # selection.method all trains every head, whatever selection.ratio says
        inp.ratio = 1.0 if run.selection.method == "all" else run.selection.ratio
    if "seq_len" not in given:
        inp.seq_len = run.data.max_length
    if "micro_batch" not in given:
        inp.micro_batch = run.train.micro_batch
    inp.checkpointing = run.train.gradient_checkpointing
    ds = DEFAULT_DS_CONFIG if run.deepspeed is None else run.deepspeed
    try:
        if isinstance(ds, str):
            ds = json.loads(Path(ds).read_text())
        if "zero" not in given:
            inp.zero = zero_stage(ds)
        offload = ds.get("zero_optimization", {}).get("offload_optimizer") or {}
        inp.offload = inp.offload or offload.get("device") in ("cpu", "nvme")
        inp.dtype = {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(train_dtype(ds), "fp32")
    except (OSError, ValueError, AttributeError, TypeError):
        inp.notes.append(
            f"deepspeed config {run.deepspeed!r} unreadable here; planned with ZeRO-{inp.zero}, {inp.dtype}"
        )
