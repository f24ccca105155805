"""Import a model into a work dir, and export a work dir's stage.

  python -m kforcing_jax.convert --from_hf MODEL_DIR_OR_FILE.gguf --workdir DIR [--dtype bfloat16]
  python -m kforcing_jax.convert --to_hf OUT_DIR --workdir DIR [--stage k4] [--nouse_ema]

  python -m kforcing_jax.convert --from_torch CKPT.pt --workdir DIR [--n_heads 12]
      [--tokenizer gpt2|bert-base-uncased] [--tokenizer_file tokenizer.json] [--mask_id N]
      [--k 4] [--nouse_ema] [--dtype bfloat16] [--ignore_extra] [--unsafe_pickle]
  python -m kforcing_jax.convert --to_torch OUT.pt --workdir DIR [--stage k4] [--nouse_ema]

--from_hf/--to_hf: Llama-family Hugging Face models (config.json + *.safetensors +
tokenizer.json) and llama.cpp GGUF files; logic in `interop/hf_checkpoint.py` (files) and
`interop/hf_format.py` (the name/shape table). --from_torch/--to_torch: the authors' PyTorch
checkpoints; needs torch (pip install torch==2.13.0, CPU build); logic in `torch_checkpoint.py`
(files, EMA, tokenizer) and `torch_format.py` (names, shapes, the qkv layout assumption).
"""

from absl import app, flags

from kforcing_jax import cli

_FROM = flags.DEFINE_string("from_torch", None, "PyTorch checkpoint to import into --workdir.")
_TO = flags.DEFINE_string("to_torch", None, "Write --workdir's --stage here as a reference .pt.")
_FROM_HF = flags.DEFINE_string("from_hf", None, "Hugging Face model dir or .gguf file to import "
                               "into --workdir as its (final) teacher stage.")
_TO_HF = flags.DEFINE_string("to_hf", None, "Write --workdir's --stage here as a Hugging Face "
                             "model dir (config.json, model.safetensors, tokenizer files).")
_WORKDIR = flags.DEFINE_string("workdir", None, "kforcing_jax work dir (written or read).")
_N_HEADS = flags.DEFINE_integer("n_heads", None, "Attention heads (not in the weights); "
                                "default: the sidecar's value, else 12 (the paper's models).")
_TOKENIZER = flags.DEFINE_enum("tokenizer", None, ["gpt2", "bert-base-uncased"],
                               "Tokenizer the checkpoint was trained with (OWT: gpt2, LM1B: "
                               "bert-base-uncased); downloaded unless --tokenizer_file is given.")
_TOKENIZER_FILE = flags.DEFINE_string("tokenizer_file", None,
                                      "A local tokenizer.json to copy into the work dir.")
_MASK_ID = flags.DEFINE_integer("mask_id", None, "Reserved mask token id; default: the "
                                "tokenizer's, else 103 for V=30522 (BERT), else V-1 (GPT-2).")
_K = flags.DEFINE_integer("k", None, "Window of a PFLM checkpoint (not in the weights); "
                          "default 4, the authors' PFLMs.")
_STAGE = flags.DEFINE_string("stage", None, "--to_torch / --to_hf: stage to export (default: "
                             "the last).")
_USE_EMA = flags.DEFINE_bool("use_ema", True, "Use EMA weights when the checkpoint has them.")
_DTYPE = flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"],
                           "Compute dtype recorded in the model config (weights stay float32).")
_IGNORE_EXTRA = flags.DEFINE_bool("ignore_extra", False,
                                  "Drop tensors outside the reference layout instead of failing.")
_UNSAFE_PICKLE = flags.DEFINE_bool("unsafe_pickle", False, "torch.load with weights_only=False "
                                   "(trusted files only, e.g. Lightning checkpoints).")
flags.mark_flag_as_required("workdir")


def main(argv):
  del argv
  modes = [_FROM.value, _TO.value, _FROM_HF.value, _TO_HF.value]
  if sum(m is not None for m in modes) != 1:
    raise app.UsageError("give exactly one of --from_torch, --to_torch, --from_hf and --to_hf")
  from kforcing_jax.observe import metrics_log  # pylint: disable=import-outside-toplevel

  metrics_log.configure_logging()  # Our progress lines on stdout; Orbax chatter muted.
  if _FROM_HF.value or _TO_HF.value:
    from kforcing_jax.interop import hf_checkpoint  # pylint: disable=import-outside-toplevel
    if _FROM_HF.value:
      hf_checkpoint.from_hf(_FROM_HF.value, _WORKDIR.value, dtype=_DTYPE.value)
    else:
      hf_checkpoint.to_hf(_WORKDIR.value, _TO_HF.value, stage=_STAGE.value,
                          use_ema=_USE_EMA.value)
    return
  from kforcing_jax.interop import torch_checkpoint  # pylint: disable=import-outside-toplevel
  if _FROM.value:
    torch_checkpoint.from_torch(
        _FROM.value, _WORKDIR.value, n_heads=_N_HEADS.value, tokenizer=_TOKENIZER.value,
        tokenizer_file=_TOKENIZER_FILE.value, mask_id=_MASK_ID.value, k=_K.value,
        use_ema=_USE_EMA.value, dtype=_DTYPE.value, ignore_extra=_IGNORE_EXTRA.value,
        unsafe_pickle=_UNSAFE_PICKLE.value)
  else:
    torch_checkpoint.to_torch(_WORKDIR.value, _TO.value, stage=_STAGE.value,
                              use_ema=_USE_EMA.value)


if __name__ == "__main__":
  cli.run(main)
