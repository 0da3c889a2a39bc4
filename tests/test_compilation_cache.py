"""train.compilation_cache_dir: resolve() points JAX's persistent cache there (compiled programs land on disk and
a second process loads them instead of compiling); '' turns the cache off. Subprocesses: the cache is global
state of a process, fixed at its first compilation."""
import os
import subprocess
import sys
import textwrap

from conftest import REPO

SCRIPT = textwrap.dedent('''
    import sys
    import jax, jax.numpy as jnp
    from configs import gpt_tiny
    from jaxformer import resolve
    config = gpt_tiny.get_config()
    config.train.compilation_cache_dir = sys.argv[1]
    resolve.resolve(config, sys.argv[2], training=False)

    def f(x):  # a few hundred ops: compiles for longer than compilation_cache.MIN_COMPILE_TIME_SECS
      for i in range(300):
        x = jnp.sin(x) * (i + 1) + jnp.cos(x[::-1])
      return x

    hits = []
    jax.monitoring.register_event_listener(lambda event, **kw: hits.append(event) if 'cache_hits' in event else None)
    jax.jit(f).lower(jnp.ones(64)).compile()
    print('enabled', jax.config.jax_enable_compilation_cache, 'hits', len(hits))
''')


def run(cache_dir, workdir):
  env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, (str(REPO), os.environ.get('PYTHONPATH', '')))), JAX_PLATFORMS='cpu')
  out = subprocess.run([sys.executable, '-c', SCRIPT, cache_dir, workdir], capture_output=True, text=True,
                       env=env, cwd=REPO, timeout=600)
  assert out.returncode == 0, out.stderr[-3000:]
  words = out.stdout.split()
  return words[1] == 'True', int(words[3])


def test_cache_dir_receives_compiled_programs_and_a_rerun_loads_them(tmp_path):
  cache = tmp_path / 'cache'
  enabled, hits = run(str(cache), str(tmp_path / 'work'))
  entries = os.listdir(cache)
  assert enabled and entries and hits == 0, 'nothing was written to the compilation cache'
  enabled, hits = run(str(cache), str(tmp_path / 'work'))
  assert hits >= 1 and sorted(os.listdir(cache)) == sorted(entries)  # read back, not compiled and written again


def test_empty_cache_dir_turns_the_cache_off(tmp_path):
  enabled, _ = run('', str(tmp_path / 'work'))
  assert not enabled
