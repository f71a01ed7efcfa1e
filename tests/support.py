"""Helpers the test modules share: run user-data under bash, publish the worker files."""

import os
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PUBLISHED = ("AwsS3.py", "bootstrap/bootstrap.sh")


class ShutdownStub:
    """A directory holding a `shutdown` that appends its arguments to a file."""

    def __init__(self, directory):
        self.bin = Path(directory)
        self.bin.mkdir(parents=True, exist_ok=True)
        self.log = self.bin / "shutdown.calls"
        script = self.bin / "shutdown"
        script.write_text(f'#!/usr/bin/env bash\nprintf "%s\\n" "$*" >> "{self.log}"\n')
        script.chmod(0o755)

    def calls(self):
        """Return the argument strings `shutdown` was called with, in order."""
        return self.log.read_text().splitlines() if self.log.exists() else []


def run_user_data(user_data, workdir, stub, extra_env=None, path=None, timeout=120):
    """Execute rendered user-data with bash as the contract allows; return the CompletedProcess."""
    workdir = Path(workdir)
    scratch = workdir / "scratch"
    scratch.mkdir(parents=True, exist_ok=True)
    script = workdir / "user-data.sh"
    script.write_text(user_data, encoding="utf-8")
    env = dict(os.environ)
    env.update({"TMPDIR": str(scratch), "PATH": f"{stub.bin}:{path or os.environ['PATH']}"})
    env.update(extra_env or {})
    return subprocess.run(["bash", str(script)], cwd=workdir, env=env, capture_output=True,
                          timeout=timeout, check=False)


def publish_software(s3, bucket, files=PUBLISHED):
    """Upload the published worker files to the software bucket at their repo paths."""
    for name in files:
        s3.upload_file(str(REPO / name), bucket, name)
