"""A decoder-only LM built from ``sbjax.nn``.

Public API (stable):

    LMConfig(vocab_size, num_layers, d_model, num_heads, num_kv_heads=None, head_dim=None,
             mlp_dim, attention="stickbreaking"|"softmax_rope"|"softmax_nope", tie_embeddings=True,
             attend_current=False, remainder="none", head_norm=False, forget_gate=False,
             forget_gate_loss_weight=0.0, rope_base=10000.0, implementation=None,
             block_sizes=None, softmax_implementation=None, norm_eps=1e-6, dtype="float32",
             param_dtype="float32", remat=False)      # frozen dataclass; .replace(**changes)
    lm_config(name, **overrides) -> LMConfig          # name: "tiny" | "125m" | "350m"
    DecoderLM(config, *, rngs)                        # nnx.Module
    model(tokens [B, T], segment_ids=None, positions=None) -> logits [B, T, V] float32
    model.hidden_states(tokens, ...) -> [B, T, D];  model.logits(hidden) -> [B, T, V]
    count_params(model) -> int
    model.init_cache(batch_size, max_length, dtype=None)          # KV caches for decoding
    model(tokens [B, P], decode=True, prompt_lengths=[B])         # prefill (right-padded prompts)
    model(token [B, 1], decode=True) -> logits [B, 1, V]          # one decode step
    generate(model, prompt_tokens [B, P], max_new_tokens, *, rng, temperature=1.0, top_k=None,
             eos_id=None, prompt_lengths=None) -> (tokens [B, M] int32, log_probs [B, M] float32)

``DecoderLM`` builds anywhere; under ``jax.set_mesh(mesh)`` its parameters are placed by their
annotations, and ``sbjax.training`` places them on its mesh either way.
"""

from sbjax.models.config import PRESETS, LMConfig, lm_config
from sbjax.models.generate import generate
from sbjax.models.lm import DecoderBlock, DecoderLM, SwiGLU, count_params

__all__ = ["PRESETS", "DecoderBlock", "DecoderLM", "LMConfig", "SwiGLU", "count_params", "generate",
           "lm_config"]
