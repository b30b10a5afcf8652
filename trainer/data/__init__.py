"""Streaming WebDataset shards -> typed micro-batches: the Batch and the stages (batch.py),
shard specs and safe reading (shards.py), decoding (decode.py), log-mel features
(features.py), per-sample encoding and collation (collate.py), and the loader with its
split, shuffle, resume and bad-data rules (loader.py)."""

from trainer.data.loader import DataQualityError, StreamingLoader, build_eval_loader, build_train_loader

__all__ = ["DataQualityError", "StreamingLoader", "build_eval_loader", "build_train_loader"]
