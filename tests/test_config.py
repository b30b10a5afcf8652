"""Config precedence (CLI > YAML > defaults), validation messages, the file checks the trainer
runs first (`preflight`: shard specs, the DeepSpeed config, model and resume paths), and the
DeepSpeed config's auto-field filling."""

import json
import os

import pytest
import yaml

from trainer import ds_config
from trainer.config import ConfigError, load_config
from trainer.loop import preflight

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DS_DIR = os.path.join(ROOT, "ds_configs")


@pytest.fixture
def shards(tmp_path):
    for i in range(2):
        (tmp_path / f"train-{i:06d}.tar").write_bytes(b"")
    return str(tmp_path / "train-{000000..000001}.tar")


def base(shards, *extra):
    return ["--model", "tiny", "--train_shards", shards, "--ds_config", os.path.join(DS_DIR, "zero3.json"), *extra]


def write_yaml(tmp_path, data):
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(data))
    return str(path)


def test_defaults_then_yaml_then_cli(tmp_path, shards):
    c = load_config(base(shards))
    assert c.distill.kd_alpha == 0.75 and c.optim.lr == 2e-5 and c.model.trainable == ("llm", "projector")
    cfg = write_yaml(tmp_path, {"kd_alpha": 0.5, "lr": 1e-4, "trainable": ["projector"], "optim": {"max_steps": 7}})
    c = load_config(base(shards, "--config", cfg))
    assert (c.distill.kd_alpha, c.optim.lr, c.model.trainable, c.optim.max_steps) == (0.5, 1e-4, ("projector",), 7)
    c = load_config(base(shards, "--config", cfg, "--kd_alpha", "0.25", "--trainable", "llm,projector"))
    assert c.distill.kd_alpha == 0.25 and c.optim.lr == 1e-4 and c.model.trainable == ("llm", "projector")


def test_gjsd_beta_from_the_command_line_and_yaml(tmp_path, shards):
    """--kd_beta is a number (from the CLI's text or YAML's float) and reaches the loss settings."""
    from trainer.distill.loss import KDSettings

    c = load_config(base(shards, "--kd_divergence", "gjsd", "--kd_beta", "0.25"))
    assert c.distill.kd_beta == 0.25 and c.distill.kd_divergence == "gjsd"
    assert KDSettings(divergence=c.distill.kd_divergence, beta=c.distill.kd_beta).gjsd_beta == 0.25
    c = load_config(base(shards, "--config", write_yaml(tmp_path, {"distill": {"kd_divergence": "gjsd", "kd_beta": 1}})))
    assert c.distill.kd_beta == 1.0 and isinstance(c.distill.kd_beta, float)
    assert load_config(base(shards)).distill.kd_beta is None
    cleared = base(shards, "--config", write_yaml(tmp_path, {"distill": {"kd_divergence": "gjsd", "kd_beta": 0.5}}),
                   "--kd_divergence", "fkl", "--kd_beta", "none")
    assert load_config(cleared).distill.kd_beta is None


def test_config_is_frozen(shards):
    c = load_config(base(shards))
    with pytest.raises(Exception):
        c.distill.kd_alpha = 0.1


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--kd_alpha", "1.5"], "--kd_alpha: must lie in [0, 1], got 1.5"),
        (["--kd_alpha", "abc"], "kd_alpha: expected float, got 'abc'"),
        (["--kd_divergence", "kl"], "--kd_divergence: 'kl' is not one of fkl, rkl, jsd, gjsd"),
        (["--kd_divergence", "gjsd"], "--kd_divergence gjsd: give --kd_beta in [0, 1]"),
        (["--kd_divergence", "gjsd", "--kd_beta", "1.5"], "--kd_divergence gjsd: give --kd_beta in [0, 1]"),
        (["--kd_beta", "0.5"], "--kd_beta 0.5: only with --kd_divergence gjsd (fkl is gjsd with beta 0.0)"),
        (["--kd_divergence", "jsd", "--kd_beta", "0.5"], "--kd_beta 0.5: only with --kd_divergence gjsd (jsd is"),
        (["--kd_divergence", "gjsd", "--kd_beta", "x"], "kd_beta"),
        (["--teacher", "big"], "--teacher: 'big' is not one of shared, frozen, ema"),
        (["--max_steps", "0"], "--max_steps: must be >= 1, got 0"),
        (["--gradient_checkpointing", "maybe"], "gradient_checkpointing: expected true/false, got 'maybe'"),
        (["--bogus", "1"], "unknown flag(s): --bogus 1"),
        (["--stage", "align"], "--stage align trains on ASR shards"),
        (["--stage", "vl"], "--stage vl trains the typed-question path itself"),
        (["--resume", "auto"], "--resume auto needs --save_dir"),
        (["--lr", "nan"], "lr: must be a finite number, got 'nan'"),
        (["--kd_temperature", "inf"], "kd_temperature: must be a finite number, got 'inf'"),
        (["--max_grad_norm", "1e400"], "max_grad_norm: must be a finite number"),
        (["--max_nonfinite_steps", "0"], "--max_nonfinite_steps: must be >= 1, got 0"),
        (["--max_tokens_per_micro_batch", "4096", "--micro_batch_size", "8"],
         "--micro_batch_size 8 and --max_tokens_per_micro_batch 4096 both size the micro-batch"),
        (["--max_tokens_per_micro_batch", "3000"],
         "cannot hold one sample of --max_seq_len 2048 on each of the step's 2 side(s): give at least 4096"),
        (["--max_tokens_per_micro_batch", "-1"], "--max_tokens_per_micro_batch: must be >= 0, got -1"),
        (["--max_tokens_per_micro_batch", "4096", "--token_budget_buffer", "0"], "--token_budget_buffer: must be >= 1"),
    ],
)
def test_errors_name_the_value(shards, extra, message):
    with pytest.raises(ConfigError) as err:
        load_config(base(shards, *extra))
    assert message in str(err.value)


def checked(args):
    """load_config, then the trainer's file checks, as trainer/main.py runs them."""
    config = load_config(args)
    preflight(config)
    return config


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--ds_config", "nope.json"], "--ds_config: nope.json does not exist"),
        (["--model", "/no/such/model"], "--model: /no/such/model is neither one of tiny, toy, tiny-qwen3vl, tiny-internvl, synthetic-2b, synthetic-8b, overhead-2b, overhead-8b, synthetic-qwen3vl-8b, synthetic-internvl3-8b, tiny-qwen2_5_omni"),
        (["--resume", "/no/such/ckpt"], "--resume: /no/such/ckpt is neither 'auto' nor a checkpoint directory"),
        (["--eval_shards", "/no/{0..1}.tar"], "--eval_shards: no shard matches"),
    ],
)
def test_file_checks_name_the_flag(shards, extra, message):
    config = load_config(base(shards, *extra))  # parsing reads no file
    with pytest.raises(ConfigError) as err:
        preflight(config)
    assert message in str(err.value)


def test_shard_spec_must_match(tmp_path, shards):
    with pytest.raises(ConfigError, match="--train_shards: no shard matches"):
        checked(base(str(tmp_path / "none-{0..3}.tar")))
    with pytest.raises(ConfigError, match="1 of 3 shards do not exist"):
        checked(base(shards.replace("000001}", "000002}")))


def test_unknown_yaml_key_is_named(tmp_path, shards):
    with pytest.raises(ConfigError, match="unknown key 'kd_alpah'"):
        load_config(base(shards, "--config", write_yaml(tmp_path, {"kd_alpah": 0.5})))
    with pytest.raises(ConfigError, match="unknown key 'distill.lr'"):
        load_config(base(shards, "--config", write_yaml(tmp_path, {"distill": {"lr": 0.5}})))


def test_model_source_is_exclusive(shards):
    with pytest.raises(ConfigError, match="exclusive"):
        load_config(base(shards, "--vlm", "x", "--audio_encoder", "y"))
    args = base(shards)
    args[args.index("--model") : args.index("--model") + 2] = []
    with pytest.raises(ConfigError, match="give --model tiny"):
        load_config(args)


def test_batch_size_contradicting_ds_config(tmp_path, shards):
    ds = json.load(open(os.path.join(DS_DIR, "zero3.json")))
    ds["train_micro_batch_size_per_gpu"] = 4
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(ds))
    with pytest.raises(ConfigError, match=r"--micro_batch_size 2 contradicts .*train_micro_batch_size_per_gpu = 4"):
        checked(base(shards, "--ds_config", str(path), "--micro_batch_size", "2"))
    assert checked(base(shards, "--ds_config", str(path), "--micro_batch_size", "4")).optim.micro_batch_size == 4


def test_token_budget_sets_deepspeeds_batch_fields_per_micro_batch(tmp_path, shards):
    """Under --max_tokens_per_micro_batch DeepSpeed counts micro-batches: 1 per micro-step; a
    DeepSpeed config that fixes a sample count is refused; SFT's budget holds one side only."""
    c = checked(base(shards, "--max_tokens_per_micro_batch", "4096", "--grad_accum", "3"))
    filled = ds_config.resolve(c, world_size=4, on_gpu=False)
    assert (filled["train_micro_batch_size_per_gpu"], filled["train_batch_size"]) == (1, 12)
    assert checked(base(shards, "--max_tokens_per_micro_batch", "2048", "--kd_alpha", "0")).optim.micro_batch_size == 1
    ds = json.load(open(os.path.join(DS_DIR, "zero3.json")))
    ds["train_micro_batch_size_per_gpu"] = 4
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(ds))
    with pytest.raises(ConfigError, match="must leave train_micro_batch_size_per_gpu \"auto\""):
        checked(base(shards, "--ds_config", str(path), "--max_tokens_per_micro_batch", "4096"))


def test_deepspeed_launcher_local_rank_is_accepted(shards):
    assert load_config(base(shards, "--local_rank=1")).optim.max_steps == 1000


@pytest.mark.parametrize("name", sorted(os.listdir(DS_DIR)))
def test_every_ds_config_fills_and_validates(shards, name):
    """Each shipped DeepSpeed config: every "auto" is filled and DeepSpeed's own parser accepts it."""
    from deepspeed.runtime.config import DeepSpeedConfig

    c = checked(base(shards, "--ds_config", os.path.join(DS_DIR, name), "--micro_batch_size", "2", "--grad_accum", "3"))
    raw = json.load(open(os.path.join(DS_DIR, name)))
    filled = ds_config.resolve(c, world_size=1, on_gpu=False)
    assert "auto" not in json.dumps(filled)
    parsed = DeepSpeedConfig(filled)
    assert parsed.train_micro_batch_size_per_gpu == 2 and parsed.gradient_accumulation_steps == 3
    assert parsed.train_batch_size == 6
    assert parsed.zero_optimization_stage == raw["zero_optimization"]["stage"]
    if "nvme" in name:
        assert parsed.zero_config.offload_param.device == "nvme"


def test_recipes_load(shards):
    """The shipped recipes parse; only their cluster paths are swapped for local ones."""
    recipes = os.path.join(ROOT, "launch_scripts", "recipes")
    for name in sorted(os.listdir(recipes)):
        data = yaml.safe_load(open(os.path.join(recipes, name)))
        for key in ("model", "vlm", "audio_encoder", "save_dir", "log_dir", "eval_shards", "resume"):
            data.pop(key, None)
        data["train_shards"] = shards
        data["ds_config"] = os.path.join(DS_DIR, os.path.basename(data["ds_config"]))
        import tempfile

        with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as f:
            yaml.safe_dump(data, f)
        c = checked(["--config", f.name, "--model", "tiny"])
        assert c.data.stage == data["stage"]


def test_shard_spec_lists_split_outside_braces():
    from trainer.data.shards import expand_shard_spec

    assert expand_shard_spec("a-{0..1}.tar,b-{x,y}.tar") == ["a-0.tar", "a-1.tar", "b-x.tar", "b-y.tar"]
    assert expand_shard_spec("pipe:curl -s http://host/a,b.tar") == ["pipe:curl -s http://host/a,b.tar"]


def test_flag_owned_ds_values_must_be_auto_or_equal(tmp_path, shards):
    ds = json.load(open(os.path.join(DS_DIR, "zero3.json")))
    ds["optimizer"]["params"]["lr"] = 1e-4
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(ds))
    with pytest.raises(ConfigError, match=r"--lr 2e-05 contradicts .*lr = 0.0001"):
        checked(base(shards, "--ds_config", str(path)))
    assert checked(base(shards, "--ds_config", str(path), "--lr", "1e-4")).optim.lr == 1e-4
    del ds["scheduler"]
    path.write_text(json.dumps(ds))
    with pytest.raises(ConfigError, match="no scheduler section"):
        checked(base(shards, "--ds_config", str(path), "--lr", "1e-4"))


def test_teacher_combinations_that_would_lie_are_refused(shards):
    with pytest.raises(ConfigError, match="NVMe parameter offload"):
        checked(base(shards, "--ds_config", os.path.join(DS_DIR, "zero3_nvme.json"), "--teacher", "ema"))
    with pytest.raises(ConfigError, match="trainable vision tower"):
        load_config(base(shards, "--teacher", "frozen", "--trainable", "llm,vision"))
    assert load_config(base(shards, "--teacher", "shared", "--trainable", "llm,vision")).model.trainable == ("llm", "vision")


def test_yaml_list_of_shard_specs(tmp_path, shards):
    first = shards.replace("{000000..000001}", "000000")
    second = shards.replace("{000000..000001}", "000001")
    args = ["--model", "tiny", "--ds_config", os.path.join(DS_DIR, "zero3.json")]
    c = load_config(args + ["--config", write_yaml(tmp_path, {"train_shards": [first, second]})])
    assert c.data.train_shards == f"{first},{second}"


def test_first_warmup_step_has_a_learning_rate(shards):
    c = load_config(base(shards, "--warmup_steps", "4"))
    filled = ds_config.resolve(c, world_size=1, on_gpu=False)
    assert filled["scheduler"]["params"]["warmup_min_ratio"] == pytest.approx(0.2)
