"""moespac-vllm: MoE-SpAc expert offloading for vLLM, steered by speculative decoding.

Importing this package has no side effects and does not import vLLM. vLLM calls `register()` through
the `vllm.general_plugins` entry point (`VLLM_PLUGINS=moespac`); everything vLLM-specific is imported
lazily from there.
"""
from __future__ import annotations

__version__ = "0.1.0"


def register() -> None:
    """vLLM general-plugin entry point. Idempotent; imports the vLLM glue lazily."""
    from moespac_vllm.patches import plugin

    plugin.register()
