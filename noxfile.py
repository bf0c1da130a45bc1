"""nox sessions. They run in the current environment (venv_backend="none"): a fresh torch venv
costs 1.3 GB and a minute, and CI already builds one (.ci/run)."""

import nox

nox.options.sessions = ["lint", "tests"]


@nox.session(venv_backend="none")
def tests(session: nox.Session) -> None:
    """The test suite (CPU; 2-process gloo tests included)."""
    session.run("python", "-m", "pytest", "-q", *session.posargs)


@nox.session(venv_backend="none")
def lint(session: nox.Session) -> None:
    """ruff on the package, tests, benchmarks and scripts."""
    session.run("ruff", "check", "gpt2cli", "tests", "benchmarks", "scripts", "noxfile.py")


@nox.session(venv_backend="none")
def bench(session: nox.Session) -> None:
    """Speed benchmarks, side by side with the peers (never part of the tests)."""
    session.run("python", "benchmarks/run_all.py", *session.posargs)
