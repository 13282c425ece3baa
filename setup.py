"""igpt-fast: Image GPT (Chen et al. 2020) pretraining, probing, finetuning and sampling, fast."""
from setuptools import setup

setup(
    name="igpt-fast",
    version="0.1.0",
    description="Image GPT: palette, WebDataset tokenizer, Triton kernels, training, probe, finetune, sampling",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=["igpt_fast", "igpt_fast.kernels"],
    package_dir={"igpt_fast": "igpt_fast", "igpt_fast.kernels": "kernels"},
    install_requires=[
        "torch>=2.4",
        "triton>=3.0; platform_system == 'Linux'",
        "webdataset>=0.2.86",
        "numpy>=1.24",
        "faiss-cpu>=1.8",
        "click>=8.1",
        "pillow>=10.0",
        "tqdm>=4.60",
        "matplotlib>=3.7",
        "safetensors>=0.4",
    ],
    extras_require={
        "gpu": ["faiss-gpu-cu12"],
        "dev": ["pytest>=7.4", "scikit-image>=0.22", "transformers>=4.40"],
    },
    entry_points={"console_scripts": ["igpt-fast = igpt_fast.cli:main"]},
)
