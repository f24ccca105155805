"""Serve a trained stage behind an OpenAI-compatible HTTP API, with continuous batching.

  python -m kforcing_jax.serve --workdir runs/kjv_tiny --stage k4 --k 4 --slots 16 --port 8000
  python -m kforcing_jax.serve --workdir runs/kjv_tiny --stage teacher --slots 16 --port 8001
  python -m kforcing_jax.serve --workdir runs/kjv_tiny --method pflm_verified --port 8002

--method serves a lossless method (serving/verified_engine.py): the AR teacher verifies a
drafter in every slot, so the server returns the teacher's own samples (pflm_verified: token for
token what `generate --method pflm_verified` and the AR teacher give with that seed) at more
tokens per teacher pass. pflm_verified drafts --k tokens with the PFLM --stage (default the
last); spec and spec_dynamic draft --gamma tokens with the 'draft' stage. The model name is
"<method>:<drafter stage>", e.g. "pflm_verified:k4".

Then, with the official client:
  from openai import OpenAI
  client = OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="unused")
  client.completions.create(model="k4", prompt="And God said", max_tokens=32, seed=0)

The engine (kforcing_jax/serving/engine.py) compiles the decode step at each right-sized batch
(1, 2, 4, ... --slots) and the batched prefill of each (batch, power-of-two prompt bucket up to
--max_prompt_len) before the server listens; startup prints the URL, the stage, k, the slots and
the compile time. The API is described in
kforcing_jax/serving/server.py. SIGTERM (or Ctrl-C) stops intake, lets in-flight requests finish
(up to --drain_s seconds), then exits; if the decode loop fails, the server drains the same way
and exits with status 1. Binds 127.0.0.1 unless --host says otherwise.
"""

from absl import flags

from kforcing_jax import cli

_WORKDIR = flags.DEFINE_string("workdir", None, "Work dir of a training run.")
_STAGE = flags.DEFINE_string("stage", "", "teacher or k<n> (with --method: the drafter); '' = "
                             "the last stage of the chain (spec, spec_dynamic: 'draft').")
_K = flags.DEFINE_integer("k", 0, "Tokens per step for a PFLM, drafted per teacher pass for "
                          "pflm_verified (0 = its trained k).")
_METHOD = flags.DEFINE_enum("method", "", ["", "pflm_verified", "spec", "spec_dynamic"],
                            "'' = the stage's own decoding (AR or PFLM); else a lossless method: "
                            "the teacher verifies the stage's drafts.")
_GAMMA = flags.DEFINE_integer("gamma", 4, "spec/spec_dynamic: draft tokens per teacher pass.")
_CONFIDENCE = flags.DEFINE_float("confidence", 0.4, "spec_dynamic: stop drafting below this "
                                 "draft probability.")
_SLOTS = flags.DEFINE_integer("slots", 16, "Concurrent sequences (the decode batch).")
_MAX_PROMPT = flags.DEFINE_integer("max_prompt_len", 128, "Longest prompt in tokens.")
_MAX_TOKENS = flags.DEFINE_integer("max_tokens", 256, "Largest max_tokens of a request.")
_QUEUE = flags.DEFINE_integer("max_queue", 64, "Requests waiting for a slot before 429.")
_BURST = flags.DEFINE_integer("burst", 4, "Steps per dispatch while no request waits and every "
                              "live one has that many blocks left (1: one step per dispatch).")
_MIN_CACHE = flags.DEFINE_integer(
    "min_cache_len", 128, "AR / PFLM: shortest attended KV-cache length compiled; a step attends "
    "over the shortest of it doubling (then the whole cache) that holds the live rows. Larger: "
    "fewer programs to compile, slower steps for short requests.")
_HOST = flags.DEFINE_string("host", "127.0.0.1", "Address to bind.")
_PORT = flags.DEFINE_integer("port", 8000, "Port (0 = any free port; the URL is printed).")
_DRAIN = flags.DEFINE_integer("drain_s", 30, "On SIGTERM, seconds to let requests finish.")
_EMA = flags.DEFINE_bool("use_ema", True, "Load the EMA weights when the checkpoint has them.")
flags.mark_flags_as_required(["workdir"])


def main(argv):
  del argv
  import socket

  import uvicorn

  from kforcing_jax.config import check as config_check
  from kforcing_jax.training import stage_io
  from kforcing_jax.observe import metrics_log
  from kforcing_jax.serving import engine as engine_lib
  from kforcing_jax.serving import methods, server, verified_engine

  metrics_log.configure_logging()
  log = metrics_log.log
  workdir = _WORKDIR.value
  found = stage_io.list_stages(workdir, include_draft=True)
  method = _METHOD.value
  stage = _STAGE.value or methods.default_stage(workdir, method)
  if stage == config_check.MDLM:
    raise config_check.UserError("--stage mdlm: the masked-diffusion baseline is offline only "
                                 "(generate / benchmark / evaluate --method mdlm); serve the "
                                 "teacher or a PFLM stage")
  if stage not in found:
    raise config_check.UserError(f"--stage {stage!r}: no such stage in {workdir} "
                                 f"(found {found or 'none'})")
  loaded = stage_io.load_stage(workdir, stage, use_ema=_EMA.value)
  k = (_K.value or loaded.k) if method or loaded.k else 1
  if not method and loaded.k == 0 and _K.value > 1:
    raise config_check.UserError(f"--k={_K.value}: {stage} is the AR model (one token per step)")
  if loaded.k and not 1 <= k <= loaded.k:
    raise config_check.UserError(f"--k={k} must be in 1..{loaded.k} (the window {stage} was "
                                 "trained with)")
  settings = dict(slots=_SLOTS.value, max_prompt_len=_MAX_PROMPT.value,
                  max_tokens=_MAX_TOKENS.value, max_queue=_QUEUE.value,
                  eos_id=loaded.tokenizer.eos_id, burst=_BURST.value)
  model_name = stage
  try:
    if method:
      teacher = methods.load_verifier(workdir, loaded, method, use_ema=_EMA.value)
      spec = methods.verify_spec(method, loaded.k, _MAX_TOKENS.value, k=k, gamma=_GAMMA.value,
                                 confidence=_CONFIDENCE.value)
      engine = verified_engine.VerifiedServingEngine(teacher, loaded, spec, **settings)
      model_name, k = f"{method}:{stage}", spec.gamma
    else:
      engine = engine_lib.ServingEngine(loaded, k, **settings, min_cache_len=_MIN_CACHE.value)
  except ValueError as e:
    raise config_check.UserError(f"--method={method}: {e}" if method else str(e)) from None
  log.info("compiling the decode steps (sizes %s, k=%d, %d programs) and the batched "
           "prefills ...", ",".join(map(str, engine.sizes)), k, len(engine._steps))
  compile_s = engine.warmup()
  engine.start()
  app = server.make_app(engine, loaded.tokenizer, model_name)
  sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
  sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
  sock.bind((_HOST.value, _PORT.value))
  sock.listen(2048)  # from here on, connections wait in the backlog until uvicorn accepts them
  host, port = sock.getsockname()[:2]
  print(f"serving {model_name} (k={k}) at http://{host}:{port}/v1 with {_SLOTS.value} slots; "
        f"compiled in {compile_s:.1f} s", flush=True)
  config = uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=_DRAIN.value,
                          lifespan="off")
  http = server.DrainingServer(config, engine, app.state.api, _DRAIN.value)
  try:
    http.run(sockets=[sock])
  finally:
    engine.shutdown(drain=True, timeout=_DRAIN.value)
    log.info("stopped after %d decode steps", engine.steps)
  if http.failed:  # the decode loop died: exit non-zero so that an orchestrator restarts us
    raise SystemExit(f"error: the decode loop failed: {engine.error}")


if __name__ == "__main__":
  cli.run(main)
