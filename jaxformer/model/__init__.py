"""The model library: three Transformer families from one set of Flax NNX blocks.

  model = build_model(config.model, rngs=nnx.Rngs(params=0, dropout=1))
  logits = model(tokens)                          # encoder_only / decoder_only, float32 [B, T, V]
  logits = model(src_tokens, tgt_tokens)          # encoder_decoder (teacher forcing)
  cache = model.init_cache(batch, max_len, src_tokens=src)   # decoder_only / encoder_decoder
  logits, cache = model.decode_step(tokens, cache)            # pure: prefill [B, T], then [B, 1]

Files, bottom up: layers.py (params with logical axis names, norms, MLPs, embeddings), positions.py
(sinusoidal / learned / rope), attention.py (kernels + Attention), transformer.py (Block, Stack, the three models),
config.py (ModelConfig, validation against the registries above, build_model).
"""
from jaxformer.model.attention import Attention, dot_product_attention, reference_attention
from jaxformer.model.config import ModelConfig, build_model, validate_model
from jaxformer.model.transformer import (ARCHS, Block, DecoderOnly, EncoderDecoder, EncoderOnly, Stack,
                                         attention_mask, count_params)

__all__ = ['ARCHS', 'Attention', 'Block', 'DecoderOnly', 'EncoderDecoder', 'EncoderOnly', 'ModelConfig', 'Stack',
           'attention_mask', 'build_model', 'count_params', 'dot_product_attention', 'reference_attention',
           'validate_model']
