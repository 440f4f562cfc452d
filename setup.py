"""Packaging for t5forge: a performance-first training engine for T5.

Install:  pip install torch==2.13.0 && pip install -e ".[test]"
"""
from setuptools import find_packages, setup

# Ranges admit the CPU build torch==2.13.0 (served locally on CI) and the GPU images' torch 2.11 /
# triton 3.6, but never a newer torch that would pull several GB of CUDA wheels.
INSTALL_REQUIRES = [
    "torch>=2.4,<2.14",
    "triton>=3.0,<3.10; platform_system == 'Linux'",
    "deepspeed>=0.16,<0.20",
    "psutil>=5.9",  # engine/launcher.py watches the deepspeed launcher (DeepSpeed depends on it too)
    "sentencepiece>=0.2,<0.3",
    "safetensors>=0.4,<1",
    "numpy>=1.24",
    "tqdm>=4.66",
    "sacrebleu>=2.4,<3",
    "rouge-score>=0.1.2,<0.2",
    "matplotlib>=3.7",
    # C4 cleaning: the language identifier C4 used, and a maintained bad-words list (a user file may replace it)
    "langdetect>=1.0.9",
    "better-profanity>=0.7",
]

TEST_REQUIRES = [
    "pytest>=8",
    "pytest-benchmark>=4",
    "transformers>=4.46,<6",  # the reference implementation in tests, never imported at run time
    "protobuf>=3.20",  # transformers needs it to read spiece.model into T5Tokenizer
]

setup(
    name="t5forge",
    version="0.1.0",
    description="Performance-first T5 training engine: Triton kernels, DeepSpeed ZeRO, the T5 paper's recipe",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["engine", "engine.*", "kernels", "kernels.*", "models", "models.*",
                                    "benchmarks", "benchmarks.*"]),
    package_data={"engine": ["configs/*.toml"]},
    install_requires=INSTALL_REQUIRES,
    extras_require={"test": TEST_REQUIRES},
    entry_points={"console_scripts": ["t5forge = engine.cli:main"]},
)
