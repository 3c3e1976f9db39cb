"""Parameter paths of any pytree, masks built from path patterns, per-leaf options.

Generic utilities, shared by the AGC transform (`agc`), the reference optimizer (`optim`)
and the model registry's NFNet mask; nothing here knows about a particular model.

Parameter paths are the pytree key path joined with ``/``. For Haiku's two-level dicts this
is ``'<module path>/<param name>'``, e.g. ``'NFNet/~/linear/w'``; for Flax
``{'params': {'Dense_0': {'kernel': ...}}}`` it is ``'params/Dense_0/kernel'``; list and
tuple entries contribute their index, dataclass / attribute nodes their attribute name.

Per-leaf options (a mask, a unit axis) are pytrees with the structure of the parameters or
a prefix of it, or functions of the parameters returning one; `per_leaf` broadcasts them to
one value per leaf.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Callable, Sequence
from typing import Any

import jax

Mask = Any  # pytree of bools (or a prefix of the params tree).
MaskOrFn = Mask | Callable[[Any], Mask] | None


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
      params: Any pytree of parameters.

    Returns:
      One ``'/'``-joined path string per leaf.
    """
    return [path_to_str(p) for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]]


def _compile_patterns(patterns: str | Sequence[str], syntax: str) -> list[tuple[str, Any]]:
    if isinstance(patterns, str):
        patterns = [patterns]
    if syntax == "regex":
        return [(p, re.compile(p).fullmatch) for p in patterns]
    if syntax == "glob":
        return [(p, lambda s, p=p: fnmatch.fnmatchcase(s, p)) for p in patterns]
    raise ValueError(f"syntax must be 'regex' or 'glob', got {syntax!r}")


def _match_all(
    paths: list[str], patterns: str | Sequence[str], syntax: str, what: str
) -> list[bool]:
    """Whether each path matches any pattern; every pattern must match at least one path."""
    compiled = _compile_patterns(patterns, syntax)
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
        raise ValueError(
            f"{what} pattern(s) {unmatched} ({syntax}, full match) matched no parameter. "
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


def exclude_paths(*patterns: str, syntax: str = "regex") -> Callable[[Any], Mask]:
    """Returns a mask function selecting every leaf except those matching ``patterns``.

    Use it directly as the ``mask`` of ``agc.adaptive_grad_clip`` (or any option taking a
    mask function); the patterns are checked against the actual parameter tree when the
    optimizer is initialised.

    Args:
      *patterns: Path patterns to leave out (see :func:`mask_from_patterns`).
      syntax: ``'regex'`` or ``'glob'``.

    Returns:
      A function ``params -> pytree of bools``.
    """
    if not patterns:
        raise ValueError("exclude_paths needs at least one pattern")
    return lambda params: mask_from_patterns(params, exclude=patterns, syntax=syntax)


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
