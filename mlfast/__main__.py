"""``python -m mlfast ...`` (and ``torchrun ... -m mlfast train ...``): the ``mlfast`` command."""
import sys

from mlfast.cli import main

sys.exit(main())
