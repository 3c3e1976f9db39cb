"""Benchmarks AGC and the reference optimizer update on the real F0 parameter tree.

Times (jitted, after warm-up, median over repeats) AGC alone (this project's and optax's),
the full reference optimizer update (AGC -> weight decay -> Nesterov SGD, plus
``apply_updates``), plain Nesterov SGD for comparison, and one F0 training step
(forward + backward, float32) to put the optimizer's cost in perspective.

Usage::

    python scripts/benchmark_agc.py                       # F0, batch 8, 128 px, on CPU
    python scripts/benchmark_agc.py --skip_train_step     # optimizer timings only
    python scripts/benchmark_agc.py --batch_size 8 --image_size 128 --repeats 10

Parameter values are random (AGC's cost does not depend on them); the tree has F0's exact
paths and shapes (71.5M parameters), obtained with ``jax.eval_shape`` of the model's init.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from typing import Any

import haiku as hk
import jax
import jax.numpy as jnp
import optax

from nfnets_jax import agc, nfnet, optim


def time_interleaved(
    cases: list[tuple[str, Callable[..., Any], tuple[Any, ...]]], repeats: int
) -> list[tuple[str, float, float]]:
    """Times each jitted case; returns (name, median s per call, first call s incl. compile).

    After a warm-up, the cases run round-robin so that load from other processes on a
    shared machine affects them alike.
    """
    firsts = []
    for _, fn, args in cases:
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        firsts.append(time.perf_counter() - start)
        jax.block_until_ready(fn(*args))
    times: list[list[float]] = [[] for _ in cases]
    for _ in range(repeats):
        for i, (_, fn, args) in enumerate(cases):
            start = time.perf_counter()
            jax.block_until_ready(fn(*args))
            times[i].append(time.perf_counter() - start)
    return [
        (name, statistics.median(t), first)
        for (name, _, _), t, first in zip(cases, times, firsts, strict=True)
    ]


def make_forward(variant: str) -> hk.Transformed:
    return hk.transform(lambda x: nfnet.NFNet(variant=variant)(x, is_training=True))


def random_params(shapes: Any, seed: int = 0) -> Any:
    """Init-like random values: kernels ~ N(0, 0.01^2), gains 1, biases and skip gains 0."""
    paths = agc.param_paths(shapes)
    leaves, treedef = jax.tree.flatten(shapes)
    keys = jax.random.split(jax.random.PRNGKey(seed), len(leaves))
    values = []
    for path, leaf, key in zip(paths, leaves, keys, strict=True):
        name = path.rsplit("/", 1)[-1]
        if name == "w":
            values.append(0.01 * jax.random.normal(key, leaf.shape, leaf.dtype))
        elif name == "gain":
            values.append(jnp.ones(leaf.shape, leaf.dtype))
        else:
            values.append(jnp.zeros(leaf.shape, leaf.dtype))
    return jax.tree.unflatten(treedef, values)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--variant", default="F0")
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--image_size", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--train_repeats", type=int, default=3)
    parser.add_argument("--skip_train_step", action="store_true")
    args = parser.parse_args()

    forward = make_forward(args.variant)
    images = jnp.zeros((args.batch_size, args.image_size, args.image_size, 3), jnp.float32)
    shapes = jax.eval_shape(forward.init, jax.random.PRNGKey(0), images[:1])
    params = random_params(shapes)
    grads = jax.tree.map(lambda p: 0.01 * jax.random.normal(jax.random.PRNGKey(1), p.shape), params)
    n_params = sum(x.size for x in jax.tree.leaves(params))
    print(
        f"{args.variant}: {n_params:,} parameters in {len(jax.tree.leaves(params))} leaves; "
        f"backend {jax.default_backend()}, {jax.device_count()} device(s)"
    )

    ours = agc.adaptive_grad_clip(0.01, mask=agc.nfnet_mask)
    theirs = optax.adaptive_grad_clip(0.01)
    reference = optim.make_optimizer(learning_rate=optim.warmup_cosine_schedule(1.6, 10, 100))
    plain_sgd = optax.sgd(optim.warmup_cosine_schedule(1.6, 10, 100), momentum=0.9, nesterov=True)

    def full_update(tx: optax.GradientTransformation) -> Callable[..., Any]:
        def step(grads, state, params):
            updates, state = tx.update(grads, state, params)
            return optax.apply_updates(params, updates), state

        return jax.jit(step)

    cases = [
        ("AGC alone (nfnets_jax.agc)", jax.jit(ours.update), (grads, ours.init(params), params)),
        (
            "AGC alone (optax.adaptive_grad_clip)",
            jax.jit(theirs.update),
            (grads, theirs.init(params), params),
        ),
        (
            "Nesterov SGD + apply_updates (no AGC/wd)",
            full_update(plain_sgd),
            (grads, plain_sgd.init(params), params),
        ),
        (
            "reference optimizer + apply_updates",
            full_update(reference),
            (grads, reference.init(params), params),
        ),
    ]
    rows = time_interleaved(cases, args.repeats)

    train = None
    if not args.skip_train_step:
        labels = jax.nn.one_hot(jnp.arange(args.batch_size) % 1000, 1000)

        def loss_fn(params, rng, images):
            logits = forward.apply(params, rng, images)["logits"]
            return optax.softmax_cross_entropy(logits, labels).mean()

        grad_step = jax.jit(jax.value_and_grad(loss_fn))
        name = f"train step fwd+bwd (batch {args.batch_size}, {args.image_size} px, f32)"
        rows += time_interleaved(
            [(name, grad_step, (params, jax.random.PRNGKey(2), images))], args.train_repeats
        )
        train = rows[-1][1]

    print()
    header = f"| {'what':<55} | {'ms (median)':>12} | {'1st call s':>10} | {'vs train step':>13} |"
    print(header)
    print("|" + "-" * 57 + "|" + "-" * 13 + ":|" + "-" * 11 + ":|" + "-" * 14 + ":|")
    for name, median, first in rows:
        ratio = f"{median / train:.1%}" if train else "n/a"
        print(f"| {name:<55} | {median * 1e3:>12.1f} | {first:>10.1f} | {ratio:>13} |")


if __name__ == "__main__":
    main()
