"""The README's commands run as written: every `python -m kforcing_jax...` (and experiments)
command line in its bash blocks names an existing module, only flags that module defines, only
config fields that exist (`--config.a.b=...` against the config file it loads), and config
files that exist. Running them all would take hours; this catches the drift that breaks them."""

import functools
import os
import re
import shlex
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCS = ["README.md", "docs/real-teachers.md", "docs/results.md"]


def _commands(path: str) -> list[str]:
  with open(os.path.join(ROOT, path), encoding="utf-8") as f:
    text = f.read()
  out = []
  for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
    block = block.replace("\\\n", " ")
    for line in block.splitlines():
      line = line.split(" #")[0].strip()
      for part in line.split("&&"):
        part = part.strip()
        if part.startswith("python -m kforcing_jax") or part.startswith("python -m experiments"):
          out.append(part)
  return out


@functools.lru_cache(maxsize=None)
def _flags(module: str) -> frozenset:
  code = (f"import {module}\nfrom absl import flags\n"
          "print('\\n'.join(flags.FLAGS))")
  res = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                       timeout=300, check=False)
  assert res.returncode == 0, f"python -m {module} does not import: {res.stderr[-2000:]}"
  return frozenset(res.stdout.split())


def _config_fields(spec: str) -> set:
  from ml_collections import config_flags  # pylint: disable=import-outside-toplevel,unused-import
  import importlib.util  # pylint: disable=import-outside-toplevel
  path, _, arg = spec.partition(":")
  assert os.path.exists(os.path.join(ROOT, path)), f"config file {path} is missing"
  mod_spec = importlib.util.spec_from_file_location("readme_cfg", os.path.join(ROOT, path))
  mod = importlib.util.module_from_spec(mod_spec)
  mod_spec.loader.exec_module(mod)
  cfg = mod.get_config(arg) if arg else mod.get_config()
  fields = set()

  def walk(node, prefix):
    for key, value in node.items():
      name = f"{prefix}.{key}"
      fields.add(name)
      if hasattr(value, "items"):
        walk(value, name)
  walk(cfg, "config")
  return fields


ALL = [(doc, cmd) for doc in DOCS for cmd in _commands(doc)]


def test_the_docs_have_commands():
  assert len([c for d, c in ALL if d == "README.md"]) >= 15


@pytest.mark.parametrize("doc,command", ALL, ids=[f"{d}:{i}" for i, (d, _) in enumerate(ALL)])
def test_command_uses_existing_modules_flags_and_fields(doc, command):
  tokens = shlex.split(command, posix=True)
  module = tokens[2]
  known = _flags(module)
  config = next((t.split("=", 1)[1] for t in tokens if t.startswith("--config=")), None)
  if config is None and "--config" in tokens:
    config = tokens[tokens.index("--config") + 1]
  fields = _config_fields(config) if config else set()
  for tok in tokens[3:]:
    if not tok.startswith("--") or tok == "--":
      continue
    name = tok[2:].split("=", 1)[0]
    if name.startswith("config."):
      field = name
      assert field in fields, f"{doc}: {command}\n  {field} is not a field of {config}"
    else:
      plain = name[2:] if name.startswith("no") and name[2:] in known else name
      assert plain in known, f"{doc}: {command}\n  --{name} is not a flag of {module}"
