"""Real 2-rank ZeRO-3 training runs on the CPU (`deepspeed --num_gpus 2`, gloo) with the
tiny model on spoken-question shards: the loss falls, every teacher kind trains, a mid-run
checkpoint resumes to the same losses, and an export reloads to the same logits. The runs are
checks of the session's shared launch (tests/shared_launch.py): trainer/main.py's command line
under the deepspeed launcher, several runs per launch."""

import json
import math
import os
import shutil

import pytest
import torch

from tests.shared_launch import Check, call, main
from tools import export_hf

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytestmark = pytest.mark.slow
RESUME = ("--max_steps", "6", "--teacher", "ema", "--ema_decay", "0.9", "--save_every", "3")
# Micro-batches by token budget on image and text-only shards (no BASE: it sets --micro_batch_size).
TOKEN_BUDGET = ("--ds_config", "ds_configs/zero3.json", "--model", "tiny", "--train_shards", "{budget_shards}",
                "--max_tokens_per_micro_batch", "600", "--token_budget_buffer", "8", "--grad_accum", "2",
                "--num_workers", "1", "--max_seq_len", "300", "--lr", "3e-3", "--warmup_steps", "2",
                "--dist_timeout_s", "300", "--max_steps", "6", "--save_every", "3")
FEWER_SHARDS = ("--max_steps", "10", "--save_every", "6", "--max_bad_fraction", "0.9", "--num_workers", "2",
                "--train_shards", "{small_shards}")


def copy_checkpoint(args: list) -> None:
    """[checkpoint, into]: one checkpoint copied into a new save directory, which `--resume
    auto` then continues from (rank 0, between two runs of a check)."""
    source, into = args
    shutil.copytree(source, os.path.join(into, os.path.basename(source)))


def mixed_modality_shards(data: dict, check_dir: str) -> dict:
    """One shard of image questions and one of text-only questions: {mixed_shards}."""
    from datagen.writer import make_llava_shards

    records = [{"id": f"t{i}", "conversations": [
        {"from": "human", "value": f"What is {i} plus {i}? Answer with a number."},
        {"from": "gpt", "value": str(2 * i)}]} for i in range(8)]
    with open(os.path.join(check_dir, "text.json"), "w") as f:
        json.dump(records, f)
    index = make_llava_shards(os.path.join(check_dir, "text.json"), check_dir, os.path.join(check_dir, "text_shards"),
                              samples_per_shard=8, progress=False)
    image_shard = data["train_shards"].split("{")[0] + "000000.tar"
    return {"mixed_shards": f"{image_shard},{index['shard_spec']}"}


def budget_shards(data: dict, check_dir: str) -> dict:
    """The demo's training shards (image questions) and a shard of short text-only questions, so
    a rank's buffers mix lengths: {budget_shards}."""
    text = mixed_modality_shards(data, check_dir)["mixed_shards"].split(",", 1)[1]
    return {"budget_shards": f"{data['train_shards']},{text}"}


def asr_shards(data: dict, check_dir: str) -> dict:
    """Shards from an ASR manifest of four eSpeak utterances: {asr_shards}."""
    import soundfile as sf

    from datagen.tts import EspeakTTS
    from datagen.writer import make_asr_shards

    tts = EspeakTTS()
    lines = []
    for i, text in enumerate(["the red circle is on the left", "there are three shapes", "a blue square", "yes it is"]):
        audio, rate = tts.synthesize(text, seed=i)
        path = os.path.join(check_dir, f"utt{i}.wav")
        sf.write(path, audio, rate)
        lines.append(json.dumps({"audio": path, "text": text}))
    with open(os.path.join(check_dir, "asr.jsonl"), "w") as f:
        f.write("\n".join(lines) + "\n")
    index = make_asr_shards(os.path.join(check_dir, "asr.jsonl"), os.path.join(check_dir, "asr_shards"),
                            samples_per_shard=2, progress=False)
    return {"asr_shards": index["shard_spec"]}


def mixed_stage_shards(data: dict, check_dir: str) -> dict:
    """One shard of spoken questions on described scenes (stage align) and one of typed repeat
    records (stage vl), 8 each: {stage_shards}."""
    from datagen.sentences import described_qa_records, repeat_records
    from datagen.writer import make_llava_shards

    specs = []
    for stage, records in (("align", described_qa_records(8, seed=0, spoken=True)),
                           ("vl", repeat_records("train", 8, seed=0))):
        path = os.path.join(check_dir, f"{stage}.json")
        with open(path, "w") as f:
            json.dump([{**r, "stage": stage} for r in records], f)
        specs.append(make_llava_shards(path, check_dir, os.path.join(check_dir, f"{stage}_shards"), samples_per_shard=8,
                                       progress=False)["shard_spec"])
    return {"stage_shards": ",".join(specs)}


def _repack(source: str, dest, keys: list) -> None:
    """A shard holding the samples `keys` of tar `source`, members in their original order."""
    import tarfile

    with tarfile.open(source) as src, tarfile.open(dest, "w") as out:
        for member in src.getmembers():
            if member.name.split(".", 1)[0] in keys:
                out.addfile(member, src.extractfile(member))


def fewer_shards_than_readers(data: dict, check_dir: str) -> dict:
    """3 shards of the first training shard's samples (6, 6, and 6 cut to 4): {small_shards}."""
    import tarfile

    source = data["train_shards"].split("{")[0] + "000000.tar"
    with tarfile.open(source) as tar:
        keys = list(dict.fromkeys(m.name.split(".", 1)[0] for m in tar.getmembers()))
    small = os.path.join(check_dir, "small")
    os.makedirs(small)
    for i in range(3):
        _repack(source, os.path.join(small, f"shard-{i}.tar"), keys[6 * i % 12: 6 * i % 12 + 6])
    last = os.path.join(small, "shard-2.tar")
    with tarfile.open(last) as tar:
        cut = next(m for m in tar.getmembers() if m.name.startswith(keys[4] + "."))  # keeps samples 0-3
    with open(last, "rb") as f:
        data_bytes = f.read()
    with open(last, "wb") as f:
        f.write(data_bytes[: cut.offset_data + cut.size // 2])
    return {"small_shards": os.path.join(small, "shard-{0..2}.tar")}


CHECKS = [
    Check("loss_falls", [main("run", "--max_steps", "20", "--kd_alpha", "0.75")]),
    Check("teacher_frozen", [main("run", "--max_steps", "4", "--teacher", "frozen", "--ema_decay", "0.5")]),
    Check("teacher_ema", [main("run", "--max_steps", "4", "--teacher", "ema", "--ema_decay", "0.5")]),
    Check("sft", [main("run", "--max_steps", "2", "--kd_alpha", "0")]),
    Check("resume_ema", [
        main("full", *RESUME, "--save_dir", "{dir}/ckpt_full"),
        call("tests.test_train_zero3:copy_checkpoint", "{dir}/ckpt_full/step_00000003", "{dir}/ckpt_resumed",
             rank0_only=True),
        main("resumed", *RESUME, "--save_dir", "{dir}/ckpt_resumed", "--resume", "auto")]),
    Check("export_logits", [
        main("run", "--max_steps", "3", "--save_every", "3", "--save_dir", "{dir}/ckpt"),
        call("tests.dist_logits:main", "--checkpoint", "{dir}/ckpt/step_00000003", "--shards", "{heldout_shards}",
             "--out", "{dir}/engine_logits.pt")]),
    Check("modality_mix", [main("run", "--train_shards", "{mixed_shards}", "--max_steps", "4", "--num_workers", "1")],
          prepare=mixed_modality_shards),
    Check("align_asr", [main("run", "--train_shards", "{asr_shards}", "--stage", "align", "--kd_alpha", "0",
                             "--max_steps", "3", "--micro_batch_size", "2", "--num_workers", "1")], prepare=asr_shards),
    Check("mixed_stages", [main("run", "--train_shards", "{stage_shards}", "--stage", "mixed", "--kd_alpha", "0",
                                "--max_steps", "3", "--micro_batch_size", "2", "--num_workers", "1",
                                "--trainable", "llm,projector,audio")], prepare=mixed_stage_shards),
    Check("global_token_mean", [call("tests.dist_normalizer_check:main", "--shards", "{train_shards}",
                                     "--out", "{dir}/norms.json")]),
    Check("resume_fewer_shards", [
        main("full", *FEWER_SHARDS, "--save_dir", "{dir}/ckpt_full"),
        call("tests.test_train_zero3:copy_checkpoint", "{dir}/ckpt_full/step_00000006", "{dir}/ckpt_resumed",
             rank0_only=True),
        main("resumed", *FEWER_SHARDS, "--save_dir", "{dir}/ckpt_resumed", "--resume", "auto")],
        prepare=fewer_shards_than_readers),
    Check("token_budget", [
        main("full", *TOKEN_BUDGET, "--save_dir", "{dir}/ckpt_full", base=False),
        call("tests.test_train_zero3:copy_checkpoint", "{dir}/ckpt_full/step_00000003", "{dir}/ckpt_resumed",
             rank0_only=True),
        main("resumed", *TOKEN_BUDGET, "--save_dir", "{dir}/ckpt_resumed", "--resume", "auto", base=False)],
        prepare=budget_shards),
    Check("prefix_shared", [main("shared", "--max_steps", "3"),
                            main("full", "--max_steps", "3", "--teacher_share_prefix", "false")]),
]


@pytest.mark.launch_checks("loss_falls")
def test_loss_falls_and_everything_is_logged(launch):
    run = launch.ok("loss_falls")
    metrics = run.metrics
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

    events = EventAccumulator(os.path.join(run.dir, "tb"))
    events.Reload()
    assert {"train/loss", "train/kd_loss", "perf/tokens_per_s"} <= set(events.Tags()["scalars"])
    assert len(events.Scalars("train/loss")) == 20
    with open(os.path.join(run.dir, "tb", "config.yaml")) as f:
        resolved = f.read()
    assert "kd_alpha: 0.75" in resolved and "max_steps: 20" in resolved
    assert "step 20/20" in run.output


@pytest.mark.launch_checks("teacher_frozen", "teacher_ema")
@pytest.mark.parametrize("teacher", ["frozen", "ema"])
def test_frozen_and_ema_teachers_train(launch, teacher):
    metrics = launch.ok(f"teacher_{teacher}").metrics
    assert all(torch.isfinite(torch.tensor(m["train/loss"])) for m in metrics.values())
    assert len(metrics) == 4 and metrics[4]["train/kd_loss"] >= 0.0


@pytest.mark.launch_checks("sft")
def test_sft_baseline_skips_the_teacher(launch):
    metrics = launch.ok("sft").metrics
    assert "train/kd_loss" not in metrics[2] and metrics[2]["train/loss"] == pytest.approx(metrics[2]["train/ce_loss"])


@pytest.mark.launch_checks("resume_ema")
def test_resume_reproduces_the_uninterrupted_run(launch):
    """EMA teacher + 2 data workers per rank: model, optimizer, scheduler, EMA partitions,
    loader position and RNG all have to come back for the losses to match."""
    full = launch.ok("resume_ema", "full").metrics
    resumed = launch.ok("resume_ema", "resumed")
    assert "resumed from" in resumed.output and sorted(resumed.metrics) == [4, 5, 6]
    for step in (4, 5, 6):
        for key in ("train/loss", "train/kd_loss", "train/ce_loss", "train/agreement"):
            assert resumed.metrics[step][key] == pytest.approx(full[step][key], rel=1e-5, abs=1e-6), (step, key)


@pytest.mark.launch_checks("export_logits")
def test_export_reloads_to_the_same_logits(launch, demo_shards, tmp_path):
    """Consolidate the ZeRO-3 partitions with tools/export_hf.py, reload with load_omni, and
    compare logits with those of the 2-rank engine on the same batch (tests/dist_logits.py,
    a step of the same check)."""
    launch.ok("export_logits", "run")
    ckpt = os.path.join(launch.dir("export_logits"), "ckpt", "step_00000003")
    export = tmp_path / "export"
    export_hf.main(["--checkpoint", ckpt, "--out", str(export)])  # its command line, in this process
    reference = torch.load(os.path.join(launch.dir("export_logits"), "engine_logits.pt"))

    from tests.dist_logits import answer_logits
    from trainer.data import build_train_loader
    from trainer.models.serialize import load_omni

    model, processor = load_omni(str(export))
    batch = next(iter(build_train_loader(demo_shards["heldout_shards"], processor, stage="selfkd", micro_batch_size=2,
                                         max_seq_len=512, rank=0, world_size=1, num_workers=0, seed=0, shuffle=False)))
    exported = answer_logits(model, batch)
    assert exported.shape == reference.shape
    torch.testing.assert_close(exported, reference, rtol=1e-5, atol=1e-5)


@pytest.mark.launch_checks("modality_mix")
def test_ranks_with_different_modality_mixes_finish(launch):
    """One shard of image questions, one of text-only questions, two ranks with one worker
    each: at every step one rank has images and the other none, so the vision tower runs on
    a dummy input there; under ZeRO-3 a rank that skipped it would hang the other."""
    assert sorted(launch.ok("modality_mix").metrics) == [1, 2, 3, 4]


@pytest.mark.launch_checks("align_asr")
def test_align_stage_trains_on_asr_shards(launch):
    """--stage align: audio -> transcript with CE only, from shards built out of an ASR manifest."""
    metrics = launch.ok("align_asr").metrics
    assert sorted(metrics) == [1, 2, 3] and "train/kd_loss" not in metrics[3]
    assert metrics[3]["train/loss"] == pytest.approx(metrics[3]["train/ce_loss"])


@pytest.mark.launch_checks("mixed_stages")
def test_ranks_hearing_and_reading_in_one_mixed_run_finish(launch):
    """--stage mixed with one shard of spoken samples (align) and one of typed ones (vl), two
    ranks with one worker each: at every step one rank hears and the other reads, and under
    ZeRO-3 both must call the same modules (a dummy clip or image where a batch has none)."""
    metrics = launch.ok("mixed_stages").metrics
    assert sorted(metrics) == [1, 2, 3] and "train/kd_loss" not in metrics[3]
    assert all(math.isfinite(metrics[step]["train/loss"]) for step in metrics)


@pytest.mark.launch_checks("global_token_mean")
def test_gradient_is_the_global_token_mean(launch):
    """2 ranks x grad_accum 2 under ZeRO-3 give the gradient norm of (sum of token losses) /
    (all answer tokens of the step), computed in one process on the same micro-batches
    (tests/dist_normalizer_check.py)."""
    launch.records("global_token_mean")
    with open(os.path.join(launch.dir("global_token_mean"), "norms.json")) as f:
        norms = json.load(f)
    assert norms["engine"] == pytest.approx(norms["reference"], rel=1e-4)


@pytest.mark.launch_checks("token_budget")
def test_token_budget_trains_and_resumes_exactly(launch):
    """--max_tokens_per_micro_batch on 2 ranks over image and text-only samples: micro-batches of
    varying sample counts keep the ranks in step (grad_accum micro-batches each), padding is
    logged, and a checkpoint written inside a length buffer resumes to the same losses."""
    full = launch.ok("token_budget", "full").metrics
    seen = [0] + [full[s]["progress/samples_seen"] for s in range(1, 7)]
    assert len({b - a for a, b in zip(seen, seen[1:])}) > 1, "samples per step follow the lengths"
    assert all(0.0 <= full[s]["perf/padding_frac"] < 1.0 for s in full)
    states = [torch.load(os.path.join(launch.dir("token_budget"), "ckpt_full", "step_00000003",
                                      f"trainer_state_rank{r}.pt"), weights_only=False)["data"] for r in (0, 1)]
    assert any("buffer_start" in p for s in states for p in s["positions"].values()), "saved inside a buffer"
    resumed = launch.ok("token_budget", "resumed")
    assert "resumed from" in resumed.output and sorted(resumed.metrics) == [4, 5, 6]
    for step in (4, 5, 6):
        for key in ("train/loss", "train/kd_loss", "train/ce_loss", "progress/samples_seen", "perf/padding_frac"):
            assert resumed.metrics[step][key] == pytest.approx(full[step][key], rel=1e-5, abs=1e-6), (step, key)


@pytest.mark.launch_checks("resume_fewer_shards")
def test_resume_with_fewer_shards_than_readers(launch):
    """3 shards (6, 6 and 6 cut to 4 samples) read by 2 ranks x 2 workers: 4 readers, so each
    reads every shard and keeps its 4 samples an epoch, one micro-batch: every checkpoint
    lies at an epoch boundary of every reader. A resume from the step-6 checkpoint continues
    the uninterrupted run exactly (it used to die with 'epoch 0 produced no samples')."""
    full = launch.ok("resume_fewer_shards", "full").metrics
    resumed = launch.ok("resume_fewer_shards", "resumed")
    assert "resumed from" in resumed.output and sorted(resumed.metrics) == [7, 8, 9, 10]
    for step in range(7, 11):
        for key in ("train/loss", "train/ce_loss", "train/kd_loss"):
            assert resumed.metrics[step][key] == pytest.approx(full[step][key], rel=1e-5, abs=1e-6), (step, key)
        assert resumed.metrics[step]["data/skipped/truncated_tar"] == full[step]["data/skipped/truncated_tar"] > 0


@pytest.mark.launch_checks("prefix_shared")
def test_prefix_shared_teacher_matches_the_full_teacher_under_zero3(launch):
    """2 ranks, ZeRO-3: the shared teacher that reuses the student's prefix keys and values
    trains exactly as the one that recomputes the whole typed sequence, and logs fewer
    teacher tokens."""
    shared = launch.ok("prefix_shared", "shared").metrics
    full = launch.ok("prefix_shared", "full").metrics
    for step in (1, 2, 3):
        for key in ("train/loss", "train/kd_loss", "train/teacher_ce", "train/agreement", "train/grad_norm"):
            assert shared[step][key] == pytest.approx(full[step][key], rel=1e-5, abs=1e-6), (step, key)
        assert shared[step]["perf/teacher_tokens_computed"] < full[step]["perf/teacher_tokens_computed"], \
            "the shared prefix is not recomputed"
        assert shared[step]["perf/tokens_per_s"] * shared[step]["perf/step_s"] == pytest.approx(
            full[step]["perf/tokens_per_s"] * full[step]["perf/step_s"]), "tokens_seen counts the data either way"
