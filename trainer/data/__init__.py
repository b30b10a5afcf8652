"""Streaming WebDataset shards -> Self-KD / ASR micro-batches (see loader.py for the
split, shuffle, resume and bad-data rules, collate.py for tokenisation)."""

from trainer.data.loader import DataQualityError, StreamingLoader, build_eval_loader, build_train_loader

__all__ = ["DataQualityError", "StreamingLoader", "build_eval_loader", "build_train_loader"]
