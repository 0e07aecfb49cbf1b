"""``fastdec bench``: every decoder family, timed on this device against the same architecture in diffusers.

For each decoder, image size, batch and dtype it runs these variants on the same weights and the same latents:

* ``fastdec``: fastdec's fused ops (the backend that runs each op is printed: Triton kernels on CUDA; on CPU the eager
  references, or Triton's interpreter when FASTDEC_TRITON_INTERPRET=1, which checks kernels and is no speed figure);
* ``fastdec-reference``: the same model inside ``fastdec.ops.reference_ops()`` (every op on its eager reference);
* ``diffusers``: the same architecture in diffusers, eager (AutoencoderKL for sd-vae, AutoencoderTiny for taesd and
  tae-192; the other families have no diffusers implementation: reported "n/a" with the reason);
* ``diffusers-compile`` and ``fastdec-compile``: both under ``torch.compile`` (compile time, the first call, reported
  separately; fastdec's with fullgraph=True; dynamo's caches are reset per case so nothing silently falls back);
* ``fastdec-cudagraph`` (CUDA, with the compile variants): the fastdec decode captured once in a ``torch.cuda.graph``
  and replayed, which shows what the per-op host work (Python, dispatch, launches) costs; its capture time is
  reported as compile time.

The diffusers model gets the fastdec model's weights. On CUDA the fastdec 2-D conv decoders run channels_last
(``Decoder.channels_last_on_cuda``, as in ``fastdec.decode`` with a decoder named), diffusers runs as shipped.

How each figure is measured:

* time: per call, ``repeats`` rounds after ``warmup`` calls and one probe call (memory and output, below); every
  round times each variant once, in an order that rotates from round to round (interleaved, so drift such as clocks
  or other processes hits all variants alike). CUDA: CUDA events around ``calls`` back-to-back calls (enough for
  ~20 ms); CPU: ``time.perf_counter`` around one call. Median, quartiles and min/max over the rounds; a single run is
  never reported. On a shared CPU, ``--threads 1`` avoids OpenMP stalls that swing multi-threaded times by 10x.
* ratio to diffusers eager: the median over rounds of (variant time / diffusers time) of the same round;
  ``speedup_vs_diffusers`` is its inverse.
* peak extra memory of one call, output included. CUDA: ``max_memory_allocated()`` after
  ``reset_peak_memory_stats()``, minus ``memory_allocated()`` before. CPU: the peak of bytes allocated minus bytes
  freed by torch's CPU allocator during the call, from ``torch.profiler`` memory events (the CPU analogue of
  max_memory_allocated). Allocations outside torch's allocator (oneDNN scratch, numpy arrays of Triton's
  interpreter) are not counted; the process RSS is not used, since the C allocator keeps freed pages mapped.
* fidelity: every output against the fp32 reference (the fastdec model in float32 on ``reference_ops()``, same
  weights, same latents), as images ([-1, 1] outputs mapped to [0, 1], not clamped): max |error| and PSNR in dB with
  the reference image's range (max - min) as the peak, so small-valued outputs of random weights do not inflate
  it. ``psnr_db`` is null when the outputs are identical.

Weights are random unless ``--weights DECODER=PATH`` (loaded by ``fastdec.load``); speed does not depend on weight
values. Latents are random normal. ``--pipeline-share`` adds one step of a diffusers UNet2DConditionModel (CFG batch)
and reports what share of a sampling run the decode is, at 1, 4, 20 and 50 steps.

The package, one module per concern: ``spec`` (what an entry is), ``decoders/`` (one module per decoder family: add
a decoder by adding a module there), ``settings`` (options), ``contenders`` (building the models), ``timing``
(measuring), ``cases`` (one decoder at one size), ``pipeline`` (--pipeline-share), ``goals``, ``environment``,
``render`` (markdown, rich, plot, files), ``compare`` and ``run`` (the entry points); ``prewarm`` fills torch.compile's
caches on disk for a later run.
"""

from __future__ import annotations

import torch

from fastdec.bench.cases import Variant, bench_decoder
from fastdec.bench.compare import compare, read_result
from fastdec.bench.contenders import Contender, build_contender, fastdec_model, image_of, latents_for, prepare
from fastdec.bench.decoders import DECODERS, ENTRIES, GPU_GOALS, LIGHTWEIGHT
from fastdec.bench.environment import environment
from fastdec.bench.goals import LIGHTWEIGHT_SPEEDUP_GOAL, evaluate_goals, find_row, goal_for_row, verdict
from fastdec.bench.pipeline import pipeline_share, unet_step_times
from fastdec.bench.render import (
    figure_of,
    full_table,
    goals_table,
    header_lines,
    load_line,
    log_ticks,
    pipeline_lines,
    plot,
    print_rich,
    render_markdown,
    summary_table,
    write_outputs,
)
from fastdec.bench.run import default_out_dir, main, run, run_benchmark, typed_command
from fastdec.bench.settings import DTYPES, VARIANT_LABELS, VARIANTS, Settings, add_arguments, dtype_name, settings_from
from fastdec.bench.spec import GIB, MIB, BenchDecoder, Goal
from fastdec.bench.timing import (
    call_peak_memory,
    fidelity,
    fused_backend,
    interleaved_times,
    paired_ratio,
    summary_ms,
    synchronize,
)

# bench.torch: the torch this benchmark runs (tests seed it through the module)
__all__ = [
    'torch', 'Variant', 'bench_decoder', 'compare', 'read_result', 'Contender', 'build_contender',
    'fastdec_model', 'image_of', 'latents_for', 'prepare', 'DECODERS', 'ENTRIES', 'GPU_GOALS', 'LIGHTWEIGHT',
    'environment', 'LIGHTWEIGHT_SPEEDUP_GOAL', 'evaluate_goals', 'find_row', 'goal_for_row', 'verdict',
    'pipeline_share', 'unet_step_times', 'figure_of', 'full_table', 'load_line', 'log_ticks', 'goals_table',
    'header_lines', 'pipeline_lines', 'plot', 'print_rich', 'render_markdown', 'summary_table', 'write_outputs',
    'main', 'run', 'run_benchmark', 'typed_command', 'default_out_dir', 'DTYPES', 'VARIANT_LABELS', 'VARIANTS',
    'Settings', 'add_arguments', 'dtype_name', 'settings_from', 'GIB', 'MIB', 'BenchDecoder', 'Goal',
    'call_peak_memory', 'fidelity', 'fused_backend', 'interleaved_times', 'paired_ratio', 'summary_ms',
    'synchronize',
]
