"""Composed exports as transformers models: AutoModelForCausalLM / AutoProcessor.from_pretrained(DIR,
trust_remote_code=True) load what save_omni (tools/export_hf.py) writes, in a fresh process where
this project cannot be imported, and give the engine's logits (fp32, 1e-5) and tools/evaluate.py's
greedy answers on the same held-out samples, typed and spoken, for Qwen2-VL, Qwen2.5-VL, Qwen3-VL
and InternVL bases."""

import io
import json
import os
import subprocess
import sys
import tarfile

import numpy as np
import pytest
import torch

from trainer.config import ModelConfig
from trainer.data import build_eval_loader
from trainer.data.decode import decode_audio, decode_image
from trainer.models.factory import build_model
from trainer.models.serialize import save_omni
from tools import evaluate

MAX_NEW_TOKENS = 6
SAMPLES = 4

PRESETS = ["tiny", "tiny-qwen25vl", "tiny-qwen3vl", "tiny-internvl"]

# Runs in a fresh interpreter, cwd = the tests' folder: the project's packages are blocked first.
# Its arguments are pairs (export, inputs folder): one interpreter checks every base's export.
REMOTE_CHECK = r'''
import importlib.abc, json, sys
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("trainer", "datagen", "tools", "tests"):
            raise ModuleNotFoundError(f"blocked: {name}")
sys.meta_path.insert(0, Block())
try:
    import trainer  # noqa: F401
    raise SystemExit("the project is importable")
except ModuleNotFoundError:
    pass
import numpy as np, torch
from PIL import Image
from transformers import AutoModelForCausalLM, AutoProcessor
def check(export, inputs_dir):
    meta = json.load(open(f"{inputs_dir}/meta.json"))
    model = AutoModelForCausalLM.from_pretrained(export, trust_remote_code=True, dtype=torch.float32).eval()
    processor = AutoProcessor.from_pretrained(export, trust_remote_code=True)
    images = [Image.open(f"{inputs_dir}/{i}.png") if has else None for i, has in enumerate(meta["has_image"])]
    audios = [np.load(f"{inputs_dir}/{i}.npy") for i in range(len(images))]
    out = {}
    for mode in ("text", "audio"):
        batch = processor(images=images, questions=meta["questions"]) if mode == "text" else processor(images=images, audios=audios)
        with torch.no_grad():
            logits = model(**batch).logits
            ids = model.generate(**batch, max_new_tokens=meta["max_new_tokens"], do_sample=False)
        mask = batch["attention_mask"].bool()
        torch.save({"input_ids": batch["input_ids"], "logits": logits[mask]}, f"{inputs_dir}/remote_{mode}.pt")
        out[mode] = processor.batch_decode(ids[:, batch["input_ids"].shape[1]:], skip_special_tokens=True)
    json.dump(out, open(f"{inputs_dir}/remote_answers.json", "w"))
for export, inputs_dir in zip(sys.argv[1::2], sys.argv[2::2]):
    try:  # one base's failure is that base's test's, the others are still checked
        check(export, inputs_dir)
    except Exception:
        import traceback
        open(f"{inputs_dir}/remote_error.txt", "w").write(traceback.format_exc())
'''


def build(preset):
    if preset != "tiny-qwen25vl":
        return build_model(ModelConfig(model=preset, attn_impl="sdpa"))
    from tests.test_model_omni import tiny_qwen25_vl_config
    from trainer.models.build import build_from_configs
    from trainer.models.tiny import build_tiny_processor, tiny_whisper_config

    processor = build_tiny_processor()
    torch.manual_seed(0)
    return build_from_configs(tiny_qwen25_vl_config(len(processor.tokenizer)), tiny_whisper_config(80, 1000), processor,
                              attn_impl="sdpa"), processor


def raw_samples(spec: str) -> dict:
    """The first shard's samples as stored, by their JSON id: {"json", "png"?, "flac"} bytes."""
    path = spec.split("{")[0] + "000000.tar" if "{" in spec else spec
    samples = {}
    with tarfile.open(path) as tar:
        for member in tar.getmembers():
            key, _, ext = member.name.partition(".")
            samples.setdefault(key, {})[ext] = tar.extractfile(member).read()
    return {json.loads(sample["json"])["id"]: sample for sample in samples.values()}


@pytest.fixture(scope="module")
def remote(demo_shards, tmp_path_factory) -> dict:
    """Per base: its model and processor, its export's tools/evaluate.py answers, the held-out batch
    and the same samples as stored, then the fresh interpreter's logits and answers for all four."""
    shards, runs, argv = demo_shards["heldout_shards"], {}, []
    stored = raw_samples(shards)
    for preset in PRESETS:
        root = tmp_path_factory.mktemp(f"hf_{preset}")
        model, processor = build(preset)
        model.eval()
        export = root / f"export_{preset}"
        save_omni(model, processor, str(export))
        # tools/evaluate.py's greedy answers on the held-out shard (batches of SAMPLES, left-padded).
        evaluate.main(["--model", str(export), "--shards", shards, "--out", str(root / "eval" / "report.json"),
                       "--batch_size", str(SAMPLES), "--max_new_tokens", str(MAX_NEW_TOKENS)])
        records = [json.loads(line) for line in (root / "eval" / "report.predictions.jsonl").read_text().splitlines()]
        # The engine's logits on the first batch, and the same samples decoded as the loader decodes them.
        batch = next(iter(build_eval_loader(shards, processor, micro_batch_size=SAMPLES, max_seq_len=4096, rank=0,
                                            world_size=1)))
        inputs = root / "inputs"
        inputs.mkdir()
        meta = {"questions": [], "has_image": [], "ids": [], "max_new_tokens": MAX_NEW_TOKENS}
        for i, raw in enumerate(stored[i] for i in batch.ids):
            record = json.loads(raw["json"])
            meta["ids"].append(record.get("id"))
            meta["questions"].append(record["question"])
            image_bytes = raw.get("png") or raw.get("jpg")
            meta["has_image"].append(image_bytes is not None)
            if image_bytes is not None:
                decode_image(image_bytes, 10**9)[0].save(inputs / f"{i}.png")
            audio_bytes = next(raw[ext] for ext in ("flac", "wav", "mp3", "ogg") if ext in raw)
            np.save(inputs / f"{i}.npy", decode_audio(audio_bytes, processor.sampling_rate, 30.0)[0])
        (inputs / "meta.json").write_text(json.dumps(meta))
        runs[preset] = dict(model=model, batch=batch, records=records, meta=meta, inputs=inputs)
        argv += [str(export), str(inputs)]
    folder = tmp_path_factory.mktemp("hf_remote")
    (folder / "check.py").write_text(REMOTE_CHECK)
    run = subprocess.run([sys.executable, "-I", str(folder / "check.py"), *argv], cwd=folder, capture_output=True,
                         text=True, timeout=900, stdin=subprocess.DEVNULL)
    return {"run": run, **runs}


@pytest.mark.xdist_group("hf_export")  # one worker builds the four exports and starts the one interpreter
@pytest.mark.parametrize("preset", PRESETS)
def test_auto_classes_load_the_export_without_this_project(preset, remote):
    assert remote["run"].returncode == 0, remote["run"].stderr[-3000:]
    model, batch, records, meta, inputs = (remote[preset][k] for k in ("model", "batch", "records", "meta", "inputs"))
    assert not (inputs / "remote_error.txt").exists(), (inputs / "remote_error.txt").read_text()[-3000:]
    remote_answers = json.loads((inputs / "remote_answers.json").read_text())
    for mode in ("text", "audio"):
        role = "teacher" if mode == "text" else "student"
        ids, mask, _ = batch.side(role)
        theirs = torch.load(inputs / f"remote_{mode}.pt")
        assert torch.equal(theirs["input_ids"], ids), f"{mode}: the processor's prompts are the loader's"
        with torch.no_grad():
            images, _ = model.encode_images(batch)
            audio, _ = model.encode_audio(batch)
            hidden, _ = model.run_side(batch, role, images, audio if role == "student" else None)
            ours = model.adapter.lm_head(hidden)[mask.bool()]
        torch.testing.assert_close(theirs["logits"], ours, rtol=1e-5, atol=1e-5)
        evaluated = {r["id"]: r["prediction"] for r in records if r["mode"] == mode}
        assert remote_answers[mode] == [evaluated[i] for i in meta["ids"]], mode


@pytest.mark.parametrize("preset", ["tiny", "tiny-qwen3vl", "tiny-internvl"])
def test_beams_dtype_and_picture_modes(preset, tmp_path):
    """In process: beam search expands each sample's patches or tiles whole (its first step's
    scores are the forward's), `dtype=` reaches every part, and a transparent picture is put on
    white as the trainer's loader does."""
    from PIL import Image
    from transformers import AutoModelForCausalLM, AutoProcessor

    from trainer.data.decode import to_rgb

    model, processor = build(preset)
    save_omni(model, processor, str(tmp_path))
    hf = AutoModelForCausalLM.from_pretrained(str(tmp_path), trust_remote_code=True, dtype=torch.float32).eval()
    hp = AutoProcessor.from_pretrained(str(tmp_path), trust_remote_code=True)
    rng = np.random.default_rng(0)
    pictures = [Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)) for h, w in ((56, 84), (96, 64))]
    batch = hp(images=[pictures[0], None, pictures[1]], questions=["what colour is the circle?", "hi", "where?"])
    with torch.no_grad():
        last = hf(**batch).logits[:, -1]
        out = hf.generate(**batch, num_beams=2, max_new_tokens=1, do_sample=False, output_logits=True,
                          return_dict_in_generate=True)
    torch.testing.assert_close(out.logits[0], last.repeat_interleave(2, dim=0), rtol=1e-5, atol=1e-5)
    half = AutoModelForCausalLM.from_pretrained(str(tmp_path), trust_remote_code=True, dtype=torch.bfloat16)
    assert {p.dtype for p in half.parameters()} == {torch.bfloat16}
    clear = Image.new("RGBA", (64, 64), (0, 0, 0, 0))
    clear.paste((255, 0, 0, 255), (16, 16, 48, 48))
    assert np.array_equal(np.asarray(hp.prepare_image(clear)), np.asarray(to_rgb(clear)))


@pytest.mark.parametrize("preset", ["tiny", "tiny-qwen3vl", "tiny-internvl"])
def test_a_later_turn_with_its_own_picture_and_speech_continues_the_cache(preset, tmp_path):
    """A prompt cut before its picture: the first part cached, then the rest (picture, speech) given
    with that cache gives the logits of the whole prompt at once (1e-5), and generate() from the
    cache gives the answer of generate() without it."""
    from PIL import Image
    from transformers import AutoModelForCausalLM, AutoProcessor

    model, processor = build(preset)
    save_omni(model, processor, str(tmp_path))
    hf = AutoModelForCausalLM.from_pretrained(str(tmp_path), trust_remote_code=True, dtype=torch.float32).eval()
    hp = AutoProcessor.from_pretrained(str(tmp_path), trust_remote_code=True)
    rng = np.random.default_rng(1)
    picture = Image.fromarray(rng.integers(0, 255, (64, 96, 3), dtype=np.uint8))
    speech = (0.1 * rng.standard_normal(16000)).astype(np.float32)
    for batch in (hp(images=[picture], audios=[speech]), hp(images=[picture], questions=["where is the star?"])):
        ids, mask = batch["input_ids"], batch["attention_mask"]
        cut = int((ids[0] == hf.image_token_id).nonzero()[0, 0]) - 1  # before the picture's first token
        media = {k: v for k, v in batch.items() if k not in ("input_ids", "attention_mask")}
        with torch.no_grad():
            whole = hf(**batch).logits
            first = hf(input_ids=ids[:, :cut], attention_mask=mask[:, :cut], use_cache=True)
            rest = hf(input_ids=ids[:, cut:], attention_mask=mask, past_key_values=first.past_key_values, use_cache=True,
                      **media).logits
            torch.testing.assert_close(rest, whole[:, cut:], rtol=1e-5, atol=1e-5)
            plain = hf.generate(**batch, max_new_tokens=4, do_sample=False)
            cache = hf(input_ids=ids[:, :cut], attention_mask=mask[:, :cut], use_cache=True).past_key_values
            continued = hf.generate(**batch, past_key_values=cache, max_new_tokens=4, do_sample=False)
        assert torch.equal(continued, plain)
