"""The "Analysis" section of docs/vllm_comparison.md: findings, with this run's numbers filled in."""

from __future__ import annotations

from typing import Any

from scripts.vllm_comparison_stats import SINGLE, _clean, _rate_name, _samples, _vllm_collapsed, representative


def _cat_sum(service: dict[str, Any], *needles: str) -> float:
    return sum(v for k, v in service.get("categories", {}).items() if any(n in k for n in needles))


def analysis(table: dict[str, dict[str, Any]], results: dict[str, list[dict[str, Any]]], rates: list[float],
             names: list[str], profiles: dict[str, dict[str, Any]], microbench: dict[str, Any]) -> list[str]:
    """Findings, with this run's numbers filled in. The mechanisms named here were established
    while writing this benchmark (probes described in the text); the numbers are this run's."""
    V, A = table.get("vllm serve"), table.get("accelgen, vllm policy")
    if V is None or A is None or float("inf") not in rates:
        return ["(needs vllm serve, the vllm-policy stack and the `inf` rate)"]
    sat, low = "inf", _rate_name(min(rates))
    i_sat, i_low = rates.index(float("inf")), rates.index(min(rates))
    v_sat, a_sat = representative(results["vllm serve"], i_sat), representative(results["accelgen, vllm policy"], i_sat)
    v_low, a_low = representative(results["vllm serve"], i_low), representative(results["accelgen, vllm policy"], i_low)
    out: list[str] = []

    # 1. throughput at saturation
    cpu = a_sat["cpu_s"]
    others = sum(cpu.get(k, 0.0) for k in ("scheduler", "gateway", "redis", "bench client"))
    vcpu = v_sat["cpu_s"]
    api = vcpu.get("vllm-serve", 0.0)
    engine = sum(v for k, v in vcpu.items() if "EngineCore" in k)
    vworker = sum(v for k, v in vcpu.items() if "Worker" in k)
    it_a = (a_sat.get("scheduler") or {}).get("iterations")
    it_v = (v_sat.get("engine") or {}).get("iterations")
    para = (f"**Throughput at saturation.** With vLLM's own FCFS policy and the same batch limits the stack "
            f"reaches {A[sat]['ratio_vs_vllm']:.2f}x vllm serve's output tokens/s at saturation (per round: "
            f"{', '.join(f'{x:.0f}' for x in A[sat]['output_tok_s_all'])} vs "
            f"{', '.join(f'{x:.0f}' for x in V[sat]['output_tok_s_all'])} tok/s). ")
    if it_a and it_v:
        para += (f"In the representative saturation runs (the clean runs with the median throughput, next "
                 f"section) the stack took {it_a} engine iterations to vllm serve's {it_v}, "
                 f"{1000 * a_sat['duration_s'] / it_a:.1f} vs {1000 * v_sat['duration_s'] / it_v:.1f} ms of wall time "
                 "each. ")
    para += (f"During that run the worker was on-CPU {cpu.get('worker-0', 0):.1f} s of {cpu['wall_s']:.1f} s, while the "
             f"scheduler, gateway, Redis and the benchmark client together used {others:.1f} CPU-s, "
             f"{100 * others / cpu['wall_s']:.0f}% of the second core. On two cores every CPU-second the services "
             "spend outside the model is taken from the model or delays the next plan. vllm serve's API server used "
             f"{api:.1f} CPU-s in its run, its engine core {engine:.1f} and its model worker {vworker:.1f} (the last "
             "two spin-wait for each other, so their CPU time overstates their work).")
    out += [para, ""]
    prof = (profiles.get("accelgen, vllm policy") or {}).get("services", {})
    vprof = (profiles.get("vllm serve") or {}).get("services", {})
    if prof:
        sch, gw, wk = prof.get("scheduler", {}), prof.get("gateway", {}), prof.get("worker-0", {})
        n_tokens = a_sat.get("total_output_tokens") or 0
        v_http = sum(_cat_sum(x, "HTTP") for x in vprof.values())
        para = (f"py-spy on a saturation run says where the services' CPU goes. Scheduler: {sch.get('active_s', 0):.1f} s "
                f"on-CPU, of which {_cat_sum(sch, 'gRPC'):.1f} s is gRPC (mostly its C core, reached from asyncio "
                f"callbacks and the poller thread), {_cat_sum(sch, 'Redis'):.1f} s the Redis client and only "
                f"{_cat_sum(sch, 'scheduling decision'):.2f} s the scheduling decision (`sched_ms_p50` "
                f"{(a_sat.get('scheduler') or {}).get('sched_ms_p50', 0):.2f} ms per iteration). Gateway: "
                f"{gw.get('active_s', 0):.1f} s, of which {_cat_sum(gw, 'HTTP'):.1f} s HTTP + SSE (the work vLLM's "
                f"API server also does: {v_http:.1f} s there), {_cat_sum(gw, 'gRPC'):.1f} s gRPC and "
                f"{_cat_sum(gw, 'tokenise'):.1f} s (de)tokenising. Worker: {wk.get('active_s', 0):.1f} s, of which "
                f"{_cat_sum(wk, 'model forward'):.1f} s the model forward, {_cat_sum(wk, 'vLLM runner'):.1f} s vLLM's "
                f"input preparation and sampling, {_cat_sum(wk, 'translation'):.2f} s AccelGen's plan translation. "
                "Each iteration the scheduler sends the worker one ExecuteIteration and each gateway one WatchMany "
                f"message with every request's new tokens ({n_tokens} tokens in the measured run), as vLLM's engine "
                "core hands its API server one message per iteration. Until commit 6558c48 it sent one Watch "
                "message per running request per iteration (up to 128 per iteration); in the run committed before "
                "that (330f9f1) the scheduler was on-CPU 3.4 s, 2 s of it gRPC, and the stack reached 0.65x. What "
                "is left outside the model is mostly the gateway's HTTP + SSE, the same work vLLM's API server "
                "does, and the worker's Python around the model. "
                "Not measured here: on a GPU server the model does not share two cores with these services.")
        out += [para, ""]

    # 2. TTFT
    S_v, S_a = V.get(SINGLE), A.get(SINGLE)
    para = (f"**TTFT.** At {low} req/s the stack's median TTFT is {A[low]['median_ttft_ms']:.1f} ms against "
            f"{V[low]['median_ttft_ms']:.1f} ms ({A[low]['added_median_ttft_ms']:+.1f} ms). ")
    if S_v and S_a:
        para += (f"One request at a time it is {S_a['median_ttft_ms']:.1f} ms (p10 {S_a['p10_ttft_ms']:.1f}) against "
                 f"{S_v['median_ttft_ms']:.1f} ms (p10 {S_v['p10_ttft_ms']:.1f}). ")
    pa, pv = A.get("probe"), V.get("probe")
    if pa and pv:
        para += (f"On one reused keep-alive connection (the probe) the first event comes after "
                 f"{pa['first_event_ms_median']:.1f} ms from the stack against {pv['first_event_ms_median']:.1f} ms "
                 f"from vllm serve (fresh connection: {pa['first_event_ms_fresh']:.1f} vs "
                 f"{pv['first_event_ms_fresh']:.1f} ms); a {pa['max_tokens']}-token answer took "
                 f"{pa['reads_median']:.0f} socket reads from the stack and {pv['reads_median']:.0f} from vllm serve "
                 "(one read per token means nothing held tokens back). ")
    if _vllm_collapsed(table):
        para += ("In this run vllm serve's streaming collapsed (see the caveat and below), so these differences "
                 "favour the stack for the wrong reason. In earlier runs of this script today in which vllm serve "
                 "streamed normally, the stack's one-at-a-time p10 TTFT was 1.9-3.7 ms above vllm serve's (13.7 vs "
                 "11.8 ms, 13.2 vs 9.5 ms), and on the scheduler's own gRPC API (Submit + Watch, no gateway) the "
                 "first token came 7-9 ms after the submit against vllm serve's ~9.5 ms HTTP TTFT: the stack's own "
                 "addition is a few milliseconds, inside the 10 ms goal. ")
    para += ("What the stack adds to the first token, one at a time: the gateway tokenises the prompt and "
             "submits it (a gRPC call, and the scheduler writes the request to Redis before it answers), the "
             "scheduler plans and sends the prefill to the worker (a second gRPC call), commits the iteration to "
             "Redis, and only then publishes the token on the gateway's WatchMany stream (a third hop), "
             "which detokenises it and writes the SSE event.")
    out += [para, ""]
    out += [("*Found and fixed while writing this benchmark.* The first runs (before commit 0b30316) showed the "
             "stack's one-at-a-time TTFT at ~46 ms against ~13 ms after the fix, and the probe's first event at "
             "~45 ms on every reused connection with several tokens per read: the gateway created its HTTP "
             "listening socket as `socket.socket(AF_INET, SOCK_STREAM)` (`proto` 0), and asyncio's default event "
             "loop turns on `TCP_NODELAY` only for sockets whose `proto` is `IPPROTO_TCP` "
             "(`asyncio.base_events._set_nodelay`), so the gateway's connections ran Nagle's algorithm: the first "
             "SSE event waited for the client's delayed ACK of the response headers (up to 40 ms on Linux), later "
             "events were coalesced. vllm serve runs on uvloop, which sets `TCP_NODELAY` on every TCP connection. "
             "The gateway's gRPC `Generate` stream and the scheduler's `Watch` delivered the first token in "
             "8-15 ms all along. `gateway/main.py` now creates the socket with `IPPROTO_TCP`; the probe above is "
             "the regression check (first event close to vllm serve's, one read per token). Under Poisson "
             "arrivals the median was barely affected, most likely because a connection that sat idle "
             "acknowledges at once (Linux quick-ACK mode); clients that send the next request right after an "
             "answer paid it."), ""]
    if S_v:
        out += [("vllm serve's own streaming is unreliable on this machine: in some runs its one-at-a-time TTFT "
                 "comes in streaks of 8-12 ms and streaks of 110-190 ms in which the whole 64-token answer arrives "
                 "in a single read (seen with the client's per-request timings), in others it stays in the slow "
                 "mode throughout"
                 + (" (as in this run, on an otherwise idle machine: one-at-a-time p10 TTFT "
                    f"{S_v['p10_ttft_ms']:.1f} ms, median TPOT {S_v['median_tpot_ms']:.2f} ms)"
                    if _vllm_collapsed(table) else "")
                 + ". Its model worker is pinned to core 0 and spin-waits, its engine core "
                 "spin-waits for the worker (py-spy: `sched_yield`, the shared-memory queue), and its API server "
                 "shares core 1 with the engine core and the client, so most likely the API server is starved until "
                 "a request ends. Its throughput does not suffer from this; its latency figures do."), ""]

    # 3. TPOT at low load
    sch_low = a_low.get("scheduler") or {}
    para = (f"**TPOT.** At {low} req/s the stack's median TPOT is {A[low]['median_tpot_ms']:.2f} ms against "
            f"{V[low]['median_tpot_ms']:.2f} ms"
            + (" (vllm serve's figure is an artefact of its tokens arriving in bunches, see above; when it "
               "streams normally its one-at-a-time TPOT is 1.4-1.7 ms)"
               if V[low]["median_tpot_ms"] < 1.0 else "") + ". Each token is one iteration round trip (plan, gRPC to the worker, "
            "the model, gRPC back, the Redis commit, the WatchMany message to the gateway, the SSE event); the scheduler "
            f"measures {sch_low.get('overhead_ms', float('nan')):.2f} ms of each iteration outside the model at this "
            "rate (EWMA), and since each iteration is longer, requests arriving meanwhile batch into it: "
            f"{sch_low.get('iterations', '?')} iterations against vllm serve's "
            f"{(v_low.get('engine') or {}).get('iterations', '?')} for the same requests. ")
    mb_default = microbench.get("default (as the worker runs)")
    mb_one = microbench.get("OMP_NUM_THREADS=1")
    para += ("The worker's model step is also slower than vllm serve's for small batches: the in-process executor "
             "runs torch with as many OpenMP threads as cores (2 here). vLLM's CPU worker replaces "
             "`torch.set_num_threads` with a no-op during device initialisation (the worker log says \"CPU backend "
             "doesn't allow to use `torch.set_num_threads` after the thread binding, skip it\"), so vLLM's later "
             "`set_torch_threads_for_runtime()` cannot reduce it to 1, and the core binding that vllm serve's "
             "multiprocess executor sets up (model worker on core 0 with one thread, core 1 reserved) never runs "
             "for the in-process executor. ")
    if mb_default and mb_one:
        d, o = mb_default["decode_ms"], mb_one["decode_ms"]
        bs = list(d)
        para += (f"Decode step with {mb_default['torch_threads']} threads vs 1: "
                 + ", ".join(f"batch {b} {d[b]:.2f} vs {o[b]:.2f} ms" for b in bs)
                 + ". Two spinning OpenMP threads on two shared cores cost small batches; they help large ones "
                 "when a core is free, so `OMP_NUM_THREADS=1` is a latency/throughput trade-off here, not a plain "
                 "fix (in A/B runs under this machine's background load its effect on served TPOT and throughput "
                 "was within noise). Binding the worker like vllm serve does would be the consistent choice.")
    out += [para, ""]

    # 4. the accelgen policy
    P_gpu, P_cpu = table.get("accelgen, accelgen policy (A100 profile)"), table.get("accelgen, accelgen policy (CPU profile)")
    if P_gpu:
        para = (f"**The accelgen policy.** At saturation it reaches {P_gpu[sat]['ratio_vs_vllm']:.2f}x vllm serve on "
                "the shipped OPT-13B/A100 profile"
                + (f" and {P_cpu[sat]['ratio_vs_vllm']:.2f}x on the profile measured on this CPU" if P_cpu else "")
                + f", against the vllm policy's {A[sat]['ratio_vs_vllm']:.2f}x. It is built to trade throughput for "
                "per-token deadlines: every request here is in the default `chat` class (TBT 50 ms), and each "
                "iteration's token budget is derived from the profile (S_b = S_pf x SLO / T_pf), scaled online by the "
                "measured/predicted model time, and the batch is priced with the profile's cost model plus the "
                "measured per-iteration overhead so that it stays within the tightest running TBT. On a 2-core CPU "
                "where a 2,048-token iteration plus the stack's overhead approaches 50 ms, that trims the prefill "
                "part of the batches, so the burst takes more iterations to prefill than under the vllm policy's "
                "fixed 2,048 tokens. (In a separate saturation run with the worker at DEBUG log level, its "
                "`iteration_done` lines showed prefill-phase iterations of about 1,000-1,200 tokens on the A100 "
                "profile against the vllm policy's 2,048.) Which profile comes out ahead varies between runs; "
                "its decision itself costs 0.1-0.2 ms per iteration (`sched_ms_p50`) against 0.05 ms for the vllm "
                "policy, small next to the rest of an iteration. Below saturation all three set-ups deliver the "
                f"offered load (median TPOT at {low} req/s: {A[low]['median_tpot_ms']:.2f} ms vllm policy, "
                f"{P_gpu[low]['median_tpot_ms']:.2f} ms A100 profile"
                + (f", {P_cpu[low]['median_tpot_ms']:.2f} ms CPU profile" if P_cpu else "") + ").")
        out += [para, ""]

    # 5. failed requests
    failed = [(n, x) for n in names for r in results[n] for i in range(len(rates)) for x in _samples(r, i)
              if x.get("failed") and n != "vllm serve"]
    if failed:
        n_req = sum(x["failed"] for _, x in failed)
        errs = sorted({e for _, x in failed for e in (x.get("errors_sample") or [])})
        out += [(f"**Failed requests.** {n_req} requests failed in {len(failed)} of the stack's runs ({errs}). "
                 "The gateway answers HTTP 503 when a scheduler call ends in gRPC UNAVAILABLE (before streaming: "
                 "the Submit): the scheduler says so when Redis raises or no worker is registered, and gRPC itself "
                 "when the channel breaks. They failed before streaming (the gateway's `request_submitted` log line, "
                 "written after a successful Submit, is missing for them), and neither service logged anything "
                 "else for them (the gateway does not log rejected HTTP requests), so the cause is not identified here; eleven back-to-back bursts of 200 "
                 "requests against fresh stacks (vllm and accelgen policies), run afterwards to reproduce it, all "
                 "succeeded. Worth a log line with the "
                 "gRPC status details in the gateway's error handler."), ""]

    # 6. noise
    all_runs = [x for n in names for r in results[n] for i in range(len(rates)) for x in _samples(r, i)]
    rest = [x["cpu_s"].get("rest of machine", 0.0) for x in all_runs]
    busy = sum(not _clean(x) for x in all_runs)
    if rest:
        spread = {n: table[n][sat]["output_tok_s_all"] for n in ("vllm serve", "accelgen, vllm policy")}
        spread_txt = "; ".join(f"{n} {min(v):.0f}-{max(v):.0f} tok/s" for n, v in spread.items())
        out += [(f"**Noise.** The machine is shared: other jobs used up to {max(rest):.1f} CPU-s during a single run "
                 f"(`rest of machine` above), and {busy} of {len(all_runs)} runs had them above 10% of the cores "
                 "and were left out of the medians (starred). Saturation runs last a few seconds, hence several "
                 f"per system; in this run they spread {spread_txt}. Earlier runs, on other days and on VMs "
                 "of this size with a different CPU model (the set-up line names this one), gave absolute "
                 "numbers up to 20% apart and ratios a few hundredths apart, so compare systems within one "
                 "run."), ""]
    return out
