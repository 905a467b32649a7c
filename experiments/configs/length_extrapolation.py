"""Length extrapolation on ELTeC-eng: train at T, score every position of windows of 16 T.

Trains a decoder LM per attention (stick-breaking, softmax+RoPE, softmax without positions) with
identical hyperparameters and data order, then reports the loss per position bin and the
perplexity of the first l tokens on in-book validation windows (and the test windows once, at
the end), with bootstrap intervals over books. Command lines (from the repository root):

  # The default: tiny models on 6 train books, T=64 -> L=1024, a few minutes on a 2-core CPU.
  python experiments/length_extrapolation.py --config=experiments/configs/length_extrapolation.py \
      --workdir=/tmp/length_extrapolation
  # One GPU (H100/H200): ~100M-parameter models at T=2048, scored to L=32768.
  python experiments/length_extrapolation.py \
      --config=experiments/configs/length_extrapolation.py:h200 --workdir=workdir_le
  # Score a workdir's trained runs on your own .txt files (one document per file), no training:
  python experiments/length_extrapolation.py \
      --config=experiments/configs/length_extrapolation.py:h200 --workdir=workdir_le \
      --config.eval_text_dir=/path/to/texts

The corpus is read from ../shared/data/eltec-eng/ (``--config.corpus_archive=...``; split.json
is taken from beside it unless ``--config.split_json`` is set) and cached in ``data_dir``.
"""

import ml_collections

VARIANTS = ("cpu", "h200")


def get_config(variant: str = "cpu") -> ml_collections.ConfigDict:
  """The config called ``variant``: ``"cpu"`` (default) or ``"h200"`` (one H100/H200 GPU)."""
  if variant not in VARIANTS:
    raise ValueError(f"variant must be one of {VARIANTS}, got {variant=}.")
  c = ml_collections.ConfigDict()
  # Data.
  c.corpus_archive = "../shared/data/eltec-eng/eltec-eng-txt.tar.xz"  # sha256-checked
  # sha256 of the archive (sbjax.data.corpus.ARCHIVE_SHA256); "" skips the check (another archive).
  c.corpus_sha256 = "5b8ca5a4a8899ff05953cb1bffae4fafac610361a13f3667a043157e676b5081"
  c.split_json = ""  # "" = split.json beside the archive
  c.data_dir = "~/.cache/sbjax/eltec-eng"  # unpacked books, tokenizers, token memmaps
  c.max_train_books = 6  # first books of the train split; 0 = all 84
  c.vocab_size = 2048  # byte-level BPE trained on the train books (ids stored as uint16)
  c.use_grain = True  # batches through grain.MapDataset (the same pure function of the step)
  # Runs: one per attention and seed, same data order for every attention.
  c.attentions = ("stickbreaking", "softmax_rope", "softmax_nope")
  c.seeds = (0,)  # model init and training-window order
  # Model: sbjax.models.lm_config(model, **model_overrides).
  c.model = "tiny"
  c.model_overrides = ml_collections.ConfigDict(
      {"num_layers": 2, "d_model": 64, "num_heads": 4, "mlp_dim": 192})
  c.dtype = "float32"  # compute dtype; cuDNN softmax needs "bfloat16"
  # Stick-breaking op: None = Pallas on an NVIDIA GPU, scan elsewhere; the dense "xla" is fastest
  # on a CPU at these lengths.
  c.implementation = ml_collections.FieldReference("xla", field_type=str)
  c.softmax_implementation = ml_collections.FieldReference("xla", field_type=str)  # None: cuDNN on GPU
  # Training.
  c.train_len = 64  # T
  c.batch_size = 16
  c.num_epochs = 0.0  # passes over the train windows (used when num_steps = 0)
  c.num_steps = 300
  c.learning_rate = 3e-3  # peak of warmup + cosine AdamW
  c.warmup_steps = 30
  c.weight_decay = 0.1
  c.grad_clip_norm = 1.0
  c.log_every = 20  # steps between TensorBoard and progress-bar updates
  c.checkpoint_every = 150  # steps between checkpoints (the last step is always saved)
  c.keep_checkpoints = 2
  c.progress_bar = True
  # (data, model[, context]) of the training and scoring mesh (sbjax.parallel.make_mesh; data=-1
  # takes every device left). (1, 1, 2) shards T over 2 GPUs (context parallelism). Not part of a
  # run's identity: a run resumes and is scored on any mesh.
  c.mesh_shape = (-1, 1)
  # Evaluation.
  c.eval_len_multiple = 16  # L = eval_len_multiple * train_len
  c.max_eval_windows_per_book = 2  # first windows of each book; 0 = all
  c.eval_test = True  # also score the test split, once, after every run is validated
  c.eval_batch_size = 4  # windows per eval forward
  c.loss_chunk = 1024  # positions per chunk of the head + loss (L x V logits never at once)
  c.bootstrap_samples = 1000  # resamples of books for the 95% intervals
  c.plot_bins_per_octave = 4
  c.eval_text_dir = ""
  # q/k of a few heads of the trained stick-breaking model on one validation window, saved to
  # qk_stickbreaking.npz for kernel benchmarks on real inputs; () = none.
  c.qk_layers = ()
  c.qk_heads = (0, 1)
  c.qk_window_len = 256  # a directory of .txt files: score the trained runs on it instead

  if variant == "h200":
    c.max_train_books = 0
    c.vocab_size = 16384
    c.model = "125m"
    c.model_overrides = ml_collections.ConfigDict()  # 12 x 768, 12 heads, ~98M params at V=16K
    c.dtype = "bfloat16"
    c.implementation = None  # Pallas
    c.softmax_implementation = None  # cuDNN
    c.train_len = 2048
    c.batch_size = 16  # 32K tokens per step
    c.num_epochs = 3.0  # the issue asks ~4; 3 fit this session's device time (H100: ~8 min for 3 arms)
    c.num_steps = 0
    c.learning_rate = 6e-4
    c.warmup_steps = 100
    c.log_every = 25
    c.checkpoint_every = 200
    c.max_eval_windows_per_book = 0
    c.eval_batch_size = 1
    c.loss_chunk = 4096
    c.qk_layers = (0, 5, 11)
    c.qk_heads = (0, 6)
    c.qk_window_len = 4096
  return c
