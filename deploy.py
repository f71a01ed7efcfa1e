#!/usr/bin/env python3
"""awsfun deploy: create, inspect and remove the whole pipeline in one AWS account and region.

    ./deploy.sh [deploy] [options]     create or update everything; safe to re-run
                                       (--routes FILE: the routing table, default routes.json)
    ./deploy.sh status [--read N] [--json]
                                       names, running workers, reports counted by status and
                                       format, each error report's stage and reason (reads the
                                       newest N of each: one S3 GET apiece), dead letters, drift
    ./deploy.sh reconcile [--key-prefix K] [--dry-run] [--json]
                                       replay dead letters, launch every unprocessed input
    ./deploy.sh teardown [--yes]       remove what deploy created (data kept unless --delete-data)
    ./deploy.sh deployer-policy        the IAM policy a person needs to run the commands above

Every command takes --prefix P (default su2c), the deployment's name prefix, and --debug
(a mistake is one line on stderr, status 2; --debug adds the traceback).

Uses the caller's usual AWS settings (AWS_PROFILE, AWS_REGION / AWS_DEFAULT_REGION,
AWS_ENDPOINT_URL). Everything is plain boto3 and importable, so the tests drive it
against moto. The IAM policy documents live in iam/ as reviewable JSON templates.
"""

import sys

from awsfun_deploy.core import (  # noqa: F401
    CHANGES, CREATED, Clients, DELETED, DeployError, KEPT, PROPAGATION_TIMEOUT, Progress,
    UPDATED, _get_or_none, canonical, explain_error, mismatches, one_line, retry_while, tag_list,
    wait_out_propagation,
)
from awsfun_deploy.names import (  # noqa: F401
    DEFAULT_INSTANCE_TYPE, STACK_TAG, derive_names, discover_names, resolve_names,
)
from awsfun_deploy.artifacts import (  # noqa: F401
    BOOTSTRAP_KEY, PUBLISHED_FILES, REPO, ROUTES_FILE, WORKER_FILES, build_function_zip,
    code_sha256, software_sources,
)
from awsfun_deploy.routes import load_routes_file  # noqa: F401
from awsfun_deploy.policies import IAM_DIR, policy_documents, policy_values, render_policy  # noqa: F401
from awsfun_deploy.s3 import (  # noqa: F401
    PRIVATE_BLOCK, PUBLIC_READ_SID, list_keys, location_region, notification_config,
    notifications_overlap, publish_software, used_by_tag, with_notification,
    without_notification,
)
from awsfun_deploy.ec2 import (  # noqa: F401
    AMI_PARAMETER, PROFILE_WAIT_DELAY, PROFILE_WAIT_SECONDS, ensure_launch_template,
    read_launch_template, wait_until_ec2_accepts_profile,
)
from awsfun_deploy.function import (  # noqa: F401
    LOG_RETENTION_DAYS, MAX_RETRY_ATTEMPTS, ensure_event_invoke_config, ensure_function,
    function_configuration,
    ensure_s3_invoke_permission,
)
from awsfun_deploy.preflight import (  # noqa: F401
    environment_problems, limit_problems, public_software_problems, report_key_problems,
    tag_problems,
)
from awsfun_deploy.reconcile import (  # noqa: F401
    FAILED, MAX_RELAUNCHES, REPORTED, ended_detail, instance_by_token, object_from_head,
    reconcile, settled_state, state_reason_text, worker_tokens,
)
from awsfun_deploy.stack import (  # noqa: F401
    POLICY_PROPAGATION_SECONDS, deploy, policy_propagation_seconds, teardown,
)
from awsfun_deploy.status import collect_status, print_status  # noqa: F401
from awsfun_deploy.cli import (  # noqa: F401
    COMMANDS, command_first, deployer_policy_fit, main, reconcile_summary,
)

if __name__ == "__main__":
    sys.exit(main())
