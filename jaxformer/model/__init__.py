"""The model library: three Transformer families from one set of Flax NNX blocks."""
from jaxformer.model.attention import Attention, dot_product_attention, reference_attention
from jaxformer.model.transformer import (ARCHS, Block, DecoderOnly, EncoderDecoder, EncoderOnly, Stack,
                                         attention_mask, build_model, count_params)

__all__ = ['ARCHS', 'Attention', 'Block', 'DecoderOnly', 'EncoderDecoder', 'EncoderOnly', 'Stack',
           'attention_mask', 'build_model', 'count_params', 'dot_product_attention', 'reference_attention']
