"""Shared pytest set-up. Fixtures live in small modules by subject and are re-exported here."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from tests._broker import *  # noqa: E402,F401,F403  (MQTT broker fixtures)
from tests._browser import *  # noqa: E402,F401,F403  (headless Chromium and the browser device page)
from tests._models import *  # noqa: E402,F401,F403  (tiny models and bundles)
