"""Evaluate a checkpoint that train.py wrote: perplexity (and BLEU for encoder_decoder), generation (best-of-N),
translation, rewards, attention maps.

  python eval.py --config=configs/gpt_tiny.py --workdir=/tmp/gpt_tiny [--checkpoint_step=N] [--split=test]
                 [--output=FILE] [--config.decode.method=beam ...]
  python eval.py --config=configs/gpt_tiny.py --workdir=/tmp/gpt_tiny --mode=generate --prompt='ka'
  python eval.py --config=configs/t5_tiny.py --workdir=/tmp/t5_tiny --mode=translate --input=numbers.txt
  python eval.py --config=configs/gpt_tiny.py --workdir=/tmp/rm --mode=reward --input=pairs.jsonl
  python eval.py --config=configs/gpt_tiny.py --workdir=/tmp/gpt_tiny --mode=harness --tasks=synth_next_word \
                 --config.harness.include_path=benchmarks/harness/tasks
  python eval.py --config=configs/gpt_tiny.py --workdir=/tmp/gpt_tiny --mode=attention --prompt='ka zo' --output=a.png

The architecture (model section) comes from the checkpoint's saved config; data/train settings too, so the loss
matches training's eval_loss for the same step (use --config.train.eval_steps=-1 for the whole split).
score results go to DIR/eval_<split>_step<N>.json and DIR/eval.json (the latest) unless --output says otherwise.
"""
import sys

from absl import app, flags
from ml_collections import config_flags

from jaxformer import cli

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Recipe file, e.g. configs/gpt_tiny.py.', lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'The directory train.py wrote (checkpoints/, config.json, tokenizer/).')
_STEP = flags.DEFINE_integer('checkpoint_step', None, 'Checkpoint step to evaluate (default: the newest).')
_SPLIT = flags.DEFINE_string('split', 'validation', 'validation (data.eval_split), test (data.test_split) or a '
                             'split name.')
_OUTPUT = flags.DEFINE_string('output', None, 'score: the JSON file (default DIR/eval_<split>_step<N>.json, also '
                              'copied to DIR/eval.json); translate: the output text file (default: print); generate: '
                              'optional JSON file; attention: the picture (.png, .pdf, .svg; default '
                              'DIR/attention.png) or the arrays (.npz).')
_MODE = flags.DEFINE_enum('mode', 'score', ['score', 'generate', 'translate', 'reward', 'harness', 'attention', 'embed'], 'What to do.')
_PROMPT = flags.DEFINE_multi_string('prompt', None, 'generate: prompt text (repeat the flag for several); attention: '
                                    'the one text whose attention is drawn (encoder_decoder: the source).')
_TARGET = flags.DEFINE_string('target', None, 'attention, encoder_decoder: the decoder text (default: the model\'s '
                              'translation of --prompt, decoded with --config.decode.*).')
_INPUT = flags.DEFINE_string('input', None, 'translate: a text file with one source sentence per line; generate: '
                             'prompts (.txt: one per line, .jsonl: {"prompt": ...} or {"messages": [...]} lines); reward: a .jsonl file of '
                             '{"prompt", "response"} lines; embed: texts (.txt: one per line, .jsonl: {"text": ...}).')
_TASKS = flags.DEFINE_string('tasks', None, 'harness: lm-evaluation-harness task names, comma-separated (local task '
                             'folders: --config.harness.include_path=DIR).')
_CHAT = flags.DEFINE_bool('chat', False, 'generate: each --prompt is a user message, rendered with the chat template '
                          '(data.chat_template) and continued as the assistant.')
_BLEU = flags.DEFINE_bool('bleu', True, 'score, encoder_decoder: also translate the split and report BLEU.')
flags.mark_flags_as_required(['config', 'workdir'])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {" ".join(argv[1:])}')
  cli.quiet_logging()
  cli.evaluate(_CONFIG.value, _WORKDIR.value, sys.argv, checkpoint_step=_STEP.value, split=_SPLIT.value,
               output=_OUTPUT.value, mode=_MODE.value, prompt=_PROMPT.value, input_path=_INPUT.value,
               bleu=_BLEU.value, tasks=_TASKS.value, target=_TARGET.value, chat_prompts=_CHAT.value)


if __name__ == '__main__':
  cli.check_overrides(sys.argv)
  app.run(main)
