"""Noise schedules: the one a model trains with, and the samplers for generation built from its config.

All samplers keep the trained betas and prediction type; only the solver differs.
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


def make_noise_scheduler(num_train_timesteps: int, prediction_type: str = "epsilon",
                         beta_schedule: str = "scaled_linear") -> DDPMScheduler:
    """The training noise schedule (Stable Diffusion's scaled-linear betas by default)."""
    return DDPMScheduler(num_train_timesteps=num_train_timesteps, beta_schedule=beta_schedule,
                         beta_start=0.00085, beta_end=0.012, prediction_type=prediction_type,
                         clip_sample=False)


