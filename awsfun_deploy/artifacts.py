"""The files deploy publishes and packages: what goes to the software bucket and the function."""

from __future__ import annotations

import base64
import hashlib
import io
import zipfile
from pathlib import Path

import lambda_function

REPO = Path(__file__).resolve().parent.parent
BOOTSTRAP_KEY = lambda_function.DEFAULTS["BOOTSTRAP_KEY"]
ROUTES_KEY = lambda_function.DEFAULTS["ROUTES_KEY"]
LAUNCHER_KEY = lambda_function.LAUNCHER_KEY
# The routing table deploy validates, publishes and packages unless --routes names another.
ROUTES_FILE = REPO / ROUTES_KEY
# What a worker fetches (and, with --public-software, what anyone may read).
WORKER_FILES = ("AwsS3.py", BOOTSTRAP_KEY)
# The one allowlist of files published to the software bucket, at their repository
# paths. Nothing else is ever uploaded (never anything under private/).
# The launcher is not a worker file: it reaches the machine inside the user-data.
PUBLISHED_FILES = WORKER_FILES + (LAUNCHER_KEY, ROUTES_KEY)
# What the Lambda may read from the software bucket: its user-data template and launcher, and
# the routing table.
LAUNCHER_SOFTWARE_KEYS = (BOOTSTRAP_KEY, LAUNCHER_KEY, ROUTES_KEY)
# Files packaged into the function's zip, at the paths read_software_file looks for first.
FUNCTION_FILES = ("lambda_function.py", BOOTSTRAP_KEY, LAUNCHER_KEY, ROUTES_KEY)


def file_sha256(path):
    """Hex SHA-256 of a local file."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def software_sources(routes_file=ROUTES_FILE, repo=REPO):
    """Return {published key: local file}: the repository files, the routing table from routes_file."""
    sources = {key: Path(repo) / key for key in set(PUBLISHED_FILES) | set(FUNCTION_FILES)}
    sources[ROUTES_KEY] = Path(routes_file)
    return sources


def build_function_zip(repo=REPO, files=FUNCTION_FILES, sources=None):
    """Return the function's zip: the handler with the bootstrap template and routes beside it, reproducibly."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for name in files:
            # Fixed timestamps and modes: the same sources give the same bytes, so a
            # re-run can tell from CodeSha256 that nothing changed.
            info = zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0))
            info.external_attr = 0o644 << 16
            info.compress_type = zipfile.ZIP_DEFLATED
            archive.writestr(info, ((sources or {}).get(name) or Path(repo) / name).read_bytes())
    return buffer.getvalue()


def code_sha256(zip_bytes):
    """Lambda's CodeSha256 of a zip: base64 of its SHA-256."""
    return base64.b64encode(hashlib.sha256(zip_bytes).digest()).decode("ascii")
