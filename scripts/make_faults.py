"""The fault campaign: ``make faults`` -> docs/reliability.md and docs/reliability.json.

    python scripts/make_faults.py                      # sim executor, ~210 faults over every class
    python scripts/make_faults.py --faults 20 --fuzz 0 # a short run
    python scripts/make_faults.py --executor vllm --faults 8 --classes kill_worker,kill_scheduler

Each fault class runs in its own phase (``bench/faults``); a class whose feature the code lacks
is reported as "not run: <reason>". ``--fuzz N`` runs ``python -m bench.fuzz --per-surface N
--json bench/out/fuzz.json`` first (0 = use that file if it exists, else leave fuzzing out).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from accelgen.common.logs import setup_logging  # noqa: E402
from bench.faults.campaign import Settings, run_campaign  # noqa: E402
from bench.faults.injectors import BY_NAME, allocate  # noqa: E402
from bench.faults.report import render  # noqa: E402
from bench.faults.verdict import summarize  # noqa: E402

FUZZ_JSON = REPO / "bench" / "out" / "fuzz.json"


def run_fuzz(per_surface: int) -> dict | None:
    if per_surface > 0:
        FUZZ_JSON.parent.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, "-m", "bench.fuzz", "--per-surface", str(per_surface), "--json", str(FUZZ_JSON)]
        FUZZ_JSON.unlink(missing_ok=True)  # a run that dies must not leave an earlier run's results in the report
        proc = subprocess.run(cmd, cwd=REPO)
        if proc.returncode != 0 and not FUZZ_JSON.exists():
            return {"error": f"`{' '.join(cmd[1:])}` exited {proc.returncode} and wrote nothing"}
    if FUZZ_JSON.exists():
        return json.loads(FUZZ_JSON.read_text())
    return None


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--executor", choices=["sim", "vllm"], default="sim")
    ap.add_argument("--faults", type=int, default=None, help="faults in all, split over the classes by weight "
                    "(default 210 with sim, 8 with vllm)")
    ap.add_argument("--classes", default=",".join(BY_NAME), help="comma-separated fault classes")
    ap.add_argument("--seed", type=int, default=None, help="RNG seed (default: from the clock; recorded)")
    ap.add_argument("--concurrency", type=int, default=None, help="concurrent clients (default 6 sim, 2 vllm)")
    ap.add_argument("--gap", default="0.5,3", help="MIN,MAX seconds of load before each fault")
    ap.add_argument("--time-scale", type=float, default=0.3, help="sim: time scale of the workers")
    ap.add_argument("--model-dir", type=Path, default=REPO / ".cache" / "test-model", help="vllm: the model")
    ap.add_argument("--fuzz", type=int, default=10000, help="fuzzed inputs per surface (0 = reuse bench/out/fuzz.json)")
    ap.add_argument("--out", type=Path, default=REPO / "docs", help="where reliability.md/.json go")
    ap.add_argument("--work", type=Path, default=REPO / "bench" / "out" / "faults", help="logs and raw records")
    ap.add_argument("--from-raw", type=Path, default=None, help="judge and report the campaign recorded in this "
                    "raw.json (a --work's) again, without running one: after a change to the verdict or the report")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    setup_logging("faults", "INFO")
    names = [n.strip() for n in args.classes.split(",") if n.strip()]
    unknown = [n for n in names if n not in BY_NAME]
    if unknown:
        print(f"make_faults: unknown fault class(es) {', '.join(unknown)}; known: {', '.join(BY_NAME)}",
              file=sys.stderr)
        return 2
    if args.from_raw is not None:
        return report(json.loads(args.from_raw.read_text()), run_fuzz(0), args.out)
    vllm = args.executor == "vllm"
    total = args.faults if args.faults is not None else (8 if vllm else 210)
    lo, hi = (float(x) for x in args.gap.split(","))
    settings = Settings(executor=args.executor, seed=args.seed if args.seed is not None else int(time.time()),
                        faults=allocate(total, names), concurrency=args.concurrency or (2 if vllm else 6),
                        gap_s=(lo, hi), time_scale=args.time_scale, out_dir=args.work,
                        model_dir=args.model_dir if vllm else None)
    if vllm:  # a CPU iteration of the test model can take a while: a longer TTL, no false drops
        settings.heartbeat_interval_s, settings.heartbeat_ttl_s = 1.0, 10.0
    if vllm:
        from scripts.make_test_model import make_test_model

        make_test_model(args.model_dir)
    fuzz = run_fuzz(args.fuzz)
    # Each phase starts from empty data directories: a sentinel keeps the configuration it rewrote,
    # and a Redis its append-only file, so a second campaign into the same --work found the last
    # one's master port in sentinel.conf and waited for it for ever.
    shutil.rmtree(args.work / "logs", ignore_errors=True)
    result = run_campaign(settings)
    args.work.mkdir(parents=True, exist_ok=True)
    (args.work / "raw.json").write_text(json.dumps(result))
    return report(result, fuzz, args.out)


def report(result: dict, fuzz: dict | None, out: Path) -> int:
    """Judge a campaign's records (bench/faults/verdict.py) and write reliability.md/.json."""
    summary = summarize(result)
    if fuzz is not None:
        summary["fuzz"] = fuzz
    out.mkdir(parents=True, exist_ok=True)
    (out / "reliability.json").write_text(json.dumps(summary, indent=1) + "\n")
    (out / "reliability.md").write_text(render(summary, fuzz))
    t = summary["totals"]
    print(f"faults {t.get('faults', 0)}, accepted {t.get('accepted', 0)}, lost {t.get('lost', 0)}, "
          f"differing {t.get('differing', 0)}; wall {summary['wall_s']:.0f} s -> {out / 'reliability.md'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
