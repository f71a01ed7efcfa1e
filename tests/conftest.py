"""Shared fixtures: fake credentials, an in-process moto server, a recording `shutdown`."""

import os
import sys
import urllib.request
from pathlib import Path

import pytest


def _fewer_moto_images():
    """Give moto's EC2 its generic images and Amazon Linux 2023's, not ~1,300 a region.

    moto builds every image it knows (mostly ECS-optimised ones) into each EC2 backend, and
    the suite makes hundreds (each test, each reset): 0.13 CPU-s apiece. The project only
    uses Amazon Linux 2023, found through its SSM parameters, whose images stay: all
    regions' AL2023 images go to every region. Set before moto's EC2 module loads.
    """
    import atexit
    import gzip
    import json
    import tempfile

    import moto

    resources = Path(moto.__file__).parent / "ec2" / "resources"
    images = json.loads(gzip.decompress((resources / "amis.json.gz").read_bytes()))
    for latest in sorted((resources / "latest_amis").glob("*.json.gz")):
        images += [image for image in json.loads(gzip.decompress(latest.read_bytes()))
                   if image["name"].startswith("al2023-ami-")]
    handle, path = tempfile.mkstemp(prefix="awsfun-moto-images-", suffix=".json")
    with os.fdopen(handle, "w", encoding="utf-8") as out:
        json.dump(images, out)
    atexit.register(os.unlink, path)
    os.environ["MOTO_AMIS_PATH"] = path


_fewer_moto_images()
from moto.server import ThreadedMotoServer  # noqa: E402 - after MOTO_AMIS_PATH is set

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))

# deploy and lambda_function are imported where used, not here: the worker's tests also run
# under the target's Python 3.9 (tests/test_target_python.py), which need not run either.
from support import ShutdownStub  # noqa: E402
from local_forkserver import share_botocore_models  # noqa: E402

REGION = "us-east-1"


# Every botocore Session in the test process gets one model loader: parsing the JSON models
# per Session was a sixth of the in-process tests' CPU. Subprocesses (deploy.sh, machines
# started cold) parse their own, as on AWS.
share_botocore_models()


def pytest_collection_modifyitems(items):
    """Start the long_running tests first: pytest-xdist's workers (pytest.ini) then run the
    short ones beside them, instead of one worker finishing a burst alone at the end."""
    items.sort(key=lambda item: item.get_closest_marker("long_running") is None)


@pytest.fixture(autouse=True)
def aws_credentials(monkeypatch):
    """Fake credentials for every test; no test may reach a real account or IMDS."""
    for name in ("AWS_PROFILE", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3",
                 "AWS_IGNORE_CONFIGURED_ENDPOINT_URLS", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN",
                 "AWS_CONFIG_FILE", "AWS_SHARED_CREDENTIALS_FILE", "DRY_RUN"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", REGION)
    monkeypatch.setenv("AWS_REGION", REGION)
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.setenv("AWS_CONFIG_FILE", os.devnull)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", os.devnull)
    _clear_handler_caches()
    yield
    _clear_handler_caches()


def _clear_handler_caches():
    """Empty the handler's warm-container caches, if a test module has imported it."""
    handler = sys.modules.get("lambda_function")
    if handler is not None:
        handler._clients.clear()
        handler._template_cache.clear()


@pytest.fixture(scope="session", autouse=True)
def faster_moto():
    """moto's own hot spots, for the in-process mocks and the servers (local_cloud.speed_up_moto)."""
    from local_cloud import speed_up_moto

    speed_up_moto()


@pytest.fixture(scope="session")
def moto_endpoint():
    """A moto server on a free loopback port for the whole session (quiet: see LocalCloud.start)."""
    import logging

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


@pytest.fixture
def local_aws(moto_endpoint, monkeypatch):
    """Point boto3 (and child processes) at the moto server; reset its state afterwards."""
    monkeypatch.setenv("AWS_ENDPOINT_URL", moto_endpoint)
    yield moto_endpoint
    request = urllib.request.Request(f"{moto_endpoint}/moto-api/reset", method="POST")
    urllib.request.urlopen(request, timeout=10).close()


@pytest.fixture
def clients(local_aws):
    """deploy.Clients pointed at the moto server (AWS_ENDPOINT_URL is set by local_aws)."""
    import deploy

    return deploy.Clients()


@pytest.fixture
def names(clients):
    """The default deploy names (prefix su2c) for the moto server's account and region."""
    import deploy

    return deploy.resolve_names(clients)


@pytest.fixture
def shutdown_stub(tmp_path):
    """A `shutdown` first on PATH that records its arguments instead of powering off."""
    return ShutdownStub(tmp_path / "stub")


@pytest.fixture
def deployed(clients, names):
    """One deploy on an empty endpoint; returns (result, progress, create_function params)."""
    import deploy

    captured = {}

    def capture(params, **_):
        captured.update(params)

    clients("lambda").meta.events.register("provide-client-params.lambda.CreateFunction", capture)
    progress = deploy.Progress(echo=False)
    result = deploy.deploy(clients, names, progress=progress)
    return result, progress, captured
