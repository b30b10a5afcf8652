"""Building WebDataset shards: LLaVA instruction data with TTS-spoken questions, and ASR
manifests. Used by tools/make_shards.py.

Every human/assistant turn pair of a LLaVA record becomes one sample (image, spoken
question as 16 kHz FLAC, json with question/answer). A record without an image (the
text-only ShareGPT conversations of LLaVA-1.5-mix-665k) gives samples without an image
member; a record whose image file is missing is skipped, never demoted to text-only.
Samples are shuffled with --seed (so shards mix sources) and --limit keeps the first N of
that order. Shard i holds samples [i*N, (i+1)*N) of the plan; it is written to a temporary
name and renamed when complete, so a re-run skips finished shards and a crash loses at most
the shard in progress.
"""

import hashlib
import io
import json
import logging
import multiprocessing
import os
import re
import tarfile
import time
from concurrent.futures import ProcessPoolExecutor
import zlib

import numpy as np
import soundfile as sf
import torch
import torchaudio
from PIL import Image
from tqdm import tqdm

from trainer.data.shards import AUDIO_EXTS, IMAGE_EXTS
from datagen.tts import CommandTTS, EspeakTTS

log = logging.getLogger(__name__)

AUDIO_RATE = 16000
META_KEYS = ("task", "choices", "answers", "source", "bench", "context", "stage", "with_image")
STATS_DIR = ".stats"
SHARD_NAME = "shard-{:06d}.tar"


# --- planning -------------------------------------------------------------------------------

def _safe_key(text: str) -> str:
    # Dots would split the key from the extension inside the tar; slashes make directories.
    return re.sub(r"[^A-Za-z0-9_-]", "_", str(text)) or "sample"


def plan_llava(records: list, image_root: str, skipped: dict) -> list[dict]:
    """LLaVA records -> one entry per (human, gpt) turn pair; entry["image"] is None for a
    record without an image (text-only sample)."""
    entries, keys = [], set()
    for index, record in enumerate(records):
        if not isinstance(record, dict) or not isinstance(record.get("conversations"), list):
            _count(skipped, "bad_record")
            continue
        image = record.get("image") or None
        if image is not None and not isinstance(image, str):
            _count(skipped, "multi_image")  # one image per sample: the pair shares pixel_values
            continue
        turns = record["conversations"]
        base_key = _safe_key(record.get("id", index))
        for turn in range(0, len(turns) - 1, 2):
            human, gpt = turns[turn], turns[turn + 1]
            if not (isinstance(human, dict) and isinstance(gpt, dict) and human.get("from") == "human"
                    and gpt.get("from") == "gpt"):
                _count(skipped, "bad_turns")
                continue
            question = str(human.get("value", "")).replace("<image>", "").strip()
            answer = str(gpt.get("value", "")).strip()
            if not question or not answer:
                _count(skipped, "empty_text")
                continue
            key = f"{base_key}_t{turn // 2}"
            while key in keys:
                key += "_dup"
            keys.add(key)
            meta = {"question": question, "answer": answer, "id": str(record.get("id", index))}
            meta.update({k: record[k] for k in META_KEYS if k in record})
            entries.append({"key": key, "image": None if image is None else os.path.join(image_root, image),
                            "meta": meta})
        if len(turns) % 2:
            _count(skipped, "unpaired_turn")
    return entries


def plan_asr(manifest: str, skipped: dict) -> list[dict]:
    entries, keys = [], set()
    root = os.path.dirname(os.path.abspath(manifest))
    with open(manifest, encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                item = json.loads(line)
                audio, text = item["audio"], str(item["text"]).strip()
            except (json.JSONDecodeError, KeyError, TypeError):
                log.warning("%s line %d: not a JSON object with 'audio' and 'text'; skipped", manifest, line_no)
                _count(skipped, "bad_manifest_line")
                continue
            if not text:
                _count(skipped, "empty_text")
                continue
            key = _safe_key(item.get("id", os.path.splitext(os.path.basename(audio))[0]))
            while key in keys:
                key += "_dup"
            keys.add(key)
            entries.append({"key": key, "audio": os.path.join(root, audio),
                            "meta": {"transcript": text, "id": str(item.get("id", key))}})
    return entries


def _count(counts: dict, reason: str, n: int = 1) -> None:
    counts[reason] = counts.get(reason, 0) + n


# --- per-sample work (runs in worker processes) ---------------------------------------------

_TTS = None


def _init_worker(tts_config: dict | None) -> None:
    global _TTS
    torch.set_num_threads(1)
    if tts_config is not None:
        _TTS = CommandTTS(tts_config["cmd"]) if tts_config.get("cmd") else EspeakTTS(tts_config.get("voices"))


def flac_bytes(audio: np.ndarray, rate: int) -> bytes:
    if rate != AUDIO_RATE:
        audio = torchaudio.functional.resample(torch.from_numpy(np.ascontiguousarray(audio)), rate, AUDIO_RATE).numpy()
    peak = float(np.abs(audio).max()) if audio.size else 0.0
    if peak > 1.0:
        audio = audio / peak
    buffer = io.BytesIO()
    sf.write(buffer, audio, AUDIO_RATE, format="FLAC", subtype="PCM_16")
    return buffer.getvalue()


def _image_member(path: str) -> tuple[str, bytes]:
    """Original bytes when the format is on the loader's allow-list, else re-encoded PNG."""
    with open(path, "rb") as f:
        data = f.read()
    with Image.open(io.BytesIO(data)) as image:
        image_format = (image.format or "").lower()
        image.verify()
    ext = {"jpeg": "jpg", "mpo": "jpg"}.get(image_format, image_format)
    if ext in IMAGE_EXTS:
        return ext, data
    buffer = io.BytesIO()
    Image.open(io.BytesIO(data)).save(buffer, format="PNG")
    return "png", buffer.getvalue()


def process_llava_entry(job: tuple[dict, int]) -> dict:
    entry, seed = job
    members = {}
    if entry["image"] is not None:
        try:
            image_ext, image_bytes = _image_member(entry["image"])
        except FileNotFoundError:
            return {"skip": "missing_image", "key": entry["key"], "detail": entry["image"]}
        except Exception as exc:  # noqa: BLE001 - any PIL failure: unusable image
            return {"skip": "bad_image", "key": entry["key"], "detail": f"{entry['image']}: {exc}"}
        members[image_ext] = image_bytes  # first member: a tar cut inside it drops the whole sample
    try:
        # Voice, rate and pitch vary per sample, reproducibly: seeded by (build seed, key).
        audio, rate = _TTS.synthesize(entry["meta"]["question"], zlib.crc32(f"{seed}:{entry['key']}".encode()))
    except Exception as exc:  # noqa: BLE001 - TTS engines fail in their own ways
        return {"skip": "tts_failed", "key": entry["key"], "detail": str(exc)}
    members["flac"] = flac_bytes(audio, rate)
    members["json"] = json.dumps(entry["meta"], ensure_ascii=False).encode("utf-8")
    return {"key": entry["key"], "members": members, "seconds": len(audio) / rate}


def process_asr_entry(job: tuple[dict, int]) -> dict:
    entry, _seed = job
    path = entry["audio"]
    ext = os.path.splitext(path)[1].lower().lstrip(".")
    if not os.path.isfile(path):
        return {"skip": "missing_audio", "key": entry["key"], "detail": path}
    try:
        info = sf.info(path)
        if ext in AUDIO_EXTS and info.frames > 0:
            with open(path, "rb") as f:
                audio_ext, audio_bytes = ext, f.read()
            seconds = info.frames / info.samplerate
        else:
            audio, rate = sf.read(path, dtype="float32", always_2d=True)
            if audio.shape[0] == 0:
                raise ValueError("no audio samples")
            audio_ext, audio_bytes = "flac", flac_bytes(audio.mean(axis=1), rate)
            seconds = audio.shape[0] / rate
    except Exception as exc:  # noqa: BLE001 - libsndfile errors for unreadable files
        return {"skip": "bad_audio", "key": entry["key"], "detail": f"{path}: {exc}"}
    members = {audio_ext: audio_bytes, "json": json.dumps(entry["meta"], ensure_ascii=False).encode("utf-8")}
    return {"key": entry["key"], "members": members, "seconds": seconds}


# --- shard writing ----------------------------------------------------------------------------

def write_tar(path: str, results: list[dict]) -> None:
    """A WebDataset tar of results [{"key", "members": {ext: bytes}}], byte-identical on rebuild."""
    with tarfile.open(path, "w") as tar:
        for result in results:
            for ext, data in result["members"].items():
                info = tarfile.TarInfo(f"{result['key']}.{ext}")
                info.size = len(data)
                info.mode = 0o444
                info.mtime = 0  # byte-identical rebuilds
                tar.addfile(info, io.BytesIO(data))


def _atomic_write_json(path: str, obj) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2)
    os.replace(tmp, path)


# A spawned worker imports torch and the TTS engine (several seconds of CPU) before its first
# sample, the time of about a hundred samples written in this process: fewer samples than this per
# worker are written in this process (the same samples: each one's voice settings are seeded by its
# key, not its worker).
MIN_SAMPLES_PER_WORKER = 64


def write_shards(entries: list[dict], process, out_dir: str, *, plan: dict, samples_per_shard: int, workers: int,
                 seed: int, tts_config: dict | None, skipped: dict, progress: bool = True) -> dict:
    """Run `process` over entries, write complete shards, return (and write) index.json."""
    if samples_per_shard < 1:
        raise ValueError(f"samples_per_shard must be >= 1, got {samples_per_shard}")
    os.makedirs(os.path.join(out_dir, STATS_DIR), exist_ok=True)
    plan_path = os.path.join(out_dir, STATS_DIR, "plan.json")
    plan = {**plan, "entries_sha1": hashlib.sha1(json.dumps([e["key"] for e in entries]).encode()).hexdigest()}
    if os.path.exists(plan_path):
        with open(plan_path) as f:
            previous = json.load(f)
        if previous != plan:
            raise ValueError(f"{out_dir} holds shards from a different build ({previous} != {plan}); "
                             "use a fresh --out directory")
    else:
        _atomic_write_json(plan_path, plan)
    num_shards = (len(entries) + samples_per_shard - 1) // samples_per_shard
    workers = min(workers, max(1, len(entries) // MIN_SAMPLES_PER_WORKER))
    # spawn, not fork: forking a process that already runs torch threads can deadlock. A worker
    # that dies breaks the executor (BrokenProcessPool) instead of being respawned forever.
    pool = ProcessPoolExecutor(workers, multiprocessing.get_context("spawn"), _init_worker, (tts_config,)) \
        if workers > 1 else None
    threads = torch.get_num_threads()
    if pool is None:
        _init_worker(tts_config)
    shard_samples, total_samples, total_seconds = {}, 0, 0.0
    bar = tqdm(total=len(entries), unit="sample", disable=not progress, desc=f"shards -> {out_dir}")
    started = time.time()
    try:
        for shard in range(num_shards):
            name = SHARD_NAME.format(shard)
            shard_path = os.path.join(out_dir, name)
            stats_path = os.path.join(out_dir, STATS_DIR, name + ".json")
            chunk = entries[shard * samples_per_shard:(shard + 1) * samples_per_shard]
            if not (os.path.exists(shard_path) and os.path.exists(stats_path)):
                jobs = [(entry, seed) for entry in chunk]
                results = []
                for result in (pool.map(process, jobs, chunksize=4) if pool else map(process, jobs)):
                    results.append(result)
                    bar.update(1)
                stats = {"samples": 0, "seconds": 0.0, "skipped": {}}
                good = []
                for result in results:
                    if "skip" in result:
                        log.warning("skipping input %s: %s: %s", result["key"], result["skip"], result["detail"])
                        _count(stats["skipped"], result["skip"])
                    else:
                        good.append(result)
                        stats["samples"] += 1
                        stats["seconds"] += result["seconds"]
                tmp_path = shard_path + ".tmp"
                write_tar(tmp_path, good)
                _atomic_write_json(stats_path, stats)
                os.replace(tmp_path, shard_path)  # the shard exists only once complete
            else:
                bar.update(len(chunk))
                with open(stats_path) as f:
                    stats = json.load(f)
            shard_samples[name] = stats["samples"]
            total_samples += stats["samples"]
            total_seconds += stats["seconds"]
            for reason, n in stats["skipped"].items():
                _count(skipped, reason, n)
    finally:
        bar.close()
        if pool is not None:
            pool.shutdown()
        torch.set_num_threads(threads)  # the in-process worker's one thread was for the build only
    index = {
        "mode": plan["mode"],
        "shards": list(shard_samples),
        "shard_samples": shard_samples,  # the loader weighs a lost or truncated shard by its count
        "shard_spec": os.path.join(out_dir, f"shard-{{000000..{num_shards - 1:06d}}}.tar") if num_shards else None,
        "samples": total_samples,
        "audio_hours": round(total_seconds / 3600, 4),
        "skipped": dict(sorted(skipped.items())),
        "build_seconds": round(time.time() - started, 1),
    }
    _atomic_write_json(os.path.join(out_dir, "index.json"), index)
    return index


def _subset(entries: list[dict], limit: int | None, seed: int) -> list[dict]:
    order = np.random.default_rng(seed).permutation(len(entries))
    if limit is not None:
        order = order[:limit]
    return [entries[i] for i in order]


def make_llava_shards(json_path: str, image_root: str, out_dir: str, *, limit: int | None = None, seed: int = 0,
                      samples_per_shard: int = 1000, workers: int = 1, voices: list[str] | None = None,
                      tts_cmd: str | None = None, progress: bool = True) -> dict:
    """LLaVA conversation JSON + image root -> spoken-question shards; returns index.json's content."""
    with open(json_path, encoding="utf-8") as f:
        records = json.load(f)
    if not isinstance(records, list):
        raise ValueError(f"{json_path}: expected a JSON list of LLaVA records")
    if tts_cmd is None:
        for voice in voices or []:
            EspeakTTS([voice]).synthesize("test", 0)  # an unknown voice fails here, not once per sample
    skipped: dict = {}
    entries = _subset(plan_llava(records, image_root, skipped), limit, seed)
    plan = {"mode": "llava", "json": os.path.abspath(json_path), "limit": limit, "seed": seed,
            "samples_per_shard": samples_per_shard, "voices": voices, "tts_cmd": tts_cmd}
    return write_shards(entries, process_llava_entry, out_dir, plan=plan, samples_per_shard=samples_per_shard,
                        workers=workers, seed=seed, tts_config={"voices": voices, "cmd": tts_cmd},
                        skipped=skipped, progress=progress)


def make_asr_shards(manifest: str, out_dir: str, *, limit: int | None = None, seed: int = 0,
                    samples_per_shard: int = 1000, workers: int = 1, progress: bool = True) -> dict:
    """JSONL manifest ({"audio": path, "text": ...} per line) -> ASR shards; returns index.json's content."""
    skipped: dict = {}
    entries = _subset(plan_asr(manifest, skipped), limit, seed)
    plan = {"mode": "asr", "manifest": os.path.abspath(manifest), "limit": limit, "seed": seed,
            "samples_per_shard": samples_per_shard}
    return write_shards(entries, process_asr_entry, out_dir, plan=plan, samples_per_shard=samples_per_shard,
                        workers=workers, seed=seed, tts_config=None, skipped=skipped, progress=progress)
