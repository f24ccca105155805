"""The decode methods by name and the stages they decode: the one default-stage rule and the one
wiring of the lossless methods (which stage drafts, the verifier, the VerifySpec), for generate,
benchmark, evaluate and serve.

  ar              the AR teacher, one token per pass (decode.py)
  pflm            a PFLM stage, k tokens per pass (decode.py)
  pflm_verified   a PFLM stage drafts k' tokens per teacher pass (speculative.py; lossless)
  spec            the 'draft' stage drafts gamma tokens, speculative sampling (lossless)
  spec_dynamic    as spec, drafting stops below a confidence (lossless)
  mdlm            the masked-diffusion stage 'mdlm', K tokens committed per pass by confidence,
                  left to right or at random (serving/mdlm.py); a baseline, not lossless
"""

from kforcing_jax.config import check as config_check
from kforcing_jax.distill import sampling
from kforcing_jax.serving import decode, mdlm, speculative
from kforcing_jax.training import stage_io

LOSSLESS = speculative.METHODS
# Which stage drafts for each lossless method: a PFLM stage of the chain, or the AR 'draft'.
DRAFTER = {"pflm_verified": "pflm", "spec": config_check.DRAFT,
           "spec_dynamic": config_check.DRAFT}


def pflm_stages(workdir: str) -> list[str]:
  """The chain's PFLM stages (every stage but the teacher and the draft), in chain order."""
  return [s for s in stage_io.list_stages(workdir) if s != config_check.TEACHER]


def default_stage(workdir: str, method: str = "") -> str:
  """The stage a tool decodes when none is named: the 'draft' for the methods it drafts, the
  'mdlm' for method mdlm, else the last stage of the chain (the widest PFLM once one is
  trained); '' when there is none."""
  if DRAFTER.get(method) == config_check.DRAFT:
    return config_check.DRAFT
  if method == MDLM:
    return config_check.MDLM if has_mdlm(workdir) else ""
  found = stage_io.list_stages(workdir)
  return found[-1] if found else ""


def default_pflm_stage(workdir: str) -> str:
  """The PFLM stage decoded when none is named: the last of the chain ('' when none)."""
  found = pflm_stages(workdir)
  return found[-1] if found else ""


def has_draft(workdir: str) -> bool:
  return config_check.DRAFT in stage_io.list_stages(workdir, include_draft=True)


MDLM = "mdlm"  # the method name, and its stage's (config_check.MDLM)


def has_mdlm(workdir: str) -> bool:
  return config_check.MDLM in stage_io.list_stages(workdir, include_mdlm=True)


def mdlm_spec(max_new_tokens: int, k: int, commit: str = "confidence", block: int = 0,
              controls: sampling.Controls = sampling.Controls(),
              eos_id: int | None = None, rerank: float = 0.0) -> mdlm.MdlmDecodeSpec:
  """The mdlm stage's decoding: K tokens per pass by `commit` (mdlm.COMMITS), in blocks of
  `block` (0: anywhere), tokens sampled under `controls`; `rerank`: the confidence rule's
  attention discount (0: off)."""
  return mdlm.MdlmDecodeSpec(k=k, max_new_tokens=max_new_tokens, commit=commit, block=block,
                             rerank=rerank, tau=controls.temperature, top_k=controls.top_k,
                             top_p=controls.top_p, min_p=controls.min_p, eos_id=eos_id)


def mdlm_engine(loaded) -> mdlm.MdlmEngine:
  """The decoder of a loaded 'mdlm' stage (refuses any other stage)."""
  if loaded.model_cfg.attention != "bidirectional":
    raise ValueError(f"method mdlm decodes the masked-diffusion stage 'mdlm', not "
                     f"{loaded.stage!r}")
  return mdlm.MdlmEngine.from_stage(loaded)


def verified_engine(teacher, method: str, pflm=None, draft=None) -> speculative.VerifiedEngine:
  """The teacher verifying `method`'s drafter: `pflm` (a PFLM LoadedStage) for pflm_verified,
  `draft` (the 'draft' LoadedStage) for spec and spec_dynamic."""
  if method not in DRAFTER:
    raise ValueError(f"unknown lossless method {method!r}; choose from {LOSSLESS}")
  drafter = pflm if DRAFTER[method] == "pflm" else draft
  if drafter is None:
    raise ValueError(f"{method} needs a {DRAFTER[method]} stage to draft with")
  return speculative.VerifiedEngine(teacher, drafter)


def load_verifier(workdir: str, drafter, method: str, use_ema: bool = True):
  """The AR teacher (a LoadedStage on the drafter's mesh) that verifies `drafter` for `method`,
  after checking the pairing: pflm_verified drafts with a PFLM stage, spec and spec_dynamic with
  the 'draft' stage."""
  if method not in DRAFTER:
    raise ValueError(f"unknown lossless method {method!r}; choose from {LOSSLESS}")
  if DRAFTER[method] == "pflm":
    if drafter.k == 0:
      raise ValueError(f"{method} drafts with a PFLM stage (k<n>), not {drafter.stage!r}")
  elif drafter.stage != config_check.DRAFT:
    raise ValueError(f"{method} drafts with the 'draft' stage, not {drafter.stage!r}")
  return stage_io.load_stage(workdir, config_check.TEACHER, use_ema=use_ema, mesh=drafter.mesh,
                             load_tokenizer=False)


def verify_spec(method: str, drafter_k: int, max_new_tokens: int, k: int = 0, gamma: int = 4,
                controls: sampling.Controls = sampling.Controls(), confidence: float = 0.4,
                eos_id: int | None = None,
                drafter_temps: stage_io.Temperatures | None = None) -> speculative.VerifySpec:
  """pflm_verified drafts k tokens per teacher pass (0: the drafter's trained window
  `drafter_k`) at the trained temperature nearest the teacher's (`drafter_temps`); spec and
  spec_dynamic draft `gamma`. The output follows the teacher under `controls`."""
  draft_tau = None
  if DRAFTER.get(method) == "pflm":
    gamma = k or drafter_k
    draft_tau = nearest_temperature(drafter_temps or stage_io.Temperatures(), controls.temperature)
  return speculative.VerifySpec(method, gamma=gamma, max_new_tokens=max_new_tokens,
                                tau=controls.temperature, top_k=controls.top_k,
                                top_p=controls.top_p, min_p=controls.min_p,
                                draft_tau=draft_tau, confidence=confidence, eos_id=eos_id)


def nearest_temperature(temps: stage_io.Temperatures, tau: float) -> float:
  """The temperature a PFLM drafts best at for a teacher sampling at tau: tau itself when the
  stage was trained at it, else the nearest trained one (drafts stay lossless either way)."""
  if temps.allows(tau):
    return tau
  return min(max(tau, temps.lo), temps.hi)


def decode_spec(stage_k: int, max_new_tokens: int, k: int = 0,
                controls: sampling.Controls = sampling.Controls(), frequency_penalty: float = 0.0,
                eos_id: int | None = None):
  """The DecodeSpec of a stage's own decoding: the AR baseline for the teacher (any controls),
  a PFLM(k, default its trained k) else (temperature only: filters are refused by the spec)."""
  if stage_k == 0:
    if k > 1:
      raise ValueError(f"k={k}: the teacher is an AR model and decodes one token per step")
    return decode.DecodeSpec(k=1, max_new_tokens=max_new_tokens, ar=True,
                             tau=controls.temperature, top_k=controls.top_k,
                             top_p=controls.top_p, min_p=controls.min_p,
                             frequency_penalty=frequency_penalty, eos_id=eos_id)
  return decode.DecodeSpec(k=k or stage_k, max_new_tokens=max_new_tokens,
                           tau=controls.temperature, top_k=controls.top_k, top_p=controls.top_p,
                           min_p=controls.min_p, frequency_penalty=frequency_penalty,
                           eos_id=eos_id)


def controls_label(controls: sampling.Controls) -> str:
  """'' at the defaults, else e.g. '_t0.8_p0.9' / '_greedy': a suffix for method names."""
  if controls.temperature == 0:
    return "_greedy"
  parts = [f"t{controls.temperature:g}"] if controls.temperature != 1 else []
  parts += [f"k{controls.top_k}"] if controls.top_k > 0 else []
  parts += [f"p{controls.top_p:g}"] if controls.top_p < 1 else []
  parts += [f"minp{controls.min_p:g}"] if controls.min_p > 0 else []
  return "".join("_" + p for p in parts)


def name(spec) -> str:
  """The method a spec decodes with: a VerifySpec's own, 'mdlm', else 'ar' or 'pflm'."""
  if isinstance(spec, speculative.VerifySpec):
    return spec.method
  if isinstance(spec, mdlm.MdlmDecodeSpec):
    return MDLM
  return "ar" if spec.ar else "pflm"


def window(spec) -> int:
  """Tokens per step (a DecodeSpec's k) or drafted per teacher pass (a VerifySpec's gamma)."""
  return spec.gamma if isinstance(spec, speculative.VerifySpec) else spec.k
