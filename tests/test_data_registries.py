"""The data registries are the one list of choices: config validation accepts exactly what the data package has."""
from jaxformer import config as config_lib
from jaxformer import data
from jaxformer.model import transformer


def test_registries_match_the_config_choices():
  assert tuple(data.TOKENIZERS) == tuple(config_lib.TOKENIZERS)
  assert tuple(data.SOURCES) == tuple(config_lib.SOURCE_KINDS)
  assert tuple(data.SAMPLINGS) == tuple(config_lib.SAMPLINGS)
  assert set(data.TASKS) == set(transformer.ARCHS)  # a row builder for every architecture


def test_registries_hold_what_they_name():
  for kind, tokenizer in data.TOKENIZERS.items():
    assert tokenizer.kind == kind
  for sampling, producer in data.SAMPLINGS.items():
    assert producer.sampling == sampling
  for arch, task in data.TASKS.items():
    assert task.name == arch
