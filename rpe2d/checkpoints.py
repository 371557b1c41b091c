"""Orbax checkpoints of a run: <workdir>/checkpoints/<step>/{state, data, config}.

`state` is the TrainState (params, optimizer state, EMA params, step), `data` the grain iterator
state of this process, `config` the run's config as JSON. The config also sits in
<workdir>/config.json so tools can read a run without orbax.
"""

import json
import pathlib

import grain
import jax
import ml_collections
import orbax.checkpoint as ocp

# Config keys that change the shapes of the saved arrays or what they mean. A run may not resume,
# or sample, with different values.
INCOMPATIBLE_KEYS = (
    'model.variant', 'model.position_embedding', 'model.qk_norm', 'model.micro_conditioning',
    'model.mlp_ratio', 'data.name', 'data.image_size', 'data.channels', 'data.num_classes',
)


def manager(workdir, config, *, read_only: bool = False) -> ocp.CheckpointManager:
  """read_only: for inspecting a run (it never creates, saves or deletes anything)."""
  options = ocp.CheckpointManagerOptions(
      max_to_keep=config.keep_checkpoints,
      keep_period=config.keep_every_steps or None,
      enable_async_checkpointing=True,
      create=not read_only,
      read_only=read_only,
  )
  return ocp.CheckpointManager(pathlib.Path(workdir).absolute() / 'checkpoints', options=options)


def save(mngr, step: int, state, data_iterator, config, *, force: bool = False) -> bool:
  args = ocp.args.Composite(
      state=ocp.args.StandardSave(state),
      data=grain.checkpoint.CheckpointSave(data_iterator),
      config=ocp.args.JsonSave(config.to_dict()),
  )
  return mngr.save(step, args=args, force=force)


def restore(mngr, step: int, abstract_state, data_iterator):
  """Restores state (with the shardings in abstract_state) and, in place, the data iterator."""
  args = ocp.args.Composite(
      state=ocp.args.StandardRestore(abstract_state),
      data=grain.checkpoint.CheckpointRestore(data_iterator),
  )
  return mngr.restore(step, args=args).state


def find_step_dir(source) -> pathlib.Path:
  """A run directory (its newest step) or <run>/checkpoints/<step> -> the step directory."""
  path = pathlib.Path(source).absolute()
  if (path / 'checkpoints').is_dir():
    path = path / 'checkpoints'
  if (path / 'state').is_dir():
    return path
  steps = [int(p.name) for p in path.iterdir()
           if p.name.isdigit() and (p / 'state').is_dir()] if path.is_dir() else []
  if not steps:
    raise FileNotFoundError(f'{str(source)!r} holds no checkpoint; give a run directory or '
                            f'<run>/checkpoints/<step>')
  return path / str(max(steps))


def check_init_from(source, config) -> pathlib.Path:
  """The step directory init_from names, refused before compiling if its model differs."""
  try:
    step_dir = find_step_dir(source)
  except FileNotFoundError as e:
    raise FileNotFoundError(f'init_from={e}') from None
  saved = read_config(step_dir.parent.parent / 'config.json')
  model_keys = tuple(k for k in INCOMPATIBLE_KEYS if k.startswith('model.')) + (
      'data.channels', 'data.num_classes')
  differences = differing_keys(saved, config, model_keys) if saved is not None else []
  if differences:
    raise ValueError(f'init_from={source} holds weights of another model; differing keys:\n  '
                     + '\n  '.join(differences))
  return step_dir


def restore_weights(source, abstract_state):
  """(params, ema_params) from a run directory (its newest step) or a step directory."""
  state = ocp.StandardCheckpointer().restore(find_step_dir(source) / 'state', abstract_state)
  return state.params, state.ema_params


def read_config(path) -> ml_collections.ConfigDict | None:
  """The JSON config a run saved (<workdir>/config.json), or None if there is none."""
  path = pathlib.Path(path)
  if not path.is_file():
    return None
  return ml_collections.ConfigDict(json.loads(path.read_text()))


def write_config(workdir, config) -> None:
  if jax.process_index() == 0:
    path = pathlib.Path(workdir) / 'config.json'
    tmp = path.with_suffix('.json.tmp')
    tmp.write_text(config.to_json_best_effort(indent=2))
    tmp.replace(path)


def _lookup(config, dotted):
  node = config
  for part in dotted.split('.'):
    if node is None or part not in node:
      return None
    node = node[part]
  return node


def differing_keys(saved, config, keys=INCOMPATIBLE_KEYS) -> list[str]:
  """Keys whose values differ between a saved config and the current one."""
  out = []
  for key in keys:
    a, b = _lookup(saved, key), _lookup(config, key)
    if isinstance(a, (list, tuple)) or isinstance(b, (list, tuple)):
      a, b = list(a or []), list(b or [])
    if a != b:
      out.append(f'{key}: saved {a!r}, now {b!r}')
  return out


def check_compatible(workdir, config) -> ml_collections.ConfigDict | None:
  """Refuses a workdir whose checkpoints belong to another model, before anything is compiled."""
  saved = read_config(pathlib.Path(workdir) / 'config.json')
  if saved is None:
    return None
  differences = differing_keys(saved, config)
  if differences:
    raise ValueError(f'workdir {workdir} holds a run of an incompatible model; differing keys:\n  '
                     + '\n  '.join(differences)
                     + '\nuse another --workdir, or start from its weights with '
                     '--config.init_from=<that run> where the shapes agree')
  return saved
