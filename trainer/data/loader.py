"""Streaming shard loader: rank/worker split, seeded shuffling, epochs, skip accounting
and exact resume.

Split: the shard list is permuted per epoch with seed+epoch (identical on every rank),
then slot s = rank * num_workers + worker reads shards s, s+S, s+2S, ... (S = world_size *
num_workers). With fewer shards than slots every slot reads every shard and keeps raw
sample g (counted over the epoch's shard order) when g % S == s, so no slot is empty.

Shuffle and memory rule: a shard's raw (undecoded) samples are held in memory and visited
in a permutation seeded by (seed, epoch, shard index). Peak memory per worker is about one
shard's bytes plus prefetched batches, so keep shards around 100-500 MB.

Position of a slot: (epoch, shard_pos in that epoch's slot shard list, cursor = raw samples
of that shard already consumed, base = raw samples in earlier shards of the epoch). A resumed
stream re-reads the current shard's raw bytes and starts at the cursor: skipped samples are
never decoded.

Position also carries `epoch_seen`, the samples (ok + bad) this slot has met in the current
epoch, so a resumed slot knows the epoch was not empty even when it resumes at its very end.

Token budget (`max_tokens` > 0, trainer/data/budget.py): a slot fills a buffer of
`buffer_size` encoded samples, then hands out the micro-batches planned from it. A batch
handed out before the buffer's last one carries, instead of a position, the buffer's start
(position and counts before its first sample), how many of its micro-batches were handed
out and the plan's settings: a resumed slot re-reads the buffer from its start, plans it
again (the same samples, lengths and seeded order give the same micro-batches) and skips
the ones already handed out. The buffer's last batch carries the position after the buffer.

Bad-data policy: a broken sample is skipped, counted by reason and logged as one WARNING
naming shard, key, field and reason; any exception raised while one sample is encoded
counts as a broken sample (collate.py names the field), never as the job's death.
A missing/unreadable shard counts as the samples it should have held, a truncated one as the
samples lost at the cut: the shard's count from the index.json beside it (make_shards writes
one), else the mean of the shards this slot has read whole so far (at least 1; the tally is
part of the position, so a resumed slot estimates as the uninterrupted one). In sample-split
mode each slot counts its share of those samples.
When bad / (ok + bad) > max_bad_fraction, checked once MIN_QUALITY_COUNT samples were seen or
at the end of every epoch (whichever comes first), DataQualityError lists the counts.
"""

import atexit
import json
import logging
import math
import multiprocessing
import os
import signal
import zlib

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from trainer.data.batch import TRAINING_STAGES, Stage
from trainer.data.budget import plan_micro_batches, sample_lengths
from trainer.data.collate import SampleEncoder, collate_eval, collate_train
from trainer.data.decode import SampleError
from trainer.data.shards import expand_shard_spec, read_shard

log = logging.getLogger(__name__)

MIN_QUALITY_COUNT = 100
# Counted for visibility, but not bad samples: a kept sample that was adjusted, a dropped member.
NOT_BAD_REASONS = frozenset({"ok", "audio_clipped", "audio_rate_snapped", "image_padded", "ignored_member"})
STATE_FORMAT = 1


class DataQualityError(RuntimeError):
    """Too many broken samples; the message lists the counts by reason."""


def samples_seen(counts: dict) -> int:
    """ok + bad samples (clip and ignored-member counts are not samples)."""
    return counts.get("ok", 0) + sum(v for k, v in counts.items() if k not in NOT_BAD_REASONS)


def check_quality(counts: dict, max_bad_fraction: float, epoch_done: bool, where: str) -> None:
    seen = samples_seen(counts)
    bad = seen - counts.get("ok", 0)
    if seen == 0 or (seen < MIN_QUALITY_COUNT and not epoch_done):
        return
    if bad / seen > max_bad_fraction:
        reasons = ", ".join(f"{k}={v}" for k, v in sorted(counts.items()) if k not in NOT_BAD_REASONS)
        raise DataQualityError(f"{where}: {bad} of {seen} samples bad ({bad / seen:.2%} > max_bad_fraction "
                               f"{max_bad_fraction:.2%}); by reason: {reasons}")


def read_shard_sizes(urls: list[str]) -> dict[str, int]:
    """url -> sample count, from the `shard_samples` of the index.json beside local shards
    (keyed by shard file name); read once per directory. Shards without one are left out."""
    indexes: dict[str, dict] = {}
    sizes = {}
    for url in urls:
        if "://" in url or url.startswith("pipe:"):
            continue
        directory, name = os.path.split(url)
        if directory not in indexes:
            indexes[directory] = _read_index_counts(os.path.join(directory, "index.json"))
        if name in indexes[directory]:
            sizes[url] = indexes[directory][name]
    return sizes


def _read_index_counts(path: str) -> dict[str, int]:
    if not os.path.isfile(path):
        return {}
    try:
        with open(path) as f:
            counts = json.load(f).get("shard_samples") or {}
        return {str(name): int(n) for name, n in counts.items()}
    except (OSError, ValueError, TypeError, AttributeError) as exc:
        log.warning("ignoring unreadable shard index %s: %s", path, exc)
        return {}


def samples_in_slot(start: int, n: int, slot: int, num_slots: int) -> int:
    """How many of the raw sample numbers start .. start+n-1 fall to `slot` (g % num_slots == slot)."""
    return len(range(start + (slot - start) % num_slots, start + n, num_slots))


class ShardStream(IterableDataset):
    """Yields (micro-batch, tag) where tag = {"role", "position", "counts"}: the position
    and cumulative skip counts of this worker role just after the batch."""

    def __init__(self, urls: list[str], encoder: SampleEncoder, collate, *, micro_batch_size: int, rank: int,
                 world_size: int, num_workers: int, seed: int, shuffle: bool, max_bad_fraction: float,
                 epochs: int | None, positions: dict, counts: dict, role_offset: int, shard_sizes: dict,
                 split_samples: bool = False, max_tokens: int = 0, buffer_size: int = 0, with_teacher: bool = True,
                 answer_reserve: int = 0):
        self.urls = urls
        self.shard_sizes = shard_sizes
        self.encoder = encoder
        self.collate = collate
        self.micro_batch_size = micro_batch_size
        self.rank = rank
        self.num_roles = max(1, num_workers)
        self.seed = seed
        self.shuffle = shuffle
        self.max_bad_fraction = max_bad_fraction
        self.epochs = epochs
        self.positions = positions
        self.counts = counts
        self.role_offset = role_offset
        self.num_slots = world_size * self.num_roles
        self.split_samples = split_samples or len(urls) < self.num_slots
        self.pad_id = encoder.processor.pad_id
        self.max_tokens = max_tokens
        self.buffer_size = buffer_size if max_tokens else micro_batch_size
        self.with_teacher = with_teacher
        self.answer_reserve = answer_reserve

    def plan_settings(self) -> dict:
        settings = {"max_tokens": self.max_tokens, "buffer_size": self.buffer_size, "with_teacher": self.with_teacher}
        if self.answer_reserve:  # only when set: checkpoints from before it resume unchanged
            settings["answer_reserve"] = self.answer_reserve
        return settings

    def epoch_shards(self, epoch: int, slot: int, num_slots: int | None = None, split: bool | None = None) -> list[int]:
        """The shard indices `slot` reads in `epoch`, under this run's split or the one given (a resized
        run walks the slots of the run that wrote its checkpoint)."""
        num_slots = self.num_slots if num_slots is None else num_slots
        split = self.split_samples if split is None else split
        order = np.arange(len(self.urls))
        if self.shuffle:
            order = np.random.default_rng([self.seed, epoch]).permutation(len(self.urls))
        if split:
            return order.tolist()
        return order[slot::num_slots].tolist()

    def __iter__(self):
        info = get_worker_info()
        worker_id = info.id if info is not None else 0
        role = (worker_id + self.role_offset) % self.num_roles
        slot = self.rank * self.num_roles + role
        saved = self.positions.get(str(role))
        if saved is not None and "leftover" in saved:
            walk = self._resized_walk(saved, slot, f"rank {self.rank} worker role {role}")
        else:
            walk = self._walk(slot, self.num_slots, self.split_samples, saved, dict(self.counts.get(str(role)) or {}),
                              self.epochs, f"rank {self.rank} worker role {role}")
        for samples, position, counts in walk:
            yield self._emit(samples, role, position, counts)

    def _resized_walk(self, saved: dict, slot: int, where: str):
        """A slot of a run resumed on another number of readers (`resize_state`): first the
        leftover walks it was given -- slots of the run that wrote the checkpoint, each to the end
        of the epoch the resize stops at -- one micro-batch from each in turn, then its own slot
        of this run's split from that epoch on. The position carries every walk's own state."""
        items = [dict(item) for item in saved["leftover"]]
        turn = saved["turn"]
        walks = {}
        while not all(item["done"] for item in items):
            i = next(k % len(items) for k in range(turn, turn + len(items)) if not items[k % len(items)]["done"])
            if i not in walks:
                item = items[i]
                walks[i] = self._walk(item["slot"], item["num_slots"], item["split_samples"], item["state"],
                                      dict(item["counts"]), item["stop_epoch"],
                                      f"{where} (leftover of slot {item['slot']} of {item['num_slots']})")
            index, sharers = items[i].get("share", (0, 1))
            produced = items[i].get("produced", 0)
            try:
                while True:  # a walk shared by several readers: every one walks it, each keeps its turns
                    samples, position, counts = next(walks[i])
                    produced += 1
                    if (produced - 1) % sharers == index:
                        break
            except StopIteration as end:  # its final position and counts (skips after its last batch)
                position, counts = end.value if end.value is not None else (items[i]["state"], items[i]["counts"])
                items[i] = {**items[i], "done": True, "state": position, "counts": counts, "produced": produced}
                continue
            items[i] = {**items[i], "state": position, "counts": counts, "produced": produced}
            turn = i + 1
            yield samples, {**saved, "leftover": list(items), "turn": turn}, self._total_counts(items, saved)
        own = self._walk(slot, self.num_slots, self.split_samples, saved["own"], dict(saved["own_counts"]),
                         self.epochs, where)
        for samples, position, counts in own:
            state = {**saved, "leftover": list(items), "turn": turn, "own": position, "own_counts": counts}
            yield samples, state, self._total_counts(items, state)

    @staticmethod
    def _total_counts(items: list, state: dict) -> dict:
        """This slot's counts: its own walk's and its leftover walks' (a shared walk's by its first
        reader only: every reader of it counts all its samples)."""
        total = dict(state["own_counts"])
        for item in items:
            if item.get("share", (0, 1))[0]:
                continue
            for reason, n in item["counts"].items():
                total[reason] = total.get(reason, 0) + n
        return total

    def _walk(self, slot: int, num_slots: int, split: bool, saved: dict | None, counts: dict, stop_epoch: int | None,
              where: str):
        """Slot `slot` of a split into `num_slots` readers, from `saved` (its position after the last
        micro-batch handed out; None = the start) until `stop_epoch` (None = forever): yields
        (samples of one micro-batch, the position after it, the cumulative counts)."""
        saved = saved or {"epoch": 0, "shard_pos": 0, "cursor": 0, "base": 0}
        skip, fingerprint = 0, None  # the first buffer's micro-batches handed out before a resume, and its samples
        if "buffer_start" in saved:
            if saved["plan"] != self.plan_settings():
                raise ValueError(
                    f"cannot resume the data stream exactly: {where} stopped inside a buffer planned with "
                    f"{saved['plan']}, this run plans {self.plan_settings()} (--max_tokens_per_micro_batch, "
                    "--token_budget_buffer and whether teacher tokens count must match the checkpoint's)")
            position, counts = dict(saved["buffer_start"]["position"]), dict(saved["buffer_start"]["counts"])
            skip, fingerprint = saved["emitted"], saved["fingerprint"]
        else:
            position = dict(saved)
        position.setdefault("epoch_seen", 0)
        position.setdefault("whole", [0, 0])  # shards this slot read without error, and their samples
        pending = []
        buffer_start = shard_entry = None  # token budget: where the buffer / the current shard starts

        def count(reason, n=1):
            counts[reason] = counts.get(reason, 0) + n

        def samples_lost(url, read):
            expected = self.shard_sizes.get(url)
            whole_shards, whole_samples = position["whole"]
            if expected is None:
                expected = max(1, math.ceil(whole_samples / whole_shards)) if whole_shards else 1
            return max(1, expected - read)

        while stop_epoch is None or position["epoch"] < stop_epoch:
            epoch = position["epoch"]
            shards = self.epoch_shards(epoch, slot, num_slots, split)
            seen_before = samples_seen(counts) - position["epoch_seen"]  # samples_seen at the epoch's start
            while position["shard_pos"] < len(shards):
                shard_pos = position["shard_pos"]
                shard_index = shards[shard_pos]
                url = self.urls[shard_index]
                if self.max_tokens and not pending and position["cursor"] == 0:
                    # A buffer that starts with this shard starts before its shard-level counts
                    # (lost samples, ignored members), which a resume there counts again.
                    shard_entry = self._snapshot(position, counts, seen_before)
                raw_samples, ignored, error = read_shard(url)
                if error is None:
                    if position["cursor"] == 0:  # counted once per shard, also across a resume inside it
                        position["whole"] = [position["whole"][0] + 1, position["whole"][1] + len(raw_samples)]
                # In sample-split mode every slot reads the shard; one slot owns its warnings.
                owns_shard = not split or shard_pos % num_slots == slot
                if error is not None and position["cursor"] == 0:
                    lost = samples_lost(url, len(raw_samples))
                    if owns_shard:
                        log.warning("%s: skipping %s, counted as %d lost samples: %s", where, error.reason, lost,
                                    error)
                    if split:  # the lost samples would have followed the ones read
                        lost = samples_in_slot(position["base"] + len(raw_samples), lost, slot, num_slots)
                    if lost:
                        count(error.reason, lost)
                        check_quality(counts, self.max_bad_fraction, False, where)
                if owns_shard and position["cursor"] == 0:
                    if ignored:
                        log.warning("shard %s: ignored members with extensions not on the allow-list: %s", url,
                                    ignored)
                        count("ignored_member", sum(ignored.values()))
                order = np.arange(len(raw_samples))
                if self.shuffle:
                    order = np.random.default_rng([self.seed, epoch, shard_index]).permutation(len(raw_samples))
                for j in range(position["cursor"], len(raw_samples)):
                    if self.max_tokens and not pending:
                        buffer_start = shard_entry if j == 0 else self._snapshot(position, counts, seen_before)
                    position["cursor"] = j + 1
                    if split and (position["base"] + j) % num_slots != slot:
                        continue
                    raw = raw_samples[order[j]]
                    try:
                        sample, notes = self.encoder(raw)
                    except SampleError as exc:
                        log.warning("skipping sample: shard %s key %s field %s: %s: %s", url, raw["__key__"],
                                    exc.field, exc.reason, exc.detail)
                        count(exc.reason)
                        check_quality(counts, self.max_bad_fraction, False, where)
                        continue
                    count("ok")
                    for note in sorted(notes):
                        count(note)
                    pending.append(sample)
                    if len(pending) == self.buffer_size:
                        position["epoch_seen"] = samples_seen(counts) - seen_before
                        yield from self._hand_out(pending, slot, position, counts, buffer_start, skip, fingerprint,
                                                  where)
                        pending, skip = [], 0
                position.update(shard_pos=shard_pos + 1, cursor=0, base=position["base"] + len(raw_samples),
                                epoch_seen=samples_seen(counts) - seen_before)
            check_quality(counts, self.max_bad_fraction, True, where)
            if samples_seen(counts) == seen_before and stop_epoch is None:
                raise ValueError(f"{where}: epoch {epoch} produced no samples (shards: {len(self.urls)}, "
                                 f"slots: {num_slots}); the data set is smaller than the number of readers")
            position.update(epoch=epoch + 1, shard_pos=0, cursor=0, base=0, epoch_seen=0)
        if pending:
            yield from self._hand_out(pending, slot, position, counts, buffer_start, skip, fingerprint, where)
        return dict(position), dict(counts)

    @staticmethod
    def _snapshot(position: dict, counts: dict, seen_before: int) -> dict:
        """Where a buffer starts: the position and counts a resumed slot restarts it from."""
        return {"position": {**position, "epoch_seen": samples_seen(counts) - seen_before}, "counts": dict(counts)}

    def _hand_out(self, pending, slot, position, counts, buffer_start, skip, expected, where=""):
        """The buffer's micro-batches: one batch of them all, or the token budget's plan. A resumed
        buffer (skip > 0) must hold the samples, with the lengths, of the one planned before."""
        if not self.max_tokens:
            yield list(pending), dict(position), dict(counts)
            return
        lengths = [sample_lengths(s, self.with_teacher, self.answer_reserve) for s in pending]
        fingerprint = zlib.crc32(json.dumps([[s["key"], *n] for s, n in zip(pending, lengths)]).encode())
        if skip and fingerprint != expected:
            raise ValueError(
                f"cannot resume the data stream exactly: the buffer {where} stopped inside now holds other "
                "samples or lengths (shards, --max_seq_len, the model's image or audio processing or the stage "
                "changed since the checkpoint; or, after a resume on another number of readers, the buffer runs "
                "past the epoch where the new split takes over: a reader's share of two epochs is smaller than "
                f"--token_budget_buffer {self.buffer_size}), so the micro-batches already trained cannot be told "
                "apart")
        start = buffer_start["position"]
        rng = np.random.default_rng([self.seed, slot, start["epoch"], start["shard_pos"], start["cursor"]])
        groups = plan_micro_batches(lengths, self.max_tokens, rng)
        for k, group in enumerate(groups):
            if k < skip:
                continue
            inside = {"buffer_start": buffer_start, "emitted": k + 1, "plan": self.plan_settings(),
                      "fingerprint": fingerprint}
            yield ([pending[i] for i in group], dict(position) if k + 1 == len(groups) else inside, dict(counts))

    def _emit(self, samples, role, position, counts):
        batch = self.collate(samples, self.pad_id)
        return batch, {"role": role, "position": dict(position), "counts": dict(counts)}


def _keep_as_is(item):
    return item


class WorkerSignals:
    """worker_init_fn that keeps data workers alive through the job's stop signals.

    SLURM signals every process of a job step, data workers included; a worker killed by
    SIGTERM would crash its rank before the rank could finish its step and save. So workers
    ignore SIGUSR1 and defer SIGTERM: it ends a worker only once its rank has let the
    workers go (`release`, set at the rank's exit, when the DataLoader's own shutdown and
    multiprocessing's at-exit clean-up terminate leftover workers) or has died.
    """

    def __init__(self):
        self.release = multiprocessing.get_context("fork").Event()
        atexit.register(self.release.set)  # runs before multiprocessing's own at-exit clean-up (LIFO)

    def __call__(self, _worker_id: int) -> None:
        release, parent = self.release, os.getppid()

        def on_sigterm(signum, frame):
            if release.is_set() or os.getppid() != parent:
                os._exit(128 + signum)

        signal.signal(signal.SIGUSR1, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, on_sigterm)


_worker_signals: WorkerSignals | None = None


def worker_signals() -> WorkerSignals:
    """The process's one WorkerSignals (one at-exit hook, however many loaders)."""
    global _worker_signals
    if _worker_signals is None:
        _worker_signals = WorkerSignals()
    return _worker_signals


class StreamingLoader:
    """Iterates micro-batches; `state_dict()` is the JSON-able position after the last
    batch handed out, and a loader built with `state=` continues exactly from there."""

    def __init__(self, urls: list[str], encoder: SampleEncoder, collate, *, micro_batch_size: int, rank: int,
                 world_size: int, num_workers: int, seed: int, shuffle: bool, max_bad_fraction: float,
                 epochs: int | None, state: dict | None, split_samples: bool = False, fresh_each_pass: bool = False,
                 max_tokens: int = 0, buffer_size: int = 0, with_teacher: bool = True, answer_reserve: int = 0):
        if micro_batch_size < 1:
            raise ValueError(f"micro_batch_size must be >= 1, got {micro_batch_size}")
        if max_tokens < 0 or (max_tokens and buffer_size < 1):
            raise ValueError(f"max_tokens must be >= 0 and, when set, buffer_size >= 1; got {max_tokens}, "
                             f"{buffer_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} not in [0, world_size={world_size})")
        self.urls = urls
        self.num_workers = num_workers
        self.max_bad_fraction = max_bad_fraction
        self._identity = {"format": STATE_FORMAT, "rank": rank, "world_size": world_size,
                          "num_workers": num_workers, "seed": seed, "num_shards": len(urls), "shuffle": shuffle}
        self._stream_args = dict(micro_batch_size=micro_batch_size, rank=rank, world_size=world_size,
                                 num_workers=num_workers, seed=seed, shuffle=shuffle,
                                 max_bad_fraction=max_bad_fraction, epochs=epochs, split_samples=split_samples,
                                 shard_sizes=read_shard_sizes(urls), max_tokens=max_tokens, buffer_size=buffer_size,
                                 with_teacher=with_teacher, answer_reserve=answer_reserve)
        self.encoder = encoder
        self.collate = collate
        self._positions: dict = {}
        self._counts: dict = {}
        self._next_role = 0
        self.fresh_each_pass = fresh_each_pass
        if state is not None:
            self.load_state_dict(state)

    def __iter__(self):
        if self.fresh_each_pass:
            self._positions, self._counts, self._next_role = {}, {}, 0
        stream = ShardStream(self.urls, self.encoder, self.collate, positions=dict(self._positions),
                             counts=dict(self._counts), role_offset=self._next_role, **self._stream_args)
        if self.num_workers == 0:
            source = iter(stream)
        else:
            # Pinned batches reach the GPU with non-blocking copies (Batch.pin_memory).
            source = iter(DataLoader(stream, batch_size=None, num_workers=self.num_workers, collate_fn=_keep_as_is,
                                     worker_init_fn=worker_signals(), pin_memory=torch.cuda.is_available()))
        num_roles = max(1, self.num_workers)
        for batch, tag in source:
            role = str(tag["role"])
            self._positions[role] = tag["position"]
            self._counts[role] = tag["counts"]
            self._next_role = (tag["role"] + 1) % num_roles
            check_quality(self.skip_counts(include_ok=True), self.max_bad_fraction, False,
                          f"rank {self._identity['rank']}")
            yield batch

    def skip_counts(self, include_ok: bool = False) -> dict:
        """reason -> count summed over workers (plus "ok" when include_ok)."""
        total: dict = {}
        for worker_counts in self._counts.values():
            for reason, n in worker_counts.items():
                if include_ok or reason != "ok":
                    total[reason] = total.get(reason, 0) + n
        return total

    def state_dict(self) -> dict:
        return {**self._identity, "next_role": self._next_role, "positions": dict(self._positions),
                "counts": dict(self._counts)}

    def load_state_dict(self, state: dict) -> None:
        mismatched = {k: (state.get(k), v) for k, v in self._identity.items() if state.get(k) != v}
        if mismatched:
            raise ValueError("cannot resume the data stream exactly: saved vs current settings differ: "
                             + ", ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in mismatched.items()))
        self._positions = {str(k): dict(v) for k, v in state["positions"].items()}
        self._counts = {str(k): dict(v) for k, v in state["counts"].items()}
        self._next_role = int(state["next_role"])


def resize_state(saved: list[dict], *, rank: int, world_size: int, num_workers: int) -> dict:
    """This rank's loader state for a run resumed on another number of ranks or workers, from
    every saved rank's `StreamingLoader.state_dict()` (saved[r] is rank r's).

    Exact after a resize means the same samples, not the same order or micro-batches: every
    saved reader slot's share of the data up to the end of epoch E (its position's epoch + 1, +2
    when a slot stopped inside a length buffer, so the buffer can be replayed whole; the
    largest over slots) is read exactly once, by walking that slot of the saved split from its
    saved position (a slot of an earlier resize keeps its own unfinished walks). With fewer new
    slots than walks, walk i goes to slot i % new slots; with more, walk i is shared by slots i,
    i + walks, ...: each of its k readers walks it whole (decoding it all) and keeps every k-th
    micro-batch. A new slot hands out one micro-batch from each of its walks in turn, then reads
    its own slot of the new split from epoch E on. With no data workers and a world size
    divided or multiplied by the saved one, the steps after the resize see the saved run's
    micro-batches until epoch E."""
    first = saved[0]
    for r, state in enumerate(saved):
        if state.get("format") != STATE_FORMAT or state.get("rank") != r:
            raise ValueError(f"saved data state {r} is not rank {r}'s (format {state.get('format')}, "
                             f"rank {state.get('rank')})")
        for key in ("seed", "num_shards", "shuffle", "world_size", "num_workers"):
            if state.get(key) != first.get(key):
                raise ValueError(f"saved data states disagree on {key}: rank 0 has {first.get(key)!r}, rank {r} "
                                 f"has {state.get(key)!r}")
    if first["world_size"] != len(saved):
        raise ValueError(f"the data state was written by {first['world_size']} ranks but {len(saved)} were given")
    old_roles = max(1, first["num_workers"])
    old_slots = first["world_size"] * old_roles
    old_split = first.get("split_samples", first["num_shards"] < old_slots)
    walks, inherited, epochs, buffered = [], [], [], False
    for slot in range(old_slots):
        state = saved[slot // old_roles]
        role = str(slot % old_roles)
        position = state["positions"].get(role)
        counts = dict(state["counts"].get(role) or {})
        if position is not None and "leftover" in position:
            inherited.extend(item for item in position["leftover"] if not item["done"])
            counts = dict(position["own_counts"])
            for item in position["leftover"]:  # a finished walk's counts stay with the slot's own walk
                if item["done"] and not item.get("share", (0, 1))[0]:
                    for reason, n in item["counts"].items():
                        counts[reason] = counts.get(reason, 0) + n
            position = position["own"]
        position = position or {"epoch": 0, "shard_pos": 0, "cursor": 0, "base": 0}
        if "buffer_start" in position:
            buffered = True
            epochs.append(position["buffer_start"]["position"]["epoch"])
        else:
            epochs.append(position["epoch"])
        walks.append({"slot": slot, "num_slots": old_slots, "split_samples": old_split, "state": position,
                      "counts": counts, "done": False})
    stop = max(epochs) + (2 if buffered else 1)
    new_roles = max(1, num_workers)
    new_slots = world_size * new_roles
    dealt = [[item for i, item in enumerate(inherited) if i % new_slots == slot] for slot in range(new_slots)]
    for i, walk in enumerate(walks):
        if new_slots <= len(walks):
            dealt[i % new_slots].append({**walk, "stop_epoch": stop})
            continue
        sharers = range(i, new_slots, len(walks))  # more new readers than walks: each walk shared
        for k, slot in enumerate(sharers):
            dealt[slot].append({**walk, "stop_epoch": stop, "share": [k, len(sharers)], "produced": 0})
    positions, counts = {}, {}
    for role in range(new_roles):
        slot = rank * new_roles + role
        mine = dealt[slot]
        positions[str(role)] = {"leftover": mine, "turn": 0,
                                "own": {"epoch": stop, "shard_pos": 0, "cursor": 0, "base": 0}, "own_counts": {}}
        counts[str(role)] = ShardStream._total_counts(mine, positions[str(role)])
    return {"format": STATE_FORMAT, "rank": rank, "world_size": world_size, "num_workers": num_workers,
            "seed": first["seed"], "num_shards": first["num_shards"], "shuffle": first["shuffle"],
            "next_role": first["next_role"] % new_roles, "positions": positions, "counts": counts}


def build_train_loader(spec: str | list[str], processor, *, stage: Stage | str, micro_batch_size: int, max_seq_len: int,
                       rank: int, world_size: int, num_workers: int, seed: int, shuffle: bool = True,
                       max_bad_fraction: float = 0.01, state: dict | None = None,
                       epochs: int | None = None, max_tokens: int = 0, buffer_size: int = 0,
                       with_teacher: bool = True, answer_reserve: int = 0) -> StreamingLoader:
    """Training Batches (trainer/data/batch.py) from shards, forever (epochs=None) or for
    `epochs` passes. stage: one of TRAINING_STAGES (trainer/data/batch.py). max_tokens > 0:
    micro-batches by token budget from buffers of buffer_size samples (micro_batch_size is
    then unused; with_teacher: teacher tokens count towards the budget; answer_reserve: an answer
    counts as at least this many tokens, room for on-policy answers the student generates)."""
    if Stage(stage).value not in TRAINING_STAGES:
        raise ValueError(f"stage must be one of {TRAINING_STAGES}, got {stage!r}")
    return StreamingLoader(expand_shard_spec(spec), SampleEncoder(processor, stage, max_seq_len), collate_train,
                           micro_batch_size=micro_batch_size, rank=rank, world_size=world_size,
                           num_workers=num_workers, seed=seed, shuffle=shuffle, max_bad_fraction=max_bad_fraction,
                           epochs=epochs, state=state, max_tokens=max_tokens, buffer_size=buffer_size,
                           with_teacher=with_teacher, answer_reserve=answer_reserve)


def build_eval_loader(spec: str | list[str], processor, *, micro_batch_size: int, max_seq_len: int, rank: int,
                      world_size: int, max_bad_fraction: float = 0.01, transcribe: bool = False) -> StreamingLoader:
    """One ordered pass per iteration (re-iterable): prompt-only, left-padded batches; raw
    sample g goes to rank g % world_size, so each sample is seen once and ranks differ by at
    most one sample (so their batch counts may differ by one). `transcribe`: the transcription
    test (Stage.TRANSCRIBE) instead of the questions."""
    stage = Stage.TRANSCRIBE if transcribe else Stage.EVAL
    return StreamingLoader(expand_shard_spec(spec), SampleEncoder(processor, stage, max_seq_len), collate_eval,
                           micro_batch_size=micro_batch_size, rank=rank, world_size=world_size, num_workers=0,
                           seed=0, shuffle=False, max_bad_fraction=max_bad_fraction, epochs=1, state=None,
                           split_samples=True, fresh_each_pass=True)
