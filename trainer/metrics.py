"""The run's scalars, written in one place: TensorBoard event files and LOG_DIR/metrics.jsonl
(one JSON object per write: {"step": N, tag: value, ...}), on rank 0 only, with the
resolved config beside them as LOG_DIR/config.yaml.

    writer = MetricsWriter(log_dir, enabled=dist.is_main())
    writer.write(step, {"train/loss": 1.23, ...})
    writer.close()
"""

import json
import os


class MetricsWriter:
    def __init__(self, log_dir: str | None, enabled: bool = True):
        self.tensorboard = None
        self.jsonl = None
        if log_dir and enabled:
            from torch.utils.tensorboard import SummaryWriter

            os.makedirs(log_dir, exist_ok=True)
            self.tensorboard = SummaryWriter(log_dir)
            self.jsonl = open(os.path.join(log_dir, "metrics.jsonl"), "a")

    def write(self, step: int, scalars: dict) -> None:
        if self.tensorboard is not None:
            for tag, value in scalars.items():
                self.tensorboard.add_scalar(tag, value, step)
            self.tensorboard.flush()
        if self.jsonl is not None:
            self.jsonl.write(json.dumps({"step": step, **scalars}) + "\n")
            self.jsonl.flush()

    def close(self) -> None:
        if self.tensorboard is not None:
            self.tensorboard.close()
        if self.jsonl is not None:
            self.jsonl.close()
