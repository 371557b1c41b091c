"""The attention-kernel registry: every kernel this CPU runs against a float64 reference (values)
and autodiff of a plain einsum-softmax (gradients), the chunked kernel's memory bound, and the
one-line refusals."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import jaxpr_equations
from rpe2d import attention, positions, training
from rpe2d import config as config_lib

HEADS, HEAD_DIM, SCALE = 3, 16, 0.3
# Small chunks so a few hundred tokens span several query and key blocks: 192 is a multiple of
# both, 200 of neither (padded queries and masked keys).
Q_CHUNK, KV_CHUNK = 64, 48
CPU_KERNELS = {
    'xla': attention.xla,
    'chunked': functools.partial(attention.chunked, q_chunk=Q_CHUNK, kv_chunk=KV_CHUNK),
    'chunked_default': attention.chunked,  # one block: the chunks clip to the token count
    'splash': functools.partial(attention.splash, interpret=True),  # Pallas interpreter
}
# splash pads to a multiple of 128 tokens: 128 needs none, 200 does.
TOKEN_COUNTS = {'xla': (200,), 'chunked': (192, 200), 'chunked_default': (200,),
                'splash': (128, 200)}
CASES = [(name, n) for name, counts in TOKEN_COUNTS.items() for n in counts]


def qkv(tokens, dtype=jnp.float32, batch=2, seed=0):
  keys = jax.random.split(jax.random.key(seed), 4)
  shape = (batch, tokens, HEADS, HEAD_DIM)
  q, k, v, weights = (jax.random.normal(key, shape, jnp.float32) for key in keys)
  return q.astype(dtype), k.astype(dtype), v.astype(dtype), weights


def reference_f64(q, k, v, scale):
  q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
  s = np.einsum('bqhd,bkhd->bhqk', q, k) * scale
  p = np.exp(s - s.max(-1, keepdims=True))
  return np.einsum('bhqk,bkhd->bqhd', p / p.sum(-1, keepdims=True), v)


def reference(q, k, v, scale):
  s = jnp.einsum('bqhd,bkhd->bhqk', q, k, precision='highest') * scale
  return jnp.einsum('bhqk,bkhd->bqhd', jax.nn.softmax(s, -1), v, precision='highest')


def grads(fn, q, k, v, weights):
  """d/d(q, k, v) of the random linear functional sum(weights * out)."""
  def functional(q, k, v):
    return jnp.sum(weights * fn(q, k, v, scale=SCALE).astype(jnp.float32))
  return jax.grad(functional, argnums=(0, 1, 2))(q, k, v)


@pytest.mark.parametrize('name,tokens', CASES)
def test_kernel_matches_reference(name, tokens):
  fn = CPU_KERNELS[name]
  q, k, v, weights = qkv(tokens)
  out = fn(q, k, v, scale=SCALE)
  assert out.shape == q.shape and out.dtype == q.dtype
  np.testing.assert_allclose(out, reference_f64(q, k, v, SCALE), atol=2e-6, rtol=0)
  for got, want in zip(grads(fn, q, k, v, weights), grads(reference, q, k, v, weights)):
    np.testing.assert_allclose(got, want, atol=2e-5, rtol=0)


def test_xla_per_head_sampling_path_matches_reference():
  """On CPU an undifferentiated call whose scores exceed CPU_PER_HEAD_ABOVE runs one (example,
  head) at a time, with the same values."""
  tokens = 1 + int((attention.CPU_PER_HEAD_ABOVE / (4 * 2 * HEADS)) ** 0.5)  # just above, batch 2
  q, k, v, weights = qkv(tokens)
  out = jax.jit(functools.partial(attention.xla, scale=SCALE))(q, k, v)
  np.testing.assert_allclose(out, reference_f64(q, k, v, SCALE), atol=2e-6, rtol=0)
  one_head = jax.make_jaxpr(functools.partial(attention.xla, scale=SCALE))(q, k, v)
  assert 'scan' in str(one_head)  # lax.map: the per-head loop really ran


# bfloat16 holds 8 significant bits: inputs are rounded by the test, the probabilities are rounded
# before the product with v, and the output is rounded, so values agree to about 2^-7 of their
# range; the gradients (sums of a few hundred rounded products) to 2% of their largest entry.
BF16_VALUE_ATOL = 2e-2
BF16_GRAD_RTOL = 2e-2


@pytest.mark.parametrize('name', ['xla', 'chunked', 'splash'])
def test_kernel_bfloat16(name):
  fn = CPU_KERNELS[name]
  q, k, v, weights = qkv(200, jnp.bfloat16)
  out = fn(q, k, v, scale=SCALE)
  assert out.dtype == jnp.bfloat16
  np.testing.assert_allclose(out.astype(np.float32), reference_f64(q, k, v, SCALE),
                             atol=BF16_VALUE_ATOL, rtol=0)
  f32 = [x.astype(jnp.float32) for x in (q, k, v)]
  for got, want in zip(grads(fn, q, k, v, weights), grads(reference, *f32, weights)):
    assert got.dtype == jnp.bfloat16
    np.testing.assert_allclose(got.astype(np.float32), want,
                               atol=BF16_GRAD_RTOL * float(jnp.abs(want).max()), rtol=0)


def test_xla_bfloat16_softmax_in_float32():
  """The xla kernel forms bf16 logits with float32 accumulation and exponentiates in float32, as
  its docstring says."""
  q, k, v, _ = qkv(16, jnp.bfloat16, batch=1)
  jaxpr = jax.make_jaxpr(functools.partial(attention.xla, scale=SCALE))(q, k, v)
  eqns = list(jaxpr_equations(jaxpr.jaxpr))
  logits = next(e for e in eqns if e.primitive.name == 'dot_general')
  assert logits.outvars[0].aval.dtype == jnp.float32
  exps = [e for e in eqns if e.primitive.name == 'exp']
  assert exps and all(e.outvars[0].aval.dtype == jnp.float32 for e in exps)


def test_chunked_traced_scale():
  """A scale that is a traced value (not a Python float) folds into q; its gradient is right."""
  q, k, v, weights = qkv(100, batch=1)

  def functional(fn, scale):
    return jnp.sum(weights * fn(q, k, v, scale=scale))

  chunked = CPU_KERNELS['chunked']
  got = jax.jit(jax.value_and_grad(functools.partial(functional, chunked)))(SCALE)
  want = jax.value_and_grad(functools.partial(functional, reference))(SCALE)
  np.testing.assert_allclose(got, want, rtol=1e-5)


def test_chunked_gradient_memory_is_bounded():
  """At 4096 tokens the xla gradient holds N x N scores per head; the chunked one holds blocks."""
  tokens, heads = 4096, 2
  spec = jax.ShapeDtypeStruct((1, tokens, heads, HEAD_DIM), jnp.float32)
  scores_bytes = tokens * tokens * heads * 4

  def temp_bytes(fn):
    loss = lambda q, k, v: jnp.sum(fn(q, k, v, scale=SCALE) ** 2)
    grad = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
    return grad.lower(spec, spec, spec).compile().memory_analysis().temp_size_in_bytes

  assert temp_bytes(attention.xla) >= scores_bytes  # the check can tell the two apart
  assert temp_bytes(attention.chunked) < scores_bytes / 4


def test_chunked_model_matches_xla(micro_model, micro_params):
  """The DiT with attention_implementation='chunked' is the same function as with 'xla'."""
  x = jax.random.normal(jax.random.key(3), (2, 12, 16, 1))
  inputs = (x, jnp.array([0.3, 0.8]), jnp.array([1, 2]), positions.grid(6, 8, 2))
  want = micro_model.apply(micro_params, *inputs)
  got = micro_model.clone(attention_implementation='chunked').apply(micro_params, *inputs)
  np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)


@pytest.mark.skipif(attention.current_platform() != 'cuda', reason='needs an NVIDIA GPU')
def test_cudnn_matches_reference():
  q, k, v, _ = qkv(256, jnp.bfloat16)
  out = attention.KERNELS['cudnn'](q, k, v, scale=SCALE)
  np.testing.assert_allclose(out.astype(np.float32), reference_f64(q, k, v, SCALE),
                             atol=BF16_VALUE_ATOL, rtol=0)


def test_cudnn_refuses_float32():
  q, k, v, _ = qkv(8)
  with pytest.raises(ValueError, match=r"'cudnn' takes bfloat16 or float16 .* got float32"):
    attention.cudnn(q, k, v, scale=SCALE)


def test_registry_names_and_config():
  assert set(attention.KERNELS) == {'xla', 'cudnn', 'splash', 'chunked'}
  assert all(callable(fn) for fn in attention.KERNELS.values())
  allowed = config_lib.FIELDS['model.attention_implementation'].allowed
  assert tuple(allowed) == tuple(attention.KERNELS)


@pytest.mark.parametrize('kernel,platform,message', [
    ('cudnn', 'cpu', "model.attention_implementation='cudnn' needs an NVIDIA GPU; the devices it "
                     "would run on are cpu; choose one of: xla, chunked"),
    ('splash', 'cpu', "model.attention_implementation='splash' needs a TPU; the devices it would "
                      "run on are cpu; choose one of: xla, chunked"),
    ('cudnn', 'tpu', "model.attention_implementation='cudnn' needs an NVIDIA GPU; the devices it "
                     "would run on are tpu; choose one of: xla, splash, chunked"),
    ('flash', None, "unknown model.attention_implementation='flash'; choose one of: xla, cudnn, "
                    "splash, chunked"),
])
def test_check_kernel_refuses(kernel, platform, message):
  with pytest.raises(ValueError) as error:
    attention.check_kernel(kernel, platform)
  assert str(error.value) == message


def test_check_kernel_accepts():
  assert attention.check_kernel('cudnn', 'cuda') is attention.KERNELS['cudnn']
  assert attention.check_kernel('splash', 'tpu') is attention.KERNELS['splash']
  assert attention.check_kernel('chunked') is attention.KERNELS['chunked']  # this process: cpu


def test_attend_refuses_before_tracing_the_kernel():
  q, k, v, _ = qkv(8, jnp.bfloat16)
  with pytest.raises(ValueError, match="'cudnn' needs an NVIDIA GPU; the devices it would run on "
                                      'are cpu'):
    jax.jit(functools.partial(attention.attend, scale=SCALE, kernel='cudnn'))(q, k, v)


TPU_MESH = jax.sharding.AbstractMesh(
    (2, 2), training.BATCH_AXES, abstract_device=jax.sharding.AbstractDevice(
        device_kind='TPU v5 lite', num_cores=1, platform='tpu'))


def test_platform_is_the_meshs():
  """The kernels' platform is that of the mesh the program is traced for, not this process's: a
  CPU host tracing for a TPU mesh may choose splash (under shard_map), and not cudnn."""
  q, k, v, _ = qkv(128, jnp.bfloat16, batch=4)
  assert attention.target_platform() == 'cpu'
  with jax.sharding.use_abstract_mesh(TPU_MESH):
    assert attention.target_platform() == 'tpu'
    jaxpr = jax.make_jaxpr(functools.partial(attention.attend, scale=SCALE, kernel='splash'))(
        q, k, v)
    with pytest.raises(ValueError, match="'cudnn' needs an NVIDIA GPU; the devices it would run "
                                         'on are tpu; choose one of: xla, splash, chunked'):
      jax.make_jaxpr(functools.partial(attention.attend, scale=SCALE, kernel='cudnn'))(q, k, v)
  assert 'shard_map' in {e.primitive.name for e in jaxpr_equations(jaxpr.jaxpr)}


@pytest.mark.parametrize('batch,heads,expected', [
    (8, 16, (('data', 'fsdp'), ())),
    (2, 16, (('data',), ('fsdp',))),
    (1, 16, ((), ('data', 'fsdp'))),
    (6, 3, (('data',), ())),       # fsdp divides neither: its two devices compute the same
])
def test_shard_split(batch, heads, expected):
  mesh = jax.sharding.AbstractMesh((2, 4), training.BATCH_AXES)
  assert attention.shard_split(mesh, batch, heads) == expected


def test_splash_under_a_mesh_matches_reference():
  """On a data x fsdp = 2 x 2 mesh, splash runs per device under shard_map (the batch over data,
  the heads over fsdp); in the Pallas interpreter its values and gradients are the reference's."""
  mesh = training.make_mesh(2, devices=jax.devices()[:4])
  keys = jax.random.split(jax.random.key(5), 4)
  q, k, v, weights = (jax.random.normal(key, (2, 200, 4, HEAD_DIM)) for key in keys)
  fn = functools.partial(attention.splash, interpret=True)

  def value_and_grads(q, k, v):
    out = fn(q, k, v, scale=SCALE)
    return out, grads(fn, q, k, v, weights)

  with jax.set_mesh(mesh):
    jaxpr = jax.make_jaxpr(value_and_grads)(q, k, v)
    out, got = jax.jit(value_and_grads)(q, k, v)
  assert 'shard_map' in {e.primitive.name for e in jaxpr_equations(jaxpr.jaxpr)}
  np.testing.assert_allclose(out, reference_f64(q, k, v, SCALE), atol=2e-6, rtol=0)
  for g, want in zip(got, grads(reference, q, k, v, weights)):
    np.testing.assert_allclose(g, want, atol=2e-5, rtol=0)
