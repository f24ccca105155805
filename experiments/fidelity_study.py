"""The fidelity study's variants: how close do distilled students get to their AR teacher?

  python -m experiments.fidelity_study --out runs/fidelity [--variants single_k4,chain,...]
  python -m experiments.fidelity_study --list

Run from the repository root. Each variant is a training chain on the embedded corpus: the base
config (--config, default configs/kjv_tiny.py) plus STUDY_BASE, its teacher's fields and its
own overrides. The machinery (training the teachers once, the curves, the held-out evaluation,
the table and plot) is kforcing_jax/bench/fidelity.py; this file is the registry of what was
tried, dated where a variant reproduces a past default. Variants of knobs that the study
rejected and the library has since retired (an offset-weighted loss, a deeper student, ids
ordered by similarity) are gone with the knobs: see git history.
"""

from kforcing_jax.bench import fidelity
from kforcing_jax.bench.fidelity import Variant

_steps = fidelity.stage_budget

# Every teacher and variant starts from the base config plus STUDY_BASE, so that a variant means
# the same when the default config changes: the study's reference point is the authors' noise
# encoder (noise_max_freq 1), the BPE trainer's id order, 4 layers of width 256, a teacher
# whose output bias starts at zero (the authors' initialisation), one-hot targets and AdamW.
STUDY_BASE = (("data.bpe_id_order", "merges"), ("model.noise_max_freq", 1.0),
              ("model.d_model", 256), ("model.n_heads", 4), ("model.n_layers", 4),
              ("train.head_bias_init", "zeros"), ("distill.cdf_blur", 0.0),
              ("stage_overrides.k4.optim.name", "adamw"),
              # The k4 stage's validation and checkpoint cadence before configs/kjv_tiny.py's k4
              # batch went from 8 to 4 (2026-12-06): 4 batches of 8 rows every 50 steps.
              ("stage_overrides.k4.train.eval_batches", 4),
              ("stage_overrides.k4.train.eval_every", 50),
              ("stage_overrides.k4.train.ckpt_every", 100))
# configs/kjv_tiny.py's k4 stage since 2026-12-06: soft targets and Muon.
_SOFT_MUON = (("distill.cdf_blur", 0.01), ("stage_overrides.k4.optim.name", "muon"))

# The embedded default's departures from STUDY_BASE as of 2026-12-02 (8192 ids by frequency,
# noise features to 1000 cycles); configs/kjv_tiny.py is now this at width 128 with a unigram
# output bias (default_d128_unigram).
DEFAULT = (("data.bpe_vocab_size", 8192), ("data.bpe_id_order", "frequency"),
           ("model.noise_max_freq", 1000.0))

# Teachers: the knobs that change the AR model itself (vocabulary size, id order, width, depth).
TEACHERS = {
    "v1024": (("data.bpe_vocab_size", 1024),),
    "v8192": (("data.bpe_vocab_size", 8192),),
    "v259": (("data.bpe_vocab_size", 259),),  # no merges: one id per byte (character-level)
    "v259_freq": (("data.bpe_vocab_size", 259), ("data.bpe_id_order", "frequency")),
    "v1024_freq": (("data.bpe_vocab_size", 1024), ("data.bpe_id_order", "frequency")),
    "v1024_d384": (("data.bpe_vocab_size", 1024), ("model.d_model", 384),
                   ("model.n_heads", 6)),
    # The embedded default's settings (configs/kjv_tiny.py), then the same at twice the depth
    # and 3/4 of the width (about the same parameters and step time).
    "default": DEFAULT,
    "default_l8": DEFAULT + (("model.n_layers", 8), ("model.d_model", 192), ("model.n_heads", 3)),
    # The default at half the width (configs/kjv_tiny.py since 2026-12-03): a d=128 step costs
    # about half a d=256 one, so the same wall time buys the k4 student ~3x the steps (and its
    # teacher is weaker).
    "default_d128": DEFAULT + (("model.d_model", 128), ("model.n_heads", 2)),
    # ... and its teacher starting at the unigram distribution (configs/kjv_tiny.py since
    # 2026-12-04): 300 steps then reach a lower data NLL, with less probability on rare ids.
    "default_d128_unigram": DEFAULT + (("model.d_model", 128), ("model.n_heads", 2),
                                       ("train.head_bias_init", "unigram")),
    # ... with 4 heads of 32 instead of 2 of 64 (configs/kjv_tiny.py since 2026-12-06): the same
    # teacher quality, and the student's window tokens get twice the attention lookups per layer.
    "default_d128_unigram_h4": DEFAULT + (("model.d_model", 128), ("model.n_heads", 4),
                                          ("train.head_bias_init", "unigram")),
    # The default's settings at one id per byte, trained 1000 steps instead of 300 (~24 min):
    # a sharper teacher, to see whether the byte-level student's small gap survives it.
    "v259_long": DEFAULT + (("data.bpe_vocab_size", 259),
                            ("stage_overrides.teacher.train.num_steps", 1000),
                            ("stage_overrides.teacher.optim.warmup_steps", 50)),
}

# Budget unit: ~5 min of distillation on the 2-core CPU (120 k4 steps of batch 8); the chains
# split the same wall time between their stages. single_k4 runs twice as long, and every
# variant's curve shows its NLL_j along the way.
CHAIN = _steps("k1", 60) + _steps("k2", 40) + _steps("k4", 60)
VARIANTS = [  # in the order a default run of the study trains them (most telling first)
    Variant("single_k4", "v1024", "teacher,k4", _steps("k4", 240, 1e-3),
            "AR -> k4 in one stage (k-round inverse-CDF targets), 240 steps, lr 1e-3"),
    Variant("single_k4_120", "v1024", "teacher,k4", _steps("k4", 120, 1e-3),
            "AR -> k4, 120 steps, lr 1e-3"),
    Variant("chain", "v1024", "teacher,k1,k2,k4", CHAIN,
            "the paper's chain AR -> k1 -> k2 -> k4, self-forcing (60/40/60 steps)"),
    Variant("chain_ar_targets", "v1024", "teacher,k1,k2,k4",
            CHAIN + (("distill.target", "ar_rollout"),),
            "same chain, every stage on AR-teacher targets (previous stage = init only)"),
    Variant("noise_inversion", "v1024", "teacher,k4",
            _steps("k4", 120, 1e-3) + (("distill.target", "noise_inversion"),),
            "PTP baseline: real tokens as targets, z inverted inside their CDF bins, 120 steps"),
    Variant("single_k4_120_v8192", "v8192", "teacher,k4", _steps("k4", 120, 1e-3),
            "vocabulary 8192 instead of 1024 (its own teacher)"),
    Variant("chain_k1_heavy", "v1024", "teacher,k1,k2,k4",
            _steps("k1", 120) + _steps("k2", 30) + _steps("k4", 40),
            "chain with the budget moved to k1 (120/30/40 steps)"),
    Variant("single_k4_120_lr3e-3", "v1024", "teacher,k4", _steps("k4", 120, 3e-3),
            "AR -> k4, 120 steps, lr 3e-3"),
    Variant("single_k4_120_d384", "v1024_d384", "teacher,k4", _steps("k4", 120, 1e-3),
            "width 384 / 6 heads instead of 256 / 4 (its own teacher)"),
    Variant("single_k4_120_lr3e-4", "v1024", "teacher,k4", _steps("k4", 120, 3e-4),
            "AR -> k4, 120 steps, lr 3e-4"),
    Variant("single_k4_120_f1000", "v1024", "teacher,k4",
            _steps("k4", 120, 1e-3) + (("model.noise_max_freq", 1000.0),),
            "AR -> k4, 120 steps, noise features up to 1000 cycles over [0, 1] (authors: 1)"),
    Variant("single_k4_120_v259", "v259", "teacher,k4", _steps("k4", 120, 1e-3),
            "byte-level vocabulary (259 ids, its own teacher)"),
    Variant("single_k4_120_v259_f1000", "v259", "teacher,k4",
            _steps("k4", 120, 1e-3) + (("model.noise_max_freq", 1000.0),),
            "byte-level vocabulary, noise features up to 1000 cycles"),
    Variant("single_k4_120_v259_freq_f1000", "v259_freq", "teacher,k4",
            _steps("k4", 120, 1e-3) + (("model.noise_max_freq", 1000.0),),
            "byte-level, ids by frequency, noise features up to 1000 cycles"),
    Variant("single_k4_120_freq_f1000", "v1024_freq", "teacher,k4",
            _steps("k4", 120, 1e-3) + (("model.noise_max_freq", 1000.0),),
            "ids by frequency, noise features up to 1000 cycles"),
    Variant("single_k4_120_v8192_f1000", "v8192", "teacher,k4",
            _steps("k4", 120, 1e-3) + (("model.noise_max_freq", 1000.0),),
            "8192 ids (the default's vocabulary), noise features up to 1000 cycles"),
    Variant("default_k4", "default", "teacher,k4", _steps("k4", 160, 1e-3),
            "the embedded default's recipe: 8192 ids by frequency, noise features up to 1000 "
            "cycles, AR -> k4 for 160 steps"),
    Variant("default_k4_l8", "default_l8", "teacher,k4", _steps("k4", 160, 1e-3),
            "the default at 8 layers of width 192 (3 heads) instead of 4 of 256 (own teacher)"),
    Variant("default_k1_300_k4_100", "default", "teacher,k1,k4",
            _steps("k1", 300, 1e-3) + _steps("k4", 100, 1e-3)
            + (("distill.target", "ar_rollout"),),
            "the default's settings as a chain AR -> k1 (300 steps) -> k4 (100), both on "
            "AR-teacher targets"),
    Variant("default_k4_600", "default", "teacher,k4",
            _steps("k4", 600, 1e-3) + (("stage_overrides.k4.train.eval_every", 100),),
            "the default's recipe with the k4 stage 3.75x longer (600 steps, ~37 min)"),
    Variant("v259_long_k4_900", "v259_long", "teacher,k4",
            _steps("k4", 900, 1e-3) + (("stage_overrides.k4.train.eval_every", 100),),
            "bytes with the default's other settings, the longest budget measured: teacher "
            "1000 steps, AR -> k4 900 steps (~35 min)"),
    Variant("default_d128_k4_480", "default_d128", "teacher,k4", _steps("k4", 480, 1e-3),
            "the default at width 128 (2 heads; own teacher, 300 steps), AR -> k4 for 480 "
            "steps: about the default's distillation wall time"),
    Variant("default_d128_unigram_k4_480", "default_d128_unigram", "teacher,k4",
            _steps("k4", 480, 1e-3),
            "configs/kjv_tiny.py without its draft: width 128, unigram output bias at the "
            "teacher's start, AR -> k4 for 480 steps"),
    Variant("default_d128_unigram_k4_800", "default_d128_unigram", "teacher,k4",
            _steps("k4", 800, 1e-3),
            "the default's teacher, AR -> k4 for 800 steps (what the rest of the 25-minute "
            "budget would buy)"),
    Variant("default_d128_unigram_k4_480_lr2e-3", "default_d128_unigram", "teacher,k4",
            _steps("k4", 480, 2e-3),
            "the default's teacher, AR -> k4 for 480 steps at twice the default's peak lr"),
    Variant("default_d128_unigram_k4_240_b16", "default_d128_unigram", "teacher,k4",
            _steps("k4", 240, 1e-3, batch=16),
            "the default's teacher, AR -> k4 for 240 steps of 16 sequences (the default's "
            "sequences in half the steps)"),
    Variant("default_d128_unigram_k4_2400_lr2e-3", "default_d128_unigram", "teacher,k4",
            _steps("k4", 2400, 2e-3),
            "configs/kjv_small.py without its draft: the default's teacher, AR -> k4 for 2400 "
            "steps at lr 2e-3 (~53 min)"),
    Variant("default_d128_unigram_k4_5600_lr2e-3", "default_d128_unigram", "teacher,k4",
            _steps("k4", 5600, 2e-3) + (("stage_overrides.k4.train.eval_every", 400),),
            "the default's teacher, AR -> k4 for 5600 steps at lr 2e-3 (~2.5 h): the longest "
            "budget measured"),
    Variant("default_d128_unigram_k4_480_lr2e-3_ema", "default_d128_unigram", "teacher,k4",
            _steps("k4", 480, 2e-3) + (("stage_overrides.k4.optim.ema_decay", 0.999),),
            "as default_d128_unigram_k4_480_lr2e-3, evaluated on an EMA of the student's "
            "weights (decay 0.999 with the (1 + t) / (10 + t) warm-up)"),
    Variant("default_d128_unigram_k4_480_lr2e-3_f10000", "default_d128_unigram", "teacher,k4",
            _steps("k4", 480, 2e-3) + (("model.noise_max_freq", 10000.0),),
            "as default_d128_unigram_k4_480_lr2e-3 with noise features up to 10000 cycles "
            "over [0, 1] (the default: 1000)"),
    Variant("default_d128_unigram_k4_2400_lr2e-3_ema", "default_d128_unigram", "teacher,k4",
            _steps("k4", 2400, 2e-3) + (("stage_overrides.k4.optim.ema_decay", 0.999),),
            "as default_d128_unigram_k4_2400_lr2e-3 (configs/kjv_small.py), evaluated on an "
            "EMA of the student's weights (decay 0.999 with warm-up)"),
    Variant("default_d128_unigram_k4_480_lr4e-3", "default_d128_unigram", "teacher,k4",
            _steps("k4", 480, 4e-3),
            "the default's teacher, AR -> k4 for 480 steps at 4x the default's peak lr"),
    Variant("default_d128_unigram_k4_480_soft_muon_lr2e-3", "default_d128_unigram",
            "teacher,k4", _steps("k4", 480, 2e-3) + _SOFT_MUON,
            "the default's teacher, AR -> k4 for 480 steps on soft targets with Muon at lr 2e-3"),
    Variant("default_d128_unigram_k4_480_soft_muon_lr4e-3", "default_d128_unigram",
            "teacher,k4", _steps("k4", 480, 4e-3) + _SOFT_MUON,
            "configs/kjv_tiny.py's k4 stage from 2026-12-06 until its batch was halved: 480 "
            "steps on soft targets with Muon at lr 4e-3"),
    Variant("default_d128_unigram_k4_960_b4_soft_muon_lr4e-3", "default_d128_unigram",
            "teacher,k4", _steps("k4", 960, 4e-3, batch=4) + _SOFT_MUON + (
                ("stage_overrides.k4.train.eval_batches", 8),
                ("stage_overrides.k4.train.eval_every", 100)),
            "configs/kjv_tiny.py's k4 stage: 960 steps of 4 sequences on soft targets with Muon "
            "at lr 4e-3 (validated on 8 batches of 4: the same 32 rows)"),
    Variant("default_d128_unigram_k4_2400_soft_muon_lr4e-3", "default_d128_unigram",
            "teacher,k4", _steps("k4", 2400, 4e-3) + _SOFT_MUON,
            "configs/kjv_small.py's k4 stage on 2026-12-06 before its 4800-step schedule: 2400 "
            "steps on soft targets with Muon at lr 4e-3"),
    Variant("default_d128_unigram_k4_4800_b4_soft_muon_lr4e-3", "default_d128_unigram",
            "teacher,k4", _steps("k4", 4800, 4e-3, batch=4) + _SOFT_MUON + (
                ("stage_overrides.k4.train.eval_batches", 8),
                ("stage_overrides.k4.train.eval_every", 400)),
            "configs/kjv_small.py's k4 stage at kjv_tiny.py's half batch: 4800 steps of 4 "
            "sequences on soft targets with Muon at lr 4e-3 (no better than 2400 x 8)"),
    Variant("default_d128_unigram_h4_k4_960_b4_soft_muon_lr4e-3", "default_d128_unigram_h4",
            "teacher,k4", _steps("k4", 960, 4e-3, batch=4) + _SOFT_MUON + (
                ("stage_overrides.k4.train.eval_batches", 8),
                ("stage_overrides.k4.train.eval_every", 100)),
            "configs/kjv_tiny.py since 2026-12-06: 4 heads of 32, k4 960 steps of 4 sequences on "
            "soft targets with Muon at lr 4e-3"),
    Variant("single_k4_120_f100", "v1024", "teacher,k4",
            _steps("k4", 120, 1e-3) + (("model.noise_max_freq", 100.0),),
            "AR -> k4, 120 steps, noise features up to 100 cycles over [0, 1]"),
]

STUDY = fidelity.Study(base=STUDY_BASE, teachers=TEACHERS, variants=VARIANTS)

if __name__ == "__main__":
  fidelity.run_cli(STUDY)
