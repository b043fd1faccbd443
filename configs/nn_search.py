r"""Nearest-neighbour search against faiss (issue #5; paper's Fig. 5, Table 2).

The canonical CPU run (GloVe-50d, SmolLM2 token embeddings and KV-cache
keys, random d = 1536 / 3072 for indexing time):

  python -m turboquant_jax.data.fetch
  python -m experiments.nn_search --config=configs/nn_search.py \
      --workdir=results/nn_search/cpu

`:scale=quick` is the same sweep on small sets (about 2 minutes on 2
cores). Fields can be overridden, e.g. `--config.only_datasets=glove` or
`--config.only_methods=tq_mse_nc,pq`. A data set of your own in a standard
form is one more entry of `config.datasets` (see `dataset` below), e.g.
glove-200-angular.hdf5 from ann-benchmarks:

  dataset("glove200", "ann_hdf5", path="/data/glove-200-angular.hdf5",
          n_base=100_000, n_queries=1_000)
"""

import ml_collections

from configs import common

_SCALES = ("default", "quick")


def dataset(name: str, kind: str, *, n_base: int, n_queries: int,
            metric: str = "angular", dim: int = 0, path: str = "",
            column: str = "", text: str = "emma", layer: int = 15,
            num_tokens: int = 0, sequence_length: int = 512,
            recall: bool = True, skip_methods: tuple[str, ...] = ()
            ) -> dict:
  """One data set (every field spelled out, for config.json).

  Args:
    name: unique id (the resume key).
    kind: "glove" (GloVe 6B 50-d), "smollm2_embeddings" (49,152 x 576,
      repeated rows dropped), "smollm2_keys" (one layer's keys, the KV
      heads concatenated: 3 x 64 = 192-d, per token), "random" (Gaussian
      directions in R^dim), "ann_hdf5" (an ann-benchmarks file at path;
      its own queries and neighbours) or "parquet" (a list-of-float column
      of parquet file(s) at path).
    n_base, n_queries: base vectors and held-out queries (disjoint random
      rows; for ann_hdf5 the first rows of train and test).
    metric: "angular" (unit-normalized, inner product = cosine: the
      paper's GloVe and OpenAI embeddings), "ip" (raw inner product) or
      "l2". ann_hdf5 takes the file's metric.
    dim: for random.
    path, column: for ann_hdf5 / parquet ("" column: the only float list).
    text, layer, num_tokens, sequence_length: for smollm2_keys: the first
      num_tokens tokens of the novel, in sequences of sequence_length.
    recall: False: only indexing time is measured (no search).
    skip_methods: methods not run on this set.
  """
  return dict(name=name, kind=kind, n_base=n_base, n_queries=n_queries,
              metric=metric, dim=dim, path=path, column=column, text=text,
              layer=layer, num_tokens=num_tokens,
              sequence_length=sequence_length, recall=recall,
              skip_methods=tuple(skip_methods))


def method(name: str, family: str, *, tq_method: str = "mse",
           norm_correction: bool = False, center: bool = False,
           rotations: int = 1, norm_dtype: str = "float16",
           scale_bits: int = 0, rotation: str = "haar",
           code_bits: int = 8, extra_bits: tuple[int, ...] = (),
           group: str = "baseline") -> dict:
  """One method (every field spelled out).

  Args:
    name: unique id.
    family: "tq" (our index), "pq" (faiss IndexPQ) or "rabitq" (faiss
      RaBitQ with nb_bits = the budget, behind a random rotation).
    tq_method, norm_correction, center, rotations, norm_dtype, scale_bits,
      rotation: the TurboQuant index (search.IndexConfig). On "angular"
      data (unit vectors) it stores no per-vector scale, unless center,
      which then renormalizes the reconstruction to unit norm.
    code_bits: PQ bits per subquantizer code (8: 256-codeword tables).
    extra_bits: budgets run besides config.bits, for the recall-against-
      bits curves (equal-bits comparisons between settings that cannot
      hit the same budget exactly).
    group: "paper" (the paper's TurboQuant), "ours" (online levers) or
      "baseline".
  """
  return dict(name=name, family=family, tq_method=tq_method,
              norm_correction=norm_correction, center=center,
              rotations=rotations, norm_dtype=norm_dtype,
              scale_bits=scale_bits, rotation=rotation, code_bits=code_bits,
              extra_bits=tuple(extra_bits), group=group)


def default_methods(extra_bits: tuple[int, ...] = (1, 3, 5)
                    ) -> tuple[dict, ...]:
  """The paper's TurboQuant, our levers and the faiss baselines.

  Args:
    extra_bits: budgets beside config.bits for the methods whose recall-
      against-bits curves we draw (cheap ones; PQ takes minutes per point).
  """
  return (
      method("tq_mse", "tq", group="paper"),
      method("tq_prod", "tq", tq_method="prod", group="paper"),
      method("tq_mse_nc", "tq", norm_correction=True, extra_bits=extra_bits,
             group="ours"),
      method("tq_mse_nc_c", "tq", norm_correction=True, center=True,
             scale_bits=8, extra_bits=extra_bits, group="ours"),
      method("tq_mse_nc_r4", "tq", norm_correction=True, rotations=4,
             extra_bits=extra_bits, group="ours"),
      method("tq_mse_nc_c_r4", "tq", norm_correction=True, center=True,
             scale_bits=8, rotations=4, extra_bits=extra_bits,
             group="ours"),
      method("pq", "pq"),
      method("rabitq", "rabitq", extra_bits=extra_bits),
  )


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """The experiment config; arg "scale=default" or "scale=quick"."""
  arg = common.parse_arg(arg, scale="default")
  if arg.scale not in _SCALES:
    raise ValueError(f"{arg.scale=!r} must be one of {_SCALES}")
  quick = arg.scale == "quick"

  config = ml_collections.ConfigDict()
  config.scale = arg.scale
  config.seed = 0                     # data: base/query split, random sets
  # TurboQuant's rotations (and QJL sketches); other values re-run the same
  # data with independent quantizers, e.g. --config.quantizer_seed=1
  # --config.only_methods=tq_mse,tq_mse_nc for the spread over rotations.
  config.quantizer_seed = 0
  # Threads for faiss (OpenMP) and XLA (the process is pinned to this many
  # cores when fewer are available); 0: all available.
  config.threads = 2
  config.bits = (2, 4)                # budgets of Fig. 5, every method
  config.k_max = 64                   # recall@1@k for k = 1..k_max
  # PQ's training (b·d/8 k-means of 256 centroids each) is the slow part:
  # minutes per setting at d = 576 on 2 cores, hence 20k-row sets there.
  if quick:
    config.datasets = (
        dataset("glove", "glove", n_base=5_000, n_queries=200),
        dataset("smollm2_embeddings", "smollm2_embeddings", n_base=5_000,
                n_queries=200, skip_methods=("pq",)),
        dataset("smollm2_keys", "smollm2_keys", n_base=1_800,
                n_queries=200, layer=1, num_tokens=2_048),
    )
  else:
    config.datasets = (
        dataset("glove", "glove", n_base=100_000, n_queries=1_000),
        dataset("smollm2_embeddings", "smollm2_embeddings", n_base=20_000,
                n_queries=1_000),
        dataset("smollm2_keys", "smollm2_keys", n_base=20_000,
                n_queries=1_000, layer=15, num_tokens=21_504),
    )
  config.methods = default_methods(() if quick else (1, 3, 5))
  config.only_datasets = ""           # comma-separated names, or all
  config.only_methods = ""            # comma-separated names, or all
  # Base rows per TurboQuant encode / score call.
  config.chunk = 16_384

  # Table 2: time to index random vectors (Gaussian directions) at
  # timing.bits; no search.
  config.timing = ml_collections.ConfigDict()
  config.timing.dims = (256,) if quick else (1536, 3072)
  config.timing.n = 2_000 if quick else 100_000
  config.timing.bits = 4
  config.timing.methods = ("tq_mse", "tq_mse_nc", "pq", "rabitq")
  # Fewer vectors for some families: faiss PQ trains M = b·d/8 k-means
  # (768 and 1536 of them here), which takes tens of minutes at n = 100k
  # on 2 cores; its rows say which n they ran.
  config.timing.n_by_family = {"pq": 2_000} if quick else {"pq": 5_000}
  return config
