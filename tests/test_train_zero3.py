"""Real 2-rank ZeRO-3 training runs on the CPU (`deepspeed --num_gpus 2`, gloo) with the
tiny model on spoken-question shards: the loss falls, every teacher kind trains, a mid-run
checkpoint resumes to the same losses, and an export reloads to the same logits."""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytestmark = pytest.mark.slow

_port = iter(range(29620, 29700))


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    from datagen.demo import make_demo_data

    out = tmp_path_factory.mktemp("demo")
    return make_demo_data(str(out), num_train=48, num_heldout=8, seed=1, samples_per_shard=12)


def deepspeed_train(tmp_path, shards, *args, ranks=2, name="run"):
    """Run trainer/main.py under the deepspeed launcher; returns (run dir, metrics by step)."""
    run_dir = tmp_path / name
    cmd = [
        sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(ranks), "--master_port", str(next(_port)),
        "trainer/main.py", "--ds_config", "ds_configs/zero3.json", "--model", "tiny",
        "--train_shards", shards["train_shards"], "--micro_batch_size", "4", "--num_workers", "2",
        "--max_seq_len", "512", "--lr", "3e-3", "--warmup_steps", "2", "--log_dir", str(run_dir / "tb"), *args,
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1200)
    if proc.returncode != 0:
        raise AssertionError(f"training failed ({proc.returncode}):\n{proc.stdout[-6000:]}\n{proc.stderr[-6000:]}")
    metrics = {}
    with open(run_dir / "tb" / "metrics.jsonl") as f:
        for line in f:
            record = json.loads(line)
            metrics.setdefault(record["step"], {}).update(record)
    return run_dir, metrics, proc.stdout


def test_loss_falls_and_everything_is_logged(tmp_path, shards):
    run_dir, metrics, stdout = deepspeed_train(tmp_path, shards, "--max_steps", "20", "--kd_alpha", "0.75")
    losses = [metrics[s]["train/loss"] for s in range(1, 21)]
    first, last = sum(losses[:4]) / 4, sum(losses[-4:]) / 4
    assert last < first - 0.5, f"loss did not fall: {losses}"
    for tag in ("train/loss", "train/kd_loss", "train/ce_loss", "train/teacher_ce", "train/agreement",
                "train/teacher_entropy", "train/lr", "train/grad_norm", "perf/samples_per_s", "perf/tokens_per_s",
                "perf/data_wait_frac", "mem/peak_gib"):
        assert tag in metrics[20], tag
    assert 0.0 <= metrics[20]["train/agreement"] <= 1.0
    assert 0.0 < metrics[20]["train/teacher_entropy"] < 20.0  # nats: below log(V) for any vocabulary here
    assert metrics[20]["perf/samples_per_s"] > 0
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir / "tb"))
    events.Reload()
    assert {"train/loss", "train/kd_loss", "perf/tokens_per_s"} <= set(events.Tags()["scalars"])
    assert len(events.Scalars("train/loss")) == 20
    resolved = (run_dir / "tb" / "config.yaml").read_text()
    assert "kd_alpha: 0.75" in resolved and "max_steps: 20" in resolved
    assert "step 20/20" in stdout


@pytest.mark.parametrize("teacher", ["frozen", "ema"])
def test_frozen_and_ema_teachers_train(tmp_path, shards, teacher):
    _, metrics, _ = deepspeed_train(tmp_path, shards, "--max_steps", "4", "--teacher", teacher, "--ema_decay", "0.5")
    assert all(torch.isfinite(torch.tensor(m["train/loss"])) for m in metrics.values())
    assert len(metrics) == 4 and metrics[4]["train/kd_loss"] >= 0.0


def test_sft_baseline_skips_the_teacher(tmp_path, shards):
    _, metrics, _ = deepspeed_train(tmp_path, shards, "--max_steps", "2", "--kd_alpha", "0")
    assert "train/kd_loss" not in metrics[2] and metrics[2]["train/loss"] == pytest.approx(metrics[2]["train/ce_loss"])


def test_resume_reproduces_the_uninterrupted_run(tmp_path, shards):
    """EMA teacher + 2 data workers per rank: model, optimizer, scheduler, EMA partitions,
    loader position and RNG all have to come back for the losses to match."""
    common = ("--max_steps", "6", "--teacher", "ema", "--ema_decay", "0.9", "--save_every", "3")
    full_dir, full, _ = deepspeed_train(tmp_path, shards, *common, "--save_dir", str(tmp_path / "ckpt_full"), name="full")
    resumed_ckpt = tmp_path / "ckpt_resumed"
    resumed_ckpt.mkdir()
    shutil.copytree(tmp_path / "ckpt_full" / "step_00000003", resumed_ckpt / "step_00000003")
    _, resumed, stdout = deepspeed_train(
        tmp_path, shards, *common, "--save_dir", str(resumed_ckpt), "--resume", "auto", name="resumed"
    )
    assert "resumed from" in stdout and sorted(resumed) == [4, 5, 6]
    for step in (4, 5, 6):
        for key in ("train/loss", "train/kd_loss", "train/ce_loss", "train/agreement"):
            assert resumed[step][key] == pytest.approx(full[step][key], rel=1e-5, abs=1e-6), (step, key)


def test_export_reloads_to_the_same_logits(tmp_path, shards):
    """Consolidate the ZeRO-3 partitions with tools/export_hf.py, reload with load_omni, and
    compare logits with those of the 2-rank engine on the same batch."""
    run_dir, _, _ = deepspeed_train(
        tmp_path, shards, "--max_steps", "3", "--save_every", "3", "--save_dir", str(tmp_path / "ckpt")
    )
    ckpt = tmp_path / "ckpt" / "step_00000003"
    export = tmp_path / "export"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, "tools/export_hf.py", "--checkpoint", str(ckpt), "--out", str(export)],
                   cwd=ROOT, env=env, check=True, capture_output=True, text=True, timeout=600)
    engine_logits = tmp_path / "engine_logits.pt"
    proc = subprocess.run(
        [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "2", "--master_port", str(next(_port)),
         "tests/dist_logits.py", "--checkpoint", str(ckpt), "--shards", shards["heldout_shards"], "--out", str(engine_logits)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    reference = torch.load(engine_logits)

    from tests.dist_logits import answer_logits
    from trainer.data import build_train_loader
    from trainer.models.serialize import load_omni

    model, processor = load_omni(str(export))
    batch = next(iter(build_train_loader(shards["heldout_shards"], processor, stage="selfkd", micro_batch_size=2,
                                         max_seq_len=512, rank=0, world_size=1, num_workers=0, seed=0, shuffle=False)))
    exported = answer_logits(model, batch)
    assert exported.shape == reference.shape
    torch.testing.assert_close(exported, reference, rtol=1e-5, atol=1e-5)


def test_ranks_with_different_modality_mixes_finish(tmp_path, shards):
    """One shard of image questions, one of text-only questions, two ranks with one worker
    each: at every step one rank has images and the other none, so the vision tower runs on
    a dummy input there; under ZeRO-3 a rank that skipped it would hang the other."""
    from datagen.writer import make_llava_shards

    records = [{"id": f"t{i}", "conversations": [
        {"from": "human", "value": f"What is {i} plus {i}? Answer with a number."},
        {"from": "gpt", "value": str(2 * i)}]} for i in range(8)]
    (tmp_path / "text.json").write_text(json.dumps(records))
    index = make_llava_shards(str(tmp_path / "text.json"), str(tmp_path), str(tmp_path / "text_shards"),
                              samples_per_shard=8, progress=False)
    image_shard = shards["train_shards"].split("{")[0] + "000000.tar"
    mixed = {**shards, "train_shards": f"{image_shard},{index['shard_spec']}"}
    _, metrics, _ = deepspeed_train(tmp_path, mixed, "--max_steps", "4", "--num_workers", "1", "--dist_timeout_s", "300")
    assert sorted(metrics) == [1, 2, 3, 4]


def test_align_stage_trains_on_asr_shards(tmp_path, shards):
    """--stage align: audio -> transcript with CE only, from shards built out of an ASR manifest."""
    import soundfile as sf

    from datagen.tts import EspeakTTS
    from datagen.writer import make_asr_shards

    tts = EspeakTTS()
    lines = []
    for i, text in enumerate(["the red circle is on the left", "there are three shapes", "a blue square", "yes it is"]):
        audio, rate = tts.synthesize(text, seed=i)
        path = tmp_path / f"utt{i}.wav"
        sf.write(path, audio, rate)
        lines.append(json.dumps({"audio": str(path), "text": text}))
    (tmp_path / "asr.jsonl").write_text("\n".join(lines) + "\n")
    index = make_asr_shards(str(tmp_path / "asr.jsonl"), str(tmp_path / "asr_shards"), samples_per_shard=2, progress=False)
    asr = {**shards, "train_shards": index["shard_spec"]}
    _, metrics, _ = deepspeed_train(tmp_path, asr, "--stage", "align", "--kd_alpha", "0", "--max_steps", "3",
                                    "--micro_batch_size", "2", "--num_workers", "1")
    assert sorted(metrics) == [1, 2, 3] and "train/kd_loss" not in metrics[3]
    assert metrics[3]["train/loss"] == pytest.approx(metrics[3]["train/ce_loss"])


def test_gradient_is_the_global_token_mean(tmp_path, shards):
    """2 ranks x grad_accum 2 under ZeRO-3 give the gradient norm of (sum of token losses) /
    (all answer tokens of the step), computed in one process on the same micro-batches."""
    out = tmp_path / "norms.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "2", "--master_port", str(next(_port)),
         "tests/dist_normalizer_check.py", "--shards", shards["train_shards"], "--out", str(out)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    norms = json.loads(out.read_text())
    assert norms["engine"] == pytest.approx(norms["reference"], rel=1e-4)


def _repack(source: str, dest, keys: list) -> None:
    """A shard holding the samples `keys` of tar `source`, members in their original order."""
    import tarfile

    with tarfile.open(source) as src, tarfile.open(dest, "w") as out:
        for member in src.getmembers():
            if member.name.split(".", 1)[0] in keys:
                out.addfile(member, src.extractfile(member))


def test_resume_with_fewer_shards_than_readers(tmp_path, shards):
    """3 shards (6, 6 and 6 cut to 4 samples) read by 2 ranks x 2 workers: 4 readers, so each
    reads every shard and keeps its 4 samples an epoch, one micro-batch: every checkpoint
    lies at an epoch boundary of every reader. A resume from the step-6 checkpoint continues
    the uninterrupted run exactly (it used to die with 'epoch 0 produced no samples')."""
    import tarfile

    source = shards["train_shards"].split("{")[0] + "000000.tar"
    with tarfile.open(source) as tar:
        keys = list(dict.fromkeys(m.name.split(".", 1)[0] for m in tar.getmembers()))
    small = tmp_path / "small"
    small.mkdir()
    for i in range(3):
        _repack(source, small / f"shard-{i}.tar", keys[6 * i % 12: 6 * i % 12 + 6])
    with tarfile.open(small / "shard-2.tar") as tar:
        cut = next(m for m in tar.getmembers() if m.name.startswith(keys[4] + "."))  # keeps samples 0-3
    data = (small / "shard-2.tar").read_bytes()
    (small / "shard-2.tar").write_bytes(data[: cut.offset_data + cut.size // 2])
    spec = {**shards, "train_shards": str(small / "shard-{0..2}.tar")}
    common = ("--max_steps", "10", "--save_every", "6", "--max_bad_fraction", "0.9", "--num_workers", "2")
    _, full, _ = deepspeed_train(tmp_path, spec, *common, "--save_dir", str(tmp_path / "ckpt_full"), name="full")
    resumed_ckpt = tmp_path / "ckpt_resumed"
    resumed_ckpt.mkdir()
    shutil.copytree(tmp_path / "ckpt_full" / "step_00000006", resumed_ckpt / "step_00000006")
    _, resumed, stdout = deepspeed_train(tmp_path, spec, *common, "--save_dir", str(resumed_ckpt), "--resume", "auto",
                                         name="resumed")
    assert "resumed from" in stdout and sorted(resumed) == [7, 8, 9, 10]
    for step in range(7, 11):
        for key in ("train/loss", "train/ce_loss", "train/kd_loss"):
            assert resumed[step][key] == pytest.approx(full[step][key], rel=1e-5, abs=1e-6), (step, key)
        assert resumed[step]["data/skipped/truncated_tar"] == full[step]["data/skipped/truncated_tar"] > 0


def test_prefix_shared_teacher_matches_the_full_teacher_under_zero3(tmp_path, shards):
    """2 ranks, ZeRO-3: the shared teacher that reuses the student's prefix keys and values
    trains exactly as the one that recomputes the whole typed sequence, and logs fewer
    teacher tokens."""
    _, shared, _ = deepspeed_train(tmp_path, shards, "--max_steps", "3", name="shared")
    _, full, _ = deepspeed_train(tmp_path, shards, "--max_steps", "3", "--teacher_share_prefix", "false", name="full")
    for step in (1, 2, 3):
        for key in ("train/loss", "train/kd_loss", "train/teacher_ce", "train/agreement", "train/grad_norm"):
            assert shared[step][key] == pytest.approx(full[step][key], rel=1e-5, abs=1e-6), (step, key)
        assert shared[step]["perf/teacher_tokens_computed"] < full[step]["perf/teacher_tokens_computed"], \
            "the shared prefix is not recomputed"
        assert shared[step]["perf/tokens_per_s"] * shared[step]["perf/step_s"] == pytest.approx(
            full[step]["perf/tokens_per_s"] * full[step]["perf/step_s"]), "tokens_seen counts the data either way"
