"""The one base config. Every recipe starts from `get_config()` here and changes a few values.

Override anything from the command line, e.g.
  python train.py --config=configs/gpt_tiny.py --config.model.arch=encoder_decoder --config.model.position=rope
"""
from typing import Any

import ml_collections


def get_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.seed = 0

  # ---------------------------------------------------------------- model
  model = config.model = ml_collections.ConfigDict()
  model.arch = 'decoder_only'  # encoder_only | decoder_only | encoder_decoder
  model.position = 'learned'  # sinusoidal | rope | learned
  model.norm = 'layer'  # layer | rms
  model.norm_position = 'pre'  # pre | post
  model.mlp = 'gelu'  # gelu | relu | swiglu
  model.num_layers = 2  # encoder depth, or decoder depth for decoder_only
  model.num_decoder_layers = -1  # encoder_decoder only; -1 = num_layers
  model.num_heads = 4
  model.num_kv_heads = -1  # -1 = num_heads (multi-head); 1 = multi-query; otherwise grouped-query
  model.d_model = 128
  model.d_ff = 512
  model.vocab_size = 0  # 0 = taken from the tokenizer at run time
  model.max_len = 256  # longest sequence the positions (and the KV cache) support
  model.dropout = 0.0
  model.attention_dropout = 0.0
  model.use_bias = True
  model.tie_embeddings = True
  model.norm_eps = 1e-5
  model.rope_base = 10000.0
  model.dtype = 'float32'  # compute dtype: float32 | bfloat16 | float16
  model.param_dtype = 'float32'  # storage dtype of parameters (the optimizer's master copy)
  model.attention_impl = 'auto'  # auto (cudnn flash on GPU for 16-bit inputs, else xla) | xla | cudnn | reference
  model.remat = 'none'  # none | dots | projections | block | full: what the backward pass recomputes (model/remat.py)
  model.scan_layers = False  # one block body with parameters stacked along 'layers', run by lax.scan (model/scan.py)
  model.init_std = 0.02

  # ----------------------------------------------------------------- data
  data = config.data = ml_collections.ConfigDict()
  # builtin:lm | builtin:numbers | text:<path or glob> | parallel:<prefix> | tfds:<name>[/<config>]
  data.source = 'builtin:lm'
  data.data_dir = ''  # where TFDS datasets live or are built; '' = <workdir>/data
  data.tokenizer = 'char'  # char | byte | sentencepiece
  data.vocab_size = 8000  # sentencepiece only
  data.spm_model_type = 'unigram'  # sentencepiece only: unigram | bpe
  data.src_lang = 'en'  # parallel / translation sources
  data.tgt_lang = 'de'
  data.text_key = ''  # tfds LM sources: the feature holding the text ('' = the only string feature)
  # text: sources: file = each file is one document (nanoGPT; long ones are cut at line ends into ~2k-char
  # examples), one file split 90/10 by characters | line = one example per non-empty line, split 90/10 by lines
  data.text_unit = 'file'
  data.seq_len = 128  # tokens per row: LM rows, or the decoder (target) side of seq2seq
  data.src_seq_len = 128  # encoder (source) side of seq2seq
  data.pack = True  # pack several examples into one row (segment_ids keep them apart)
  # training rows: streams = each row reads shuffled examples in order (any size of data, any arch) |
  # random_windows = i.i.d. windows of the whole tokenized split, as nanoGPT (LM archs, data that fits in memory)
  data.sampling = 'streams'
  data.mask_rate = 0.15  # encoder_only masked-LM: fraction of tokens chosen (80/10/10 mask/random/keep)
  data.train_split = 'train'
  data.eval_split = 'validation'
  data.test_split = 'test'
  data.prefetch = 2  # batches prepared ahead in a background thread

  # ---------------------------------------------------------------- train
  train = config.train = ml_collections.ConfigDict()
  train.batch_size = 32  # global batch (all hosts, all devices), in rows
  train.num_steps = 1000
  train.optimizer = 'adamw'  # adamw | adafactor | sgd
  train.learning_rate = 1e-3
  train.schedule = 'cosine'  # cosine | linear | constant | rsqrt (each after linear warmup)
  train.warmup_steps = 100
  train.min_learning_rate = 0.0  # where cosine / linear decay ends
  train.b1 = 0.9
  train.b2 = 0.99
  train.eps = 1e-8
  train.weight_decay = 0.1
  train.weight_decay_exclude = 'norm,bias,embed'  # parameter path parts that get no weight decay
  train.grad_clip_norm = 1.0  # 0 = no clipping
  train.grad_accum_steps = 1  # micro-batches per optimizer step (batch_size is split across them)
  train.steps_per_call = 1  # optimizer steps per jitted call (lax.scan over stacked batches; >1 amortises CPU dispatch)
  train.label_smoothing = 0.0
  train.z_loss = 0.0
  train.log_every = 10
  train.eval_every = 200
  train.eval_steps = 20  # batches per evaluation; -1 = the whole split
  train.eval_batch_size = 0  # 0 = train.batch_size
  # JAX's persistent compilation cache (reruns / resumes skip compiling); '' = off (jaxformer/compilation_cache.py)
  train.compilation_cache_dir = '~/.cache/jaxformer/jax_cache'

  # ----------------------------------------------------------- checkpoint
  checkpoint = config.checkpoint = ml_collections.ConfigDict()
  checkpoint.every_steps = 500
  checkpoint.keep = 3
  checkpoint.async_save = True

  # ----------------------------------------------------------------- mesh
  mesh = config.mesh = ml_collections.ConfigDict()
  mesh.data = -1  # -1 = all devices not used by the other axes
  mesh.fsdp = 1
  mesh.tensor = 1
  # Logical axis name -> mesh axis (or axes). The one place sharding is declared.
  mesh.logical_axis_rules = (
      ('batch', ('data', 'fsdp')),
      ('length', None),
      ('vocab', 'tensor'),
      ('embed', 'fsdp'),
      ('mlp', 'tensor'),
      ('heads', 'tensor'),
      ('kv_heads', 'tensor'),
      ('kv', None),
      ('layers', None),  # the stacked layer axis of model.scan_layers
  )
  mesh.distributed = 'auto'  # auto (initialize jax.distributed when the environment says so) | on | off

  # --------------------------------------------------------------- decode
  decode = config.decode = ml_collections.ConfigDict()
  decode.method = 'greedy'  # greedy | beam | sample
  decode.beam_size = 4
  decode.length_penalty = 0.6  # GNMT: ((5 + len) / 6) ** alpha
  decode.temperature = 1.0
  decode.top_k = 0  # 0 = off
  decode.top_p = 1.0  # 1.0 = off
  decode.max_len = 64  # new tokens to generate
  decode.batch_size = 32
  return config


def apply_variant(config: ml_collections.ConfigDict, variants: dict[str, dict[str, Any]], variant: str,
                  recipe: str) -> ml_collections.ConfigDict:
  """Overlays one named variant ({section: {key: value}}) of a recipe, chosen by `--config=configs/<recipe>.py:<v>`."""
  if variant not in variants:
    raise ValueError(f'unknown {recipe} variant {variant!r}; use one of: {", ".join(variants)} '
                     f'(e.g. --config=configs/{recipe}.py:{next(iter(variants))}).')
  for section, values in variants[variant].items():
    config[section].update(values)
  return config
