"""Load a finished stage from a work dir for serving: generate, benchmark, evaluate, notebooks.

Work dir layout (written by the trainer, and by `convert` for foreign checkpoints):
  <workdir>/tokenizer.json, tokenizer_meta.json
  <workdir>/checkpoints/<stage>/<step>/   Orbax step: items "state", "meta" (JSON)[, "data_iter"]
  <workdir>/checkpoints/<stage>/model_config.json
"state" is a full train state {"step", "params", "opt_state"[, "ema"]} or, for params-only
checkpoints, {"params"}. Only the parameters (or their EMA) are read back: Orbax restores that
subtree alone, so the optimizer moments never leave the disk.
"""

import dataclasses
import os
from typing import Any

import jax
import orbax.checkpoint as ocp
from jax.sharding import Mesh

from kforcing_jax.training import checkpoint
from kforcing_jax.config import check as config_check
from kforcing_jax.model import transformer as model_lib
from kforcing_jax.model import pflm as pflm_lib
from kforcing_jax.parallel import sharding
from kforcing_jax.data import tokenizer as tokenizer_lib

TOKENIZER_FILE = "tokenizer.json"


@dataclasses.dataclass(frozen=True)
class Temperatures:
  """The temperatures a stage decodes at. A PFLM samples through its noise encoder, so only at
  those it was trained at: [lo, hi] (config distill.tau_min / tau_max), and 0 (greedy) when it
  trained with distill.greedy_share > 0. The AR teacher samples at any (ar=True)."""
  lo: float = 1.0
  hi: float = 1.0
  greedy: bool = False
  ar: bool = False

  @classmethod
  def from_meta(cls, meta: dict, k: int) -> "Temperatures":
    if k == 0:
      return cls(0.0, float("inf"), True, ar=True)
    d = (meta.get("config") or {}).get("distill") or {}
    if "tau_min" in d:
      return cls(float(d["tau_min"]), float(d["tau_max"]), float(d["greedy_share"]) > 0)
    tau = float(d.get("tau", 1.0))  # one temperature: stages trained before ranges, converted
    return cls(tau, tau)

  def __str__(self) -> str:
    if self.ar:
      return "any temperature >= 0"
    span = f"{self.lo:g}" if self.lo == self.hi else f"{self.lo:g}..{self.hi:g}"
    return span + (" or 0 (greedy)" if self.greedy else "")

  def allows(self, tau: float) -> bool:
    if self.ar:
      return tau >= 0
    return (tau == 0 and self.greedy) or self.lo - 1e-6 <= tau <= self.hi + 1e-6

  def check(self, tau: float, stage: str = "this stage") -> None:
    """Raise ValueError naming the trained range when tau is outside it."""
    if not self.allows(tau):
      raise ValueError(f"temperature {tau:g} is outside the temperatures {stage} was trained "
                       f"at: {self}")


@dataclasses.dataclass
class LoadedStage:
  """A stage's weights, sharded on `mesh`, with what is needed to run them."""
  stage: str  # "teacher" (AR) or "k<n>" (PFLM of window n)
  k: int  # 0 for the AR teacher
  model_cfg: model_lib.ModelConfig
  graphdef: Any
  params: dict
  tokenizer: tokenizer_lib.Tokenizer | None
  step: int
  meta: dict
  mesh: Mesh

  def model(self) -> model_lib.Transformer:
    return model_lib.merge(self.graphdef, self.params)

  @property
  def temperatures(self) -> Temperatures:
    return Temperatures.from_meta(self.meta, self.k)


def stages_dir(workdir: str) -> str:
  return os.path.join(workdir, "checkpoints")


def list_stages(workdir: str, include_draft: bool = False,
                include_mdlm: bool = False) -> list[str]:
  """Stages with at least one checkpoint, in chain order (teacher first, then by window and
  phase); the speculative-decoding draft and the masked-diffusion 'mdlm' (not part of the
  chain) only with include_draft / include_mdlm."""
  root = stages_dir(workdir)
  if not os.path.isdir(root):
    return []
  found = []
  for name in os.listdir(root):
    valid = (config_check.is_stage_name(name) and (include_draft or name != config_check.DRAFT)
             and (include_mdlm or name != config_check.MDLM))
    if valid and _latest_step(os.path.join(root, name)) is not None:
      found.append(name)
  return sorted(found, key=config_check.stage_order)


def _latest_step(directory: str) -> int | None:
  steps = [int(d) for d in os.listdir(directory)
           if d.isdigit() and os.path.isdir(os.path.join(directory, d))]
  return max(steps) if steps else None


def abstract_module(model_cfg: model_lib.ModelConfig, k: int):
  return pflm_lib.stage_module(model_cfg, k)[1]


def default_mesh() -> Mesh:
  """Every device on the data axis (serving: batch parallel, no tensor parallelism)."""
  return sharding.make_mesh(jax.device_count(), 1)


def _manager(directory: str) -> ocp.CheckpointManager:
  # PyTreeCheckpointHandler reads the StandardSave format and supports partial restores. The
  # data-iterator item is never read here; an ignore-handler keeps Orbax from warning about it.
  return ocp.CheckpointManager(
      directory, item_names=("state", "meta", "data_iter"),
      item_handlers={"state": ocp.PyTreeCheckpointHandler(),
                     "meta": ocp.JsonCheckpointHandler(),
                     "data_iter": ocp.JsonCheckpointHandler()})


def load_stage(workdir: str, stage: str, mesh: Mesh | None = None, use_ema: bool = True,
               step: int | None = None, fsdp: bool = False,
               load_tokenizer: bool = True) -> LoadedStage:
  """Restore a stage's parameters (its EMA when saved and `use_ema`) onto `mesh`."""
  directory = os.path.abspath(os.path.join(stages_dir(workdir), stage))
  if not os.path.isdir(directory) or _latest_step(directory) is None:
    have = list_stages(workdir)
    raise FileNotFoundError(f"stage {stage!r} has no checkpoint under {stages_dir(workdir)}; "
                            f"stages found: {have or 'none'}")
  step = _latest_step(directory) if step is None else step
  mesh = default_mesh() if mesh is None else mesh
  manager = _manager(directory)
  try:
    meta = manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
    model_cfg = model_lib.ModelConfig.from_dict(meta["model_config"])
    k = config_check.stage_k(meta.get("stage", stage))
    model_axis = mesh.shape[sharding.MODEL]
    if model_cfg.kv_heads % model_axis:  # kv heads divide the query heads
      raise ValueError(f"mesh model axis {model_axis} does not divide the checkpoint's "
                       f"n_heads={model_cfg.n_heads} / n_kv_heads={model_cfg.kv_heads}")
    abstract = abstract_module(model_cfg, k)
    graphdef, abs_params = model_lib.split_params(abstract)
    shardings = sharding.param_shardings(abstract, mesh, fsdp)
    on_disk = manager.item_metadata(step)["state"]
    on_disk = dict(on_disk.tree if hasattr(on_disk, "tree") else on_disk)
    name = "ema" if use_ema and "ema" in on_disk else "params"
    target = {name: sharding.abstract_arrays(abs_params, shardings)}
    restore = ocp.args.PyTreeRestore(
        target, restore_args=ocp.checkpoint_utils.construct_restore_args(target),
        partial_restore=True)
    params = manager.restore(step, args=ocp.args.Composite(state=restore))["state"][name]
  finally:
    manager.close()
  tok = None
  tok_path = os.path.join(workdir, TOKENIZER_FILE)
  if load_tokenizer:
    if not os.path.exists(tok_path):
      raise FileNotFoundError(f"{tok_path} is missing: the work dir has no tokenizer (pass "
                              f"load_tokenizer=False to load the weights alone)")
    tok = tokenizer_lib.Tokenizer.load(tok_path)
  return LoadedStage(stage=stage, k=k, model_cfg=model_cfg, graphdef=graphdef, params=params,
                     tokenizer=tok, step=step, meta=meta, mesh=mesh)


def final_stage_meta(workdir: str, stage: str) -> dict | None:
  """The meta of `stage` if it is final: imported (convert --from_hf / --from_torch), params
  only, so the trainer never trains it and later stages start from it; else None."""
  directory = os.path.join(stages_dir(workdir), stage)
  step = _latest_step(directory) if os.path.isdir(directory) else None
  if step is None:
    return None
  manager = _manager(directory)
  try:
    meta = manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
  finally:
    manager.close()
  return meta if meta.get("final") or "converted_from" in meta else None


def save_params_stage(workdir: str, stage: str, params: dict, model_cfg: model_lib.ModelConfig,
                      step: int = 0, extra_meta: dict | None = None) -> str:
  """Write a params-only checkpoint of `stage` (e.g. a converted model); returns its directory."""
  config_check.parse_stages(config_check.TEACHER if stage == config_check.TEACHER
                            else f"{config_check.TEACHER},{stage}")
  directory = os.path.join(stages_dir(workdir), stage)
  meta = {"model_config": dataclasses.asdict(model_cfg), "stage": stage, **(extra_meta or {})}
  ckpt = checkpoint.Checkpointer(directory)
  try:
    ckpt.save(step, {"params": params}, meta)
  finally:
    ckpt.close()
  return os.path.abspath(directory)
