"""Streaming WebDataset shards -> typed micro-batches: the Batch and the stages (batch.py),
shard specs and safe reading (shards.py), decoding (decode.py), log-mel features
(features.py), per-sample encoding and collation (collate.py), and the loader with its
split, shuffle, resume and bad-data rules (loader.py).

The loader's names are imported on first use (PEP 562), so that a light submodule such as
shards.py (what a shell script asks to expand a shard spec) does not pull in the processors
and transformers with it."""

__all__ = ["DataQualityError", "StreamingLoader", "build_eval_loader", "build_train_loader"]


def __getattr__(name: str):
    if name in __all__:
        from trainer.data import loader

        return getattr(loader, name)
    raise AttributeError(f"module 'trainer.data' has no attribute {name!r}")
