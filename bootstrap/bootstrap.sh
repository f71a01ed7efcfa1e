#!/usr/bin/env bash
# awsfun worker bootstrap: EC2 user-data for one S3 object.
#
# render_user_data (lambda_function) puts the job on the marker line as base64 data: keys,
# and bootstrap/launcher.py as a zip that fetches, runs and reports on AwsS3.py. The shell
# only does what Python cannot. Runs under cloud-init, or plain bash with AWS credentials,
# AWS_DEFAULT_REGION and optionally AWS_ENDPOINT_URL. On EC2 it always ends with
# `shutdown -h now`. As an AWS Batch job (`bash -c SCRIPT`, AWS_BATCH_JOB_ID set, the job's
# values in the environment: lambda_function.batch_job_script) it arms no watchdog and shuts
# nothing down: the job's timeout stops it, and the job ends with the script's status.
set -euo pipefail
umask 077

: __AWSFUN_JOB__

export HOME="${HOME:-/root}"
WORKER_REPORTED=5  # AwsS3.EXIT_FAILED_REPORTED
REPORTED="" WORK_DIR="" LOG_FILE="" TEE_PID="" SIGNALLED="" LAUNCHER_PID=""
CONTAINER="${AWS_BATCH_JOB_ID:+yes}"
if [[ -n "$CONTAINER" ]]; then
  # The report's instance_id: the job and its attempt. No instance metadata: a container
  # may not reach it (hop limit 1), and its credentials come from the job role.
  export AWSFUN_INSTANCE_ID="$AWS_BATCH_JOB_ID${AWS_BATCH_JOB_ATTEMPT:+#$AWS_BATCH_JOB_ATTEMPT}"
  export AWS_EC2_METADATA_DISABLED=true
fi

# bash's own clock (printf %(...)T): no `date` process for each line.
log() { TZ=UTC printf '%(%Y-%m-%dT%H:%M:%SZ)T awsfun-bootstrap: %s\n' -1 "$*" >&2; }

# decode_job: JOB_FIELDS_B64 (NUL-terminated UTF-8 fields in lambda_function.JOB_FIELDS
# order) into JOB_BUCKET ... JOB_COMMAND, byte for byte; one base64 process for them all.
decode_job() {
  local -a fields
  local name i=0
  mapfile -d '' -t fields < <(base64 -d <<<"$JOB_FIELDS_B64")
  for name in BUCKET KEY ETAG ERROR_KEY LOG_KEY REGION SOFTWARE_BUCKET WORKER_KEY COMMAND; do
    printf -v "JOB_$name" '%s' "${fields[i++]-}"
  done
  ((${#fields[@]} == i))
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

# s3_put KEY FILE CONTENT_TYPE: one PutObject with the AWS CLI when Python cannot. Endpoint passed
# on (CLIs before 1.29.0/2.13.0 ignore the variables); credentials asked of instance metadata
# 5 times, 3 s each, not once for 1 s (AWS SDKs and Tools Reference, EC2 instance metadata).
# Without the CLI (a Batch job's image has python3 and boto3 only), boto3 if it imports.
s3_put() {
  local url="${AWS_ENDPOINT_URL_S3:-${AWS_ENDPOINT_URL:-}}" endpoint=()
  [[ -n "$url" ]] && endpoint=(--endpoint-url "$url")
  command -v aws >/dev/null 2>&1 || {
    python3 -c 'import sys,boto3;b,k,f,t,u=sys.argv[1:];boto3.client("s3",endpoint_url=u or None).upload_file(f,b,k,ExtraArgs={"ContentType":t})' \
      "$JOB_BUCKET" "$1" "$2" "$3" "$url" && return 0
    log "neither python3 with boto3 nor the aws CLI is available for S3 (or boto3 failed)" && return 127; }
  AWS_METADATA_SERVICE_NUM_ATTEMPTS="${AWS_METADATA_SERVICE_NUM_ATTEMPTS:-5}" \
    AWS_METADATA_SERVICE_TIMEOUT="${AWS_METADATA_SERVICE_TIMEOUT:-3}" aws "${endpoint[@]}" \
    s3api put-object --bucket "$JOB_BUCKET" --key "$1" --body "$2" --content-type "$3" >/dev/null
}

# write_error_report STAGE MESSAGE EXIT_CODE: the report Python could not write.
write_error_report() {
  local file="$WORK_DIR/error.json" id="${AWSFUN_INSTANCE_ID:-unknown}"
  local tag=/sys/devices/virtual/dmi/id/board_asset_tag
  [[ -z "$CONTAINER" && -r "$tag" && "$(cat "$tag")" == i-* ]] && id="$(cat "$tag")"
  printf '{"input": {"bucket": %s, "key": %s, "etag": %s}, "status": "error", "stage": "%s", "error": %s, "exit_code": %s, "instance_id": %s, "written_by": "bootstrap", "time": "%s"}\n' \
    "$(json_string "$JOB_BUCKET")" "$(json_string "$JOB_KEY")" "$(json_string "$JOB_ETAG")" \
    "$1" "$(json_string "$2")" "$3" "$(json_string "$id")" "$(date -u +%Y-%m-%dT%H:%M:%SZ)" >"$file"
  if s3_put "$JOB_ERROR_KEY" "$file" application/json; then
    REPORTED=yes && log "wrote error report for stage $1"
  else
    log "could not write the error report for stage $1"
  fi
}

# upload_log: the log by curl with the launcher's presigned PUT, else by the AWS CLI.
# --path-as-is: else curl squashes a key's /./ and /../, which S3 keeps.
upload_log() {
  [[ -s "$WORK_DIR/log-upload.curl" ]] && command -v curl >/dev/null 2>&1 &&
    curl --config "$WORK_DIR/log-upload.curl" --path-as-is --silent --show-error --fail \
      --globoff --header 'Expect:' --header 'Content-Type: text/plain' \
      --upload-file "$LOG_FILE" --output /dev/null && return 0
  [[ -s "$WORK_DIR/log-upload.curl" ]] && log "curl could not upload the log; trying the AWS CLI"
  s3_put "$JOB_LOG_KEY" "$LOG_FILE" text/plain
}

# stop_launcher: Batch stops a job with SIGTERM to its first process (this shell) alone, and
# SIGKILL after the stop timeout: pass it on, so the launcher stops the worker and reports.
stop_launcher() {
  [[ -n "$LAUNCHER_PID" ]] && kill -TERM "$LAUNCHER_PID" 2>/dev/null || return 0
  wait "$LAUNCHER_PID"
  [[ ! -e "$WORK_DIR/reported" ]] || REPORTED=yes
}

on_exit() {
  local status=$? message
  set +e
  trap - ERR EXIT
  trap '' PIPE  # should the log pipe be gone, a write must fail, not kill the shell
  message="bootstrap failed with status $status"
  if [[ -n "$SIGNALLED" && -n "$CONTAINER" ]]; then
    stop_launcher
    message="stopped by SIG$SIGNALLED (status $status): the Batch job was stopped (its timeout passed, or it was terminated)"
  elif [[ -n "$SIGNALLED" ]]; then
    message="stopped by SIG$SIGNALLED (status $status): the machine is shutting down (its watchdog fired, or it was stopped)"
  fi
  if ((status != 0)) && [[ -z "$REPORTED" && -n "${JOB_ERROR_KEY+set}" ]]; then
    write_error_report bootstrap "$message" "$status"
  fi
  if [[ -n "$CONTAINER" ]]; then log "finished with status $status; the job ends"
  else log "finished with status $status; shutting down"; fi
  [[ -z "$TEE_PID" ]] || { exec 1>&3 2>&4; wait "$TEE_PID" 2>/dev/null; }
  [[ -n "${JOB_LOG_KEY+set}" && -s "$LOG_FILE" ]] && { upload_log || log "could not upload the log"; }
  [[ -n "$WORK_DIR" ]] && rm -rf "$WORK_DIR"
  [[ -n "$CONTAINER" ]] || shutdown -h now
  return "$status"
}

# ensure_boto3: install boto3 for python3 (the launcher exits 127 without it); false if it
# cannot be tried.
ensure_boto3() {
  command -v python3 >/dev/null 2>&1 || return 1
  log "boto3 missing; installing it"
  { command -v dnf >/dev/null 2>&1 && dnf install -y -q python3-boto3; } ||
    python3 -m pip install -q boto3
}

# run_launcher: the job's one python3 start; its arguments are in launcher.py's docstring.
# The route's command is a JSON argument list the worker runs without a shell.
run_launcher() {
  local -a args=()
  [[ -z "$JOB_COMMAND" ]] || args=(--command "$JOB_COMMAND")
  local -a launcher=(timeout -k 30 "$JOB_TIMEOUT_SECONDS" python3
    "$WORK_DIR/launcher.pyz" "$WORK_DIR" "$JOB_SOFTWARE_BUCKET" "$JOB_WORKER_KEY"
    "$JOB_ERROR_KEY" "$JOB_LOG_KEY" "$JOB_TIMEOUT_SECONDS" "${EPOCHREALTIME:-}"
    "${args[@]}" "s3://$JOB_BUCKET/$JOB_KEY")
  [[ -n "$CONTAINER" ]] || { AWSFUN_EXPECTED_ETAG="$JOB_ETAG" "${launcher[@]}"; return; }
  # In the background: `wait` gives way to a trapped SIGTERM (see stop_launcher).
  AWSFUN_EXPECTED_ETAG="$JOB_ETAG" "${launcher[@]}" &
  LAUNCHER_PID=$!
  wait "$LAUNCHER_PID"
}

main() {
  trap on_exit EXIT
  trap 'SIGNALLED=TERM; exit 143' TERM
  trap 'SIGNALLED=INT; exit 130' INT
  trap 'SIGNALLED=HUP; exit 129' HUP
  # Prepare. tee must outlive a shutdown's SIGTERM, or the report and log come too late.
  WORK_DIR="$(mktemp -d "${TMPDIR:-/tmp}/awsfun.XXXXXX")"
  LOG_FILE="$WORK_DIR/bootstrap.log"
  exec 3>&1 4>&2
  exec > >(trap '' TERM INT HUP && exec tee -a "$LOG_FILE") 2>&1
  TEE_PID=$!
  if [[ -z "${JOB_FIELDS_B64:-}" ]]; then
    log "this is the unrendered template: lambda_function.render_user_data fills in the job"
    return 2
  fi
  local status=0 message
  local decoded=yes
  decode_job || decoded=""
  # The handler renders only hashed report keys (lambda_function.long_report_key).
  JOB_ERROR_KEY="${JOB_ERROR_KEY:-analysis/$JOB_KEY.error.json}"
  JOB_LOG_KEY="${JOB_LOG_KEY:-analysis/$JOB_KEY.log}"
  if [[ -z "$decoded" ]]; then
    # A job of another version may still name its object: on_exit reports on it if it does.
    [[ -n "$JOB_BUCKET" && -n "$JOB_KEY" ]] || unset JOB_ERROR_KEY JOB_LOG_KEY
    log "the job's fields did not decode: not rendered by this version?"
    return 2
  fi
  base64 -d <<<"$JOB_LAUNCHER_B64" >"$WORK_DIR/launcher.pyz"
  export AWS_DEFAULT_REGION="${AWS_DEFAULT_REGION:-$JOB_REGION}"
  log "job: s3://$JOB_BUCKET/$JOB_KEY; watchdog ${JOB_WATCHDOG_MINUTES} min"
  # Last resort for a hung machine; the worker's own time limit below fires first. A Batch
  # job's is its attemptDurationSeconds (lambda_function.submit_job_params).
  if [[ -z "$CONTAINER" ]]; then
    shutdown -h "+$JOB_WATCHDOG_MINUTES" "awsfun watchdog" || log "could not arm the watchdog"
  fi
  # Run. 127: no python3, or no boto3 for it.
  run_launcher || status=$?
  if ((status == 127)) && ! ensure_boto3; then
    write_error_report start "python3 with boto3 is not available on this machine" 127
    return 127
  fi
  ((status != 127)) || { status=0 && run_launcher || status=$?; }
  # Finish: report only what Python could not (no boto3, or the launcher itself was killed).
  message="the launcher ended with status $status before it reported (137: SIGKILL, out of memory or 30s past the time limit of ${JOB_TIMEOUT_SECONDS}s)"
  case "$status" in
    0) log "worker succeeded" ;;
    "$WORKER_REPORTED") log "worker failed and wrote its error report"; REPORTED=yes ;;
    127) write_error_report start "python3 cannot import boto3" 127 ;;
    *) if [[ -e "$WORK_DIR/reported" ]]; then REPORTED=yes; else write_error_report worker "$message" "$status"; fi ;;
  esac
  return "$status"
}

main "$@"
