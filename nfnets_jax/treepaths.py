"""Parameter paths of any pytree, masks built from path patterns, per-leaf options.

Generic utilities, shared by the AGC transform (`agc`), the reference optimizer (`optim`)
and the model registry's NFNet mask; nothing here knows about a particular model.

Parameter paths are the pytree key path joined with ``/``. For Haiku's two-level dicts this
is ``'<module path>/<param name>'``, e.g. ``'NFNet/~/linear/w'``; for Flax
``{'params': {'Dense_0': {'kernel': ...}}}`` it is ``'params/Dense_0/kernel'``; list and
tuple entries contribute their index, dataclass / attribute nodes their attribute name.

Flax NNX ``Variable`` nodes (``nnx.state(model, nnx.Param)`` holds ``Param`` objects whose
pytree child is their value) are unwrapped first (`unwrap_variables`), so a NNX model has
the same paths, ``'linear/kernel'``, whether the tree holds Variables (what
``nnx.Optimizer`` gives ``init``) or plain arrays (what it gives ``update``).

Per-leaf options (a mask, a unit axis) are pytrees with the structure of the parameters or
a prefix of it, or functions of the parameters returning one; `per_leaf` broadcasts them to
one value per leaf.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import re
import sys
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np

Mask = Any  # pytree of bools (or a prefix of the params tree).
MaskOrFn = Mask | Callable[[Any], Mask] | None


def is_variable(x: Any) -> bool:
    """Whether ``x`` is a Flax NNX ``Variable`` (without importing flax when it is not loaded)."""
    nnx = sys.modules.get("flax.nnx")
    return nnx is not None and isinstance(x, nnx.Variable)


def unwrap_variables(tree: Any) -> Any:
    """Replaces every Flax NNX ``Variable`` node of ``tree`` by its value; other trees as is."""
    nnx = sys.modules.get("flax.nnx")
    if nnx is None:
        return tree
    return jax.tree.map(lambda x: x.get_value() if is_variable(x) else x, tree, is_leaf=is_variable)


def has_variables(tree: Any) -> bool:
    """Whether ``tree`` holds a Flax NNX ``Variable`` node."""
    if "flax.nnx" not in sys.modules:
        return False
    return any(is_variable(x) for x in jax.tree.leaves(tree, is_leaf=is_variable))


def _key_to_str(key: Any) -> str:
    if isinstance(key, jax.tree_util.DictKey):
        return str(key.key)
    if isinstance(key, jax.tree_util.GetAttrKey):
        return key.name
    if isinstance(key, jax.tree_util.SequenceKey):
        return str(key.idx)
    if isinstance(key, jax.tree_util.FlattenedIndexKey):
        return str(key.key)
    return str(key)


def path_to_str(key_path: Sequence[Any]) -> str:
    """Joins a JAX key path into a ``'/'``-separated parameter path.

    Args:
      key_path: A key path as returned by ``jax.tree_util.tree_flatten_with_path``.

    Returns:
      The path string, e.g. ``'NFNet/~/linear/w'`` for Haiku parameters.
    """
    return "/".join(_key_to_str(k) for k in key_path)


def param_paths(params: Any) -> list[str]:
    """Returns the path of every leaf of ``params``, in ``jax.tree.leaves`` order.

    Args:
      params: Any pytree of parameters (Flax NNX Variables are unwrapped first).

    Returns:
      One ``'/'``-joined path string per leaf.
    """
    flat = jax.tree_util.tree_flatten_with_path(unwrap_variables(params))[0]
    return [path_to_str(p) for p, _ in flat]


# A glob written where a regex is expected ('*' first or after '/', '**'), and the reverse.
_LOOKS_LIKE_GLOB = re.compile(r"(^|/)\*|\*\*")
_LOOKS_LIKE_REGEX = re.compile(r"\.[*+?]|\\|[()|^$+{}]")
_GLOB_HINT = (
    " It looks like a glob: pass syntax='glob', or write '.*' for any characters in a regex."
)


def _single_dots(pattern: str) -> list[int]:
    """Positions of the regex's unescaped '.' outside classes and not before a quantifier."""
    dots, i, in_class = [], 0, False
    while i < len(pattern):
        c = pattern[i]
        if c == "\\":
            i += 2
            continue
        if in_class:
            in_class = c != "]"
        elif c == "[":
            in_class = True
        elif c == "." and pattern[i + 1 : i + 2] not in ("*", "+", "?", "{"):
            dots.append(i)
        i += 1
    return dots


def _regex_matcher(pattern: str, what: str) -> Callable[[str], bool]:
    try:
        matcher = re.compile(pattern).fullmatch
    except re.error as err:
        hint = _GLOB_HINT if _LOOKS_LIKE_GLOB.search(pattern) else ""
        raise ValueError(
            f"{what} pattern {pattern!r} is not a valid regular expression ({err}).{hint}"
        ) from None
    dots = set(_single_dots(pattern))
    if not dots:
        return lambda path: matcher(path) is not None
    # The same pattern where each single '.' cannot match '/': a path that only the loose one
    # matches was matched by reading '.' as a path separator ("params.Dense_0.kernel").
    strict = re.compile("".join("[^/]" if i in dots else c for i, c in enumerate(pattern)))
    slashes = "".join("/" if i in dots else c for i, c in enumerate(pattern))

    def match(path: str) -> bool:
        if matcher(path) is None:
            return False
        if strict.fullmatch(path) is None:
            raise ValueError(
                f"{what} pattern {pattern!r} matches {path!r} only because '.' matches '/' "
                f"in a regex: parameter paths are '/'-joined, so write {slashes!r} (or '\\.' "
                "for a literal dot)."
            )
        return True

    return match


def _compile_patterns(
    patterns: str | Sequence[str], syntax: str, what: str = "mask"
) -> list[tuple[str, Callable[[str], bool]]]:
    if isinstance(patterns, str):
        patterns = [patterns]
    for p in patterns:
        if not isinstance(p, str):
            raise ValueError(f"{what} patterns must be strings, got {p!r}")
    if syntax == "regex":
        return [(p, _regex_matcher(p, what)) for p in patterns]
    if syntax == "glob":
        return [(p, lambda s, p=p: fnmatch.fnmatchcase(s, p)) for p in patterns]
    raise ValueError(f"syntax must be 'regex' or 'glob', got {syntax!r}")


def _match_all(
    paths: list[str], patterns: str | Sequence[str], syntax: str, what: str
) -> list[bool]:
    """Whether each path matches any pattern; every pattern must match at least one path."""
    compiled = _compile_patterns(patterns, syntax, what)
    hits = [False] * len(paths)
    unmatched = []
    for text, matcher in compiled:
        matched = False
        for i, path in enumerate(paths):
            if matcher(path):
                hits[i] = True
                matched = True
        if not matched:
            unmatched.append(text)
    if unmatched:
        listing = "\n  ".join(paths) if paths else "(the tree has no leaves)"
        hint = ""
        if syntax == "glob" and any(_LOOKS_LIKE_REGEX.search(p) for p in unmatched):
            hint = " They look like regular expressions: pass syntax='regex' (the default)."
        raise ValueError(
            f"{what} pattern(s) {unmatched} ({syntax}, full match) matched no parameter.{hint} "
            f"Available parameter paths:\n  {listing}"
        )
    return hits


def mask_from_patterns(
    params: Any,
    *,
    exclude: str | Sequence[str] = (),
    include: str | Sequence[str] | None = None,
    syntax: str = "regex",
) -> Mask:
    """Builds a mask (True = selected, e.g. clipped) from parameter-path patterns.

    A leaf is selected when ``include`` is None or its path matches one of the ``include``
    patterns, and its path matches none of the ``exclude`` patterns. Patterns must match the
    whole path (``re.fullmatch`` for ``'regex'``, ``fnmatch.fnmatchcase`` for ``'glob'``,
    where ``*`` also matches ``/``). A pattern that matches no parameter raises, so a typo
    never silently turns into "clip everything".

    Args:
      params: The parameter pytree.
      exclude: Pattern(s) of paths to leave out, e.g. ``r'NFNet/~/linear/w'``.
      include: Optional pattern(s) restricting the selection to matching paths.
      syntax: ``'regex'`` or ``'glob'``.

    Returns:
      A pytree of Python bools with the structure of ``params``.

    Raises:
      ValueError: If a pattern matches no parameter (the message lists every path), or
        ``syntax`` is unknown.
    """
    leaves, treedef = jax.tree.flatten(params)
    paths = param_paths(params)
    selected = [True] * len(leaves)
    if include is not None:
        selected = _match_all(paths, include, syntax, "include")
    excluded = _match_all(paths, exclude, syntax, "exclude") if exclude else [False] * len(paths)
    return jax.tree.unflatten(
        treedef, [s and not e for s, e in zip(selected, excluded, strict=True)]
    )


def _is_step_count(x: Any) -> bool:
    """A scalar integer array: what optax.inject_hyperparams passes to a "schedule"."""
    return isinstance(x, jax.Array) and np.ndim(x) == 0 and np.issubdtype(x.dtype, np.integer)


INJECT_HYPERPARAMS_HINT = (
    "optax.inject_hyperparams calls every function argument as a schedule (with the step "
    "count): pass static_args=('mask', 'unit_axis') to it"
)


@dataclasses.dataclass(frozen=True)
class PathMask:
    """A mask function (``params -> pytree of bools``) from path patterns, see `exclude_paths`.

    Attributes:
      exclude: the patterns of the paths to leave out.
      syntax: ``'regex'`` or ``'glob'``.
    """

    exclude: tuple[str, ...]
    syntax: str = "regex"

    def __post_init__(self) -> None:
        if not self.exclude:
            raise ValueError("exclude_paths needs at least one pattern")
        _compile_patterns(self.exclude, self.syntax, "exclude")  # Fail early on a bad one.

    def __call__(self, params: Any) -> Mask:
        if _is_step_count(params):
            raise TypeError(
                f"The mask exclude_paths{self.exclude!r} was called with a step count, not "
                f"with parameters: {INJECT_HYPERPARAMS_HINT}."
            )
        return mask_from_patterns(params, exclude=self.exclude, syntax=self.syntax)


def exclude_paths(*patterns: str, syntax: str = "regex") -> PathMask:
    """Returns a mask function selecting every leaf except those matching ``patterns``.

    Use it directly as the ``mask`` of ``agc.adaptive_grad_clip`` (or any option taking a
    mask function, such as ``optax.masked``); the patterns are checked against the actual
    parameter tree when the optimizer is initialised. An invalid pattern raises here.

    Args:
      *patterns: Path patterns to leave out (see :func:`mask_from_patterns`).
      syntax: ``'regex'`` or ``'glob'``.

    Returns:
      A :class:`PathMask`: a function ``params -> pytree of bools``.
    """
    return PathMask(tuple(patterns), syntax)


def structure_diff(a: Any, b: Any, a_name: str, b_name: str) -> str:
    """Which paths only `a` or only `b` has (at most 10 each), for error messages."""
    a_paths = set(param_paths(a))
    b_paths = set(param_paths(b))
    only_a = sorted(a_paths - b_paths)
    only_b = sorted(b_paths - a_paths)
    parts = []
    if only_a:
        parts.append(f"only in {a_name}: {only_a[:10]}" + (" ..." if len(only_a) > 10 else ""))
    if only_b:
        parts.append(f"only in {b_name}: {only_b[:10]}" + (" ..." if len(only_b) > 10 else ""))
    if not parts:
        parts.append(f"{a_name}: {jax.tree.structure(a)}; {b_name}: {jax.tree.structure(b)}")
    return "; ".join(parts)


def per_leaf(option: Any, params: Any, what: str, owner: str = "") -> list[Any]:
    """Broadcasts ``option`` (a pytree that is a prefix of ``params``) to one value per leaf.

    ``None`` entries of ``option`` are values, not empty subtrees.

    Args:
      option: a pytree with the structure of ``params`` or a prefix of it, or a function
        ``params -> such a pytree``.
      params: the parameter pytree.
      what: the option's name in error messages ("mask", "unit_axis").
      owner: the caller's name, prefixed to error messages ("adaptive_grad_clip").

    Returns:
      One value per leaf of ``params``, in ``jax.tree.leaves`` order.

    Raises:
      ValueError: if ``option`` does not fit ``params`` (the message lists the paths that
        only one of them has).
    """
    if callable(option):
        option = option(params)
    option = unwrap_variables(option)
    params = unwrap_variables(params)
    if _is_step_count(option):
        raise ValueError(
            f"{owner + ': ' if owner else ''}the {what} is a scalar integer JAX array, not a "
            f"static value or tree of them ({INJECT_HYPERPARAMS_HINT})"
        )
    is_none = lambda x: x is None
    try:
        expanded = jax.tree.map(
            lambda v, sub: jax.tree.map(lambda _: v, sub), option, params, is_leaf=is_none
        )
    except (ValueError, TypeError) as err:
        raise ValueError(
            f"{owner + ': ' if owner else ''}the {what} tree does not match the params tree "
            "(it must have the same structure as params, or be a prefix of it): "
            f"{structure_diff(option, params, what, 'params')}"
        ) from err
    return jax.tree.structure(params).flatten_up_to(expanded)


def mask_values(mask: MaskOrFn, params: Any, what: str = "mask", owner: str = "") -> list[bool]:
    """One static bool per leaf of ``params`` from a mask (see `per_leaf`); None: all True.

    Raises:
      ValueError: if the mask does not fit ``params``, or an entry is a traced value.
    """
    paths = param_paths(params)
    if mask is None:
        return [True] * len(paths)
    values = per_leaf(mask, params, what, owner)
    out = []
    for path, value in zip(paths, values, strict=True):
        try:
            out.append(bool(value))
        except jax.errors.ConcretizationTypeError as err:
            raise ValueError(
                f"{owner + ': ' if owner else ''}the {what} entry for {path!r} is a traced "
                "value; masks "
                "must be static Python bools (build them from the tree's paths, not its "
                "values)"
            ) from err
    return out
