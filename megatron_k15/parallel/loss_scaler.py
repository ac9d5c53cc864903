"""Loss scaling for fp16 training (Megatron-LM's ``--loss-scale`` / dynamic grad scaler).

fp16 has 5 exponent bits: gradients below ~6e-8 flush to zero and above 65504 overflow. The
loss is multiplied by a scale S before backward, so every gradient in the graph is S times
larger and stays in range; the optimizer divides S out of its fp32 gradient shards before
the norm, the clip and Adam, so the update is the one of an unscaled fp32 backward.

A step whose gradients hold an inf or NaN (the global norm is not finite, the same on every
rank) is skipped. The dynamic scaler then backs off, and grows again after a run of clean steps:

    overflow:  growth_tracker = 0; hysteresis_tracker -= 1;
               if hysteresis_tracker <= 0: S = max(S * backoff_factor, min_scale)
    clean:     growth_tracker += 1;
               if growth_tracker == growth_interval:
                   growth_tracker = 0; hysteresis_tracker = hysteresis; S = S * growth_factor

bf16 keeps fp32's exponent range and needs none of this (Megatron-LM scales only fp16).
RL in fp16 is a recipe of its own: its 10 mantissa bits make the trainer's log-probs agree
more closely with the rollout's than bf16's 7 do.
"""

from __future__ import annotations

from typing import Optional


class ConstantLossScaler:
    """A fixed scale (``--loss-scale S``). Overflowing steps are skipped; the scale stays."""

    def __init__(self, scale: float):
        if not scale > 0:
            raise ValueError(f"a loss scale must be > 0, got {scale}")
        self.scale = float(scale)

    def update(self, found_inf: bool) -> None:
        """Record a step's outcome (``found_inf``: it overflowed and was skipped)."""

    @property
    def can_back_off(self) -> bool:
        """Whether overflows can still lower the scale (False: skipping a step changes nothing,
        the next one overflows the same way)."""
        return False

    def state_dict(self) -> dict:
        return {"scale": self.scale}

    def load_state_dict(self, state: dict) -> None:
        self.scale = float(state["scale"])


class DynamicLossScaler(ConstantLossScaler):
    """Megatron-LM's dynamic scaler (its defaults: start at 2^32, halve after ``hysteresis``
    overflows, double after ``growth_interval`` clean steps, never below ``min_scale``)."""

    def __init__(self, initial_scale: float = 2.0 ** 32, min_scale: float = 1.0, growth_factor: float = 2.0,
                 backoff_factor: float = 0.5, growth_interval: int = 1000, hysteresis: int = 2):
        super().__init__(initial_scale)
        if not 0 < min_scale <= initial_scale:
            raise ValueError(f"min scale must be in (0, initial scale {initial_scale}], got {min_scale}")
        if not growth_factor > 1 or not 0 < backoff_factor < 1:
            raise ValueError(f"need growth factor > 1 and backoff factor in (0, 1), got {growth_factor}, "
                             f"{backoff_factor}")
        if growth_interval < 1 or hysteresis < 1:
            raise ValueError(f"growth interval and hysteresis must be >= 1, got {growth_interval}, {hysteresis}")
        self.min_scale, self.growth_factor, self.backoff_factor = float(min_scale), growth_factor, backoff_factor
        self.growth_interval, self.hysteresis = growth_interval, hysteresis
        self.growth_tracker = 0
        self.hysteresis_tracker = hysteresis

    def update(self, found_inf: bool) -> None:
        if found_inf:
            self.growth_tracker = 0
            self.hysteresis_tracker -= 1
            if self.hysteresis_tracker <= 0:
                self.scale = max(self.scale * self.backoff_factor, self.min_scale)
        else:
            self.growth_tracker += 1
            if self.growth_tracker == self.growth_interval:
                self.growth_tracker = 0
                self.hysteresis_tracker = self.hysteresis
                self.scale *= self.growth_factor

    @property
    def can_back_off(self) -> bool:
        return self.scale > self.min_scale

    def state_dict(self) -> dict:
        return {"scale": self.scale, "growth_tracker": self.growth_tracker,
                "hysteresis_tracker": self.hysteresis_tracker}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.growth_tracker = int(state.get("growth_tracker", 0))
        self.hysteresis_tracker = int(state.get("hysteresis_tracker", self.hysteresis))


def loss_scaler_from_args(args) -> Optional[ConstantLossScaler]:
    """The scaler the flags ask for: none unless ``--fp16``; ``--loss-scale S`` a constant one,
    else a dynamic one from ``--initial-loss-scale``, ``--min-loss-scale``,
    ``--loss-scale-window`` and ``--hysteresis``."""
    if not getattr(args, "fp16", False):
        return None
    if getattr(args, "loss_scale", None) is not None:
        return ConstantLossScaler(args.loss_scale)
    return DynamicLossScaler(initial_scale=getattr(args, "initial_loss_scale", 2.0 ** 32),
                             min_scale=getattr(args, "min_loss_scale", 1.0),
                             growth_interval=getattr(args, "loss_scale_window", 1000),
                             hysteresis=getattr(args, "hysteresis", 2))
