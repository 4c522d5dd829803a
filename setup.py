from setuptools import setup

setup(
    name="flexdit",
    version="0.1.0",
    description="FlexDiT: dynamic token density for Diffusion Transformers, with fused Triton kernels",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="MIT",
    python_requires=">=3.10",
    packages=["flexdit", "flexdit_kernels", "bench"],
    package_data={"bench": ["baselines/*.json"]},
    install_requires=[
        "torch>=2.4",
        "triton>=3.2; platform_system == 'Linux'",
        "numpy",
    ],
    extras_require={
        "test": ["pytest", "pytest-benchmark", "hypothesis", "fvcore", "scipy", "torchmetrics"],
        "bench": ["fvcore", "matplotlib", "tqdm"],
        "diffusers": ["diffusers", "transformers", "safetensors"],
        "lora": ["peft>=0.13", "safetensors"],   # flexdit.lora, flexdit-finetune --lora-rank
        "cli": ["tqdm", "pillow"],   # progress bars; PNG, GIF and grid output of flexdit-sample --vae
        # flexdit-eval: Inception (torch-fidelity), PSNR/SSIM/LPIPS (torchmetrics + torchvision), FVD (cd-fvd)
        "eval": ["torch-fidelity>=0.4", "torchmetrics>=1.4", "torchvision", "scipy", "pillow", "cd-fvd"],
    },
    entry_points={
        "console_scripts": [
            "flexdit-bench=bench.__main__:main",
            "flexdit-sample=flexdit.sample:main",
            "flexdit-finetune=flexdit.train:main",
            "flexdit-eval=flexdit.eval:main",
        ],
    },
)
