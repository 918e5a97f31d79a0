#!/usr/bin/env bash
# Runs an lwc experiment on a Cloud TPU VM pod slice: every worker runs the same command, and
# jax.distributed.initialize() (no arguments) finds the other workers by itself on Cloud TPU.
# See launch/README.md.
set -euo pipefail

usage() {
  cat <<'EOF'
usage: launch/tpu_pod.sh COMMAND [--option=value ...] [-- EXPERIMENT_ARGS...]

Commands:
  create   create the TPU VM slice        (gcloud compute tpus tpu-vm create)
  setup    copy the code (git HEAD) to every worker and pip install it there
  run      copy the flagfile to every worker, run the experiment on all workers at once
  delete   delete the TPU VM slice
  all      create, setup, run, then delete if --delete_after

Options (required: * always, c for create/all, r for run/all):
  --name=NAME                 * TPU VM name
  --zone=ZONE                 * e.g. us-central2-b
  --project=PROJECT             gcloud project (default: gcloud's configured one)
  --accelerator_type=TYPE     c e.g. v4-32, v5litepod-16
  --version=RUNTIME             TPU software version (default from the type: v2/v3/v4
                                tpu-ubuntu2204-base, v5litepod v2-alpha-tpuv5-lite,
                                v5p v2-alpha-tpuv5, v6e v2-alpha-tpuv6e)
  --spot                        create a Spot VM
  --experiment=NAME           r module lwc.experiments.NAME, e.g. lenet
  --flagfile=PATH             r local flagfile, copied to every worker
  --workdir=PATH              r gs://bucket/path: workers share no filesystem
  --repo=PATH                   local checkout to copy (default: this script's repository)
  --remote_dir=DIR              code folder on the workers (default: lwc)
  --detach                      run under nohup, output to <remote_dir>/run.log on each worker
  --delete_after                with 'all': delete the slice after the run
  --dry_run                     print the commands (prefixed '+ ') instead of running them
  -h, --help                    show this help

Arguments after '--' are passed on to the experiment.
Example:
  launch/tpu_pod.sh all --name=lwc-v4 --zone=us-central2-b --accelerator_type=v4-32 \
      --experiment=lenet --flagfile=experiments/lenet5.flags --workdir=gs://my-bucket/lenet5
EOF
}

die() {
  echo "tpu_pod.sh: error: $*" >&2
  echo "Run 'launch/tpu_pod.sh --help' for usage." >&2
  exit 2
}

# Prints a command, shell-quoted (each word reads back as itself), prefixed '+ ' (dry run), or
# runs it.
run_cmd() {
  if [[ "${DRY_RUN}" == 1 ]]; then
    local line="+" word
    for word in "$@"; do
      if [[ "${word}" =~ ^[A-Za-z0-9_./:=,@%+-]+$ ]]; then
        line+=" ${word}"
      else
        line+=" ${word@Q}"
      fi
    done
    echo "${line}"
  else
    "$@"
  fi
}

default_version() {
  case "$1" in
    v2-* | v3-* | v4-*) echo "tpu-ubuntu2204-base" ;;
    v5litepod-* | v5e-*) echo "v2-alpha-tpuv5-lite" ;;
    v5p-*) echo "v2-alpha-tpuv5" ;;
    v6e-*) echo "v2-alpha-tpuv6e" ;;
    *) die "no default --version for accelerator type '$1'; pass --version" ;;
  esac
}

require() {
  local name
  for name in "$@"; do
    [[ -n "${!name}" ]] || die "--${name,,} is required for '${COMMAND}'"
  done
}

# --- arguments --------------------------------------------------------------------------------

NAME="" ZONE="" PROJECT="" ACCELERATOR_TYPE="" VERSION="" SPOT=0 EXPERIMENT="" FLAGFILE=""
WORKDIR="" REPO="" REMOTE_DIR="lwc" DETACH=0 DELETE_AFTER=0 DRY_RUN=0 COMMAND=""
EXTRA=()

while (($#)); do
  arg="$1"
  shift
  case "${arg}" in
    -h | --help) usage; exit 0 ;;
    --) EXTRA=("$@"); break ;;
    --spot) SPOT=1 ;;
    --detach) DETACH=1 ;;
    --delete_after) DELETE_AFTER=1 ;;
    --dry_run) DRY_RUN=1 ;;
    --*)
      key="${arg%%=*}"
      if [[ "${arg}" == *=* ]]; then
        value="${arg#*=}"
      else
        [[ $# -gt 0 && "$1" != --* ]] || die "${key} needs a value"
        value="$1"
        shift
      fi
      case "${key}" in
        --name) NAME="${value}" ;;
        --zone) ZONE="${value}" ;;
        --project) PROJECT="${value}" ;;
        --accelerator_type) ACCELERATOR_TYPE="${value}" ;;
        --version) VERSION="${value}" ;;
        --experiment) EXPERIMENT="${value}" ;;
        --flagfile) FLAGFILE="${value}" ;;
        --workdir) WORKDIR="${value}" ;;
        --repo) REPO="${value}" ;;
        --remote_dir) REMOTE_DIR="${value}" ;;
        *) die "unknown option ${key}" ;;
      esac
      ;;
    *)
      [[ -z "${COMMAND}" ]] || die "one command only, got '${COMMAND}' and '${arg}'"
      COMMAND="${arg}"
      ;;
  esac
done

case "${COMMAND}" in
  create | setup | run | delete | all) ;;
  "") die "a command is required: create, setup, run, delete or all" ;;
  *) die "unknown command '${COMMAND}': expected create, setup, run, delete or all" ;;
esac

require NAME ZONE
if [[ "${COMMAND}" == create || "${COMMAND}" == all ]]; then
  require ACCELERATOR_TYPE
  [[ -n "${VERSION}" ]] || VERSION="$(default_version "${ACCELERATOR_TYPE}")"
fi
if [[ "${COMMAND}" == run || "${COMMAND}" == all ]]; then
  require EXPERIMENT FLAGFILE WORKDIR
  [[ "${EXPERIMENT}" =~ ^[A-Za-z_][A-Za-z0-9_]*$ ]] || die "--experiment must be a module name, got '${EXPERIMENT}'"
  [[ -f "${FLAGFILE}" ]] || die "--flagfile ${FLAGFILE} does not exist"
  if [[ "${WORKDIR}" != gs://* ]]; then
    echo "tpu_pod.sh: warning: --workdir ${WORKDIR} is not a gs:// path; the workers of a pod" \
      "share no filesystem, so checkpoints and metrics need a bucket" >&2
  fi
fi
if [[ "${DETACH}" == 1 && "${DELETE_AFTER}" == 1 ]]; then
  die "--detach and --delete_after together would delete the slice under the running job"
fi
[[ -n "${REPO}" ]] || REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

GCLOUD=(gcloud compute tpus tpu-vm)
COMMON=("--zone=${ZONE}")
[[ -z "${PROJECT}" ]] || COMMON+=("--project=${PROJECT}")

# --- commands ---------------------------------------------------------------------------------

do_create() {
  local args=("${GCLOUD[@]}" create "${NAME}" "${COMMON[@]}"
              "--accelerator-type=${ACCELERATOR_TYPE}" "--version=${VERSION}")
  [[ "${SPOT}" == 0 ]] || args+=(--spot)
  run_cmd "${args[@]}"
}

do_setup() {
  local archive="${TMPDIR:-/tmp}/lwc-src-${NAME}.tar.gz"
  # Committed code only (git HEAD): every worker gets exactly the same, known version.
  run_cmd git -C "${REPO}" archive --format=tar.gz --output="${archive}" HEAD
  run_cmd "${GCLOUD[@]}" scp "${archive}" "${NAME}:lwc-src.tar.gz" --worker=all "${COMMON[@]}"
  local remote="rm -rf ${REMOTE_DIR} && mkdir -p ${REMOTE_DIR}"
  remote+=" && tar -xzf lwc-src.tar.gz -C ${REMOTE_DIR} && cd ${REMOTE_DIR}"
  remote+=" && python3 -m pip install --upgrade pip"
  remote+=" && python3 -m pip install -e . 'jax[tpu]>=0.10'"
  run_cmd "${GCLOUD[@]}" ssh "${NAME}" --worker=all "${COMMON[@]}" "--command=${remote}"
}

do_run() {
  run_cmd "${GCLOUD[@]}" scp "${FLAGFILE}" "${NAME}:${REMOTE_DIR}/run.flags" --worker=all \
    "${COMMON[@]}"
  local python_cmd
  printf -v python_cmd '%q ' python3 -m "lwc.experiments.${EXPERIMENT}" --flagfile=run.flags \
    "--workdir=${WORKDIR}" "${EXTRA[@]}"
  python_cmd="${python_cmd% }"
  local remote="cd ${REMOTE_DIR} && "
  if [[ "${DETACH}" == 1 ]]; then
    remote+="nohup ${python_cmd} > run.log 2>&1 < /dev/null &"
  else
    remote+="${python_cmd}"
  fi
  run_cmd "${GCLOUD[@]}" ssh "${NAME}" --worker=all "${COMMON[@]}" "--command=${remote}"
}

do_delete() {
  run_cmd "${GCLOUD[@]}" delete "${NAME}" "${COMMON[@]}" --quiet
}

case "${COMMAND}" in
  create) do_create ;;
  setup) do_setup ;;
  run) do_run ;;
  delete) do_delete ;;
  all)
    do_create
    do_setup
    do_run
    [[ "${DELETE_AFTER}" == 0 ]] || do_delete
    ;;
esac
