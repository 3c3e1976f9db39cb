"""Config files: every field declared in default.py, the recipe's derived numbers, every
ImageNet variant traced through a full-width train step (jax.eval_shape, no compute) and run
for one real step at a reduced size on fake data, and a pmapped SAM + bfloat16 step of F6.
"""

import functools
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nfnets_jax import configlib, parallel
from nfnets_jax.checkpoints import released
from nfnets_jax.models import variants
from nfnets_jax.train import recipe, resume, steps

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = os.path.join(REPO, "configs")
IMAGENET_EXAMPLES = 1_281_167


def load(name, arg=None):
    return configlib.load_config_file(os.path.join(CONFIGS, name), arg)


def flat_keys(config, prefix=""):
    keys = set()
    for key, value in config.items():
        if hasattr(value, "items"):
            keys |= flat_keys(value, f"{prefix}{key}.")
        else:
            keys.add(prefix + key)
    return keys


@pytest.mark.parametrize(
    "name,arg",
    [
        ("quickstart.py", None),
        ("tiny.py", None),
        ("imagenet_nfnet.py", "F3"),
        ("imagenet_nfnet.py", "variant=F6+,batch_size=1024"),
        ("imagenet_nfresnet.py", "ResNet101"),
        ("finetune.py", "dataset=folder:/data/flowers,variant=F1,checkpoint=F1"),
    ],
)
def test_configs_only_use_fields_declared_in_default(name, arg):
    default_keys = flat_keys(load("default.py"))
    config = load(name, arg)
    keys = flat_keys(config)
    if config.model_name == "NFResNet":  # Its constructor arguments replace NFNet's.
        keys = {k for k in keys if not k.startswith("model.")}
    assert keys <= default_keys, keys - default_keys


def test_imagenet_f0_plan_reproduces_the_recipe():
    config = load("imagenet_nfnet.py", "F0")
    plan = recipe.make_plan(config, 1000, 0)
    assert plan.peak_learning_rate == pytest.approx(1.6)
    assert plan.total_steps == 112_602
    assert plan.warmup_steps == int(5 * IMAGENET_EXAMPLES / 4096)
    assert (plan.train_image_size, plan.eval_image_size) == (192, 256)
    assert (plan.randaug_layers, plan.randaug_magnitude) == (4, 5)
    assert config.label_smoothing == 0.1 and config.weight_decay == 2e-5
    assert config.clipping == 0.01 and config.momentum == 0.9 and config.nesterov
    assert config.model.stochdepth_rate == 0.25 and config.ema_decay == 0.99999
    assert config.dtype == "bfloat16" and not config.sam.enabled
    small = recipe.make_plan(load("imagenet_nfnet.py", "variant=F0,batch_size=1024"), 1000, 0)
    assert small.peak_learning_rate == pytest.approx(0.4)
    assert small.total_steps == int(360 * IMAGENET_EXAMPLES / 1024)


def test_config_arg_errors_name_the_problem():
    with pytest.raises(ValueError, match="Unknown NFNet variant 'F9'"):
        load("imagenet_nfnet.py", "F9")
    with pytest.raises(ValueError, match="Unknown config argument 'batch'"):
        load("imagenet_nfnet.py", "variant=F1,batch=8")


def test_command_line_override_typo_fails():
    proc = subprocess.run(
        [
            sys.executable,
            os.path.join(REPO, "scripts", "train.py"),
            f"--config={os.path.join(CONFIGS, 'tiny.py')}",
            "--workdir=/tmp/unused",
            "--config.batch_sizee=8",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env=dict(os.environ, JAX_PLATFORMS="cpu"),
    )
    assert proc.returncode != 0
    assert "batch_sizee" in proc.stderr


def abstract_train_step(config, image_size=32, per_device_batch=2):
    """Traces init and one train step (no compute); returns the output shapes."""
    rec = recipe.build_recipe(config, (1000, IMAGENET_EXAMPLES))
    images = jax.ShapeDtypeStruct((1, image_size, image_size, 3), jnp.float32)
    params = jax.eval_shape(
        functools.partial(rec.model.init, is_training=True), jax.random.key(0), images
    )
    state = steps.TrainState(
        step=jax.ShapeDtypeStruct((), jnp.int32),
        params=params,
        ema_params=params,
        opt_state=jax.eval_shape(rec.optimizer.init, params),
        rng=jax.ShapeDtypeStruct((2,), jnp.uint32),
    )
    batch = {
        "images": jax.ShapeDtypeStruct(
            (1, per_device_batch, image_size, image_size, 3), jnp.float32
        ),
        "labels": jax.ShapeDtypeStruct((1, per_device_batch, 1000), jnp.float32),
    }
    stepped = jax.vmap(
        steps.bind_train_step(rec), in_axes=(None, 0, 0), axis_name=parallel.AXIS_NAME
    )
    return params, jax.eval_shape(stepped, state, batch, jax.ShapeDtypeStruct((1,), jnp.int32))


# With one block per stage the variants' programs differ only in their widths (F vs F+) and
# SAM (F6): test_reduced_nfnet_configs_differ_from_f0_only_in_variant_and_sam checks that.
@pytest.mark.parametrize("variant", ["F0", "F0+", "F6"])
def test_nfnet_variants_trace_a_full_width_train_step(variant):
    config = load("imagenet_nfnet.py", variant)
    config.model.depths = (1, 1, 1, 1)  # Full widths, one block per stage, 32 px.
    params, (new_state, metrics) = abstract_train_step(config)
    widths = variants.NFNET[variant].widths
    assert params["NFNet/~/final_conv"]["w"].shape[-1] == 2 * widths[-1]
    # vmap adds the (size 1) device axis; master weights stay float32 under bfloat16 compute.
    assert jax.tree.map(lambda x: (x.shape[1:], x.dtype), new_state.params) == jax.tree.map(
        lambda x: (x.shape, x.dtype), params
    )
    assert new_state.params["NFNet/~/linear"]["w"].dtype == jnp.float32
    assert {"loss", "grad_norm", "update_norm", "agc_clipped_fraction"} <= set(metrics)
    assert config.sam.enabled == (variant == "F6")


@pytest.mark.parametrize("variant", ["ResNet50", "ResNet200"])
def test_nfresnet_config_traces_a_train_step(variant):
    config = load("imagenet_nfresnet.py", variant)
    plan = recipe.make_plan(config, 1000, 0)
    assert (plan.train_image_size, plan.randaug_layers) == (224, 0)
    config.model.depths = (1, 1, 1, 1)
    params, (_, metrics) = abstract_train_step(config)
    assert len(variants.NFRESNET[variant].depths) == 4
    assert "agc_clipped_fraction" in metrics
    assert any(k.endswith("~/linear") for k in params)


@pytest.mark.slow
def test_reduced_f6_runs_one_sam_bfloat16_step():
    config = load("imagenet_nfnet.py", "F6")
    config.model.depths = (1, 1, 1, 1)
    config.model.widths = (32, 32, 32, 32)
    config.model.group_width = 16
    config.batch_size = 8
    assert config.sam.enabled and config.dtype == "bfloat16"
    rec = recipe.build_recipe(config, (10, 1000))
    state = parallel.replicate(steps.create_train_state(rec.model, rec.optimizer, 32, seed=0))
    step = parallel.pmap(steps.bind_train_step(rec))
    rng = np.random.default_rng(0)
    n = jax.local_device_count()
    batch = {
        "images": rng.normal(size=(n, 1, 32, 32, 3)).astype(np.float32),
        "labels": np.eye(10, dtype=np.float32)[rng.integers(0, 10, (n, 1))],
    }
    new_state, metrics = step(state, parallel.shard(batch), np.zeros((n,), np.int32))
    assert np.all(np.isfinite(jax.device_get(metrics["loss"])))
    assert parallel.replicas_identical(new_state)
    assert int(parallel.unreplicate(new_state.step)) == 1


def test_finetune_takes_pretrained_weights_and_new_head(tmp_path):

    config = load("finetune.py", "dataset=folder:/x,variant=F0")
    config.model.depths = (1, 1, 1, 1)
    model_1000 = recipe.build_model(config, 1000)
    model_10 = recipe.build_model(config, 10)
    images = jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32)
    init = lambda m: jax.eval_shape(
        functools.partial(m.init, is_training=True), jax.random.key(0), images
    )
    rng = np.random.default_rng(0)
    pretrained = jax.tree.map(
        lambda s: rng.normal(size=s.shape).astype(np.float32), init(model_1000)
    )
    fresh = jax.tree.map(lambda s: np.zeros(s.shape, np.float32), init(model_10))
    path = released.save_npz(pretrained, str(tmp_path / "pretrained.npz"))
    params = resume.load_pretrained(path, fresh)
    np.testing.assert_array_equal(
        params["NFNet/~/stem_conv0"]["w"], pretrained["NFNet/~/stem_conv0"]["w"]
    )
    assert params["NFNet/~/linear"]["w"].shape[-1] == 10
    assert not params["NFNet/~/linear"]["w"].any()  # The fresh head, not the old one.
    del pretrained["NFNet/~/final_conv"]
    released.save_npz(pretrained, str(tmp_path / "broken.npz"))
    with pytest.raises(ValueError, match="has no parameter NFNet/~/final_conv/"):
        resume.load_pretrained(str(tmp_path / "broken.npz"), fresh)


def run_reduced_step(config, num_classes=10, image_size=32, batch=2):
    """Initialises a reduced model from `config` and runs one real train step on fake data
    (jit over a size-1 vmapped device axis: one CPU compilation, no pmap)."""
    rec = recipe.build_recipe(config, (num_classes, 1000))
    state = steps.create_train_state(rec.model, rec.optimizer, image_size, seed=0)
    step = jax.jit(
        jax.vmap(steps.bind_train_step(rec), in_axes=(None, 0, 0), axis_name=parallel.AXIS_NAME)
    )
    rng = np.random.default_rng(0)
    fake = {
        "images": rng.normal(size=(1, batch, image_size, image_size, 3)).astype(np.float32),
        "labels": np.eye(num_classes, dtype=np.float32)[rng.integers(0, num_classes, (1, batch))],
    }
    new_state, metrics = step(state, fake, np.zeros((1,), np.int32))
    return state, new_state, metrics


def reduced(name, arg):
    """An ImageNet config with one block per stage and small widths (everything else kept)."""
    config = load(name, arg)
    config.model.depths = (1, 1, 1, 1)
    if config.model_name == "NFNet":
        config.model.widths = (32, 32, 64, 64)
        config.model.group_width = 16
    else:
        config.model.width = 1
    return config


def test_reduced_nfnet_configs_differ_from_f0_only_in_variant_and_sam():
    # So F6's real (bfloat16, SAM) reduced step above covers every variant's program up to
    # SAM and the dropout rate the variant sets (train/test px and RandAugment are not used by
    # a 32 px fake-data step); the trainer's tests run the non-SAM step for real.
    flat = lambda config: {key: config[key] for key in flat_keys(config)}
    base = flat(reduced("imagenet_nfnet.py", "F0"))
    for variant in variants.NFNET:
        config = flat(reduced("imagenet_nfnet.py", variant))
        changed = {key for key in base if config[key] != base[key]}
        expected = set() if variant == "F0" else {"model.variant"}
        assert changed == expected | ({"sam.enabled"} if variant == "F6" else set()), variant


@pytest.mark.slow
def test_nfresnet_config_runs_one_reduced_step():
    _, new_state, metrics = run_reduced_step(reduced("imagenet_nfresnet.py", "ResNet50"))
    assert np.isfinite(float(metrics["loss"][0]))
    # A real backward pass (the update itself is zero: warmup starts the lr at 0).
    assert 0 < float(metrics["grad_norm"][0]) < np.inf
    assert int(new_state.step[0]) == 1
