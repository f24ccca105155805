"""An independent PyTorch forward of the reference model, written from the spec (section 2-3).

Tests only. Module attribute names reproduce the reference checkpoint names, so
`RefPFLM(...).state_dict()` IS a reference-format state dict. Nothing here comes from
kforcing_jax: masks are built element by element from the spec's rules.
"""

import math

import torch
from torch import nn
from torch.nn import functional as F

EPS = 1e-5


class ScaleLayerNorm(nn.Module):
  """LayerNorm, learned scale, no bias, in float32."""

  def __init__(self, d: int):
    super().__init__()
    self.weight = nn.Parameter(torch.ones(d))

  def forward(self, x):
    return F.layer_norm(x.float(), (x.shape[-1],), self.weight, None, EPS)


class Embedding(nn.Module):

  def __init__(self, vocab: int, d: int):
    super().__init__()
    self.embedding = nn.Parameter(torch.randn(vocab, d) * 0.02)

  def forward(self, tokens):
    return self.embedding[tokens]


def rotate(x, pos, base=10000.0):
  """Rotate-half rotary embedding of x (B, H, L, K) at integer positions pos (L,)."""
  k = x.shape[-1]
  inv_freq = 1.0 / (base ** (torch.arange(0, k, 2, dtype=torch.float32) / k))
  ang = pos.float()[:, None] * inv_freq[None, :]
  ang = torch.cat([ang, ang], dim=-1)
  x1, x2 = x[..., :k // 2], x[..., k // 2:]
  return x * ang.cos() + torch.cat([-x2, x1], dim=-1) * ang.sin()


class Block(nn.Module):

  def __init__(self, d: int, n_heads: int):
    super().__init__()
    self.n_heads = n_heads
    self.norm1 = ScaleLayerNorm(d)
    self.attn_qkv = nn.Linear(d, 3 * d, bias=False)
    self.attn_out = nn.Linear(d, d, bias=False)
    self.norm2 = ScaleLayerNorm(d)
    self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(approximate="tanh"),
                             nn.Linear(4 * d, d))

  def forward(self, x, pos, allowed):
    b, length, d = x.shape
    hd = d // self.n_heads
    # Rows of attn_qkv: [q; k; v], heads contiguous inside each.
    qkv = self.attn_qkv(self.norm1(x)).view(b, length, 3, self.n_heads, hd)
    q, k, v = (qkv[:, :, i].transpose(1, 2) for i in range(3))  # (B, H, L, hd)
    q, k = rotate(q, pos), rotate(k, pos)
    scores = q @ k.transpose(-1, -2) / math.sqrt(hd)
    scores = scores.masked_fill(~allowed, float("-inf"))
    att = torch.softmax(scores, dim=-1) @ v
    x = x + self.attn_out(att.transpose(1, 2).reshape(b, length, d))
    return x + self.mlp(self.norm2(x))


class OutputLayer(nn.Module):

  def __init__(self, d: int, vocab: int):
    super().__init__()
    self.norm_final = ScaleLayerNorm(d)
    self.linear = nn.Linear(d, vocab)

  def forward(self, x):
    return self.linear(self.norm_final(x))


def sinusoid(s, d: int):
  """concat(cos(2 pi s f), sin(2 pi s f)), f_i = 10000^(-i/(d/2)), computed in float64."""
  f = 10000.0 ** (-torch.arange(d // 2, dtype=torch.float64) / (d // 2))
  ang = 2 * math.pi * s.double()[..., None] * f
  return torch.cat([ang.cos(), ang.sin()], dim=-1).float()


class NoiseEncoder(nn.Module):

  def __init__(self, d: int):
    super().__init__()
    self.combined_proj = nn.Linear(2 * d, d)
    self.norm = nn.LayerNorm(d, eps=EPS)
    self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))

  def forward(self, z, tau: float = 1.0):
    d = self.norm.weight.shape[0]
    fz = sinusoid(z, d)
    ft = sinusoid(torch.full_like(z, tau, dtype=torch.float64), d)
    h = self.combined_proj(torch.cat([fz, ft], dim=-1))
    return h + self.mlp(self.norm(h))


class RefAR(nn.Module):
  """The AR backbone: logits (B, L, V) with the mask token's logit forced to -1000."""

  def __init__(self, vocab: int, d: int, n_layers: int, n_heads: int, mask_id: int):
    super().__init__()
    self.mask_id = mask_id
    self.vocab_embed = Embedding(vocab, d)
    self.blocks = nn.ModuleList([Block(d, n_heads) for _ in range(n_layers)])
    self.output_layer = OutputLayer(d, vocab)

  def run(self, x, pos, allowed):
    for block in self.blocks:
      x = block(x, pos, allowed)
    logits = self.output_layer(x)
    logits[..., self.mask_id] = -1000.0
    return logits

  def forward(self, tokens):
    length = tokens.shape[1]
    pos = torch.arange(length)
    allowed = pos[None, :] <= pos[:, None]
    return self.run(self.vocab_embed(tokens), pos, allowed)


class RefPFLM(RefAR):
  """Training forward over [context (N) ; N*k noise tokens], dense mask as the reference."""

  def __init__(self, vocab, d, n_layers, n_heads, mask_id):
    super().__init__(vocab, d, n_layers, n_heads, mask_id)
    self.noise_encoder = NoiseEncoder(d)

  def forward(self, tokens, z):
    b, n = tokens.shape
    k = z.shape[-1]
    # Sequence items: ("ctx", t, -) or ("noise", t, j), j = 1..k; noise ordered t-major.
    items = [("ctx", t, 0) for t in range(n)]
    items += [("noise", t, j) for t in range(n) for j in range(1, k + 1)]
    size = len(items)
    allowed = torch.zeros(size, size, dtype=torch.bool)
    for a, (kind_a, ta, ja) in enumerate(items):
      for c, (kind_c, tc, jc) in enumerate(items):
        if kind_a == "ctx":
          allowed[a, c] = kind_c == "ctx" and tc <= ta
        elif kind_c == "ctx":
          allowed[a, c] = tc <= ta  # staircase
        else:
          allowed[a, c] = tc == ta and jc <= ja  # causal inside its own window
    pos = torch.tensor([t if kind == "ctx" else t + j for kind, t, j in items])
    x = torch.cat([self.vocab_embed(tokens), self.noise_encoder(z).reshape(b, n * k, -1)], 1)
    return self.run(x, pos, allowed)[:, n:].reshape(b, n, k, -1)


def randomize_(module: nn.Module, seed: int, scale: float = 0.1) -> None:
  """Every tensor random (norm scales around 1, the rest ~ N(0, scale^2)), deterministic."""
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in module.named_parameters():
      noise = torch.randn(p.shape, generator=gen) * scale
      is_scale = name.endswith("norm1.weight") or name.endswith("norm2.weight") or (
          "norm" in name and name.endswith(".weight"))
      p.copy_(1.0 + noise if is_scale else noise)
