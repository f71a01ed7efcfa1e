#!/usr/bin/env python3
"""A fork server for the local cloud's machines: their `python3` starts warm, not cold.

Each machine the local cloud boots runs its user-data with bash, and bash starts
`python3 launcher.pyz ...` once per job. Started cold, that python3 imports boto3 and
parses botocore's models: about 0.6 CPU-seconds before any work, as on a real instance.
A CI burst of 500 machines spends 5 CPU-minutes on it, half its 2-core budget.

With it (LocalCloud(warm_python=True)), each machine finds a `python3` shim first on its
PATH. The shim hands its argument list, environment, working directory and standard
streams (the file descriptors themselves) to this server, which forks a child that has
boto3 imported and botocore's models parsed (one loader shared by every session, as the
test process shares it), and runs the script there as `python3 SCRIPT ARGS` would: as
__main__, with the script's directory (or zip) first on sys.path and Python's exit status.
Signals sent to the shim reach the script; the shim exits with the script's status, or
dies by the signal that ended it; a shim killed outright takes the script with it.

What stays cold: any call with an option before the script (`python3 -c`, `python3 -m
pip`), and every call while the server is not answering, run the real interpreter. What
only a cold start shows (an interpreter or boto3 that fails to import, a slow boot) is
shown by the local cloud without warm_python: the demo, the fault tests and the target
Python's end-to-end job.

    python3 local_forkserver.py serve SOCKET     what LocalCloud starts (prints "ready")
"""

import ast
import atexit
import json
import os
import random
import select
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

FORWARDED_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT,
                     signal.SIGUSR1, signal.SIGUSR2, signal.SIGALRM)
HEADER_BYTES = 8  # the request's length, big-endian, sent with the three descriptors
WORKER = Path(__file__).resolve().parent / "AwsS3.py"


# --- the shim: runs in every machine, on the standard library only ---------------------

def shim_text(socket_path, python):
    """Return the text of a `python3` shim that runs its script on the server at socket_path,
    or execs `python` (the real interpreter) when the server cannot take the call."""
    return (f"#!{python} -IS\n"
            "# The local cloud's warm python3 (local_forkserver.py); -I -S: it starts in ~10 ms.\n"
            "import sys\n"
            f"sys.path.insert(0, {str(Path(__file__).resolve().parent)!r})\n"
            "import local_forkserver\n"
            f"local_forkserver.shim_main({str(socket_path)!r}, {str(python)!r}, sys.argv[1:])\n")


def shim_main(socket_path, python, argv):
    """Run `python3 *argv` on the fork server; exit as the script ended. Never returns."""
    if not argv or argv[0].startswith("-"):
        os.execv(python, [python, *argv])
    connection = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        connection.connect(socket_path)
    except OSError:
        connection.close()
        os.execv(python, [python, *argv])
    # ensure_ascii: argv and the environment may hold undecodable bytes (surrogateescape),
    # which JSON carries as \udcXX escapes and the server gets back unchanged.
    request = json.dumps({"argv": argv, "env": dict(os.environ), "cwd": os.getcwd()}).encode()
    # Forward from before the script can start (else a signal then would kill the shim
    # alone), but held while the request is sent, so that no signal byte splits it.
    signal.pthread_sigmask(signal.SIG_BLOCK, FORWARDED_SIGNALS)
    for signum in FORWARDED_SIGNALS:
        signal.signal(signum, lambda number, _frame: connection.send(bytes([number])))
    socket.send_fds(connection, [len(request).to_bytes(HEADER_BYTES, "big")], [0, 1, 2])
    connection.sendall(request)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, FORWARDED_SIGNALS)
    reply = b""
    while not reply.endswith(b"\n"):
        chunk = connection.recv(64)
        if not chunk:
            sys.stderr.write("python3: the local cloud's fork server went away\n")
            os._exit(1)
        reply += chunk
    kind, value = reply.split()
    if kind == b"signal":
        if int(value) in FORWARDED_SIGNALS:  # SIGKILL and SIGSTOP take no handler
            signal.signal(int(value), signal.SIG_DFL)
        os.kill(os.getpid(), int(value))
    os._exit(int(value))


# --- the server -------------------------------------------------------------------------

def start(socket_path, log_path, python=sys.executable, timeout=60):
    """Start a server on socket_path in a session of its own, its output in log_path; return
    its Popen once it is warm. Raises RuntimeError if it exits or is not warm by `timeout` s.

    The server lives as long as this process holds the Popen's stdin, a pipe: it ends when
    this process does, killed or not (a session of its own escapes the caller's group).
    """
    with open(log_path, "wb") as output:
        process = subprocess.Popen([str(python), __file__, "serve", str(socket_path)],
                                   stdin=subprocess.PIPE, stdout=output,
                                   stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + timeout
    while b"ready" not in Path(log_path).read_bytes():
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            process.wait()
            output = Path(log_path).read_text(errors="replace")[-2000:]
            raise RuntimeError(f"the fork server did not start: {output}")
        time.sleep(0.05)
    return process


def served(log_path):
    """Return how many calls the server writing log_path has taken."""
    return Path(log_path).read_bytes().count(b"served\n")


def share_botocore_models():
    """Give every botocore Session in this process one model loader.

    botocore parses its JSON models (S3's endpoint rules, EC2's, endpoints.json) once per
    Session. The models are read-only data, so one loader per data path changes nothing a
    caller sees. The test process uses it for its hundreds of sessions, and the fork server
    so that each job's boto3.Session() finds them parsed.
    """
    import botocore.loaders
    import botocore.session

    loaders = {}

    def create_loader(search_path_string=None):
        if search_path_string not in loaders:
            loaders[search_path_string] = botocore.loaders.create_loader(search_path_string)
        return loaders[search_path_string]

    botocore.session.create_loader = create_loader


def worker_imports(path=WORKER):
    """Return the top-level module names the worker imports (its standard library)."""
    tree = ast.parse(Path(path).read_text(encoding="utf-8"))
    return sorted({alias.name for node in tree.body if isinstance(node, ast.Import)
                   for alias in node.names})


def with_filename(code, filename):
    """Return `code` and every code object nested in it with co_filename set (pure)."""
    consts = tuple(with_filename(const, filename) if isinstance(const, type(code)) else const
                   for const in code.co_consts)
    return code.replace(co_filename=filename, co_consts=consts)


def cache_compiled(path=WORKER):
    """Make compile() of `path`'s exact bytes, under any file name, reuse one compilation.

    Each job's launcher fetches the worker and runs it (runpy: compile(bytes, name, "exec")),
    33 ms of CPU a job for the same bytes: this is the .pyc Python keeps for an imported
    module. Any other source, or changed bytes, compiles as before.
    """
    import builtins

    source = Path(path).read_bytes()
    compiled = compile(source, str(path), "exec")
    original = builtins.compile

    def compile_once(text, filename, mode, *args, **kwargs):
        if mode == "exec" and not args and not kwargs and text == source:
            return with_filename(compiled, os.fsdecode(filename))
        return original(text, filename, mode, *args, **kwargs)

    builtins.compile = compile_once


def warm_up():
    """Import what every job imports, parse the S3 models a job's client needs, and compile
    the worker once."""
    import importlib

    import boto3
    from botocore.config import Config

    share_botocore_models()
    cache_compiled()
    for name in worker_imports():
        importlib.import_module(name)
    # No request is sent: building the client only loads and parses its models.
    boto3.Session(region_name="us-east-1", aws_access_key_id="warm",
                  aws_secret_access_key="warm").client(
        "s3", endpoint_url="http://127.0.0.1:9", config=Config(signature_version="s3v4"))


def receive_request(connection):
    """Return (request dict, [stdin, stdout, stderr] descriptors) sent by shim_main."""
    header, fds, _, _ = socket.recv_fds(connection, HEADER_BYTES, 3)
    length, data = int.from_bytes(header, "big"), b""
    while len(data) < length:
        chunk = connection.recv(length - len(data))
        if not chunk:
            raise EOFError("the shim closed its connection mid-request")
        data += chunk
    return json.loads(data), fds


def exit_code(status):
    """Return Python's exit code for SystemExit's `status` (None: 0; text: printed, 1)."""
    if status is None:
        return 0
    if isinstance(status, int):
        return status
    sys.stderr.write(f"{status}\n")
    return 1


def become_python(request, fds):
    """In the forked child: run request's script as a fresh `python3 SCRIPT ARGS`. Never returns."""
    for target, fd in enumerate(fds):
        os.dup2(fd, target)
        if fd > 2:
            os.close(fd)
    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update(request["env"])
    for signum in (signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR1,
                   signal.SIGUSR2, signal.SIGALRM, signal.SIGCHLD):
        signal.signal(signum, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    random.seed()  # a fresh interpreter seeds from the OS; a fork would share the server's
    import runpy
    import zipfile

    script = request["argv"][0]
    sys.argv = list(request["argv"])
    # python3 SCRIPT puts the script's directory first on sys.path (a zip: the zip itself),
    # never the server's own directory.
    sys.path[0] = script if zipfile.is_zipfile(script) else os.path.dirname(os.path.abspath(script))
    code = 0
    try:
        runpy.run_path(script, run_name="__main__")
    except SystemExit as done:
        code = exit_code(done.code)
    except KeyboardInterrupt:
        signal.signal(signal.SIGINT, signal.SIG_DFL)  # Python dies by SIGINT (bpo-1054041)
        os.kill(os.getpid(), signal.SIGINT)
    except BaseException:  # noqa: BLE001 - what python3 does: the traceback, then status 1
        sys.excepthook(*sys.exc_info())
        code = 1
    # Interpreter shutdown: wait for non-daemon threads, run atexit (logging flushes there).
    import threading
    getattr(threading, "_shutdown", lambda: None)()
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(code & 0xFF)


def supervise(pid, connection):
    """Forward the shim's signals to `pid` until it ends; SIGKILL it if the shim goes.
    Return its exit code (-N: killed by signal N)."""
    pidfd = os.pidfd_open(pid)
    try:
        while True:
            ready, _, _ = select.select([connection, pidfd], [], [])
            if pidfd in ready:
                break
            data = connection.recv(64)
            if not data:  # the shim was killed outright: so is the script, as its child would be
                os.kill(pid, signal.SIGKILL)
                break
            for signum in data:
                os.kill(pid, signum)
    finally:
        os.close(pidfd)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


def serve_connection(connection):
    """In a child of the server: run one shim's call and send back how it ended."""
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    request, fds = receive_request(connection)
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:
        connection.close()
        become_python(request, fds)
    for fd in fds:
        os.close(fd)
    code = supervise(pid, connection)
    reply = f"signal {-code}\n" if code < 0 else f"exit {code}\n"
    try:
        connection.sendall(reply.encode())
    except OSError:
        pass  # the shim is gone


def serve(socket_path):
    """Warm up, print "ready", then fork a child per connection until killed or until stdin
    ends (the process that started it is gone)."""
    warm_up()
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # the kernel reaps the per-call children
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(socket_path)
    listener.listen(128)
    print("ready", flush=True)
    while True:
        ready, _, _ = select.select([listener, sys.stdin], [], [])
        if sys.stdin in ready and not os.read(sys.stdin.fileno(), 1):
            return
        if listener not in ready:
            continue
        connection, _ = listener.accept()
        if os.fork() == 0:
            listener.close()
            code = 1
            try:
                serve_connection(connection)
                code = 0
            finally:
                os._exit(code)
        connection.close()
        print("served", flush=True)


if __name__ == "__main__":
    if sys.argv[1:2] != ["serve"] or len(sys.argv) != 3:
        sys.exit(__doc__.rsplit("\n\n", 1)[-1])
    serve(sys.argv[2])
