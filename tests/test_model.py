import functools

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from conftest import jaxpr_equations, perturb
from rpe2d import model as model_lib, positions, rope


def _inputs(height, width, batch=2, patch=2, seed=0):
  key = jax.random.key(seed)
  x = jax.random.normal(key, (batch, height, width, 1))
  t = jnp.linspace(0.2, 0.9, batch)
  labels = jnp.arange(batch) % 4
  pos = positions.grid(height // patch, width // patch, batch)
  return x, t, labels, pos


@functools.cache
def _compiled_apply(model, encoding):
  kwargs = {} if encoding is None else dict(encoding=encoding)
  return jax.jit(functools.partial(model.apply, **kwargs))


def forward(model, params, *inputs, encoding=None):
  """model.apply as one compiled program (per model and encoding): run eagerly, every op of the
  forward pass is compiled on its own for each new shape, twice the time on CPU."""
  return _compiled_apply(model, encoding)(params, *inputs)


def value_and_grad(loss, params):
  return jax.jit(jax.value_and_grad(loss))(params)


@pytest.mark.parametrize('height,width', [(8, 8), (16, 16), (8, 24), (24, 6), (4, 4), (2, 10)])
def test_output_shape_any_resolution(micro_model, micro_params, height, width):
  out = forward(micro_model, micro_params, *_inputs(height, width))
  chex.assert_shape(out, (2, height, width, 1))
  chex.assert_tree_all_finite(out)


def test_output_is_zero_at_init(micro_model):
  x, t, labels, pos = _inputs(8, 12)
  params = micro_model.init(jax.random.key(0), x, t, labels, pos)
  out = forward(micro_model, params, x, t, labels, pos)
  assert jnp.all(out == 0.0)


def test_same_weights_serve_rope_and_sincos(micro_model, micro_params):
  sincos = micro_model.clone(position_embedding='sincos')
  x, t, labels, pos = _inputs(8, 8)
  chex.assert_trees_all_equal_shapes(
      micro_params, sincos.init(jax.random.key(0), x, t, labels, pos))
  out_rope = forward(micro_model, micro_params, x, t, labels, pos)
  out_sincos = forward(sincos, micro_params, x, t, labels, pos)
  chex.assert_tree_all_finite(out_sincos)
  assert np.abs(out_rope - out_sincos).max() > 1e-4


def test_positions_change_the_output(micro_model, micro_params):
  x, t, labels, pos = _inputs(8, 8)
  spread = positions.rpe2d(jax.random.key(5), 4, 4, 8, 8, 2)
  a = forward(micro_model, micro_params, x, t, labels, pos)
  b = forward(micro_model, micro_params, x, t, labels, spread)
  assert np.abs(a - b).max() > 1e-4


def test_rope_output_is_translation_invariant(micro_model, micro_params):
  x, t, labels, pos = _inputs(8, 8)
  a = forward(micro_model, micro_params, x, t, labels, pos)
  b = forward(micro_model, micro_params, x, t, labels, pos + jnp.array([3.0, 5.0]))
  np.testing.assert_allclose(a, b, atol=2e-4)


def test_bfloat16_matches_float32(micro_model, micro_params):
  x, t, labels, pos = _inputs(8, 8)
  f32 = forward(micro_model, micro_params, x, t, labels, pos)
  bf16 = forward(micro_model.clone(dtype='bfloat16'), micro_params, x, t, labels, pos)
  chex.assert_type(bf16, jnp.float32)
  scale = float(jnp.abs(f32).max())
  assert scale > 1e-3
  np.testing.assert_allclose(bf16, f32, atol=0.05 * scale)


def test_bfloat16_gradients_match_float32(micro_model, micro_params):
  """bf16 compute keeps float32 parameters and float32 gradients, within 3% of float32's (measured
  about 0.5%: bf16 keeps 8 mantissa bits; softmax, RoPE and the loss run in float32)."""
  x, t, labels, pos = _inputs(8, 8)
  bf16 = micro_model.clone(dtype='bfloat16')
  fresh = bf16.init(jax.random.key(0), x, t, labels, pos)
  assert {a.dtype for a in jax.tree.leaves(fresh)} == {jnp.dtype('float32')}
  loss = lambda m: lambda p: jnp.mean(m.apply(p, x, t, labels, pos) ** 2)
  value, grads = value_and_grad(loss(micro_model), micro_params)
  value_b, grads_b = value_and_grad(loss(bf16), micro_params)
  assert {a.dtype for a in jax.tree.leaves(grads_b)} == {jnp.dtype('float32')}
  np.testing.assert_allclose(value_b, value, rtol=0.03)
  flat, flat_b = (jnp.concatenate([a.ravel() for a in jax.tree.leaves(g)]) for g in (grads, grads_b))
  assert float(jnp.linalg.norm(flat_b - flat) / jnp.linalg.norm(flat)) < 0.03


def test_bfloat16_mixed_precision_contract(micro_model, micro_params):
  """With model.dtype='bfloat16', the token matmuls and attention take bf16 operands, every dot
  returns float32 (XLA:CPU's fast bf16 path, and float32 accumulation), and the residual stream
  between blocks is float32; forward and backward alike."""
  x, t, labels, pos = _inputs(8, 8)
  bf16 = micro_model.clone(dtype='bfloat16')
  loss = lambda p: jnp.mean(bf16.apply(p, x, t, labels, pos) ** 2)
  dots = [e for e in jaxpr_equations(jax.make_jaxpr(jax.grad(loss))(micro_params).jaxpr)
          if e.primitive.name in ('dot_general', 'conv_general_dilated')]
  assert {e.outvars[0].aval.dtype for e in dots} == {jnp.dtype('float32')}
  bf16_dots = [e for e in dots if all(v.aval.dtype == jnp.bfloat16 for v in e.invars)]
  # Per block: 6 forward dots (qkv, q k^T, P v, proj, two MLP), 2 backward dots per Dense
  # layer (dx, dW) and 4 in attention's backward.
  depth = sum(name.startswith('block_') for name in micro_params['params'])
  assert depth and len(bf16_dots) >= (6 + 4 * 2 + 4) * depth
  blocks = bf16.apply(micro_params, x, t, labels, pos, capture_intermediates=True,
                      mutable=['intermediates'])[1]['intermediates']
  outputs = [v['__call__'][0] for k, v in blocks.items() if k.startswith('block_')]
  assert outputs and all(o.dtype == jnp.float32 for o in outputs)


def test_remat_matches(micro_model, micro_params):
  x, t, labels, pos = _inputs(8, 8)
  loss = lambda m: lambda p: jnp.sum(m.apply(p, x, t, labels, pos) ** 2)
  value, grads = value_and_grad(loss(micro_model), micro_params)
  value_r, grads_r = value_and_grad(loss(micro_model.clone(remat=True)), micro_params)
  np.testing.assert_allclose(value, value_r, rtol=1e-5)
  chex.assert_trees_all_close(grads, grads_r, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize('remat, policy', [(False, 'nothing'), (True, 'nothing'), (True, 'dots')])
def test_scanned_blocks_match_the_loop(micro_model, micro_params, remat, policy):
  """nn.scan over the blocks computes what the loop computes, values and gradients, with the
  parameters moved between layouts by stack_blocks / unstack_blocks."""
  x, t, labels, pos = _inputs(8, 8)
  scanned = micro_model.clone(scan_layers=True, remat=remat, remat_policy=policy)
  stacked = model_lib.stack_blocks(micro_params)
  fresh = scanned.init(jax.random.key(0), x, t, labels, pos)
  chex.assert_trees_all_equal_shapes_and_dtypes(stacked, fresh)
  assert stacked['params']['blocks']['adaLN']['kernel'].shape[0] == 2  # micro: depth 2
  chex.assert_trees_all_equal(model_lib.unstack_blocks(stacked), micro_params)

  loss = lambda m: lambda p: jnp.sum(m.apply(p, x, t, labels, pos) ** 2)
  value, grads = value_and_grad(loss(micro_model), micro_params)
  value_s, grads_s = value_and_grad(loss(scanned), stacked)
  assert float(value) > 1e-3
  np.testing.assert_allclose(value_s, value, rtol=1e-5)
  chex.assert_trees_all_close(model_lib.unstack_blocks(grads_s), grads, rtol=1e-4, atol=1e-6)


def test_block_layouts_convert_inside_optimizer_state(micro_params):
  """stack/unstack reach every copy of the blocks: EMA and the optimizer's moments too."""
  optimizer = optax.adamw(1e-3)
  state = {'params': micro_params, 'opt': optimizer.init(micro_params)}
  stacked = model_lib.stack_blocks(state)
  mu = stacked['opt'][0].mu['params']
  assert 'blocks' in mu and not any(k.startswith('block_') for k in mu)
  chex.assert_trees_all_equal(model_lib.unstack_blocks(stacked), state)
  chex.assert_trees_all_equal(model_lib.stack_blocks(stacked), stacked)  # already stacked


def test_qk_norm_and_micro_conditioning(micro_model):
  model = micro_model.clone(qk_norm='rmsnorm')
  x, t, labels, pos = _inputs(8, 8)
  params = perturb(model.init(jax.random.key(0), x, t, labels, pos), jax.random.key(3))
  assert 'q_norm' in params['params']['block_0']['Attention_0']
  whole = forward(model, params, x, t, labels, pos)
  default_crop = forward(model, params, x, t, labels, pos, jnp.array([[0.0, 0.0, 1.0, 1.0]] * 2))
  cropped = forward(model, params, x, t, labels, pos, jnp.array([[0.2, 0.1, 0.5, 0.5]] * 2))
  np.testing.assert_array_equal(whole, default_crop)
  assert np.abs(whole - cropped).max() > 1e-4


@pytest.fixture(scope='module')
def fitv2_blocks_micro():
  """micro/2 with FiTv2's blocks (SwiGLU, adaLN-LoRA of rank 8 plus the global adaLN,
  QK-LayerNorm), its initial parameters and random ones."""
  model = model_lib.DiT(variant='micro/2', channels=1, num_classes=4, train_grid=(4, 4),
                        position_range=(4, 4), mlp='swiglu', adaln='lora', qk_norm='layernorm')
  init = jax.jit(model.init)(jax.random.key(0), *_inputs(8, 8))
  rng = np.random.default_rng(2)  # numpy: a jitted perturb would be one more compile
  return model, init, jax.tree.map(
      lambda p: p + 0.05 * rng.standard_normal(p.shape, np.float32), init)


def test_fitv2_blocks_have_their_shapes_and_start_as_the_identity(fitv2_blocks_micro):
  model, init, params = fitv2_blocks_micro
  inputs = _inputs(8, 8)
  assert jnp.all(forward(model, init, *inputs) == 0.0)
  top = init['params']
  block = top['block_1']
  shapes = {name: block[name]['kernel'].shape for name in block if name != 'Attention_0'}
  hidden = 4 * 32 * 2 // 3  # timm's SwiGLU: 2/3 of the GELU MLP's width
  assert shapes == {'fc1_g': (32, hidden), 'fc1_x': (32, hidden), 'fc2': (hidden, 32),
                    'adaLN_down': (32, 8), 'adaLN_up': (8, 6 * 32)}
  assert set(block['Attention_0']) == {'qkv', 'proj'}  # LayerNorm on q and k has no parameters
  assert top['global_adaLN']['kernel'].shape == (32, 6 * 32)
  assert not top['global_adaLN']['kernel'].any() and not block['adaLN_up']['kernel'].any()
  assert np.abs(forward(model, params, *inputs)).max() > 1e-3
  # The blocks under nn.scan take the shared modulation as the loop does.
  scanned = forward(model.clone(scan_layers=True), model_lib.stack_blocks(params), *inputs)
  np.testing.assert_allclose(scanned, forward(model, params, *inputs), rtol=1e-5, atol=1e-6)


def test_swiglu_and_adaln_lora_compute_their_formulas(fitv2_blocks_micro):
  _, _, params = fitv2_blocks_micro
  block = jax.tree.map(np.asarray, params['params']['block_0'])
  silu = lambda a: a / (1 + np.exp(-a))
  linear = lambda a, layer: a @ layer['kernel'] + layer['bias']
  # A part creates its layers in the module that calls it: here a bare wrapper.
  wrapped = lambda fn: type('Part', (nn.Module,), {'__call__': nn.compact(
      lambda self, a: fn(a))})()

  h = np.asarray(jax.random.normal(jax.random.key(4), (2, 5, 32)))
  swiglu = wrapped(lambda a: model_lib.swiglu_mlp(a, model_lib.dense, 32, 4.0))
  got = swiglu.apply({'params': {k: block[k] for k in ('fc1_g', 'fc1_x', 'fc2')}}, h)
  want = linear(silu(linear(h, block['fc1_g'])) * linear(h, block['fc1_x']), block['fc2'])
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)

  c = h[:, 0]
  lora = wrapped(lambda a: model_lib.lora_adaln(a, 32, 8))
  got = lora.apply({'params': {k: block[k] for k in ('adaLN_down', 'adaLN_up')}}, c)
  np.testing.assert_allclose(got, linear(linear(silu(c), block['adaLN_down']), block['adaLN_up']),
                             rtol=1e-5, atol=1e-5)


def test_null_class_and_labels(micro_model, micro_params):
  x, t, _, pos = _inputs(8, 8)
  cond = forward(micro_model, micro_params, x, t, jnp.array([1, 1]), pos)
  null = forward(micro_model, micro_params, x, t, jnp.array([4, 4]), pos)  # num_classes = 4
  assert np.abs(cond - null).max() > 1e-4


@pytest.mark.parametrize('encoding', [
    rope.Encoding('pi'), rope.Encoding('ntk', dype=True), rope.Encoding('yarn', temperature='rope'),
    rope.Encoding('tasr'), rope.Encoding('yarn', yarn_form='fit'),
    rope.Encoding('yarn', yarn_form='index'), rope.Encoding('tasr', tasr_form='switch'),
    rope.Encoding('yarn', temperature='logits'),
])
def test_methods_are_native_at_the_reference_resolution(micro_model, micro_params, encoding):
  # position_range (8, 8) tokens = 16x16 pixels: scale 1 on both axes.
  x, t, labels, pos = _inputs(16, 16)
  native = forward(micro_model, micro_params, x, t, labels, pos)
  np.testing.assert_allclose(
      forward(micro_model, micro_params, x, t, labels, pos, encoding=encoding), native, rtol=1e-6,
      atol=1e-7)
  # Above it, each method changes the output.
  x, t, labels, pos = _inputs(32, 24)
  native = forward(micro_model, micro_params, x, t, labels, pos)
  moved = forward(micro_model, micro_params, x, t, labels, pos, encoding=encoding)
  assert np.abs(native - moved).max() > 1e-5


def test_variants_and_errors():
  assert model_lib.parse_variant('XL/2') == (1152, 28, 16, 2)
  assert model_lib.parse_variant('B/4') == (768, 12, 12, 4)
  for bad in ('XXL/2', 'B', 'B/0', 'B/two'):
    with pytest.raises(ValueError, match=f"unknown model variant '{bad}'"):
      model_lib.parse_variant(bad)
  with pytest.raises(ValueError, match="position_embedding 'learned'"):
    model_lib.validate_shape('S/2', 'learned')
  model = model_lib.DiT(variant='micro/2', channels=1, num_classes=4)
  x = jnp.zeros((1, 7, 8, 1))
  with pytest.raises(ValueError, match='7x8 is not divisible by the patch size 2'):
    model.init(jax.random.key(0), x, jnp.zeros(1), jnp.zeros(1, jnp.int32), jnp.zeros((1, 12, 2)))


def test_forward_flops_match_the_dit_paper():
  # DiT-XL/2 at 256^2 (32x32 latent, 4 channels): 118.6 GMACs in the paper.
  gmacs = model_lib.forward_flops('XL/2', 32, 32, channels=4) / 2 / 1e9
  assert abs(gmacs - 118.6) / 118.6 < 0.03
  gmacs = model_lib.forward_flops('XL/2', 64, 64, channels=4) / 2 / 1e9
  assert abs(gmacs - 524.6) / 524.6 < 0.03
