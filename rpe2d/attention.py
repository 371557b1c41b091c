"""Attention kernels: one registry of interchangeable implementations, read by config and model
(docs/methods.md#attention-kernels).

Every kernel takes q, k, v of shape (batch, tokens, heads, head_dim) (the layout of
`jax.nn.dot_product_attention`) and a logit scale, and returns (batch, tokens, heads, head_dim) in
q's dtype. `KERNELS` maps each `model.attention_implementation` name to a `Kernel`, which is
callable as `fn(q, k, v, *, scale)` and knows the platforms it runs on; `check_kernel` turns a
name the platform lacks into a one-line error.

The platform is that of the devices a program is compiled for (`target_platform`): the context
mesh's (`jax.set_mesh`, which the train step and the sampler set), so a CPU host compiling for a TPU
topology picks the TPU kernels and paths. A kernel XLA cannot partition (splash) runs under
`jax.shard_map` over that mesh: the batch split over the mesh axes that divide it, the heads over
the rest.
"""

import dataclasses
import functools
import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import PartitionSpec as P

# Default block sizes of the chunked kernel: a (q_chunk x kv_chunk) f32 score block per head is
# the largest intermediate, 2 MiB per head at 512 x 1024.
Q_CHUNK = 512
KV_CHUNK = 1024
# Splash attention: tokens are padded to a multiple of SPLASH_MIN_BLOCK (the TPU lane width) and
# the block is the largest of SPLASH_BLOCKS that divides the padded count.
SPLASH_MIN_BLOCK = 128
SPLASH_BLOCKS = (512, 256, 128)

# What check_kernel says a platform is, in the words of an error message.
PLATFORM_NEEDS = {'cpu': 'a CPU', 'cuda': 'an NVIDIA GPU', 'rocm': 'an AMD GPU', 'tpu': 'a TPU'}


@dataclasses.dataclass(frozen=True)
class Kernel:
  """One attention implementation: `fn(q, k, v, *, scale)` and the platforms it runs on
  (names from `current_platform`)."""
  fn: Callable
  platforms: tuple[str, ...]

  def __call__(self, q, k, v, *, scale):
    return self.fn(q, k, v, scale=scale)


def current_platform() -> str:
  """The default backend as 'cpu', 'cuda', 'rocm' or 'tpu' (jax calls both GPU kinds 'gpu')."""
  device = jax.devices()[0]
  if device.platform != 'gpu':
    return device.platform
  return 'rocm' if 'rocm' in device.client.platform_version.lower() else 'cuda'


def target_platform() -> str:
  """The platform of the devices the program being traced is compiled for, named as by
  `current_platform`: the context mesh's (`jax.set_mesh`) when there is one, else this process's.

  A CPU host compiling for a TPU topology (benchmarks/tpu_compile.py) thus gets 'tpu'.
  """
  device = jax.sharding.get_abstract_mesh().abstract_device
  if device is None:
    return current_platform()
  if device.platform not in ('gpu', 'cuda', 'rocm'):
    return device.platform
  if current_platform() in ('cuda', 'rocm'):  # the mesh's GPUs are this process's
    return current_platform()
  return 'rocm' if 'amd' in device.device_kind.lower() else 'cuda'


def _context_mesh():
  """The context mesh (`jax.set_mesh`) when it spans more than one device, else None."""
  mesh = jax.sharding.get_abstract_mesh()
  return None if mesh.empty or mesh.size == 1 else mesh


def shard_split(mesh, batch: int, heads: int) -> tuple[tuple[str, ...], tuple[str, ...]]:
  """(the mesh axes the batch splits over, those the heads split over) for a kernel under
  shard_map: each axis in mesh order goes to the batch while the batch stays divisible, then to
  the heads likewise; an axis that divides neither computes the same values on each of its
  devices."""
  batch_axes, head_axes, batch_split, head_split = [], [], 1, 1
  for name, size in mesh.shape.items():
    if size == 1:
      continue
    if batch % (batch_split * size) == 0:
      batch_axes.append(name)
      batch_split *= size
    elif heads % (head_split * size) == 0:
      head_axes.append(name)
      head_split *= size
  return tuple(batch_axes), tuple(head_axes)


def shard_over_mesh(fn, q, k, v):
  """fn(q, k, v) -> out, all (batch, tokens, heads, d), run per device under `jax.shard_map` over
  the context mesh (batch and heads split by `shard_split`); called as is without one. For kernels
  XLA cannot partition (a Pallas call is opaque to it)."""
  mesh = _context_mesh()
  if mesh is None:
    return fn(q, k, v)
  batch_axes, head_axes = shard_split(mesh, q.shape[0], q.shape[2])
  spec = P(batch_axes or None, None, head_axes or None, None)
  # check_vma=False: a Pallas call's outputs carry no varying-axes type to check.
  return jax.shard_map(fn, mesh=mesh, in_specs=(spec, spec, spec), out_specs=spec,
                       check_vma=False)(q, k, v)


# --- xla ------------------------------------------------------------------------------------------

def xla(q, k, v, *, scale):
  """The full (tokens x tokens) scores in plain XLA ops, heads-major.

  The logits accumulate in float32 and the softmax runs in float32, so bfloat16 inputs lose
  nothing there; the probabilities are cast to v's dtype for the product with v, which also
  accumulates in float32. These are the semantics of
  `jax.nn.dot_product_attention(implementation='xla')`, written out with their own backward (the
  softmax's, from the saved probabilities) so that every dot, forward and backward, accumulates in
  float32: XLA:CPU runs bfloat16 dots on its fast path only then (autodiff's backward dots return
  bfloat16), and contracting straight from (batch, tokens, heads, d) made it copy the N x N
  probabilities into a transposed layout.
  """
  try:
    scale = float(scale)
  except TypeError:  # a traced scale: fold it into q so autodiff sees it, keep the kernel static
    q, scale = (q * scale).astype(q.dtype), 1.0
  return _xla_attention(q, k, v, scale)


# On CPU, past this size of the whole batch's scores (bytes, float32), an undifferentiated call
# (sampling) runs one (example, head) at a time: its scores then stay in cache instead of making
# several trips through memory (-30% at 1,024 tokens with S/2 at batch 8, 200 MB of scores).
CPU_PER_HEAD_ABOVE = 32 * 2**20


def _heads_major(x):  # (batch, tokens, heads, d) -> (batch, heads, tokens, d)
  return x.transpose(0, 2, 1, 3)


def _probabilities(q, k, scale):  # (..., N_q, d) x (..., N_k, d) -> float32 (..., N_q, N_k)
  logits = jnp.einsum('...qd,...kd->...qk', q, k, preferred_element_type=jnp.float32) * scale
  return jax.nn.softmax(logits, axis=-1)


def _weighted_values(probs, v):  # (..., N_q, N_k) x (..., N_k, d) -> (..., N_q, d) in v's dtype
  out = jnp.einsum('...qk,...kd->...qd', probs.astype(v.dtype), v,
                   preferred_element_type=jnp.float32)
  return out.astype(v.dtype)


def _per_head_attention(q, k, v, scale):
  """The same values as `_xla_forward`, one (example, head) at a time (`lax.map`)."""
  batch, tokens, heads, d = q.shape

  def one_head(qkv):  # each (N, d)
    q1, k1, v1 = qkv
    return _weighted_values(_probabilities(q1, k1, scale), v1)

  flat = [_heads_major(x).reshape(batch * heads, -1, d) for x in (q, k, v)]
  out = lax.map(one_head, flat)                                             # (batch*heads, N, d)
  return out.reshape(batch, heads, tokens, d).transpose(0, 2, 1, 3)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _xla_attention(q, k, v, scale):
  batch, tokens, heads, _ = q.shape
  if (target_platform() == 'cpu'
      and 4 * batch * heads * tokens * k.shape[1] > CPU_PER_HEAD_ABOVE):
    return _per_head_attention(q, k, v, scale)
  return _xla_forward(q, k, v, scale)[0]


def _xla_forward(q, k, v, scale):
  probs = _probabilities(_heads_major(q), _heads_major(k), scale)           # (batch, heads, N, N)
  out = _heads_major(_weighted_values(probs, _heads_major(v)))              # (batch, N, heads, d)
  return out, (q, k, v, probs)


def _xla_backward(scale, residuals, g):
  q, k, v, probs = residuals                          # q, k, v, g: (batch, N, heads, d)

  def dot(spec, a, b):
    return jnp.einsum(spec, a, b, preferred_element_type=jnp.float32)

  dv = dot('bhqk,bqhd->bkhd', probs.astype(v.dtype), g)
  d_probs = dot('bqhd,bkhd->bhqk', g, v)                                    # float32
  # The softmax's backward; the scale folds into the logits' gradient.
  d_logits = probs * (d_probs - jnp.sum(probs * d_probs, axis=-1, keepdims=True)) * scale
  d_logits = d_logits.astype(q.dtype)
  dq = dot('bhqk,bkhd->bqhd', d_logits, k)
  dk = dot('bhqk,bqhd->bkhd', d_logits, q)
  return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype)


_xla_attention.defvjp(_xla_forward, _xla_backward)


# --- cudnn ----------------------------------------------------------------------------------------

def cudnn(q, k, v, *, scale):
  """cuDNN flash attention through `jax.nn.dot_product_attention(implementation='cudnn')`."""
  if q.dtype not in (jnp.bfloat16, jnp.float16):
    raise ValueError(f"attention kernel 'cudnn' takes bfloat16 or float16 q, k, v; got {q.dtype} "
                     "(set model.dtype='bfloat16' or choose xla or chunked)")
  return jax.nn.dot_product_attention(q, k, v, scale=scale, implementation='cudnn')


# --- splash ---------------------------------------------------------------------------------------

def splash(q, k, v, *, scale, interpret: bool = False):
  """TPU splash attention (Pallas), full non-causal mask, one kernel call per example (vmap).

  Under a context mesh of several devices the kernel runs per device inside `jax.shard_map`
  (`shard_over_mesh`): XLA cannot partition a Mosaic kernel itself. Tokens are zero-padded to a
  multiple of `SPLASH_MIN_BLOCK`; the padding gets segment id 1 and the real tokens id 0, so no real
  query sees a padded key. `interpret=True` runs the same kernel in the Pallas interpreter on any
  backend (slow; for tests).
  """
  if k.shape[1] != q.shape[1]:
    raise ValueError(f"attention kernel 'splash' is self-attention only: {q.shape[1]} query tokens "
                     f"vs {k.shape[1]} key tokens")
  # The kernel has no logit scale: fold it into q (in float32, then back to q's dtype).
  q_scaled = (q.astype(jnp.float32) * scale).astype(q.dtype)
  local = functools.partial(_splash_per_device, interpret=interpret)
  return shard_over_mesh(local, q_scaled, k, v).astype(q.dtype)


def _splash_per_device(q, k, v, *, interpret: bool):
  """Splash attention with logit scale 1 on one device's (batch, tokens, heads, d)."""
  from jax.experimental.pallas.ops.tpu import splash_attention as sa  # TPU-only module; lazy
  _, tokens, heads, _ = q.shape
  padded = -(-tokens // SPLASH_MIN_BLOCK) * SPLASH_MIN_BLOCK
  block = next(b for b in SPLASH_BLOCKS if padded % b == 0)
  blocks = sa.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block,
                         block_q_dkv=block, block_kv_dkv=block, block_kv_dkv_compute=block,
                         block_q_dq=block, block_kv_dq=block)
  mask = sa.MultiHeadMask([sa.FullMask((padded, padded))] * heads)
  kernel = sa.make_splash_mha(mask, block_sizes=blocks, head_shards=1, q_seq_shards=1,
                              interpret=interpret)

  def heads_major(x):  # (batch, tokens, heads, d) -> (batch, heads, padded, d)
    x = jnp.pad(x, ((0, 0), (0, padded - tokens), (0, 0), (0, 0)))
    return x.transpose(0, 2, 1, 3)

  segments = None
  if padded != tokens:
    ids = (jnp.arange(padded) >= tokens).astype(jnp.int32)
    segments = sa.SegmentIds(q=ids, kv=ids)
  out = jax.vmap(kernel, in_axes=(0, 0, 0, None))(heads_major(q), heads_major(k), heads_major(v),
                                                   segments)
  return out.transpose(0, 2, 1, 3)[:, :tokens]


# --- chunked --------------------------------------------------------------------------------------

def chunked(q, k, v, *, scale, q_chunk: int = Q_CHUNK, kv_chunk: int = KV_CHUNK):
  """Blockwise attention in pure JAX whose memory is O(tokens * chunk), never O(tokens^2).

  Queries go in blocks of `q_chunk` (`lax.map`), keys in blocks of `kv_chunk` (`lax.scan`) with
  an online softmax in float32 (running max, normaliser and weighted sum). The gradient is a
  `jax.custom_vjp` with the flash-attention backward: it saves only the output and the per-query
  log-sum-exp and recomputes each score block. Token counts that the chunks do not divide are
  zero-padded and the padded keys masked out. See docs/methods.md#attention-kernels.
  """
  for name, size in (('q_chunk', q_chunk), ('kv_chunk', kv_chunk)):
    if not isinstance(size, int) or size < 1:
      raise ValueError(f'chunked attention {name} must be a positive integer, got {size!r}')
  try:
    scale = float(scale)
  except TypeError:  # a traced scale: fold it into q so autodiff sees it, keep the kernel static
    q, scale = (q * scale).astype(q.dtype), 1.0
  q_chunk, kv_chunk = min(q_chunk, q.shape[1]), min(kv_chunk, k.shape[1])
  return _chunked_attention(q, k, v, scale, q_chunk, kv_chunk)


def _to_blocks(x, size: int):
  """(batch, n, ...) -> (n_blocks, batch, size, ...), zero-padded to a multiple of size."""
  pad = -x.shape[1] % size
  x = jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2))
  return x.reshape(x.shape[0], -1, size, *x.shape[2:]).swapaxes(0, 1)


def _from_blocks(x, n: int):
  """(n_blocks, batch, size, ...) -> (batch, n, ...), dropping the padding."""
  x = x.swapaxes(0, 1)
  return x.reshape(x.shape[0], -1, *x.shape[3:])[:, :n]


def _logits(q_blk, k_blk, scale, start, key_tokens):
  """Scaled float32 scores (batch, heads, q, k) of one block pair; padded keys get -inf."""
  s = jnp.einsum('bqhd,bkhd->bhqk', q_blk, k_blk, preferred_element_type=jnp.float32) * scale
  if key_tokens % k_blk.shape[1]:  # only a count the chunk does not divide has padded keys
    valid = start + jnp.arange(k_blk.shape[1]) < key_tokens
    s = jnp.where(valid, s, -jnp.inf)
  return s


def _chunked_forward(q, k, v, scale, q_chunk, kv_chunk):
  """(out, lse): out like q, lse (batch, heads, q_tokens) float32."""
  key_tokens = k.shape[1]
  k_blocks, v_blocks = _to_blocks(k, kv_chunk), _to_blocks(v, kv_chunk)
  starts = jnp.arange(k_blocks.shape[0]) * kv_chunk

  def query_block(q_blk):
    batch, size, heads, head_dim = q_blk.shape

    def key_step(carry, xs):
      m, l, acc = carry
      k_blk, v_blk, start = xs
      s = _logits(q_blk, k_blk, scale, start, key_tokens)
      # Block 0 always holds key 0, so m is finite from the first step and exp never sees inf-inf.
      m_new = jnp.maximum(m, s.max(-1))
      p = jnp.exp(s - m_new[..., None])
      correction = jnp.exp(m - m_new)
      l = l * correction + p.sum(-1)
      acc = acc * correction[..., None] + jnp.einsum(
          'bhqk,bkhd->bhqd', p.astype(v_blk.dtype), v_blk, preferred_element_type=jnp.float32)
      return (m_new, l, acc), None

    init = (jnp.full((batch, heads, size), -jnp.inf, jnp.float32),
            jnp.zeros((batch, heads, size), jnp.float32),
            jnp.zeros((batch, heads, size, head_dim), jnp.float32))
    (m, l, acc), _ = lax.scan(key_step, init, (k_blocks, v_blocks, starts))
    out = (acc / l[..., None]).transpose(0, 2, 1, 3).astype(q.dtype)
    return out, m + jnp.log(l)

  out, lse = lax.map(query_block, _to_blocks(q, q_chunk))
  return _from_blocks(out, q.shape[1]), _from_blocks(lse.swapaxes(2, 3), q.shape[1]).swapaxes(1, 2)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def _chunked_attention(q, k, v, scale, q_chunk, kv_chunk):
  return _chunked_forward(q, k, v, scale, q_chunk, kv_chunk)[0]


def _chunked_attention_fwd(q, k, v, scale, q_chunk, kv_chunk):
  out, lse = _chunked_forward(q, k, v, scale, q_chunk, kv_chunk)
  return out, (q, k, v, out, lse)


def _chunked_attention_bwd(scale, q_chunk, kv_chunk, residuals, g):
  """Flash-attention backward: with P = exp(S - lse), dV = P^T dO, dS = P * (dO V^T - delta) where
  delta = rowsum(dO * O), dQ = scale dS K, dK = scale dS^T Q. Two passes, each recomputing P one
  block at a time: dQ with queries outer, dK and dV with keys outer."""
  q, k, v, out, lse = residuals
  key_tokens = k.shape[1]
  delta = jnp.einsum('bqhd,bqhd->bhq', g.astype(jnp.float32), out.astype(jnp.float32))

  def per_query(x):  # (batch, heads, n) -> (n_blocks, batch, heads, q_chunk)
    return _to_blocks(x.swapaxes(1, 2), q_chunk).swapaxes(2, 3)

  q_blocks, g_blocks = _to_blocks(q, q_chunk), _to_blocks(g.astype(q.dtype), q_chunk)
  lse_blocks, delta_blocks = per_query(lse), per_query(delta)
  k_blocks, v_blocks = _to_blocks(k, kv_chunk), _to_blocks(v, kv_chunk)
  starts = jnp.arange(k_blocks.shape[0]) * kv_chunk

  def block_grads(q_blk, g_blk, lse_blk, delta_blk, k_blk, v_blk, start):
    p = jnp.exp(_logits(q_blk, k_blk, scale, start, key_tokens) - lse_blk[..., None])
    dp = jnp.einsum('bqhd,bkhd->bhqk', g_blk, v_blk, preferred_element_type=jnp.float32)
    return p, p * (dp - delta_blk[..., None])

  def dq_block(xs):
    q_blk, g_blk, lse_blk, delta_blk = xs

    def key_step(dq, kv):
      k_blk, v_blk, start = kv
      _, ds = block_grads(q_blk, g_blk, lse_blk, delta_blk, k_blk, v_blk, start)
      return dq + jnp.einsum('bhqk,bkhd->bqhd', ds.astype(k_blk.dtype), k_blk,
                             preferred_element_type=jnp.float32), None

    dq, _ = lax.scan(key_step, jnp.zeros(q_blk.shape, jnp.float32), (k_blocks, v_blocks, starts))
    return dq * scale

  def dkv_block(xs):
    k_blk, v_blk, start = xs

    def query_step(carry, qs):
      dk, dv = carry
      q_blk, g_blk, lse_blk, delta_blk = qs
      p, ds = block_grads(q_blk, g_blk, lse_blk, delta_blk, k_blk, v_blk, start)
      dv = dv + jnp.einsum('bhqk,bqhd->bkhd', p.astype(g_blk.dtype), g_blk,
                           preferred_element_type=jnp.float32)
      dk = dk + jnp.einsum('bhqk,bqhd->bkhd', ds.astype(q_blk.dtype), q_blk,
                           preferred_element_type=jnp.float32)
      return (dk, dv), None

    zeros = jnp.zeros(k_blk.shape, jnp.float32)
    (dk, dv), _ = lax.scan(query_step, (zeros, zeros),
                           (q_blocks, g_blocks, lse_blocks, delta_blocks))
    return dk * scale, dv

  dq = _from_blocks(lax.map(dq_block, (q_blocks, g_blocks, lse_blocks, delta_blocks)), q.shape[1])
  dk, dv = lax.map(dkv_block, (k_blocks, v_blocks, starts))
  return (dq.astype(q.dtype), _from_blocks(dk, key_tokens).astype(k.dtype),
          _from_blocks(dv, key_tokens).astype(v.dtype))


_chunked_attention.defvjp(_chunked_attention_fwd, _chunked_attention_bwd)


# --- registry -------------------------------------------------------------------------------------

KERNELS = {
    'xla': Kernel(xla, ('cpu', 'cuda', 'rocm', 'tpu')),
    'cudnn': Kernel(cudnn, ('cuda',)),
    'splash': Kernel(splash, ('tpu',)),
    'chunked': Kernel(chunked, ('cpu', 'cuda', 'rocm', 'tpu')),
}


def check_kernel(kernel: str, platform: str | None = None) -> Kernel:
  """The registry entry for `kernel`, or a one-line ValueError when the name is unknown or the
  platform (default: the one being compiled for, `target_platform`) lacks it."""
  if kernel not in KERNELS:
    raise ValueError(f'unknown model.attention_implementation={kernel!r}; choose one of: '
                     f'{", ".join(KERNELS)}')
  platform = target_platform() if platform is None else platform
  entry = KERNELS[kernel]
  if platform not in entry.platforms:
    needs = ' or '.join(PLATFORM_NEEDS.get(p, p) for p in entry.platforms)
    usable = ', '.join(name for name, e in KERNELS.items() if platform in e.platforms)
    raise ValueError(f'model.attention_implementation={kernel!r} needs {needs}; the devices it '
                     f'would run on are {platform}; choose one of: {usable}')
  return entry


def attend(q, k, v, *, scale, kernel: str = 'xla'):
  """softmax(scale * q k^T) v with the named kernel, checked once, when traced, against the
  platform the program is compiled for (`target_platform`)."""
  return check_kernel(kernel)(q, k, v, scale=scale)
