"""Reaching the Hugging Face Hub, or saying in one line why not (in seconds, not after a minute of retries).

A hub name (`model_path=mistralai/Mixtral-8x7B-v0.1`, `data.path=tatsu-lab/alpaca`) is first looked up in the
local Hugging Face cache when the Hub cannot be reached (`HF_HUB_OFFLINE=1`, or no answer from its host within
`TIMEOUT_S`); when the cache has no copy either, `HubUnreachable` names the name, the reason and what to do.
huggingface_hub itself would retry for 25-75 s and end in a 45-93-line traceback. The stage commands turn
`HubUnreachable` into one line and exit status 2 (train/cli.py).
"""

from __future__ import annotations

import os
import socket
from pathlib import Path
from urllib.parse import urlparse

TIMEOUT_S = 3.0


class HubUnreachable(ValueError):
    """A hub name that can be neither downloaded nor found in the cache; the message says what to do."""


def endpoint() -> str:
    return os.environ.get("HF_ENDPOINT", "https://huggingface.co")


def offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes", "on")


def reachable(timeout: float = TIMEOUT_S) -> bool:
    """Whether the Hub's host answers a TCP connection within `timeout` seconds."""
    url = urlparse(endpoint())
    try:
        with socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)), timeout):
            return True
    except OSError:
        return False


def why_offline() -> str:
    return ("HF_HUB_OFFLINE is set" if offline() else
            f"the Hugging Face Hub ({urlparse(endpoint()).hostname}) cannot be reached from this machine")


def unreachable(key: str, name: str, kind: str = "model") -> HubUnreachable:
    download = f"hf download {name}" + (" --repo-type dataset" if kind == "dataset" else "")
    local = "a local folder" if kind == "model" else "a local file or folder"
    return HubUnreachable(f"{key}={name}: not a local path, {why_offline()}, and the Hugging Face cache has no copy of this "
                          f"{kind}: give {local} ({key}=/path/to/it), or run `{download}` where there is network "
                          f"(the cache is then used, also with HF_HUB_OFFLINE=1)")


def online() -> bool:
    """Whether to ask the Hub (not HF_HUB_OFFLINE, and its host answers)."""
    return not offline() and reachable()


def model_file(name: str, filename: str, key: str = "model_path") -> Path:
    """`filename` of hub model `name`: downloaded when the Hub answers, else from the cache, else HubUnreachable."""
    from huggingface_hub import hf_hub_download

    try:
        return Path(hf_hub_download(name, filename, local_files_only=not online()))
    except Exception as e:  # noqa: BLE001 - not found in the cache (LocalEntryNotFoundError and kin)
        if online():
            raise
        raise unreachable(key, name) from e


def model_snapshot(name: str, allow_patterns: list[str], key: str = "model_path") -> Path:
    """A local folder with hub model `name`'s files matching `allow_patterns` (see `model_file`)."""
    from huggingface_hub import snapshot_download

    is_online = online()
    try:
        return Path(snapshot_download(name, allow_patterns=allow_patterns, local_files_only=not is_online))
    except Exception as e:  # noqa: BLE001
        if is_online:
            raise
        raise unreachable(key, name) from e


def check_dataset(name: str, key: str = "data.path") -> None:
    """Before `datasets.load_dataset(name)`: when the Hub cannot be asked, the cache must hold the dataset."""
    if online():
        return
    from huggingface_hub import scan_cache_dir

    try:
        cached = {r.repo_id for r in scan_cache_dir().repos if r.repo_type == "dataset"}
    except Exception:  # noqa: BLE001 - no cache folder at all
        cached = set()
    datasets_cache = Path(os.environ.get("HF_DATASETS_CACHE", Path.home() / ".cache" / "huggingface" / "datasets"))
    if name not in cached and not any(datasets_cache.glob(name.replace("/", "___") + "*")):
        raise unreachable(key, name, "dataset")
    go_offline()


def go_offline() -> None:
    """Read what is cached without asking the Hub (and waiting for it): huggingface_hub and datasets read
    HF_HUB_OFFLINE when imported, so their flags are set too."""
    import datasets
    import huggingface_hub.constants

    os.environ["HF_HUB_OFFLINE"] = "1"
    huggingface_hub.constants.HF_HUB_OFFLINE = True
    datasets.config.HF_HUB_OFFLINE = True
