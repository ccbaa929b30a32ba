"""Storage set-up shared by the driver, verify and bench."""
from __future__ import annotations

import logging
import os

_LOG = logging.getLogger(__name__)


def use_storage_emulator_if_configured() -> bool:
    """With STORAGE_EMULATOR_HOST set (a local GCS emulator), connect to it anonymously at once.

    Beam otherwise looks for Application Default Credentials with retries and back-off (about 20 s) before it
    falls back to an anonymous client, which is what an emulator takes anyway."""
    host = os.environ.get("STORAGE_EMULATOR_HOST")
    if not host:
        return False
    try:
        from apache_beam.internal.gcp import auth
    except ImportError:  # Beam without its gcp extra cannot reach gs:// at all; FileSystems will say so
        return False
    with auth._Credentials._credentials_lock:
        auth._Credentials._credentials = None
        auth._Credentials._credentials_init = True
    _LOG.info("gs:// goes to the storage emulator at %s, anonymously", host)
    return True
