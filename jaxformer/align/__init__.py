"""Learning from preferences: losses (losses.py): DPO / IPO / hinge, SimPO, Bradley-Terry reward models, GRPO, RLOO
and PPO, each matching the corresponding TRL trainer's numerics (tests/test_align_losses.py checks them against
tests/fixtures/align/reference.json, made with TRL itself)."""
