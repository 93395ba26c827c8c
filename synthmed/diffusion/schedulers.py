"""Samplers for generation, built from the training noise schedule's config.

All of them keep the trained betas and prediction type; only the solver differs.
"""

from __future__ import annotations

from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler

SAMPLERS = {
    "ddim": (DDIMScheduler, {}),
    "dpmpp": (DPMSolverMultistepScheduler, {"algorithm_type": "dpmsolver++", "solver_order": 2}),
    "euler": (EulerDiscreteScheduler, {}),
    "ddpm": (DDPMScheduler, {}),  # stochastic: its noise comes from each image's own generator
}


def make_sampler(name: str, config):
    """A sampler of kind ``name`` (ddim | dpmpp | euler | ddpm) over the same noise schedule."""
    if name not in SAMPLERS:
        raise ValueError(f"unknown scheduler {name!r}; use one of: {', '.join(SAMPLERS)}")
    cls, extra = SAMPLERS[name]
    return cls.from_config(config, **extra)
