"""launch-agent: the daemon on every node (store, revision log, jobs, the Unix socket)."""

__version__ = "0.1.0"
