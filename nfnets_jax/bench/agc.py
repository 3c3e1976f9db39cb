"""AGC benchmark: AGC and the reference optimizer update on a real NFNet parameter tree.

Times, jitted and round-robin (`timing.round_robin`): this project's AGC alone (overflow-safe
norms, the default, and `overflow_safe=False`), optax's
`adaptive_grad_clip` alone, plain Nesterov SGD + `apply_updates`, the reference optimizer
(AGC -> weight decay -> Nesterov SGD, `optim.make_optimizer`) + `apply_updates`, and,
to put them in perspective, the trainer's forward + backward pass (`step.jax_program`'s
"grad"). Parameter values are init-like random numbers (AGC's cost does not depend on them)
on the variant's exact tree (`registry.param_shapes`: 71.5M parameters for F0).
"""

from __future__ import annotations

import statistics
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax

from nfnets_jax import agc, optim, treepaths
from nfnets_jax.bench import step, timing
from nfnets_jax.models import registry


def random_params(shapes: Any, seed: int = 0) -> Any:
    """Init-like random values: kernels ~ N(0, 0.01^2), gains 1, biases and skip gains 0."""
    leaves, treedef = jax.tree.flatten(shapes)
    keys = jax.random.split(jax.random.PRNGKey(seed), len(leaves))
    values = []
    for path, leaf, key in zip(treepaths.param_paths(shapes), leaves, keys, strict=True):
        name = path.rsplit("/", 1)[-1]
        if name == "w":
            values.append(0.01 * jax.random.normal(key, leaf.shape, leaf.dtype))
        else:
            fill = jnp.ones if name == "gain" else jnp.zeros
            values.append(fill(leaf.shape, leaf.dtype))
    return jax.tree.unflatten(treedef, values)


def _with_apply(tx: optax.GradientTransformation) -> Callable[..., Any]:
    def update(grads, state, params):
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    return update


def run(
    variant: str = "F0",
    batch_size: int = 8,
    image_size: int = 128,
    repeats: int = 10,
    train_step: bool = True,
) -> dict[str, Any]:
    """Times the cases of the module docstring on `variant`'s parameter tree.

    Returns:
      {"variant", "num_params", "num_leaves", "rows": [{"name", "median_s", "compile_s",
       "share_of_train_step" (None without the train step)}], "environment"}.
    """
    params = random_params(registry.param_shapes("NFNet", variant=variant))
    key = jax.random.PRNGKey(1)
    grads = jax.tree.map(lambda p: 0.01 * jax.random.normal(key, p.shape), params)
    schedule = optim.warmup_cosine_schedule(1.6, 10, 100)
    ours = agc.adaptive_grad_clip(0.01, mask=registry.agc_mask)
    plain = agc.adaptive_grad_clip(0.01, mask=registry.agc_mask, overflow_safe=False)
    theirs = optax.adaptive_grad_clip(0.01)
    sgd = optax.sgd(schedule, momentum=0.9, nesterov=True)
    reference = optim.make_optimizer(learning_rate=schedule)
    cases = [
        ("AGC alone (nfnets_jax.agc)", ours.update, (grads, ours.init(params), params)),
        (
            "AGC alone (nfnets_jax.agc, overflow_safe=False)",
            plain.update,
            (grads, plain.init(params), params),
        ),
        (
            "AGC alone (optax.adaptive_grad_clip)",
            theirs.update,
            (grads, theirs.init(params), params),
        ),
        (
            "Nesterov SGD + apply_updates (no AGC/wd)",
            _with_apply(sgd),
            (grads, sgd.init(params), params),
        ),
        (
            "reference optimizer + apply_updates",
            _with_apply(reference),
            (grads, reference.init(params), params),
        ),
    ]
    if train_step:
        config = step.BenchmarkConfig(
            variant=variant, batch_size=batch_size, train_resolution=image_size, modes=("grad",)
        )
        fn, args, _, _ = step.jax_program(config, "grad", config.model(), jax.devices()[0])
        cases.append((f"train step fwd+bwd (batch {batch_size}, {image_size} px, f32)", fn, args))
    timed, compile_s = [], []
    for name, fn, args in cases:
        compiled, seconds, _ = timing.compile_with_memory(fn, args)
        timed.append(timing.Timed(name, lambda _, c=compiled, a=args: c(*a)))
        compile_s.append(seconds)
    timing.round_robin(timed, repeats, warmup=1)
    train_s = statistics.median(timed[-1].times) if train_step else None
    rows = [
        {
            "name": t.name,
            "median_s": statistics.median(t.times),
            "compile_s": c,
            "share_of_train_step": statistics.median(t.times) / train_s if train_s else None,
        }
        for t, c in zip(timed, compile_s)
    ]
    return {
        "variant": variant,
        "num_params": sum(x.size for x in jax.tree.leaves(params)),
        "num_leaves": len(jax.tree.leaves(params)),
        "rows": rows,
        "environment": timing.environment(),
    }


def format_table(result: dict[str, Any]) -> str:
    """The rows of `run` as a text table."""
    header = ("what", "ms (median)", "compile s", "vs train step")
    rows = [
        (
            r["name"],
            f"{1e3 * r['median_s']:.1f}",
            f"{r['compile_s']:.1f}",
            "n/a" if r["share_of_train_step"] is None else f"{r['share_of_train_step']:.1%}",
        )
        for r in result["rows"]
    ]
    env = result["environment"]
    return (
        f"{result['variant']}: {result['num_params']:,} parameters in "
        f"{result['num_leaves']} leaves; backend {env['backend']}, {env['jax_devices']} "
        f"device(s)\n" + timing.text_table(header, rows)
    )
