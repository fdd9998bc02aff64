"""Train distgan: `accelerate launch launch/train.py [flags]`, or `python launch/train.py [flags]`
for one process. `--help` lists every flag."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runs from a clone, installed or not

from distgan.training.cli import main  # noqa: E402

if __name__ == "__main__":
    main()
