"""The evaluation tools end to end on the tiny model and spoken demo shards:
tools/evaluate.py, the attention measurement and tools/attention_analysis.py."""

import json
import os
import re
import socket
import subprocess
import sys

import pytest

from tools import attention_analysis, evaluate
from datagen.demo import make_split
from datagen.writer import make_llava_shards
from trainer.data import build_eval_loader
from trainer.eval.attention import sample_attention_shares, token_groups
from trainer.eval.report import aggregate
from trainer.eval.scoring import word_edit_distance
from trainer.models.build import build_tiny
from trainer.models.serialize import load_omni, save_omni
from trainer.models.tiny import build_tiny_processor

pytestmark = pytest.mark.slow
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval_tools")
    records = make_split(str(root), "heldout", 5, seed=0)
    json_path = root / "heldout.json"
    json_path.write_text(json.dumps(records))
    index = make_llava_shards(str(json_path), str(root), str(root / "shards"), seed=0, progress=False)
    processor = build_tiny_processor()
    save_omni(build_tiny(processor, attn_impl="sdpa", seed=0), processor, str(root / "model"))
    return {"root": root, "shards": index["shard_spec"], "model": str(root / "model"), "n": len(records)}


def test_evaluate_cli_writes_consistent_outputs(assets):
    out = assets["root"] / "eval" / "report.json"
    evaluate.main(["--model", assets["model"], "--shards", assets["shards"], "--out", str(out),
                   "--batch_size", "2", "--max_new_tokens", "3"])
    report = json.loads(out.read_text())
    records = [json.loads(line) for line in (assets["root"] / "eval" / "report.predictions.jsonl").read_text().splitlines()]
    assert (assets["root"] / "eval" / "report.png").stat().st_size > 0
    assert report["n"] == assets["n"] and len(records) == 2 * assets["n"]
    assert {r["mode"] for r in records} == {"text", "audio"}
    assert report["settings"]["modes"] == ["text", "audio"]
    report.pop("settings")
    assert aggregate(records) == report
    assert report["gap"] == pytest.approx(report["vl_score"] - report["va_score"])


def test_evaluate_transcribe_reports_corpus_wer(assets):
    out = assets["root"] / "eval_asr" / "report.json"
    evaluate.main(["--model", assets["model"], "--shards", assets["shards"], "--out", str(out), "--transcribe",
                   "--batch_size", "2", "--max_new_tokens", "4"])
    report = json.loads(out.read_text())
    records = [json.loads(line) for line in (out.parent / "report.predictions.jsonl").read_text().splitlines()]
    assert report["settings"]["transcribe"] and report["n"] == assets["n"]
    assert {r["task"] for r in records} == {"asr"} and {r["mode"] for r in records} == {"text", "audio"}
    for mode in ("text", "audio"):  # recomputed here: all edits over all reference words
        pairs = [(r["prediction"], r["answer"]) for r in records if r["mode"] == mode]
        words_of = lambda text: re.findall(r"\w+", text.lower())  # noqa: E731 - the test's own tokeniser
        edits = sum(word_edit_distance(words_of(p), words_of(a)) for p, a in pairs)
        words = sum(len(words_of(a)) for _, a in pairs)
        assert report["wer"][mode] == pytest.approx(edits / words)
        assert all(r["answer"] == r["question"][: -len("\nTranscribe the audio.")] for r in records)


def _first_batch(assets, model_dir, attn_impl):
    model, processor = load_omni(model_dir, attn_impl=attn_impl)
    loader = build_eval_loader(assets["shards"], processor, micro_batch_size=1, max_seq_len=4096, rank=0, world_size=1)
    return model.eval(), processor, next(iter(loader))


def test_attention_shares_on_tiny_model(assets):
    model, processor, batch = _first_batch(assets, assets["model"], "eager")
    answer = batch.answers[0][0]
    for mode in ("text", "audio"):
        shares = sample_attention_shares(model, batch, mode, answer)
        for query in ("question", "answer"):
            per_key = [shares[f"{query}->{key}"] for key in ("image", "question", "answer", "other")]
            for layer_values in zip(*per_key):
                assert sum(layer_values) == pytest.approx(1.0, abs=1e-4)
                assert all(0.0 <= v <= 1.0 + 1e-6 for v in layer_values)
        assert shares["question->answer"] == [0.0] * len(shares["question->answer"])  # causal
        assert all(s > 0 for s in shares["question->image"])
    # The typed question group decodes to the question; the spoken one is the audio tokens.
    typed_ids = batch.teacher_input_ids[0]
    groups = token_groups(typed_ids, processor, "text", 0)
    assert processor.tokenizer.decode(typed_ids[groups["question"]]) == batch.questions[0]
    spoken = token_groups(batch.student_input_ids[0], processor, "audio", 0)
    assert int(spoken["question"].sum()) == int(batch.audio_token_counts[0])
    # Fused attention keeps no weights: a clear error, not silent zeros.
    sdpa_model, _, _ = _first_batch(assets, assets["model"], "sdpa")
    with pytest.raises(RuntimeError, match="eager"):
        sample_attention_shares(sdpa_model, batch, "text", answer)


def test_attention_analysis_cli_compare(assets):
    out = assets["root"] / "attention"
    report = attention_analysis.main(["--model", assets["model"], "--compare", assets["model"], "--shards",
                                      assets["shards"], "--out", str(out), "--limit", "2"])
    assert json.loads((out / "attention.json").read_text()) == json.loads(json.dumps(report))
    before, after = report["models"]["before"], report["models"]["after"]
    assert before["n"] == 2 and before["shares"] == after["shares"]
    layers = len(before["shares"]["typed"]["question->image"])
    assert layers == 2 and set(before["shares"]) == {"typed", "spoken"}
    for name in ("question_to_image", "answer_to_image", "answer_to_question"):
        assert os.path.getsize(out / f"{name}.png") > 0


def test_evaluate_two_ranks_matches_one(assets):
    """torchrun, 2 CPU ranks (gloo): every sample once, same predictions as one process."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    root = assets["root"]
    common = ["--model", assets["model"], "--shards", assets["shards"], "--max_new_tokens", "3"]
    evaluate.main(common + ["--out", str(root / "one" / "report.json"), "--batch_size", "4"])
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", f"--master_port={port}",
                    "tools/evaluate.py", *common, "--out", str(root / "two" / "report.json"), "--batch_size", "2"],
                   check=True, timeout=300, cwd=REPO_ROOT)
    one = json.loads((root / "one" / "report.json").read_text())
    two = json.loads((root / "two" / "report.json").read_text())
    assert two.pop("settings")["world_size"] == 2 and one.pop("settings")["world_size"] == 1
    assert one == two
    assert (root / "one" / "report.predictions.jsonl").read_text() == (root / "two" / "report.predictions.jsonl").read_text()


@pytest.mark.parametrize("preset", ["tiny-qwen2_5_omni", "tiny-qwen3_omni", "tiny-phi4mm", "tiny-qwen3vl", "tiny-internvl"])
def test_both_tools_take_a_native_export(assets, preset, tmp_path):
    """tools/evaluate.py and tools/attention_analysis.py on a native model saved in its
    family's layout (what tools/export_hf.py writes for it), and on composed Qwen3-VL and InternVL exports."""
    from trainer.config import ModelConfig
    from trainer.models.factory import build_model

    model, processor = build_model(ModelConfig(model=preset, attn_impl="sdpa"))
    save_omni(model, processor, str(tmp_path / "model"))
    out = tmp_path / "eval" / "report.json"
    evaluate.main(["--model", str(tmp_path / "model"), "--shards", assets["shards"], "--out", str(out),
                   "--batch_size", "2", "--max_new_tokens", "3"])
    report = json.loads(out.read_text())
    assert report["n"] == assets["n"] and report["settings"]["modes"] == ["text", "audio"]
    report = attention_analysis.main(["--model", str(tmp_path / "model"), "--shards", assets["shards"],
                                      "--out", str(tmp_path / "attn"), "--limit", "2", "--dtype", "fp32"])
    shares = report["models"]["model"]
    assert shares["n"] == 2 and set(shares["shares"]) == {"typed", "spoken"}
    layers = model.adapter.text_config.num_hidden_layers
    assert len(shares["shares"]["typed"]["question->image"]) == layers  # one share per decoder layer


def test_whisper_features_compares_the_window_with_the_clip(assets):
    """tools/whisper_features.py: per clip, the audio tokens of the window vs the clip read alone
    (they differ: attention no longer sees the window's padding), and a clip batched with another."""
    from tools import whisper_features

    report = whisper_features.main(["--model", assets["model"], "--shards", assets["shards"], "--limit", "4",
                                    "--json"])
    assert report["clips"] == 4 and 0 < report["seconds"]["mean"] < 10
    assert report["window_vs_clip_rel"]["max"] > 0 and -1 <= report["window_vs_clip_cos"]["mean"] <= 1
    assert report["batched_vs_alone_rel"]["mean"] >= 0
