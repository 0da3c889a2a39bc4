"""jaxformer: encoder-only, decoder-only and encoder-decoder Transformers from one set of Flax NNX blocks."""
__version__ = '0.1.0'
