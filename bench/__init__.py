"""netwatchd's overhead benchmark: ``sudo .venv/bin/python -m bench.run`` (see bench/README.md)."""
