"""What the network predicts, and how rpe2d's flow state reaches it
(docs/methods.md#model-parameterisations).

rpe2d's samplers and loss speak flow matching: a state z_t = (1 - t) x0 + t eps at flow time t and
the velocity eps - x0. A parameterisation is a small pure wrapper around the network, chosen by
name (`model.prediction`): it maps (z, t) to the network's input and time, and the network's output
back to that velocity, so every sampler, guidance rule and position method works on any of them.
The time it hands the network is multiplied by `model.time_scale` before the sinusoidal features.
"""

import dataclasses

from rpe2d import ddpm


@dataclasses.dataclass(frozen=True)
class Velocity:
  """The network predicts the velocity at the flow time itself (rpe2d's own models, SiT)."""
  time_range: tuple[float, float] = (0.0, 1.0)

  def inputs(self, z, t):
    return z, t

  def velocity(self, output, z, t):
    del z, t
    return output


@dataclasses.dataclass(frozen=True)
class DDPMEpsilon:
  """DiT: epsilon on the discrete linear-beta DDPM, at the fractional index of equal log-SNR
  (rpe2d.ddpm). Covers t in ddpm.time_range() only; samplers start and stop inside it."""
  time_range: tuple[float, float] = ddpm.time_range()

  def inputs(self, z, t):
    return ddpm.network_input(z, t), ddpm.fractional_index(t)

  def velocity(self, output, z, t):
    return ddpm.velocity(output, z, t)


PREDICTIONS = {'velocity': Velocity(), 'ddpm_epsilon': DDPMEpsilon()}
