"""vLLM glue: the only code in moespac-vllm that imports `vllm`.

Ledger of every place we touch vLLM (why, how, upstream status, when it can go) lives in
`LEDGER` below; each entry's module wraps the original and fails loudly if the upstream
signature changed.
"""
from __future__ import annotations

# (module, what it touches, why, sanctioned?, removable when)
LEDGER: tuple[tuple[str, str, str, str, str], ...] = ()
