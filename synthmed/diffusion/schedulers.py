"""Noise schedules: the one a model trains with, and the samplers for generation built from its config.

Two families. Diffusion (DDPM betas; epsilon or v prediction, optionally rescaled to zero terminal SNR,
Lin et al. 2024): the samplers keep the trained betas and prediction type; only the solver differs.
Rectified flow (flow matching, as SD 3 and MONAI's MAISI train): x_t = (1 - s) x0 + s noise on a straight
line, the model predicts the velocity noise - x0, and its timestep input is s * num_train_timesteps; the
noise levels s can be shifted toward the noisy end (shift > 1) or the clean end (shift < 1).
"""

from __future__ import annotations

import torch
from diffusers import (DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler,
                       FlowMatchEulerDiscreteScheduler)

SAMPLERS = {
    "ddim": (DDIMScheduler, {}),
    "dpmpp": (DPMSolverMultistepScheduler, {"algorithm_type": "dpmsolver++", "solver_order": 2}),
    "euler": (EulerDiscreteScheduler, {}),
    "ddpm": (DDPMScheduler, {}),  # stochastic: its noise comes from each image's own generator
}
FLOW_SAMPLERS = ("euler", "dpmpp")


def is_flow(scheduler) -> bool:
    """Whether a scheduler (or its config) is of a rectified-flow model."""
    config = getattr(scheduler, "config", scheduler)
    # FlowMatchEulerDiscreteScheduler's config has a shift and no betas; DPM-Solver's flow mode names itself
    return ("shift" in config and "beta_start" not in config) or config.get("prediction_type") == "flow_prediction"


def make_sampler(name: str, config):
    """A sampler of kind ``name`` (ddim | dpmpp | euler | ddpm) over the same noise schedule; a flow model's
    sampler is its Euler or DPM-Solver++ (flow sigmas) with the trained shift."""
    if name not in SAMPLERS:
        raise ValueError(f"unknown scheduler {name!r}; use one of: {', '.join(SAMPLERS)}")
    if is_flow(config):
        shift = config.get("shift", config.get("flow_shift", 1.0))
        steps = config["num_train_timesteps"]
        if name == "euler":
            return FlowMatchEulerDiscreteScheduler(num_train_timesteps=steps, shift=shift)
        if name == "dpmpp":
            return DPMSolverMultistepScheduler(num_train_timesteps=steps, use_flow_sigmas=True, flow_shift=shift,
                                               prediction_type="flow_prediction", algorithm_type="dpmsolver++",
                                               solver_order=2)
        raise ValueError(f"scheduler {name!r} cannot sample a rectified-flow model; use one of: "
                         f"{', '.join(FLOW_SAMPLERS)}")
    cls, extra = SAMPLERS[name]
    return cls.from_config(config, **extra)


def make_noise_scheduler(num_train_timesteps: int, prediction_type: str = "epsilon",
                         beta_schedule: str = "scaled_linear", zero_terminal_snr: bool = False,
                         flow_shift: float = 1.0):
    """The training noise schedule: Stable Diffusion's scaled-linear betas by default; ``prediction_type``
    "flow": rectified flow with noise levels shifted by ``flow_shift``."""
    if prediction_type == "flow":
        return FlowMatchEulerDiscreteScheduler(num_train_timesteps=num_train_timesteps, shift=flow_shift)
    if zero_terminal_snr and prediction_type != "v_prediction":
        raise ValueError("zero_terminal_snr needs prediction_type v_prediction: at zero SNR the noise says "
                         "nothing about the image, so an epsilon model cannot be trained there")
    # trailing spacing: the samplers start at the last (pure-noise) timestep, which zero terminal SNR trains
    return DDPMScheduler(num_train_timesteps=num_train_timesteps, beta_schedule=beta_schedule,
                         beta_start=0.00085, beta_end=0.012, prediction_type=prediction_type,
                         clip_sample=False, rescale_betas_zero_snr=zero_terminal_snr,
                         timestep_spacing="trailing" if zero_terminal_snr else "leading")


def training_scheduler(sampler):
    """The training schedule behind a saved model's sampler (for fine-tuning it)."""
    if is_flow(sampler):  # a flow model's Euler sampler is its training schedule too
        return make_sampler("euler", sampler.config)
    return DDPMScheduler.from_config(sampler.config)


def default_sampler(scheduler):
    """The sampler a trained model is saved with: DDIM, or Euler for a flow model."""
    return make_sampler("euler" if is_flow(scheduler) else "ddim", scheduler.config)


def flow_sigma(scheduler, t: torch.Tensor) -> torch.Tensor:
    """A flow model's noise level s of timestep input t = s * num_train_timesteps."""
    return torch.as_tensor(t, dtype=torch.float64).reshape(-1).cpu() / scheduler.config.num_train_timesteps


def training_timesteps(scheduler, n: int, generator: torch.Generator) -> torch.Tensor:
    """n timesteps drawn uniformly; a flow model's as its shifted noise level times num_train_timesteps
    (the same draws from ``generator`` either way)."""
    steps = scheduler.config.num_train_timesteps
    t = torch.randint(steps, (n,), generator=generator)
    if not is_flow(scheduler):
        return t
    u = (t.double() + 1) / steps  # (0, 1]: never the clean image itself
    shift = scheduler.config.shift
    return (shift * u / (1 + (shift - 1) * u) * steps).float()
