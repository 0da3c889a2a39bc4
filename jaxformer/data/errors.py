"""The data package's errors: one line naming the file or config key and the fix (never a traceback)."""
from jaxformer.user_errors import UserError


class DataError(UserError, ValueError):
  """A data problem (source, split, file, tokenizer). The message is one line naming the file or key and the fix."""


class DataFileNotFoundError(DataError, FileNotFoundError):
  """A file or path named by the config does not exist."""
