"""Hosts a run: validates submissions, keeps the ledger, trains with GRPO, publishes policies."""
