"""GRPO trainer of the coordinator: loss (B.9), packing (B.11), optimizer (B.10), checkpoints (B.8).

Import the submodules directly; this package root stays free of torch so configs parse fast:
`from intellect.coordinator.trainer.trainer import GRPOTrainer`,
`from intellect.coordinator.trainer.config import TrainerConfig, LossConfig`.
"""
