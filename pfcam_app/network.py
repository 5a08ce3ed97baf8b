"""May the page offer downloads? ``PFCAM_OFFLINE`` decides when set; otherwise a check, once per process and
within ``HUB_TIMEOUT`` seconds, whether the hub host (``HF_ENDPOINT``, else huggingface.co:443) answers."""
from __future__ import annotations

import os
import threading
from concurrent.futures import Future
from dataclasses import dataclass

import streamlit as st

from pfnet import weights

HUB_TIMEOUT = 2.0  # seconds the hub reachability check may take


@dataclass(frozen=True)
class Network:
    online: bool  # downloads can be tried
    reason: str  # why, in words for the page
    where: str = ""  # the address checked, for the model panels


@st.cache_resource(show_spinner=False)
def _hub_check(host: str, port: int) -> Future:
    """The reachability check of one hub address, started once per process on a thread of its own."""
    from pfnet.download import hub_reachable

    future: Future = Future()

    def check() -> None:
        future.set_result(hub_reachable(HUB_TIMEOUT))

    threading.Thread(target=check, name="pfcam-hub-check", daemon=True).start()
    return future


def _forced_online() -> bool:
    return os.environ.get("PFCAM_OFFLINE", "").strip().lower() in ("0", "false", "no", "off")


def start_check() -> None:
    """Begin the hub check (when it is needed) so that it runs while the page draws."""
    if not weights.offline() and not _forced_online():
        from pfnet.download import hub_address

        _hub_check(*hub_address())


def network() -> Network:
    """``PFCAM_OFFLINE=1`` (or ``HF_HUB_OFFLINE=1``): offline; ``PFCAM_OFFLINE=0``: online without checking;
    otherwise whether the hub host answered within ``HUB_TIMEOUT`` seconds (checked once per process)."""
    if weights.offline():
        return Network(False, "downloads are switched off (PFCAM_OFFLINE=1)")
    if _forced_online():
        return Network(True, "PFCAM_OFFLINE=0: downloads are tried without checking the network")
    from pfnet.download import hub_address

    host, port = hub_address()
    try:
        reachable = bool(_hub_check(host, port).result(timeout=HUB_TIMEOUT + 1.0))
    except Exception:  # noqa: BLE001 - a check that did not finish counts as no network
        reachable = False
    where = f"{host}:{port}"
    if reachable:
        return Network(True, "the Hugging Face hub answers", where)
    return Network(False, f"no network: the Hugging Face hub cannot be reached within {HUB_TIMEOUT:g} s", where)
