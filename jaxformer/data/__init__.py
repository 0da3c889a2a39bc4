"""Input pipelines: sources, tokenizers, row building (packing, windows, MLM masking, seq2seq pairs), iterators.

  (DataError, a ValueError, and DataFileNotFoundError, also a FileNotFoundError, live in jaxformer/errors.py with
  the rest of the one-line error family; re-exported here)
  sources/       where examples come from: SOURCES (kind -> factory) over base.py's Source/Split interface;
                 builtin.py (synthetic), local.py (text:, parallel:, jsonl:), tfds.py (tfds: and the ArrayRecord
                 writer)
  tokenizers.py  TOKENIZERS (char, byte, sentencepiece) and the workdir cache
  rows.py        TASKS (model.arch -> Task): examples -> items -> batch rows; batch keys = the model's arguments
  objectives.py  OBJECTIVES (data.objective): how encoder_decoder reads text (split_middle, prefix_lm,
                 span_corruption)
  layout.py      DataLayout: which rows of each global batch this host loads
  pipeline.py    SAMPLINGS (streams, random_windows), the train / eval iterators, state_for_host
  prompts.py     PromptIterator: the shuffled, resumable prompts of the online align methods

Public API: get_tokenizer, make_train_iterator, make_eval_iterator (both take a DataLayout), load_text_pairs,
model_inputs (a batch without its labels = the model's keyword arguments), encode_source (the encoder input
exactly as the pipeline builds it, for decoding), builtin_lm_entropy (the best achievable loss on builtin:lm) and
state_for_host (which saved data position a host resumes from; checkpoint.py asks it).

On disk, in the workdir:
  <workdir>/tokenizer/tokenizer.json     kind, vocab_size, the source it was built from
  <workdir>/tokenizer/chars.json         char vocabulary (ids 5..), or
  <workdir>/tokenizer/spm.model          sentencepiece model (ids 0-4 = pad, bos, eos, unk, <mask>)
  <workdir>/tokenizer/extra_tokens.json  data.tokenizer_extra's added tokens (ids after the vocabulary's), any kind
  <data_dir>/jaxformer_text_<hash>/1.0.0/        text: sources converted to TFDS ArrayRecord (one per file set)
  <data_dir>/jaxformer_parallel_<hash>/1.0.0/    parallel: sources, features {src_lang, tgt_lang}
  <data_dir>/<name>/empty_splits.json            splits that were empty at conversion
where <data_dir> is data.data_dir, or <workdir>/data when that is ''. tfds: sources are read from data_dir too.
"""
from jaxformer.errors import DataError
from jaxformer.errors import DataFileNotFoundError
from jaxformer.data.layout import DataLayout
from jaxformer.data.objectives import OBJECTIVES
from jaxformer.data.pipeline import EvalIterator
from jaxformer.data.pipeline import load_text_pairs
from jaxformer.data.pipeline import make_eval_iterator
from jaxformer.data.pipeline import make_train_iterator
from jaxformer.data.pipeline import SAMPLINGS
from jaxformer.data.pipeline import state_for_host
from jaxformer.data.pipeline import TrainIterator
from jaxformer.data.rows import encode_source
from jaxformer.data.rows import LABEL_KEYS
from jaxformer.data.rows import mask_tokens
from jaxformer.data.rows import model_inputs
from jaxformer.data.rows import frame_response, response_rows
from jaxformer.data.prompts import PromptIterator
from jaxformer.data.sources import jsonl_records, string_field
from jaxformer.data.rows import TASKS
from jaxformer.data.sources import builtin_lm_entropy
from jaxformer.data.sources import data_dir_for
from jaxformer.data.sources import EXAMPLE_KINDS
from jaxformer.data.sources import get_source
from jaxformer.data.sources import Instruction
from jaxformer.data.sources import Labelled
from jaxformer.data.sources.local import label_names
from jaxformer.data.sources import number_to_words
from jaxformer.data.sources import Source
from jaxformer.data.sources import SOURCES
from jaxformer.data.tokenizers import ByteTokenizer
from jaxformer.data.tokenizers import CharTokenizer
from jaxformer.data.tokenizers import get_tokenizer
from jaxformer.data.tokenizers import inherit as inherit_tokenizer
from jaxformer.data.tokenizers import load_tokenizer
from jaxformer.data.tokenizers import SentencePieceTokenizer
from jaxformer.data.tokenizers import Tokenizer
from jaxformer.data.tokenizers import tokenizer_dir
from jaxformer.data.tokenizers import TOKENIZERS
from jaxformer.data.tokenizers import unknown_characters
from jaxformer.data.hf_tokenizer import HFTokenizer

TOKENIZERS['hf'] = HFTokenizer  # registered here, not in tokenizers.py: it subclasses tokenizers.Tokenizer
