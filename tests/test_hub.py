"""Without the hub a run starts in seconds: one probe per process (servers on localhost stand in for the hub),
offline mode for the hub libraries, one log line, and the LM task judges its data before fetching a tokenizer."""
import http.server
import logging
import os
import socket
import threading
import time

import pytest

from infini_bench import hub
from infini_bench.errors import ConfigError


@pytest.fixture(autouse=True)
def undecided(monkeypatch):
    """Each test decides afresh, with none of the offline variables set (and all of them restored after)."""
    for var in hub.OFFLINE_VARS:
        monkeypatch.setenv(var, "0")  # recorded, so a test that goes offline leaves the environment as it was
    for var in ("http_proxy", "https_proxy", "all_proxy", "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)  # the local servers are asked directly
    hub.hub_online.cache_clear()
    yield
    hub.hub_online.cache_clear()


def serve(status: int | None):
    """A local server answering every request with `status`, or (None) accepting and never answering."""
    if status is None:
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        return f"http://127.0.0.1:{sock.getsockname()[1]}", sock.close

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_HEAD(self):
            self.send_response(status)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return f"http://127.0.0.1:{server.server_port}", server.shutdown


@pytest.mark.parametrize("status, expected", [(200, None), (404, None), (503, "HTTP 503")])
def test_the_probe_takes_any_answer_but_a_server_error_as_reachable(status, expected):
    url, stop = serve(status)
    try:
        assert hub.probe(url, timeout_s=5.0) == expected
    finally:
        stop()


def test_the_probe_gives_up_quickly_on_a_closed_port_and_on_a_silent_server():
    with socket.socket() as sock:  # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{sock.getsockname()[1]}"
    assert "refused" in hub.probe(closed, timeout_s=5.0).lower()
    url, stop = serve(None)
    try:
        start = time.monotonic()
        assert hub.probe(url, timeout_s=0.3) in ("no answer within 0.3 s", "timed out")  # whichever ends first
        assert time.monotonic() - start < 2.0
    finally:
        stop()


def test_an_unreachable_hub_is_probed_once_said_once_and_puts_the_libraries_offline(monkeypatch, caplog):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    calls = []
    monkeypatch.setattr(hub, "probe", lambda url, timeout_s: calls.append(url) or "Name or service not known")
    monkeypatch.setenv("HF_ENDPOINT", "https://hub.example/")
    with caplog.at_level(logging.INFO, logger=hub.log.name):
        assert [hub.prepare_hub() for _ in range(3)] == [False] * 3
    assert calls == ["https://hub.example"]
    (record,) = [r for r in caplog.records if r.name == hub.log.name]
    assert record.getMessage() == ("the Hugging Face hub (https://hub.example) can't be reached (Name or service not "
                                   "known): working offline, from local and cached files only")
    assert huggingface_hub.constants.HF_HUB_OFFLINE and huggingface_hub.constants.is_offline_mode()
    assert all(os.environ[var] == "1" for var in hub.OFFLINE_VARS)  # for libraries imported later


@pytest.mark.parametrize("var", ["HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"])
def test_an_offline_variable_skips_the_probe_and_the_log_line(monkeypatch, caplog, var):
    monkeypatch.setenv(var, "yes")
    monkeypatch.setattr(hub, "probe", lambda url, timeout_s: pytest.fail("probed although offline was set"))
    with caplog.at_level(logging.INFO, logger=hub.log.name):
        assert hub.hub_online() is False
    assert not caplog.records


def test_a_reachable_hub_stays_online(monkeypatch):
    monkeypatch.setattr(hub, "probe", lambda url, timeout_s: None)
    assert hub.hub_online() is True and hub.offline_by_environment() is None


def test_a_hub_library_logs_once_through_the_applications_handlers():
    records = []
    app = logging.Handler()
    app.emit = records.append
    library = logging.getLogger("a_hub_library")
    own = logging.StreamHandler()
    library.addHandler(own)
    logging.getLogger().addHandler(app)
    try:
        hub.route_logs("a_hub_library")
        library.warning("retrying")
        assert own not in library.handlers and [r.getMessage() for r in records] == ["retrying"]
    finally:
        logging.getLogger().removeHandler(app)
        library.removeHandler(own)


def test_datasets_reads_its_cache_at_once_when_the_hub_is_down(monkeypatch):
    import datasets.config
    import huggingface_hub.constants

    from infini_bench.data import hub_documents

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", False)
    monkeypatch.setattr(hub, "probe", lambda url, timeout_s: "down")
    with pytest.raises(ConfigError, match=r"^task\.dataset: 'pg19' \(emozilla/pg19\) is unavailable"):
        hub_documents("pg19", "test", max_docs=1)
    assert datasets.config.HF_HUB_OFFLINE  # no retries: datasets looked in its cache only


def lm_config(*overrides):
    from pathlib import Path

    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(Path(__file__).resolve().parents[1] / "conf"), version_base="1.3"):
        return compose("config", overrides=list(overrides))


def test_a_paper_recipe_without_the_hub_stops_on_its_data_before_its_tokenizer(monkeypatch):
    """As the README says: task.fallback_offline is named, before the model or its hub tokenizer is looked for."""
    import infini_bench.data as data
    import tasks.runner as runner

    def offline(name, split, max_docs, min_bytes=0):
        raise ConfigError("task.dataset", f"{name!r} is unavailable (offline); task.fallback_offline=true falls back")

    monkeypatch.setattr(data, "hub_documents", offline)
    monkeypatch.setattr(runner, "build_model_and_tokenizer", lambda cfg: pytest.fail("the model came before the data"))
    cfg = lm_config("experiment=table2_pg19")
    assert cfg.model.tokenizer == "hf-internal-testing/llama-tokenizer" and not cfg.task.fallback_offline
    with pytest.raises(ConfigError, match=r"^task\.dataset: 'pg19' is unavailable .*task\.fallback_offline"):
        runner.run_task(cfg, run=None)


def test_a_fallback_is_tried_and_reported_once_per_run(monkeypatch, caplog):
    import infini_bench.data as data
    import tasks.lm as lm

    tries = []

    def offline(name, split, max_docs, min_bytes=0):
        tries.append(split)
        raise ConfigError("task.dataset", f"{name!r} is unavailable (offline)")

    monkeypatch.setattr(data, "hub_documents", offline)
    t = lm_config("task=lm", "task.dataset=pg19").task
    unreachable = set()
    with caplog.at_level(logging.WARNING, logger=lm.log.name):
        for split in ("validation", "train"):
            docs, source = lm._documents(t, "pg19", split, unreachable=unreachable)
            assert source == "embedded_pg19" and docs == data.embedded_documents("embedded_pg19", split)
    assert tries == ["validation"] and unreachable == {"pg19"}
    assert [r.getMessage().endswith("falling back to embedded_pg19") for r in caplog.records] == [True]
