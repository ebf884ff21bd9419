import sys

from alps_ds.cli import main

# Guarded: multiprocessing's spawn start method re-imports the main script in its children
# (megatron-core's checkpoint writer starts a spawn Manager); unguarded, each child ran the CLI again.
if __name__ == "__main__":
    sys.exit(main())
