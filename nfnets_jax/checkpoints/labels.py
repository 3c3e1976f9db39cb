"""The 1000 ImageNet-1k class names, in the label order the released NFNets use.

The list ships as package data (`imagenet_labels.txt`): WordNet ids in the order of
tensorflow_datasets' `imagenet2012/labels.txt` (sorted ids, the usual ImageNet order), each
with its WordNet lemmas ("tench, Tinca tinca").
"""

import functools
import importlib.resources

NUM_CLASSES = 1000


@functools.cache
def _entries() -> tuple[tuple[str, str], ...]:
    text = (importlib.resources.files("nfnets_jax.checkpoints") / "imagenet_labels.txt").read_text(
        encoding="utf-8"
    )
    entries = tuple(
        tuple(line.split("\t", 1))
        for line in text.splitlines()
        if line and not line.startswith("#")
    )
    if len(entries) != NUM_CLASSES:
        raise RuntimeError(f"imagenet_labels.txt has {len(entries)} classes, expected 1000.")
    return entries


def imagenet_wnids() -> list[str]:
    """WordNet ids ("n01440764", ...) indexed by label."""
    return [wnid for wnid, _ in _entries()]


def imagenet_names(short: bool = False) -> list[str]:
    """Class names indexed by label: all lemmas, or only the first when `short`."""
    return [name.split(",")[0] if short else name for _, name in _entries()]
