"""Fixtures the integration tests share."""

import pytest

from tests.helpers import write_images


@pytest.fixture(scope="module")
def labelled(tmp_path_factory):
    """40 solid-colour PNGs in 4 class folders part0/ .. part3/ (10 each), which --labels folders
    reads as classes and --clusters ignores."""
    root = tmp_path_factory.mktemp("labelled")
    write_images(root, 40, fmt="PNG")
    return root
