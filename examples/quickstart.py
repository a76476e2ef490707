"""
Quickstart: plain SFT and TMS side by side, offline, on CPU (the README's main job).

    python examples/quickstart.py                   # the embedded SmolLM2-135M-Instruct, leg_counting
    python examples/quickstart.py --help            # every setting

What it trains, measures and prints is described in `trl_tms/quickstart.py`; `trl-tms` without arguments runs the
same job.
"""

import os
import sys

if "--model" not in " ".join(sys.argv):
    # The default run is fully offline: make sure no library tries the Hub (this must precede their imports).
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

from trl_tms.quickstart import main  # noqa: E402

if __name__ == "__main__":
    main(sys.argv[1:])
