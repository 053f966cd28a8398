"""md4: masked (absorbing-state) discrete diffusion in JAX: MD4 and GenMD4 (Shi et al., NeurIPS 2024)."""

from setuptools import find_packages, setup

INSTALL_REQUIRES = [
    "jax==0.10.2",
    "jaxlib==0.10.2",
    "flax==0.12.8",
    "optax==0.2.8",
    "orbax-checkpoint==0.12.8",
    "ml_collections==1.1.0",
    "clu==0.0.12",
    "grain==0.2.18",
    "sentencepiece==0.2.3",
    "tensorflow-datasets==4.9.10",
    "importlib_resources==7.1.0",
    "absl-py==2.5.1",
    "numpy==2.4.6",
    "tqdm==4.70.1",
    "pillow==12.1.1",
    "tiktoken==0.14.0",
    "regex==2026.12.2",  # GPT-2's pre-tokenisation pattern for bpe:DIR (also tiktoken's).
    "pyarrow==26.0.1",
    "array-record==0.8.6",
    "safetensors==0.8.0",  # The GPT-2 judge's weights.
    "matplotlib==3.10.9",  # The sweep's and the study's plots.
]

setup(
    name="md4",
    version="0.1.0",
    description=__doc__,
    python_requires=">=3.11",
    # The config files ship inside the package as md4.configs, so a regular (non-editable) install
    # finds them from any working directory (md4/main.py); in a checkout they stay in configs/.
    packages=find_packages(include=["md4", "md4.*"]) + [
        "md4.configs", "md4.configs.md4", "md4.configs.genmd4", "md4.configs.mdlm"],
    package_dir={"md4.configs": "configs"},
    package_data={"md4.data": ["demo/*.xz", "demo/*.npz"]},
    install_requires=INSTALL_REQUIRES,
    extras_require={
        # tensorstore: Orbax's own; the storage tests read its OCDBT b-tree. libtpu: tests compile a
        # tiny config for a TPU slice (md4 compile), with no TPU attached.
        "test": ["pytest==9.2.0", "scipy==1.17.1", "tensorstore==0.1.86", "libtpu==0.0.42.1"],
        "tf": ["tensorflow-cpu==2.21.0", "tensorboard==2.21.0"],
        # Run on a Cloud TPU VM, or compile for a TPU slice from any host: md4 compile.
        "tpu": ["jax[tpu]==0.10.2", "libtpu==0.0.42.1"],
        # Run on NVIDIA GPUs, or compile for an H100 from any host: md4 compile --topology=h100.
        "gpu": ["jax[cuda12]==0.10.2"],
    },
    entry_points={"console_scripts": ["md4=md4.main:run"]},
)
