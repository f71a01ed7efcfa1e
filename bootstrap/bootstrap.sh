#!/usr/bin/env bash
# awsfun worker bootstrap: EC2 user-data for one S3 object.
#
# lambda_function.render_user_data replaces the marker line below with the job:
# bucket, key and friends as base64 values, so no part of a key is ever parsed
# by the shell. Runs as root under cloud-init, or under plain bash anywhere
# with AWS credentials, AWS_DEFAULT_REGION and optionally AWS_ENDPOINT_URL.
# Whatever happens, it ends with `shutdown -h now`.
set -euo pipefail
umask 077

: __AWSFUN_JOB__

export HOME="${HOME:-/root}"
REPORTED=""
HAVE_PYTHON=""
WORK_DIR=""
LOG_FILE=""
LOG_CURL_CONFIG=""
LOG_KEY=""
TEE_PID=""
SIGNALLED=""

log() {
  printf '%s awsfun-bootstrap: %s\n' "$(date -u +%Y-%m-%dT%H:%M:%SZ)" "$*" >&2
}

# b64_decode VAR VALUE: decode into VAR, keeping trailing newlines.
b64_decode() {
  local decoded
  decoded="$(printf '%s' "$2" | base64 -d && printf x)"
  printf -v "$1" '%s' "${decoded%x}"
}

# json_string TEXT: TEXT as a JSON string literal (UTF-8 passes through).
json_string() {
  local LC_ALL=C
  local text="$1" out="" ch code i
  for ((i = 0; i < ${#text}; i++)); do
    ch="${text:i:1}"
    case "$ch" in
      '"') out+='\"' ;;
      \\) out+="\\\\" ;;
      [[:cntrl:]]) printf -v code '\\u%04x' "'$ch"; out+="$code" ;;
      *) out+="$ch" ;;
    esac
  done
  printf '"%s"' "$out"
}

# report_key KEY SUFFIX: where a report for KEY goes (same rule as AwsS3.report_key).
report_key() {
  local key="$1" suffix="$2" candidate
  candidate="analysis/${key}${suffix}"
  if (($(printf '%s' "$candidate" | wc -c) > 1024)); then
    printf 'analysis/_long/%s%s' "$(printf '%s' "$key" | sha256sum | cut -d' ' -f1)" "$suffix"
  else
    printf '%s' "$candidate"
  fi
}

# have_python: true when python3 can use boto3. The answer is remembered in HAVE_PYTHON:
# each python3 start costs a fifth of a second, and a job asks several times. Locating the
# modules (not importing them) is enough here; an import that fails reports itself.
have_python() {
  if [[ -z "$HAVE_PYTHON" ]]; then
    HAVE_PYTHON=no
    if command -v python3 >/dev/null 2>&1 && python3 -c 'import sys
from importlib.util import find_spec
sys.exit(not (find_spec("boto3") and find_spec("botocore")))' >/dev/null 2>&1; then
      HAVE_PYTHON=yes
    fi
  fi
  [[ "$HAVE_PYTHON" == yes ]]
}

# What both python3 helpers below start with: no module shadowed from the current directory
# (python3 - and -c put it first), boto3 or exit 127, botocore's standard retries.
IFS= read -r -d '' PY_S3_PRELUDE <<'PY' || true
import sys
del sys.path[0]
import os
try:
    import boto3
    from botocore.config import Config
except ImportError as err:
    sys.stderr.write(f"awsfun-bootstrap: python3 cannot import boto3: {err}\n")
    sys.exit(127)
S3_CONFIG = Config(retries={"mode": "standard", "max_attempts": 5}, signature_version="s3v4")
# Passed on: botocore < 1.31.0 ignores these.
S3_ENDPOINT = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or None
PY

# Run by python3 after PY_S3_PRELUDE, with BUCKET KEY FILE CONTENT_TYPE: one PutObject.
IFS= read -r -d '' PY_S3_PUT <<'PY' || true
bucket, key, path, content_type = (os.fsencode(a).decode("utf-8") for a in sys.argv[1:5])
s3 = boto3.client("s3", config=S3_CONFIG, endpoint_url=S3_ENDPOINT)
with open(path, "rb") as body:
    s3.put_object(Bucket=bucket, Key=key, Body=body, ContentType=content_type)
PY

# s3_put_python BUCKET KEY FILE CONTENT_TYPE: one PutObject with boto3; 127 if it cannot load.
s3_put_python() {
  python3 - "$@" <<<"$PY_S3_PRELUDE$PY_S3_PUT"
}

# s3_put BUCKET KEY FILE [CONTENT_TYPE]: boto3 if usable, else the AWS CLI.
s3_put() {
  local bucket="$1" key="$2" file="$3" content_type="${4:-text/plain}" status=0
  if have_python; then
    s3_put_python "$bucket" "$key" "$file" "$content_type" || status=$?
    if ((status != 127)); then
      return "$status"
    fi
    HAVE_PYTHON=no
  fi
  if command -v aws >/dev/null 2>&1; then
    # Passed on: AWS CLIs before 1.29.0 and 2.13.0 ignore these.
    local url="${AWS_ENDPOINT_URL_S3:-${AWS_ENDPOINT_URL:-}}" endpoint=()
    [[ -n "$url" ]] && endpoint=(--endpoint-url "$url")
    aws "${endpoint[@]}" s3api put-object --bucket "$bucket" --key "$key" --body "$file" \
      --content-type "$content_type" >/dev/null
  else
    log "neither python3 with boto3 nor the aws CLI is available for S3"
    return 127
  fi
}

# Run by python3 -c after PY_S3_PRELUDE, with FETCH_FAILED WORKER_PATH SOFTWARE_BUCKET
# WORKER_KEY DATA_BUCKET LOG_KEY LOG_CURL_CONFIG WORKER_ARGS...: fetch AwsS3.py and run it
# in this same process, then presign the log's upload for curl. Each python3 start that loads boto3 costs a
# quarter of a CPU-second; this way a job needs one, not three.
# Exit status: the worker's own, FETCH_FAILED when it cannot be fetched, 127 without boto3,
# 1 when the worker raised (at import too), the cause then in WORKER_PATH.crash.
FETCH_FAILED=4
WORKER_REPORTED=5  # AwsS3.EXIT_FAILED_REPORTED: any other failure's report is ours to write
IFS= read -r -d '' WORKER_LAUNCHER <<'PY' || true
import runpy
import traceback
fetch_failed = int(sys.argv[1])
path, bucket, key, data_bucket, log_key, curl_config = (
    os.fsencode(a).decode("utf-8") for a in sys.argv[2:8])
try:
    s3 = boto3.client("s3", config=S3_CONFIG, endpoint_url=S3_ENDPOINT)
    s3.download_file(bucket, key, path)
except Exception as err:
    sys.stderr.write(f"awsfun-bootstrap: cannot fetch s3://{bucket}/{key}: {err}\n")
    sys.exit(fetch_failed)
sys.argv = [path, *sys.argv[8:]]
try:
    runpy.run_path(path, run_name="__main__")
except Exception as err:
    traceback.print_exc()  # as Python would, and the cause for the bootstrap's report
    with open(path + ".crash", "w", encoding="utf-8", errors="backslashreplace") as crash:
        crash.write(f"{type(err).__name__}: {err}"[:500])
    sys.exit(1)
finally:
    # Valid for minutes, for this one PUT, and kept out of argv and the log. Without it the
    # bootstrap uploads with boto3, so a failure here must not replace the worker's status.
    try:
        url = s3.generate_presigned_url("put_object", ExpiresIn=900,
                                        Params={"Bucket": data_bucket, "Key": log_key})
        with open(curl_config, "w", encoding="utf-8") as config:
            config.write(f'url = "{url}"\n')
    except Exception as err:
        sys.stderr.write(f"awsfun-bootstrap: cannot presign the log upload: {err}\n")
PY

instance_id() {
  local tag=/sys/devices/virtual/dmi/id/board_asset_tag
  if [[ -r "$tag" && "$(cat "$tag")" == i-* ]]; then
    cat "$tag"
  else
    printf '%s' "${AWSFUN_INSTANCE_ID:-unknown}"
  fi
}

# write_error_report STAGE MESSAGE EXIT_CODE: the report for a job the worker could not finish.
write_error_report() {
  local stage="$1" message="$2" code="$3" file
  file="$WORK_DIR/error.json"
  printf '{"input": {"bucket": %s, "key": %s, "etag": %s}, "status": "error", "stage": %s, "error": %s, "exit_code": %s, "instance_id": %s, "written_by": "bootstrap", "time": "%s"}\n' \
    "$(json_string "$JOB_BUCKET")" "$(json_string "$JOB_KEY")" "$(json_string "$JOB_ETAG")" \
    "$(json_string "$stage")" "$(json_string "$message")" "$code" \
    "$(json_string "$(instance_id)")" "$(date -u +%Y-%m-%dT%H:%M:%SZ)" >"$file"
  if s3_put "$JOB_BUCKET" "$(report_key "$JOB_KEY" .error.json)" "$file" application/json; then
    REPORTED=yes
    log "wrote error report for stage $stage"
  else
    log "could not write the error report for stage $stage"
  fi
}

# upload_log: the run's log to analysis/KEY.log. With the upload the launcher presigned,
# curl sends it without starting python3 again; otherwise (or should that fail) s3_put.
upload_log() {
  if [[ -s "$LOG_CURL_CONFIG" ]] && command -v curl >/dev/null 2>&1; then
    # --path-as-is: else curl squashes a key's /./ and /../, which S3 keeps.
    if curl --config "$LOG_CURL_CONFIG" --path-as-is --silent --show-error --fail --globoff \
      --header 'Expect:' --header 'Content-Type: text/plain' --upload-file "$LOG_FILE" \
      --output /dev/null; then
      return 0
    fi
    log "curl could not upload the log; trying again with boto3"
  fi
  s3_put "$JOB_BUCKET" "$LOG_KEY" "$LOG_FILE" text/plain
}

# on_signal NAME STATUS: remember which signal stopped the job, then exit through on_exit.
on_signal() {
  SIGNALLED="$1"
  exit "$2"
}

on_exit() {
  local status=$?
  set +e
  trap - ERR EXIT
  # Should the log pipe be gone, a write must fail, not kill the shell before its report.
  trap '' PIPE
  local message="bootstrap failed with status $status"
  if [[ -n "$SIGNALLED" ]]; then
    message="stopped by SIG$SIGNALLED (status $status): the machine is shutting down (its watchdog fired, or it was stopped)"
  fi
  if ((status != 0)) && [[ -z "$REPORTED" && -n "${JOB_KEY+set}" && -n "$WORK_DIR" ]]; then
    write_error_report bootstrap "$message" "$status"
  fi
  log "finished with status $status; shutting down"
  if [[ -n "$TEE_PID" ]]; then
    exec 1>&3 2>&4
    wait "$TEE_PID" 2>/dev/null
  fi
  if [[ -n "$LOG_KEY" && -s "$LOG_FILE" ]]; then
    upload_log || log "could not upload the log"
  fi
  [[ -n "$WORK_DIR" ]] && rm -rf "$WORK_DIR"
  shutdown -h now
}

ensure_boto3() {
  have_python && return 0
  command -v python3 >/dev/null 2>&1 || return 1
  log "boto3 missing; installing it"
  if command -v dnf >/dev/null 2>&1; then
    dnf install -y -q python3-boto3 || python3 -m pip install -q boto3 || true
  else
    python3 -m pip install -q boto3 || true
  fi
  HAVE_PYTHON=""
  have_python
}

main() {
  trap on_exit EXIT
  trap 'on_signal TERM 143' TERM
  trap 'on_signal INT 130' INT
  trap 'on_signal HUP 129' HUP
  WORK_DIR="$(mktemp -d "${TMPDIR:-/tmp}/awsfun.XXXXXX")"
  LOG_FILE="$WORK_DIR/bootstrap.log"
  LOG_CURL_CONFIG="$WORK_DIR/log-upload.curl"
  exec 3>&1 4>&2
  # A shutdown sends SIGTERM to every process: tee must outlive it, or the error report and
  # the log written after it would go to a closed pipe. It ends when the shell closes it.
  exec > >(trap '' TERM INT HUP && exec tee -a "$LOG_FILE") 2>&1
  TEE_PID=$!
  if [[ -z "${JOB_BUCKET_B64:-}" ]]; then
    log "this is the unrendered template: lambda_function.render_user_data fills in the job"
    return 2
  fi
  b64_decode JOB_BUCKET "$JOB_BUCKET_B64"
  b64_decode JOB_KEY "$JOB_KEY_B64"
  LOG_KEY="$(report_key "$JOB_KEY" .log)"
  b64_decode JOB_ETAG "$JOB_ETAG_B64"
  b64_decode JOB_SOFTWARE_BUCKET "$JOB_SOFTWARE_BUCKET_B64"
  b64_decode JOB_WORKER_KEY "$JOB_WORKER_KEY_B64"
  b64_decode JOB_REGION "$JOB_REGION_B64"
  b64_decode JOB_COMMAND "${JOB_COMMAND_B64:-}"
  export AWS_DEFAULT_REGION="${AWS_DEFAULT_REGION:-$JOB_REGION}"
  log "job: s3://$JOB_BUCKET/$JOB_KEY on $(instance_id); watchdog ${JOB_WATCHDOG_MINUTES} min"
  # Last resort for a hung machine; the worker's own time limit below fires first.
  shutdown -h "+$JOB_WATCHDOG_MINUTES" "awsfun watchdog" || log "could not arm the watchdog"

  if ! ensure_boto3; then
    # write_error_report falls back to the AWS CLI when Python cannot do it.
    write_error_report start "python3 with boto3 is not available on this machine" 127
    return 127
  fi
  local status=0
  local -a worker_args=()
  if [[ -n "$JOB_COMMAND" ]]; then
    # The route's argument list, as JSON: the worker runs it without a shell.
    worker_args=(--command "$JOB_COMMAND")
  fi
  AWSFUN_EXPECTED_ETAG="$JOB_ETAG" timeout -k 30 "$JOB_TIMEOUT_SECONDS" \
    python3 -c "$PY_S3_PRELUDE$WORKER_LAUNCHER" "$FETCH_FAILED" "$WORK_DIR/AwsS3.py" \
    "$JOB_SOFTWARE_BUCKET" "$JOB_WORKER_KEY" "$JOB_BUCKET" "$LOG_KEY" \
    "$LOG_CURL_CONFIG" "${worker_args[@]}" "s3://$JOB_BUCKET/$JOB_KEY" ||
    status=$?
  case "$status" in
    0) log "worker succeeded" ;;
    "$WORKER_REPORTED") log "worker failed and wrote its error report"; REPORTED=yes ;;
    "$FETCH_FAILED") write_error_report fetch "cannot fetch s3://$JOB_SOFTWARE_BUCKET/$JOB_WORKER_KEY" "$status" ;;
    1) write_error_report worker "worker crashed: $(cat "$WORK_DIR/AwsS3.py.crash" 2>/dev/null || echo 'see its traceback in the log')" "$status" ;;
    124) write_error_report worker "worker exceeded its time limit of ${JOB_TIMEOUT_SECONDS}s" "$status" ;;
    137) write_error_report worker "worker was killed (SIGKILL: out of memory, or still running 30s past its time limit of ${JOB_TIMEOUT_SECONDS}s)" "$status" ;;
    *) write_error_report worker "worker exited with status $status" "$status" ;;
  esac
  return "$status"
}

main "$@"
