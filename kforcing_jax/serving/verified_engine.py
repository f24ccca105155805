"""Continuous batching of the lossless methods (`pflm_verified`, `spec`, `spec_dynamic`): the AR
teacher verifies a drafter (a PFLM stage or the 'draft' model) in slots, behind the same server.

The host side is `engine.ServingEngine`'s (queue, batched prefill per prompt bucket, right-sized
steps with compaction, bursts, delivery overlapped with the next step, EOS / stop strings /
max_tokens on the host); only the device programs differ. A slot holds one row of
`speculative.VerifyState` with its own prompt length and token limit, and every step is one
`speculative.verify_step`: the rows advance raggedly, each by its own accepted drafts + 1
(1 to gamma + 1 tokens), inside one fixed-shape program. A prefill fills both caches over the
prompt and produces no token (the prompt's last token is the first step's pending one).

Requests decode exactly as offline `VerifiedEngine.generate([prompt], spec, seed)` does: row
uniforms from the request's seed (`decode.seed_keys`), the prompt in its own bucket, the
sampling controls per row (arrays: no recompiling), pflm_verified drafting at the trained
temperature nearest the request's (`methods.nearest_temperature`). So pflm_verified serves the
AR teacher's tokens, token for token; spec and spec_dynamic its distribution.
"""

import functools

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from kforcing_jax.distill import sampling
from kforcing_jax.model import transformer as model_lib
from kforcing_jax.parallel import sharding
from kforcing_jax.serving import decode, methods, speculative
from kforcing_jax.serving import engine as engine_lib


@flax.struct.dataclass
class VerifiedSlots:
  v: speculative.VerifyState  # one row per slot; passes is per row here
  controls: sampling.Controls  # the teacher's sampling controls, per row
  draft_tau_B: jax.Array  # pflm_verified: the temperature its drafter is fed, per row


class VerifiedServingEngine(engine_lib.ServingEngine):
  """Slots decoded by `spec.method` (speculative.METHODS): `teacher` verifies `drafter` (both
  stage_io.LoadedStage on one mesh; speculative.VerifiedEngine checks the pairing)."""

  def __init__(self, teacher, drafter, spec: speculative.VerifySpec, slots: int = 16,
               max_prompt_len: int = 128, max_tokens: int = 256, max_queue: int = 64,
               eos_id: int | None = None, burst: int = 4):
    if slots < 1 or max_prompt_len < 1 or max_tokens < 1 or max_queue < 0 or burst < 1:
      raise ValueError("slots, max_prompt_len, max_tokens and burst must be >= 1, max_queue >= 0")
    speculative.VerifiedEngine(teacher, drafter).check(spec)  # the pairing, with its errors
    self.loaded, self.drafter, self.cfg = teacher, drafter, teacher.model_cfg
    # Static settings only: controls are per row, EOS is on the host, the limit is per row.
    self.spec = speculative.VerifySpec(spec.method, gamma=spec.gamma, max_new_tokens=max_tokens,
                                       confidence=spec.confidence)
    self.drafted = self.accepted = 0  # drafts proposed / accepted for live requests
    self._setup(spec.gamma, slots, max_prompt_len, max_tokens, max_queue, eos_id, burst,
                params=(teacher.params, drafter.params), prefill_tokens=0, step_tokens=1)

  def _build(self):
    spec, g, mesh = self.spec, self.spec.gamma, self.mesh
    tg, dg = self.loaded.graphdef, self.drafter.graphdef
    tcfg, dcfg = self.cfg, self.drafter.model_cfg
    n_seq = spec.seq_len(self.max_prompt_len)
    rep = sharding.replicated(mesh)
    self._param_sh = jax.tree.map(lambda x: x.sharding, self._params)

    def init():
      zi = jnp.zeros((self.slots,), jnp.int32)
      # Free slots are done rows at a harmless position (prompt length 2, nothing generated).
      v = speculative.VerifyState(
          seq_BxS=jnp.zeros((self.slots, n_seq), jnp.int32), n_B=zi,
          t_cache=model_lib.init_cache(tcfg, self.slots, n_seq),
          d_cache=model_lib.init_cache(dcfg, self.slots, n_seq), d_len_B=zi, pad_B=zi,
          keys_Bx2=jnp.zeros((self.slots, 2), jnp.uint32),
          done_B=jnp.ones((self.slots,), bool), passes=zi, drafted_B=zi, accepted_B=zi,
          plen_B=zi + 2, limit_B=zi)
      return VerifiedSlots(v=v, controls=sampling.Controls.rows(self.slots),
                           draft_tau_B=jnp.ones((self.slots,), jnp.float32))

    def admit(params, state, prompt_BxP, pad_B, seeds_B, limit_B, controls, draft_tau_B,
              slot_B):
      """Both caches over a batch of prompts of one bucket, into slots slot_B (>= slots: a
      padding row, dropped); row b's uniforms are row 0 of seed seeds_B[b]'s stream."""
      teacher, drafter = model_lib.merge(tg, params[0]), model_lib.merge(dg, params[1])
      b, plen = prompt_BxP.shape
      put = lambda big, small: big.at[slot_B].set(small.astype(big.dtype), mode="drop")
      put_cache = lambda big, small: big.at[slot_B, :, :plen].set(small.astype(big.dtype),
                                                                  mode="drop")
      fill = lambda m, old: jax.tree.map(
          put_cache, old, speculative.prefill_cache(m, prompt_BxP, pad_B, plen))
      full = lambda x: jnp.full((b,), x, jnp.int32)
      v = state.v
      seq = jnp.zeros((b, n_seq), jnp.int32).at[:, :plen].set(prompt_BxP)
      v = v.replace(seq_BxS=put(v.seq_BxS, seq), n_B=put(v.n_B, full(0)),
                    t_cache=fill(teacher, v.t_cache), d_cache=fill(drafter, v.d_cache),
                    d_len_B=put(v.d_len_B, full(plen - 1)), pad_B=put(v.pad_B, pad_B),
                    keys_Bx2=put(v.keys_Bx2, decode.seed_keys(seeds_B)),
                    done_B=put(v.done_B, jnp.zeros((b,), bool)), passes=put(v.passes, full(0)),
                    drafted_B=put(v.drafted_B, full(0)), accepted_B=put(v.accepted_B, full(0)),
                    plen_B=put(v.plen_B, full(plen)), limit_B=put(v.limit_B, limit_B))
      return state.replace(v=v, controls=jax.tree.map(put, state.controls, controls),
                           draft_tau_B=put(state.draft_tau_B, draft_tau_B))

    def step(params, state, size, n):
      teacher, drafter = model_lib.merge(tg, params[0]), model_lib.merge(dg, params[1])

      def advance(part):
        v, toks, emitted, drafted = speculative.emitting_step(
            teacher, drafter, spec, part.v, part.controls, part.draft_tau_B)
        return part.replace(v=v), (toks, emitted, drafted)
      return engine_lib.sized_step(advance, self.slots, state, size, n)

    v_ranks = speculative.VerifyState(
        seq_BxS=2, n_B=1, t_cache=((4,) * tcfg.n_layers,) * 2,
        d_cache=((4,) * dcfg.n_layers,) * 2, d_len_B=1, pad_B=1, keys_Bx2=2, done_B=1,
        passes=1, drafted_B=1, accepted_B=1, plen_B=1, limit_B=1)
    self._state_sh = sharding.decode_state_shardings(
        mesh, VerifiedSlots(v=v_ranks, controls=sampling.Controls(1, 1, 1, 1), draft_tau_B=1))
    rows_sh = NamedSharding(mesh, P(None, sharding.DATA))
    out_sh = (NamedSharding(mesh, P(None, sharding.DATA, None)), rows_sh, rows_sh)
    platform = mesh.devices.flat[0].platform
    wbytes = decode.weight_bytes(self._params)
    self._init = jax.jit(init, out_shardings=self._state_sh)
    self._admit = jax.jit(admit, in_shardings=(self._param_sh, self._state_sh) + (rep,) * 7,
                          out_shardings=self._state_sh, donate_argnums=1)
    self._move = jax.jit(engine_lib.move_row, out_shardings=self._state_sh, donate_argnums=0)
    rows = 2 * g + 1 if spec.method == "pflm_verified" else g + 1
    self._steps = {
        (size, n): jax.jit(functools.partial(step, size=size, n=n),
                           in_shardings=(self._param_sh, self._state_sh),
                           out_shardings=(self._state_sh, out_sh), donate_argnums=1,
                           compiler_options=decode.compiler_options(platform, size * rows,
                                                                    wbytes))
        for size in self.sizes for n in sorted({1, self.burst})}

  # ---- host side ----

  def check_sampling(self, req: engine_lib.Request) -> None:
    """The teacher's distribution under any valid controls; no frequency penalty (the output is
    the teacher's own)."""
    engine_lib.check_ranges(req)
    if req.frequency_penalty:
      raise engine_lib.Unsupported(
          "frequency_penalty", f"frequency_penalty is not supported by {self.spec.method}: it "
          "serves the AR teacher's own distribution (lossless)")

  def _admit_batch(self, reqs, slots, plen, rows=None):
    x, pad, seeds, controls, slot_B, reqs, _ = self._prefill_inputs(reqs, slots, plen, rows)
    limit = np.asarray([r.max_tokens for r in reqs], np.int32)
    draft_tau = np.asarray([self._draft_tau(r.temperature) for r in reqs], np.float32)
    state = self._admit(self._params, self.state, x, pad, seeds, limit, controls, draft_tau,
                        slot_B)
    return state, None  # a prefill produces no token

  def _draft_tau(self, temperature: float) -> float:
    if self.spec.method != "pflm_verified":
      return 1.0  # (unused: an AR draft samples under the row's controls)
    return methods.nearest_temperature(self.drafter.temperatures, temperature)

  def _step_key(self, size: int, n: int) -> tuple:
    return size, n  # (the whole cache: rows advance by up to gamma + 1 tokens a step)

  def _row_tokens(self, y, row: int) -> list[int]:
    toks, emitted, drafted = y
    out = []
    for i in range(toks.shape[0]):
      e = int(emitted[i, row])
      out += toks[i, row, :e].tolist()
      if e:
        self.drafted += int(drafted[i, row])
        self.accepted += e - 1
    return out

  def stats(self) -> dict:
    st = super().stats()
    st.update(drafted=self.drafted, accepted=self.accepted)
    return st
