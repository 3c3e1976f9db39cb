"""Where a compiled step spends its time: XLA thunk durations grouped by operation kind.

`profile_mode` profiles the step benchmark's "grad" (the trainer's forward + backward) or
"inference" program.

`profile` runs a compiled function under `jax.profiler.trace`, reads the Perfetto trace and
attributes each executed XLA thunk (a fusion, convolution, dot, copy...) to the instruction
of the same name in the optimised HLO, then groups the durations by category:
"conv KxK" (with stride or input dilation when not 1), "conv weight-grad (XLA)" (XLA's
weight gradient: a convolution whose window is a whole feature map), "dot", "reduce",
"concatenate", "transpose/copy" and "elementwise" (other fusions). Thunks may run
concurrently, so the durations add up to more than the wall time; compare shares.
"""

from __future__ import annotations

import collections
import glob
import gzip
import json
import re
import tempfile
import time
from collections.abc import Sequence
from typing import Any

import jax

from nfnets_jax.bench import step

_INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%?([\w.\-]+) = (\S+) ([\w\-]+)\(")
_COMPUTATION = re.compile(r"^(?:ENTRY )?%?([\w.\-]+) .*\{\s*$")
_CALLS = re.compile(r"calls=%?([\w.\-]+)")


def hlo_index(hlo_text: str) -> tuple[dict[str, tuple[str, str, str]], dict[str, list[str]]]:
    """({instruction: (opcode, called computation or "", its line)}, {computation: lines})."""
    instructions, computations, current = {}, {}, None
    for line in hlo_text.splitlines():
        match = _COMPUTATION.match(line)
        if match:
            current = match.group(1)
            computations[current] = []
            continue
        if current is not None:
            computations[current].append(line)
        match = _INSTRUCTION.match(line)
        if match:
            called = _CALLS.search(line)
            instructions[match.group(1)] = (match.group(3), called.group(1) if called else "", line)
    return instructions, computations


def _conv_category(body: str) -> str:
    conv = next((line for line in body.splitlines() if " convolution(" in line), body)
    window = re.search(r"window=\{([^}]*)\}", conv)
    fields = dict(
        part.split("=", 1) for part in (window.group(1).split() if window else []) if "=" in part
    )
    size = fields.get("size", "1x1")
    kernel = [int(d) for d in size.split("x")]
    out_shape = re.search(r"= \w+\[([\d,]*)\]", conv)
    labels = re.search(r"dim_labels=\S*->(\w+)", conv)
    if out_shape and labels and out_shape.group(1):
        dims = [int(d) for d in out_shape.group(1).split(",")]
        spatial = [dims[labels.group(1).index(c)] for c in "01" if c in labels.group(1)]
        # XLA's weight gradient: the window is a feature map, the output a kernel.
        if min(kernel) >= 4 and all(k > o for k, o in zip(kernel, spatial)):
            return "conv weight-grad (XLA)"
    label = f"conv {size}"
    if "stride" in fields:
        label += " stride " + fields["stride"]
    if "lhs_dilate" in fields:
        label += " (input grad)"
    return label


def categorize(
    name: str, instructions: dict[str, tuple[str, str, str]], computations: dict[str, list[str]]
) -> str:
    """The category of the thunk called `name` (see the module docstring)."""
    if name not in instructions:
        return "other"
    opcode, called, line = instructions[name]
    # A fusion is read through the computation it calls; a lone instruction through its line.
    body = "\n".join(computations.get(called, [])) if called else line
    if opcode == "convolution" or " convolution(" in body:
        return _conv_category(body)
    if opcode == "dot" or " dot(" in body:
        return "dot"
    if opcode == "reduce" or " reduce(" in body:
        return "reduce"
    if opcode == "concatenate" or name.startswith("concatenate"):
        return "concatenate"
    if "transpose" in name or "copy" in name or opcode in ("copy", "transpose"):
        return "transpose/copy"
    if opcode == "fusion":
        return "elementwise"
    return "other"


def profile(compiled: Any, args: Sequence[Any], iters: int = 2) -> dict[str, Any]:
    """Times `compiled(*args)` under the profiler; per-category thunk time per call.

    Args:
      compiled: an AOT-compiled function (`jax.jit(f).lower(*args).compile()`).
      args: its arguments (not donated).
      iters: profiled calls (after one untimed call).

    Returns:
      {"wall_s": mean seconds per call, "categories": [{"category", "seconds" (per call),
       "thunks" (per call), "share"}] largest first, "thunk_s": their sum}.
    """
    instructions, computations = hlo_index(compiled.as_text())
    jax.block_until_ready(compiled(*args))
    with tempfile.TemporaryDirectory() as trace_dir:
        with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
            start = time.perf_counter()
            for _ in range(iters):
                jax.block_until_ready(compiled(*args))
            wall = (time.perf_counter() - start) / iters
        paths = glob.glob(f"{trace_dir}/**/perfetto_trace.json.gz", recursive=True)
        if not paths:
            raise RuntimeError(f"jax.profiler wrote no Perfetto trace under {trace_dir}.")
        with gzip.open(paths[0]) as f:
            trace = json.load(f)
    events = trace["traceEvents"] if isinstance(trace, dict) else trace
    seconds: dict[str, float] = collections.defaultdict(float)
    counts: dict[str, int] = collections.Counter()
    for event in events:
        name = event.get("name", "")
        if event.get("ph") != "X" or name not in instructions:
            continue
        category = categorize(name, instructions, computations)
        seconds[category] += event["dur"] * 1e-6 / iters
        counts[category] += 1
    total = sum(seconds.values())
    rows = [
        {
            "category": c,
            "seconds": s,
            "thunks": counts[c] / iters,
            "share": s / total if total else 0.0,
        }
        for c, s in sorted(seconds.items(), key=lambda item: -item[1])
    ]
    return {"wall_s": wall, "categories": rows, "thunk_s": total}


def format_profile(result: dict[str, Any], title: str = "") -> str:
    """Plain-text table of `profile`'s result."""
    lines = [title] if title else []
    lines.append(
        f"wall time per call: {result['wall_s']:.3f} s; thunk time (may overlap): "
        f"{result['thunk_s']:.3f} s"
    )
    lines.append(f"{'category':28s} | {'ms/call':>8s} | {'share':>6s} | {'thunks':>6s}")
    lines.append("-" * 58)
    for row in result["categories"]:
        lines.append(
            f"{row['category']:28s} | {1e3 * row['seconds']:8.1f} | "
            f"{100 * row['share']:5.1f}% | {row['thunks']:6.0f}"
        )
    return "\n".join(lines)


def profile_mode(
    config: step.BenchmarkConfig, mode: str = "grad", iters: int = 2
) -> dict[str, Any]:
    """`profile` of one step-benchmark mode ("grad": the trainer's forward + backward;
    "inference": its evaluation forward pass), as `step.jax_program` builds it."""
    if mode not in ("grad", "inference"):
        raise ValueError(f"profile_mode profiles 'grad' or 'inference', got {mode!r}.")
    fn, args, _, _ = step.jax_program(config, mode, config.model(), jax.devices()[0])
    staged = fn if hasattr(fn, "lower") else jax.jit(fn)
    return profile(staged.lower(*args).compile(), args, iters)
