#!/usr/bin/env python3
"""Find a Python 3.9 (Amazon Linux 2023's /usr/bin/python3) and keep the target's venv.

    python3 tests/target_python.py     create or reuse .venv-target/; print its python

The worker and the bootstrap run on the instance's python3 with the boto3 AL2023 packages, so
tests/test_target_python.py runs the worker's tests under that pair. The interpreter comes
from, in order: $AWSFUN_TARGET_PYTHON (which must be a 3.9), `pyenv prefix 3.9.18`, any
other pyenv 3.9.x, `python3.9` on PATH. The venv holds tests/requirements-target.txt and
is rebuilt only when that file changes (its sha256 is stamped inside the venv), with uv
when it is on PATH (as in .ci/run), else with pip.
Exit status 0 with the venv's python on standard output; 1 with a one-line error.
"""

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
VENV = REPO / ".venv-target"
REQUIREMENTS = REPO / "tests" / "requirements-target.txt"
STAMP_NAME = "awsfun-requirements.sha256"
TARGET_VERSION = (3, 9)
PYENV_VERSION = "3.9.18"
#: The command that creates the venv, for messages that tell a person what to run.
MAKE_COMMAND = "python3 tests/target_python.py"


class TargetPythonError(RuntimeError):
    """No Python 3.9 was found, or the venv could not be made."""


def interpreter_version(python):
    """Return (major, minor) of the interpreter at `python`, or None when it does not run."""
    try:
        done = subprocess.run([python, "-c", "import sys; print(*sys.version_info[:2])"],
                              capture_output=True, text=True, timeout=30, check=False)
    except OSError:
        return None
    if done.returncode != 0:
        return None
    major, minor = done.stdout.split()
    return int(major), int(minor)


def _pyenv_prefixes():
    """Yield pyenv's prefix for 3.9.18 first, then of every other installed 3.9.x."""
    pyenv = shutil.which("pyenv")
    if pyenv is None:
        return
    done = subprocess.run([pyenv, "prefix", PYENV_VERSION], capture_output=True, text=True,
                          timeout=30, check=False)
    if done.returncode == 0 and done.stdout.strip():
        yield done.stdout.strip()
    done = subprocess.run([pyenv, "versions", "--bare"], capture_output=True, text=True,
                          timeout=30, check=False)
    root = subprocess.run([pyenv, "root"], capture_output=True, text=True, timeout=30,
                          check=False).stdout.strip()
    for version in sorted(done.stdout.split(), reverse=True) if done.returncode == 0 else ():
        if version.startswith("3.9.") and version != PYENV_VERSION and root:
            yield os.path.join(root, "versions", version)


def candidate_pythons(environ=None):
    """Yield interpreter paths to try, in the order the module docstring gives."""
    environ = os.environ if environ is None else environ
    for prefix in _pyenv_prefixes():
        yield os.path.join(prefix, "bin", "python3.9")
    found = shutil.which("python3.9", path=environ.get("PATH"))
    if found:
        yield found


def find_target_python(environ=None):
    """Return the path of a Python 3.9 interpreter; raise TargetPythonError if there is none."""
    environ = os.environ if environ is None else environ
    named = environ.get("AWSFUN_TARGET_PYTHON")
    if named:
        version = interpreter_version(named)
        if version != TARGET_VERSION:
            raise TargetPythonError(
                f"AWSFUN_TARGET_PYTHON={named} is "
                f"{'not a working interpreter' if version is None else 'Python %d.%d' % version}"
                f", not the target's Python 3.9")
        return named
    for python in candidate_pythons(environ):
        if interpreter_version(python) == TARGET_VERSION:
            return python
    raise TargetPythonError(
        "no Python 3.9 found (the worker's target, Amazon Linux 2023's python3): install one "
        f"(`pyenv install {PYENV_VERSION}`, or a python3.9 on PATH) or set AWSFUN_TARGET_PYTHON")


def requirements_digest(requirements=REQUIREMENTS):
    """Return the sha256 of the requirements file: the venv is current while it is unchanged."""
    return hashlib.sha256(Path(requirements).read_bytes()).hexdigest()


def venv_python(venv=VENV):
    """Return the path of the venv's python (which may not exist yet)."""
    return Path(venv) / "bin" / "python"


def venv_is_current(venv=VENV, requirements=REQUIREMENTS):
    """True when the venv exists, runs a 3.9 and holds exactly the current requirements."""
    stamp = Path(venv) / STAMP_NAME
    return (stamp.is_file() and stamp.read_text().strip() == requirements_digest(requirements)
            and interpreter_version(str(venv_python(venv))) == TARGET_VERSION)


def install_command(venv, requirements, uv=None):
    """Return the command that installs `requirements` into `venv` (pure): with uv (the path
    of its binary) when there is one, else with the venv's pip.

    uv resolves and byte-compiles on every core: CI's installs take about a minute less.
    Either way the modules are compiled at install (uv's --compile-bytecode, pip's default),
    which matters where PYTHONDONTWRITEBYTECODE keeps Python from caching them itself.
    """
    if uv:
        return [uv, "pip", "install", "--quiet", "--compile-bytecode", "--python",
                str(venv_python(venv)), "-r", str(requirements)]
    return [str(venv_python(venv)), "-m", "pip", "install", "--quiet",
            "--disable-pip-version-check", "-r", str(requirements)]


def ensure_venv(venv=VENV, requirements=REQUIREMENTS, environ=None):
    """Create (or reuse) the target venv; return its python's path. Raises TargetPythonError."""
    venv = Path(venv)
    if venv_is_current(venv, requirements):
        return venv_python(venv)
    python = find_target_python(environ)
    print(f"target_python: making {venv} with {python} from {requirements}", file=sys.stderr)
    stamp = venv / STAMP_NAME
    stamp.unlink(missing_ok=True)  # a venv cut short is never taken for a current one
    environ = os.environ if environ is None else environ
    steps = ([python, "-m", "venv", "--clear", str(venv)],
             install_command(venv, requirements, shutil.which("uv", path=environ.get("PATH"))))
    for step in steps:
        done = subprocess.run(step, check=False)
        if done.returncode != 0:
            raise TargetPythonError(f"`{' '.join(step)}` failed with status {done.returncode}")
    stamp.write_text(requirements_digest(requirements) + "\n")
    return venv_python(venv)


def main():
    """Make or reuse the venv; print its python, or one line saying why there is none."""
    try:
        print(ensure_venv())
    except TargetPythonError as err:
        print(f"target_python: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
