"""colt5-flax: CoLT5 (Ainslie et al., 2023) in JAX/Flax."""

import setuptools

INSTALL_REQUIRES = [
    "absl-py>=2.1",
    "clu>=0.0.12",
    "etils[epath]>=1.7",
    "flax>=0.12.0",
    "gin-config>=0.5.0",
    # tensorflow-datasets imports it without declaring it.
    "importlib_resources>=6.0",
    "jax>=0.10.0",
    "numpy>=1.26",
    "optax>=0.2.4",
    "orbax-checkpoint>=0.11.0",
    "rouge-score>=0.1.2",
    # Student's t of the small-scale study's report (jax requires it too).
    "scipy>=1.13",
    "seqio>=0.0.20",
    "sentencepiece>=0.2.0",
    # clu's metric writers import it without declaring it.
    "tensorboard>=2.18",
    # Not tensorflow-cpu: tensorflow-text requires the full package.
    "tensorflow>=2.18",
    "tensorflow-datasets>=4.9.10",
    "tensorflow-text>=2.18",
]

EXTRAS_REQUIRE = {
    "test": [
        "matplotlib>=3.8",
        "pytest>=8.0",
        # Two workers: the suite is bound by XLA compiles, one per core.
        "pytest-xdist>=3.5",
        "ruff>=0.6",
        "safetensors>=0.4",
        # 2.13.0 is the CPU build on this project's CI disk; a looser range pulls
        # a multi-GB CUDA build from the index.
        "torch==2.13.0",
        "transformers>=4.45",
    ],
    "demo": ["matplotlib>=3.8"],
    "peers": ["colt5-attention>=0.11", "torch>=2.4", "transformers>=4.45"],
    "tpu": ["jax[tpu]>=0.10.0"],
    "gpu": ["jax[cuda12]>=0.10.0"],
}

setuptools.setup(
    name="colt5-flax",
    version="0.1.0",
    description="CoLT5: long-input T5 with conditional computation, in JAX/Flax.",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    packages=setuptools.find_packages(include=["colt5_flax", "colt5_flax.*"]),
    package_data={"colt5_flax": ["py.typed"]},
    python_requires=">=3.11",
    install_requires=INSTALL_REQUIRES,
    extras_require=EXTRAS_REQUIRE,
    entry_points={
        "console_scripts": [
            "colt5_train=colt5_flax.train:console_entry_point",
            "colt5_evaluate=colt5_flax.evaluate:console_entry_point",
            "colt5_infer=colt5_flax.infer:console_entry_point",
        ],
    },
)
