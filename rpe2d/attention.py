"""Attention kernels: one registry of interchangeable implementations, read by config and model.

Every kernel takes q, k, v of shape (batch, tokens, heads, head_dim) and a logit scale, and
returns (batch, tokens, heads, head_dim).
"""

import jax


def _xla(q, k, v, *, scale):
  return jax.nn.dot_product_attention(q, k, v, scale=scale, implementation='xla')


def _cudnn(q, k, v, *, scale):
  return jax.nn.dot_product_attention(q, k, v, scale=scale, implementation='cudnn')


KERNELS = {'xla': _xla, 'cudnn': _cudnn}


def attend(q, k, v, *, scale, kernel: str = 'xla'):
  """softmax(scale * q k^T) v with the named kernel."""
  return KERNELS[kernel](q, k, v, scale=scale)
