"""The Hugging Face settings every evomerge process that loads models or lm-eval tasks runs with.

Models and task data are local paths, so the hub is never needed: offline, transformers and
datasets never wait on a network lookup. Tokenizer threads are off because search workers are
forked processes, where the tokenizers library would otherwise warn and disable them itself. A
value the user set wins.
"""

from __future__ import annotations

import os
from collections.abc import MutableMapping

OFFLINE_DEFAULTS = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


def set_offline_defaults(env: MutableMapping[str, str] = os.environ) -> MutableMapping[str, str]:
    """Fill in `OFFLINE_DEFAULTS` where `env` (this process's environment by default) has no value."""
    for name, value in OFFLINE_DEFAULTS.items():
        env.setdefault(name, value)
    return env
