"""The CLI's logging: ssl-bench's own messages at the chosen level, third-party libraries' only from WARNING up."""

from __future__ import annotations

import io
import logging
import subprocess
import sys

import pytest

from ssl_bench.cli import configure_logging


@pytest.fixture
def restore_root_logging():
    root = logging.getLogger()
    saved = root.level, list(root.handlers)
    yield
    root.handlers[:] = saved[1]
    root.setLevel(saved[0])


@pytest.mark.parametrize("level", [logging.DEBUG, logging.INFO])
def test_third_party_info_is_dropped_own_kept(level, restore_root_logging):
    stream = io.StringIO()
    configure_logging(level, stream=stream)
    logging.getLogger("faiss.loader").info("Loading faiss with AVX2 support.")
    logging.getLogger("PIL.PngImagePlugin").debug("STREAM b'IHDR'")
    logging.getLogger("faiss.loader").warning("a real faiss warning")
    logging.getLogger("ssl_bench.tasks.knn").info("knn: 450 queries")
    logging.getLogger("ssl_bench").debug("debug detail")
    logging.getLogger("ssl_benchmark_other").info("not ours despite the prefix")
    lines = stream.getvalue().splitlines()
    assert [line.split(" ", 1)[1] for line in lines] == [
        "faiss.loader: a real faiss warning",
        "ssl_bench.tasks.knn: knn: 450 queries",
        *(["ssl_bench: debug detail"] if level == logging.DEBUG else []),
    ]


def test_quiet_keeps_own_warnings_only(restore_root_logging):
    stream = io.StringIO()
    configure_logging(logging.WARNING, stream=stream)
    logging.getLogger("ssl_bench.checkpoint").info("loaded ...")
    logging.getLogger("ssl_bench.checkpoint").warning("unused tensors")
    assert stream.getvalue().split(" ", 1)[1] == "ssl_bench.checkpoint: unused tensors\n"


def _faiss_import_log(setup: str) -> str:
    code = f"import logging\nfrom ssl_bench.cli import configure_logging\n{setup}\nimport faiss\n"
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True).stderr


def test_importing_faiss_under_the_cli_logging_prints_no_loader_lines():
    # the plain INFO set-up the CLI used before shows faiss's loader lines; the CLI's set-up does not
    assert "Loading faiss" in _faiss_import_log("logging.basicConfig(level=logging.INFO)")
    assert "faiss" not in _faiss_import_log("configure_logging(logging.INFO)")
