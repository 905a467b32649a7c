"""Synthetic data for the experiments."""

from sbjax.data.mqrar import Batch, batches, make_batch, recall_targets

__all__ = ["Batch", "batches", "make_batch", "recall_targets"]
