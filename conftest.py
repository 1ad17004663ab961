"""For every test and every notebook cell (nbval): a shared data file that is nowhere on this
machine (no ``$LLAMA_EDU_DATA``, no ``../shared/data``, not in the cache, offline) makes the test
skip, saying which file and where it comes from, instead of an error. Only the locator's own
:class:`~llama_edu.io.files.DataFileNotFound` counts; any other missing file still fails.

A notebook is one kernel: once a cell skipped for a missing file, its later cells skip too (they
would fail on the names that cell did not define).

With pytest-xdist (``python -m pytest -n auto``, the README's command), each test file and each
notebook goes whole to one worker, in the order collected, the every-machine file last."""

from __future__ import annotations

import re

import pytest

_NOTEBOOKS_MISSING_DATA: dict[str, str] = {}
_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def _missing_data_reason(error: BaseException) -> str | None:
    from llama_edu.io.files import DataFileNotFound

    if isinstance(error, DataFileNotFound):
        return f"missing shared data: {error.summary()}"
    inner = getattr(error, "inner_traceback", None)  # nbval's NbCellError: the kernel's traceback
    if isinstance(inner, str) and "DataFileNotFound" in inner:
        text = _ANSI.sub("", inner)
        found = re.search(r"could not find [^\n]*?'([^']+)'", text)
        name = found.group(1) if found else "a shared data file"
        source = re.search(r"(?:download from|its public original:) (\S+)", text)
        where = f"download it from {source.group(1)}" if source else "put it there by hand"
        return (f"missing shared data: {name} is not in $LLAMA_EDU_DATA, ../shared/data or the cache and could not be "
                f"downloaded: {where} (see the README, section 'Data')")
    return None


def _skip_on_missing_data(item: pytest.Item):
    key = str(getattr(item, "path", item.nodeid))
    if type(item).__name__ == "IPyNbCell" and key in _NOTEBOOKS_MISSING_DATA:
        pytest.skip(_NOTEBOOKS_MISSING_DATA[key])
    try:
        return (yield)
    except Exception as e:  # noqa: BLE001 - re-raised unless it is the locator's missing-data error
        reason = _missing_data_reason(e)
        if reason is None:
            raise
        if type(item).__name__ == "IPyNbCell":
            _NOTEBOOKS_MISSING_DATA[key] = reason
        pytest.skip(reason)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_setup(item):
    return (yield from _skip_on_missing_data(item))


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item):
    return (yield from _skip_on_missing_data(item))


#: The longest file, which runs the notebooks a second time on every core itself: last, so that it
#: has the machine to itself at the end (started first beside the other worker it took 487 s, not
#: 250-300, and the whole suite 17.3 minutes, not 15.5, on 2 cores).
EVERY_CORE_LAST = "tests/test_notebooks_every_machine.py"


def pytest_configure(config):
    """Under pytest-xdist, send whole files to the workers (``--dist loadfile``): a notebook's
    cells share one kernel and must run in order on one worker, and a module's fixtures are built
    once. Keep the collected order (xdist would otherwise sort the files by their number of tests)."""
    if getattr(config.option, "dist", "no") in ("load", "worksteal"):
        config.option.dist = "loadfile"
        config.option.loadscopereorder = False


def pytest_collection_modifyitems(config, items):
    last = [item for item in items if item.nodeid.startswith(EVERY_CORE_LAST)]
    chosen = set(last)
    items[:] = [item for item in items if item not in chosen] + last
