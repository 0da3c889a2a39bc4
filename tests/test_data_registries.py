"""The data registries are the one list of choices: config validation accepts exactly what the data package has."""
import pytest

from configs import default
from jaxformer import config as config_lib
from jaxformer import data
from jaxformer import model


def _config(**data_values):
  config = default.get_config()
  config.data.update(data_values)
  return config


@pytest.mark.parametrize('key, registry', [('tokenizer', data.TOKENIZERS), ('sampling', data.SAMPLINGS)])
def test_config_accepts_exactly_the_data_registries(key, registry):
  for name in registry:
    config_lib.validate(_config(**{key: f'{name}:some/dir' if getattr(registry[name], 'pretrained', False) else name}))
  with pytest.raises(config_lib.ConfigError) as e:
    config_lib.validate(_config(**{key: 'no_such_choice'}))
  assert f'use one of: {", ".join(registry)}.' in str(e.value)


def test_config_accepts_exactly_the_source_kinds():
  for kind in data.SOURCES:
    config_lib.validate(_config(source=f'{kind}:x'))
  with pytest.raises(config_lib.ConfigError):
    config_lib.validate(_config(source='nosuchkind:x'))


def test_every_arch_has_a_row_builder():
  assert set(data.TASKS) == set(model.ARCHS)


def test_registries_hold_what_they_name():
  for kind, tokenizer in data.TOKENIZERS.items():
    assert tokenizer.kind == kind
  for sampling, producer in data.SAMPLINGS.items():
    assert producer.sampling == sampling
  for arch, task in data.TASKS.items():
    assert task.name == arch
