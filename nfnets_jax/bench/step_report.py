"""The step benchmark's report: one row per measurement, JAX / timm ratios, the optimizer's
share of the training step, and the text table (`step.run` builds the result with these).
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from nfnets_jax.bench import timing
from nfnets_jax.models import layers

if TYPE_CHECKING:
    from nfnets_jax.bench.step import Prepared


def row(item: Prepared) -> dict[str, Any]:
    config, mode, jax_side = item.config, item.mode, item.framework == "jax"
    times = item.timed.times
    median = statistics.median(times)
    flops = None
    if mode in ("inference", "train", "grad"):
        flops = 2 * item.macs * config.batch_size * (1 if mode == "inference" else 3) / median
    peak = timing.peak_flops(item.device_kind, config.dtype)
    return {
        "framework": item.framework,
        "mode": mode,
        "config": item.config_index,
        "variant": config.variant,
        "batch_size": config.batch_size,
        "resolution": config.resolution(mode),
        "dtype": config.dtype,
        "group_conv": layers.resolve_group_conv(config.group_conv) if jax_side else "-",
        "conv_grad": layers.resolve_conv_grad(config.conv_grad) if jax_side else "-",
        "remat": config.remat and jax_side,
        "donate": config.donate and jax_side,
        "compile_s": item.compile_s,
        "time_s": median,
        "min_time_s": min(times),
        "times_s": list(times),
        "images_per_s": config.batch_size / median if mode != "optimizer" else None,
        "macs_per_image": item.macs,
        "flops_per_s": flops,
        "mfu": flops / peak if (flops is not None and peak) else None,
        "peak_memory_bytes": item.memory[0],
        "memory_source": item.memory[1],
        "xla_memory_bytes": item.xla_memory_bytes,
        "device": item.device_kind,
    }


def ratios(
    jax_items: Sequence[Prepared], timm_for: dict[int, list[Prepared]]
) -> list[dict[str, Any]]:
    """JAX / timm per (config, mode): ratio of medians, median per-round ratio, of minima."""
    by_key = {(p.config_index, p.mode): p for p in jax_items}
    out = []
    for index, timm_items in timm_for.items():
        for t in timm_items:
            j = by_key.get((index, t.mode))
            if j is None:
                continue
            jt, tt = j.timed.times, t.timed.times
            out.append(
                {
                    "config": index,
                    "mode": t.mode,
                    "group_conv": layers.resolve_group_conv(j.config.group_conv),
                    "conv_grad": layers.resolve_conv_grad(j.config.conv_grad),
                    "remat": j.config.remat,
                    "donate": j.config.donate,
                    "jax_s": statistics.median(jt),
                    "timm_s": statistics.median(tt),
                    "ratio": statistics.median(jt) / statistics.median(tt),
                    "paired_ratio": statistics.median([a / b for a, b in zip(jt, tt)]),
                    "min_ratio": min(jt) / min(tt),
                }
            )
    return out


def optimizer_shares(jax_items: Sequence[Prepared]) -> list[dict[str, Any]]:
    """The optimizer's share of the train step, per config that measured both."""
    shares = []
    for index in sorted({p.config_index for p in jax_items}):
        by_mode = {
            p.mode: statistics.median(p.timed.times) for p in jax_items if p.config_index == index
        }
        if "optimizer" not in by_mode or "train" not in by_mode:
            continue
        config = next(p.config for p in jax_items if p.config_index == index)
        share = {
            "config": index,
            "group_conv": layers.resolve_group_conv(config.group_conv),
            "conv_grad": layers.resolve_conv_grad(config.conv_grad),
            "remat": config.remat,
            "optimizer_s": by_mode["optimizer"],
            "train_s": by_mode["train"],
            "share": by_mode["optimizer"] / by_mode["train"],
        }
        if "grad" in by_mode:
            share["grad_s"] = by_mode["grad"]
            share["train_minus_grad_share"] = 1 - by_mode["grad"] / by_mode["train"]
        shares.append(share)
    return shares


TABLE_HEADER = (
    "framework,mode,variant,batch,px,dtype,group_conv,conv_grad,remat,donate,compile s,"
    "time s,min s,img/s,GFLOP/s,MFU,peak mem MiB,XLA mem MiB"
)


def _table_row(r: dict[str, Any]) -> list[str]:
    """The cells of one row of `format_table` (columns of `TABLE_HEADER`)."""
    f = timing.fmt
    xla_mib = r["xla_memory_bytes"] and r["xla_memory_bytes"] / 2**20
    return [r["framework"], r["mode"], r["variant"], str(r["batch_size"]), str(r["resolution"]),
            r["dtype"], r["group_conv"], r["conv_grad"], f(r["remat"]), f(r["donate"]),
            f(r["compile_s"]), f(r["time_s"], digits=4), f(r["min_time_s"], digits=4),
            f(r["images_per_s"]), f(r["flops_per_s"], 1e9), f(r["mfu"]),
            f"{r['peak_memory_bytes'] / 2**20:.0f}", f(xla_mib, digits=4)]  # fmt: skip


def format_table(result: dict[str, Any]) -> str:
    """Plain-text table of `run`'s result (times are medians; all repeats in the JSON)."""
    f = timing.fmt
    out = [timing.text_table(TABLE_HEADER.split(","), [_table_row(r) for r in result["rows"]])]
    for r in result["ratios"]:
        out.append(
            f"ratio jax/timm {r['mode']} (group_conv={r['group_conv']}, "
            f"conv_grad={r['conv_grad']}, remat={f(r['remat'])}, "
            f"donate={f(r['donate'])}): {r['ratio']:.3f} ({r['jax_s']:.4g} s / "
            f"{r['timm_s']:.4g} s); median per-round ratio {r['paired_ratio']:.3f}; "
            f"ratio of minima {r['min_ratio']:.3f}"
        )
    for s in result["optimizer_share"]:
        line = (
            f"optimizer (AGC + weight decay + SGD) alone / train step "
            f"(group_conv={s['group_conv']}, conv_grad={s['conv_grad']}, "
            f"remat={f(s['remat'])}): {100 * s['share']:.2f}%"
        )
        if "train_minus_grad_share" in s:
            line += f"; 1 - grad/train: {100 * s['train_minus_grad_share']:.2f}%"
        out.append(line)
    if result["rows"]:
        out.append(
            f"times: median of {len(result['rows'][0]['times_s'])} round-robin rounds "
            f"(all in the JSON); peak mem: {result['rows'][0]['memory_source']}; XLA "
            "mem: the compiled executable's arguments + outputs + temporaries"
        )
    return "\n".join(out)
