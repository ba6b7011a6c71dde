"""A pytest plugin for running llama.cpp's server test suite against the launcher (`llama-server`
beside this file): the suite's tests run unmodified; this only changes how their outcomes are
reported and what the session does before them.

- A test whose server the launcher refused to start (exit 77: an option exsa serve has no
  equivalent for) is reported as skipped, with the launcher's reason, not as failed or passed.
- Each test's outcome is written to $EXSA_SUITE_RESULTS, a JSON line per test (`cargo xtask
  server-suite` reads them).
- The suite's session fixture starts every preset once to download its model from Hugging Face;
  here every model is local (the launcher names it), so nothing is started ahead of the tests.
"""

import json
import os

import pytest

UNSUPPORTED_MARK = "return code 77"


def pytest_configure(config):
    import utils  # the suite's own module (its folder is on sys.path: the run's working directory)

    utils.ServerPreset.load_all = staticmethod(lambda: None)


def last_reason():
    try:
        with open(os.environ["EXSA_SUITE_UNSUPPORTED"]) as log:
            lines = log.read().splitlines()
        return json.loads(lines[-1])["reason"] if lines else "unsupported option"
    except OSError:
        return "unsupported option"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if report.failed and call.excinfo is not None and UNSUPPORTED_MARK in str(call.excinfo.value):
        report.outcome = "skipped"
        report.longrepr = (str(item.path), item.location[1] or 0, f"unsupported by exsa serve: {last_reason()}")


def short(longrepr):
    if isinstance(longrepr, tuple):
        return longrepr[2]
    text = str(longrepr)
    # The assertion or exception line pytest marks with "E", else the last line.
    marked = [line[1:].strip() for line in text.splitlines() if line.startswith("E ")]
    return (marked[0] if marked else text.strip().splitlines()[-1] if text.strip() else "")[:300]


def pytest_runtest_logreport(report):
    # One line per test: its call, or the setup or teardown that failed or skipped it.
    if report.when == "call" or report.outcome != "passed":
        if report.when == "teardown" and report.outcome == "passed":
            return
        message = "" if report.outcome == "passed" else short(report.longrepr)
        line = {
            "test": report.nodeid,
            "when": report.when,
            "outcome": report.outcome,
            "unsupported": message.startswith("unsupported by exsa serve: "),
            "message": message,
        }
        with open(os.environ["EXSA_SUITE_RESULTS"], "a") as out:
            out.write(json.dumps(line) + "\n")
