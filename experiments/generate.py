r"""Text generation with a stick-breaking LM: sample from a length-extrapolation run, or train a
tiny byte-level DecoderLM and sample from it.

With ``--run_dir`` (a finished run of experiments/length_extrapolation.py,
``<workdir>/runs/<name>``: its ``run.json`` gives the model, its checkpoints the weights,
``<workdir>/tokenizer.json`` the BPE tokenizer) the prompts are continued by that model until
``--max_new_tokens`` or the end-of-text token. Otherwise:

Trains ``sbjax.models.lm_config("tiny")`` (bytes as tokens, V=256) for ``--train_steps`` on a
text (``--text_file``, or by default the numbers 0..4999 written out, which a tiny model learns to
continue in a few hundred CPU steps), then samples continuations of ``--prompts`` with
``sbjax.models.generate`` (KV caches, one prefill, one compiled loop of decode steps). With
``--workdir`` the run is checkpointed there and a finished workdir is sampled from without
training again. The prompts are one right-padded batch (``prompt_lengths``); a progress bar
follows training.

  python experiments/generate.py
  python experiments/generate.py --attention=softmax_rope --temperature=0 --max_new_tokens=48
  python experiments/generate.py --workdir=/tmp/sb_tiny --train_steps=600 --prompts="41 42 ,99"
  python experiments/generate.py --run_dir=workdir_le/runs/stickbreaking-seed0-7b34924b2c \
      --prompts="It was a dark and stormy night" --max_new_tokens=200
"""

from __future__ import annotations

from absl import app, flags

from generate_lib import default_text, sample_run, train_and_sample
import logs

_TEXT_FILE = flags.DEFINE_string("text_file", None, "UTF-8 text to train on (default: numbers).")
_ATTENTION = flags.DEFINE_enum("attention", "stickbreaking", ["stickbreaking", "softmax_rope",
                                                              "softmax_nope"], "Attention.")
_TRAIN_STEPS = flags.DEFINE_integer("train_steps", 300, "Optimiser steps.")
_SEQ_LEN = flags.DEFINE_integer("seq_len", 64, "Training window in bytes.")
_BATCH = flags.DEFINE_integer("batch", 16, "Training batch.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Checkpoints (resumed; sampled if finished).")
_RUN_DIR = flags.DEFINE_string("run_dir", None, "A finished length-extrapolation run to sample.")
_TOKENIZER = flags.DEFINE_string("tokenizer", None, "Its tokenizer (default: <run_dir>/../../"
                                 "tokenizer.json, where the experiment writes it).")
_PROMPTS = flags.DEFINE_list("prompts", ["10 11 12 ", "997 998 "], "Prompts, comma-separated.")
_MAX_NEW = flags.DEFINE_integer("max_new_tokens", 32, "Bytes sampled per prompt.")
_TEMPERATURE = flags.DEFINE_float("temperature", 0.7, "Sampling temperature (0: greedy).")
_TOP_K = flags.DEFINE_integer("top_k", None, "Sample among the k most likely bytes.")
_SEED = flags.DEFINE_integer("seed", 0, "Initialisation, data order and sampling seed.")

def main(argv):
  del argv
  logs.install()
  sampling = dict(max_new_tokens=_MAX_NEW.value, temperature=_TEMPERATURE.value,
                  top_k=_TOP_K.value, seed=_SEED.value)
  if _RUN_DIR.value:
    samples = sample_run(_RUN_DIR.value, _PROMPTS.value, tokenizer=_TOKENIZER.value, **sampling)
    unit = "token"
  else:
    text = default_text()
    if _TEXT_FILE.value:
      with open(_TEXT_FILE.value, encoding="utf-8") as f:
        text = f.read()
    samples = train_and_sample(
        text, _PROMPTS.value, attention=_ATTENTION.value, train_steps=_TRAIN_STEPS.value,
        seq_len=_SEQ_LEN.value, batch=_BATCH.value, workdir=_WORKDIR.value, **sampling)
    unit = "byte"
  for prompt, continuation, mean_log_prob in samples:
    print(f"{prompt!r} -> {continuation!r}  (mean log-prob {mean_log_prob:.3f} per {unit})")


if __name__ == "__main__":
  app.run(main)
