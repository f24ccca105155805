"""The sharding policy: the ('data', 'model') mesh and logical-axis -> mesh-axis rules.

Every parameter names its logical axes where it is created (layers.py / model.py):
  vocab_embed (V, D)         ('vocab', 'embed')
  attn_qkv    (D, 3, H, K)   ('embed', None, 'heads', 'head_dim')
  attn_out    (H, K, D)      ('heads', 'head_dim', 'embed')
  attn_q      (D, H, K)      ('embed', 'heads', 'head_dim')   grouped-query attention only
  attn_kv     (D, 2, G, K)   ('embed', None, 'kv_heads', 'head_dim')  (G kv heads)
  mlp_in, mlp_gate (D, F)    ('embed', 'mlp')      mlp_out (F, D) ('mlp', 'embed')
  head        (D, V)         ('embed', 'vocab')    norms / biases ('norm',) or ('mlp',)
Tensor parallelism shards heads and the MLP hidden dim over 'model' (Megatron style: one
all-reduce after attention and one after the MLP). FSDP additionally shards 'embed' over 'data'.
The vocabulary stays replicated so any vocabulary size (50258 for GPT-2 + mask) works.
"""

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

DATA, MODEL = "data", "model"


def logical_rules(fsdp: bool) -> dict[str, str | None]:
  return {
      "vocab": None,
      "embed": DATA if fsdp else None,
      # The noise encoder's 2d-wide input axis. Its combined_proj is ('embed2', 'embed'), whose
      # 'embed' axis already takes 'data' under FSDP; a mesh axis may shard only one dimension.
      "embed2": None,
      "heads": MODEL,
      "kv_heads": MODEL,  # Grouped-query attention: the query heads of a kv head stay local.
      "mlp": MODEL,
      "head_dim": None,
      "norm": None,
  }


def make_mesh(data: int, model: int, devices=None) -> Mesh:
  """A (data, model) mesh with Auto axis types (classic GSPMD propagation; see platform-notes)."""
  devices = jax.devices() if devices is None else devices
  if data * model != len(devices):
    raise ValueError(f"mesh.data * mesh.model = {data} * {model} != {len(devices)} devices")
  return jax.make_mesh((data, model), (DATA, MODEL), devices=devices,
                       axis_types=(jax.sharding.AxisType.Auto,) * 2)


def logical_to_spec(names, rules: dict) -> P:
  return P(*(None if n is None else rules[n] for n in names))


def param_shardings(abstract_module: nnx.Module, mesh: Mesh, fsdp: bool) -> dict:
  """NamedShardings for the plain-dict parameter pytree of `abstract_module`."""
  rules = logical_rules(fsdp)
  specs = nnx.get_partition_spec(nnx.state(abstract_module))
  specs = nnx.to_pure_dict(specs)
  return jax.tree.map(lambda s: NamedSharding(mesh, logical_to_spec(tuple(s), rules)), specs,
                      is_leaf=lambda x: isinstance(x, P))


def batch_sharding(mesh: Mesh, ndim: int = 2) -> NamedSharding:
  """Leading (batch) axis over 'data', the rest replicated."""
  return NamedSharding(mesh, P(DATA, *([None] * (ndim - 1))))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def global_batch(local_BxL: np.ndarray, mesh: Mesh) -> jax.Array:
  """Assemble each process's rows into one global array sharded over 'data'."""
  return jax.make_array_from_process_local_data(batch_sharding(mesh, local_BxL.ndim), local_BxL)


def abstract_arrays(shapes, shardings):
  """ShapeDtypeStructs carrying shardings (the one abstract-state builder): Orbax restore
  targets and ahead-of-time compilation inputs, from any pytree of shapes and of shardings."""
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                      shapes, shardings)


def cache_sharding(mesh: Mesh) -> NamedSharding:
  """A KV cache (B, H, S, head_dim) per layer: batch over 'data', heads over 'model'."""
  return NamedSharding(mesh, P(DATA, MODEL, None, None))


def decode_state_shardings(mesh: Mesh, ranks):
  """Shardings of a decode state given the rank of each of its arrays (any pytree of ints, e.g.
  the state dataclass filled with ranks): a rank-4 array is a KV cache (`cache_sharding`), a
  scalar is replicated, any other array has its leading (batch) axis over 'data'. The offline
  decoder, the serving engine and speculative decoding all shard their state through here."""
  def one(ndim: int) -> NamedSharding:
    if ndim == 0:
      return replicated(mesh)
    return cache_sharding(mesh) if ndim == 4 else batch_sharding(mesh, ndim)
  return jax.tree.map(one, ranks)
