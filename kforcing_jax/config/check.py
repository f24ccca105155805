"""Config validation: every bad value fails here, before anything compiles, naming the field."""

import ml_collections

import re

TEACHER = "teacher"
DRAFT = "draft"  # the speculative-decoding draft model: AR, trained on data, outside the chain
MDLM = "mdlm"  # the masked-diffusion baseline: bidirectional, trained on data, outside the chain
SIDE_STAGES = (DRAFT, MDLM)  # trained from the data, never a PFLM's teacher
SOURCES = ("kjv", "text_files", "tfds")
TOKENIZERS = ("bpe", "gpt2", "bert-base-uncased")
BPE_ID_ORDERS = ("merges", "frequency")
MIN_BPE_VOCAB = 259  # 256 bytes + end-of-document + mask
DTYPES = ("float32", "bfloat16")
TARGETS = ("self_forcing", "ar_rollout", "noise_inversion")  # config.distill.target
OPTIMIZERS = ("adamw", "muon")  # config.optim.name (training/optimizer.py)


class UserError(ValueError):
  """A mistake in what the user asked for (a value, a file): command-line entry points print
  its message as one line and exit with status 2, without a traceback (kforcing_jax/cli.py)."""


class ConfigError(UserError):
  """An invalid config value; the message starts with the offending field."""


def _require(ok: bool, field: str, msg: str) -> None:
  if not ok:
    raise ConfigError(f"config.{field}: {msg}")


# "k<n>" distils a PFLM(n); "k<n>_<p>" (p >= 2) is phase p of it: the same window, teacher and
# targets, starting from phase p - 1's weights with its own optimizer, schedule and steps, and a
# fresh data order and noise (seed + p - 1). A stage can so train on after its cosine schedule
# ended, measured phase by phase.
_STAGE_RE = re.compile(r"k([1-9]\d*)(?:_([2-9]|[1-9]\d+))?")


def stage_k(name: str) -> int:
  """Window of a stage: 0 for the models without a noise encoder (teacher, draft, mdlm), n for
  "k<n>" and "k<n>_<p>"."""
  return 0 if name in (TEACHER, *SIDE_STAGES) else int(_STAGE_RE.fullmatch(name).group(1))


def stage_phase(name: str) -> int:
  """p of a phase stage "k<n>_<p>"; 1 for every other stage."""
  m = _STAGE_RE.fullmatch(name)
  return int(m.group(2)) if m and m.group(2) else 1


def base_stage(name: str) -> str:
  """"k<n>" of a phase stage "k<n>_<p>"; the name itself for every other stage."""
  return f"k{stage_k(name)}" if stage_phase(name) > 1 else name


def phase_name(base: str, phase: int) -> str:
  """Name of phase `phase` of stage `base` ("k<n>"): the base itself for phase 1."""
  return base if phase == 1 else f"{base}_{phase}"


def stage_order(name: str) -> tuple[int, int]:
  """Sort key putting stages in chain order: by window, then phase (the mdlm after the teacher
  and the draft, before the PFLMs)."""
  return stage_k(name), 2 if name == MDLM else stage_phase(name)


def chain(stages: list[str]) -> list[tuple[str | None, str]]:
  """(previous stage, stage) in run order; a PFLM stage's previous stage is the one before it
  in the chain, skipping the draft (which trains from data on its own). The previous stage
  gives a PFLM stage its starting weights (see `target_source` for its targets)."""
  out, prev = [], None
  for name in stages:
    out.append((prev, name))
    if name not in SIDE_STAGES:
      prev = name
  return out


def target_source(stages: list[str], stage: str) -> str | None:
  """The stage before `stage`'s base "k<n>" in the chain: what a phase "k<n>_<p>" shares with
  "k<n>" to make the same kind of targets (for "k<n>" itself, its previous stage)."""
  prev = dict((cur, p) for p, cur in chain(stages))
  return prev[base_stage(stage)]


def parse_stages(stages: str) -> list[str]:
  """Stage names in order; the chain always starts at the AR teacher (a finished teacher stage
  is skipped on resume, so "teacher,k1,k2,k4" also continues an existing teacher)."""
  names = [s.strip() for s in stages.split(",") if s.strip()]
  _require(bool(names), "stages", "is empty; use e.g. 'teacher' or 'teacher,k1,k2,k4'")
  for name in names:
    _require(is_stage_name(name), "stages",
             f"unknown stage {name!r}; stages are 'teacher', 'draft', 'mdlm', 'k<n>' (n >= 1) "
             f"and its later phases 'k<n>_<p>' (p >= 2), e.g. 'teacher,k1,k2,k4' or "
             f"'teacher,k4,k4_2'")
  _require(len(set(names)) == len(names), "stages", f"repeats a stage: {stages!r}")
  _require(names[0] == TEACHER, "stages", f"must start with 'teacher', got {stages!r}")
  _require(TEACHER not in names[1:], "stages", "'teacher' can only be the first stage")
  pflm = [n for n in names if n not in SIDE_STAGES]
  for prev, cur in zip(pflm, pflm[1:]):
    phase, base = stage_phase(cur), base_stage(cur)
    if phase > 1:
      before = phase_name(base, phase - 1)
      _require(prev == before, "stages", f"{cur} is phase {phase} of {base} and must directly "
               f"follow {before} (the draft aside), not {prev}")
  for prev, cur in zip(pflm[1:], pflm[2:]):
    if stage_phase(cur) > 1:
      continue
    kp, kc = stage_k(prev), stage_k(cur)
    _require(kc % kp == 0 and kc // kp >= 2, "stages",
             f"{cur} cannot follow {prev}: a PFLM(k) teacher rolled out R >= 2 rounds gives "
             f"windows R*k, so the next window must be a multiple of {kp} and at least {2 * kp}")
  return names


HEAD_BIAS_INITS = ("zeros", "unigram")

# What a stage may override (config.stage_overrides.<stage>): anything that changes how long and
# how fast a stage trains, nothing that changes the model or the data.
OVERRIDABLE = {"optim": None,  # every optim field
               "train": ("num_steps", "log_every", "eval_every", "eval_batches", "ckpt_every"),
               "batch_size": ()}


def is_stage_name(name: str) -> bool:
  return name in (TEACHER, *SIDE_STAGES) or bool(_STAGE_RE.fullmatch(name))


def _check_override(config: ml_collections.ConfigDict, stage: str, over) -> None:
  """Every field of stage_overrides.<stage> exists, may be overridden, and has the base type."""
  where = f"stage_overrides.{stage}"
  _require(isinstance(over, (dict, ml_collections.ConfigDict)), where,
           f"must be a dict of fields, got {type(over).__name__}")
  for group, value in over.items():
    _require(group in OVERRIDABLE, f"{where}.{group}",
             f"cannot be set per stage; allowed: {sorted(OVERRIDABLE)}")
    if value is None:  # an unset placeholder (config.base.stage_override): the base value
      continue
    if group == "batch_size":
      _require(isinstance(value, int), f"{where}.batch_size", f"must be an int, got {value!r}")
      continue
    _require(isinstance(value, (dict, ml_collections.ConfigDict)), f"{where}.{group}",
             f"must be a dict of {group} fields, got {value!r}")
    allowed = OVERRIDABLE[group] or tuple(config[group].keys())
    for name, v in value.items():
      _require(name in allowed, f"{where}.{group}.{name}",
               f"is not a {group} field that a stage can override; allowed: {sorted(allowed)}")
      if v is None:
        continue
      base = config[group][name]
      ok = isinstance(v, type(base)) or (isinstance(base, float) and isinstance(v, int))
      _require(ok and not (isinstance(v, bool) and not isinstance(base, bool)),
               f"{where}.{group}.{name}", f"must be a {type(base).__name__} like the base "
               f"config.{group}.{name}, got {v!r}")


def stage_config(config: ml_collections.ConfigDict, stage: str) -> ml_collections.ConfigDict:
  """The config as `stage` sees it: config.stage_overrides.<stage> merged over the base."""
  out = ml_collections.ConfigDict(config.to_dict())
  if stage_phase(stage) > 1:
    out.seed = config.seed + stage_phase(stage) - 1  # a fresh data order and noise stream
  over = config.get("stage_overrides", {}).get(stage)
  if over is None:
    return out
  _check_override(config, stage, over)
  for group, value in over.items():
    if value is None:
      continue
    if group == "batch_size":
      out.batch_size = value
    else:
      for name, v in value.items():
        if v is not None:
          out[group][name] = type(config[group][name])(v)
  return out


def stage_steps(config: ml_collections.ConfigDict, stage: str) -> int:
  """Optimizer steps of `stage`."""
  return stage_config(config, stage).train.num_steps


def mesh_shape(config: ml_collections.ConfigDict, n_devices: int) -> tuple[int, int]:
  """(data, model) axis sizes with mesh.data = -1 resolved against the device count."""
  model = config.mesh.model
  _require(isinstance(model, int) and model >= 1, "mesh.model", f"must be >= 1, got {model}")
  _require(n_devices % model == 0, "mesh.model",
           f"{model} does not divide the {n_devices} available devices")
  data = n_devices // model if config.mesh.data == -1 else config.mesh.data
  _require(isinstance(data, int) and data >= 1, "mesh.data", f"must be -1 or >= 1, got {data}")
  _require(data * model == n_devices, "mesh.data",
           f"mesh.data * mesh.model = {data} * {model} = {data * model}, but there are "
           f"{n_devices} devices; the product must equal the device count (or set mesh.data=-1)")
  return data, model


def validate(config: ml_collections.ConfigDict, n_devices: int, process_count: int = 1) -> None:
  """Raise ConfigError for the first invalid field. Cheap: touches no device."""
  stages = parse_stages(config.stages)
  for name, over in config.get("stage_overrides", {}).items():
    _require(is_stage_name(name), f"stage_overrides.{name}",
             f"{name!r} is not a stage name ('teacher', 'draft', 'mdlm', 'k<n>' or 'k<n>_<p>'); "
             f"stages here: {stages}")
    _check_override(config, name, over)
  dc = config.distill
  _require(dc.target in TARGETS, "distill.target", f"must be one of {TARGETS}, got {dc.target!r}")
  chain_stages = {base_stage(n) for n in stages} - set(SIDE_STAGES)
  _require(dc.target != "noise_inversion" or len(chain_stages) <= 2,
           "distill.target", "noise_inversion distils the AR teacher directly: use "
           "stages='teacher,k<n>' (and its phases k<n>_<p>)")
  _require(0 < dc.tau_min <= dc.tau_max, "distill.tau_min",
           f"need 0 < tau_min <= tau_max, got {dc.tau_min} and {dc.tau_max}")
  _require(0.0 <= dc.greedy_share < 1.0, "distill.greedy_share",
           f"must be in [0, 1), got {dc.greedy_share}")
  _require(0.0 <= dc.tau_one_share <= 1.0, "distill.tau_one_share",
           f"must be in [0, 1], got {dc.tau_one_share}")
  _require(dc.tau_one_share == 0.0 or dc.tau_min <= 1.0 <= dc.tau_max, "distill.tau_one_share",
           f"needs 1 in [tau_min, tau_max] = [{dc.tau_min}, {dc.tau_max}]")
  _require(dc.greedy_share == 0.0 or dc.target != "noise_inversion", "distill.greedy_share",
           "noise inversion targets real tokens: it has no greedy rollout")
  _require(0.0 <= dc.cdf_blur < 1.0, "distill.cdf_blur",
           f"must be in [0, 1) (0 = one-hot targets), got {dc.cdf_blur}")
  _require(0.0 <= dc.own_prefix <= 1.0, "distill.own_prefix",
           f"must be in [0, 1] (a fraction of windows), got {dc.own_prefix}")
  _require(dc.own_prefix == 0.0 or dc.target != "noise_inversion", "distill.own_prefix",
           "needs the AR teacher's rollout as targets; noise_inversion's are real tokens")
  m = config.model
  _require(m.n_layers >= 1, "model.n_layers", f"must be >= 1, got {m.n_layers}")
  _require(m.n_heads >= 1, "model.n_heads", f"must be >= 1, got {m.n_heads}")
  _require(m.head_size or m.d_model % m.n_heads == 0, "model.d_model",
           f"{m.d_model} is not divisible by model.n_heads={m.n_heads}")
  _require(m.head_size or (m.d_model // m.n_heads) % 2 == 0, "model.n_heads",
           f"head_dim = d_model / n_heads = {m.d_model // m.n_heads} must be even (rotary)")
  _require(m.mlp_ratio >= 1, "model.mlp_ratio", f"must be >= 1, got {m.mlp_ratio}")
  _require(m.vocab_size == -1 or m.vocab_size >= 2, "model.vocab_size",
           f"must be -1 (from the tokenizer) or >= 2, got {m.vocab_size}")
  _require(m.dtype in DTYPES, "model.dtype", f"must be one of {DTYPES}, got {m.dtype!r}")
  _require(m.noise_max_freq > 0, "model.noise_max_freq", f"must be > 0, got {m.noise_max_freq}")
  _require(m.norm in ("scale", "rms"), "model.norm", f"must be 'scale' or 'rms', got {m.norm!r}")
  _require(m.mlp in ("gelu", "swiglu"), "model.mlp", f"must be 'gelu' or 'swiglu', got {m.mlp!r}")
  _require(m.n_kv_heads == 0 or (m.n_kv_heads >= 1 and m.n_heads % m.n_kv_heads == 0),
           "model.n_kv_heads", f"must be 0 (= n_heads) or divide model.n_heads={m.n_heads}, got "
           f"{m.n_kv_heads}")
  _require(m.head_size == 0 or (m.head_size >= 2 and m.head_size % 2 == 0), "model.head_size",
           f"must be 0 (d_model / n_heads) or even (rotary), got {m.head_size}")
  _require(m.mlp_hidden >= 0, "model.mlp_hidden", f"must be >= 0, got {m.mlp_hidden}")
  md = config.mdlm
  for name in ("prompt_share", "cut_share"):
    _require(0.0 <= md[name] <= 1.0, f"mdlm.{name}",
             f"must be in [0, 1] (a share of training sequences), got {md[name]}")
  _require(MDLM not in stages or m.mask_token, "model.mask_token",
           "the mdlm stage masks with the reserved mask id: model.mask_token must be True")
  dr = config.draft
  for name in ("d_model", "n_layers", "n_heads"):
    _require(isinstance(dr[name], int) and dr[name] >= 1, f"draft.{name}",
             f"must be an int >= 1, got {dr[name]!r}")
  _require(dr.d_model % dr.n_heads == 0 and (dr.d_model // dr.n_heads) % 2 == 0,
           "draft.d_model", f"{dr.d_model} / draft.n_heads={dr.n_heads} must be an even head_dim")

  d = config.data
  _require(d.source in SOURCES, "data.source", f"must be one of {SOURCES}, got {d.source!r}")
  _require(d.source != "text_files" or bool(d.text_files.strip()), "data.text_files",
           "is empty but data.source='text_files'; give comma-separated paths or globs")
  _require(d.source != "tfds" or bool(d.tfds_name), "data.tfds_name",
           "is empty but data.source='tfds'; e.g. 'lm1b' or 'openwebtext'")
  _require(d.tokenizer in TOKENIZERS, "data.tokenizer",
           f"must be one of {TOKENIZERS}, got {d.tokenizer!r}")
  _require(0.0 < d.val_fraction < 1.0, "data.val_fraction",
           f"must be in (0, 1), got {d.val_fraction}")
  _require(d.bpe_id_order in BPE_ID_ORDERS, "data.bpe_id_order",
           f"must be one of {BPE_ID_ORDERS}, got {d.bpe_id_order!r}")
  _require(d.bpe_vocab_size >= MIN_BPE_VOCAB, "data.bpe_vocab_size",
           f"must be >= {MIN_BPE_VOCAB} (256 bytes + eos + mask), got {d.bpe_vocab_size}")
  _require(d.worker_count >= 0, "data.worker_count", f"must be >= 0, got {d.worker_count}")
  _require(config.seq_len >= 2, "seq_len", f"must be >= 2, got {config.seq_len}")
  _require(config.train.head_bias_init in HEAD_BIAS_INITS, "train.head_bias_init",
           f"must be one of {HEAD_BIAS_INITS}, got {config.train.head_bias_init!r}")

  data, model = mesh_shape(config, n_devices)
  kv_heads = m.n_kv_heads or m.n_heads
  _require(kv_heads % model == 0, "model.n_kv_heads" if m.n_kv_heads else "model.n_heads",
           f"{kv_heads} {'kv ' if m.n_kv_heads else ''}heads are not divisible by the model "
           f"axis (mesh.model={model})")
  mlp_width = m.mlp_hidden or m.mlp_ratio * m.d_model
  _require(mlp_width % model == 0, "model.mlp_hidden" if m.mlp_hidden else "model.mlp_ratio",
           f"MLP width {mlp_width} is not divisible by mesh.model={model}")
  _require(not config.mesh.fsdp or m.d_model % data == 0, "mesh.fsdp",
           f"FSDP shards d_model={m.d_model} over the data axis ({data}), which does not divide it")
  _validate_schedule(config, "", data, process_count)
  for name in stages:
    if name in config.get("stage_overrides", {}):
      _validate_schedule(stage_config(config, name), f"stage_overrides.{name}.", data,
                         process_count)


def _validate_schedule(config: ml_collections.ConfigDict, prefix: str, data: int,
                       process_count: int) -> None:
  """Batch, optimizer and loop fields of the base config, or of one stage's merged config
  (prefix 'stage_overrides.<stage>.' names the field the user set)."""
  _require(config.batch_size >= 1, prefix + "batch_size", f"must be >= 1, got {config.batch_size}")
  _require(config.batch_size % data == 0, prefix + "batch_size",
           f"global batch {config.batch_size} is not divisible by the data axis "
           f"(mesh.data={data}); use a multiple of {data}")
  _require(config.batch_size % process_count == 0, prefix + "batch_size",
           f"global batch {config.batch_size} is not divisible by the {process_count} processes")
  o = config.optim
  _require(o.name in OPTIMIZERS, prefix + "optim.name",
           f"must be one of {OPTIMIZERS}, got {o.name!r}")
  _require(0.0 <= o.muon_beta < 1.0, prefix + "optim.muon_beta",
           f"must be in [0, 1), got {o.muon_beta}")
  _require(o.lr > 0, prefix + "optim.lr", f"must be > 0, got {o.lr}")
  _require(o.schedule in ("constant", "cosine"), prefix + "optim.schedule",
           f"must be 'constant' or 'cosine', got {o.schedule!r}")
  _require(o.warmup_steps >= 0, prefix + "optim.warmup_steps", f"must be >= 0, got {o.warmup_steps}")
  _require(0.0 <= o.final_lr_frac <= 1.0, prefix + "optim.final_lr_frac",
           f"must be in [0, 1], got {o.final_lr_frac}")
  for name in ("b1", "b2"):
    _require(0.0 <= o[name] < 1.0, prefix + f"optim.{name}", f"must be in [0, 1), got {o[name]}")
  _require(o.eps > 0, prefix + "optim.eps", f"must be > 0, got {o.eps}")
  _require(o.weight_decay >= 0, prefix + "optim.weight_decay", f"must be >= 0, got {o.weight_decay}")
  _require(o.grad_clip >= 0, prefix + "optim.grad_clip", f"must be >= 0 (0 = off), got {o.grad_clip}")
  _require(0.0 <= o.ema_decay < 1.0, prefix + "optim.ema_decay",
           f"must be in [0, 1) (0 = off), got {o.ema_decay}")

  t = config.train
  for name in ("num_steps", "log_every", "eval_every", "eval_batches", "ckpt_every",
               "keep_checkpoints"):
    _require(t[name] >= 1, prefix + f"train.{name}", f"must be >= 1, got {t[name]}")
  _require(o.warmup_steps < t.num_steps, prefix + "optim.warmup_steps",
           f"{o.warmup_steps} warm-up steps do not fit in the stage's {t.num_steps} steps "
           f"(train.num_steps); the lr would never reach its peak")
