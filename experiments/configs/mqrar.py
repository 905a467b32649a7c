"""MQRAR: stick-breaking vs softmax+RoPE vs softmax without positions (NoPE).

Trains a 2-layer decoder LM per attention on multi-query repeated associative recall and scores
recall of the most recent assignment on held-out sequences at the trained length and longer ones.
Command lines (from the repository root):

  # The default: 3 runs on a 2-core CPU in about 2 minutes.
  python experiments/mqrar.py --config=experiments/configs/mqrar.py --workdir=/tmp/mqrar
  # The GPU sweep (3 attentions x 3 seeds x 3 key counts), one process after another:
  python experiments/mqrar.py --config=experiments/configs/mqrar.py:sweep --workdir=/tmp/mqrar_sweep
  # ... or all at once on one GPU, as for experiments/results/mqrar/ (about 7 minutes on an H200):
  experiments/mqrar_sweep.sh /tmp/mqrar_sweep

Fields can be overridden, e.g. ``--config.num_steps=200 "--config.attentions=('stickbreaking',)"``.
Fields typed as tuples are sweep axes: the runs are the product of attentions, seeds, d_model,
num_heads, seq_len and num_keys, in that order. A run is identified by its whole config (all
fields but progress_bar): rerunning on a workdir reuses the finished runs of the same config and
trains the others; runs of another config stay in WORKDIR/runs/ and the log says how they differ.
Redraw a plot from a summary with ``mqrar_lib.replot(directory)``.
"""

import ml_collections

VARIANTS = ("cpu", "sweep")


def get_config(variant: str = "cpu") -> ml_collections.ConfigDict:
  """The config called ``variant``: ``"cpu"`` (default) or ``"sweep"`` (one H200, ~8 min)."""
  if variant not in VARIANTS:
    raise ValueError(f"variant must be one of {VARIANTS}, got {variant=}.")
  config = ml_collections.ConfigDict()
  # Sweep axes (tuples): one run per combination.
  config.attentions = ("stickbreaking", "softmax_rope", "softmax_nope")  # sbjax.nn.ATTENTIONS
  config.seeds = (0,)  # model init and data streams of a run
  config.d_model = (64,)  # model width D
  config.num_heads = (2,)  # attention heads N (head_dim H = D / N)
  config.seq_len = (32,)  # training length T (T / 2 key-value pairs)
  config.num_keys = (4,)  # distinct keys per sequence: more keys, more to remember
  # Task.
  config.vocab_size = 32  # keys are tokens [0, V/2), values [V/2, V)
  config.reassign_prob = 1.0  # chance a reappearing key gets a new value; 1 = every time
  config.eval_seq_lens = (32, 64, 128)  # held-out lengths scored after training
  config.eval_batches = 4  # batches of batch_size per eval length
  # Model (sbjax.models.LMConfig).
  config.num_layers = 2
  config.mlp_ratio = 2  # SwiGLU hidden width F = mlp_ratio * D
  # Stick-breaking op: None = Pallas on an NVIDIA GPU, scan elsewhere; "xla" is fastest at T <= 128.
  config.implementation = ml_collections.FieldReference("xla", field_type=str)
  config.softmax_implementation = "xla"  # cuDNN (None on GPU) needs bf16; the models run in fp32
  # Training (sbjax.training.TrainConfig).
  config.batch_size = 32
  config.num_steps = 800
  config.learning_rate = 3e-3  # peak of warmup + cosine AdamW
  config.warmup_steps = 80
  config.weight_decay = 0.1
  config.log_every = 20  # steps between TensorBoard and progress-bar updates
  config.checkpoint_every = 400  # steps between checkpoints (the last step is always saved)
  config.progress_bar = True

  if variant == "sweep":
    config.seeds = (0, 1, 2)
    config.d_model = (128,)
    config.seq_len = (256,)
    config.num_keys = (16, 32, 64)
    config.vocab_size = 256
    config.eval_seq_lens = (256, 512, 1024)
    config.implementation = ml_collections.FieldReference(None, field_type=str)  # Pallas
    config.batch_size = 64
    config.num_steps = 4000
    config.learning_rate = 2e-3
    config.warmup_steps = 250
    config.log_every = 100
    config.checkpoint_every = 4000
  return config
