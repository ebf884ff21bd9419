"""Stand-in job for launch tests: join the process group, all-reduce the ranks, and record who took part.

Usage: rendezvous.py OUT.json. Rank 0 writes {"world_size", "rank_sum", "ranks": [{rank, local_rank,
node_rank, hostname, pid}]}; node_rank comes from the launcher (deepspeed CROSS_RANK, torchrun
GROUP_RANK) or is rank // LOCAL_WORLD_SIZE under mpirun.
"""

import json
import os
import socket
import sys

import deepspeed
import torch
import torch.distributed as dist


def node_rank() -> int:
    for name in ("CROSS_RANK", "GROUP_RANK"):
        if name in os.environ:
            return int(os.environ[name])
    return int(os.environ["RANK"]) // int(os.environ.get("LOCAL_WORLD_SIZE", os.environ["WORLD_SIZE"]))


def main() -> None:
    deepspeed.init_distributed(dist_backend="gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    total = torch.tensor([float(rank)])
    dist.all_reduce(total)
    me = {
        "rank": rank,
        "local_rank": int(os.environ["LOCAL_RANK"]),
        "node_rank": node_rank(),
        "hostname": socket.gethostname(),
        "pid": os.getpid(),
    }
    everyone = [None] * world
    dist.all_gather_object(everyone, me)
    if rank == 0:
        out = {"world_size": world, "rank_sum": total.item(), "ranks": everyone}
        with open(sys.argv[1] + ".tmp", "w") as f:
            json.dump(out, f)
        os.replace(sys.argv[1] + ".tmp", sys.argv[1])
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
