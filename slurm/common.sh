# shellcheck shell=bash
# Sourced by the sbatch scripts: enter the checkout, and run `srun` under a batch shell that survives SLURM's signals.

# nit_enter_repo: cd to REPO_DIR, source VENV_ACTIVATE (empty: the python on PATH).
nit_enter_repo() {
    cd "$REPO_DIR"
    if [[ -n "$VENV_ACTIVATE" ]]; then
        # shellcheck disable=SC1090  # the path is a setting
        source "$VENV_ACTIVATE"
    fi
}

# Signals SLURM sends to the batch shell (`#SBATCH --signal=B:USR1@120`, `scancel --batch --signal=USR1`, and TERM
# on scancel, requeue and the time limit) would kill it by default, and a job whose batch shell has died is over: its
# tasks are killed and nothing requeues. The shell instead passes each one on to srun, which passes it to every task
# (RequeueOnSignal saves, requeues on USR1), and keeps waiting until the tasks have exited.
NIT_STEP_PID=""
NIT_PENDING=""
NIT_TRAPPED=0

nit_forward() {
    NIT_TRAPPED=1
    if [[ -n "$NIT_STEP_PID" ]]; then
        echo "batch shell: SIG$1 received, passed on to the tasks" >&2
        kill -s "$1" "$NIT_STEP_PID" 2>/dev/null || true
    else
        echo "batch shell: SIG$1 received before the tasks started; passed on when they start" >&2
        NIT_PENDING="$1"
    fi
}

trap 'nit_forward USR1' USR1
trap 'nit_forward TERM' TERM

# nit_srun ARGS...: `srun ARGS...` in the background, signals passed on, its exit status returned.
nit_srun() {
    srun "$@" &
    NIT_STEP_PID=$!
    if [[ -n "$NIT_PENDING" ]]; then
        kill -s "$NIT_PENDING" "$NIT_STEP_PID" 2>/dev/null || true
    fi
    local status
    while :; do
        NIT_TRAPPED=0
        status=0
        wait "$NIT_STEP_PID" || status=$?
        # `wait` returns early (128 + signal) when a trapped signal arrives: srun is still running, wait again
        (( NIT_TRAPPED && status > 128 )) || break
    done
    NIT_STEP_PID=""
    return "$status"
}
