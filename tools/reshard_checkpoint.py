"""Convert a checkpoint for resuming on another number of ranks, ahead of the job.

    python tools/reshard_checkpoint.py runs/demo/ckpt/step_00001000 --workers 8
    (single process, CPU is enough: it only reads and writes files)

`--resume` does this by itself on first use when the checkpoint's world size is not the run's
(trainer/resize.py): rank 0 converts while the other ranks wait, with one worker. For an 8B
model the conversion reads and rewrites every optimizer partition (about 12 bytes a trained
parameter), which can take longer than --dist_timeout_s; run this first, with more workers, and
the trainer finds CKPT/universal/ complete (its own manifest, naming the checkpoint's) and loads
it. The checkpoint's manifest is verified first, and every .pt file unpickled weights-only.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from trainer.resize import main  # noqa: E402

if __name__ == "__main__":
    main()
