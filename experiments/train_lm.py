r"""Trains a small Llama-style LM from scratch on the Austen corpus.

  python -m turboquant_jax.data.fetch      # the Austen text, once
  python -m experiments.train_lm --config=configs/train_lm.py:scale=quick \
      --workdir=runs/train_quick

Data. Each book is tokenized on its own ("bytes": UTF-8 bytes, vocab 256;
"smollm2": SmolLM2's BPE); the last `data.val_fraction` of each book's
tokens is the validation split, the rest the training split. A training
batch is `batch_size` windows of seq_len + 1 tokens at uniformly random
starts (a window never crosses a book boundary); the windows of step s are
drawn from np.random.default_rng([seed, s]), so they depend only on
(seed, s). Validation uses fixed non-overlapping windows (every target
token once) of the validation split.

Outputs in --workdir:
- config.json, results.jsonl: rows with op="train" (step, train_loss = the
  mean over the steps since the previous train row, lr of the step,
  tokens_seen, step_seconds), op="eval" (step, val_loss in nats/token,
  val_ppl, unigram_ppl, val_bits_per_byte) and op="run" (one per start or
  resume: step it starts from, environment);
- checkpoints/<step>/: orbax checkpoints of params + optimizer state + step
  (the newest `keep_checkpoints`);
- loss_curve.png.

unigram_ppl is the perplexity on the same validation targets of a unigram
model fit to the training split's token counts with add-one smoothing,
p(v) = (count(v) + 1) / (N + V): the baseline a model must beat.

Resume. On start the newest checkpoint is restored and training continues
at the next step; rows after that checkpoint's step (written by a killed
run) are dropped first, so results.jsonl stays as one uninterrupted run
would have written it (up to timing fields and op="run" rows). The batches
depend only on (seed, step), so the resumed parameters equal the
uninterrupted run's bit for bit (tests/experiments/train_lm_test.py).
"""

import dataclasses
import json
import math
import os
import pathlib
import re
import shutil
import time

from absl import app
from absl import logging
from flax import nnx
import jax
import jax.numpy as jnp
import matplotlib
import numpy as np
import optax
import tqdm

from experiments import common
from turboquant_jax import checkpoint
from turboquant_jax import model as model_lib
from turboquant_jax import results
from turboquant_jax.data import austen

matplotlib.use("Agg")
from matplotlib import pyplot as plt  # pylint: disable=g-import-not-at-top



CHECKPOINT_DIR = "checkpoints"
PLOT_FILE = "loss_curve.png"
# Row fields that measure wall time, not the computation: they differ
# between an uninterrupted and a resumed run.
TIMING_FIELDS = ("step_seconds",)
TOKENIZERS = ("bytes", "smollm2")

# ------------------------------------------------------------------ data


@dataclasses.dataclass(frozen=True)
class Corpus:
  """Token ids per book, split into training and validation parts.

  Attributes:
    train, val: one i32 array per book.
    vocab_size: the tokenizer's vocabulary size.
    val_bytes_per_token: UTF-8 bytes per token over the validation split.
  """
  train: tuple[np.ndarray, ...]
  val: tuple[np.ndarray, ...]
  vocab_size: int
  val_bytes_per_token: float


def _smollm2_tokenizer():
  """SmolLM2's tokenizer from the GGUF metadata (the weights are not read)."""
  # Deferred: only this tokenizer needs gguf and tokenizers.
  # pylint: disable=g-import-not-at-top
  import gguf
  from turboquant_jax.data import smollm2
  from turboquant_jax.model import gguf as gguf_lib
  # pylint: enable=g-import-not-at-top
  path = smollm2.smollm2_path()
  if not path.is_file():
    raise FileNotFoundError(f"SmolLM2 GGUF not found at {path}; fetch it "
                            "with `python -m turboquant_jax.data.fetch`, or "
                            "use --config.tokenizer=bytes")
  tok, _ = gguf_lib.build_tokenizer(
      gguf_lib.read_metadata(gguf.GGUFReader(path)))
  return tok


def tokenizer_fns(name: str):
  """(encode: str -> i32[n], decode: i32[n] -> str, vocab_size)."""
  if name == "bytes":
    return (lambda s: np.frombuffer(s.encode("utf-8"), np.uint8).astype(
        np.int32),
            lambda ids: bytes(np.asarray(ids, np.uint8)).decode(
                "utf-8", errors="replace"),
            256)
  if name == "smollm2":
    tok = _smollm2_tokenizer()
    return (lambda s: np.asarray(tok.encode(s, add_special_tokens=False).ids,
                                 np.int32),
            lambda ids: tok.decode([int(i) for i in ids],
                                   skip_special_tokens=False),
            tok.get_vocab_size())
  raise ValueError(f"tokenizer={name!r} must be one of {TOKENIZERS}")


def split_tokens(tokens: np.ndarray, val_fraction: float
                 ) -> tuple[np.ndarray, np.ndarray]:
  """(train, val): val is the last ceil(val_fraction * n) tokens."""
  if not 0 < val_fraction < 1:
    raise ValueError(f"{val_fraction=} must be in (0, 1)")
  n_val = math.ceil(val_fraction * len(tokens))
  return tokens[:len(tokens) - n_val], tokens[len(tokens) - n_val:]


def load_tokens(config) -> Corpus:
  """Tokenizes config.data.books and splits each book."""
  encode, decode, vocab = tokenizer_fns(config.tokenizer)
  train, val = [], []
  val_bytes = 0
  for name in config.data.books:
    t, v = split_tokens(encode(austen.load_book(name)),
                        config.data.val_fraction)
    if len(t) <= config.seq_len or len(v) <= config.seq_len:
      raise ValueError(f"book {name!r} is too short for "
                       f"seq_len={config.seq_len}")
    train.append(t)
    val.append(v)
    val_bytes += len(decode(v).encode("utf-8"))
  return Corpus(train=tuple(train), val=tuple(val), vocab_size=vocab,
                val_bytes_per_token=val_bytes / sum(map(len, val)))


def train_batch(train: tuple[np.ndarray, ...], seed: int, step: int,
                batch_size: int, seq_len: int) -> np.ndarray:
  """i32[batch_size, seq_len + 1]: step's windows; a function of (seed, step).

  Every window start of every book is equally likely.
  """
  starts_per_book = np.array([len(t) - seq_len for t in train], np.int64)
  ends = np.cumsum(starts_per_book)
  rng = np.random.default_rng([seed, step])
  idx = rng.integers(0, ends[-1], size=batch_size)
  book = np.searchsorted(ends, idx, side="right")
  start = idx - (ends[book] - starts_per_book[book])
  return np.stack([train[b][s:s + seq_len + 1]
                   for b, s in zip(book, start)]).astype(np.int32)


def eval_windows(val: tuple[np.ndarray, ...], seq_len: int,
                 max_windows: int = 0) -> np.ndarray:
  """i32[W, seq_len + 1] non-overlapping windows (stride seq_len).

  Window i of a book holds tokens [i·seq_len, (i+1)·seq_len], so its targets
  (all but the first token) are each predicted once. max_windows > 0 keeps
  that many, evenly spread over all books' windows.
  """
  windows = [v[s:s + seq_len + 1] for v in val
             for s in range(0, len(v) - seq_len, seq_len)]
  if max_windows and max_windows < len(windows):
    keep = np.unique(np.linspace(0, len(windows) - 1, max_windows).round()
                     .astype(int))
    windows = [windows[i] for i in keep]
  return np.stack(windows).astype(np.int32)


def unigram_nll(train: tuple[np.ndarray, ...], targets: np.ndarray,
                vocab_size: int) -> float:
  """Mean NLL (nats) of `targets` under the add-one unigram of `train`.

  p(v) = (count(v) + 1) / (N + V) with count over all training tokens.
  """
  counts = sum(np.bincount(t, minlength=vocab_size).astype(np.float64)
               for t in train)
  n = counts.sum()
  log_p = np.log(counts + 1) - np.log(n + vocab_size)
  return float(-log_p[np.asarray(targets).ravel()].mean())


# ------------------------------------------------------------------ model


def model_config(config, vocab_size: int) -> model_lib.ModelConfig:
  m = config.model
  return model_lib.ModelConfig(
      vocab_size=vocab_size, d_model=m.d_model, n_layers=m.n_layers,
      n_heads=m.n_heads, n_kv_heads=m.n_kv_heads, head_dim=m.head_dim,
      ffn_dim=m.ffn_dim, rms_eps=m.rms_eps, rope_theta=m.rope_theta,
      tie_embeddings=m.tie_embeddings, max_seq_len=config.seq_len,
      dtype=m.dtype)


def lr_schedule(config) -> optax.Schedule:
  """Linear warmup from 0 to lr, cosine decay to lr·min_lr_ratio at the end.

  Evaluated at the optimizer's count, i.e. update s (1-based) uses
  schedule(s - 1).
  """
  o = config.optimizer
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=o.lr, warmup_steps=o.warmup_steps,
      decay_steps=config.num_steps, end_value=o.lr * o.min_lr_ratio)


def _decay_mask(params):
  """Weight decay on matrices (projections, embeddings), not on norms."""
  return jax.tree.map(lambda x: x.ndim >= 2, params)


def make_optimizer(config) -> optax.GradientTransformation:
  o = config.optimizer
  return optax.chain(
      optax.clip_by_global_norm(o.grad_clip),
      optax.adamw(lr_schedule(config), b1=o.b1, b2=o.b2, eps=o.eps,
                  weight_decay=o.weight_decay, mask=_decay_mask))


def init_state(config, mconfig: model_lib.ModelConfig,
               tx: optax.GradientTransformation):
  """(graphdef, state): state = {params, opt_state, step} at step 0."""
  model = model_lib.Transformer(mconfig, rngs=nnx.Rngs(config.seed))
  graphdef, params = nnx.split(model)
  return graphdef, dict(params=params, opt_state=tx.init(params),
                        step=jnp.zeros((), jnp.int32))


def lm_loss(model: model_lib.Transformer, tokens: jax.Array) -> jax.Array:
  """Mean next-token cross entropy (nats) of tokens i32[B, T + 1]."""
  logits = model.forward_no_cache(tokens[:, :-1])
  return optax.softmax_cross_entropy_with_integer_labels(
      logits, tokens[:, 1:]).mean()


def make_train_step(graphdef, tx: optax.GradientTransformation):
  """A jitted (state, tokens) -> (state, loss); donates the old state."""

  @jax.jit(donate_argnums=0)
  def train_step(state, tokens):
    def loss_fn(params):
      return lm_loss(nnx.merge(graphdef, params), tokens)

    loss, grads = jax.value_and_grad(loss_fn)(state["params"])
    updates, opt_state = tx.update(grads, state["opt_state"],
                                   state["params"])
    return dict(params=optax.apply_updates(state["params"], updates),
                opt_state=opt_state, step=state["step"] + 1), loss

  return train_step


def make_eval_fn(graphdef, batch_size: int):
  """(params, windows i32[W, T + 1]) -> mean NLL over all W·T targets."""

  @jax.jit
  def nll_sums(params, tokens):
    logits = nnx.merge(graphdef, params).forward_no_cache(tokens[:, :-1])
    nll = optax.softmax_cross_entropy_with_integer_labels(logits,
                                                          tokens[:, 1:])
    return nll.astype(jnp.float32).sum(axis=1)

  def evaluate(params, windows: np.ndarray) -> float:
    total = 0.0
    for i in range(0, len(windows), batch_size):
      chunk = windows[i:i + batch_size]
      padded = np.zeros((batch_size, windows.shape[1]), np.int32)
      padded[:len(chunk)] = chunk         # one shape: one compilation
      sums = np.asarray(jax.device_get(nll_sums(params, padded)), np.float64)
      total += sums[:len(chunk)].sum()
    return total / (windows.shape[0] * (windows.shape[1] - 1))

  return evaluate


# ------------------------------------------------------------ checkpoints


def checkpoint_steps(directory: pathlib.Path) -> list[int]:
  """Steps of the complete checkpoints in `directory`, ascending.

  Orbax writes into a temporary directory and renames it when done, so a
  directory named by an integer is complete.
  """
  if not directory.is_dir():
    return []
  return sorted(int(p.name) for p in directory.iterdir()
                if p.is_dir() and re.fullmatch(r"\d+", p.name))


def save_checkpoint(directory: pathlib.Path, state, keep: int) -> None:
  """Saves state under directory/<step>, then keeps only the newest `keep`."""
  step = int(jax.device_get(state["step"]))
  checkpoint.save(directory / str(step), state)
  for old in checkpoint_steps(directory)[:-keep]:
    shutil.rmtree(directory / str(old), ignore_errors=True)


def _rewrite_rows(path: pathlib.Path, rows: list[dict]) -> None:
  """Replaces a results.jsonl file atomically by `rows`."""
  tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
  with open(tmp, "w", encoding="utf-8") as f:
    for row in rows:
      f.write(json.dumps(results.jsonable(row), allow_nan=False,
                         ensure_ascii=False) + "\n")
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, path)


def drop_rows_after(writer: results.Writer, step: int) -> int:
  """Drops rows whose step is > `step` (-1: all rows); returns how many."""
  rows = writer.rows()
  keep = [r for r in rows if r.get("step", math.inf) <= step]
  if len(keep) != len(rows):
    _rewrite_rows(writer.results_path, keep)
  return len(rows) - len(keep)


# ------------------------------------------------------------------ plot


def plot_loss_curve(rows: list[dict], path: pathlib.Path,
                    title: str) -> pathlib.Path:
  """Train loss per step, validation loss and the unigram baseline."""
  train = [r for r in rows if r.get("op") == "train"]
  evals = [r for r in rows if r.get("op") == "eval"]
  fig, ax = plt.subplots(figsize=(7, 4.5))
  if train:
    ax.plot([r["step"] for r in train], [r["train_loss"] for r in train],
            label="train loss", color="tab:blue", lw=1)
  if evals:
    ax.plot([r["step"] for r in evals], [r["val_loss"] for r in evals],
            "o-", label="validation loss", color="tab:orange", ms=4)
    uni = math.log(evals[-1]["unigram_ppl"])
    ax.axhline(uni, ls="--", color="gray",
               label=f"unigram (ppl {evals[-1]['unigram_ppl']:.1f})")
    last = evals[-1]
    ax.annotate(f"val ppl {last['val_ppl']:.2f}",
                (last["step"], last["val_loss"]),
                textcoords="offset points", xytext=(-60, 12))
  ax.set_xlabel("step")
  ax.set_ylabel("cross entropy (nats / token)")
  ax.set_title(title, fontsize=9)
  ax.grid(alpha=0.3)
  ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)
  return path


# ------------------------------------------------------------------ main


def _check_config(config) -> None:
  for name in ("num_steps", "log_every", "eval_every", "checkpoint_every",
               "keep_checkpoints", "batch_size", "seq_len",
               "eval_batch_size"):
    value = config[name]
    if not isinstance(value, int) or value < 1:
      raise ValueError(f"{name}={value!r} must be a positive integer")
  if not 0 <= config.optimizer.warmup_steps < config.num_steps:
    raise ValueError(f"optimizer.warmup_steps={config.optimizer.warmup_steps}"
                     f" must be in [0, num_steps={config.num_steps})")
  if config.checkpoint_every % config.log_every:
    raise ValueError(f"checkpoint_every={config.checkpoint_every} must be a "
                     f"multiple of log_every={config.log_every} (train rows "
                     "average over log_every steps; a resume starts at a "
                     "checkpoint)")


def _title(config, mconfig, n_params: int) -> str:
  return (f"{config.tokenizer} tokens, {mconfig.n_layers} layers, d_model "
          f"{mconfig.d_model}, {mconfig.n_heads}x{mconfig.head_dim} heads "
          f"({mconfig.n_kv_heads} KV), context {config.seq_len}, "
          f"{n_params / 1e6:.2f}M params")


def run(config, workdir: str | os.PathLike, *,
        stop_after: int | None = None) -> dict | None:
  """Trains (or resumes training) into workdir.

  Args:
    config: the ConfigDict of configs/train_lm.py.
    workdir: output directory (see the module docstring).
    stop_after: stop right after this step, as if the process were killed
      there (no plot; for tests).

  Returns:
    The last eval row, or None when stopped early.
  """
  _check_config(config)
  workdir = pathlib.Path(workdir)
  writer = results.Writer(workdir, config)
  ckpt_dir = workdir / CHECKPOINT_DIR
  corpus = load_tokens(config)
  mconfig = model_config(config, corpus.vocab_size)
  tx = make_optimizer(config)
  graphdef, state = init_state(config, mconfig, tx)
  n_params = sum(x.size for x in jax.tree.leaves(state["params"]))
  schedule = lr_schedule(config)

  steps = checkpoint_steps(ckpt_dir)
  start = steps[-1] if steps else 0
  if steps:
    abstract = jax.eval_shape(lambda: state)
    state = checkpoint.restore(ckpt_dir / str(start), abstract)
    if int(state["step"]) != start:
      raise ValueError(f"checkpoint {ckpt_dir / str(start)} holds step "
                       f"{int(state['step'])}")
  dropped = drop_rows_after(writer, start if steps else -1)
  if dropped:
    logging.warning("dropped %d rows written after step %d by an "
                    "interrupted run", dropped, start)
  env = results.environment()
  writer.write(dict(op="run", step=start, resumed=bool(steps),
                    n_params=n_params, vocab_size=corpus.vocab_size,
                    train_tokens=sum(map(len, corpus.train)),
                    val_tokens=sum(map(len, corpus.val)), **env))

  windows = eval_windows(corpus.val, config.seq_len, config.eval_windows)
  uni_ppl = math.exp(unigram_nll(corpus.train, windows[:, 1:],
                                 corpus.vocab_size))
  evaluate = make_eval_fn(graphdef, config.eval_batch_size)
  train_step = make_train_step(graphdef, tx)
  tokens_per_step = config.batch_size * config.seq_len

  def eval_row(step):
    loss = evaluate(state["params"], windows)
    row = dict(op="eval", step=step, val_loss=loss, val_ppl=math.exp(loss),
               unigram_ppl=uni_ppl,
               val_bits_per_byte=loss / math.log(2)
               / corpus.val_bytes_per_token,
               eval_tokens=int(windows[:, 1:].size),
               tokens_seen=step * tokens_per_step)
    writer.write(row)
    return row

  last_eval = None
  if start == 0:
    last_eval = eval_row(0)
  bar = tqdm.tqdm(total=config.num_steps, initial=start, desc="train",
                  unit="step", dynamic_ncols=True)
  losses = []
  train_loss = math.nan
  t0 = time.perf_counter()
  paused = 0.0                    # seconds of evals and saves since t0
  for step in range(start + 1, config.num_steps + 1):
    batch = train_batch(corpus.train, config.seed, step, config.batch_size,
                        config.seq_len)
    state, loss = train_step(state, batch)
    losses.append(loss)
    bar.update(1)
    if step % config.log_every == 0 or step == config.num_steps:
      train_loss = float(np.mean(np.asarray(jax.device_get(losses),
                                            np.float64)))
      seconds = (time.perf_counter() - t0 - paused) / len(losses)
      writer.write(dict(op="train", step=step, train_loss=train_loss,
                        lr=float(schedule(step - 1)),
                        tokens_seen=step * tokens_per_step,
                        step_seconds=seconds))
      losses = []
      t0, paused = time.perf_counter(), 0.0
    t1 = time.perf_counter()
    if step % config.eval_every == 0 or step == config.num_steps:
      last_eval = eval_row(step)
    if step % config.checkpoint_every == 0 or step == config.num_steps:
      save_checkpoint(ckpt_dir, state, config.keep_checkpoints)
    paused += time.perf_counter() - t1
    bar.set_postfix(loss=f"{train_loss:.3f}",
                    val_ppl=f"{last_eval['val_ppl']:.2f}" if last_eval
                    else "-", refresh=False)
    if stop_after is not None and step >= stop_after:
      bar.close()
      return None
  bar.close()
  rows = writer.rows()
  plot_loss_curve(rows, workdir / PLOT_FILE,
                  _title(config, mconfig, n_params))
  if last_eval is None:
    last_eval = [r for r in rows if r.get("op") == "eval"][-1]
  return last_eval


def _report(row) -> None:
  print(f"step {row['step']}: val loss {row['val_loss']:.4f} nats/token, "
        f"val ppl {row['val_ppl']:.3f} (unigram {row['unigram_ppl']:.3f}), "
        f"{row['val_bits_per_byte']:.3f} bits/byte")


if __name__ == "__main__":
  common.define_flags("train_lm.py")
  app.run(common.main_for(run, _report))
