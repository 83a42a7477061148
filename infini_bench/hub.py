"""Whether the Hugging Face hub can be reached, found out once per process and quickly.

Without it, every hub library retries each request for about a minute before giving up (a tokenizer, then each
split of a data set). Instead, code about to use a hub library calls `prepare_hub()`, and the first call decides
(`hub_online`): HF_HUB_OFFLINE, HF_DATASETS_OFFLINE or TRANSFORMERS_OFFLINE set to a true value means offline;
otherwise one HEAD request to the hub's endpoint (HF_ENDPOINT, by default https://huggingface.co) must answer
within PROBE_TIMEOUT_S. When the hub can't be reached the run says so in one log line and puts
`huggingface_hub`, `datasets` and `transformers` in offline mode, so they read their caches at once instead of
retrying.
"""
from __future__ import annotations

import logging
import os
import sys
import threading
import urllib.error
import urllib.request
from functools import lru_cache

log = logging.getLogger(__name__)

OFFLINE_VARS = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE")
PROBE_TIMEOUT_S = 5.0
_TRUE = ("1", "ON", "YES", "TRUE")


def endpoint() -> str:
    """The hub's address, as huggingface_hub reads it."""
    return os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")


def offline_by_environment() -> str | None:
    """The variable that puts the hub libraries offline (HF_HUB_OFFLINE=1, ...), or None."""
    return next((var for var in OFFLINE_VARS if os.environ.get(var, "").strip().upper() in _TRUE), None)


def probe(url: str, timeout_s: float) -> str | None:
    """None when `url` answers within timeout_s with any HTTP status below 500; else why not, in a few words."""
    outcome = [f"no answer within {timeout_s:g} s"]

    def ask() -> None:
        try:
            urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=timeout_s).close()
            outcome[0] = None
        except urllib.error.HTTPError as err:  # the server answered: reachable, unless it is failing
            outcome[0] = None if err.code < 500 else f"HTTP {err.code}"
        except (OSError, ValueError) as err:  # a failed DNS lookup, a refused connection, a timeout, a bad URL
            outcome[0] = str(getattr(err, "reason", None) or err) or type(err).__name__

    # In a thread: a DNS lookup does not heed the socket's timeout, and some resolvers retry for long.
    thread = threading.Thread(target=ask, name="hub-probe", daemon=True)
    thread.start()
    thread.join(timeout_s)
    return outcome[0]


def go_offline() -> None:
    """Offline mode for the hub libraries: the environment for those not imported yet, and the flags that
    those already imported read at each request."""
    for var in OFFLINE_VARS:
        os.environ[var] = "1"
    constants = sys.modules.get("huggingface_hub.constants")
    if constants is not None:  # huggingface_hub and transformers ask constants.is_offline_mode()
        constants.HF_HUB_OFFLINE = True
    config = sys.modules.get("datasets.config")
    if config is not None:
        config.HF_HUB_OFFLINE = config.HF_DATASETS_OFFLINE = True


@lru_cache(maxsize=1)
def hub_online() -> bool:
    """Whether the hub can be reached; the first call decides for the whole process (and goes offline if not)."""
    if offline_by_environment() is not None:
        go_offline()  # one variable set: every library agrees
        return False
    why = probe(endpoint(), PROBE_TIMEOUT_S)
    if why is None:
        return True
    log.warning("the Hugging Face hub (%s) can't be reached (%s): working offline, from local and cached files "
                "only", endpoint(), why)
    go_offline()
    return False


def route_logs(library: str) -> None:
    """A hub library's log records once, through the handlers the application set up (Hydra's console and
    run.log), not a second time through the stderr handler `huggingface_hub` and `datasets` add for
    themselves. Call it after importing the library; without handlers on the root logger it does nothing."""
    if not logging.getLogger().handlers:
        return
    own = logging.getLogger(library)
    for handler in list(own.handlers):
        if type(handler) is logging.StreamHandler:
            own.removeHandler(handler)


def prepare_hub() -> bool:
    """Call after importing a hub library, before its first request: whether the hub can be reached (decided
    once per process; offline mode when not), and the hub libraries imported so far log through the
    application's handlers."""
    for library in ("huggingface_hub", "datasets"):
        if library in sys.modules:
            route_logs(library)
    return hub_online()
