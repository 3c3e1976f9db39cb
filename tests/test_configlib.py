"""configlib: strict config-argument types, variant checks, and what may change on resume."""

import json
import os
import subprocess
import sys

import pytest

from nfnets_jax import configlib
from nfnets_jax.train import recipe, resume

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = os.path.join(REPO, "configs")
DEFAULTS = dict(flag=False, steps=4, lr=0.1, name="x")


def load(name, arg=None):
    return configlib.load_config_file(os.path.join(CONFIGS, name), arg)


def test_parse_arg_keeps_the_type_of_each_default():
    parsed = configlib.parse_arg("flag=Yes,steps=12,lr=1e-3,name=F1", DEFAULTS)
    assert parsed == dict(flag=True, steps=12, lr=1e-3, name="F1")
    assert type(parsed["steps"]) is int and type(parsed["lr"]) is float
    assert configlib.parse_arg("flag=0,lr=2", DEFAULTS)["flag"] is False


@pytest.mark.parametrize(
    "arg,message",
    [
        (
            "flag=ture",
            "Config argument 'flag' expects a bool (1/true/yes or 0/false/no), got 'ture'",
        ),
        ("steps=0.5", "Config argument 'steps' expects an integer, got '0.5'"),
        ("steps=", "Config argument 'steps' expects an integer, got ''"),
        ("lr=fast", "Config argument 'lr' expects a number, got 'fast'"),
    ],
)
def test_parse_arg_rejects_values_of_the_wrong_type(arg, message):
    with pytest.raises(ValueError) as info:
        configlib.parse_arg(arg, DEFAULTS)
    assert message in str(info.value)


def test_config_files_reject_bad_typed_arguments():
    with pytest.raises(ValueError, match="'sam' expects a bool .* got 'ture'"):
        load("imagenet_nfnet.py", "F6,sam=ture")
    assert not load("imagenet_nfnet.py", "F6,sam=false").sam.enabled
    with pytest.raises(ValueError, match="'batch_size' expects an integer, got '0.5'"):
        load("finetune.py", "variant=F0,batch_size=0.5")


def test_bad_variants_name_the_valid_ones():
    with pytest.raises(
        ValueError, match="Unknown NFNet variant 'F9'; valid variants: F0, F0\\+, F1"
    ):
        load("finetune.py", "dataset=folder:/x,variant=F9")
    with pytest.raises(
        ValueError, match="Unknown NFResNet variant 'ResNet51'; valid variants: ResNet26, ResNet50"
    ):
        load("imagenet_nfresnet.py", "ResNet51")
    config = load("default.py")
    config.model.variant = "f0"  # What `--config.model.variant=f0` does.
    with pytest.raises(ValueError, match="Unknown NFNet variant 'f0'; valid variants: F0"):
        recipe.validate_config(config)
    config.model_name = "ResNet"
    with pytest.raises(ValueError, match="Unknown model_name 'ResNet'; valid: NFNet, NFResNet"):
        recipe.validate_config(config)


@pytest.mark.parametrize(
    "override,message",
    [
        ("--config.eval_ema=ture", "Non-boolean argument to boolean flag"),
        ("--config.batch_size=0.5", "invalid literal for int()"),
    ],
)
def test_command_line_overrides_reject_wrong_types(override, message):
    # `--config.x=...` is parsed by ml_collections/absl with the type of the default field.
    proc = subprocess.run(
        [
            sys.executable,
            os.path.join(REPO, "scripts", "train.py"),
            f"--config={os.path.join(CONFIGS, 'tiny.py')}",
            "--workdir=/tmp/unused",
            override,
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env=dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=REPO),
    )
    assert proc.returncode != 0
    assert override in proc.stderr and message in proc.stderr


def record(**overrides):
    """A config.json record of the tiny config, in JSON form, with dotted overrides."""
    rec = json.loads(
        json.dumps(
            {"config": load("tiny.py").to_dict(), "plan": {"num_classes": 10, "total_steps": 4}}
        )
    )
    for key, value in overrides.items():
        *parents, leaf = key.split(".")
        target = rec
        for parent in parents:
            target = target[parent]
        target[leaf] = value
    return rec


@pytest.mark.parametrize(
    "key,value",
    [
        ("config.model.variant", "F1"),
        ("config.model.widths", [64, 32, 32, 32]),
        ("config.model.depths", [1, 1, 2, 1]),
        ("config.model.activation", "relu"),
        ("config.model_name", "NFResNet"),
        ("plan.num_classes", 5),
        ("config.sam.enabled", True),
        ("config.clipping", 0.0),
        ("config.weight_decay", 0.0),
    ],
)
def test_resume_changes_to_model_or_optimizer_structure_are_incompatible(key, value):
    incompatible, harmless = resume.resume_changes(record(), record(**{key: value}))
    assert len(incompatible) == 1 and incompatible[0].startswith(f"{key}: ")
    assert repr(value) in incompatible[0] and not harmless


@pytest.mark.parametrize(
    "key,value",
    [
        ("config.log_every_steps", 7),
        ("config.eval_every_steps", 50),
        ("config.checkpoint_every_steps", 10),
        ("config.num_train_steps", 400),
        ("config.data_dir", "/data/tfds"),
        ("config.base_learning_rate", 0.1),
        ("config.clipping", 0.02),
        ("config.weight_decay", 1e-4),
        ("config.sam.rho", 0.1),
        ("config.model.drop_rate", 0.0),
        ("config.model.stochdepth_rate", 0.0),
        ("config.model.group_conv", "native"),
    ],
)
def test_resume_changes_that_keep_the_state_are_harmless(key, value):
    incompatible, harmless = resume.resume_changes(
        record(), record(**{key: value, "plan.total_steps": 400})
    )
    assert not incompatible
    assert len(harmless) == 1 and harmless[0].startswith(f"{key}: ")


def test_identical_records_have_no_changes():
    assert resume.resume_changes(record(), record()) == ([], [])
