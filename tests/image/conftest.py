"""The image tier: the image that ``scripts/image.sh`` built (``localhost/wiregate:<version>``,
or ``$WIREGATE_IMAGE``), run with ``buildah run --isolation chroot``; skipped only where
buildah is missing. Its lab test uses the lab tier's ``lab`` fixture."""

from __future__ import annotations

import re
from collections.abc import Iterator

import pytest

from lab.image import Container, Image, image_requirements
from lab.lab_fixture import lab, pytest_runtest_makereport

__all__ = ["lab", "pytest_runtest_makereport"]


@pytest.fixture(scope="session")
def image() -> Image:
    reason = image_requirements()
    if reason:
        pytest.skip(reason)
    found = Image.default()
    if not found.exists():
        pytest.fail(f"image {found.name} is missing: build it with `sh scripts/image.sh`")
    return found


@pytest.fixture
def container(image: Image, request: pytest.FixtureRequest) -> Iterator[Container]:
    """A fresh working container of the image, removed afterwards."""
    made = image.container("wiregate-test-" + re.sub(r"[^a-z0-9_.-]", "-", request.node.name[:40]))
    try:
        yield made
    finally:
        made.remove()
