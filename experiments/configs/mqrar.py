"""MQRAR: stick-breaking vs softmax+RoPE vs softmax without positions (NoPE).

Trains 2-layer decoder LMs on multi-query repeated associative recall and scores recall of the
most recent assignment on held-out sequences at the trained length and longer ones. Command lines
(from the repository root):

  # The default: 3 runs on a 2-core CPU in about 2 minutes.
  python experiments/mqrar.py --config=experiments/configs/mqrar.py --workdir=/tmp/mqrar
  # The Zoology-style sweep on one H100/H200 (3 attentions x 3 widths x 4 key counts x 4 learning
  # rates x 3 seeds = 432 runs in 9 vmapped groups; resumable: rerun the same line):
  python experiments/mqrar.py --config=experiments/configs/mqrar.py:sweep --workdir=/tmp/mqrar_sweep

Fields can be overridden, e.g. ``--config.num_steps=200 "--config.attentions=('stickbreaking',)"``.
Fields typed as tuples are sweep axes: the runs are the product of attentions, seeds, d_model,
num_heads, seq_len, num_keys and learning_rates. With ``vmap=False`` (the default) the runs train
one after another through ``sbjax.training`` (TensorBoard, per-run checkpoints); with
``vmap=True`` every (num_keys, learning rate, seed) run of one (attention, d_model, num_heads,
seq_len) trains at once, vmapped, on batches drawn on the device (``mqrar_sweep_lib``). Either way
a run is identified by its whole config (all fields but the display ones): rerunning on a workdir
reuses the finished runs (groups) of the same config and trains the others. Each (attention,
width, keys) cell is reported at its best learning rate (by mean accuracy over seeds at the
trained length).
"""

import ml_collections

VARIANTS = ("cpu", "sweep")


def get_config(variant: str = "cpu") -> ml_collections.ConfigDict:
  """The config called ``variant``: ``"cpu"`` (default) or ``"sweep"`` (one H100/H200)."""
  if variant not in VARIANTS:
    raise ValueError(f"variant must be one of {VARIANTS}, got {variant=}.")
  config = ml_collections.ConfigDict()
  # Sweep axes (tuples): one run per combination.
  config.attentions = ("stickbreaking", "softmax_rope", "softmax_nope")  # sbjax.nn.ATTENTIONS
  config.seeds = (0,)  # model init and training data of a run
  config.d_model = (64,)  # model width D
  config.num_heads = (2,)  # attention heads N (head_dim H = D / N)
  config.seq_len = (32,)  # training length T (T / 2 key-value pairs)
  config.num_keys = (4,)  # distinct keys per sequence: fewer keys, more stale values per key
  config.learning_rates = (3e-3,)  # peak of warmup + cosine AdamW
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
  # None: cuDNN on a GPU, which needs dtype bfloat16 (a FieldReference so None can be overridden).
  config.softmax_implementation = ml_collections.FieldReference("xla", field_type=str)
  config.dtype = "float32"  # compute dtype (parameters stay fp32); "bfloat16": mixed precision
  # Training (sbjax.training.TrainConfig).
  config.batch_size = 32  # sequences per step of each run
  config.num_steps = 800
  config.warmup_steps = 80
  config.weight_decay = 0.1
  config.log_every = 20  # steps between logged metrics (with vmap: steps per compiled chunk)
  config.checkpoint_every = 400  # steps between checkpoints (the last step is always saved)
  config.progress_bar = True
  # The vmapped sweep (mqrar_sweep_lib) and its mechanism analysis; vmap=False ignores these.
  config.vmap = False  # train the runs of each (attention, d_model, num_heads, seq_len) at once
  config.analysis_batch = 16  # held-out sequences at the trained length for the recency share
  config.compile_ahead = True  # compile the next groups in a background thread (display only)
  config.keep_final_checkpoint = False  # keep a finished group's checkpoint (display only)
  config.map_d_model = 64  # the width and number of keys whose attention maps are plotted
  config.map_num_keys = 4
  config.map_len = 32  # positions of the maps (the first map_len tokens of one sequence)

  if variant == "sweep":
    config.seeds = (0, 1, 2)
    config.d_model = (64, 128, 256)
    config.seq_len = (256,)
    config.num_keys = (8, 16, 32, 64)
    # The first sweep's best rate was its grid's top (3e-3) in 21 of 24 cells and 1e-4 never won.
    config.learning_rates = (3e-4, 1e-3, 3e-3, 1e-2)
    config.vocab_size = 256
    config.eval_seq_lens = (256, 512, 1024)
    config.implementation = ml_collections.FieldReference(None, field_type=str)  # Pallas
    # Mixed precision for every arm (Pallas bf16 kernels, cuDNN softmax): fp32 ran the Pallas
    # kernels on the CUDA cores, ~0.7 s per step for the 48 runs of width 256.
    config.softmax_implementation = ml_collections.FieldReference(None, field_type=str)
    config.dtype = "bfloat16"
    config.batch_size = 32
    config.num_steps = 4000  # 2000 left the first sweep's curves unconverged
    config.warmup_steps = 400
    config.log_every = 50
    config.checkpoint_every = 500
    config.eval_batches = 4
    config.vmap = True
    config.analysis_batch = 32
    config.map_d_model = 128
    config.map_num_keys = 8
    config.map_len = 64
  return config
