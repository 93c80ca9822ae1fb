"""The LLMOS kernel process: actors, the process table, the scheduler and syscall dispatch."""

__version__ = "0.1.0"
