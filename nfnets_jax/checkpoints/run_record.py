"""What a training workdir knows about its run, for evaluating and predicting with it.

The trainer writes `<workdir>/config.json` (`train.resume.config_record`): the resolved
config, the derived plan (classes, train and eval image sizes) and the dataset's class names
and evaluation margin. `read` turns it into a `RunRecord`, so that `scripts/evaluate.py`
and `scripts/predict.py` evaluate a workdir's model as the run itself did (its model and
options, its eval resolution and preprocessing margin, its class names) unless a flag
overrides them, which `overrides` reports.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import jax
import numpy as np

from nfnets_jax import files

RECORD = "config.json"


@dataclasses.dataclass(frozen=True)
class RunRecord:
    """A workdir's run, as recorded in its config.json.

    Attributes:
      workdir: the directory.
      model_name: "NFNet" or "NFResNet".
      model_kwargs: the model's constructor arguments, `num_classes` included.
      eval_image_size: the resolution the run evaluated at.
      eval_margin: the resize margin of its evaluation preprocessing (None: not recorded,
        by runs before the record had it).
      dataset: the dataset it was trained on.
      eval_split: the split it evaluated on (None: the dataset's default).
      class_names: the name of each class id, or None when the dataset has none.
    """

    workdir: str
    model_name: str
    model_kwargs: dict[str, Any]
    eval_image_size: int
    eval_margin: int | None
    dataset: str
    eval_split: str | None
    class_names: tuple[str, ...] | None

    @property
    def num_classes(self) -> int:
        return int(self.model_kwargs["num_classes"])

    def describe(self) -> str:
        """One line: the model, classes, eval resolution and dataset of the run."""
        kwargs = self.model_kwargs
        shape = f"{self.model_name} {kwargs.get('variant', '?')}"
        custom = [f"{k}={kwargs[k]}" for k in ("width", "depths", "widths") if k in kwargs]
        margin = "" if self.eval_margin is None else f", margin {self.eval_margin}"
        return (
            f"{shape} ({', '.join(custom)}), {self.num_classes} classes, evaluated at "
            f"{self.eval_image_size} px{margin}, trained on {self.dataset}"
        )


def read(path: str) -> RunRecord | None:
    """The run record of a workdir, or None when `path` is not a directory with config.json.

    Raises:
      ValueError: if config.json exists but cannot be parsed or lacks a field (naming the
        file and the field).
    """
    path = files.local(path)
    record_path = files.join(path, RECORD)
    if not files.isdir(path) or not files.isfile(record_path):
        return None
    try:
        record = json.loads(files.read_text(record_path))
        config, plan = record["config"], record["plan"]
        kwargs = {k: v for k, v in config["model"].items() if v is not None}
        for key in ("depths", "widths"):
            if key in kwargs:
                kwargs[key] = tuple(kwargs[key])
        kwargs["num_classes"] = int(plan["num_classes"])
        dataset = record.get("dataset") or {}
        names = dataset.get("class_names")
        return RunRecord(
            workdir=path,
            model_name=config["model_name"],
            model_kwargs=kwargs,
            eval_image_size=int(plan["eval_image_size"]),
            eval_margin=dataset.get("eval_margin"),
            dataset=config["dataset"],
            eval_split=config.get("eval_split") or None,
            class_names=tuple(names) if names else None,
        )
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise ValueError(
            f"The run record {record_path} cannot be read ({type(err).__name__}: {err}); "
            "it is what the trainer wrote about the run (model, classes, resolution)."
        ) from err


def overrides(record: RunRecord, **requested: Any) -> list[str]:
    """Lines naming each requested value that differs from the run's own.

    Args:
      record: the run.
      **requested: `resolution`, `margin`, `dataset`; None values are not requested.

    Returns:
      e.g. ["--resolution=256 overrides the run's eval resolution 32 px"].
    """
    own = {
        "resolution": (record.eval_image_size, "eval resolution"),
        "margin": (record.eval_margin, "eval resize margin"),
        "dataset": (record.dataset, "dataset"),
    }
    lines = []
    for key, value in requested.items():
        mine, what = own[key]
        if value is not None and mine is not None and value != mine:
            lines.append(f"{key}={value} differs from the run's {what} {mine}")
    return lines


def check_variant(record: RunRecord, variant: str | None) -> None:
    """Raises a ValueError if `variant` is given and is not the run's variant."""
    own = record.model_kwargs.get("variant")
    if variant is not None and variant != own:
        raise ValueError(
            f"--variant={variant} but workdir {record.workdir} trained {record.model_name} {own} "
            f"(its {RECORD}); drop the flag to use the run's model."
        )


def load_params(record: RunRecord, step: int | None = None, ema: bool = True) -> Any:
    """The parameters of the workdir's newest (or `step`) checkpoint, checked against the
    model its record describes.

    Raises:
      ValueError: if the checkpoint's parameters do not fit that model (naming the workdir and
        the first differences).
    """
    from nfnets_jax.checkpoints import workdir as workdir_ckpt
    from nfnets_jax.models import registry

    params = workdir_ckpt.load_params(record.workdir, step=step, ema=ema)
    expected = registry.param_shapes(record.model_name, **record.model_kwargs)
    want = {
        jax.tree_util.keystr(p): v.shape for p, v in jax.tree_util.tree_leaves_with_path(expected)
    }
    got = {
        jax.tree_util.keystr(p): np.shape(v) for p, v in jax.tree_util.tree_leaves_with_path(params)
    }
    diffs = [
        f"{k}: {got.get(k)} saved, {want.get(k)} expected"
        for k in sorted(set(want) | set(got))
        if want.get(k) != got.get(k)
    ]
    if diffs:
        raise ValueError(
            f"The checkpoint of workdir {record.workdir} does not fit the model its {RECORD} "
            f"describes ({record.describe()}): {'; '.join(diffs[:5])}"
            + (f" (and {len(diffs) - 5} more)" if len(diffs) > 5 else "")
        )
    return params
