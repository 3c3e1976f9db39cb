"""Command line for checkpoints: inspect, download, convert.

  python -m nfnets_jax.checkpoints list                       # the zoo, with md5 and top-1
  python -m nfnets_jax.checkpoints fetch F0                   # download + verify into the cache
  python -m nfnets_jax.checkpoints info F0                    # variant, shapes check, size
  python -m nfnets_jax.checkpoints to-npz F0 /tmp/F0.npz      # released pickle -> safe .npz
  python -m nfnets_jax.checkpoints to-timm F0 /tmp/dm_nfnet_f0.pth
  python -m nfnets_jax.checkpoints from-timm dm_nfnet_f0.pth /tmp/f0.npz

Every input may be a zoo name or a path in any supported format (released pickle, .npz,
timm .pth); pickles are only ever read with the restricted loader.
"""

import argparse
import sys

import numpy as np

from nfnets_jax.checkpoints import released, timm_convert, tree, zoo


def _list(_: argparse.Namespace) -> None:
    print(f"{'name':<5} {'top-1':>6} {'top-5':>6}  {'md5':<32}  url")
    for e in zoo.ZOO.values():
        note = f"  ({e.note})" if e.note else ""
        print(f"{e.name:<5} {e.top1:6.1f} {e.top5:6.1f}  {e.md5}  {e.url}{note}")
    print(f"cache: {zoo.cache_dir()} (set ${zoo.CACHE_ENV} to change)")


def _fetch(args: argparse.Namespace) -> None:
    print(zoo.fetch(args.name))


def _info(args: argparse.Namespace) -> None:
    params = released.load_params(args.checkpoint, progress=sys.stderr)
    arch = tree.describe(params)
    count = sum(int(np.prod(np.shape(v))) for g in params.values() for v in g.values())
    kwargs = tree.model_kwargs(params)
    tree.validate(params, kwargs.pop("variant"), kwargs.pop("num_classes"), **kwargs)
    print(f"format: {released.sniff_format(zoo.resolve(args.checkpoint))}")
    print(f"model: {tree.model_kwargs(params)}")
    print(f"depths {list(arch.depths)}, widths {list(arch.widths)}, {arch.num_classes} classes")
    print(f"{len(params)} modules, {count:,} parameters; matches nfnet.NFNet exactly")


def _to_npz(args: argparse.Namespace) -> None:
    print(released.save_npz(released.load_params(args.checkpoint), args.output))


def _to_timm(args: argparse.Namespace) -> None:
    params = released.load_params(args.checkpoint)
    print(timm_convert.save_timm_checkpoint(params, args.output))


def main(argv: list[str] | None = None) -> None:
    """Parses `argv` and runs the sub-command."""
    parser = argparse.ArgumentParser(
        prog="python -m nfnets_jax.checkpoints", description=__doc__.split("\n")[0]
    )
    commands = parser.add_subparsers(required=True, dest="command")
    commands.add_parser("list", help="the released checkpoints").set_defaults(fn=_list)
    fetch = commands.add_parser("fetch", help="download and verify a zoo checkpoint")
    fetch.add_argument("name")
    fetch.set_defaults(fn=_fetch)
    info = commands.add_parser("info", help="detect and validate a checkpoint's model")
    info.add_argument("checkpoint")
    info.set_defaults(fn=_info)
    for name, fn, help_text in (
        ("to-npz", _to_npz, "write as .npz (no pickle)"),
        ("from-timm", _to_npz, "timm .pth -> .npz"),
        ("to-timm", _to_timm, "write as a timm state dict (.pth)"),
    ):
        sub = commands.add_parser(name, help=help_text)
        sub.add_argument("checkpoint")
        sub.add_argument("output")
        sub.set_defaults(fn=fn)
    args = parser.parse_args(argv)
    args.fn(args)


if __name__ == "__main__":
    main()
