"""Developer sessions: `nox -s tests`, `nox -s lint`, `nox -s bench`, `nox -s regress`, `nox -s report`,
`nox -s newest`, `nox -s constraints` (see README)."""

import os
from pathlib import Path

import nox
from nox.command import CommandFailed

# The exact versions the suite is tested with (README "Install and run"); torch is not in it: the installed
# CPU build is kept.
CONSTRAINTS = Path(".ci/constraints.txt")

nox.options.default_venv_backend = "none"  # use the environment the README installs into; never a new torch
nox.options.sessions = ["lint", "tests"]


@nox.session
def tests(session):
    """The default test suite (slow tests excluded; `nox -s tests -- -m slow` runs those)."""
    session.run("pytest", *session.posargs)


@nox.session
def lint(session):
    session.run("ruff", "check", "bench", "tests", "noxfile.py")


@nox.session
def bench(session):
    """The main job: every model on the synthetic corpus, one comparison table."""
    session.run("bench", "run", *session.posargs)


@nox.session
def regress(session):
    """Regression benchmarks against reports/baseline.json; `nox -s regress -- --update` rewrites the baseline."""
    session.run("bench", "regress", *session.posargs)


@nox.session
def report(session):
    """Tables, plots, Markdown/HTML/CSV (and W&B) from the results database: `bench report`."""
    session.run("bench", "report", *session.posargs)


def pinned(freeze: str) -> dict[str, str]:
    """{package name (normalised): version} of `pip freeze` lines."""
    pins = {}
    for line in freeze.splitlines():
        name, sep, version = line.partition("==")
        if sep:
            pins[name.strip().lower().replace("_", "-")] = version.strip()
    return pins


def test_newest(session) -> str:
    """A new venv with torch 2.13.0 (from $TORCH_INDEX_URL where set, e.g. PyTorch's CPU index) and the newest
    release of everything else, then the default tests. Prints, and on a failure names, every package whose
    version differs from the constraints file; returns the venv's freeze (torch, pip and the project left out)."""
    index = os.environ.get("TORCH_INDEX_URL")
    session.install("torch==2.13.0", *(["--index-url", index] if index else []))
    session.install("-e", ".[dev]")
    freeze = session.run("pip", "freeze", "--all", "--exclude-editable", "--exclude", "pip", "--exclude", "torch",
                         silent=True)
    old, new = pinned(CONSTRAINTS.read_text() if CONSTRAINTS.exists() else ""), pinned(freeze)
    changed = "; ".join(f"{name} {old.get(name, 'absent')} -> {new.get(name, 'absent')}"
                        for name in sorted(old.keys() | new.keys()) if old.get(name) != new.get(name))
    session.log(f"newest releases against {CONSTRAINTS}: {changed or 'no change'}")
    try:
        session.run("pytest", *session.posargs)
    except CommandFailed:
        session.error(f"tests fail with the newest releases; changed since {CONSTRAINTS}: {changed or 'nothing'}")
    return freeze


@nox.session(venv_backend="venv")
def newest(session):
    """The tests against the newest release of every dependency (the scheduled workflow; never blocks CI)."""
    test_newest(session)


@nox.session(venv_backend="venv")
def constraints(session):
    """Regenerate the constraints file: the newest releases in a new venv, written only when the tests pass."""
    freeze = test_newest(session)
    CONSTRAINTS.write_text(f"# Written by `nox -s constraints`: the versions the tests passed with (torch excluded)"
                           f"\n{freeze}")
