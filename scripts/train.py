"""python scripts/train.py ARGS is `bitnet train ARGS` (see `bitnet train --help`)."""
import sys

from bitnet.cli import main

sys.exit(main(["train", *sys.argv[1:]]))
