import sys

from coreslice.cli import main

sys.exit(main())
