"""``python -m onnxshap.cli``: the command line."""

import sys

from onnxshap.cli import main

sys.exit(main())
