#!/usr/bin/env bash
# Benchmark (issue 3, last point): how much of Perfect's allowed request rate a run
# uses. N Perfect jobs go through `pixbatch run` against `pixbatch sim` with Perfect's
# default limits (100 per minute + 100 per 5 minutes) and keep-alive (10 s)
# time-scaled by 1/10: 100/6s + 100/30s, keep-alive 1 s, on both sides.
#
# Usage: bench/perfect-limits.sh [N] [extra pixbatch sim options...]
#   N                default 200
#   extra options    passed to `pixbatch sim`, e.g. --chaos-429 0.05 --seed 7
# Environment:
#   PIXBATCH_BIN     the binary (default $CARGO_TARGET_DIR/release/pixbatch,
#                    CARGO_TARGET_DIR defaulting to /tmp/bench-target)
#   TASK_MS          the simulator's task duration (default 300)
#   POLL_INTERVAL, CONCURRENCY, MAX_IN_FLIGHT
#                    optional client settings for [providers.perfect]
#   KEEP_WORK=1      keep the work folder (database, outputs, ledger.json)
#
# Prints jobs, metered requests R, the time spans, the least time the limits allow
# for R requests (as intake::least_time computes it), the ratios, and the checks
# (violations, lost tasks, charges). Exit status 1 if a check fails.
set -euo pipefail

N=${1:-200}
shift || true
SIM_EXTRA=("$@")
case $N in '' | *[!0-9]*) echo "N must be a number, not '$N'" >&2; exit 2 ;; esac

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
BIN=${PIXBATCH_BIN:-${CARGO_TARGET_DIR:-/tmp/bench-target}/release/pixbatch}
[[ -x $BIN ]] || { echo "no pixbatch binary at $BIN (cargo build --release first)" >&2; exit 2; }
TASK_MS=${TASK_MS:-300}
LIMITS_SIM="perfect=100/6s,100/30s"
KEEP_ALIVE_MS=1000

WORK=$(mktemp -d /tmp/perfect-limits.XXXXXX)
SIM_PID=
cleanup() {
    if [[ -n $SIM_PID ]] && kill -0 "$SIM_PID" 2>/dev/null; then
        kill "$SIM_PID" 2>/dev/null || true
        wait "$SIM_PID" 2>/dev/null || true
    fi
    if [[ ${KEEP_WORK:-0} == 1 ]]; then
        echo "work folder kept: $WORK" >&2
    else
        rm -rf "$WORK"
    fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# --- the simulator, on a free loopback port ----------------------------------------
"$BIN" sim --addr 127.0.0.1:0 --limit "$LIMITS_SIM" --keep-alive-ms "$KEEP_ALIVE_MS" \
    --task-ms "$TASK_MS" "${SIM_EXTRA[@]}" >"$WORK/sim.out" 2>"$WORK/sim.err" &
SIM_PID=$!
for _ in $(seq 1 200); do
    grep -q '^pixbatch sim listening on http://' "$WORK/sim.out" 2>/dev/null && break
    kill -0 "$SIM_PID" 2>/dev/null || { echo "the simulator exited:" >&2; cat "$WORK/sim.err" >&2; exit 1; }
    sleep 0.1
done
BASE=$(sed -n 's/^pixbatch sim listening on \(http:\/\/[^ ]*\).*/\1/p' "$WORK/sim.out")
[[ -n $BASE ]] || { echo "the simulator did not say where it listens" >&2; exit 1; }
# Perfect's generated credentials: `export NAME='value'` lines before the listening line.
eval "$(sed -n "/^pixbatch sim listening/q; /^export [A-Z_][A-Z0-9_]*='[^']*'\$/p" "$WORK/sim.out")"
export PIXBATCH_PERFECT_URL="$BASE/perfect"

# --- manifest, configuration, queue --------------------------------------------------
cd "$WORK"
mkdir -p in
cp "$ROOT/examples/images/landscape.png" in/landscape.png
{
    echo 'id,provider,operation,input,prompt,params,output'
    for ((i = 0; i < N; i++)); do
        if ((i % 2 == 0)); then
            printf 'p%04d,perfect,photo-enhance,in/landscape.png,,"{""scale"":2}",\n' "$i"
        else
            printf 'p%04d,perfect,background-removal,in/landscape.png,,,\n' "$i"
        fi
    done
} >jobs.csv
{
    echo '[providers.perfect]'
    echo 'rate_limits = ["100/6s", "100/30s"]'
    echo 'keep_alive = "1s"'
    [[ -n ${POLL_INTERVAL:-} ]] && echo "poll_interval = \"$POLL_INTERVAL\""
    [[ -n ${CONCURRENCY:-} ]] && echo "concurrency = $CONCURRENCY"
    [[ -n ${MAX_IN_FLIGHT:-} ]] && echo "max_in_flight = $MAX_IN_FLIGHT"
    true
} >pixbatch.toml

"$BIN" --db db --out out --config pixbatch.toml enqueue jobs.csv >enqueue.out 2>&1 \
    || { cat enqueue.out >&2; exit 1; }

# --- the run ---------------------------------------------------------------------------
start=$(date +%s.%N)
set +e
"$BIN" --db db --out out --config pixbatch.toml run --quiet >run.out 2>run.err
rc=$?
set -e
end=$(date +%s.%N)
"$BIN" --db db --out out report --format csv >report.csv 2>/dev/null || true

curl -sf "$BASE/_sim/ledger" >ledger.json
curl -sf "$BASE/_sim/stats" >stats.json
curl -sf "$BASE/_sim/config" >simconfig.json || true

# --- arithmetic -----------------------------------------------------------------------
python3 - "$N" "$rc" "$start" "$end" "$TASK_MS" "${SIM_EXTRA[*]:-}" <<'PY'
import csv, json, sys

n, rc = int(sys.argv[1]), int(sys.argv[2])
wall = float(sys.argv[4]) - float(sys.argv[3])
task_ms = int(sys.argv[5])
extra = sys.argv[6]
limits = [(100, 6000), (100, 30000)]  # (count, window ms), as the sim enforces them

entries = [e for e in json.load(open("ledger.json"))["entries"] if e["provider"] == "perfect"]
stats = json.load(open("stats.json"))
# What the simulator's limiter counted: metered requests it let through (a violation
# is refused and not counted; an injected 429 passed the limit and counts).
metered = [e for e in entries if e["metered"] and not e["violation"]]
R = len(metered)
t0 = metered[0]["t_ms"]
t_last_metered = metered[-1]["t_ms"]
t_last = entries[-1]["t_ms"]

def least_ms(r):
    # intake::least_time: bursts of a whole window at once, the strictest limit.
    return max(((r - 1) // c) * w for c, w in limits) if r else 0

least = least_ms(R)
span_metered = t_last_metered - t0
span_ledger = t_last - t0
# The tail that cannot overlap the metered span: after the last metered request (the
# poll that saw the last task finish) comes its result download (unmetered); and the
# last task runs task_ms before that poll can report it. Taken as task_ms + the
# observed gap from the last metered request to the last ledger entry.
download_gap = t_last - t_last_metered
tail = task_ms + download_gap

by_ep = {}
for e in metered:
    by_ep[e["endpoint"]] = by_ep.get(e["endpoint"], 0) + 1
violations = stats["violations"].get("perfect", 0)
lost = sum(1 for e in entries if e["endpoint"] == "task_status" and e["status"] == 400)
charges = stats["charges"].get("perfect", 0)
injected_429 = sum(1 for e in entries if e.get("fault") == "429")
faults = sum(1 for e in entries if e.get("fault"))
states = {}
try:
    for row in csv.DictReader(open("report.csv")):
        states[row["state"]] = states.get(row["state"], 0) + 1
except (OSError, KeyError):
    pass

def s(ms):
    return f"{ms / 1000:.1f} s"

print(f"sim options         : {extra or '(none beyond the limits)'}")
print(f"jobs                : {n}  (run exit {rc}; states {states})")
print(f"metered requests R  : {R}  ({', '.join(f'{k} {v}' for k, v in sorted(by_ep.items()))})")
print(f"  = {R / n:.2f} per job; all Perfect ledger entries {len(entries)}")
print(f"least time for R    : {s(least)}  (max_i floor((R-1)/n_i)*w_i)")
print(f"metered span        : {s(span_metered)}  (first to last metered request)")
print(f"ledger span T       : {s(span_ledger)}  (first metered request to last ledger entry)")
print(f"process wall time   : {wall:.1f} s  (pixbatch run --quiet)")
print(f"tail                : {s(tail)}  (task {task_ms} ms + last download gap {download_gap} ms)")
print(f"ratio least/metered span      : {least / span_metered:.3f}" if span_metered else "ratio: n/a")
print(f"ratio (least+tail)/T          : {(least + tail) / span_ledger:.3f}" if span_ledger else "")
print(f"ratio (least+tail)/wall       : {(least + tail) / 1000 / wall:.3f}")
print(f"violations          : {violations}")
print(f"lost tasks          : {lost}  (task_status answered 400)")
print(f"charges             : {charges}  (want {n})")
print(f"injected faults     : {faults}  (429: {injected_429}; sim stats faults {stats['faults']})")
ok = violations == 0 and lost == 0 and charges == n and rc == 0
print("RESULT              : " + ("ok" if ok else "CHECK FAILED"))
# One machine-readable line for the results table.
print("ROW " + json.dumps({"n": n, "R": R, "least_s": least / 1000, "tail_s": tail / 1000,
      "metered_s": span_metered / 1000, "T_s": span_ledger / 1000, "wall_s": round(wall, 1),
      "ratio_metered": round(least / span_metered, 3) if span_metered else None,
      "ratio_T": round((least + tail) / span_ledger, 3) if span_ledger else None,
      "ratio_wall": round((least + tail) / 1000 / wall, 3), "violations": violations,
      "lost": lost, "charges": charges, "faults": faults, "rc": rc, "extra": extra}))
sys.exit(0 if ok else 1)
PY
