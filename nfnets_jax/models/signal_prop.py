"""Signal propagation at initialisation (Brock, De, Smith 2021, "SPPs").

For N(0, 1) inputs, per residual block: the average channel squared mean and average
channel variance of the block's output, and the variance of its residual branch, beside the
variance the beta/alpha bookkeeping expects. All skip gains are set to 1 first: at their
zero initialisation every block reduces to its shortcut and the plot would show nothing.
"""

from collections.abc import Sequence

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np

from nfnets_jax import files


def expected_output_vars(depths: Sequence[int], alpha: float) -> np.ndarray:
    """Expected variance of each block's output: resets to 1 + alpha^2 at each stage's
    first block, then grows by alpha^2 per block."""
    out, var = [], 1.0
    for depth in depths:
        for block_index in range(depth):
            var = (1.0 if block_index == 0 else var) + alpha**2
            out.append(var)
    return np.asarray(out)


def measure(
    model: hk.Transformed,
    depths: Sequence[int],
    alpha: float = 0.2,
    resolution: int = 64,
    batch: int = 8,
    seed: int = 0,
    skip_gain: float = 1.0,
) -> dict[str, np.ndarray]:
    """Per-block signal statistics of a freshly initialised model.

    Args:
      model: the network from `registry.build_forward` (an NFNet or NFResNet), e.g.
        `registry.build_forward("NFNet", variant="F0")`.
      depths: the model's depth pattern (for the expected-variance curve).
      alpha: the model's alpha.
      resolution, batch: N(0, 1) input size.
      seed: for parameters and inputs.
      skip_gain: value every `skip_gain` parameter is set to before measuring.

    Returns:
      Arrays of length num_blocks: "avg_sq_mean", "avg_var", "res_var" (residual branch),
      "expected_var"; and scalars "stem_avg_sq_mean", "stem_avg_var".
    """
    init_rng, data_rng = jax.random.split(jax.random.PRNGKey(seed))
    x = jax.random.normal(data_rng, (batch, resolution, resolution, 3), jnp.float32)
    params = jax.jit(model.init)(init_rng, x)
    params = {
        module: {
            name: (jnp.full_like(v, skip_gain) if name == "skip_gain" else v)
            for name, v in leaves.items()
        }
        for module, leaves in params.items()
    }
    apply = lambda p, images: model.apply(p, None, images, False, return_metrics=True)
    outputs = jax.jit(apply)(params, x)
    num_blocks = sum(depths)
    stat = lambda key: np.asarray([outputs[f"block_{i}/{key}"] for i in range(num_blocks)])
    return {
        "avg_sq_mean": stat("avg_sq_mean"),
        "avg_var": stat("avg_var"),
        "res_var": stat("res_var"),
        "expected_var": expected_output_vars(depths, alpha),
        "stem_avg_sq_mean": np.asarray(outputs["stem/avg_sq_mean"]),
        "stem_avg_var": np.asarray(outputs["stem/avg_var"]),
    }


def plot(stats: dict[str, np.ndarray], path: str, title: str = "") -> None:
    """Writes the signal-propagation plot (three panels) as a PNG at `path`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    blocks = np.arange(1, len(stats["avg_var"]) + 1)
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    panels = [
        ("avg_sq_mean", "Average channel squared mean"),
        ("avg_var", "Average channel variance"),
        ("res_var", "Residual branch variance"),
    ]
    for ax, (key, label) in zip(axes, panels):
        ax.plot(blocks, stats[key], "o-", label="measured")
        if key == "avg_var":
            ax.plot(blocks, stats["expected_var"], "k--", label="expected (beta/alpha)")
        if key == "res_var":
            ax.axhline(1.0, color="k", linestyle="--", label="expected (1)")
        if key != "avg_sq_mean":
            ax.set_yscale("log")
        ax.set_xlabel("block")
        ax.set_title(label)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    with files.atomic_path(path, suffix=".png") as tmp:  # Local or gs://, never torn.
        fig.savefig(tmp, dpi=100)
    plt.close(fig)
