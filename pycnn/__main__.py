import sys

from pycnn.training.cli import main

sys.exit(main())
