"""Hostfile and SLURM node-list parsing: examples, clean errors on bad input, and hypothesis round trips."""

from __future__ import annotations

import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from alps_ds.errors import AlpsError
from alps_ds.launcher.hosts import (
    Host,
    expand_nodelist,
    format_hostfile,
    gpus_per_node,
    parse_hostfile_text,
    read_hostfile,
    slurm_job,
    write_hostfile,
)


def test_hostfile_slots_comments_blank_lines():
    text = "# cluster A\n\nnode01 slots=8   # first\n  node02 slots=4\n#node03 slots=8\n"
    assert parse_hostfile_text(text) == [Host("node01", 8), Host("node02", 4)]


@pytest.mark.parametrize(
    ("text", "line", "words"),
    [
        ("node01 slots=8\nnode02\n", 2, "HOST slots=N"),
        ("node01 slots=eight\n", 1, "HOST slots=N"),
        ("node01 slots=0\n", 1, "at least 1"),
        ("node01 slots=2\nnode01 slots=2\n", 2, "already listed on line 1"),
        ("node$(reboot) slots=2\n", 1, "host name"),
        ("-oProxyCommand slots=2\n", 1, "host name"),
        ("a slots=1 extra\n", 1, "HOST slots=N"),
    ],
)
def test_bad_hostfile_lines_name_file_line_and_fix(text, line, words):
    with pytest.raises(AlpsError) as e:
        parse_hostfile_text(text, "hf")
    assert f"hf:{line}:" in str(e.value) and words in str(e.value)


def test_empty_and_unreadable_hostfiles(tmp_path):
    with pytest.raises(AlpsError, match="no hosts"):
        parse_hostfile_text("# nothing\n\n", "hf")
    with pytest.raises(AlpsError, match="cannot read"):
        read_hostfile(tmp_path / "missing")
    (tmp_path / "bin").write_bytes(b"\xff\xfe\x00")
    with pytest.raises(AlpsError, match="cannot read"):
        read_hostfile(tmp_path / "bin")


def test_write_hostfile_is_atomic_and_reads_back(tmp_path):
    hosts = [Host("gpu01", 8), Host("gpu02", 8)]
    path = write_hostfile(tmp_path / "sub" / "hf", hosts)
    assert read_hostfile(path) == hosts
    assert [p.name for p in path.parent.iterdir()] == ["hf"]  # no temp file left behind


@pytest.mark.parametrize(
    ("nodelist", "hosts"),
    [
        ("gpu[01-03,07],cpu5", ["gpu01", "gpu02", "gpu03", "gpu07", "cpu5"]),
        ("node7", ["node7"]),
        ("n[8-11]", ["n8", "n9", "n10", "n11"]),
        ("n[098-101]", ["n098", "n099", "n100", "n101"]),
        ("rack[1-2]-n[1,3]", ["rack1-n1", "rack1-n3", "rack2-n1", "rack2-n3"]),
        ("a,b[1-2],c", ["a", "b1", "b2", "c"]),
        ("x[0]", ["x0"]),
    ],
)
def test_expand_nodelist_examples(nodelist, hosts):
    assert expand_nodelist(nodelist) == hosts


@pytest.mark.parametrize(
    ("nodelist", "words"),
    [
        ("", "empty"),
        ("gpu[01-03", "brackets"),
        ("gpu01-03]", "brackets"),
        ("gpu[3-1]", "backwards"),
        ("gpu[a-b]", "N or N-M"),
        ("gpu[1-]", "N or N-M"),
        ("gpu[[1]]", "brackets"),
        ("a,,b", "empty entry"),
        ("gpu[0-99999999]", "over"),
        ("g[1-2],g1", "twice"),
        ("bad host", "host name"),
    ],
)
def test_bad_nodelists_are_clean_errors(nodelist, words):
    with pytest.raises(AlpsError, match=words):
        expand_nodelist(nodelist)


def test_slurm_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))  # no scontrol: our own parser
    env = {
        "SLURM_JOB_NODELIST": "gpu[01-02,07]",
        "SLURM_NNODES": "3",
        "SLURM_NODEID": "2",
        "SLURM_GPUS_ON_NODE": "4",
        "SLURM_JOB_ID": "99",
    }
    job = slurm_job(env)
    assert [h.name for h in job.hosts] == ["gpu01", "gpu02", "gpu07"]
    assert {h.slots for h in job.hosts} == {4} and job.node_rank == 2 and job.job_id == "99"
    assert gpus_per_node({"SLURM_GPUS_PER_NODE": "a100:8"}) == 8
    assert gpus_per_node({"CUDA_VISIBLE_DEVICES": "0,1,2"}) == 3
    assert gpus_per_node({}) is None
    with pytest.raises(AlpsError, match="SLURM_NNODES"):
        slurm_job({**env, "SLURM_NNODES": "2"})
    with pytest.raises(AlpsError, match="SLURM_NODEID"):
        slurm_job({**env, "SLURM_NODEID": "3"})
    with pytest.raises(AlpsError, match="no GPU count"):
        slurm_job({k: v for k, v in env.items() if k != "SLURM_GPUS_ON_NODE"})
    with pytest.raises(AlpsError, match="SLURM_JOB_NODELIST is unset"):
        slurm_job({})


def test_scontrol_is_used_when_present(tmp_path, monkeypatch):
    """A real executable named scontrol on PATH (here one that prints a fixed expansion) is preferred."""
    fake = tmp_path / "scontrol"
    fake.write_text("#!/bin/sh\n[ \"$1 $2\" = 'show hostnames' ] && printf 'z1\\nz2\\n'\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", str(tmp_path))
    job = slurm_job({"SLURM_JOB_NODELIST": "whatever[1-2]", "SLURM_NNODES": "2", "SLURM_GPUS_ON_NODE": "1"})
    assert [h.name for h in job.hosts] == ["z1", "z2"]


# ---- properties ------------------------------------------------------------------------------------
prefixes = st.from_regex(r"[a-z][a-z0-9-]{0,6}[a-z-]", fullmatch=True)


@st.composite
def host_lists(draw):
    """Distinct host names as clusters name them: prefix + zero-padded number, or bare names."""
    names: list[str] = []
    for _ in range(draw(st.integers(1, 5))):
        prefix = draw(prefixes)
        width = draw(st.integers(1, 4))
        nums = draw(st.lists(st.integers(0, 10**width - 1), min_size=1, max_size=12, unique=True))
        if draw(st.booleans()):
            nums.sort()
        names += [f"{prefix}{str(n).zfill(width)}" for n in nums]
        if draw(st.booleans()):
            names.append(draw(st.from_regex(r"[a-z][a-z_.]{0,8}", fullmatch=True)))
    return list(dict.fromkeys(names))


def compress_nodelist(hosts: list[str]) -> str:
    """Test helper, the inverse of :func:`expand_nodelist` for names ending in digits: runs of one prefix and
    padding become ``prefix[a-b,c]``; order is kept (only neighbours are merged)."""
    groups: list[tuple[str, int, list[int]] | str] = []
    for name in hosts:
        m = re.fullmatch(r"(.*?)(\d+)", name)
        if not m or "[" in name:
            groups.append(name)
            continue
        prefix, digits = m.group(1), m.group(2)
        # Padding is only unambiguous when every number of the group has the same width.
        last = groups[-1] if groups else None
        if (
            isinstance(last, tuple)
            and last[0] == prefix
            and last[1] == len(digits)
            and int(digits) > last[2][-1]
            and digits == str(int(digits)).zfill(len(digits))
        ):
            last[2].append(int(digits))
        elif digits == str(int(digits)).zfill(len(digits)):
            groups.append((prefix, len(digits), [int(digits)]))
        else:
            groups.append(name)
    parts = []
    for g in groups:
        if isinstance(g, str):
            parts.append(g)
            continue
        prefix, width, nums = g
        runs, start = [], nums[0]
        for prev, cur in zip(nums, [*nums[1:], None]):
            if cur is None or cur != prev + 1:
                runs.append(
                    str(start).zfill(width) if start == prev else f"{str(start).zfill(width)}-{str(prev).zfill(width)}"
                )
                start = cur
        parts.append(f"{prefix}[{','.join(runs)}]")
    return ",".join(parts)


@settings(max_examples=150, deadline=None)
@given(host_lists())
def test_nodelist_round_trip(hosts):
    text = compress_nodelist(hosts)
    assert expand_nodelist(text) == hosts
    assert len(text) <= sum(len(h) + 1 for h in hosts) + 2 * len(hosts)


@settings(max_examples=150, deadline=None)
@given(host_lists(), st.lists(st.integers(1, 64), min_size=1, max_size=60))
def test_hostfile_round_trip(names, slots):
    hosts = [Host(n, slots[i % len(slots)]) for i, n in enumerate(names)]
    assert parse_hostfile_text(format_hostfile(hosts)) == hosts


garbage = st.text(alphabet=st.sampled_from("ab01-9[],: =#\n\tslots=x$;é²"), max_size=40) | st.text(max_size=30)


@settings(max_examples=400, deadline=None)
@given(garbage)
def test_garbage_nodelists_give_only_alps_errors(text):
    try:
        hosts = expand_nodelist(text)
    except AlpsError as e:
        assert "\n" not in str(e)
    else:
        assert hosts and all(h and " " not in h for h in hosts)


@settings(max_examples=400, deadline=None)
@given(garbage)
def test_garbage_hostfiles_give_only_alps_errors(text):
    try:
        hosts = parse_hostfile_text(text, "hf")
    except AlpsError as e:
        assert "\n" not in str(e) and str(e).startswith("hf")
    else:
        assert all(h.slots >= 1 for h in hosts)
