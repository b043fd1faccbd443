"""Jane Austen's six novels (public domain) from Debian `r-cran-janeaustenr`.

No machine here reaches a text host, but Debian's mirror works and the R
package janeaustenr carries the six novels, one line of text per element of
an R character vector. `fetch_austen` runs `apt-get download` (no R install,
no root needed once the apt lists exist), unpacks the .deb with `dpkg-deb -x`
into a temporary directory, reads the package's lazy-load database
`usr/lib/R/site-library/janeaustenr/data/Rdata.{rdb,rdx}` with the small R
unserializer below (struct + zlib only) and writes each novel as a UTF-8
text file `cache.cache_dir()/austen/<name>.txt`, lines joined by "\n". The
.deb itself is deleted. Set it up once with

    python -m turboquant_jax.data.fetch

The lazy-load database, as read here (R's `makeLazyLoadDB`):
  * Rdata.rdx: gzip of one R serialization: a list with `variables` (object
    name -> c(offset, length) into the .rdb), `references` and `compressed`.
  * Rdata.rdb: the objects back to back; each is a 4-byte big-endian
    *uncompressed* length followed by a zlib stream of the object's R
    serialization (for `compressed = TRUE`, i.e. zlib; bzip2/xz are not
    supported). Each janeaustenr object is one character vector (STRSXP).
  * An R serialization (XDR, versions 2 and 3): "X\n", the version, the
    writer's R version, the minimum reader version, and in version 3 the
    native encoding name; then items, each a 32-bit flags word (low byte
    the SEXP type, bit 9 "has attributes", bit 10 "has tag", the encoding
    levels in bits 12+ for strings) followed by type-specific data.
"""

import dataclasses
import gzip
import os
import pathlib
import struct
import subprocess
import tempfile
import zlib

from turboquant_jax.data import cache

PACKAGE = "r-cran-janeaustenr"
RDATA_DIR = "usr/lib/R/site-library/janeaustenr/data"

# janeaustenr's object names, in its (alphabetical) order; also the file
# names in the cache (`emma.txt`, ...).
BOOKS = ("emma", "mansfieldpark", "northangerabbey", "persuasion",
         "prideprejudice", "sensesensibility")
TITLES = {
    "emma": "Emma",
    "mansfieldpark": "Mansfield Park",
    "northangerabbey": "Northanger Abbey",
    "persuasion": "Persuasion",
    "prideprejudice": "Pride and Prejudice",
    "sensesensibility": "Sense and Sensibility",
}

# R SEXP types and serialization pseudo-types used below.
_NILSXP = 0
_SYMSXP = 1
_LISTSXP = 2
_CHARSXP = 9
_LGLSXP = 10
_INTSXP = 13
_STRSXP = 16
_VECSXP = 19
_REFSXP = 255
_NILVALUE_SXP = 254
_TYPE_NAMES = {0: "NILSXP", 1: "SYMSXP", 2: "LISTSXP", 3: "CLOSXP",
               4: "ENVSXP", 6: "LANGSXP", 9: "CHARSXP", 10: "LGLSXP",
               13: "INTSXP", 14: "REALSXP", 15: "CPLXSXP", 16: "STRSXP",
               19: "VECSXP", 24: "RAWSXP", 25: "S4SXP", 238: "ALTREP_SXP",
               242: "EMPTYENV_SXP", 253: "GLOBALENV_SXP", 254: "NILVALUE_SXP",
               255: "REFSXP"}
_HAS_ATTR = 1 << 9
_HAS_TAG = 1 << 10
# CHARSXP encoding levels (bits 12+ of the flags word).
_BYTES_MASK = 1 << 1
_LATIN1_MASK = 1 << 2
_UTF8_MASK = 1 << 3
_ASCII_MASK = 1 << 6
_NA_INTEGER = -(2**31)


class RDataError(ValueError):
  """The R data is not in the (small) subset of the format we read."""


@dataclasses.dataclass(frozen=True)
class RObject:
  """An R vector or pairlist that carried attributes (e.g. `names`)."""
  value: object
  attributes: dict[str, object]


class _Unserializer:
  """Reads one R XDR serialization (versions 2 and 3) from bytes.

  Supports the types a lazy-load index and character vectors need: NULL,
  symbols (and references to them), pairlists, CHARSXP, logical, integer,
  character and generic vectors. Anything else raises RDataError.
  """

  def __init__(self, data: bytes, what: str):
    self._data = data
    self._pos = 0
    self._what = what
    self._refs: list[str] = []   # symbols, for REFSXP back-references
    self.native_encoding = "UTF-8"

  def _fail(self, msg: str) -> RDataError:
    return RDataError(f"{self._what}: {msg} (at byte {self._pos})")

  def _bytes(self, n: int) -> bytes:
    if n < 0 or self._pos + n > len(self._data):
      raise self._fail(f"truncated: wanted {n} bytes, "
                       f"{len(self._data) - self._pos} left")
    out = self._data[self._pos:self._pos + n]
    self._pos += n
    return out

  def _int(self) -> int:
    return struct.unpack(">i", self._bytes(4))[0]

  def _length(self) -> int:
    n = self._int()
    if n == -1:   # long vector: two more words
      hi, lo = struct.unpack(">II", self._bytes(8))
      n = (hi << 32) | lo
    if n < 0:
      raise self._fail(f"negative vector length {n}")
    return n

  def read(self) -> object:
    """Checks the header, reads one item and checks nothing is left."""
    magic = self._bytes(2)
    if magic != b"X\n":
      raise self._fail(f"{magic=}: only XDR serialization (b'X\\n') is "
                       "supported")
    version = self._int()
    if version not in (2, 3):
      raise self._fail(f"serialization {version=}: only 2 and 3 are "
                       "supported")
    self._int()   # R version of the writer
    self._int()   # minimal R version to read it
    if version == 3:
      n = self._int()
      if not 0 < n < 64:
        raise self._fail(f"native encoding name length {n} is implausible")
      self.native_encoding = self._bytes(n).decode("ascii")
    value = self.item()
    if self._pos != len(self._data):
      raise self._fail(f"{len(self._data) - self._pos} trailing bytes")
    return value

  def _string(self, levels: int) -> str | None:
    n = self._int()
    if n == -1:
      return None   # NA_character_
    raw = self._bytes(n)
    if levels & _LATIN1_MASK:
      encoding = "latin-1"
    elif levels & (_UTF8_MASK | _ASCII_MASK):
      encoding = "utf-8"
    elif levels & _BYTES_MASK:
      raise self._fail("a string marked as bytes (no text encoding)")
    else:
      encoding = self.native_encoding
    try:
      return raw.decode(encoding)
    except (UnicodeDecodeError, LookupError) as e:
      raise self._fail(f"string does not decode as {encoding}: {e}") from e

  def item(self) -> object:
    """Reads one item; vectors with attributes come back as RObject."""
    flags = self._int()
    sxp = flags & 0xFF
    levels = flags >> 12
    if sxp == _NILVALUE_SXP:
      return None
    if sxp == _REFSXP:
      index = flags >> 8 or self._int()
      if not 1 <= index <= len(self._refs):
        raise self._fail(f"reference {index} to an unknown symbol")
      return self._refs[index - 1]
    if sxp == _SYMSXP:
      name = self.item()
      if not isinstance(name, str):
        raise self._fail(f"symbol name {name!r} is not a string")
      self._refs.append(name)
      return name
    if sxp == _LISTSXP:
      return self._pairlist(flags)
    if sxp == _CHARSXP:
      return self._string(levels)
    if sxp in (_LGLSXP, _INTSXP):
      n = self._length()
      values = struct.unpack(f">{n}i", self._bytes(4 * n))
      if sxp == _LGLSXP:
        value = [None if v == _NA_INTEGER else bool(v) for v in values]
      else:
        value = [None if v == _NA_INTEGER else v for v in values]
    elif sxp == _STRSXP:
      n = self._length()
      value = []
      for _ in range(n):
        elem_flags = self._int()
        if elem_flags & 0xFF != _CHARSXP:
          raise self._fail(f"STRSXP element has flags {elem_flags:#x}, "
                           "expected a CHARSXP")
        value.append(self._string(elem_flags >> 12))
    elif sxp == _VECSXP:
      value = [self.item() for _ in range(self._length())]
    else:
      name = _TYPE_NAMES.get(sxp, "unknown")
      raise self._fail(f"unsupported SEXP type {sxp} ({name}), "
                       f"flags {flags:#x}")
    if flags & _HAS_ATTR:
      return RObject(value, self._attributes())
    return value

  def _attributes(self) -> dict[str, object]:
    attrs = self.item()
    if not isinstance(attrs, dict):
      raise self._fail(f"attributes are {type(attrs).__name__}, expected a "
                       "tagged pairlist")
    return attrs

  def _pairlist(self, flags: int) -> dict[str, object]:
    """A tagged pairlist (attributes) as a dict, read iteratively."""
    out = {}
    while True:
      if flags & _HAS_ATTR:
        self._attributes()   # attributes on a pairlist cell: ignored
      if not flags & _HAS_TAG:
        raise self._fail("untagged pairlist cell (only attribute lists, "
                         "which are tagged, are supported)")
      tag = self.item()
      if not isinstance(tag, str):
        raise self._fail(f"pairlist tag {tag!r} is not a symbol")
      out[tag] = self.item()
      flags = self._int()
      if flags & 0xFF == _NILVALUE_SXP:
        return out
      if flags & 0xFF != _LISTSXP:
        raise self._fail(f"pairlist continues with flags {flags:#x}")


def unserialize(data: bytes, what: str = "R data") -> object:
  """Reads one R XDR serialization (version 2 or 3).

  Args:
    data: the uncompressed serialization, starting with b"X\\n".
    what: a name for error messages.

  Returns:
    NULL -> None; character/integer/logical vectors -> lists (NA -> None);
    generic vectors -> lists; attribute pairlists -> dicts; any vector with
    attributes -> RObject(value, attributes).

  Raises:
    RDataError: on anything unexpected (other types, bad header, truncation).
  """
  return _Unserializer(data, what).read()


def read_rdb_block(rdb: bytes, offset: int = 0,
                   what: str = "Rdata.rdb") -> tuple[object, int]:
  """Reads one zlib-compressed object of a lazy-load .rdb file.

  Args:
    rdb: the whole .rdb file.
    offset: where the object's 4-byte length header starts.
    what: a name for error messages.

  Returns:
    (the unserialized object, the offset just past its zlib stream).
  """
  if offset + 4 > len(rdb):
    raise RDataError(f"{what}: no block header at {offset=} "
                     f"(file has {len(rdb)} bytes)")
  (size,) = struct.unpack(">I", rdb[offset:offset + 4])
  decomp = zlib.decompressobj()
  try:
    raw = decomp.decompress(rdb[offset + 4:])
  except zlib.error as e:
    raise RDataError(f"{what}: block at {offset=} is not a zlib stream "
                     f"({e}); only compress=TRUE (zlib) databases are "
                     "supported") from e
  if not decomp.eof:
    raise RDataError(f"{what}: block at {offset=} is a truncated zlib stream")
  if len(raw) != size:
    raise RDataError(f"{what}: block at {offset=} decompresses to "
                     f"{len(raw)} bytes, its header says {size}")
  end = len(rdb) - len(decomp.unused_data)
  return unserialize(raw, f"{what}@{offset}"), end


def read_rdb(rdb: bytes, what: str = "Rdata.rdb") -> list[object]:
  """All objects of a .rdb file, read back to back (no index needed)."""
  objects, offset = [], 0
  while offset < len(rdb):
    obj, offset = read_rdb_block(rdb, offset, what)
    objects.append(obj)
  return objects


def read_rdx(rdx: bytes) -> dict[str, tuple[int, int]]:
  """The lazy-load index: object name -> (offset, length) in the .rdb.

  Args:
    rdx: the .rdx file, gzip-compressed (as R writes it) or not.
  """
  if rdx[:2] == b"\x1f\x8b":
    rdx = gzip.decompress(rdx)
  index = unserialize(rdx, "Rdata.rdx")
  top = _named_list(index, "Rdata.rdx")
  if set(top) != {"variables", "references", "compressed"}:
    raise RDataError(f"Rdata.rdx: unexpected fields {sorted(top)}")
  compressed = top["compressed"]
  if compressed not in ([True], [1]):
    raise RDataError(f"Rdata.rdx: {compressed=}; only zlib (TRUE) is "
                     "supported")
  out = {}
  for name, loc in _named_list(top["variables"], "variables").items():
    if (not isinstance(loc, list) or len(loc) != 2
        or not all(isinstance(v, int) and v >= 0 for v in loc)):
      raise RDataError(f"Rdata.rdx: {name!r} has location {loc!r}, "
                       "expected two non-negative integers")
    out[name] = (loc[0], loc[1])
  return out


def _named_list(obj: object, what: str) -> dict[str, object]:
  if (not isinstance(obj, RObject) or not isinstance(obj.value, list)
      or "names" not in obj.attributes):
    raise RDataError(f"{what}: expected a named list, got "
                     f"{type(obj).__name__}")
  names = obj.attributes["names"]
  if (not isinstance(names, list) or len(names) != len(obj.value)
      or not all(isinstance(n, str) for n in names)):
    raise RDataError(f"{what}: bad names attribute")
  return dict(zip(names, obj.value))


def read_character_vectors(rdb: bytes,
                           rdx: bytes) -> dict[str, list[str | None]]:
  """Every object of an .rdb/.rdx pair, each a character vector.

  Args:
    rdb: the .rdb file's bytes.
    rdx: the .rdx file's bytes.

  Returns:
    name -> its strings (NA -> None), in the index's order.

  Raises:
    RDataError: an object is not a plain character vector, or the index does
      not match the blocks of the .rdb.
  """
  out = {}
  for name, (offset, length) in read_rdx(rdx).items():
    obj, end = read_rdb_block(rdb, offset, f"Rdata.rdb[{name!r}]")
    if end != offset + length:
      raise RDataError(f"Rdata.rdb[{name!r}]: block ends at {end}, the "
                       f"index says {offset + length}")
    if isinstance(obj, RObject):
      raise RDataError(f"Rdata.rdb[{name!r}]: has attributes "
                       f"{sorted(obj.attributes)}; expected a plain "
                       "character vector")
    if not isinstance(obj, list) or not all(
        s is None or isinstance(s, str) for s in obj):
      raise RDataError(f"Rdata.rdb[{name!r}]: not a character vector")
    out[name] = obj
  return out


def lines_to_text(lines: list[str | None]) -> str:
  """One string per line (NA -> empty line), joined and ended by "\\n"."""
  return "".join(f"{'' if s is None else s}\n" for s in lines)


def book_path(name: str) -> pathlib.Path:
  """Where a novel's text lives in the cache (may not exist yet)."""
  _check_name(name)
  return cache.cache_dir(create=False) / "austen" / f"{name}.txt"


def _check_name(name: str) -> None:
  if name not in BOOKS:
    raise ValueError(f"{name=} is not one of {BOOKS}")


def is_fetched() -> bool:
  """Whether all six novels are in the cache."""
  return all(book_path(name).is_file() for name in BOOKS)


def _run(cmd: list[str], cwd: str, quiet: bool) -> subprocess.CompletedProcess:
  if not quiet:
    print(f"  $ {' '.join(cmd)}", flush=True)
  try:
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
  except FileNotFoundError as e:
    raise RuntimeError(
        f"`{cmd[0]}` not found: fetching the Austen novels needs a Debian or "
        f"Ubuntu machine with apt-get and dpkg-deb ({e})") from e


def _apt_download(tmp: str, quiet: bool) -> pathlib.Path:
  """Downloads the .deb into tmp, running `apt-get update` once if needed."""
  cmd = ["apt-get", "download", PACKAGE]
  res = _run(cmd, tmp, quiet)
  if res.returncode != 0:
    if os.geteuid() != 0:
      raise RuntimeError(
          f"`{' '.join(cmd)}` failed (exit {res.returncode}):\n"
          f"{res.stderr.strip()}\nIf the package lists are missing, run "
          "`sudo apt-get update` once (root needed) and try again.")
    if not quiet:
      print(f"  apt-get download failed ({res.stderr.strip()}); "
            "running apt-get update", flush=True)
    upd = _run(["apt-get", "update"], tmp, quiet)
    if upd.returncode != 0:
      raise RuntimeError(f"`apt-get update` failed (exit {upd.returncode}):"
                         f"\n{upd.stderr.strip()}")
    res = _run(cmd, tmp, quiet)
    if res.returncode != 0:
      raise RuntimeError(
          f"`{' '.join(cmd)}` failed after `apt-get update` (exit "
          f"{res.returncode}):\n{res.stderr.strip()}\nIs {PACKAGE} in this "
          "machine's Debian/Ubuntu release (it is in Debian bookworm)?")
  debs = list(pathlib.Path(tmp).glob(f"{PACKAGE}_*.deb"))
  if len(debs) != 1:
    raise RuntimeError(f"apt-get download gave {debs=}, expected one .deb")
  return debs[0]


def fetch_austen(force: bool = False, quiet: bool = False) -> pathlib.Path:
  """Downloads the six novels into the cache; a no-op if all are present.

  Args:
    force: download again even if the files exist.
    quiet: no progress messages.

  Returns:
    The cache directory holding `<name>.txt` for each name in BOOKS.

  Raises:
    RuntimeError: apt-get or dpkg-deb are missing or failed.
    RDataError: the package's data is not in the expected format.
  """
  out_dir = book_path(BOOKS[0]).parent
  if is_fetched() and not force:
    return out_dir
  out_dir.mkdir(parents=True, exist_ok=True)
  if not quiet:
    print(f"fetching Jane Austen's novels (Debian {PACKAGE})", flush=True)
  with tempfile.TemporaryDirectory(dir=out_dir) as tmp:
    # apt drops privileges to _apt, which cannot write into a private temp
    # directory; it then downloads as root with a warning. Let it.
    os.chmod(tmp, 0o755)
    deb = _apt_download(tmp, quiet)
    if not quiet:
      print(f"  got {deb.name} ({deb.stat().st_size / 1e6:.1f} MB)",
            flush=True)
    root = pathlib.Path(tmp) / "root"
    res = _run(["dpkg-deb", "-x", str(deb), str(root)], tmp, quiet)
    if res.returncode != 0:
      raise RuntimeError(f"dpkg-deb -x {deb.name} failed:\n"
                         f"{res.stderr.strip()}")
    data_dir = root / RDATA_DIR
    rdb_path, rdx_path = data_dir / "Rdata.rdb", data_dir / "Rdata.rdx"
    if not rdb_path.is_file() or not rdx_path.is_file():
      raise RDataError(f"{deb.name} has no {RDATA_DIR}/Rdata.rdb and .rdx")
    books = read_character_vectors(rdb_path.read_bytes(),
                                   rdx_path.read_bytes())
    if set(books) != set(BOOKS):
      raise RDataError(f"{deb.name} holds {sorted(books)}, expected "
                       f"{sorted(BOOKS)}")
    for name in BOOKS:
      part = pathlib.Path(tmp) / f"{name}.txt.part"
      part.write_text(lines_to_text(books[name]), encoding="utf-8")
      os.replace(part, book_path(name))   # atomic: same filesystem
  if not quiet:
    print(f"wrote {len(BOOKS)} novels to {out_dir}", flush=True)
  return out_dir


def load_book(name: str) -> str:
  """One novel's text: its lines joined by "\\n", ending in "\\n".

  Args:
    name: one of BOOKS, e.g. "emma".

  Raises:
    ValueError: unknown name.
    FileNotFoundError: not in the cache; the message gives the setup command.
  """
  path = book_path(name)
  if not path.is_file():
    raise FileNotFoundError(
        f"Austen text {name!r} not found at {path}. Fetch it once with "
        f"`{cache.SETUP_COMMAND}` (1.6 MB from Debian; set "
        f"${cache.ENV_VAR} to use another cache directory).")
  return path.read_text(encoding="utf-8")


def load_corpus() -> dict[str, str]:
  """All six novels, name -> text, in the order of BOOKS."""
  return {name: load_book(name) for name in BOOKS}
