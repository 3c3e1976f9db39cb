"""Packaging for nfnets_jax: pip install -e .[data,torch,dev]."""

import setuptools

CORE = [
    "jax>=0.10",
    "jaxlib>=0.10",
    "dm-haiku>=0.0.17",
    "optax>=0.2.8",
    "chex",
    "ml-collections",
    "absl-py",
    "numpy",
]
EXTRAS = {
    # Input pipeline, evaluation on tfds/folder datasets, the built-in digits dataset.
    "data": [
        "tensorflow-cpu",
        "tensorflow-datasets",
        "importlib_resources",
        "scikit-learn",
        "pillow",
    ],
    # Training: checkpoints, TensorBoard event files, mixed precision.
    "train": ["orbax-checkpoint", "tensorboardX", "jmp", "google-cloud-storage"],
    # PyTorch interop (timm weight conversion, --compare timm in the benchmark).
    "torch": ["torch==2.13.0", "timm"],
    # Tests, lint, plots, the Flax (linen, NNX) and Equinox AGC examples.
    "dev": [
        "pytest",
        "pytest-xdist",
        "hypothesis",
        "ruff",
        "matplotlib",
        "flax",
        "equinox",
        "dill",
        "gcp-storage-emulator",
        "gcsfs",
    ],
}
EXTRAS["all"] = sorted({p for group in EXTRAS.values() for p in group})

setuptools.setup(
    name="nfnets_jax",
    version="0.1.0",
    description="JAX + Haiku reference reimplementation of NFNets and Adaptive Gradient Clipping.",
    packages=setuptools.find_packages(include=["nfnets_jax", "nfnets_jax.*"]),
    package_data={"nfnets_jax.checkpoints": ["imagenet_labels.txt"]},
    python_requires=">=3.11",  # jax >= 0.10
    install_requires=CORE,
    extras_require=EXTRAS,
)
