import sys

from alps_ds.cli import main

sys.exit(main())
