"""`python -m enclaver_rules.cli` runs the `enclaver` command."""

from enclaver_rules.cli.main import entrypoint

entrypoint()
