"""The configs of the published models that convert.py imports, without their weights.

  python benchmarks/tpu_compile.py --config=configs/published.py:fitv2-xl2 --programs=sampler \
      --topology=v5e-8 --resolutions=256,512

Each is the config `convert.py --family=<family>` writes for the published file (rpe2d.families:
the blocks, positions, time and prediction conventions and published sampler settings), built
from the architecture the file's shapes give, so a published model's programs can be compiled or
measured before (or without) downloading it. Sampling needs the weights: import them with
convert.py.
"""

from rpe2d.families import common, dit, fitv2, lightningdit, sit

_XL2 = dict(width=1152, depth=28, patch=2, channels=4, grid=16, num_classes=1000, mlp_hidden=4608)

# name: (the family that imports the published file, the architecture its shapes give)
PUBLISHED = {
    'dit-xl2': (dit, common.DiTArchitecture(out_channels=8, **_XL2)),  # DiT-XL-2-256x256.pt
    'sit-xl2': (sit, common.DiTArchitecture(out_channels=4, **_XL2)),  # SiT-XL-2-256x256.pt
    'fitv2-xl2': (fitv2, fitv2.FiTArchitecture(  # FiTv2_XL/model_ema.safetensors
        width=1152, depth=36, patch=2, num_classes=1000, mlp_hidden=3072, adaln_rank=288)),
    'lightningdit-xl1': (lightningdit, lightningdit.LightningArchitecture(  # ...-800ep.pt
        width=1152, depth=28, patch=1, channels=32, out_channels=32, grid=16, head_dim=72,
        num_classes=1000, mlp_hidden=3072)),
}


def get_config(name=None):
  if name not in PUBLISHED:
    raise ValueError(f'configs/published.py:{name}: allowed: {", ".join(PUBLISHED)}')
  family, arch = PUBLISHED[name]
  return family.config(arch)
