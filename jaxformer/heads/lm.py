"""model.head=lm: per-token logits over the vocabulary, scored by cross-entropy against the next token (decoder),
the original token at masked positions (encoder_only) or the shifted target (encoder_decoder)."""
from __future__ import annotations

from typing import Any

from jaxformer import metrics as metrics_lib
from jaxformer.heads.base import Head


class LM(Head):
  name = 'lm'
  decodes = True

  def targets(self, batch, unscored):
    return batch['targets'], unscored

  def length_tables(self, tokenizer, arch):
    return metrics_lib.length_tables(tokenizer, arch)

  def eval_row(self, acc):
    out = acc.result(with_accuracy=True)
    row = {'eval_loss': out['loss'], 'eval_perplexity': out['perplexity'], 'eval_accuracy': out['accuracy'],
           'eval_tokens': float(out['num_tokens'])}
    row.update({f'eval_{key}': out[key] for key in ('bits_per_byte', 'bits_per_char') if key in out})
    return row

  def results(self, acc, arch: str) -> dict[str, Any]:
    out = acc.result(with_accuracy=True)
    out['masked_accuracy' if arch == 'encoder_only' else 'token_accuracy'] = out.pop('accuracy')
    return out

  def output_flops(self, cfg, rows, tokens):
    per_token = 6 * cfg.d_model * cfg.vocab_size
    if cfg.arch == 'encoder_only':
      per_token += 6 * cfg.d_model * cfg.d_model  # the masked-LM head's dense transform
    return float(rows * tokens * per_token)
