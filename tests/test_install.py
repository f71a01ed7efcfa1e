"""Install weight: ./deploy.sh runs with requirements/deploy.txt alone (boto3), and the local
cloud, without moto, says in one line what to install.

A meta path finder in a fresh interpreter refuses every third-party module that
requirements/deploy.txt does not install (the standard library and the repository's own
modules stay), as a virtual environment holding only that file would.
"""

import subprocess
import sys

from conftest import REPO

# What `pip install -r requirements/deploy.txt` brings: boto3 and its dependencies.
DEPLOY_ONLY = {"boto3", "botocore", "s3transfer", "jmespath", "dateutil", "urllib3", "six"}

BLOCKER = """
import importlib.abc, sys
ALLOWED = set(sys.stdlib_module_names) | set({allowed!r})
OWN = set({own!r})

class DeployOnly(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        top = name.partition(".")[0]
        if top in ALLOWED or top in OWN:
            return None
        raise ModuleNotFoundError(f"No module named {{top!r}} (not in requirements/deploy.txt)",
                                  name=top)

sys.meta_path.insert(0, DeployOnly())
sys.path.insert(0, {repo!r})
"""


def run_deploy_only(code):
    own = sorted({path.stem for path in REPO.glob("*.py")} | {"awsfun_deploy"})
    script = BLOCKER.format(allowed=sorted(DEPLOY_ONLY), own=own, repo=str(REPO)) + code
    return subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True,
                          text=True, timeout=60, check=False)


def test_deploy_sh_help_runs_with_requirements_deploy_txt_alone():
    """Importing deploy.py imports every module of awsfun_deploy: none may import moto,
    jinja2, plotly or the test tools at import time (the results page's modules only when
    `results` runs)."""
    done = run_deploy_only("""
import deploy
for argv in (["--help"], ["deploy", "--help"], ["status", "--help"]):
    try:
        deploy.main(argv)
    except SystemExit as stop:
        assert stop.code == 0, (argv, stop.code)
heavy = sorted({m.partition(".")[0] for m in sys.modules} & {"moto", "jinja2", "plotly",
                                                              "pytest", "werkzeug"})
print("heavy:", heavy)
""")
    assert done.returncode == 0, done.stderr
    assert "usage: deploy.sh [-h] COMMAND" in done.stdout
    assert "usage: deploy.sh deploy [-h]" in done.stdout
    assert done.stdout.rstrip().endswith("heavy: []")


def test_the_blocker_blocks(tmp_path):
    """The check above could pass by blocking nothing: moto must fail to import under it."""
    done = run_deploy_only("import moto\n")
    assert done.returncode == 1
    assert "No module named 'moto' (not in requirements/deploy.txt)" in done.stderr


def test_the_local_cloud_without_moto_says_what_to_install_in_one_line(tmp_path):
    done = run_deploy_only(f"""
import local_cloud
sys.exit(local_cloud.main(["demo", "--out", {str(tmp_path / "out")!r}]))
""")
    assert done.returncode == 2
    lines = done.stderr.splitlines()
    assert len(lines) == 1 and "Traceback" not in done.stderr, done.stderr
    assert lines[0].startswith("local_cloud.py: the local cloud needs moto (No module named 'moto'")
    assert lines[0].endswith(f"python3 -m pip install -r {REPO / 'requirements.txt'}")
