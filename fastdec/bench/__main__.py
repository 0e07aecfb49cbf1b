"""``python -m fastdec.bench [options]``."""

import sys

from fastdec.bench.run import main

sys.exit(main())
