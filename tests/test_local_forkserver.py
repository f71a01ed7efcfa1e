"""The local cloud's warm python3: a script run through the shim behaves as `python3 SCRIPT`."""

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
import zipapp
from pathlib import Path

import pytest

import local_forkserver

PYTHON = Path(sys.executable).parent / "python3"

REPORT_SCRIPT = textwrap.dedent("""\
    import json, os, sys
    json.dump({"argv": [os.fsencode(a).hex() for a in sys.argv], "cwd": os.getcwd(),
               "path0": sys.path[0], "name": __name__, "stdin": sys.stdin.read(),
               "env": os.environb.get(b"AWSFUN_PROBE", b"").hex(),
               "warm": "boto3" in sys.modules}, sys.stdout)
    sys.exit(int(sys.argv[1]))
    """)


@pytest.fixture(scope="module")
def shim():
    """A running fork server and a `python3` shim for it; yields (shim path, log path)."""
    # A short directory: a Unix socket's path must fit in 108 bytes, pytest's tmp_path may not.
    root = Path(tempfile.mkdtemp(prefix="awsfun-fs-"))
    (root / "bin").mkdir()
    server = local_forkserver.start(root / "s.sock", root / "server.log")
    path = root / "bin" / "python3"
    path.write_text(local_forkserver.shim_text(root / "s.sock", PYTHON), encoding="utf-8")
    path.chmod(0o755)
    yield path, root / "server.log"
    os.killpg(server.pid, signal.SIGKILL)
    server.wait()
    shutil.rmtree(root)


def write(directory, name, text):
    path = Path(directory) / name
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return path


def test_a_script_sees_what_python3_would_show_it(shim, tmp_path):
    path, log = shim
    script = write(tmp_path, "report.py", REPORT_SCRIPT)
    before = local_forkserver.served(log)
    odd = b"a b\xff$(x)"  # a space, an undecodable byte, a command substitution: data only
    env = {**os.environ, "AWSFUN_PROBE": os.fsdecode(b"\xe9t\xe9")}
    done = subprocess.run([path, script, b"7", odd], input=b"from stdin", capture_output=True,
                          cwd=tmp_path, env=env)
    assert done.returncode == 7, done.stderr
    seen = json.loads(done.stdout)
    assert [bytes.fromhex(arg) for arg in seen["argv"]] == [os.fsencode(script), b"7", odd]
    assert seen["cwd"] == str(tmp_path) and seen["path0"] == str(tmp_path)
    assert seen["name"] == "__main__" and seen["stdin"] == "from stdin"
    assert bytes.fromhex(seen["env"]) == b"\xe9t\xe9"
    assert seen["warm"] is True  # boto3 came with the fork: this run started warm
    assert local_forkserver.served(log) == before + 1


def test_a_zip_app_runs_with_the_zip_first_on_sys_path(shim, tmp_path):
    source = tmp_path / "app"
    source.mkdir()
    write(source, "__main__.py", "import helper, sys\nprint(helper.WORD, sys.path[0])\n")
    write(source, "helper.py", "WORD = 'zipped'\n")
    zipapp.create_archive(source, tmp_path / "app.pyz")
    done = subprocess.run([shim[0], tmp_path / "app.pyz"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["zipped", str(tmp_path / "app.pyz")]


def test_a_script_cannot_import_the_servers_own_modules(shim, tmp_path):
    script = write(tmp_path, "probe.py", "import local_cloud\n")
    done = subprocess.run([shim[0], script], capture_output=True, text=True)
    assert done.returncode == 1
    assert "ModuleNotFoundError: No module named 'local_cloud'" in done.stderr


@pytest.mark.parametrize("body, status, stderr", [
    ("raise ValueError('broken input')", 1, "ValueError: broken input"),
    ("import sys; sys.exit('a message')", 1, "a message"),
    ("import sys; sys.exit(None)", 0, ""),
    ("import logging; logging.basicConfig(); logging.getLogger('x').warning('flushed')", 0,
     "WARNING:x:flushed"),
])
def test_exit_status_and_stderr_are_pythons(shim, tmp_path, body, status, stderr):
    script = write(tmp_path, "end.py", body + "\n")
    cold = subprocess.run([PYTHON, script], capture_output=True, text=True)
    warm = subprocess.run([shim[0], script], capture_output=True, text=True)
    assert warm.returncode == cold.returncode == status
    assert stderr in warm.stderr and stderr in cold.stderr


def test_a_signal_to_the_shim_reaches_the_script(shim, tmp_path):
    script = write(tmp_path, "term.py", """\
        import signal, sys, time
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
        print("armed", flush=True)
        time.sleep(30)
        """)
    process = subprocess.Popen([shim[0], script], stdout=subprocess.PIPE, text=True)
    assert process.stdout.readline() == "armed\n"
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=10) == 143


def test_a_script_killed_by_a_signal_kills_the_shim_the_same_way(shim, tmp_path):
    script = write(tmp_path, "die.py", "import os, signal\nos.kill(os.getpid(), signal.SIGKILL)\n")
    assert subprocess.run([shim[0], script]).returncode == -signal.SIGKILL


def test_a_shim_killed_outright_takes_its_script_with_it(shim, tmp_path):
    script = write(tmp_path, "hang.py", """\
        import os, time
        print(os.getpid(), flush=True)
        time.sleep(60)
        """)
    process = subprocess.Popen([shim[0], script], stdout=subprocess.PIPE, text=True)
    pid = int(process.stdout.readline())
    process.kill()
    process.wait()
    deadline = time.monotonic() + 10
    while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not Path(f"/proc/{pid}").exists()


def test_options_and_a_missing_server_run_the_real_interpreter(shim, tmp_path):
    path, log = shim
    before = local_forkserver.served(log)
    done = subprocess.run([path, "-c", "import sys; print('boto3' in sys.modules)"],
                          capture_output=True, text=True)
    assert (done.returncode, done.stdout) == (0, "False\n")
    orphan = tmp_path / "python3"
    orphan.write_text(local_forkserver.shim_text(tmp_path / "none.sock", PYTHON), encoding="utf-8")
    orphan.chmod(0o755)
    script = write(tmp_path, "cold.py", "import sys; print('boto3' in sys.modules)\n")
    assert subprocess.run([orphan, script], capture_output=True, text=True).stdout == "False\n"
    assert local_forkserver.served(log) == before


def test_the_warm_up_imports_the_workers_standard_library():
    names = local_forkserver.worker_imports()
    assert {"json", "hashlib", "zlib", "csv", "threading"} <= set(names)
    assert "boto3" not in names  # the worker imports it lazily; the warm-up imports it itself


def test_the_server_ends_with_the_process_that_started_it(tmp_path):
    """Killed outright (SIGKILL, no clean-up), the starter leaves no server behind: the
    server's stdin is the starter's pipe, and it ends at end of file."""
    root = Path(tempfile.mkdtemp(prefix="awsfun-fs-"))
    starter = subprocess.run([sys.executable, "-c", textwrap.dedent(f"""\
        import os, signal, sys
        sys.path.insert(0, {str(Path(local_forkserver.__file__).parent)!r})
        import local_forkserver
        server = local_forkserver.start({str(root / "s.sock")!r}, {str(root / "log")!r})
        print(server.pid, flush=True)
        os.kill(os.getpid(), signal.SIGKILL)
        """)], capture_output=True, text=True, timeout=60, check=False)
    assert starter.returncode == -signal.SIGKILL, starter.stderr
    server = int(starter.stdout)
    deadline = time.monotonic() + 10
    while Path(f"/proc/{server}").exists() and time.monotonic() < deadline:
        try:
            if Path(f"/proc/{server}/stat").read_text().split(") ")[1].startswith("Z"):
                break  # ended; its reaper (init) has not collected it yet
        except OSError:
            break
        time.sleep(0.05)
    alive = Path(f"/proc/{server}").exists() and not Path(
        f"/proc/{server}/stat").read_text().split(") ")[1].startswith("Z")
    if alive:
        os.kill(server, signal.SIGKILL)
    shutil.rmtree(root)
    assert not alive, "the fork server outlived the process that started it"


def test_the_workers_compilation_is_reused_under_each_jobs_file_name(tmp_path, monkeypatch):
    """cache_compiled: the worker's exact bytes compile once, and each job's copy still
    carries its own file name (tracebacks, __file__); other bytes compile as before."""
    import builtins

    script = write(tmp_path, "w.py", """\
        def fail():
            raise ValueError("here")
        """)
    monkeypatch.setattr(builtins, "compile", builtins.compile)  # undone after the test
    local_forkserver.cache_compiled(script)
    source = script.read_bytes()
    first = compile(source, "/job1/w.py", "exec")
    again = compile(source, "/job2/w.py", "exec")
    assert first.co_code == again.co_code
    nested = [c for c in again.co_consts if hasattr(c, "co_filename")]
    assert again.co_filename == "/job2/w.py" and [c.co_filename for c in nested] == ["/job2/w.py"]
    namespace = {}
    exec(again, namespace)
    with pytest.raises(ValueError) as raised:
        namespace["fail"]()
    assert str(raised.traceback[-1].path) == "/job2/w.py"
    changed = compile(source + b"x = 1\n", "/job3/w.py", "exec")
    assert "x" in changed.co_names and "x" not in again.co_names


def test_a_copy_of_the_worker_runs_through_the_shim_as_it_does_cold(shim, tmp_path):
    """The fork server has the worker compiled; a job's copy of it still runs as itself."""
    path, _ = shim
    copy = tmp_path / "AwsS3.py"
    copy.write_bytes(local_forkserver.WORKER.read_bytes())
    (tmp_path / "in.csv").write_text("a,b\n1,2\n", encoding="utf-8")
    warm, cold = (subprocess.run([str(python), str(copy), str(tmp_path / "in.csv")],
                                 capture_output=True, timeout=60, check=False)
                  for python in (path, PYTHON))
    assert warm.returncode == cold.returncode == 0, warm.stderr
    reports = [json.loads(done.stdout) for done in (warm, cold)]
    for report in reports:
        del report["worker"]  # when, how long, on which Python
    assert reports[0] == reports[1] and reports[0]["summary"]["rows"] == 1
