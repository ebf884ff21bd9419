"""Multi-node launch glue: hostfiles and SLURM node lists, launcher argv, MPI rank discovery, pre-flight checks.

Nothing here builds a shell string: every command is an argv list, so host names and paths
are never interpreted by a shell.
"""
