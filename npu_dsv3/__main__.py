"""`python -m npu_dsv3 ...` is the `npu-dsv3` command."""

import sys

from npu_dsv3.cli import main

sys.exit(main())
