"""What a phase's records mean: per request accepted / finished / lost / differing, per class the
counts, the recovery times and the client-visible errors.

- accepted: the scheduler knows the request at the end (``GetRequest``), or the client saw a token;
- finished: the scheduler's record says finished with every output token (``max_new_tokens``;
  greedy, ``ignore_eos``);
- lost: accepted and not finished;
- differing: the scheduler's output, or what the client received (its stream must be a prefix of
  the reference, and all of it once the client finished: no token lost or repeated), is not the
  fault-free reference run's output for the same request.

Requests are matched by the client's label (``spec.request_id``); their states are read by the id
the gateway made (``request_id`` of a record). The gateway makes a new id each run, and the sim's
tokens depend on it: for the sim executor the fault-free output is computed from the id
(``sim_token``, greedy with ``ignore_eos``: exactly what the reference run would give that id),
for vLLM (greedy: the prompt decides) it is the reference run's.
"""

from __future__ import annotations

import statistics
from collections import Counter
from typing import Any

from gateway.tokenizer import ByteTokenizer, IncrementalDetokenizer
from worker_service.executors.sim import sim_token


def _prefix(a: list, b: list) -> bool:
    return len(a) <= len(b) and b[: len(a)] == a


def judge(rec: dict, state: dict | None, ref_state: dict | None, ref_rec: dict | None) -> dict[str, Any]:
    spec = rec["spec"]
    saw = bool(rec["tokens"] or rec["text"] or rec["finish_reason"])
    accepted = state is not None or saw
    done = bool(state and state["status"] == "finished" and len(state["output_ids"]) == spec["max_new_tokens"])
    ref = ref_state["output_ids"] if ref_state and ref_state["status"] == "finished" else None
    why = []
    if ref is not None and state is not None:
        if done and state["output_ids"] != ref:
            why.append("scheduler")
        elif not done and not _prefix(state["output_ids"], ref):
            why.append("scheduler-partial")
    if ref is not None and spec["via"] == "grpc":
        if not _prefix(rec["tokens"], ref) or (rec["finished"] and rec["tokens"] != ref):
            why.append("client-stream")
        if rec["complete_ids"] is not None and rec["complete_ids"] != ref:
            why.append("client-complete")
    if ref_rec is not None and ref_rec["finished"] and spec["via"] == "http":
        if not ref_rec["text"].startswith(rec["text"]) or (rec["finished"] and rec["text"] != ref_rec["text"]):
            why.append("client-http-text")
    return {"accepted": accepted, "finished": done, "lost": accepted and not done, "differs": why,
            "no_reference": accepted and ref is None, "status": state["status"] if state else "unknown",
            "client_finished": rec["finished"]}


def _stats(values: list[float]) -> dict[str, float | None]:
    if not values:
        return {"median": None, "p90": None, "max": None}
    values = sorted(values)
    return {"median": round(statistics.median(values), 2), "p90": round(values[int(0.9 * (len(values) - 1))], 2),
            "max": round(values[-1], 2)}


def reference_of(rec: dict, reference: dict, executor: str) -> tuple[dict | None, dict | None]:
    """(final state, client record) of the fault-free run of ``rec``'s request (None: none)."""
    if executor == "sim":
        if not rec.get("request_id"):
            return None, None
        spec = rec["spec"]
        ids = [sim_token(rec["request_id"], i) for i in range(spec["max_new_tokens"])]
        detok = IncrementalDetokenizer(ByteTokenizer(), spec["prompt"])  # the sim's gateway detokenises so
        text = detok.add(ids)  # an incomplete last character is dropped, as vLLM does
        return {"status": "finished", "output_ids": ids}, {"finished": True, "text": text}
    ref_rec = reference["records"].get(rec["spec"]["request_id"])
    ref_id = ref_rec.get("request_id") if ref_rec else None
    return (reference["final"].get(ref_id) if ref_id else None), ref_rec


def summarize_phase(phase: dict, reference: dict, executor: str = "sim") -> dict[str, Any]:
    if phase["status"] != "run":
        return {"class": phase["class"], "title": phase["title"], "status": phase["status"],
                "reason": phase.get("reason", "")}
    counts: Counter = Counter()
    errors: Counter = Counter()
    lost_ids, diff_ids, lost_status = [], [], Counter()
    for rec in phase["records"]:
        rid = rec["spec"]["request_id"]
        state = phase["final"].get(rec["request_id"]) if rec.get("request_id") else None
        j = judge(rec, state, *reference_of(rec, reference, executor))
        counts["sent"] += 1
        counts["accepted"] += j["accepted"]
        counts["finished"] += j["finished"]
        counts["client_finished"] += j["client_finished"]
        counts["no_reference"] += j["no_reference"]
        counts["http"] += rec["spec"]["via"] == "http"
        counts["attaches"] += rec["attaches"]
        if j["lost"]:
            counts["lost"] += 1
            counts["lost_http"] += rec["spec"]["via"] == "http"
            lost_status[j["status"]] += 1
            lost_ids.append(rid)
        if j["differs"]:
            counts["differing"] += 1
            diff_ids.append(f"{rid} ({', '.join(j['differs'])})")
        if not j["accepted"]:
            counts["not_accepted"] += 1
        errors.update(rec["errors"])
    events = phase["events"]
    ready = [e["ready_s"] for e in events if e.get("ready_s") is not None]
    serving = [e["serving_s"] for e in events if e.get("serving_s") is not None]
    extra: dict[str, Any] = {}
    if any("deposed_exit" in e for e in events):
        extra["deposed_exit_codes"] = dict(Counter(str(e.get("deposed_exit")) for e in events))
        extra["both_ready_seen"] = sum(bool(e.get("both_ready_seen")) for e in events)
        extra["takeover_s"] = _stats([e["takeover_s"] for e in events if e.get("takeover_s") is not None])
    harness_errors = [e["error"] for e in events if e.get("error")]
    return {
        "class": phase["class"], "title": phase["title"], "status": "run", "faults": len(events),
        "not_recovered": sum(1 for e in events if e.get("ready_s") is None or not e.get("stack_ready")),
        "requests": {k: counts[k] for k in ("sent", "http", "accepted", "finished", "lost", "lost_http",
                                            "differing", "not_accepted", "client_finished", "no_reference", "attaches")},
        "lost_by_status": dict(lost_status), "lost_ids": lost_ids[:20], "differing_ids": diff_ids[:20],
        "ready_s": _stats(ready), "serving_s": _stats(serving), "client_errors": dict(errors.most_common()),
        "log_counts": phase["log_counts"], "restarts": {n: p["starts"] - 1 for n, p in phase["procs"].items()},
        "exit_codes": {n: p["exit_codes"] for n, p in phase["procs"].items() if p["exit_codes"]},
        "harness_errors": harness_errors[:5], "wall_s": phase["wall_s"], **extra}


def summarize(result: dict) -> dict[str, Any]:
    executor = result["settings"].get("executor", "sim")
    classes = [summarize_phase(p, result["reference"], executor) for p in result["phases"]]
    ran = [c for c in classes if c["status"] == "run"]
    total = Counter()
    for c in ran:
        total["faults"] += c["faults"]
        for k, v in c["requests"].items():
            total[k] += v
        for counts in c["log_counts"].values():
            total["too_many_pings"] += counts.get("too_many_pings", 0)
            total["goaway"] += counts.get("goaway", 0)
    return {"settings": result["settings"], "wall_s": result["wall_s"], "reference_wall_s": result["reference"]["wall_s"],
            "totals": dict(total), "classes": classes}
