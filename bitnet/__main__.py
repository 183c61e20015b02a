import sys

from bitnet.cli import main

sys.exit(main())
