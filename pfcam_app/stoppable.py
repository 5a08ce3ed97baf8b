"""Start, Stop and Continue for a bounded job of the page (Measure, the sanity check): one job per session, known
by its signature (what it depends on); Stop ends it at the next progress step and keeps what finished."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import streamlit as st


@dataclass(frozen=True)
class Stoppable:
    """``prefix``: the buttons' keys (``<prefix>_start``, ``_continue``, ``_stop``); ``run_key`` / ``stop_key``:
    the session-state entries holding the signature the user asked to run / stopped."""

    prefix: str
    run_key: str
    stop_key: str

    def _start(self, sig: tuple) -> None:
        st.session_state[self.run_key] = sig
        st.session_state.pop(self.stop_key, None)

    def _stop(self, sig: tuple) -> None:
        st.session_state[self.stop_key] = sig

    def controls(self, sig: tuple, unfinished: bool, start: str, stopped: str, stop: str, stop_help: str) -> Any:
        """Draw the button the job's state calls for; return a placeholder holding the Stop button when the job
        should run now (the caller runs it, then empties the placeholder), else None."""
        if st.session_state.get(self.run_key) != sig:
            st.button(start, key=f"{self.prefix}_start", on_click=self._start, args=(sig,),
                      icon=":material/play_arrow:", type="primary")
        elif st.session_state.get(self.stop_key) == sig and unfinished:
            st.info(stopped, icon=":material/pause_circle:")
            st.button("Continue", key=f"{self.prefix}_continue", on_click=self._start, args=(sig,),
                      icon=":material/play_arrow:")
        elif unfinished:
            holder = st.empty()
            holder.button(stop, key=f"{self.prefix}_stop", on_click=self._stop, args=(sig,),
                          icon=":material/stop_circle:", help=stop_help)
            return holder
        return None
