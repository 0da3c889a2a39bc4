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
  model.position = 'learned'  # sinusoidal | rope | learned | relative (T5's bucketed bias on attention logits)
  model.norm = 'layer'  # layer | rms | rms_plus_one (Gemma: RMSNorm times 1 + scale, the scale starting at 0)
  model.norm_position = 'pre'  # pre | post | sandwich (pre-LN plus a norm on each sublayer's output: Gemma 2)
  model.mlp = 'gelu'  # gelu (tanh) | relu | swiglu | gelu_exact (erf, BERT) | geglu (gated tanh gelu, T5 v1.1,
  # Gemma) | geglu_exact (gated erf gelu)
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
  # RoPE scaling (position=rope; rope_base is RoPE's theta), computed as transformers' rope_type of the same name:
  model.rope_scaling = 'none'  # none | linear | dynamic (NTK, per call from its longest position) | llama3 | yarn
  model.rope_factor = 1.0  # the context extension factor (linear, dynamic, llama3, yarn)
  model.rope_original_max_len = -1  # pre-training context length; -1 = max_len (dynamic scales past it)
  model.rope_low_freq_factor = 1.0  # llama3: wavelengths > original_max_len / this are divided by factor
  model.rope_high_freq_factor = 4.0  # llama3: wavelengths < original_max_len / this are kept; between: blended
  model.rope_beta_fast = 32.0  # yarn: dimensions turning > beta_fast times within original_max_len are kept
  model.rope_beta_slow = 1.0  # yarn: those turning < beta_slow times are interpolated; a ramp between
  model.rope_attention_factor = -1.0  # yarn: cos/sin multiplier; -1 = 0.1 ln(factor) + 1 (or the mscale ratio)
  model.rope_mscale = 0.0  # yarn: with rope_mscale_all_dim, the attention factor is the ratio of their mscales
  model.rope_mscale_all_dim = 0.0  # yarn: 0 = unset
  model.rope_truncate = True  # yarn: the ramp's ends rounded to whole dimensions (transformers' default)
  model.dtype = 'float32'  # compute dtype: float32 | bfloat16 | float16
  model.param_dtype = 'float32'  # storage dtype of parameters (the optimizer's master copy)
  model.attention_impl = 'auto'  # auto (cudnn flash on GPU for 16-bit inputs; off GPU chunked once T*S >= 2048^2;
  # else xla) | xla | cudnn | reference | chunked (flash-style pure JAX, memory linear in T; model/attention.py)
  model.remat = 'none'  # none | dots | projections | block | full: what the backward pass recomputes (model/remat.py)
  model.scan_layers = False  # one block body, parameters stacked along 'layers', run by lax.scan (model/scan.py); the
  # published shapes (gpt2_small, bert_base, t5_small, transformer_base) turn it on; checkpoints convert on restore
  model.init_std = 0.02
  model.head_dim = -1  # per-head width; -1 = d_model // num_heads (T5's d_kv may differ)
  model.attention_scale = -1.0  # query-key logit scale; -1 = head_dim ** -0.5; T5: 1.0 (no scaling)
  model.qkv_bias = False  # biases on the query/key/value projections even when use_bias=False (Qwen2)
  model.qk_norm = 'none'  # none | projection (a norm over each whole q / k projection: OLMoE, OLMo 2) | head (over
  # each head's vector, one scale shared by the heads: Qwen3, Gemma 3); model.norm's kind and eps (model/attention.py)
  # sliding-window attention (decoder_only): query t attends key s iff s <= t and t - s < sliding_window (Mistral's
  # and transformers' convention), within its segment; 0 = off. Decoding keeps a ring buffer of that many key/value
  # slots for each windowed layer (the global layers keep the whole cache).
  model.sliding_window = 0
  # which layers are windowed when sliding_window > 0: L (local, windowed) / G (global) per layer, the string repeated
  # over the layers: L = all (Mistral), LG = alternating from a local first layer (Gemma 2), LLLLLG (Gemma 3); a
  # string as long as num_layers spells each layer out (Qwen2's max_window_layers: GGLL)
  model.sliding_window_pattern = 'L'
  # the token id that means padding when no segment ids are given (and in decoding's source); -1 = none: every id
  # is a real token (GPT-2 / Llama, whose id 0 is a word). Decoder tokens fed by decoding are always real.
  model.pad_id = 0
  model.type_vocab_size = 0  # token-type (segment) embeddings; BERT: 2; 0 = none (token_type_ids default to 0)
  model.embed_norm = False  # norm (model.norm) over token + type + position embeddings before the blocks (BERT)
  model.output_bias = False  # a bias [vocab] added to the logits (BERT's MLM decoder bias)
  model.relative_num_buckets = 32  # position=relative: buckets of key - query distance (T5: 32)
  model.relative_max_distance = 128  # position=relative: distances past this share the last bucket (T5: 128)
  model.output_scale = 1.0  # multiplies the final hidden states before the output projection; T5 v1.0: d_model**-0.5
  model.embed_scale = False  # token embeddings times sqrt(d_model), rounded to the compute dtype first (Gemma)
  model.attention_softcap = 0.0  # attention logits -> cap * tanh(logits / cap) before the mask; 0 = off (Gemma 2: 50)
  model.logit_softcap = 0.0  # output logits -> cap * tanh(logits / cap); 0 = off (Gemma 2: 30)
  # what the model outputs (jaxformer/heads): lm = per-token logits | classification = one label per row |
  # reward = one scalar per row (a reward model, trained on preference pairs)
  model.head = 'lm'
  model.num_classes = 0  # head=classification: the number of labels
  # head=classification / reward: first | mean | last (real token); '' = first (encoder_only) / last (decoder_only)
  model.pooling = ''
  model.pooler = False  # head=classification / reward: BERT's pooler (dense + tanh) before the output layer
  # mixture of experts (model/moe.py): num_experts > 0 makes every moe_every-th block's MLP a routed one
  model.num_experts = 0  # E; 0 = dense (the other moe keys are then unused)
  model.experts_per_token = 2  # k: experts each token is routed to
  model.moe_every = 1  # block i (0-based) is MoE iff (i + 1) % moe_every == 0 (Qwen2-MoE's decoder_sparse_step)
  # topk_softmax (Mixtral: the k chosen probabilities renormalised) | softmax_topk (Qwen2-MoE / OLMoE: not)
  model.router = 'topk_softmax'
  model.num_shared_experts = 0  # experts every token goes through (one MLP n * expert_d_ff wide; Qwen2-MoE: 1 + gate)
  model.moe_shared_gate = True  # the shared expert's output scaled by sigmoid(x w) (Qwen2-MoE); False: DeepSeek
  model.expert_d_ff = 0  # each expert's hidden width; 0 = d_ff
  model.capacity_factor = 0.0  # moe_impl=capacity: slots per expert = this * tokens * k / E per sequence (Switch 1.25)
  # dropless (sorted tokens + jax.lax.ragged_dot) | capacity (per-expert buffers, drops overflow) | dense (every
  # expert on every token: the reference)
  model.moe_impl = 'dropless'

  # ----------------------------------------------------------------- data
  data = config.data = ml_collections.ConfigDict()
  # builtin:lm | builtin:numbers | builtin:passkey | text:<path or glob> | parallel:<prefix> | jsonl:<path or glob> |
  # tfds:<name>[/<config>]
  data.source = 'builtin:lm'
  data.data_dir = ''  # where TFDS datasets live or are built; '' = <workdir>/data
  data.tokenizer = 'char'  # char | byte | sentencepiece
  data.vocab_size = 8000  # sentencepiece only
  data.spm_model_type = 'unigram'  # sentencepiece only: unigram | bpe
  # sentencepiece only: the share of the training text's characters that get their own piece; the rarest others
  # fall back to UTF-8 byte pieces (SentencePiece recommends 0.9995 for Chinese / Japanese; 1.0 = every character)
  data.spm_character_coverage = 1.0
  # a UTF-8 file, one token per line, added to the tokenizer's vocabulary (ids after the last; as Hugging Face's
  # add_tokens): with checkpoint.init_from the embeddings and output layer grow, new rows = the mean of the old
  data.tokenizer_extra = ''
  data.src_lang = 'en'  # parallel / translation sources
  data.tgt_lang = 'de'
  data.text_key = ''  # tfds LM sources: the feature holding the text ('' = the only string feature)
  # text: sources: file = each file is one document (nanoGPT; long ones are cut at line ends into ~2k-char
  # examples), one file split 90/10 by characters | line = one example per non-empty line, split 90/10 by lines
  data.text_unit = 'file'
  # jsonl: sources (instruction data): the fields of each line's JSON object holding the prompt and the response
  data.prompt_key = 'prompt'
  data.response_key = 'response'
  # jsonl: conversations (decoder_only): lines with a list of {"role", "content"} messages; loss on the assistant
  # messages only. data.chat_template renders them: '' = the tokenizer's own (an hf: directory's chat_template),
  # else the built-in 'turns' | a built-in name (turns, chatml) | a .jinja file
  data.messages_key = 'messages'
  data.chat_template = ''
  # jsonl: preference data (model.head=reward, align.method=dpo|simpo): each line has a prompt and either a chosen
  # and a rejected response, or a ranking (data.responses_key: [best, ..., worst], which becomes every ordered
  # pair); data.margin_key: an optional float per pair (the reward model's margin, as TRL's `margin` column)
  data.chosen_key = 'chosen'
  data.rejected_key = 'rejected'
  data.responses_key = 'responses'
  data.margin_key = 'margin'
  # jsonl: sources with model.head=classification: each line has a text (data.text_key, '' = 'text') or a pair
  # (data.text_pair_keys) and a label (data.label_key): an int in [0, model.num_classes), or one of data.label_names
  data.text_pair_keys = 'text_a,text_b'
  data.label_key = 'label'
  data.label_names = ''  # comma list: the label strings, in class-id order (e.g. 'negative,positive')
  # jsonl: sources with model.head=token_classification: each line has a list of words and one tag per word (an
  # int id, or one of data.label_names, which token_classification requires: e.g. 'O,B-PER,I-PER')
  data.words_key = 'tokens'
  data.tags_key = 'tags'
  # model.head=span: a context longer than a row is read in windows that overlap by this many tokens (Hugging
  # Face run_qa's doc_stride)
  data.doc_stride = 128
  data.seq_len = 128  # tokens per row: LM rows, or the decoder (target) side of seq2seq
  data.src_seq_len = 128  # encoder (source) side of seq2seq
  data.pack = True  # pack several examples into one row (segment_ids keep them apart)
  # training rows: streams = each row reads shuffled examples in order (any size of data, any arch) |
  # random_windows = i.i.d. windows of the whole tokenized split, as nanoGPT (LM archs, data that fits in memory)
  data.sampling = 'streams'
  # char tokenizer: characters absent from the training split become <unk>; their share per split is logged at
  # start-up, and above this fraction the run stops there (before step 1). -1 = never stop.
  data.max_unk_fraction = -1.0
  data.mask_rate = 0.15  # encoder_only masked-LM: fraction of tokens chosen (80/10/10 mask/random/keep)
  # encoder_decoder on text examples: split_middle = source/target at the middle word | prefix_lm = at a random
  # token | span_corruption = T5's denoising (random spans -> sentinels taken from the end of the vocabulary)
  data.objective = 'split_middle'
  data.noise_density = 0.15  # span_corruption: fraction of tokens noised
  data.mean_noise_span_length = 3.0  # span_corruption: mean length of a noised span
  data.num_sentinels = 100  # span_corruption: sentinel ids reserved at the end of the vocabulary (T5: 100)
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
  train.moe_aux_loss_coef = 0.01  # load-balancing loss weight (Switch, OLMoE: 0.01; Mixtral, Qwen2-MoE: 0.001)
  train.moe_z_loss_coef = 0.001  # router z-loss weight (ST-MoE, OLMoE: 0.001)
  train.log_every = 10
  train.eval_every = 200
  train.eval_steps = 20  # batches per evaluation, spread evenly over the split; -1 = the whole split
  # batches of the evaluation at train.num_steps (and of eval.py's): 0 = train.eval_steps, -1 = the whole split
  train.final_eval_steps = 0
  train.eval_batch_size = 0  # 0 = train.batch_size
  train.max_bad_steps = 3  # stop after this many steps in a row with a non-finite loss or gradient norm
  train.skip_bad_steps = False  # True: a step with a non-finite gradient leaves params / optimizer state unchanged
  # JAX's persistent compilation cache (reruns / resumes skip compiling); '' = off (jaxformer/compilation_cache.py)
  train.compilation_cache_dir = '~/.cache/jaxformer/jax_cache'
  # lm-evaluation-harness tasks run at each evaluation (comma list; the harness section says how; '' = none)
  train.harness_tasks = ''

  # ----------------------------------------------------------------- peft
  # Parameter-efficient fine-tuning (jaxformer/peft): which parameters train. Start from a pretrained model with
  # checkpoint.init_from; a PEFT run's checkpoints hold only what trains (+ its optimizer state).
  peft = config.peft = ml_collections.ConfigDict()
  peft.method = 'none'  # none (full fine-tuning) | lora | bitfit | adapter | prompt | prefix
  peft.targets = 'attention'  # lora: attention (query,key,value,out) | mlp (wi,wi_gate,wo) | all | a comma list
  peft.rank = 8  # lora rank r
  peft.alpha = 16.0  # lora scale alpha / r
  peft.dropout = 0.0  # lora: dropout on the update's input
  peft.adapter_dim = 64  # adapter: bottleneck width
  peft.num_prompt_tokens = 20  # prompt: soft tokens prepended to the (encoder) input
  peft.num_prefix_tokens = 10  # prefix: trained key/value slots in front of every self-attention layer's
  peft.prefix_projection = 0  # prefix: hidden size of the reparameterisation MLP (peft's encoder_hidden_size); 0 = off
  peft.train_extra = ''  # also train parameters whose path contains one of these words, e.g. 'norm,bias,head'
  # Hugging Face peft LoRA directories (jaxformer/hf/peft_format.py); either sets method/rank/alpha/targets itself
  peft.adapter = ''  # one adapter directory: its factors start the LoRA (then train further, or eval)
  peft.adapters = ''  # name:dir,name2:dir2: several adapters on one base (pick with adapter_name / adapter_weights)
  peft.adapter_weights = ''  # name:w,...: apply sum_i w_i * scale_i * A_i B_i of peft.adapters ('' = adapter_name)
  peft.adapter_name = ''  # the one adapter of peft.adapters to apply ('' = the first; eval.py: per request too)
  # also train the vocabulary's parameters (embeddings, output layer and bias) in full: auto = when the tokenizer has
  # added tokens (data.tokenizer_extra), so their new rows learn | yes | no
  peft.train_vocab = 'auto'
  peft.quantize = 'none'  # none | nf4 (QLoRA: 4-bit NormalFloat, double-quantised scales) | int8 (per output channel):
  # store the frozen base's attention / MLP kernels quantised (read from checkpoint.init_from, quantised once)
  peft.quantize_block = 64  # nf4: weights per absmax block
  peft.quantize_stats_block = 256  # nf4: absmax values per block of their 8-bit double quantisation

  # ---------------------------------------------------------------- align
  # Learning from preferences and from a reward (jaxformer/align). The reference model is the run's
  # checkpoint.init_from, frozen (under LoRA / adapters: the base with the adapters off, no second copy).
  align = config.align = ml_collections.ConfigDict()
  align.method = 'none'  # none | dpo | simpo (offline, on preference pairs) | grpo | rloo | ppo (online, on prompts)
  align.beta = 0.1  # dpo: the KL strength of the implicit reward beta * (log pi - log pi_ref); simpo: its beta
  align.dpo_loss = 'sigmoid'  # dpo: sigmoid (DPO) | ipo (IPO, length-normalised as TRL) | hinge (SLiC)
  align.gamma = 0.5  # simpo: the target reward margin gamma (TRL's simpo_gamma)
  align.precompute_reference = False  # dpo: the reference's log-probabilities computed once per example up front
  align.reward_margin = True  # head=reward: use the data's margin (data.margin_key) when a line gives one
  align.center_rewards = 0.0  # head=reward: + c * mean((r_chosen + r_rejected)^2) (TRL's center_rewards_coefficient)
  # online methods: each step samples align.num_generations completions of align.prompts_per_step prompts
  align.prompts_per_step = 8
  align.num_generations = 4
  align.max_new_tokens = 16  # the longest completion sampled (decode.temperature / decode.top_p / top_k apply)
  align.reward_model = ''  # a workdir of a model.head=reward run scoring the completions ('' = none)
  align.reward_fn = ''  # module:function called with (prompts, completions, **other row fields) -> one float each
  align.clip_eps = 0.2  # the clipped surrogate's epsilon (PPO, GRPO, RLOO)
  align.kl_coef = 0.05  # x KL(policy || reference), per token (GRPO: in the loss; RLOO / PPO: in the reward)
  align.updates_per_batch = 1  # optimizer passes over each rollout batch
  align.scale_rewards = True  # grpo: divide the group-centred rewards by the group's std (rloo: none)
  align.gae_lambda = 0.95  # ppo: GAE lambda
  align.discount = 1.0  # ppo: the per-token discount gamma
  align.value_coef = 0.1  # ppo: the weight of the value loss
  align.value_clip = 0.2  # ppo: the value function's clip range

  # -------------------------------------------------------------- harness
  # lm-evaluation-harness (eval.py --mode=harness --tasks=a,b; train.harness_tasks): pip install -e '.[harness]'
  harness = config.harness = ml_collections.ConfigDict()
  harness.include_path = ''  # folders of task YAMLs (comma list), e.g. benchmarks/harness/tasks; '' = built-in only
  harness.num_fewshot = -1  # examples in each prompt; -1 = each task's own default
  harness.limit = 0.0  # examples per task: 0 = all, < 1 = that fraction, >= 1 = that many
  harness.batch_size = 0  # rows per jitted call; 0 = decode.batch_size
  harness.max_gen_toks = 256  # generation tasks' new tokens when the task does not say (lm-eval's default)
  harness.bootstrap_iters = 1000  # resamples for the stderr of non-mean metrics (lm-eval's CLI: 100000); 0 = none
  harness.log_samples = False  # also write every request and response: DIR/harness_samples_<task>_step<N>.jsonl
  # render requests with the chat template (data.chat_template), as lm-eval's --apply_chat_template; few-shot
  # examples then become earlier user / assistant turns (lm-eval's --fewshot_as_multiturn; its default)
  harness.apply_chat_template = False
  harness.fewshot_as_multiturn = True
  harness.system_instruction = ''  # a system message in front of every request ('' = none)

  # ----------------------------------------------------------- checkpoint
  checkpoint = config.checkpoint = ml_collections.ConfigDict()
  checkpoint.every_steps = 500
  checkpoint.keep = 3
  checkpoint.async_save = True
  # Start from pretrained parameters (step, optimizer and data start fresh): '' | hf:<dir> | a jaxformer workdir
  checkpoint.init_from = ''

  # ----------------------------------------------------------------- mesh
  mesh = config.mesh = ml_collections.ConfigDict()
  mesh.data = -1  # -1 = all devices not used by the other axes
  mesh.fsdp = 1
  # context parallelism: activations split along their length over this many devices; attention gathers keys /
  # values across them (model/attention.py context_parallel_attention). data.seq_len (and src_seq_len) must divide.
  mesh.sequence = 1
  mesh.expert = 1  # expert parallelism: a MoE model's experts split over this many devices (model/moe.py)
  mesh.tensor = 1
  # Logical axis name -> mesh axis (or axes). The one place sharding is declared.
  mesh.logical_axis_rules = (
      ('batch', ('data', 'fsdp')),
      ('length', 'sequence'),  # activations' length (the 'sequence' axis is in the mesh only when mesh.sequence > 1)
      ('vocab', 'tensor'),
      ('embed', 'fsdp'),
      ('mlp', 'tensor'),
      ('heads', 'tensor'),
      ('kv_heads', 'tensor'),
      ('kv', None),
      ('layers', None),  # the stacked layer axis of model.scan_layers
      ('expert', 'expert'),  # the stacked experts of a MoE model (model.num_experts)
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
  decode.eos_id = -1  # decoding stops at this token; -1 = the tokenizer's EOS (jaxformer tokenizers: 2; T5: 1)
  # the decoder's first token when there is no prompt; -1 = the tokenizer's (encoder_decoder: the token its
  # targets start with, T5: 0; decoder_only: BOS)
  decode.start_id = -1
  # generation controls (every method and arch; transformers' semantics): a token already in the row (a decoder_only
  # prompt included) gets its logit / penalty if positive, * penalty if negative (CTRL); 1.0 = off
  decode.repetition_penalty = 1.0
  decode.no_repeat_ngram_size = 0  # ban any token that would repeat an n-gram of the row (prompt included); 0 = off
  decode.min_new_tokens = 0  # EOS is banned until this many new tokens; 0 = off
  # sample: that many independent samples per prompt; beam: the best that many beams (<= beam_size); greedy: 1
  decode.num_return_sequences = 1
  # stop strings, comma-separated, escapes \n \t \r \\ and \, (a literal comma): --config.decode.stop='\n\n,###'; the
  # text is cut before the first one (a row also stops once it ends with one's tokens); '' = none
  decode.stop = ''
  decode.batch_size = 32
  # sacrebleu tokenizer: '' = by data.tgt_lang (zh -> zh, ja -> ja-mecab if installed, else 13a) | 13a | intl |
  # zh | char | none
  decode.bleu_tokenize = ''
  decode.bleu_max_ngram = 4  # BLEU's n-gram order (4 = standard; another value is marked in the signature)
  # best-of-N (eval.py --mode=generate): sample num_samples completions per prompt and return the one the reward
  # model (a model.head=reward workdir) scores highest, with its reward; 1 = plain decoding
  decode.num_samples = 1
  decode.reward_model = ''
  # self-consistency (eval.py --mode=generate, with decode.num_samples=N, decode.method=sample, no reward_model):
  # a regex whose first group (else the whole match) is a completion's answer; the most common answer of the N
  # samples wins (ties: the first to appear); '' = off
  decode.answer_pattern = ''
  # eval.py --mode=embed: one vector per input line, the final hidden states pooled over the real tokens (first |
  # mean | last; encoder_decoder: the encoder's) and L2-normalised (embed_normalize)
  decode.embed_pooling = 'mean'
  decode.embed_normalize = True
  # model.head=span (eval): the answer is the best-scoring span (start + end logit) among the n_best_size top starts
  # and ends of each window, at most max_answer_len tokens long (Hugging Face run_qa's n_best_size, max_answer_length)
  decode.n_best_size = 20
  decode.max_answer_len = 30
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
