"""Metric output of the trainer: TensorBoard events, a JSON-lines file and a progress line.

Only process 0 writes (every process computes the same, cross-device averaged, metrics); the
other processes get a writer that does nothing. Files go to the workdir:
`<workdir>/metrics.jsonl` (one JSON object per logging step: {"step", "split", name: value})
and TensorBoard event files under `<workdir>/tensorboard/`.

A local `metrics.jsonl` is appended to line by line. Cloud storage has no append: for a URL
workdir the writer keeps the file's lines (those of earlier runs too) and rewrites the whole
object (one atomic object write) at each `flush` and at most `upload_every_s` seconds after a
`write`; a crash loses at most the lines since the last upload, never the file.
"""

from __future__ import annotations

import json
import math
import sys
import time
from collections.abc import Mapping

import jax

from nfnets_jax import files


class MetricWriter:
    """Writes scalar metrics from process 0 to TensorBoard and `metrics.jsonl`."""

    def __init__(self, workdir: str, enabled: bool | None = None, upload_every_s: float = 60.0):
        """Opens the writers.

        Args:
          workdir: the run's working directory (a local path or a gs:// URL).
          enabled: whether to write; defaults to "this is process 0".
          upload_every_s: for a URL workdir, the longest time written lines wait before
            `metrics.jsonl` is uploaded again.
        """
        self.enabled = jax.process_index() == 0 if enabled is None else enabled
        self.jsonl_path = files.join(workdir, "metrics.jsonl")
        self._tb = None
        self._lines: list[str] | None = None  # URL workdirs: the whole file, re-uploaded.
        self._upload_every_s, self._uploaded_at, self._pending = upload_every_s, 0.0, False
        if self.enabled:
            files.makedirs(workdir)
            if files.is_url(workdir):
                previous = files.read_text(self.jsonl_path) if files.exists(self.jsonl_path) else ""
                self._lines = previous.splitlines(keepends=True)
                self._uploaded_at = time.monotonic()
            from tensorboardX import SummaryWriter  # Imported lazily: only process 0 needs it.

            self._tb = SummaryWriter(files.join(workdir, "tensorboard"))

    def write(self, step: int, split: str, scalars: Mapping[str, float]) -> None:
        """Records scalars of one split ('train', 'eval', 'eval_ema') at a step."""
        if not self.enabled:
            return
        values = {k: float(v) for k, v in scalars.items()}
        for name, value in values.items():
            self._tb.add_scalar(f"{split}/{name}", value, step)
        record = {"step": int(step), "split": split}
        record.update({k: (v if math.isfinite(v) else str(v)) for k, v in values.items()})
        line = json.dumps(record) + "\n"
        if self._lines is None:
            with open(self.jsonl_path, "a") as f:
                f.write(line)
            return
        self._lines.append(line)
        self._pending = True
        if time.monotonic() - self._uploaded_at >= self._upload_every_s:
            self._upload()

    def _upload(self) -> None:
        if self._lines is not None and self._pending:
            files.write_text(self.jsonl_path, "".join(self._lines))
            self._pending, self._uploaded_at = False, time.monotonic()

    def flush(self) -> None:
        """Flushes the TensorBoard writer (and uploads `metrics.jsonl` of a URL workdir)."""
        self._upload()
        if self._tb is not None:
            self._tb.flush()

    def close(self) -> None:
        """Flushes and closes the writers."""
        self._upload()
        if self._tb is not None:
            self._tb.close()
            self._tb = None


class Progress:
    """A live progress line: step, images/s, loss, lr, ETA."""

    def __init__(
        self,
        total_steps: int,
        global_batch_size: int,
        start_step: int = 0,
        enabled: bool | None = None,
    ):
        """Starts the clock at `start_step`."""
        self.total_steps = total_steps
        self.global_batch_size = global_batch_size
        self.enabled = jax.process_index() == 0 if enabled is None else enabled
        self._last_step = start_step
        self._last_time = time.time()

    def restart(self, step: int) -> None:
        """Restarts the clock at `step` (e.g. after the first step, to leave compilation out)."""
        self._last_step, self._last_time = step, time.time()

    def update(self, step: int, loss: float, lr: float) -> str:
        """Prints (process 0) and returns the progress line for `step`."""
        now = time.time()
        steps = max(step - self._last_step, 1)
        seconds_per_step = max(now - self._last_time, 1e-9) / steps
        images_per_second = self.global_batch_size / seconds_per_step
        eta = _format_duration(seconds_per_step * max(self.total_steps - step, 0))
        line = (
            f"step {step}/{self.total_steps} | {images_per_second:,.1f} img/s | "
            f"loss {loss:.4f} | lr {lr:.4g} | ETA {eta}"
        )
        self._last_step, self._last_time = step, now
        if self.enabled:
            print(line, file=sys.stderr, flush=True)
        return line


def _format_duration(seconds: float) -> str:
    seconds = int(seconds)
    hours, rest = divmod(seconds, 3600)
    minutes, seconds = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{seconds:02d}"


def read_metrics(workdir: str) -> dict[str, list[dict[str, float]]]:
    """`<workdir>/metrics.jsonl` as {split: [record, ...]}, values as floats (NaN / inf too);
    empty when the file does not exist."""
    path = files.join(workdir, "metrics.jsonl")
    splits: dict[str, list[dict[str, float]]] = {}
    if not files.exists(path):
        return splits
    for line in files.read_text(path).splitlines():
        if line.strip():
            record = json.loads(line)
            split = record.pop("split")
            splits.setdefault(split, []).append({k: float(v) for k, v in record.items()})
    return splits
