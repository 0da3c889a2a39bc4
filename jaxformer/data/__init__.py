"""Input pipelines: sources (TFDS / local files / built-in synthetic data), tokenizers, packing, batching.

Public API (see the contracts): get_tokenizer, make_train_iterator, make_eval_iterator, load_text_pairs.
"""
from jaxformer.data.pipeline import EvalIterator
from jaxformer.data.pipeline import encode_source
from jaxformer.data.pipeline import load_text_pairs
from jaxformer.data.pipeline import make_eval_iterator
from jaxformer.data.pipeline import make_train_iterator
from jaxformer.data.pipeline import mask_tokens
from jaxformer.data.pipeline import TrainIterator
from jaxformer.data.sources import builtin_lm_entropy
from jaxformer.data.sources import data_dir_for
from jaxformer.data.sources import DataError
from jaxformer.data.sources import DataFileNotFoundError
from jaxformer.data.sources import get_source
from jaxformer.data.sources import number_to_words
from jaxformer.data.sources import Source
from jaxformer.data.tokenizers import ByteTokenizer
from jaxformer.data.tokenizers import CharTokenizer
from jaxformer.data.tokenizers import get_tokenizer
from jaxformer.data.tokenizers import load_tokenizer
from jaxformer.data.tokenizers import SentencePieceTokenizer
from jaxformer.data.tokenizers import Tokenizer
from jaxformer.data.tokenizers import tokenizer_dir
