"""Build script for xcloud, a volunteer-computing grid over MQTT."""

import re
from pathlib import Path

from setuptools import find_packages, setup

HERE = Path(__file__).resolve().parent
readme = HERE / "README.md"
# The version lives in schemas/version.py alone; read it without importing the package.
VERSION = re.search(r'^__version__ = "([^"]+)"',
                    (HERE / "schemas" / "version.py").read_text(encoding="utf-8"), re.M)
assert VERSION, "schemas/version.py must define __version__"

setup(
    name="xcloud",
    version=VERSION.group(1),
    description=(
        "Volunteer / desktop-grid computing: MQTT broker, coordinator daemon, "
        "worker agents and a client shell"
    ),
    long_description=readme.read_text(encoding="utf-8") if readme.exists() else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.11",
    packages=find_packages(
        include=["broker*", "coordinator*", "worker*", "client*", "schemas*"],
    ),
    package_data={
        "schemas": ["json/*.json", "asyncapi.yaml"],
        "coordinator": ["static/*", "http/static/*", "http/static/vendor/*"],
    },
    include_package_data=False,
    zip_safe=False,
    install_requires=[
        "paho-mqtt>=2.1,<3",
        "amqtt>=0.12.1,<0.13",
        "peewee>=3.17",
        "PyMySQL>=1.1",
        "psutil>=5.9",
        "prompt_toolkit>=3.0.40",
        "docker>=7.0",
        "cryptography>=42",
        "fastjsonschema>=2.19",
        "PyYAML>=6",
        "aiohttp>=3.9,<4",
        "prometheus_client>=0.20",
    ],
    extras_require={
        "dev": [
            "pytest>=8",
            "pytest-timeout>=2.2",
            "pytest-xdist>=3.5",
            "ruff>=0.4",
            "mypy>=1.10",
            "types-PyYAML",
            "types-psutil",
            "types-docker",
            "types-PyMySQL",
            "jsonschema>=4.20",
            "selenium>=4.20",
        ],
        # GPU detection through NVML (worker/gpus.py); without it workers parse
        # nvidia-smi's output instead.
        "gpu": ["nvidia-ml-py"],
        # The systems bench/jobs.py runs beside xcloud's batch jobs.
        "bench": ["celery[redis]>=5.3", "dask[distributed]>=2024.1"],
    },
    entry_points={
        "console_scripts": [
            "xcloud=client.cli:main",
        ],
    },
    classifiers=[
        "Programming Language :: Python :: 3",
        "Programming Language :: Python :: 3.11",
        "Operating System :: POSIX :: Linux",
        "Topic :: System :: Distributed Computing",
    ],
)
