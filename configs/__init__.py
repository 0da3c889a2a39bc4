"""Config files: `default.py` is the one base config; every other file is a recipe on top of it."""
