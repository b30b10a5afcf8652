"""All distributed plumbing: process-group set-up under any launcher, rank-0 printing,
reductions, and the hang watchdog. Nothing else in the trainer calls torch.distributed.

Launchers: the `deepspeed` launcher and `torchrun` set RANK / WORLD_SIZE / LOCAL_RANK /
MASTER_ADDR / MASTER_PORT; under `srun` only SLURM_* variables exist, and `init` derives
the torch ones from them (master = first host of SLURM_JOB_NODELIST).
"""

import datetime
import faulthandler
import os
import socket
import sys

import torch
import torch.distributed as dist

from trainer.slurm import expand_nodelist


def env_from_slurm(environ=os.environ) -> dict:
    """torch.distributed variables derived from SLURM's, for processes started by srun
    (one task per GPU). Returns only the variables that are missing."""
    if "RANK" in environ or "SLURM_PROCID" not in environ or "SLURM_NTASKS" not in environ:
        return {}
    derived = {
        "RANK": environ["SLURM_PROCID"],
        "WORLD_SIZE": environ["SLURM_NTASKS"],
        "LOCAL_RANK": environ.get("SLURM_LOCALID", "0"),
    }
    if "MASTER_ADDR" not in environ:
        derived["MASTER_ADDR"] = expand_nodelist(environ.get("SLURM_JOB_NODELIST", "localhost"))[0]
    if "MASTER_PORT" not in environ:
        derived["MASTER_PORT"] = str(29500 + int(environ.get("SLURM_JOB_ID", "0")) % 1000)
    return derived


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else int(os.environ.get("RANK", 0))


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else int(os.environ.get("WORLD_SIZE", 1))


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", 0))


def is_main() -> bool:
    return rank() == 0


def device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", local_rank())
    return torch.device("cpu")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


_owns_group = False  # whether init() made the process group, so shutdown() is ours to do


def init(timeout_s: int) -> None:
    """Join the process group (gloo on CPU, nccl on GPU) with `timeout_s` on every collective.
    A group the embedding process made already (several runs in one process: the test suite's
    shared launch, a notebook) is used as it is, and left to that process to tear down."""
    import deepspeed

    global _owns_group
    if dist.is_initialized():
        return
    os.environ.update(env_from_slurm())
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    os.environ.setdefault("LOCAL_RANK", "0")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    if "MASTER_PORT" not in os.environ:
        # A single process needs no agreed port: take a free one, so several runs can share a host.
        os.environ["MASTER_PORT"] = str(_free_port()) if os.environ["WORLD_SIZE"] == "1" else "29500"
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank())
    deepspeed.init_distributed(
        dist_backend="nccl" if torch.cuda.is_available() else "gloo",
        auto_mpi_discovery=False,
        timeout=datetime.timedelta(seconds=timeout_s),
        verbose=False,
    )
    _owns_group = True


def shutdown() -> None:
    """Tear down the process group init() made (one made by the embedding process stays)."""
    global _owns_group
    if _owns_group and dist.is_initialized():
        dist.destroy_process_group()
    _owns_group = False


def print0(*args, **kwargs) -> None:
    if is_main():
        print(*args, **kwargs, flush=True)


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def all_reduce_sum(values: torch.Tensor) -> torch.Tensor:
    """Sum a float64 tensor over ranks (a copy; the input is left alone)."""
    out = values.detach().to(torch.float64).clone()
    if dist.is_initialized() and dist.get_world_size() > 1:
        out = out.to(device())
        dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out.cpu()


def all_reduce_max(values: torch.Tensor) -> torch.Tensor:
    out = values.detach().to(torch.float64).clone()
    if dist.is_initialized() and dist.get_world_size() > 1:
        out = out.to(device())
        dist.all_reduce(out, op=dist.ReduceOp.MAX)
    return out.cpu()


def all_gather_rows(values: torch.Tensor) -> torch.Tensor:
    """Every rank's float64 vector as one (world_size, n) CPU tensor: sums, maxima and
    anything else are then read from it with one collective and one host read."""
    row = values.detach().to(device=device(), dtype=torch.float64).reshape(1, -1)
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return row.cpu()
    rows = torch.empty(dist.get_world_size(), row.shape[1], dtype=torch.float64, device=row.device)
    dist.all_gather_into_tensor(rows, row)
    return rows.cpu()


def all_gather_object(obj) -> list:
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


class HangWatchdog:
    """Dumps every thread's stack and exits non-zero when a step overruns `timeout_s`.

    Every rank arms its own watchdog, so a collective that never completes (a rank died,
    a rank took another code path) ends with all ranks' stacks in the logs instead of an
    allocation burning until the job's time limit. `kick()` re-arms it each step. (SIGUSR2
    asks a live run for its stacks: trainer/preemption.py.)
    """

    def __init__(self, timeout_s: int):
        self.timeout_s = timeout_s

    def kick(self) -> None:
        faulthandler.cancel_dump_traceback_later()
        sys.stderr.flush()
        faulthandler.dump_traceback_later(self.timeout_s, exit=True)

    def stop(self) -> None:
        faulthandler.cancel_dump_traceback_later()
