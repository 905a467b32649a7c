"""MQRAR on the CPU in a few minutes: stick-breaking vs softmax+RoPE vs softmax without positions.

Trains one 2-layer decoder LM per attention on multi-query repeated associative recall, then
scores recall of the most recent assignment on held-out sequences at the trained length and
longer ones. Command line (from the repository root):

  python experiments/mqrar.py --config=experiments/configs/mqrar.py --workdir=/tmp/mqrar

Any field can be overridden, e.g. ``--config.num_steps=200 --config.attentions=stickbreaking,``.
Every field typed as a tuple is a sweep axis: runs are the product of attentions, seeds,
d_model, num_heads, seq_len and num_keys.
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  # Sweep axes (tuples): one run per combination.
  config.attentions = ("stickbreaking", "softmax_rope", "softmax_nope")  # sbjax.nn.ATTENTIONS
  config.seeds = (0,)  # model init and data stream of a run
  config.d_model = (64,)  # model width D
  config.num_heads = (2,)  # attention heads N (head_dim = D / N)
  config.seq_len = (64,)  # training length T (T / 2 key-value pairs)
  config.num_keys = (8,)  # distinct keys per sequence; more keys = more to remember
  # Task.
  config.vocab_size = 64  # keys are tokens [0, V/2), values [V/2, V)
  config.reassign_prob = 1.0  # chance a reappearing key gets a new value; 1 = always
  config.eval_seq_lens = (64, 128, 256)  # held-out lengths scored after training
  config.eval_batches = 4  # batches of batch_size per eval length
  # Model (sbjax.models.LMConfig).
  config.num_layers = 2
  config.mlp_ratio = 2  # SwiGLU hidden width = mlp_ratio * d_model
  config.implementation = "xla"  # stick-breaking op; None = Pallas on GPU, scan elsewhere
  # Training (sbjax.training.TrainConfig).
  config.batch_size = 32
  config.num_steps = 600
  config.learning_rate = 3e-3
  config.warmup_steps = 60
  config.weight_decay = 0.1
  config.log_every = 20  # steps between TensorBoard / progress-bar updates
  config.checkpoint_every = 200  # steps between checkpoints; 0 = none (the last is always kept)
  config.progress_bar = True
  return config
