"""What a parameter tree says about its network: architecture, variant, validation.

`describe` reads the architecture off a tree (depths, widths, classes), `detect_variant`
names it (F0..F7, F0+..F7+), and `validate` compares a tree with what `nfnet.NFNet` expects,
listing missing, unexpected and mis-shaped parameters by "module/param" path.
"""

import dataclasses
import re
from collections.abc import Mapping
from typing import Any

import numpy as np

from nfnets_jax.checkpoints import errors
from nfnets_jax.models import registry, variants


@dataclasses.dataclass(frozen=True)
class Architecture:
    """What a parameter tree says about its network.

    Attributes:
      root: the root module name ("NFNet").
      depths: blocks per stage.
      widths: output channels per stage.
      num_classes: classifier outputs.
      final_conv_ch: channels of the final 1x1 conv.
    """

    root: str
    depths: tuple[int, ...]
    widths: tuple[int, ...]
    num_classes: int
    final_conv_ch: int


_BLOCK_RE = re.compile(r"^(?P<root>[^/]+)/~/nf_block(?:_(?P<index>\d+))?$")


def block_name(root: str, index: int) -> str:
    """The module path of global block `index` ("NFNet/~/nf_block", "NFNet/~/nf_block_1"...)."""
    return f"{root}/~/nf_block" if index == 0 else f"{root}/~/nf_block_{index}"


def describe(params: Mapping[str, Mapping[str, Any]]) -> Architecture:
    """Reads depths, widths and classes off an NFNet parameter tree.

    Stages are delimited by the blocks that own a `conv_shortcut` (the first block of each
    stage); widths are the output channels of each stage's `conv2`.
    """
    indices, roots = [], set()
    for module in params:
        match = _BLOCK_RE.match(module)
        if match:
            roots.add(match["root"])
            indices.append(int(match["index"] or 0))
    if len(roots) != 1:
        raise errors.CheckpointMismatchError(
            "cannot find the NFNet blocks ('<root>/~/nf_block', '<root>/~/nf_block_1', ...) in "
            f"this tree; its first modules are {sorted(params)[:5]}."
        )
    root = roots.pop()
    indices.sort()
    if indices != list(range(len(indices))):
        missing = sorted(set(range(max(indices) + 1)) - set(indices))
        raise errors.CheckpointMismatchError(
            f"blocks are not numbered 0..{max(indices)}: missing "
            f"{[block_name(root, i) for i in missing][:5]}."
        )
    stage_starts = [i for i in indices if f"{block_name(root, i)}/~/conv_shortcut" in params]
    if not stage_starts or stage_starts[0] != 0:
        raise errors.CheckpointMismatchError(
            f"{block_name(root, 0)} has no conv_shortcut: the tree does not look like an NFNet."
        )
    bounds = stage_starts + [len(indices)]
    depths = tuple(b - a for a, b in zip(bounds[:-1], bounds[1:]))

    def out_channels(module: str) -> int:
        try:
            return int(np.shape(params[module]["w"])[-1])
        except KeyError:
            raise errors.CheckpointMismatchError(f"missing parameter {module}/w.") from None

    widths = tuple(out_channels(f"{block_name(root, i)}/~/conv2") for i in stage_starts)
    num_classes = out_channels(f"{root}/~/linear")
    final_conv_ch = out_channels(f"{root}/~/final_conv")
    return Architecture(
        root=root,
        depths=depths,
        widths=widths,
        num_classes=num_classes,
        final_conv_ch=final_conv_ch,
    )


def detect_variant(params: Mapping[str, Mapping[str, Any]]) -> str:
    """The NFNet variant ("F0".."F7", "F0+".."F7+") whose depths and widths the tree has.

    Raises:
      errors.CheckpointMismatchError: no variant has this depth pattern and these widths (e.g. a
        width-multiplied or custom model); the message gives what was found.
    """
    arch = describe(params)
    for name, spec in variants.NFNET.items():
        if spec.depths == arch.depths and spec.widths == arch.widths:
            return name
    raise errors.CheckpointMismatchError(
        f"no NFNet variant has depths {list(arch.depths)} and widths {list(arch.widths)} "
        "(a custom or width-multiplied model?); pass the model's arguments explicitly."
    )


def model_kwargs(params: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """`nfnet.NFNet` arguments that build a model with exactly this tree's parameters.

    A known variant gives `variant` and `num_classes`; any other tree (a tiny or
    width-multiplied model) also gets `depths`, `widths` and `group_width`, and non-default
    squeeze-excite ratio, final conv width, single 3x3 conv or root name are carried over.
    """
    arch = describe(params)
    first = block_name(arch.root, 0)
    kwargs: dict[str, Any] = {"num_classes": arch.num_classes}
    try:
        kwargs["variant"] = detect_variant(params)
    except errors.CheckpointMismatchError:
        group_width = int(np.shape(params[f"{first}/~/conv1"]["w"])[2])
        kwargs.update(variant="F0", depths=arch.depths, widths=arch.widths, group_width=group_width)
    se = params.get(f"{first}/~/squeeze_excite/~/linear")
    se_ratio = 0.0 if se is None else int(np.shape(se["w"])[1]) / arch.widths[0]
    if se_ratio != 0.5:
        kwargs["se_ratio"] = se_ratio
    if arch.final_conv_ch != 2 * arch.widths[-1]:
        kwargs["final_conv_ch"] = arch.final_conv_ch
    if f"{first}/~/conv1b" not in params:
        kwargs["use_two_convs"] = False
    if arch.root != "NFNet":
        kwargs["name"] = arch.root
    return kwargs


@dataclasses.dataclass(frozen=True)
class TreeDiff:
    """Differences between a parameter tree and the expected one, by "module/param" path."""

    missing: tuple[str, ...]
    unexpected: tuple[str, ...]
    mis_shaped: tuple[tuple[str, tuple[int, ...], tuple[int, ...]], ...]

    def __bool__(self) -> bool:
        return bool(self.missing or self.unexpected or self.mis_shaped)

    def summary(self, limit: int = 8) -> str:
        """A readable report listing up to `limit` paths per kind."""

        def listing(items: list[str]) -> str:
            more = f", ... and {len(items) - limit} more" if len(items) > limit else ""
            return ", ".join(items[:limit]) + more

        parts = []
        if self.missing:
            parts.append(f"{len(self.missing)} missing: {listing(list(self.missing))}")
        if self.unexpected:
            parts.append(f"{len(self.unexpected)} unexpected: {listing(list(self.unexpected))}")
        if self.mis_shaped:
            items = [f"{p} has {g} but the model needs {e}" for p, g, e in self.mis_shaped]
            parts.append(f"{len(self.mis_shaped)} mis-shaped: {listing(items)}")
        return "; ".join(parts) if parts else "no differences"


def compare_trees(
    params: Mapping[str, Mapping[str, Any]], expected: Mapping[str, Mapping[str, Any]]
) -> TreeDiff:
    """Paths missing from `params`, not in `expected`, and with another shape."""
    got, want = flatten_shapes(params), flatten_shapes(expected)
    return TreeDiff(
        missing=tuple(sorted(set(want) - set(got))),
        unexpected=tuple(sorted(set(got) - set(want))),
        mis_shaped=tuple(
            (k, got[k], want[k]) for k in sorted(set(got) & set(want)) if got[k] != want[k]
        ),
    )


def flatten_shapes(tree: Mapping[str, Mapping[str, Any]]) -> dict[str, tuple[int, ...]]:
    """`{module: {param: array or shape}}` -> `{"module/param": shape}`."""
    out = {}
    for module, group in tree.items():
        for param, value in group.items():
            shape = value if isinstance(value, tuple) else np.shape(value)
            out[f"{module}/{param}"] = tuple(shape)
    return out


def expected_shapes(
    variant: str, num_classes: int = 1000, **model_kwargs: Any
) -> dict[str, dict[str, tuple[int, ...]]]:
    """The parameter shapes of `nfnet.NFNet(num_classes, variant, **model_kwargs)`.

    Uses `jax.eval_shape`, so no memory is allocated and nothing is computed.
    """
    shapes = registry.param_shapes(
        "NFNet", num_classes=num_classes, variant=variant, **model_kwargs
    )
    return {m: {p: tuple(v.shape) for p, v in g.items()} for m, g in shapes.items()}


def validate(
    params: Mapping[str, Mapping[str, Any]],
    variant: str,
    num_classes: int | None = None,
    **model_kwargs: Any,
) -> None:
    """Checks that `params` fit `nfnet.NFNet(variant=variant, ...)` exactly.

    Args:
      params: a two-level parameter tree.
      variant: the requested variant.
      num_classes: the classifier size; None takes it from the tree's classifier.
      **model_kwargs: other `NFNet` arguments (width, depths, widths, ...).

    Raises:
      errors.CheckpointMismatchError: listing missing, unexpected and mis-shaped parameters by
        path, and naming the variant the tree really holds when it is a known one.
    """
    if num_classes is None:
        try:
            num_classes = describe(params).num_classes
        except errors.CheckpointMismatchError:
            num_classes = 1000
    expected = expected_shapes(variant, num_classes, **model_kwargs)
    diff = compare_trees(params, expected)
    if not diff:
        return
    try:
        actual = f" The checkpoint holds {detect_variant(params)}."
    except errors.CheckpointMismatchError:
        actual = ""
    raise errors.CheckpointMismatchError(
        f"parameters do not match NFNet variant {variant} with {num_classes} classes.{actual} "
        f"{diff.summary()}."
    )
