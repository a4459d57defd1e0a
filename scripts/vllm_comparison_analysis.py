"""The "Analysis" section of docs/vllm_comparison.md: findings, with this run's numbers filled in."""

from __future__ import annotations

from typing import Any

from scripts.vllm_comparison_stats import SINGLE, _clean, _rate_name, _samples, _vllm_collapsed, representative


def _cat_sum(service: dict[str, Any], *needles: str) -> float:
    return sum(v for k, v in service.get("categories", {}).items() if any(n in k for n in needles))


def _single_overhead_ms(results: dict[str, list[dict[str, Any]]], name: str) -> float:
    """The scheduler's overhead EWMA in the first round's one-at-a-time run of ``name`` (nan: none)."""
    rounds = results.get(name) or [{}]
    return ((rounds[0].get("single") or {}).get("scheduler") or {}).get("overhead_ms", float("nan"))


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
    U = table.get("accelgen, vllm policy, unpipelined")
    if U is not None:
        u_sat = representative(results["accelgen, vllm policy, unpipelined"], i_sat)
        u_it = (u_sat.get("scheduler") or {}).get("iterations")
        para += (f" Pipelining (plan k+1 decided and sent while the worker runs plan k) is worth "
                 f"{A[sat]['ratio_vs_vllm'] - U[sat]['ratio_vs_vllm']:+.2f} of that ratio: the same stack waiting for "
                 f"each result reaches {U[sat]['ratio_vs_vllm']:.2f}x"
                 + (f", {1000 * u_sat['duration_s'] / u_it:.1f} ms per iteration" if u_it else "")
                 + f" (scheduler overhead outside the model {(u_sat.get('scheduler') or {}).get('overhead_ms', 0):.2f} "
                 f"ms per iteration against {(a_sat.get('scheduler') or {}).get('overhead_ms', 0):.2f} pipelined).")
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
                "Each iteration the scheduler sends the worker one plan on its ExecuteStream (decided while the "
                "previous plan runs) and each gateway one WatchMany "
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
    if _vllm_collapsed(table) or (S_v and S_v["median_tpot_ms"] < 0.5):
        para += ("One request at a time vllm serve's streaming collapsed in this run (see below), so those "
                 f"differences favour the stack for the wrong reason; the {low} req/s figure, where vllm serve "
                 "streamed token by token, is the one to judge. ")
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
    if S_a and S_v:
        S_u = (table.get("accelgen, vllm policy, unpipelined") or {}).get(SINGLE)
        para += (f"One request at a time, where nothing batches, the stack's median TPOT is {S_a['median_tpot_ms']:.2f} ms"
                 + (f" pipelined and {S_u['median_tpot_ms']:.2f} ms with `--pipeline false`" if S_u else "")
                 + f" (scheduler overhead outside the model {_single_overhead_ms(results, 'accelgen, vllm policy'):.2f} ms "
                 f"per iteration, {_single_overhead_ms(results, 'accelgen, vllm policy, unpipelined'):.2f} ms unpipelined; "
                 "the first round's run): "
                 "with pipelining the decision, the plan's trip to the worker and the result's trip back overlap "
                 "the model, and what is left between two steps is the worker's own Python around the model. ")
    mb_default = microbench.get("default (as the worker runs)")
    mb_one = microbench.get("OMP_NUM_THREADS=1")
    para += ("The worker runs the model with the torch threads vllm serve gives its CPU model worker (every core but "
             "one: 1 here). vLLM's in-process executor applies no such binding itself, and its CPU worker replaces "
             "`torch.set_num_threads` with a no-op during device initialisation, so until commit 84fecfb the worker "
             "ran with as many OpenMP threads as cores, and its threads competed with the worker's own gRPC work and "
             "the other services: a batch-1 decode step took 2.2 ms instead of 1.3 (that commit's message has the "
             "A/B), and pipelining, which puts the scheduler's work beside the model's, made that worse. ")
    if mb_default and mb_one:
        d, o = mb_default["decode_ms"], mb_one["decode_ms"]
        para += (f"Decode step as the worker runs it ({mb_default['torch_threads']} thread) and with OMP_NUM_THREADS=1: "
                 + ", ".join(f"batch {b} {d[b]:.2f} vs {o[b]:.2f} ms" for b in d) + ".")
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
        if errs == ["Too Many Requests"]:
            out += [(f"**Refused requests.** {n_req} requests were refused in {len(failed)} of the stack's runs, all "
                     "with HTTP 429 (Too Many Requests), all with the accelgen policy at saturation: its SLO-aware "
                     "admission (on by default) refuses a request whose first token it predicts past its class's TTFT "
                     "from the prefill work ahead of it and the measured prefill rate, with a `Retry-After`. Every "
                     "request here is in the default class, and 200 arriving at once queue more prefill than that "
                     "TTFT allows on this CPU (vllm serve's p99 TTFT at saturation above is the same queue). The "
                     "output tokens/s of those rows count the completed requests only, so they compare a server "
                     "that served the requests it predicted it could start in time (whether they then met their "
                     "SLOs is not measured by this client) with one that served all of them, many late: "
                     "`accelgen scheduler --admission false` serves them all, as the vllm policy does."), ""]
        else:
            out += [(f"**Failed requests.** {n_req} requests failed in {len(failed)} of the stack's runs ({errs}). "
                     "The gateway answers HTTP 503 when a scheduler call ends in gRPC UNAVAILABLE and 429 when it "
                     "ends in RESOURCE_EXHAUSTED (a full queue, SLO-aware admission); the cause of these is not "
                     "identified here."), ""]

    # 6. noise
    all_runs = [x for n in names for r in results[n] for i in range(len(rates)) for x in _samples(r, i)]
    rest = [x["cpu_s"].get("rest of machine", 0.0) for x in all_runs]
    busy = sum(not _clean(x) for x in all_runs)
    if rest:
        spread = {n: table[n][sat]["output_tok_s_all"] for n in ("vllm serve", "accelgen, vllm policy")}
        spread_txt = "; ".join(f"{n} {min(v):.0f}-{max(v):.0f} tok/s" for n, v in spread.items())
        v_runs = sorted(spread["vllm serve"])
        slow = [x for x in v_runs if x < 0.6 * v_runs[-1]]
        if slow:
            kept = [x for x in v_runs if x >= 0.6 * v_runs[-1]]
            med = kept[len(kept) // 2] if len(kept) % 2 else (kept[len(kept) // 2 - 1] + kept[len(kept) // 2]) / 2
            a_med = A[sat]["output_tok_s"]
            spread_txt += (f" ({len(slow)} of vllm serve's runs, {', '.join(f'{x:.0f}' for x in slow)} tok/s, fell "
                           "below 60% of its best; they are in its median, as every clean run is. Without them its "
                           f"median would be {med:.0f} tok/s and the vllm-policy stack's ratio {a_med / med:.2f}x)")
        out += [(f"**Noise.** The machine is shared: other jobs used up to {max(rest):.1f} CPU-s during a single run "
                 f"(`rest of machine` above), and {busy} of {len(all_runs)} runs had them above 10% of the cores "
                 "and were left out of the medians (starred). Saturation runs last a few seconds, hence several "
                 f"per system; in this run they spread {spread_txt}. Earlier runs, on other days and on VMs "
                 "of this size with a different CPU model (the set-up line names this one), gave absolute "
                 "numbers up to 20% apart and ratios a few hundredths apart, so compare systems within one "
                 "run."), ""]
    return out
