"""Shard specs and safe raw reading of WebDataset tar shards.

A shard is read with webdataset's tar iteration and gopen (local paths, pipe:, http(s)
and object-store URLs that gopen knows), members are grouped into samples by key, and
only allow-listed extensions are kept as raw bytes. Nothing is decoded here and nothing
is ever unpickled: members such as `.pyd`/`.pickle` are dropped unread and counted.
"""

import logging
import os
import tarfile

import braceexpand
from webdataset.gopen import gopen
from webdataset.tariterators import base_plus_ext, tar_file_iterator

log = logging.getLogger(__name__)

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
AUDIO_EXTS = ("wav", "flac", "mp3", "ogg")
ALLOWED_EXTS = frozenset(IMAGE_EXTS + AUDIO_EXTS + ("json",))


def split_spec_list(spec: str) -> list[str]:
    """'a-{0..3}.tar,b-{x,y}.tar' -> ['a-{0..3}.tar', 'b-{x,y}.tar']: commas outside braces
    separate specs. A `pipe:` command is one spec, whatever it contains."""
    if spec.startswith("pipe:"):
        return [spec]
    parts, depth, start = [], 0, 0
    for i, char in enumerate(spec):
        depth += {"{": 1, "}": -1}.get(char, 0)
        if char == "," and depth == 0:
            parts.append(spec[start:i])
            start = i + 1
    parts.append(spec[start:])
    return [p.strip() for p in parts if p.strip()]


def expand_shard_spec(spec: str | list[str]) -> list[str]:
    """'data/shard-{000000..000009}.tar', a comma-separated list of such specs, or a Python
    list of them -> list of shard URLs, in order."""
    specs = split_spec_list(spec) if isinstance(spec, str) else list(spec)
    urls = []
    for item in specs:
        urls.extend(braceexpand.braceexpand(item))
    if not urls:
        raise ValueError(f"shard spec {spec!r} names no shards")
    return urls


def check_shard_spec(spec: str | list[str]) -> list[str]:
    """The spec's shard URLs, after checking that every local one exists (remote and pipe:
    URLs are checked when read); FileNotFoundError says how many are missing and names one."""
    urls = expand_shard_spec(spec)
    local = [u for u in urls if not u.startswith("pipe:") and "://" not in u]
    missing = [u for u in local if not os.path.exists(u)]
    if missing and len(missing) == len(local):
        raise FileNotFoundError(f"no shard matches {spec!r} (first missing: {missing[0]})")
    if missing:
        raise FileNotFoundError(f"{len(missing)} of {len(local)} shards do not exist, e.g. {missing[0]}")
    return urls


class ShardReadError(Exception):
    """A shard could not be opened or was cut short; `reason` is the skip reason."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


def read_shard(url: str) -> tuple[list[dict], dict, ShardReadError | None]:
    """All samples of one shard as raw bytes, in tar order.

    Returns (samples, ignored, error): each sample is {"__key__", "__url__", ext: bytes};
    `ignored` counts dropped members by extension; `error` is set when the shard is
    missing/unreadable ("shard_unreadable") or truncated ("truncated_tar") - the samples
    completed before a truncation are still returned, the one being read at the cut is
    dropped: it may have lost members, and one that lost only its image would otherwise
    pass as a text-only sample.
    """
    samples: list[dict] = []
    ignored: dict[str, int] = {}
    if "://" not in url and not url.startswith("pipe:") and not os.path.isfile(url):
        return samples, ignored, ShardReadError("shard_unreadable", f"shard {url} does not exist")
    try:
        stream = gopen(url, "rb")
    except Exception as exc:  # noqa: BLE001 - any opener failure means the shard is unreadable
        return samples, ignored, ShardReadError("shard_unreadable", f"cannot open shard {url}: {exc}")
    current = None
    error = None
    try:
        for member in tar_file_iterator(stream, select_files=lambda name: _allowed(name, ignored)):
            prefix, suffix = base_plus_ext(member["fname"])
            if prefix is None:
                continue
            if current is None or current["__key__"] != prefix:
                if current is not None:
                    samples.append(current)
                current = {"__key__": prefix, "__url__": url}
            current[suffix.lower()] = member["data"]
    except (tarfile.TarError, EOFError, OSError) as exc:
        reason = "truncated_tar" if samples or current is not None else "shard_unreadable"
        error = ShardReadError(reason, f"shard {url}: {type(exc).__name__}: {exc}")
    finally:
        try:
            stream.close()
        except Exception as exc:  # noqa: BLE001 - a pipe: opener reports its exit status on close
            if error is None:
                reason = "truncated_tar" if samples or current is not None else "shard_unreadable"
                error = ShardReadError(reason, f"shard {url}: {exc}")
    if current is not None and error is None:
        samples.append(current)
    return samples, ignored, error


def _allowed(name: str, ignored: dict) -> bool:
    _, suffix = base_plus_ext(name)
    ext = (suffix or "").lower()
    if ext in ALLOWED_EXTS:
        return True
    ignored[ext or "<none>"] = ignored.get(ext or "<none>", 0) + 1
    return False
