import sys

from clawbot.cli import main

sys.exit(main())
