import sys

from pycnn.cli import main

sys.exit(main())
