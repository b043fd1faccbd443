"""Tests for the Austen loader: R unserializer, fake fetch, real novels."""

import gzip
import os
import pathlib
import struct
import subprocess
from unittest import mock
import zlib

from absl.testing import absltest
from absl.testing import parameterized

import cache_testing
from turboquant_jax.data import austen
from turboquant_jax.data import cache
from turboquant_jax.data import fetch

# Hand-built R XDR serialization. Flags word: low byte the SEXP type, bit 9
# "has attributes", bit 10 "has tag", bits 12+ the CHARSXP encoding levels.
_UTF8, _LATIN1, _ASCII = 1 << 3, 1 << 2, 1 << 6


def _i32(*values: int) -> bytes:
  return struct.pack(f">{len(values)}i", *values)


def _header(version: int = 3) -> bytes:
  out = b"X\n" + _i32(version, 0x040201, 0x030500)   # R 4.2.1, min 3.5.0
  if version == 3:
    out += _i32(5) + b"UTF-8"
  return out


def _charsxp(s: str | None, levels: int | None = None,
             encoding: str = "utf-8") -> bytes:
  if s is None:
    return _i32(9, -1)   # NA_character_
  if levels is None:
    levels = _ASCII if s.isascii() else _UTF8
  raw = s.encode(encoding)
  return _i32(levels << 12 | 9, len(raw)) + raw


def _strsxp(strings: list[str | None], attrs: bytes = b"") -> bytes:
  flags = 16 | (1 << 9 if attrs else 0)
  return (_i32(flags, len(strings)) + b"".join(map(_charsxp, strings))
          + attrs)


def _names_attr(names: list[str], first_use: bool = True) -> bytes:
  """A one-cell attribute pairlist `names = <names>`."""
  # The symbol is written in full once, then as reference 1 (REFSXP).
  tag = _i32(1) + _charsxp("names") if first_use else _i32(1 << 8 | 255)
  return _i32(2 | 1 << 10) + tag + _strsxp(names) + _i32(254)


def _named_list(items: list[bytes], names: list[str],
                first_use: bool) -> bytes:
  return (_i32(19 | 1 << 9, len(items)) + b"".join(items)
          + _names_attr(names, first_use))


def _block(payload: bytes) -> bytes:
  """One .rdb entry: 4-byte big-endian uncompressed length + zlib stream."""
  return struct.pack(">I", len(payload)) + zlib.compress(payload)


def _database(objects: dict[str, list[str | None]],
              version: int = 3) -> tuple[bytes, bytes]:
  """(rdb, gzipped rdx) bytes as R's makeLazyLoadDB writes them."""
  rdb, locations = b"", []
  for strings in objects.values():
    block = _block(_header(version) + _strsxp(strings))
    locations.append(_i32(13, 2, len(rdb), len(block)))   # INTSXP offset,len
    rdb += block
  variables = _named_list(locations, list(objects), first_use=True)
  references = _i32(19 | 1 << 9, 0) + _names_attr([], first_use=False)
  compressed = _i32(10, 1, 1)   # LGLSXP TRUE
  index = _header(version) + _named_list(
      [variables, references, compressed],
      ["variables", "references", "compressed"], first_use=False)
  return rdb, gzip.compress(index)


_LINES = ["EMMA", "", None, "Café crème — naïve", "By Jane Austen"]


class UnserializeTest(parameterized.TestCase):

  @parameterized.parameters(2, 3)
  def test_character_vector_with_na_and_non_ascii(self, version):
    # Given a STRSXP with an empty string, an NA and a UTF-8 string.
    data = _header(version) + _strsxp(_LINES)
    # Then it reads back exactly, NA as None.
    self.assertEqual(austen.unserialize(data), _LINES)

  def test_latin1_and_unmarked_native_strings(self):
    # A latin1-flagged string, and an unflagged one in the native encoding
    # (UTF-8, from the version 3 header).
    data = (_header(3) + _i32(16, 2) + _charsxp("déjà", _LATIN1, "latin-1")
            + _charsxp("déjà", 0, "utf-8"))
    self.assertEqual(austen.unserialize(data), ["déjà", "déjà"])

  def test_named_list_index(self):
    rdb, rdx = _database({"a": ["x"], "bb": ["y", "z"]})
    index = austen.read_rdx(rdx)
    self.assertEqual(list(index), ["a", "bb"])
    self.assertEqual(index["a"][0], 0)
    self.assertEqual(index["bb"], (index["a"][1], len(rdb) - index["a"][1]))

  @parameterized.named_parameters(
      ("bad_magic", b"A\n" + _header()[2:] + _strsxp([]), "XDR"),
      ("version_4", _header(3).replace(_i32(3), _i32(4), 1) + _strsxp([]),
       "version=4"),
      ("double_vector", _header() + _i32(14, 1) + struct.pack(">d", 1.0),
       "REALSXP"),
      ("trailing_bytes", _header() + _strsxp(["a"]) + b"\0", "trailing"),
      ("truncated_string", _header() + _i32(16, 1, 9 | _ASCII << 12, 5)
       + b"abc", "truncated"),
      ("element_not_charsxp", _header() + _i32(16, 1) + _i32(13, 0),
       "expected a CHARSXP"),
      ("bad_utf8", _header() + _i32(16, 1, 9 | _UTF8 << 12, 1) + b"\xff",
       "does not decode"),
  )
  def test_rejects(self, data, message):
    with self.assertRaisesRegex(austen.RDataError, message):
      austen.unserialize(data)


class RdbTest(absltest.TestCase):

  def test_blocks_back_to_back_and_by_index(self):
    objects = {"emma": _LINES, "persuasion": ["Persuasion", None]}
    rdb, rdx = _database(objects)
    self.assertEqual(austen.read_rdb(rdb), list(objects.values()))
    self.assertEqual(austen.read_character_vectors(rdb, rdx), objects)

  def test_length_header_is_checked(self):
    payload = _header() + _strsxp(["a"])
    bad = struct.pack(">I", len(payload) + 1) + zlib.compress(payload)
    with self.assertRaisesRegex(austen.RDataError, "header says"):
      austen.read_rdb(bad)

  def test_not_zlib(self):
    with self.assertRaisesRegex(austen.RDataError, "not a zlib stream"):
      austen.read_rdb(struct.pack(">I", 3) + b"BZh91AY")

  def test_index_mismatch(self):
    rdb, _ = _database({"a": ["x"]})
    _, rdx = _database({"a": ["x", "longer"]})
    with self.assertRaisesRegex(austen.RDataError, "the index says"):
      austen.read_character_vectors(rdb, rdx)

  def test_object_with_attributes_is_rejected(self):
    block = _block(_header() + _strsxp(["x"], _names_attr(["n"])))
    rdx = gzip.compress(_header() + _named_list(
        [_named_list([_i32(13, 2, 0, len(block))], ["a"], True),
         _i32(19, 0), _i32(10, 1, 1)],
        ["variables", "references", "compressed"], first_use=False))
    with self.assertRaisesRegex(austen.RDataError, "has attributes"):
      austen.read_character_vectors(block, rdx)

  def test_lines_to_text(self):
    self.assertEqual(austen.lines_to_text(["a", None, "", "b"]),
                     "a\n\n\nb\n")


class FetchTest(cache_testing.CacheTestCase):
  """fetch_austen with apt-get and dpkg-deb replaced by fakes."""

  def setUp(self):
    super().setUp()
    self.books = {name: [name.upper(), "", f"Text of {name} — é.", None]
                  for name in austen.BOOKS}
    self.calls = []
    self.download_failures = 0   # how many `apt-get download` calls fail
    self.enter_context(mock.patch.object(subprocess, "run", self.fake_run))

  def fake_run(self, cmd, cwd, capture_output, text):
    del capture_output, text
    self.calls.append(cmd)
    if cmd[:2] == ["apt-get", "download"]:
      if self.download_failures:
        self.download_failures -= 1
        return subprocess.CompletedProcess(
            cmd, 100, "", "E: Unable to locate package r-cran-janeaustenr")
      (pathlib.Path(cwd) / "r-cran-janeaustenr_1.0.0-1_all.deb").write_bytes(
          b"!<arch>\n")
    elif cmd[:2] == ["dpkg-deb", "-x"]:
      data = pathlib.Path(cmd[3]) / austen.RDATA_DIR
      data.mkdir(parents=True)
      rdb, rdx = _database(self.books)
      (data / "Rdata.rdb").write_bytes(rdb)
      (data / "Rdata.rdx").write_bytes(rdx)
    elif cmd != ["apt-get", "update"]:
      raise AssertionError(f"unexpected command {cmd}")
    return subprocess.CompletedProcess(cmd, 0, "", "")

  def test_writes_six_text_files_once(self):
    out = austen.fetch_austen(quiet=True)
    self.assertEqual(out, self.cache / "austen")
    self.assertEqual(sorted(os.listdir(out)),
                     sorted(f"{name}.txt" for name in austen.BOOKS))
    self.assertEqual(austen.load_book("emma"),
                     "EMMA\n\nText of emma — é.\n\n")
    self.assertEqual(list(austen.load_corpus()), list(austen.BOOKS))
    self.assertLen(self.calls, 2)
    # Idempotent: fetching again (or the fetch command) runs nothing.
    austen.fetch_austen(quiet=True)
    with mock.patch("builtins.print"):
      fetch.main(["--only", "austen"])
    self.assertLen(self.calls, 2)
    austen.fetch_austen(force=True, quiet=True)
    self.assertLen(self.calls, 4)

  def test_runs_apt_get_update_when_lists_are_missing(self):
    self.download_failures = 1
    with mock.patch.object(os, "geteuid", return_value=0):
      austen.fetch_austen(quiet=True)
    self.assertEqual([c[1] for c in self.calls],
                     ["download", "update", "download", "-x"])
    self.assertTrue(austen.is_fetched())

  def test_clear_error_without_root(self):
    self.download_failures = 1
    with mock.patch.object(os, "geteuid", return_value=1000):
      with self.assertRaisesRegex(RuntimeError, "sudo apt-get update"):
        austen.fetch_austen(quiet=True)
    self.assertFalse(austen.is_fetched())

  def test_wrong_contents_leave_no_file(self):
    self.books = {"emma": ["x"]}
    with self.assertRaisesRegex(austen.RDataError, "expected"):
      austen.fetch_austen(quiet=True)
    self.assertEqual(os.listdir(self.cache / "austen"), [])

  def test_load_errors(self):
    with self.assertRaisesRegex(ValueError, "name='emmma'"):
      austen.load_book("emmma")
    with self.assertRaisesRegex(FileNotFoundError, "turboquant_jax.data.fetch"):
      austen.load_book("emma")


class RealCorpusTest(absltest.TestCase):
  """The real novels, when `python -m turboquant_jax.data.fetch` has run."""

  def setUp(self):
    super().setUp()
    if not austen.is_fetched():
      self.skipTest(f"Austen novels not in {cache.cache_dir(create=False)}; "
                    f"run `{cache.SETUP_COMMAND}`")

  def test_emma_opening(self):
    lines = austen.load_book("emma").splitlines()
    self.assertEqual(lines[:3], ["EMMA", "", "By Jane Austen"])
    self.assertIn("Emma Woodhouse, handsome, clever, and rich, with a "
                  "comfortable home", austen.load_book("emma")[:300])

  def test_corpus_size(self):
    corpus = austen.load_corpus()
    words = sum(len(text.split()) for text in corpus.values())
    lines = sum(text.count("\n") for text in corpus.values())
    # janeaustenr 1.0.0 (Debian bookworm): 717,537 words, 73,422 lines.
    self.assertBetween(words, 710_000, 725_000)
    self.assertBetween(lines, 73_000, 74_000)
    self.assertTrue(corpus["prideprejudice"].startswith("PRIDE AND PREJUDICE"))


if __name__ == "__main__":
  absltest.main()
