"""Exact resume of the data stream for any shard count, rank count and worker count: fewer
shards than readers (sample-split mode), a truncated shard, a lost shard, and a stop at
every batch of the run, epoch boundaries included. The resumed stream must continue the
uninterrupted one batch for batch, with the same skip counts."""

import json
import tarfile

import pytest

from tests.test_data_bad_inputs import audio_bytes, image_bytes, meta, write_tar
from trainer.data import build_train_loader
from trainer.models.tiny import build_tiny_processor


@pytest.fixture(scope="module")
def processor():
    return build_tiny_processor()


def small_sample(key):
    return key, {"jpg": image_bytes(size=(28, 28)), "wav": audio_bytes(seconds=0.2), "json": meta(f"Q {key}?", "A.")}


def make_shards(root, sizes, truncate=None):
    """Shards of the given sample counts; `truncate` = index of a shard cut inside its
    third sample (two samples survive). Returns the shard paths."""
    paths = []
    for i, size in enumerate(sizes):
        path = write_tar(root / f"shard-{i}.tar", [small_sample(f"s{i}_{j}") for j in range(size)])
        if i == truncate:
            data = open(path, "rb").read()
            with tarfile.open(path) as tar:
                cut = tar.getmember(f"s{i}_2.wav")
            open(path, "wb").write(data[: cut.offset_data + cut.size // 2])
        paths.append(str(path))
    return paths


def take(loader, n):
    out = []
    if n == 0:
        return out
    for batch in loader:
        out.append(batch.keys)
        if len(out) == n:
            break
    return out


SHAPES = [
    # sizes, truncated shard, world size, workers, micro-batch
    pytest.param([5, 4, 6], 1, 2, 2, 2, id="3-shards-1-truncated-2x2-readers"),
    pytest.param([4], None, 2, 0, 2, id="1-shard-2-ranks"),
    pytest.param([3, 3, 3], None, 1, 0, 3, id="3-shards-epoch-boundary-every-batch"),
    pytest.param([4, 4, 4, 4, 4], 2, 2, 0, 2, id="5-shards-1-truncated-2-ranks"),
    pytest.param([6, 2], None, 1, 2, 2, id="2-shards-2-workers"),
]


@pytest.mark.parametrize("sizes,truncate,world_size,num_workers,mbs", SHAPES)
def test_resume_at_every_batch_equals_the_uninterrupted_stream(tmp_path, processor, sizes, truncate, world_size,
                                                                num_workers, mbs):
    shards = make_shards(tmp_path, sizes, truncate)
    epoch_samples = sum(sizes) - (sizes[truncate] - 2 if truncate is not None else 0)
    num_batches = max(4, 2 * epoch_samples // (world_size * mbs) + 2)  # more than two epochs per rank
    if num_workers:
        num_batches = min(num_batches, 8)
    for rank in range(world_size):
        args = dict(stage="selfkd", micro_batch_size=mbs, max_seq_len=1024, rank=rank, world_size=world_size,
                    num_workers=num_workers, seed=5, max_bad_fraction=1.0)
        reference_loader = build_train_loader(shards, processor, **args)
        reference = take(reference_loader, num_batches)
        reference_counts = reference_loader.skip_counts(include_ok=True)
        stops = range(1, num_batches) if not num_workers else (1, num_batches // 2, num_batches - 1)
        for stop in stops:
            first = build_train_loader(shards, processor, **args)
            head = take(first, stop)
            state = json.loads(json.dumps(first.state_dict()))  # as it travels through a checkpoint
            resumed = build_train_loader(shards, processor, state=state, **args)
            tail = take(resumed, num_batches - stop)
            assert head + tail == reference, f"rank {rank}: resumed after batch {stop} differs"
            assert resumed.skip_counts(include_ok=True) == reference_counts, f"rank {rank}, stop {stop}: counts"


def test_a_checkpoint_at_the_end_of_an_epoch_resumes(tmp_path, processor):
    """The state saved right after the epoch's last batch points at the end of the epoch's
    last shard: the resumed stream must open the next epoch, not call the data set empty."""
    shards = make_shards(tmp_path, [2, 2])
    args = dict(stage="selfkd", micro_batch_size=2, max_seq_len=1024, rank=0, world_size=1, num_workers=0, seed=1)
    first = build_train_loader(shards, processor, **args)
    take(first, 2)  # exactly one epoch
    position = first.state_dict()["positions"]["0"]
    assert (position["epoch"], position["shard_pos"], position["cursor"]) == (0, 1, 2)
    resumed = build_train_loader(shards, processor, state=first.state_dict(), **args)
    assert len(take(resumed, 3)) == 3


def test_an_empty_epoch_is_still_an_error(tmp_path, processor):
    shards = make_shards(tmp_path, [1])
    loader = build_train_loader(shards, processor, stage="selfkd", micro_batch_size=1, max_seq_len=1024, rank=1,
                                world_size=2, num_workers=0, seed=0)
    with pytest.raises(ValueError, match="produced no samples"):
        take(loader, 1)
