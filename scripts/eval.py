"""python scripts/eval.py ARGS is `bitnet eval ARGS` (see `bitnet eval --help`)."""
import sys

from bitnet.cli import main

sys.exit(main(["eval", *sys.argv[1:]]))
