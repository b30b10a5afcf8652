"""A hang on purpose: rank 0 enters an all-reduce that rank 1 never joins (rank 1 is stuck
elsewhere). Both ranks' watchdogs must dump their stacks and exit non-zero.

    deepspeed --num_gpus 2 tests/dist_hang_check.py
"""

import time

import torch

from trainer import dist


def stuck_elsewhere() -> None:
    time.sleep(3600)


def main() -> None:
    dist.init(timeout_s=3600)  # the collective itself would wait an hour
    watchdog = dist.HangWatchdog(timeout_s=5)
    # As in the trainer (re-armed after each step's closing all-reduce), both ranks arm their
    # watchdogs at the same moment, so both dump before the launcher tears the job down.
    dist.barrier()
    watchdog.kick()
    if dist.rank() == 0:
        dist.all_reduce_sum(torch.ones(1))
    else:
        stuck_elsewhere()


if __name__ == "__main__":
    main()
