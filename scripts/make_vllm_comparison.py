"""Regenerate docs/vllm_comparison.md (+ .json): the AccelGen stack against monolithic ``vllm serve``.

    .venv/bin/python scripts/make_vllm_comparison.py        (about 10 minutes on 2 cores)

Same test model, same machine, one script run: ``vllm serve`` and the AccelGen stack (what
``accelgen up --executor vllm`` starts: Redis, scheduler, one vLLM CPU worker, gateway), each
started fresh and warmed up, then driven by vLLM's own benchmark client (``vllm bench serve``)
through the OpenAI ``/v1/completions`` endpoint at the same request rates with the same prompts
(same seeds). The stack runs with ``--policy vllm`` (vLLM's FCFS policy: isolates what the
architecture costs), with the default ``accelgen`` policy on the shipped OPT-13B/A100 profile, and
with the ``accelgen`` policy on a profile measured on this CPU (``accelgen profile``).

Per server start: the rates in order (``inf`` repeated ``--saturation-repeats`` times), then
requests one at a time, then a keep-alive TTFT probe. ``--rounds`` starts every system that many
times (odd rounds in reverse order); cells are medians over all runs, runs during which other jobs
took more than 10% of the machine are left out. In the last round vllm serve and the vllm-policy
stack also get a saturation run under py-spy (where the CPU time goes; not in the comparison).
Finally a microbenchmark of the worker's decode step with 2 vs 1 torch threads.

``--device gpu`` (what scripts/gpu_check.sh runs, writing --md/--json outside docs/): the same
comparison on a CUDA GPU -- float16, GPU sizes given to both servers alike, no CPU-only
environment (``bench/vs_vllm_server.py``'s device section), no decode microbenchmark; the
Markdown gets a note on top saying so. ``--model-shape opt-125m`` serves the OPT-125m-shaped
test model (``scripts/make_test_model.py --shape``).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shlex
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench import vs_vllm, vs_vllm_diagnostics, vs_vllm_server  # noqa: E402
from bench.vs_vllm import BenchConfig, Server  # noqa: E402
from scripts.vllm_comparison_report import _rate_name, build_table, findings, fmt_table, render_md  # noqa: E402

DOCS = ROOT / "docs"


def systems(model_dir: Path, log_root: Path, cpu_profile: Path | None) -> list[tuple[str, Callable[[], Server]]]:
    def stack(label: str, policy: str, profile: Path | None = None, **kw: Any) -> Callable[[], Server]:
        log_dir = log_root / label.replace(" ", "_").replace(",", "").replace(":", "").replace("+", "")
        return lambda: vs_vllm.start_accelgen(model_dir, policy, profile, log_dir=log_dir, label=label, **kw)

    out: list[tuple[str, Callable[[], Server]]] = [
        ("vllm serve", lambda: vs_vllm.start_vllm_serve(model_dir, log_dir=log_root / "vllm-serve")),
        ("accelgen, vllm policy", stack("accelgen, vllm policy", "vllm")),
        # The same with each plan waiting for the previous result: what pipelining buys.
        ("accelgen, vllm policy, unpipelined", stack("accelgen, vllm policy, unpipelined", "vllm",
                                                     scheduler_args=["--pipeline", "false"])),
        ("accelgen, accelgen policy (A100 profile)", stack("accelgen, accelgen policy (A100 profile)", "accelgen")),
    ]
    if cpu_profile is not None:
        name = "accelgen, accelgen policy (CPU profile)"
        out.append((name, stack(name, "accelgen", cpu_profile)))
    return out


def gpu_notes() -> dict[str, Any]:
    """--device gpu: which GPU, for the JSON and the Markdown note. Asks nvidia-smi rather than
    torch, so this process makes no CUDA context (it would hold GPU memory the servers count on)."""
    import subprocess

    import torch

    if not torch.cuda.is_available():
        raise SystemExit("--device gpu: torch sees no CUDA GPU (torch.cuda.is_available() is False)")
    notes: dict[str, Any] = {"cuda": torch.version.cuda, "gpu_count": torch.cuda.device_count()}
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version",
                              "--format=csv,noheader,nounits"], capture_output=True, text=True, timeout=30).stdout
        name, mib, driver = [x.strip() for x in out.splitlines()[0].split(",")][:3]
        notes.update(gpu=name, gpu_memory_gib=round(float(mib) / 1024, 1), driver=driver)
    except (OSError, subprocess.SubprocessError, IndexError, ValueError):
        notes["gpu"] = "?"
    return notes


def gpu_note(data: dict[str, Any]) -> str:
    """The note on top of a --device gpu report: render_md's set-up text describes the CPU run."""
    c, m = data["config"], data["machine"]
    extra = " ".join(c.get("vllm_serve_extra_args") or [])
    return (f"> **GPU run** (`--device gpu`, e.g. by `scripts/gpu_check.sh`) on {m.get('gpu', '?')} "
            f"({m.get('gpu_memory_gib', '?')} GiB, CUDA {m.get('cuda', '?')}); model `{c.get('model_dir', '?')}` "
            f"(shape {c.get('model_shape', '?')}). The set-up text below was written for the CPU comparison; "
            f"on this run both servers used dtype {c['dtype']}, KV cache {c['kv_cache_gib']} GiB, max_num_seqs "
            f"{c['max_num_seqs']}, max_num_batched_tokens {c['max_num_batched_tokens']}, max_model_len "
            f"{c['max_model_len']}, `--enforce-eager`; vllm serve got `{extra}` and no VLLM_CPU_KVCACHE_SPACE "
            "(otherwise its GPU defaults), the worker `--kv-cache-space-gb` with the same GiB.")


def render(data: dict[str, Any], table, results, rates, profiles, names) -> str:
    md = render_md(data, table, results, rates, profiles, names)
    if data["config"].get("device") == "gpu":
        title, _, rest = md.partition("\n")
        md = f"{title}\n\n{gpu_note(data)}\n{rest}"
    return md


def _shown(path: Path) -> str:
    """A path as the report shows it: relative to the checkout when inside it."""
    try:
        return str(path.resolve().relative_to(ROOT))
    except ValueError:
        return str(path)


def machine_notes() -> dict[str, Any]:
    import psutil
    import torch
    import vllm

    cpu = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import subprocess

    def git(*a: str) -> str:
        try:
            return subprocess.run(["git", *a], cwd=ROOT, capture_output=True, text=True, timeout=10).stdout
        except (OSError, subprocess.SubprocessError):
            return ""

    commit = git("rev-parse", "--short", "HEAD").strip()
    dirty = [line[3:] for line in git("status", "--porcelain", "--untracked-files=no").splitlines() if len(line) > 3]
    return {"commit": commit, "modified_tracked_files": dirty, "cpu": cpu, "cores": os.cpu_count(), "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
            "python": platform.python_version(), "platform": platform.platform(), "vllm": vllm.__version__,
            "torch": torch.__version__, "load_avg_before": [round(x, 2) for x in os.getloadavg()]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rates", default="10,40,inf", help="request rates, comma-separated (inf = saturation)")
    ap.add_argument("--num-prompts", type=int, default=200)
    ap.add_argument("--input-len", type=int, default=256)
    ap.add_argument("--output-len", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--saturation-repeats", type=int, default=3, help="runs at `inf` per server start")
    ap.add_argument("--probe", type=int, default=8, help="requests of the keep-alive TTFT probe (0 = skip)")
    ap.add_argument("--single-stream", type=int, default=16,
                    help="after the rates, this many requests one at a time (0 = skip)")
    ap.add_argument("--rounds", type=int, default=2, help="repeat the whole sequence (odd rounds in reverse "
                                                           "order); the tables show per-cell medians")
    ap.add_argument("--no-cpu-profile", action="store_true", help="skip the accelgen policy on a measured CPU profile")
    ap.add_argument("--no-py-spy", action="store_true", help="skip the py-spy runs")
    ap.add_argument("--no-microbench", action="store_true", help="skip the worker decode-step microbenchmark")
    ap.add_argument("--py-spy-prompts", type=int, default=300)
    ap.add_argument("--model-dir", type=Path, default=vs_vllm.DEFAULT_MODEL_DIR)
    ap.add_argument("--model-shape", default="tiny", choices=["tiny", "opt-125m"],
                    help="the test model --model-dir holds or gets (scripts/make_test_model.py --shape)")
    ap.add_argument("--device", choices=["cpu", "gpu"], default="cpu",
                    help="gpu: float16 and GPU sizes for both servers, no decode microbenchmark (scripts/gpu_check.sh)")
    ap.add_argument("--log-dir", type=Path, default=None, help="keep every server's log here (default: a temp dir)")
    ap.add_argument("--md", type=Path, default=DOCS / "vllm_comparison.md")
    ap.add_argument("--json", type=Path, default=DOCS / "vllm_comparison.json")
    ap.add_argument("--render-from", type=Path, default=None,
                    help="only rewrite --md from a JSON this script wrote (no benchmark runs)")
    args = ap.parse_args()
    if args.render_from is not None:
        data = json.loads(args.render_from.read_text())
        rates = [float(r) for r in data["config"]["rates"]]
        names, results, profiles = data["systems"], data["runs"], data.get("py_spy") or {}
        table = build_table(results, rates)
        data["verdict"] = findings(table, rates, names)
        args.md.write_text(render(data, table, results, rates, profiles, names) + "\n")
        if args.render_from.resolve() == args.json.resolve():  # keep the JSON's verdict in step
            args.json.write_text(json.dumps(data, indent=2, default=str) + "\n")
        print(f"wrote {args.md} from {args.render_from}")
        return 0

    t_start = time.perf_counter()
    rates = [float(r) for r in args.rates.split(",")]
    cfg = BenchConfig(num_prompts=args.num_prompts, input_len=args.input_len, output_len=args.output_len,
                      seed=args.seed)
    from scripts.make_test_model import make_test_model

    vs_vllm_server.set_device(args.device)
    model_dir = Path(make_test_model(args.model_dir, shape=args.model_shape))
    log_root = args.log_dir or Path(tempfile.mkdtemp(prefix="vllm-comparison-"))
    notes = machine_notes()
    if args.device == "gpu":
        notes.update(gpu_notes())
        if not args.no_microbench:
            print("--device gpu: no decode microbenchmark (it times CPU torch threads)", flush=True)
            args.no_microbench = True
    print(f"logs: {log_root}", flush=True)

    cpu_profile = None
    profile_info: dict[str, Any] = {}
    if not args.no_cpu_profile:
        from accelgen.profiles import load_profile

        cpu_profile = vs_vllm.make_cpu_profile(model_dir, log_root / "cpu-profile.json")
        prof = load_profile(str(cpu_profile))
        profile_info = {"name": prof.name, "s_pf": prof.s_pf, "t_pf_ms": round(prof.t_pf_s * 1000, 3),
                        "num_blocks": prof.num_blocks, "block_size": prof.block_size,
                        "measured_forward_ms": json.loads(cpu_profile.read_text()).get("measured_forward_ms")}
        print(f"CPU profile: S_pf {prof.s_pf}, T_pf {prof.t_pf_s * 1000:.2f} ms", flush=True)

    specs = systems(model_dir, log_root, cpu_profile)
    names = [n for n, _ in specs]
    results: dict[str, list[dict[str, Any]]] = {name: [] for name in names}
    do_spy = not args.no_py_spy and vs_vllm_diagnostics.py_spy_binary() is not None
    if not args.no_py_spy and not do_spy:
        print("py-spy not found: skipping the profile runs (pip install py-spy into the venv)", flush=True)
    pcfg = BenchConfig(num_prompts=args.py_spy_prompts, input_len=args.input_len, output_len=args.output_len,
                       seed=args.seed)
    profiled = {n for n, _ in specs[:2]}  # vllm serve and the stack on the same (FCFS) policy, as shipped

    def spy(name: str) -> Callable[[Server], Any]:
        return lambda server: vs_vllm_diagnostics.profile_run(server, model_dir, pcfg, log_root / "py-spy" /
                                                              name.replace(" ", "_").replace(",", ""))

    profiles: dict[str, dict[str, Any]] = {}
    failures: list[dict[str, Any]] = []
    for rnd in range(args.rounds):
        # Odd rounds run the systems in reverse order, so that a drift in the machine's background
        # load does not always favour the same system.
        last = rnd == args.rounds - 1
        for name, start in (specs if rnd % 2 == 0 else specs[::-1]):
            print(f"[round {rnd + 1}/{args.rounds}] {name}", flush=True)
            for attempt in (1, 2):  # one retry: a start-up or warm-up failure on a busy machine
                try:
                    r = vs_vllm.run_rates(start, model_dir, rates, cfg, log=lambda m: print(m, flush=True),
                                          single_stream_prompts=args.single_stream,
                                          saturation_repeats=args.saturation_repeats, probe_requests=args.probe,
                                          extra=spy(name) if (do_spy and last and name in profiled) else None)
                    break
                except Exception as exc:
                    print(f"  {name} failed ({exc!r}){'; retrying' if attempt == 1 else ''}", flush=True)
                    failures.append({"system": name, "round": rnd + 1, "attempt": attempt, "error": repr(exc)})
                    if attempt == 2:
                        raise
            if r.get("extra"):
                profiles[name] = r.pop("extra")
                print(f"  py-spy run: {profiles[name]['run']['output_tok_s']:.0f} tok/s; "
                      + "; ".join(f"{k} {v['active_s']:.1f} s" for k, v in profiles[name]["services"].items()),
                      flush=True)
            results[name].append(r)

    microbench: dict[str, Any] = {}
    if not args.no_microbench:
        print("[microbench] the worker's decode step, torch's default threads vs OMP_NUM_THREADS=1", flush=True)
        microbench = vs_vllm_diagnostics.decode_microbench({"default (as the worker runs)": {},
                                                            "OMP_NUM_THREADS=1": {"OMP_NUM_THREADS": "1"}})
        print(f"  {microbench}", flush=True)

    table = build_table(results, rates)
    elapsed = time.perf_counter() - t_start
    command = ".venv/bin/python scripts/make_vllm_comparison.py" + (
        "" if sys.argv[1:] == [] else " " + " ".join(shlex.quote(a) for a in sys.argv[1:]))
    data = {"generated": dt.datetime.now().isoformat(timespec="seconds"), "command": command,
            "elapsed_s": round(elapsed, 1), "machine": notes,
            "config": {"rates": [_rate_name(r) for r in rates], "num_prompts": cfg.num_prompts,
                       "input_len": cfg.input_len, "output_len": cfg.output_len, "seed": cfg.seed, "rounds": args.rounds,
                       "single_stream_prompts": args.single_stream, "saturation_repeats": args.saturation_repeats,
                       "probe_requests": args.probe, **vs_vllm_server.device_settings(),
                       "model_dir": _shown(model_dir), "model_shape": args.model_shape, "cpu_profile": profile_info},
            "systems": names, "table": table, "runs": results, "py_spy": profiles, "decode_microbench": microbench,
            "failures": failures,
            "verdict": findings(table, rates, names)}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(data, indent=2, default=str) + "\n")
    args.md.write_text(render(data, table, results, rates, profiles, names) + "\n")
    if not args.log_dir:
        print(f"server logs and py-spy samples left in {log_root}", flush=True)
    print(f"wrote {args.md} and {args.json} in {elapsed:.0f} s", flush=True)
    print("\n".join(fmt_table(table, rates, names)))
    print("\n".join(data["verdict"]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
