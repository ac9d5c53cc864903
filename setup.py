"""megatron_k15: Megatron-style model-parallel RL training (Kimi k1.5) for Llama/Qwen2 LMs.

Install torch first (see DEVELOPERS.md), then ``pip install -e ".[test]"``.
NVIDIA apex is optional and must be built from source (https://github.com/NVIDIA/apex);
never ``pip install apex`` (an unrelated PyPI package).
"""

import os
import re

from setuptools import find_packages, setup

HERE = os.path.dirname(os.path.abspath(__file__))


def read_requirements():
    with open(os.path.join(HERE, "requirements.txt")) as f:
        return [line.strip() for line in f if line.strip() and not line.startswith("#")]


def read_version():
    with open(os.path.join(HERE, "megatron_k15", "__init__.py")) as f:
        return re.search(r'__version__ = "([^"]+)"', f.read()).group(1)


setup(
    name="megatron_k15",
    version=read_version(),
    description="Megatron-style model-parallel long-context RL (Kimi k1.5) for Llama/Qwen2 models",
    long_description=open(os.path.join(HERE, "README.md")).read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["megatron_k15", "megatron_k15.*"]),
    install_requires=read_requirements(),
    extras_require={
        # accelerate: transformers needs it to load an FP8-block checkpoint (the export test reads ours back)
        "test": ["pytest>=7", "pyarrow>=14", "accelerate>=1.0,<2"],
        # Parquet inputs (Hugging Face datasets' format) for every JSONL reader
        "data": ["pyarrow>=14"],
        # GPU accelerators, optional: transformer-engine. NVIDIA apex: build from source.
        "gpu": ["transformer-engine[pytorch]>=1.10"],
    },
    entry_points={
        "console_scripts": [
            "k15-generate=megatron_k15.generate:main",
        ],
    },
)
