"""``python -m mlfast ...`` (and ``torchrun ... -m mlfast train ...``): the ``mlfast`` command."""
from mlfast.cli import run

run()
