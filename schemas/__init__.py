"""Resource package: ships `schemas/*.json` inside the wheel as `enclaver_rules.schemas`."""
