"""megatron_k15: Megatron-style model-parallel RL training (Kimi k1.5) for Llama/Qwen2/Qwen3-family LMs."""

__version__ = "0.1.0"

from megatron_k15 import _startup

_startup.install()
