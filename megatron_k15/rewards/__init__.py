"""Verifiable rewards: math answer checking, a sandboxed code runner, and the registry."""

from megatron_k15.rewards.registry import (compute_reward, get_reward_fn, register,
                                           registered_tasks, score_batch, unregister)

__all__ = ["compute_reward", "get_reward_fn", "register", "registered_tasks", "score_batch",
           "unregister"]
