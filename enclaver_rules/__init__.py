"""enclaver: turn a container image into an AWS Nitro Enclave image, run it, and prove what runs.

Packages: `manifest` (enclaver.yaml), `policy` (egress rules), `rules` (doit tasks), `cli`.
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("enclaver")
except PackageNotFoundError:  # running from a checkout that was not installed
    __version__ = "0+unknown"
