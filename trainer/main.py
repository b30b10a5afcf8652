"""Train an omni (vision + audio) LLM with Self-KD on DeepSpeed.

    # one process (CPU or one GPU)
    python trainer/main.py --model tiny --train_shards 'data/train-{000000..000003}.tar' --max_steps 20
    # 2 CPU ranks or 8 GPUs on one node, ZeRO-3
    deepspeed --num_gpus 2 trainer/main.py --ds_config ds_configs/zero3.json --model tiny --train_shards ...
    # 4 nodes: launch_scripts/train.sh (hostfile) or launch_scripts/slurm_train.sbatch
    deepspeed --num_nodes 4 --hostfile hostfile trainer/main.py --config recipes/selfkd.yaml
    # torchrun and srun work too: rank and world size come from their environment variables.

Every flag is also a key of the --config YAML file; flags win over the file.
"""

import os
import sys
import warnings

# Run as a script, Python puts trainer/ itself first on sys.path, where trainer.py would
# shadow the package; the repository root replaces it.
sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

from trainer import dist  # noqa: E402
from trainer.config import ConfigError, load_config  # noqa: E402


# DeepSpeed 0.19 calls collectives that torch 2.1x deprecates: one warning per call, every step.
warnings.filterwarnings("ignore", category=FutureWarning, module=r"torch\.distributed")


def main(argv=None) -> int:
    try:
        config = load_config(argv)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    from trainer.trainer import Trainer

    trainer = Trainer(config)
    try:
        trainer.train()
    finally:
        trainer.close()
        dist.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
