"""Input pipelines: sources (TFDS / local files / built-in synthetic data), tokenizers, packing, batching.

Public API (see the contracts): get_tokenizer, make_train_iterator, make_eval_iterator, load_text_pairs, plus
encode_source (the encoder input exactly as the pipeline builds it, for decoding) and builtin_lm_entropy (the best
achievable loss on builtin:lm). Errors are DataError (a ValueError; DataFileNotFoundError is also a
FileNotFoundError), one line naming the file or config key.

On disk, in the workdir:
  <workdir>/tokenizer/tokenizer.json     kind, vocab_size, the source it was built from
  <workdir>/tokenizer/chars.json         char vocabulary (ids 5..), or
  <workdir>/tokenizer/spm.model          sentencepiece model (ids 0-4 = pad, bos, eos, unk, <mask>)
  <data_dir>/jaxformer_text_<hash>/1.0.0/        text: sources converted to TFDS ArrayRecord (one per file set)
  <data_dir>/jaxformer_parallel_<hash>/1.0.0/    parallel: sources, features {src_lang, tgt_lang}
  <data_dir>/<name>/empty_splits.json            splits that were empty at conversion
where <data_dir> is data.data_dir, or <workdir>/data when that is ''. tfds: sources are read from data_dir too.
"""
from jaxformer.data.pipeline import EvalIterator
from jaxformer.data.pipeline import encode_source
from jaxformer.data.pipeline import load_text_pairs
from jaxformer.data.pipeline import make_eval_iterator
from jaxformer.data.pipeline import make_train_iterator
from jaxformer.data.pipeline import mask_tokens
from jaxformer.data.pipeline import state_for_host
from jaxformer.data.pipeline import TrainIterator
from jaxformer.data.sources import builtin_lm_entropy
from jaxformer.data.sources import data_dir_for
from jaxformer.data.sources import DataError
from jaxformer.data.sources import DataFileNotFoundError
from jaxformer.data.sources import get_source
from jaxformer.data.sources import number_to_words
from jaxformer.data.sources import Source
from jaxformer.data.sources import SOURCES
from jaxformer.data.tokenizers import ByteTokenizer
from jaxformer.data.tokenizers import CharTokenizer
from jaxformer.data.tokenizers import get_tokenizer
from jaxformer.data.tokenizers import load_tokenizer
from jaxformer.data.tokenizers import SentencePieceTokenizer
from jaxformer.data.tokenizers import Tokenizer
from jaxformer.data.tokenizers import tokenizer_dir
from jaxformer.data.tokenizers import TOKENIZERS
