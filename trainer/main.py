"""Train an omni (vision + audio) LLM with Self-KD on DeepSpeed.

    # one process (CPU or one GPU)
    python trainer/main.py --model tiny --train_shards 'data/train-{000000..000003}.tar' --max_steps 20
    # 2 CPU ranks or 8 GPUs on one node, ZeRO-3
    deepspeed --num_gpus 2 trainer/main.py --ds_config ds_configs/zero3.json --model tiny --train_shards ...
    # 4 nodes: launch_scripts/train.sh (hostfile) or launch_scripts/slurm_train.sbatch
    deepspeed --num_nodes 4 --hostfile hostfile trainer/main.py --config recipes/selfkd.yaml
    # torchrun and srun work too: rank and world size come from their environment variables.

Every flag is also a key of the --config YAML file; flags win over the file.
Exit codes (0 finished, 75 stopped and saved: resume with --resume auto, ...): trainer/preemption.py.
SIGUSR1 or SIGTERM: finish the step, save, exit 75. SIGUSR2: print every thread's stack.
"""

import sys
import warnings

from trainer import dist
from trainer.config import ConfigError, load_config
from trainer.preemption import EXIT_BAD_DATA, EXIT_CONFIG, EXIT_CRASH, EXIT_DIVERGED, finished, write_status


# DeepSpeed 0.19 calls collectives that torch 2.1x deprecates: one warning per call, every step.
warnings.filterwarnings("ignore", category=FutureWarning, module=r"torch\.distributed")


def main(argv=None) -> int:
    try:
        config = load_config(argv)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        write_status("exited", exit_code=EXIT_CONFIG, message=str(e))
        return EXIT_CONFIG
    write_status("running")
    from trainer.data import DataQualityError
    from trainer.loop import Diverged, Trainer

    trainer, code, message = None, EXIT_CRASH, None
    try:
        trainer = Trainer(config)
        code = trainer.train()
    except ConfigError as e:  # a file the flags name failed the trainer's first checks
        code, message = EXIT_CONFIG, str(e)
    except Diverged as e:  # the same verdict on every rank: said once
        code, message = EXIT_DIVERGED, str(e) if dist.is_main() else None
    except DataQualityError as e:
        code, message = EXIT_BAD_DATA, str(e).strip().splitlines()[-1]
    finally:
        finished()
        # Written before the teardown, which a launcher may cut short once another rank has exited.
        write_status("exited", exit_code=code, message=message, step=getattr(trainer, "step", None),
                     resumed_step=getattr(trainer, "resumed_step", None),
                     checkpoint=getattr(trainer, "last_checkpoint", None))
        if trainer is not None:
            trainer.close()
        dist.shutdown()
    if message:
        label = "config error" if code == EXIT_CONFIG else "error"
        print(f"[rank {dist.rank()}] {label}: {message}", file=sys.stderr, flush=True)
    return code


if __name__ == "__main__":
    sys.exit(main())
