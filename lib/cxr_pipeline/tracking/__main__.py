"""``python -m cxr_pipeline.tracking``: log, resolve, ui."""

import sys

from . import main

sys.exit(main())
