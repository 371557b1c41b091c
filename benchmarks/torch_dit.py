"""A PyTorch DiT (Peebles & Xie 2023, "Scalable Diffusion Models with Transformers") for benchmarks.

Written from the paper's description, not from its code: a conv patch embedding, a fixed 2D
sin-cos position embedding, a sinusoidal timestep embedding with an MLP, a label embedding with
one extra (null) class for classifier-free guidance, N adaLN-Zero blocks, a final adaLN layer and
a linear projection back to patches. Widths, depths and heads are given by the caller (the
benchmarks pass rpe2d's `VARIANTS`), so this file needs only torch.

`train_step` is the same objective as rpe2d's: rectified flow, x_t = (1 - t) x + t noise with a
logit-normal t, the network regresses the velocity noise - x; then clip the gradient norm, AdamW
and an EMA of the parameters.
"""

import math

import torch
from torch import nn
import torch.nn.functional as F


def sincos_1d(dim: int, positions: torch.Tensor) -> torch.Tensor:
  """(len(positions), dim) features: sin of positions x omega for dim/2 frequencies, then cos."""
  omega = 1.0 / 10000.0 ** (torch.arange(dim // 2, dtype=torch.float64) / (dim / 2))
  angles = positions.to(torch.float64)[:, None] * omega[None]
  return torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)


def sincos_2d(dim: int, height: int, width: int) -> torch.Tensor:
  """(height * width, dim) fixed embedding: half the channels encode the row, half the column."""
  rows, cols = torch.meshgrid(torch.arange(height), torch.arange(width), indexing='ij')
  table = torch.cat([sincos_1d(dim // 2, rows.reshape(-1)), sincos_1d(dim // 2, cols.reshape(-1))],
                    dim=1)
  return table.to(torch.float32)


def timestep_features(t: torch.Tensor, dim: int = 256, max_period: float = 10000.0):
  """Sinusoidal features of t in [0, 1], stretched to [0, 1000] as the paper's integer steps."""
  half = dim // 2
  freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32) / half)
  args = 1000.0 * t.to(torch.float32)[:, None] * freqs[None]
  return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def modulate(x, shift, scale):
  return x * (1 + scale[:, None]) + shift[:, None]


class Block(nn.Module):
  """adaLN-Zero: the conditioning gives shift, scale and gate for attention and MLP; zero-initialised
  so the block starts as the identity."""

  def __init__(self, width: int, heads: int, mlp_ratio: float = 4.0):
    super().__init__()
    self.heads = heads
    self.norm1 = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
    self.qkv = nn.Linear(width, 3 * width)
    self.proj = nn.Linear(width, width)
    self.norm2 = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
    hidden = int(width * mlp_ratio)
    self.mlp = nn.Sequential(nn.Linear(width, hidden), nn.GELU(approximate='tanh'),
                             nn.Linear(hidden, width))
    self.adaLN = nn.Sequential(nn.SiLU(), nn.Linear(width, 6 * width))
    nn.init.zeros_(self.adaLN[1].weight)
    nn.init.zeros_(self.adaLN[1].bias)

  def attention(self, x):
    batch, tokens, width = x.shape
    qkv = self.qkv(x).reshape(batch, tokens, 3, self.heads, width // self.heads)
    q, k, v = qkv.permute(2, 0, 3, 1, 4)  # each (batch, heads, tokens, head_dim)
    out = F.scaled_dot_product_attention(q, k, v)
    return self.proj(out.transpose(1, 2).reshape(batch, tokens, width))

  def forward(self, x, c):
    shift_a, scale_a, gate_a, shift_m, scale_m, gate_m = self.adaLN(c).chunk(6, dim=-1)
    x = x + gate_a[:, None] * self.attention(modulate(self.norm1(x), shift_a, scale_a))
    return x + gate_m[:, None] * self.mlp(modulate(self.norm2(x), shift_m, scale_m))


class DiT(nn.Module):
  """v(x_t, t, label) for images (batch, channels, height, width) of one fixed size."""

  def __init__(self, *, width: int, depth: int, heads: int, patch: int, channels: int,
               image_size: int, num_classes: int, mlp_ratio: float = 4.0):
    super().__init__()
    self.patch, self.channels, self.num_classes = patch, channels, num_classes
    self.grid = image_size // patch
    self.patch_embed = nn.Conv2d(channels, width, patch, stride=patch)
    self.register_buffer('pos_embed', sincos_2d(width, self.grid, self.grid)[None],
                         persistent=False)
    self.t_embed = nn.Sequential(nn.Linear(256, width), nn.SiLU(), nn.Linear(width, width))
    self.label_embed = nn.Embedding(num_classes + 1, width)  # id num_classes: the null class
    self.blocks = nn.ModuleList(Block(width, heads, mlp_ratio) for _ in range(depth))
    self.final_norm = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
    self.final_adaLN = nn.Sequential(nn.SiLU(), nn.Linear(width, 2 * width))
    self.final_proj = nn.Linear(width, patch * patch * channels)
    self._init_weights()

  def _init_weights(self):
    for module in self.modules():
      if isinstance(module, nn.Linear):
        nn.init.xavier_uniform_(module.weight)
        nn.init.zeros_(module.bias)
    nn.init.xavier_uniform_(self.patch_embed.weight.view(self.patch_embed.weight.shape[0], -1))
    nn.init.zeros_(self.patch_embed.bias)
    nn.init.normal_(self.label_embed.weight, std=0.02)
    for layer in (self.t_embed[0], self.t_embed[2]):
      nn.init.normal_(layer.weight, std=0.02)
    for block in self.blocks:  # xavier above overwrote the zero gates
      nn.init.zeros_(block.adaLN[1].weight)
      nn.init.zeros_(block.adaLN[1].bias)
    for layer in (self.final_adaLN[1], self.final_proj):
      nn.init.zeros_(layer.weight)
      nn.init.zeros_(layer.bias)

  def forward(self, x, t, labels):
    batch = x.shape[0]
    tokens = self.patch_embed(x).flatten(2).transpose(1, 2) + self.pos_embed
    c = self.t_embed(timestep_features(t)) + self.label_embed(labels)
    for block in self.blocks:
      tokens = block(tokens, c)
    shift, scale = self.final_adaLN(c).chunk(2, dim=-1)
    out = self.final_proj(modulate(self.final_norm(tokens), shift, scale))
    p, g = self.patch, self.grid
    out = out.reshape(batch, g, g, p, p, self.channels)
    return torch.einsum('nhwpqc->nchpwq', out).reshape(batch, self.channels, g * p, g * p)


def autocast(dtype: torch.dtype):
  """PyTorch's CPU mixed precision for a compute dtype other than float32; else nothing."""
  return torch.autocast('cpu', dtype=dtype, enabled=dtype != torch.float32)


class Trainer:
  """AdamW on the rectified-flow velocity loss, with gradient clipping and an EMA."""

  def __init__(self, model: DiT, *, learning_rate=1e-4, grad_clip=1.0, ema_decay=0.9999,
               class_dropout=0.1, compute_dtype=torch.float32):
    self.model, self.grad_clip, self.ema_decay = model, grad_clip, ema_decay
    self.compute_dtype = compute_dtype
    self.class_dropout = class_dropout
    self.params = [p for p in model.parameters() if p.requires_grad]
    # weight_decay 0 and eps 1e-8: the project's optimizer (optax.adamw with weight_decay=0).
    self.optimizer = torch.optim.AdamW(self.params, lr=learning_rate, betas=(0.9, 0.999),
                                       eps=1e-8, weight_decay=0.0, foreach=True)
    self.ema = [p.detach().clone() for p in self.params]

  def loss(self, images, labels):
    batch = images.shape[0]
    t = torch.sigmoid(torch.randn(batch))  # logit-normal(0, 1)
    noise = torch.randn_like(images)
    drop = torch.rand(batch) < self.class_dropout
    labels = torch.where(drop, torch.full_like(labels, self.model.num_classes), labels)
    t_ = t[:, None, None, None]
    x_t = (1 - t_) * images + t_ * noise
    with autocast(self.compute_dtype):
      prediction = self.model(x_t, t, labels)
    return F.mse_loss(prediction.float(), noise - images)

  def step(self, images, labels) -> torch.Tensor:
    self.optimizer.zero_grad(set_to_none=True)
    loss = self.loss(images, labels)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(self.params, self.grad_clip)
    self.optimizer.step()
    with torch.no_grad():
      torch._foreach_lerp_(self.ema, self.params, 1.0 - self.ema_decay)
    return loss.detach()
