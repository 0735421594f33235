"""Developer sessions: `nox -s tests`, `nox -s lint`, `nox -s bench`, `nox -s regress`, `nox -s report` (see README)."""

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


@nox.session
def regress(session):
    """Regression benchmarks against reports/baseline.json; `nox -s regress -- --update` rewrites the baseline."""
    session.run("bench", "regress", *session.posargs)


@nox.session
def report(session):
    """Tables, plots, Markdown/HTML/CSV (and W&B) from the results database: `bench report`."""
    session.run("bench", "report", *session.posargs)
