import sys

from synthesis.cli import main

sys.exit(main())
