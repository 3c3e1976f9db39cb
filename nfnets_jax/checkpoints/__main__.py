"""Command line for checkpoints: inspect, download, convert.

  python -m nfnets_jax.checkpoints list                       # the zoo, with md5 and top-1
  python -m nfnets_jax.checkpoints fetch F0                   # download + verify into the cache
  python -m nfnets_jax.checkpoints info F0                    # variant, shapes check, size
  python -m nfnets_jax.checkpoints to-npz F0 /tmp/F0.npz      # released pickle -> safe .npz
  python -m nfnets_jax.checkpoints to-timm F0 /tmp/dm_nfnet_f0.pth
  python -m nfnets_jax.checkpoints from-timm dm_nfnet_f0.pth /tmp/f0.npz

Every input may be a zoo name or a path in any supported format (released pickle, .npz,
timm .pth, training workdir); pickles are only ever read with the restricted loader.
"""

import sys

import numpy as np
from absl import app

from nfnets_jax import cli
from nfnets_jax.checkpoints import loading, released, timm_convert, tree, zoo


def _list() -> None:
    print(f"{'name':<5} {'top-1':>6} {'top-5':>6}  {'md5':<32}  url")
    for e in zoo.ZOO.values():
        note = f"  ({e.note})" if e.note else ""
        print(f"{e.name:<5} {e.top1:6.1f} {e.top5:6.1f}  {e.md5}  {e.url}{note}")
    print(f"cache: {zoo.cache_dir()} (set ${zoo.CACHE_ENV} to change)")


def _fetch(name: str) -> None:
    print(zoo.fetch(name))


def _info(checkpoint: str) -> None:
    params, kwargs = loading.load(checkpoint, progress=sys.stderr)
    arch = tree.describe(params)
    count = sum(int(np.prod(np.shape(v))) for g in params.values() for v in g.values())
    print(f"format: {loading.sniff_format(zoo.resolve(checkpoint))}")
    print(f"model: {kwargs}")
    print(f"depths {list(arch.depths)}, widths {list(arch.widths)}, {arch.num_classes} classes")
    print(f"{len(params)} modules, {count:,} parameters; matches nfnet.NFNet exactly")


def _to_npz(checkpoint: str, output: str) -> None:
    print(released.save_npz(loading.load_params(checkpoint), output))


def _to_timm(checkpoint: str, output: str) -> None:
    print(timm_convert.save_timm_checkpoint(loading.load_params(checkpoint), output))


# name: (function, its positional arguments, help)
COMMANDS = {
    "list": (_list, (), "the released checkpoints"),
    "fetch": (_fetch, ("name",), "download and verify a zoo checkpoint"),
    "info": (_info, ("checkpoint",), "detect and validate a checkpoint's model"),
    "to-npz": (_to_npz, ("checkpoint", "output"), "write as .npz (no pickle)"),
    "from-timm": (_to_npz, ("checkpoint", "output"), "timm .pth -> .npz"),
    "to-timm": (_to_timm, ("checkpoint", "output"), "write as a timm state dict (.pth)"),
}


def usage() -> str:
    """The list of sub-commands."""
    lines = ["usage: python -m nfnets_jax.checkpoints COMMAND [ARGS]", ""]
    for name, (_, args, help_text) in COMMANDS.items():
        lines.append(f"  {' '.join([name, *(a.upper() for a in args)]):<32} {help_text}")
    return "\n".join(lines)


def main(argv: list[str]) -> None:
    """Runs the sub-command named in `argv[1]` with the arguments after it."""
    if len(argv) < 2 or argv[1] not in COMMANDS:
        raise app.UsageError(
            usage() if len(argv) < 2 else f"Unknown command {argv[1]!r}.\n" + usage()
        )
    fn, arg_names, _ = COMMANDS[argv[1]]
    if len(argv) - 2 != len(arg_names):
        raise app.UsageError(
            f"{argv[1]} takes {len(arg_names)} argument(s): "
            f"{' '.join(a.upper() for a in arg_names) or '(none)'}.\n" + usage()
        )
    fn(*argv[2:])


if __name__ == "__main__":
    cli.run(main)
