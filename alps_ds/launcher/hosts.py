"""Hostfiles (``host slots=N``) and SLURM node lists (``gpu[01-03,07],cpu5``).

Both parsers are strict: a line or list they cannot read raises :class:`AlpsError` naming
the file and line (or the offending text) and how to write it, never a traceback.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from alps_ds.errors import AlpsError
from alps_ds.fsutil import atomic_write_text

# Host names as DNS and SLURM allow them (letters, digits, '-', '_', '.'); a name that could be
# read as an option ('-x') is refused so it can never be taken for a launcher flag.
_HOST_RE = re.compile(r"[A-Za-z0-9_.][A-Za-z0-9_.-]*")
_SLOTS_RE = re.compile(r"slots=(\d+)")
# A node list longer than this is a typo (``n[0-9999999]``), not a cluster.
MAX_HOSTS = 100_000


@dataclass(frozen=True)
class Host:
    """One node and how many ranks (GPUs) it runs."""

    name: str
    slots: int


def valid_host(name: str) -> bool:
    return bool(_HOST_RE.fullmatch(name))


# ---- hostfiles -------------------------------------------------------------------------------
def parse_hostfile_text(text: str, source: str = "hostfile") -> list[Host]:
    """Hosts of a DeepSpeed-style hostfile: ``HOST slots=N`` per line, ``#`` comments, blank lines."""
    hosts: list[Host] = []
    seen: dict[str, int] = {}
    for lineno, raw in enumerate(text.splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        where = f"{source}:{lineno}"
        parts = line.split()
        if len(parts) != 2 or not _SLOTS_RE.fullmatch(parts[1]):
            raise AlpsError(f"{where}: {line!r} is not 'HOST slots=N'; write one host per line, e.g. 'node01 slots=8'")
        name, slots = parts[0], int(parts[1].split("=", 1)[1])
        if not valid_host(name):
            raise AlpsError(
                f"{where}: host name {name!r} has characters other than letters, digits, '.', '-', '_'; fix the name"
            )
        if slots < 1:
            raise AlpsError(f"{where}: {name} has slots={slots}; slots is the number of GPUs to use there, at least 1")
        if name in seen:
            raise AlpsError(f"{where}: host {name} already listed on line {seen[name]}; list each host once")
        seen[name] = lineno
        hosts.append(Host(name, slots))
    if not hosts:
        raise AlpsError(f"{source}: no hosts; write one 'HOST slots=N' line per node")
    return hosts


def read_hostfile(path: str | os.PathLike) -> list[Host]:
    path = Path(path)
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise AlpsError(f"{path}: cannot read the hostfile ({type(e).__name__}); pass an existing text file") from e
    return parse_hostfile_text(text, str(path))


def format_hostfile(hosts: Sequence[Host]) -> str:
    return "".join(f"{h.name} slots={h.slots}\n" for h in hosts)


def write_hostfile(path: str | os.PathLike, hosts: Sequence[Host]) -> Path:
    """Write ``hosts`` atomically (readers on other nodes never see half a file)."""
    path = Path(path)
    atomic_write_text(path, "# written by alps-ds launch\n" + format_hostfile(hosts))
    return path


# ---- SLURM node lists --------------------------------------------------------------------------
def _split_top(text: str) -> list[str]:
    """Split at commas outside brackets."""
    out, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        if ch == "[":
            depth += 1
        elif ch == "]":
            depth -= 1
        elif ch == "," and depth == 0:
            out.append(text[start:i])
            start = i + 1
    out.append(text[start:])
    return out


def _expand_range(body: str, nodelist: str) -> list[str]:
    """``01-03,07`` -> ['01', '02', '03', '07'] (the width of the lower bound sets the padding)."""
    out: list[str] = []
    for part in body.split(","):
        lo, sep, hi = part.partition("-")
        if not lo.isdigit() or (sep and not hi.isdigit()) or not lo.isascii() or not hi.isascii():
            raise AlpsError(
                f"node list {nodelist!r}: range {part!r} is not N or N-M; write e.g. 'gpu[01-04,07]' (digits only)"
            )
        if not sep:
            out.append(lo)
            continue
        a, b = int(lo), int(hi)
        if b < a:
            raise AlpsError(f"node list {nodelist!r}: range {part!r} runs backwards; write the smaller number first")
        if b - a >= MAX_HOSTS:
            raise AlpsError(f"node list {nodelist!r}: range {part!r} has over {MAX_HOSTS} nodes; check the numbers")
        out += [str(i).zfill(len(lo)) for i in range(a, b + 1)]
    return out


def _expand_item(item: str, nodelist: str) -> list[str]:
    """One comma-free (outside brackets) item, possibly several bracket groups: cartesian product."""
    names = [""]
    rest = item
    while rest:
        open_at = rest.find("[")
        if open_at < 0:
            if "]" in rest:
                raise AlpsError(f"node list {nodelist!r}: ']' without '['; balance the brackets")
            names = [n + rest for n in names]
            break
        close_at = rest.find("]", open_at)
        if close_at < 0:
            raise AlpsError(f"node list {nodelist!r}: '[' without ']'; balance the brackets")
        prefix, body = rest[:open_at], rest[open_at + 1 : close_at]
        if "]" in prefix or "[" in body:
            raise AlpsError(f"node list {nodelist!r}: nested or unbalanced brackets; write e.g. 'gpu[01-03,07],cpu5'")
        values = _expand_range(body, nodelist)
        if len(names) * len(values) > MAX_HOSTS:
            raise AlpsError(f"node list {nodelist!r} expands to over {MAX_HOSTS} nodes; check the ranges")
        names = [n + prefix + v for n in names for v in values]
        rest = rest[close_at + 1 :]
    for name in names:
        if not valid_host(name):
            raise AlpsError(
                f"node list {nodelist!r}: {name!r} is not a host name (letters, digits, '.', '-', '_'); "
                "write e.g. 'gpu[01-03,07],cpu5'"
            )
    return names


def expand_nodelist(nodelist: str) -> list[str]:
    """Expand a SLURM node list (``gpu[01-03,07],cpu5`` -> gpu01 gpu02 gpu03 gpu07 cpu5), order kept."""
    text = nodelist.strip()
    if not text:
        raise AlpsError("node list is empty; set SLURM_JOB_NODELIST or pass hosts, e.g. 'gpu[01-04]'")
    if text.count("[") != text.count("]"):
        raise AlpsError(f"node list {nodelist!r}: unbalanced brackets; write e.g. 'gpu[01-03,07],cpu5'")
    hosts: list[str] = []
    for item in _split_top(text):
        if not item:
            raise AlpsError(f"node list {nodelist!r}: empty entry between commas; remove the extra comma")
        hosts += _expand_item(item, nodelist)
        if len(hosts) > MAX_HOSTS:
            raise AlpsError(f"node list {nodelist!r} expands to over {MAX_HOSTS} nodes; check the ranges")
    dupes = sorted(h for h, count in Counter(hosts).items() if count > 1)
    if dupes:
        raise AlpsError(f"node list {nodelist!r} names a node twice ({', '.join(dupes[:3])}); list each node once")
    return hosts


def slurm_hostnames(nodelist: str) -> list[str]:
    """Expand with ``scontrol show hostnames`` when SLURM is installed, else with our own parser."""
    scontrol = shutil.which("scontrol")
    if scontrol:
        try:
            out = subprocess.run(
                [scontrol, "show", "hostnames", nodelist], capture_output=True, text=True, timeout=30, check=True
            ).stdout.split()
        except (OSError, subprocess.SubprocessError):
            out = []
        if out:
            return out
    return expand_nodelist(nodelist)


# ---- SLURM job environment -----------------------------------------------------------------------
@dataclass(frozen=True)
class SlurmJob:
    hosts: tuple[Host, ...]
    node_rank: int
    job_id: str


def gpus_per_node(env: dict[str, str] | os._Environ) -> int | None:
    """GPUs SLURM gave this node: SLURM_GPUS_ON_NODE, SLURM_GPUS_PER_NODE (``8``, ``a100:8``), or
    the count of CUDA_VISIBLE_DEVICES; None when none is set."""
    if env.get("SLURM_GPUS_ON_NODE", "").strip().isdigit():
        return int(env["SLURM_GPUS_ON_NODE"])
    per_node = env.get("SLURM_GPUS_PER_NODE", "").strip()
    if per_node:
        count = per_node.split("(")[0].split(",")[0].rsplit(":", 1)[-1]
        if not count.isdigit():
            raise AlpsError(f"SLURM_GPUS_PER_NODE={per_node!r}: no GPU count in it; pass --nproc-per-node")
        return int(count)
    visible = env.get("CUDA_VISIBLE_DEVICES", "").strip()
    if visible:
        return len([d for d in visible.split(",") if d.strip()])
    return None


def slurm_job(env: dict[str, str] | os._Environ, nproc_per_node: int | None = None) -> SlurmJob:
    """Hosts (with slots), this node's rank and the job id from a SLURM allocation's environment."""
    nodelist = env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
    if not nodelist:
        raise AlpsError("--slurm: SLURM_JOB_NODELIST is unset; run inside an allocation (sbatch/salloc/srun)")
    names = slurm_hostnames(nodelist)
    nnodes = env.get("SLURM_NNODES") or env.get("SLURM_JOB_NUM_NODES")
    if nnodes is not None and (not nnodes.isdigit() or int(nnodes) != len(names)):
        raise AlpsError(
            f"SLURM_NNODES={nnodes!r} but SLURM_JOB_NODELIST {nodelist!r} names {len(names)} nodes; "
            "run alps-ds launch inside the job step that owns the allocation"
        )
    node_id = env.get("SLURM_NODEID", "0")
    if not node_id.isdigit() or int(node_id) >= len(names):
        raise AlpsError(f"SLURM_NODEID={node_id!r} is not a node index below {len(names)}; check the srun step")
    slots = nproc_per_node or gpus_per_node(env)
    if not slots:
        raise AlpsError(
            "--slurm: no GPU count (SLURM_GPUS_ON_NODE, SLURM_GPUS_PER_NODE, CUDA_VISIBLE_DEVICES unset); "
            "request GPUs (--gpus-per-node) or pass --nproc-per-node"
        )
    return SlurmJob(tuple(Host(n, slots) for n in names), int(node_id), env.get("SLURM_JOB_ID", "nojob"))
