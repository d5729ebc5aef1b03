"""MONAI's notices that are not about the bundle or the data a node reads, kept out of its log."""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Iterator


@contextlib.contextmanager
def quiet_monai() -> Iterator[None]:
    """Building a bundle's components instantiates MONAI's readers and transforms, which warn
    about things that are not the bundle's: GPU codecs we don't use (one per reader) and MONAI's
    own announced change of a default (``Orientationd``'s labels). Those notices stay out of
    every node's log; any other warning shows."""
    codec_log = logging.getLogger("monai.data.nvimgcodec_pydicom_plugin")
    level = codec_log.level
    codec_log.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="NvImgCodecPydicomReader")
            warnings.filterwarnings("ignore", message=".*Orientationd.__init__:labels", category=FutureWarning)
            warnings.filterwarnings("ignore", message="Detected deprecated name 'optional_packages_version'")
            yield
    finally:
        codec_log.setLevel(level)
