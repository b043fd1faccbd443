"""The GPU benchmark drivers at their CPU smoke scale: rows, resume, table.

The H200 runs (results/kernel_bench/h200, results/decode_bench/h200) use the
same code at full scale; here the XLA paths run on tiny shapes so that a
broken driver is caught by CI, not on the lent GPU.
"""

import contextlib
import io
import pathlib
import re
import sys
import tempfile
from unittest import mock

from absl.testing import absltest
from flax import nnx
import jax
import numpy as np

_REPO = pathlib.Path(__file__).resolve().parents[2]
if str(_REPO) not in sys.path:
  sys.path.insert(0, str(_REPO))

# pylint: disable=g-import-not-at-top,wrong-import-position
from configs import decode_bench as decode_bench_config
from configs import kernel_bench as kernel_bench_config
from experiments import decode_bench
from experiments import kernel_bench
from experiments.probes import lookup_sass
from experiments.probes import sass_census
from experiments.probes import step_trace
from turboquant_jax import results
# pylint: enable=g-import-not-at-top,wrong-import-position


class KernelBenchTest(absltest.TestCase):

  def test_cpu_scale_rows_table_and_resume(self):
    config = kernel_bench_config.get_config("scale=cpu")
    with tempfile.TemporaryDirectory() as tmp:
      table = kernel_bench.run(config, tmp)
      rows = results.read_rows(pathlib.Path(tmp) / results.RESULTS_FILE)
      attn = [r for r in rows if r["op"] == "decode_attention"]
      # cuDNN is absent on the CPU: its row records None; XLA bf16 and the
      # TurboQuant xla impl are timed.
      impls = {r["impl"]: r for r in attn}
      self.assertEqual(set(impls), {"cudnn_bf16", "xla_bf16", "xla"})
      self.assertGreater(impls["xla"]["time_ms"], 0)
      self.assertGreater(impls["xla_bf16"]["time_ms"], 0)
      for field in ("batch", "seq_len", "q_heads", "kv_heads", "head_dim",
                    "key_bits", "value_bits", "compressed_bytes", "device",
                    "floor_ms"):
        self.assertIn(field, impls["xla"])
      self.assertEqual(impls["xla"]["options"], {})   # pallas_gpu's only
      self.assertFalse(impls["xla"]["grid_centroids"])
      # Every round is kept; time_ms is their median.
      for r in (impls["xla"], impls["xla_bf16"]):
        self.assertLen(r["time_ms_rounds"], config.rounds)
        self.assertAlmostEqual(r["time_ms"],
                               sorted(r["time_ms_rounds"])[0] / 2
                               + sorted(r["time_ms_rounds"])[1] / 2)
      self.assertIsNone(impls["cudnn_bf16"]["time_ms"])
      self.assertIsNotNone(impls["cudnn_bf16"]["error"])
      self.assertEqual(impls["xla"]["speedup_rounds"], [])   # no cuDNN
      self.assertLess(impls["xla"]["compressed_bytes"],
                      impls["xla_bf16"]["compressed_bytes"] / 3)
      ops = {r["op"] for r in rows}
      self.assertEqual(ops, {"decode_attention", "quantize_append",
                             "quantize_vectors"})
      text = table.read_text()
      self.assertIn("## B = 1", text)
      self.assertIn("Quantize-and-append", text)
      # Each append row names its impl; the quantize rows get a section.
      self.assertIn("| B | tokens | bits | impl | ms | tokens/s |", text)
      self.assertIn("| 1 | 1 | 4 | xla |", text)
      self.assertIn("## Quantize vectors", text)
      # A second run resumes: no row is written twice, nothing is timed.
      with mock.patch.object(kernel_bench, "attention_timer") as timer:
        kernel_bench.run(config, tmp)
      timer.assert_not_called()
      again = results.read_rows(pathlib.Path(tmp) / results.RESULTS_FILE)
      self.assertLen(again, len(rows))


  def test_grid_centroids_reach_the_caches(self):
    config = kernel_bench_config.get_config("scale=cpu")
    self.assertFalse(kernel_bench.cache_config(config, 4).grid_centroids)
    config.grid_centroids = True
    cfg = kernel_bench.cache_config(config, 3.5)
    self.assertEqual((cfg.key_bits, cfg.value_bits, cfg.grid_centroids),
                     (3.5, 3.5, True))

  def test_interleaved_rounds(self):
    # Each round times every name in turn; a timer that fails keeps its
    # error and is not called again.
    calls = []

    def timer(name, fail=False):
      def run():
        calls.append(name)
        if fail:
          raise RuntimeError("boom")
        return float(len(calls))
      return run

    times, errors = kernel_bench.interleaved_rounds(
        {"a": timer("a"), "b": timer("b", fail=True), "c": timer("c")}, 3)
    self.assertEqual(calls, ["a", "b", "c", "a", "c", "a", "c"])
    self.assertEqual(times, {"a": [1.0, 4.0, 6.0], "b": [],
                             "c": [3.0, 5.0, 7.0]})
    self.assertEqual(errors, {"b": "RuntimeError: boom"})

  def test_config_runs_the_kernel_defaults(self):
    # The sweep's explicit pallas_gpu options are the kernel's defaults
    # (None resolves to on for layout="tokens"; a None left in the config
    # is the kernel's own per-shape default), so a plain run measures
    # what impl=None runs.
    options = dict(kernel_bench_config.get_config().pallas_gpu)
    defaults = decode_bench.kernel_defaults()
    tokens = defaults["layout"] == "tokens"
    for name, value in options.items():
      want = defaults[name]
      if value is None:
        self.assertIsNone(want, name)
      else:
        self.assertEqual(value, tokens if want is None else want, name)


def _tiny_decode_setup():
  """(a 2-layer model, decode_bench's CPU config over 10 of 32 tokens)."""
  shape = decode_bench.model_lib.ModelConfig(
      vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2,
      head_dim=16, ffn_dim=64, max_seq_len=64)
  model = decode_bench.model_lib.Transformer(shape, rngs=nnx.Rngs(0))
  config = decode_bench_config.get_config("scale=cpu")
  config.context, config.capacity = 10, 32
  return model, config


class DecodeBenchTest(absltest.TestCase):

  def test_cpu_scale_rows(self):
    config = decode_bench_config.get_config("scale=cpu")
    config.caches = config.caches[:2]          # full-bf16 and tq4 (compiles)
    config.reps = 1
    config.rounds = 2
    timed = []                                 # the cache type of each call
    real = decode_bench.timing.in_place_times_ms

    def recording(step, state, reset, **kw):
      timed.append(type(state[1][0]).__name__)
      return real(step, state, reset, **kw)

    with tempfile.TemporaryDirectory() as tmp:
      with mock.patch.object(decode_bench.timing, "in_place_times_ms",
                             recording):
        rows = decode_bench.run(config, tmp)
        self.assertLen(decode_bench.run(config, tmp), len(rows))  # resumed
    # Interleaved: each round times every cache, one cache later each round.
    self.assertEqual(timed, ["FullCache", "TurboQuantCache",
                             "TurboQuantCache", "FullCache"])
    self.assertLen(rows, len(config.caches) * len(config.batches))
    by_cache = {r["cache"]: r for r in rows}
    for row in rows:
      self.assertIsNone(row["error"])
      self.assertGreater(row["tokens_per_s"], 0)
      self.assertEqual(row["steps_per_call"], config.steps_per_call)
      self.assertLen(row["round_step_ms"], 2)
      # The median of all calls lies between the rounds' medians.
      self.assertBetween(row["step_ms"], min(row["round_step_ms"]),
                         max(row["round_step_ms"]))
    self.assertLess(by_cache["tq4"]["bytes_per_token"],
                    by_cache["full-bf16"]["bytes_per_token"] / 3)
    # The kernel options impl=None would run on a GPU, for the record.
    self.assertIsNone(by_cache["full-bf16"]["kernel_options"])
    self.assertEqual(by_cache["tq4"]["kernel_options"]["lookup_mode"], "prmt")
    self.assertIn("skip_empty_splits", by_cache["tq4"]["kernel_options"])
    self.assertEqual(by_cache["tq4"]["cache_options"], {})

  def test_cache_options_reach_the_caches(self):
    # A row's optional last element: more CacheConfig fields.
    config = decode_bench_config.get_config("model=llama3_8b")
    grid = [c for c in config.caches if c[0] == "tq4-grid"]
    self.assertEqual(grid[0][-1], {"grid_centroids": True})
    model, config = _tiny_decode_setup()
    _, caches = decode_bench.filled_caches(
        model, config, 2, "turboquant", 4, 4, "xla", {"grid_centroids": True})
    self.assertTrue(caches[0].config.grid_centroids)
    _, caches = decode_bench.filled_caches(model, config, 2, "turboquant",
                                           4, 4, "xla")
    self.assertFalse(caches[0].config.grid_centroids)

  def test_unrolled_steps_equal_the_loop(self):
    # unroll writes the steps out; the tokens and caches are the same.
    model, config = _tiny_decode_setup()
    outs = []
    for unroll in (False, True):
      tokens, caches = decode_bench.filled_caches(
          model, config, 2, "turboquant", 4, 4, "xla")
      lengths = jax.numpy.copy(caches[0].lengths)
      outs.append(decode_bench.decode_steps(model, tokens, caches, lengths,
                                            impl="xla", steps=3,
                                            unroll=unroll))
    (t0, c0), (t1, c1) = outs
    np.testing.assert_array_equal(t0, t1)
    np.testing.assert_array_equal(c0[1].lengths, [13, 13])
    for a, b in zip(jax.tree.leaves(c0), jax.tree.leaves(c1)):
      np.testing.assert_array_equal(a, b)

  def test_config_keeps_the_named_caches(self):
    config = decode_bench_config.get_config(
        "model=llama3_8b,caches=tq4+cudnn-bf16")
    self.assertEqual([c[0] for c in config.caches], ["cudnn-bf16", "tq4"])
    with self.assertRaisesRegex(ValueError, r"\['tq9'\] not among"):
      decode_bench_config.get_config("scale=cpu,caches=tq4+tq9")

  def test_model_shapes(self):
    # llama3_8b: Llama-3.1-8B's shape (8.03 B parameters: 32 layers of 32
    # query / 8 KV heads of 128), for the GPU only; an unknown model names
    # the choices.
    config = decode_bench_config.get_config("model=llama3_8b")
    shape, name = decode_bench.model_config(config)
    self.assertEqual((name, shape.n_layers, shape.n_heads, shape.n_kv_heads,
                      shape.head_dim), ("Llama-3.1-8B", 32, 32, 8, 128))
    model = nnx.eval_shape(
        lambda: decode_bench.model_lib.Transformer(shape, rngs=nnx.Rngs(0)))
    params = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
    self.assertEqual(round(params / 1e7), 803)
    self.assertEqual(config.capacity % (64 * 16), 0)
    self.assertGreater(config.capacity, config.context)
    self.assertEqual(decode_bench.model_config(
        decode_bench_config.get_config())[1], "SmolLM2-135M")
    with self.assertRaisesRegex(ValueError, "scale=cpu"):
      decode_bench_config.get_config("scale=cpu,model=llama3_8b")
    config.model = "gpt2"
    with self.assertRaisesRegex(ValueError, "config.model='gpt2'.*llama3_8b"):
      decode_bench.model_config(config)


class StepTraceTest(absltest.TestCase):

  def test_summarize_per_step(self):
    # Two steps of three kernels, names numbered as XLA numbers fusions.
    events = [("loop_pad_fusion_12", 0, 2000), ("mosaic_kernel", 2500, 9000),
              ("input_reduce_fusion.3", 12000, 3000),
              ("loop_pad_fusion_13", 20000, 2000),
              ("mosaic_kernel", 22500, 9000),
              ("input_reduce_fusion.4", 32000, 3000)]
    k = step_trace.summarize(events, steps=2)
    self.assertEqual(k.launches, 3)
    self.assertAlmostEqual(k.busy_us, 14.0)
    self.assertAlmostEqual(k.span_us, 17.5)
    self.assertEqual(k.by_name["loop_pad_fusion"], (1.0, 2.0))
    self.assertEqual(k.by_name["input_reduce_fusion"], (1.0, 3.0))
    self.assertEqual(step_trace.kernel_name("fusion_1_2"), "fusion")
    gaps = step_trace.gaps_before(events, steps=2)
    # mosaic_kernel: 0.5 us after the pad each step; the reduce 0.5 us
    # after it; the second step's pad 5 us after the first step's reduce.
    self.assertEqual(gaps["mosaic_kernel"], (1.0, 0.5))
    self.assertEqual(gaps["input_reduce_fusion"], (1.0, 0.5))
    self.assertEqual(gaps["loop_pad_fusion"], (1.0, 2.5))

  def test_gaps_of_overlapping_kernels(self):
    # A kernel that starts before the latest end has no gap; the gap of
    # the next one counts from the latest end, not the last started.
    events = [("a", 0, 10000), ("b", 1000, 2000), ("c", 12000, 1000)]
    gaps = step_trace.gaps_before(events, steps=1)
    self.assertEqual(gaps["b"], (1.0, 0.0))
    self.assertEqual(gaps["c"], (1.0, 2.0))

  def test_reads_a_trace(self):
    # A CPU trace has no device plane: the host plane's events stand in,
    # and the traced call is among them.
    import jax  # pylint: disable=g-import-not-at-top
    f = jax.jit(lambda x: (x @ x).sum())
    x = jax.numpy.ones((64, 64))
    f(x).block_until_ready()
    with tempfile.TemporaryDirectory() as tmp:
      jax.profiler.start_trace(tmp)
      f(x).block_until_ready()
      jax.profiler.stop_trace()
      events = step_trace.kernel_events(tmp)
      host = step_trace.host_events(tmp)
    self.assertTrue(any("<lambda>" in name for name, _, _ in events),
                    sorted({n for n, _, _ in events})[:20])
    self.assertTrue(any("<lambda>" in name for name, _, _ in host))
    with tempfile.TemporaryDirectory() as tmp:
      with self.assertRaises(FileNotFoundError):
        step_trace.kernel_events(tmp)


class SassCensusTest(absltest.TestCase):

  # An nvdisasm-style listing: a prologue, a loop closed by a predicated
  # backward branch to a label, a forward branch, and an exit.
  LISTING = """
        /*0000*/                   LDC R1, c[0x0][0x28] ;   /* 0x0 */
        /*0010*/                   S2R R0, SR_TID.X ;
.L_x_1:
        /*0020*/                   PRMT R4, R2, 0x3210, R3 ;
        /*0030*/                   LOP3.LUT R5, R4, 0x8888, RZ, 0x3c, !PT ;
        /*0040*/                   PRMT R6, R4, 0x7654, R5 ;
        /*0050*/                   HGMMA.64x16x16.F32 R24, gdesc[UR4], R24 ;
        /*0060*/                   FFMA R7, R6, R6, R7 ;
        /*0070*/              @!P0 BRA `(.L_x_2) ;
        /*0080*/                   SYNCS.ARRIVE.TRANS64 RZ, [UR8], RZ ;
        /*0090*/               @P1 BRA `(.L_x_1) ;
.L_x_2:
        /*00a0*/                   BRA 0x20 ;
        /*00b0*/                   EXIT ;
"""

  def test_parses_instructions_labels_and_loops(self):
    instrs, labels = sass_census.parse(self.LISTING)
    self.assertLen(instrs, 12)
    self.assertEqual(labels, {".L_x_1": 0x20, ".L_x_2": 0xa0})
    self.assertEqual(instrs[3].opcode, "LOP3")
    self.assertEqual(instrs[5].opcode, "HGMMA")
    bodies = sass_census.loops(instrs, labels)
    # BRA 0x20 closes 0x20-0xa0 (9), @P1 BRA .L_x_1 0x20-0x90 (8); the
    # forward @!P0 BRA is no loop.
    self.assertEqual([len(b) for b in bodies], [9, 8])
    ops, classes = sass_census.census(bodies[1])
    self.assertEqual(ops["PRMT"], 2)
    self.assertEqual(classes["integer"], 3)
    self.assertEqual(classes["tensor"], 1)
    self.assertEqual(classes["f32"], 1)
    self.assertEqual(classes["sync"], 1)
    self.assertEqual(classes["control"], 2)
    self.assertIn("loop of 9 instructions",
                  sass_census.report(self.LISTING, minimum=5))
    # By pipe: PRMT, LOP3, PRMT on the ALU pipe, FFMA on the FMA pipe.
    pipes = [sass_census.pipe(i) for i in bodies[1]]
    self.assertEqual(pipes.count("alu"), 3)
    self.assertEqual(pipes.count("fma"), 1)
    self.assertIn("by pipe: other 4, alu 3, fma 1",
                  sass_census.report(self.LISTING, minimum=5))
    wide, plain = (sass_census.parse(
        f"/*0000*/ {op} R7, R0, -0x7, R7 ;")[0][0]
                   for op in ("IMAD.HI.U32", "IMAD"))
    self.assertEqual((sass_census.pipe(wide), sass_census.pipe(plain)),
                     ("fma_wide", "fma"))

  def test_reads_a_dump_folder(self):
    # --dir: every file holding a listing is reported, others skipped.
    with tempfile.TemporaryDirectory() as tmp:
      pathlib.Path(tmp, "kernel.sass").write_text(self.LISTING)
      pathlib.Path(tmp, "notes.txt").write_text("no instructions here")
      out = io.StringIO()
      with mock.patch.object(sys, "argv", ["x", f"--dir={tmp}", "--min=5"]):
        with contextlib.redirect_stdout(out):
          sass_census.main()
    self.assertIn("== kernel.sass", out.getvalue())
    self.assertNotIn("notes.txt", out.getvalue())
    self.assertIn("loop of 9 instructions", out.getvalue())

  def test_assembles_ptx_where_no_listing_is_found(self):
    # A dump with PTX but no SASS: the PTX goes through ptxas and
    # cuobjdump (stand-ins here) and their listing is reported.
    with tempfile.TemporaryDirectory() as tmp:
      pathlib.Path(tmp, "kernel.ptx").write_text(".version 8.0")
      out = io.StringIO()
      with mock.patch.object(sass_census, "assemble",
                             return_value=(self.LISTING,
                                           "ptxas info: Used 158 registers")
                             ) as assemble, \
          mock.patch.object(sys, "argv", ["x", f"--dir={tmp}", "--min=5"]), \
          contextlib.redirect_stdout(out):
        sass_census.main()
    assemble.assert_called_once_with(str(pathlib.Path(tmp, "kernel.ptx")))
    self.assertIn("== kernel.ptx (assembled here, 158 registers)",
                  out.getvalue())
    self.assertIn("loop of 9 instructions", out.getvalue())

  def test_assemble_names_the_missing_tools(self):
    with mock.patch.object(sass_census, "cuda_tool", return_value=None):
      with self.assertRaisesRegex(FileNotFoundError, "ptxas and cuobjdump"):
        sass_census.assemble("kernel.ptx")


class LookupSassTest(absltest.TestCase):

  def test_module_has_each_width_with_and_without_the_fma_pipe(self):
    text, names = lookup_sass.module(128)
    self.assertEqual(names, ["k2_fma", "k2_alu", "k3_fma", "k3_alu",
                             "k4_fma", "k4_alu"])
    entries = re.split(r"\.visible \.entry ", text)[1:]
    self.assertLen(entries, 6)
    for name, entry in zip(names, entries):
      self.assertTrue(entry.startswith(name + "("))
      self.assertNotIn("$", entry)          # every operand substituted
      # The 2- and 4-bit FMA-pipe PTX has multiply-adds, the other none;
      # 3 bits is the same PTX either way.
      self.assertEqual("mad.lo.u32" in entry,
                       name in ("k2_fma", "k4_fma"), name)
    # Each kernel loads its register pair's inputs and folds its outputs.
    self.assertEqual(entries[2].count("ld.global.u32 %i"), 3)
    self.assertEqual(entries[2].count("xor.b32 %acc"), 8)

  def test_counts_the_loop_by_pipe(self):
    listing = """
        Function : k4_fma
        /*0000*/                   LDC R1, c[0x0][0x28] ;
.L_x_0:
        /*0010*/                   SHF.R.U32.HI R0, RZ, 0x3, R2 ;
        /*0020*/                   IMAD R7, R0, -0x7, R7 ;
        /*0030*/                   PRMT R4, R4, R7, 0x3331302f ;
        /*0040*/               @P0 BRA `(.L_x_0) ;
        /*0050*/                   EXIT ;
"""
    counts = lookup_sass.pipes_by_kernel(listing)
    self.assertEqual(dict(counts["k4_fma"]),
                     {"alu": 2, "fma": 1, "other": 1})

  def test_fma_pipe_takes_alu_work_where_ptxas_is_found(self):
    if not (sass_census.cuda_tool("ptxas")
            and sass_census.cuda_tool("cuobjdump")):
      self.skipTest("no ptxas / cuobjdump here (the CI machine has none)")
    text, _ = lookup_sass.module(128)
    with tempfile.TemporaryDirectory() as tmp:
      path = pathlib.Path(tmp) / "lookup.ptx"
      path.write_text(text)
      counts = lookup_sass.pipes_by_kernel(
          sass_census.assemble(str(path))[0])
    for bits in (2, 4):
      self.assertLess(counts[f"k{bits}_fma"]["alu"],
                      counts[f"k{bits}_alu"]["alu"], bits)
    self.assertEqual(counts["k3_fma"], counts["k3_alu"])


class HloCensusTest(absltest.TestCase):

  HLO = """\
%fused_add (p: f32[4]) -> f32[4] {
  %p = f32[4]{0} parameter(0)
  ROOT %add = f32[4]{0} add(%p, %p)
}

%body (t: (s32[1], u8[8])) -> (s32[1], u8[8]) {
  %t = (s32[1]{0}, u8[8]{0}) parameter(0)
  %call = (s32[1]{0}, u8[8]{0}) custom-call(%t), custom_call_target="mosaic_gpu_v2"
  %gte = s32[1]{0} get-tuple-element(%call), index=0
  %copy.1 = s32[1]{0} copy(%gte)
  ROOT %tuple = (s32[1]{0}, u8[8]{0}) tuple(%copy.1, %gte)
}

ENTRY %main (a: s32[1]) -> s32[1] {
  %a = s32[1]{0} parameter(0)
  ROOT %copy_start = s32[1]{0} copy-start(%a)
}
"""

  def test_counts_mosaic_calls_and_copies_per_computation(self):
    # Only the body has either; copy-start is not a copy.
    self.assertEqual(step_trace.hlo_census(self.HLO), [("body", 5, 1, 1)])


if __name__ == "__main__":
  absltest.main()
