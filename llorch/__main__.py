import sys

from llorch.cli import main

sys.exit(main())
