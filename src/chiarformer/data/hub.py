"""Optional online sources: Hugging Face `datasets` (imported lazily) and download hosts.

Every online path first checks, with a short timeout, that the host answers, so an offline
machine gets a clear "unreachable" reason within seconds instead of a hanging download.
With HF_HUB_OFFLINE=1 or HF_DATASETS_OFFLINE=1, `datasets` is asked for its local cache only.
"""

from __future__ import annotations

import os
import socket
import threading

PROBE_TIMEOUT_S = 3.0


class SourceUnavailable(Exception):
    """A source could not be used; the message says why (collected into the user's error)."""


def reachable(host: str, port: int = 443, timeout: float = PROBE_TIMEOUT_S) -> bool:
    """True when a TCP connection to host:port opens within `timeout` seconds (DNS included)."""
    result: list[bool] = []

    def probe() -> None:
        try:
            socket.create_connection((host, port), timeout=timeout).close()
            result.append(True)
        except OSError:
            result.append(False)

    # A thread bounds the DNS lookup too, which socket timeouts do not cover.
    t = threading.Thread(target=probe, daemon=True)
    t.start()
    t.join(timeout + 0.5)
    return bool(result and result[0])


def _offline() -> bool:
    return any(os.environ.get(v, "").lower() in ("1", "true", "yes") for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))


def load_hf_dataset(repo: str, config: str | None, split: str):
    """`datasets.load_dataset(repo, config, split=split)`, or SourceUnavailable with the reason."""
    try:
        import datasets
    except ImportError:
        raise SourceUnavailable(f'Hugging Face {repo} (package `datasets` not installed: pip install -e ".[hf]")') from None
    if not _offline() and not reachable("huggingface.co"):
        raise SourceUnavailable(f"Hugging Face {repo} (huggingface.co unreachable)")
    try:
        return datasets.load_dataset(repo, config, split=split)
    except Exception as e:  # datasets raises many types (network, missing config, cache miss)
        first_line = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise SourceUnavailable(f"Hugging Face {repo} ({first_line})") from None
