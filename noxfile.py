"""Developer sessions: `nox -s tests`, `nox -s lint`, `nox -s bench` (see README)."""

import nox

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
