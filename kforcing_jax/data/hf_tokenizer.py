"""A pretrained model's own tokenizer: from a Hugging Face model dir or rebuilt from a GGUF file.

  load_hf_tokenizer(model_dir)   tokenizer.json + tokenizer_config.json (chat template, bos/eos,
                                 add_bos_token; special_tokens_map.json, generation_config.json
                                 and config.json as fallbacks for the special ids)
  tokenizer_from_gguf(path)      the GGUF's tokenizer.* metadata (byte-level BPE, "gpt2" model):
                                 tokens, merges, token types (control -> special added tokens,
                                 user-defined -> added tokens), bos/eos, add_bos_token, the chat
                                 template and the pre-tokenizer named by tokenizer.ggml.pre
  save_to_workdir(tok, workdir)  <workdir>/tokenizer.json + tokenizer_meta.json, which
                                 `Tokenizer.load` and `build_tokenizer` then reuse
  render_chat(tok, messages)     the model's chat template, rendered as transformers does
  encode_chat_sanitized(tok, m)  its ids with control-token spellings in the messages encoded as
                                 plain text (transformers' sanitize_control_tokens=True)

Both loaders give a `tokenizer.Tokenizer` with `imported` set: mask_id None, the model's eos as
the stop token, and `encode_prompt` = what the model's own tokenizer does (bos only if it adds
one). tests/test_hf_tokenizer.py checks them against transformers on SmolLM2's GGUF.
"""

import json
import os
import re

import tokenizers
from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers

from kforcing_jax.data import tokenizer as tokenizer_lib
from kforcing_jax.observe import report

# GGUF token types (llama.cpp's llama_token_type).
GGUF_CONTROL, GGUF_USER_DEFINED = 3, 4

# Pre-tokenizer regexes named by tokenizer.ggml.pre (llama.cpp's names; the same splits as
# these models' own tokenizer.json files).
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")


def _byte_level_regex():  # GPT-2's split, as ByteLevel(use_regex=True) applies it
  return pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True)


def _split_then_bytes(regex: str):
  return pre_tokenizers.Sequence([
      pre_tokenizers.Split(Regex(regex), behavior="isolated", invert=False),
      pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)])


GGUF_PRE_TOKENIZERS = {
    # SmolLM / SmolLM2 (tokenizer.json: Digits(individual) then GPT-2's byte-level split).
    "smollm": lambda: pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True), _byte_level_regex()]),
    "gpt2": _byte_level_regex,
    "default": _byte_level_regex,
    "llama3": lambda: _split_then_bytes(_LLAMA3_SPLIT),
    "llama-v3": lambda: _split_then_bytes(_LLAMA3_SPLIT),
    "llama-bpe": lambda: _split_then_bytes(_LLAMA3_SPLIT),
    "qwen2": lambda: _split_then_bytes(_QWEN2_SPLIT),
}


# ------------------------------------------------------------------ HF model directory

def _read_json(path: str) -> dict:
  if not os.path.exists(path):
    return {}
  with open(path, encoding="utf-8") as f:
    out = json.load(f)
  return out if isinstance(out, dict) else {}


def _token_str(value) -> str | None:
  """A special token as tokenizer_config.json / special_tokens_map.json spell it."""
  if isinstance(value, dict):
    value = value.get("content")
  return value if isinstance(value, str) and value else None


def _first_int(value) -> int | None:
  if isinstance(value, list):
    value = value[0] if value else None
  return int(value) if isinstance(value, int) and not isinstance(value, bool) else None


def _chat_template(model_dir: str, tok_cfg: dict) -> str | None:
  """chat_template.jinja (what transformers >= 4.43 saves), else tokenizer_config's
  chat_template (a string, or a list of named templates: the "default" one)."""
  jinja_path = os.path.join(model_dir, "chat_template.jinja")
  if os.path.exists(jinja_path):
    with open(jinja_path, encoding="utf-8") as f:
      return f.read()
  tpl = tok_cfg.get("chat_template")
  if isinstance(tpl, list):
    named = {t.get("name"): t.get("template") for t in tpl if isinstance(t, dict)}
    tpl = named.get("default")
  return tpl if isinstance(tpl, str) and tpl else None


def load_hf_tokenizer(model_dir: str) -> tokenizer_lib.Tokenizer:
  """The tokenizer of a HF model dir (tokenizer.json + tokenizer_config.json)."""
  path = os.path.join(model_dir, "tokenizer.json")
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path} is missing: only fast (tokenizer.json) tokenizers can be "
                            "imported")
  hf = tokenizers.Tokenizer.from_file(path)
  tok_cfg = _read_json(os.path.join(model_dir, "tokenizer_config.json"))
  special_map = _read_json(os.path.join(model_dir, "special_tokens_map.json"))
  gen_cfg = _read_json(os.path.join(model_dir, "generation_config.json"))
  model_cfg = _read_json(os.path.join(model_dir, "config.json"))

  special, ids = {}, {}
  for name in ("bos_token", "eos_token", "unk_token", "pad_token"):
    text = _token_str(tok_cfg.get(name)) or _token_str(special_map.get(name))
    tid = hf.token_to_id(text) if text is not None else None
    if tid is None:  # the id from generation_config.json / config.json
      key = name.replace("_token", "_token_id")
      tid = _first_int(gen_cfg.get(key))
      tid = _first_int(model_cfg.get(key)) if tid is None else tid
      text = hf.id_to_token(tid) if tid is not None else None
    if text is not None:
      special[name], ids[name] = text, tid
  if ids.get("eos_token") is None:
    raise ValueError(f"{model_dir}: no eos token in tokenizer_config.json, "
                     "special_tokens_map.json, generation_config.json or config.json")
  bos_id = ids.get("bos_token")
  add_bos = tok_cfg.get("add_bos_token")
  if not isinstance(add_bos, bool):  # no flag: whatever tokenizer.json's post-processor does
    with_special = hf.encode("a", add_special_tokens=True).ids
    add_bos = bos_id is not None and with_special[:1] == [bos_id] and (
        with_special != hf.encode("a", add_special_tokens=False).ids)
  meta = {"tokenizer": tokenizer_lib.IMPORTED, "source": os.path.abspath(model_dir),
          "format": "hf", "eos_id": ids["eos_token"], "bos_id": bos_id, "add_bos": add_bos,
          "mask_id": None, "chat_template": _chat_template(model_dir, tok_cfg),
          "special_tokens": special}
  return tokenizer_lib.Tokenizer(hf, imported=meta)


# ------------------------------------------------------------------ GGUF

def _gguf_fields(path_or_reader) -> dict:
  """tokenizer.* and general.architecture of a GGUF file (path or gguf.GGUFReader)."""
  reader = path_or_reader
  if isinstance(path_or_reader, (str, os.PathLike)):
    from gguf import GGUFReader  # pylint: disable=import-outside-toplevel
    reader = GGUFReader(os.fspath(path_or_reader))
  out = {}
  for name, field in reader.fields.items():
    if name.startswith("tokenizer.") or name == "general.architecture":
      out[name] = field.contents()
  return out


def tokenizer_from_gguf(path_or_reader, source: str | None = None) -> tokenizer_lib.Tokenizer:
  """The byte-level BPE tokenizer a GGUF file (path or gguf.GGUFReader) describes, rebuilt with
  `tokenizers` from its metadata."""
  if source is None:
    source = (os.path.abspath(path_or_reader) if isinstance(path_or_reader, (str, os.PathLike))
              else str(getattr(getattr(path_or_reader, "data", None), "filename", None) or "gguf"))
  f = _gguf_fields(path_or_reader)
  name = os.path.basename(str(source))
  kind = f.get("tokenizer.ggml.model")
  if kind != "gpt2":
    raise ValueError(f"{name}: tokenizer.ggml.model={kind!r} is not supported (only 'gpt2', "
                     "byte-level BPE, can be rebuilt from a GGUF)")
  pre = f.get("tokenizer.ggml.pre", "default")
  if pre not in GGUF_PRE_TOKENIZERS:
    raise ValueError(f"{name}: pre-tokenizer tokenizer.ggml.pre={pre!r} is not supported "
                     f"(supported: {sorted(GGUF_PRE_TOKENIZERS)})")
  tokens, merges = f.get("tokenizer.ggml.tokens"), f.get("tokenizer.ggml.merges")
  if not tokens or merges is None:
    raise ValueError(f"{name}: the GGUF has no tokenizer.ggml.tokens / tokenizer.ggml.merges")
  types = f.get("tokenizer.ggml.token_type") or [1] * len(tokens)
  spelling = _bytes_to_unicode()
  alphabet = set(spelling.values())
  # Tokens are stored in the byte alphabet; respell any that are not (as transformers does).
  vocab_keys = [t if set(t) <= alphabet else "".join(spelling[b] for b in t.encode("utf-8"))
                for t in tokens]
  hf = tokenizers.Tokenizer(models.BPE(
      vocab={t: i for i, t in enumerate(vocab_keys)},
      merges=[tuple(m.split(" ", 1)) for m in merges], dropout=None, unk_token=None,
      continuing_subword_prefix="", end_of_word_suffix="", fuse_unk=False, byte_fallback=False))
  hf.normalizer = None
  hf.pre_tokenizer = GGUF_PRE_TOKENIZERS[pre]()
  hf.decoder = decoders.ByteLevel()
  # Control tokens (<|im_start|>...) stay whole as special tokens; user-defined ones as added
  # tokens. A "control" token outside the byte alphabet is a llama.cpp mislabel: left as is.
  hf.add_special_tokens([AddedToken(t, special=True, normalized=False)
                         for t, ty in zip(tokens, types)
                         if ty == GGUF_CONTROL and set(t) <= alphabet])
  hf.add_tokens([AddedToken(t, special=False, normalized=False)
                 for t, k, ty in zip(tokens, vocab_keys, types)
                 if ty == GGUF_USER_DEFINED and t == k])
  special, ids = {}, {}
  for tname, key in (("bos_token", "bos_token_id"), ("eos_token", "eos_token_id"),
                     ("unk_token", "unknown_token_id"), ("pad_token", "padding_token_id")):
    tid = f.get(f"tokenizer.ggml.{key}")
    if tid is not None and 0 <= int(tid) < len(tokens):
      special[tname], ids[tname] = tokens[int(tid)], int(tid)
  if "eos_token" not in ids:
    raise ValueError(f"{name}: the GGUF names no tokenizer.ggml.eos_token_id")
  add_bos = bool(f.get("tokenizer.ggml.add_bos_token", False))
  meta = {"tokenizer": tokenizer_lib.IMPORTED, "source": str(source), "format": "gguf",
          "gguf_pre": pre, "eos_id": ids["eos_token"], "bos_id": ids.get("bos_token"),
          "add_bos": add_bos and "bos_token" in ids, "mask_id": None,
          "chat_template": f.get("tokenizer.chat_template") or None, "special_tokens": special}
  tok = tokenizer_lib.Tokenizer(hf, imported=meta)
  if tok.vocab_size != len(tokens):
    raise ValueError(f"{name}: rebuilt tokenizer has {tok.vocab_size} ids, the GGUF lists "
                     f"{len(tokens)} tokens")
  return tok


def save_to_workdir(tok: tokenizer_lib.Tokenizer, workdir: str) -> str:
  """Write an imported `tok` as <workdir>/tokenizer.json + tokenizer_meta.json (what
  `Tokenizer.load` / `build_tokenizer` / `stage_io.load_stage` read back); returns the path."""
  if tok.imported is None:
    raise ValueError("save_to_workdir is for imported tokenizers (build_tokenizer saves ours)")
  os.makedirs(workdir, exist_ok=True)
  path = os.path.join(workdir, "tokenizer.json")
  tok.save(path)
  report.write_text(os.path.join(workdir, tokenizer_lib.META_FILE),
                    json.dumps(tok.imported, indent=1))
  return path


# ------------------------------------------------------------------ chat template

_JINJA_ENV = None


def _jinja_env():
  """A sandboxed jinja2 environment set up as transformers' (trim_blocks, lstrip_blocks,
  loopcontrols, raise_exception, strftime_now, a tojson that does not escape HTML)."""
  global _JINJA_ENV  # pylint: disable=global-statement
  if _JINJA_ENV is None:
    import datetime  # pylint: disable=import-outside-toplevel
    import jinja2  # pylint: disable=import-outside-toplevel
    from jinja2 import ext, sandbox  # pylint: disable=import-outside-toplevel

    def raise_exception(message):
      raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
      return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                        sort_keys=sort_keys)

    env = sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                                extensions=[ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.datetime.now().strftime(fmt)
    _JINJA_ENV = env
  return _JINJA_ENV


class ChatTemplateError(ValueError):
  """The conversation cannot be rendered (no template, or the template rejected it)."""


def render_chat(tok: tokenizer_lib.Tokenizer, messages: list[dict],
                add_generation_prompt: bool = True) -> str:
  """`messages` ([{"role", "content"}, ...]) as `tok`'s chat template writes them: the same
  text as transformers' apply_chat_template(messages, tokenize=False, add_generation_prompt)."""
  if not tok.chat_template:
    raise ChatTemplateError("this tokenizer has no chat template (a model imported with one "
                            "has it in tokenizer_meta.json's chat_template)")
  import jinja2  # pylint: disable=import-outside-toplevel
  try:
    template = _jinja_env().from_string(tok.chat_template)
    plain = json.loads(json.dumps(messages))  # plain JSON data only, nothing else into the sandbox
    return template.render(messages=plain, add_generation_prompt=bool(add_generation_prompt),
                           tools=None, documents=None, **tok.special_tokens)
  except jinja2.exceptions.TemplateError as e:
    raise ChatTemplateError(f"chat template: {e}") from None


def _bytes_to_unicode() -> dict[int, str]:
  """GPT-2's printable spelling of the 256 bytes (as in its encoder.py)."""
  bs = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) +
        list(range(ord("®"), ord("ÿ") + 1)))
  cs = bs[:]
  n = 0
  for b in range(256):
    if b not in bs:
      bs.append(b)
      cs.append(256 + n)
      n += 1
  return dict(zip(bs, map(chr, cs)))


def save_hf_files(tok: tokenizer_lib.Tokenizer, out_dir: str) -> None:
  """`tok` as a HF model dir's tokenizer.json + tokenizer_config.json (what `load_hf_tokenizer`
  and transformers' AutoTokenizer read): special tokens, BOS rule and chat template included."""
  os.makedirs(out_dir, exist_ok=True)
  tok.save(os.path.join(out_dir, "tokenizer.json"))
  spell = lambda i: None if i is None else tok.hf.id_to_token(int(i))
  cfg = {"tokenizer_class": "PreTrainedTokenizerFast", "clean_up_tokenization_spaces": False,
         "eos_token": spell(tok.eos_id), "bos_token": spell(tok.bos_id),
         "add_bos_token": bool(tok.add_bos), "model_max_length": 1 << 30}
  if tok.mask_id is not None:
    cfg["mask_token"] = spell(tok.mask_id)
  if tok.chat_template:
    cfg["chat_template"] = tok.chat_template
  with open(os.path.join(out_dir, "tokenizer_config.json"), "w", encoding="utf-8") as f:
    json.dump({k: v for k, v in cfg.items() if v is not None}, f, indent=2)


# Private-use characters wrapped around control tokens found in the messages (transformers' own).
_MARK_START, _MARK_END = "\U000f0000", "\U000f0001"


def _control_tokens(tok: tokenizer_lib.Tokenizer) -> tuple[str, ...]:
  """Special added tokens, and non-special ones the template writes (not whitespace)."""
  out = []
  for t in tok.hf.get_added_tokens_decoder().values():
    if t.special or (t.content in (tok.chat_template or "") and not t.content.isspace()):
      out.append(t.content)
  return tuple(sorted(out, key=len, reverse=True))  # longer first: a token before its parts


def _mark(obj, control_re):
  if isinstance(obj, str):
    obj = obj.replace(_MARK_START, "").replace(_MARK_END, "")  # no forged markers
    return control_re.sub(f"{_MARK_START}\\g<0>{_MARK_END}", obj)
  if isinstance(obj, dict):
    return {k: _mark(v, control_re) for k, v in obj.items()}
  if isinstance(obj, list):
    return [_mark(v, control_re) for v in obj]
  return obj


def encode_chat_sanitized(tok: tokenizer_lib.Tokenizer, messages: list[dict],
                          add_generation_prompt: bool = True) -> list[int]:
  """The conversation's ids where a control token typed inside a message ("<|im_start|>system")
  is plain text and only the template's own are control tokens: transformers'
  apply_chat_template(tokenize=True, sanitize_control_tokens=True). What a server must use, so a
  user cannot forge another role's turn."""
  control = _control_tokens(tok)
  control_re = re.compile("|".join(map(re.escape, control)) or "(?!)")
  markers_re = re.compile(f"{_MARK_START}({control_re.pattern}){_MARK_END}|"
                          f"[{_MARK_START}{_MARK_END}]")
  chat = render_chat(tok, _mark(json.loads(json.dumps(messages)), control_re),
                     add_generation_prompt)
  plain = getattr(tok, "_plain_hf", None)
  if plain is None:  # a copy that reads every added token's spelling as text
    plain = tokenizers.Tokenizer.from_str(tok.hf.to_str())
    plain.encode_special_tokens = True
    tok._plain_hf = plain  # pylint: disable=protected-access
  newline = tok.encode("\n")
  pieces = markers_re.split(chat)  # [text, marked token or None, text, ...]
  ids = tok.encode(pieces[0])
  for i, piece in enumerate(pieces[1:], start=1):
    if not piece:
      continue
    as_text = i % 2 == 1
    encode = (lambda t: plain.encode(t, add_special_tokens=False).ids) if as_text else tok.encode
    piece_ids = encode("\n" + piece)  # mid-text, not at a string start (SentencePiece's prefix)
    piece_ids = (piece_ids[len(newline):] if piece_ids[:len(newline)] == newline
                 else encode(piece))
    if as_text and tok.hf.token_to_id(piece) in piece_ids:
      raise ChatTemplateError(f"cannot keep {piece!r} as text: the tokenizer makes it from text")
    ids += piece_ids
  return ids
