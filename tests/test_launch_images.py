"""The worker Dockerfiles stay in step with the launcher's Beam and the project's packages."""
import re
from pathlib import Path

import apache_beam
import pytest

ROOT = Path(__file__).resolve().parents[1]


def instructions(path):
    text = path.read_text().replace("\\\n", " ")
    return [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]


@pytest.mark.parametrize("target, extra", [("gpu", "gpu"), ("tpu", "tpu")])
def test_worker_image_matches_the_launcher(target, extra):
    lines = instructions(ROOT / "launch" / f"Dockerfile.{target}")
    beam_version = [line.split("=", 1)[1] for line in lines if line.startswith("ARG BEAM_VERSION=")]
    # --sdk_location=container: the workers' SDK must be the very release that pickled the graph.
    assert beam_version == [apache_beam.__version__]
    assert "FROM apache/beam_python3.11_sdk:${BEAM_VERSION}" in lines
    run = " ".join(line for line in lines if line.startswith("RUN "))
    assert f'pip install ".[{extra}]" "apache-beam[gcp]==${{BEAM_VERSION}}"' in run
    assert not any(line.startswith(("ENTRYPOINT", "CMD")) for line in lines), "keep the Beam SDK harness entrypoint"

    setup = (ROOT / "setup.py").read_text()
    packages = set(re.findall(r'"([a-z_]+)"', re.search(r"include=\[([^\]]*)\]", setup).group(1)))
    copied = {line.split()[1] for line in lines if line.startswith("COPY ")}
    assert {p for p in packages if "." not in p} <= copied, "every package of setup.py must be in the image"
    assert "setup.py" in copied
    assert re.search(rf'"{extra}": \["jax\[', setup), f"setup.py needs the {extra} extra the image installs"
