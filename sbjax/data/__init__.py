"""Data for the experiments: synthetic MQRAR batches, and real text (corpus, tokenizer, windows)."""

from sbjax.data.corpus import extract_corpus, load_split, read_documents
from sbjax.data.mqrar import Batch, batches, make_batch, recall_targets
from sbjax.data.text import (EvalWindows, TokenizedCorpus, TrainWindows, eval_windows,
                             tokenize_documents)
from sbjax.data.tokenizer import EOT, Tokenizer, train_tokenizer

__all__ = [
    "EOT", "Batch", "EvalWindows", "TokenizedCorpus", "Tokenizer", "TrainWindows", "batches",
    "eval_windows", "extract_corpus", "load_split", "make_batch", "read_documents",
    "recall_targets", "tokenize_documents", "train_tokenizer",
]
