"""The IAM policy documents of iam/, rendered for one deployment."""

from __future__ import annotations

import json
import re
import string

from .artifacts import LAUNCHER_SOFTWARE_KEYS, PUBLISHED_FILES, REPO, WORKER_FILES

IAM_DIR = REPO / "iam"
_WHOLE_PLACEHOLDER = re.compile(r"^\$\{(\w+)\}$")


def _render_value(value, values):
    if isinstance(value, dict):
        return {key: _render_value(item, values) for key, item in value.items()}
    if isinstance(value, list):
        rendered = []
        for item in value:
            item = _render_value(item, values)
            # A list item that is a list-valued placeholder splices its items in place.
            rendered.extend(item if isinstance(item, list) else [item])
        return rendered
    if isinstance(value, str):
        whole = _WHOLE_PLACEHOLDER.match(value)
        if whole and isinstance(values.get(whole.group(1)), (list, tuple)):
            return list(values[whole.group(1)])
        return string.Template(value).substitute(values)
    return value


def render_policy(name, values):
    """Render iam/NAME.json: `${Name}` placeholders from values; list values splice into lists."""
    template = json.loads((IAM_DIR / f"{name}.json").read_text(encoding="utf-8"))
    return _render_value(template, values)


def policy_values(names, launch_template_ids=(), published_files=PUBLISHED_FILES):
    """Return the values the iam/ templates are rendered with."""
    software = f"arn:{names.partition}:s3:::{names.software_bucket}"
    # Workers never read the routing table: their route arrives in the user-data.
    worker_files = [key for key in published_files if key in WORKER_FILES]
    return {
        "Partition": names.partition,
        "Region": names.region,
        "AccountId": names.account,
        "DataBucket": names.data_bucket,
        "SoftwareBucket": names.software_bucket,
        "LogGroup": names.log_group,
        "WorkerRoleArn": names.worker_role_arn,
        "DeadLetterQueueArn": names.dlq_arn,
        "LaunchTemplateArns": [names.launch_template_arn(i) for i in launch_template_ids],
        "WorkerSoftwareObjectArns": [f"{software}/{key}" for key in worker_files],
        "LauncherSoftwareObjectArns": [f"{software}/{key}" for key in LAUNCHER_SOFTWARE_KEYS],
    }


def policy_documents(names, launch_template_ids):
    """Return every rendered policy document by template name (what deploy applies)."""
    if isinstance(launch_template_ids, str):
        launch_template_ids = [launch_template_ids]
    values = policy_values(names, launch_template_ids)
    return {
        name: render_policy(name, values)
        for name in ("worker-trust", "worker-policy", "lambda-trust", "lambda-policy",
                     "software-public-read")
    }
