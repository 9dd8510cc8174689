"""The volunteer client: follow the run's policy, fetch its shards, generate, prove, submit."""

__version__ = "0.1.0"
