r"""Training small Llama-style LMs from scratch on the Austen corpus.

Quick run (CPU, a few minutes; byte-level tokens):

  python -m turboquant_jax.data.fetch
  python -m experiments.train_lm --config=configs/train_lm.py:scale=quick \
      --workdir=runs/train_quick

The bigger model, for a GPU (SmolLM2's BPE tokenizer, context 1024):

  python -m experiments.train_lm --config=configs/train_lm.py:scale=base \
      --workdir=runs/train_base

Any field can be overridden, e.g. `--config.num_steps=100`. A workdir
remembers its config: re-running with the same config resumes from the last
checkpoint, another config is refused.
"""

import ml_collections

from configs import common

BOOKS = ("emma", "mansfieldpark", "northangerabbey", "persuasion",
         "prideprejudice", "sensesensibility")

# Per-scale settings. Every model has head_dim 128 (as Llama-3).
_SCALES = {
    "quick": dict(
        tokenizer="bytes", seq_len=256, batch_size=16, num_steps=300,
        model=dict(d_model=256, n_layers=2, n_heads=2, n_kv_heads=1,
                   head_dim=128, ffn_dim=768, tie_embeddings=False),
        lr=3e-3, warmup_steps=30, log_every=10, eval_every=50,
        checkpoint_every=50, eval_windows=128, eval_batch_size=32),
    # About 50M parameters (25M of them the tied 49152 x 512 embedding).
    # The six novels are only about 1M SmolLM2 tokens, so 2000 steps of
    # 16 x 1024 tokens are about 30 epochs: watch val_loss for overfitting.
    "base": dict(
        tokenizer="smollm2", seq_len=1024, batch_size=16, num_steps=2000,
        model=dict(d_model=512, n_layers=8, n_heads=4, n_kv_heads=2,
                   head_dim=128, ffn_dim=1536, tie_embeddings=True),
        lr=1e-3, warmup_steps=100, log_every=10, eval_every=200,
        checkpoint_every=200, eval_windows=0, eval_batch_size=16),
}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """The training config; arg "scale=quick" (default) or "scale=base"."""
  arg = common.parse_arg(arg, scale="quick")
  if arg.scale not in _SCALES:
    raise ValueError(f"{arg.scale=!r} must be one of {sorted(_SCALES)}")
  s = _SCALES[arg.scale]

  config = ml_collections.ConfigDict()
  config.scale = arg.scale
  # Model init and the data sampler (the batch of step s depends only on
  # (seed, s), which makes a resumed run exact).
  config.seed = 0

  # "bytes": UTF-8 bytes, vocab 256 (always available). "smollm2": the
  # SmolLM2 byte-level BPE (vocab 49152), read from the GGUF file that
  # `python -m turboquant_jax.data.fetch` puts in the data cache.
  config.tokenizer = s["tokenizer"]
  config.data = ml_collections.ConfigDict()
  config.data.books = BOOKS
  # The last val_fraction of each book's tokens is the validation set.
  config.data.val_fraction = 0.05

  config.model = ml_collections.ConfigDict(s["model"])
  config.model.rope_theta = 10000.0
  config.model.rms_eps = 1e-6
  config.model.dtype = "float32"

  config.seq_len = s["seq_len"]         # context; also model max_seq_len
  config.batch_size = s["batch_size"]
  config.num_steps = s["num_steps"]

  # AdamW with linear warmup to lr, then cosine decay to lr * min_lr_ratio
  # at num_steps; weight decay on matrices only; global-norm clipping.
  config.optimizer = ml_collections.ConfigDict()
  config.optimizer.lr = s["lr"]
  config.optimizer.warmup_steps = s["warmup_steps"]
  config.optimizer.min_lr_ratio = 0.1
  config.optimizer.b1 = 0.9
  config.optimizer.b2 = 0.95
  config.optimizer.eps = 1e-8
  config.optimizer.weight_decay = 0.1
  config.optimizer.grad_clip = 1.0

  # A train row every log_every steps (mean loss over those steps), an eval
  # row every eval_every steps (and at steps 0 and num_steps), a checkpoint
  # every checkpoint_every steps (a multiple of log_every) and at the end;
  # the newest keep_checkpoints are kept.
  config.log_every = s["log_every"]
  config.eval_every = s["eval_every"]
  config.checkpoint_every = s["checkpoint_every"]
  config.keep_checkpoints = 2
  # Validation: non-overlapping windows of seq_len targets over the
  # validation split; eval_windows > 0 takes that many, evenly spread (0:
  # all of them).
  config.eval_windows = s["eval_windows"]
  config.eval_batch_size = s["eval_batch_size"]
  return config
