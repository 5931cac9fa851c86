"""Workflows that chain the stages (top layer): rounds of rollout -> dump-teacher -> train-student."""
