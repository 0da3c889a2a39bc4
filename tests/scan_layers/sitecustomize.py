"""Python imports this at start-up when tests/conftest.py has put this folder on PYTHONPATH (JAXFORMER_TEST_SCAN_LAYERS=1)."""
import scan_layers_hook

scan_layers_hook.install()
