"""AccelGen (arXiv 2503.13737): SLO-guaranteed dynamic chunking, iteration-level SLO
prioritisation and multi-resource-aware batching.

Algorithm, once per iteration:

1. **Remaining time.** For every running request and the head of the waiting queue,
   ``T_r = SLO - T_w - T_e``: the deadline of its next token minus now (SLO - T_w) minus the
   estimated execution time ``T_e`` = iterations it still needs before that token (prompt
   chunks at its own SLO's budget, or one decode) x the time of one such iteration.
2. **Urgency.** Requests with ``T_r <= T_max`` miss their SLO unless they run now; they are
   always put in the batch, least ``T_r`` first (urgent decodes before urgent prefills, so a
   late prompt cannot take the whole budget from them). ``T_max`` is the longest iteration the batch
   can take: the full-budget iteration for the tightest SLO among running requests (the
   cadence they impose), or the largest allowed forward when nothing runs.
3. **Budget.** ``S_b = S_pf * SLO_min / T_pf`` for the tightest iteration SLO among the urgent
   requests (or the most pressing request if none is urgent); prefills are chunked on the fly
   to fill exactly that budget, and the batch is priced with the cost model so the exact batch
   (attention and KV reads included) stays within SLO_min.
4. **Decodes.** Running decodes that are not urgent follow, in T_r order, as long as the
   priced batch stays within SLO_min: one token each and no new KV, they are the cheapest
   demand and finishing them frees KV.
5. **SLO grouping.** After the urgent ones, requests of the batch's own SLO group are
   considered first, then looser groups (they lose nothing in a tighter batch), then tighter
   groups, nearest first; a tighter request joins only if the batch built so far already fits
   its SLO, and then the budget tightens to it. So a loose batch is not cut short for a tight
   request that could wait, and a tight request never joins a batch that would break it.
6. **Multi-resource pick.** Among the prefills, repeatedly take the request whose demand
   ``(tokens it adds, KV blocks it needs)`` is closest, by Euclidean distance with both axes
   normalised by capacity, to what is still free, so neither compute nor KV is left idle.
7. **ERA.** At most ``era_cap`` long prompts (longer than the budget) are prefilled at once, so
   each finishes, and frees its KV, sooner.

Beyond the paper (each a named ``AccelGenConfig`` field, ablated in docs/results.md):
``time_guard`` prices the exact batch with the cost model; ``adaptive_margin`` widens its
safety margin to the measured scatter of iteration times; ``kv_headroom_tokens`` reserves KV
for the growth of running requests at admission; ``triage`` and ``demote_late`` stop requests
that already missed their SLO from crowding out, or setting the pace for, those that can still
make it; ``admission`` refuses at submit what cannot be on time (``core.admission``);
``length_estimates`` learns output lengths online (``core.length_estimate``).

Every mechanism can be switched off on its own for ablations; preemption is vLLM's recompute
of the newest request, optionally the request with the most slack, or (with length estimates)
the one expected to run longest.
"""

from __future__ import annotations

import math

from accelgen.core.admission import AdmissionControl
from accelgen.core.batch_builder import BatchBuilder
from accelgen.core.budget import TokenBudget
from accelgen.core.kv_reserve import (admission_reserve_blocks, growth_blocks, headroom_final_tokens,
                                               headroom_growth_blocks)
from accelgen.core.length_estimate import OutputLengthEstimator
from accelgen.core.policies.accelgen_config import AccelGenConfig
from accelgen.core.plan import BatchPlan, IterationResult
from accelgen.core.policies.accelgen_pick import FillState, euclidean_fill
from accelgen.core.policies.base import Policy
from accelgen.core.profile import DeviceProfile
from accelgen.core.request import Request, RequestStatus
from accelgen.core.slo import SLOCatalog, slo_group
from accelgen.core.timing_margin import AdaptiveMargin


class AccelGenPolicy(Policy):
    name = "accelgen"

    def __init__(self, profile: DeviceProfile, catalog: SLOCatalog, config: AccelGenConfig | None = None) -> None:
        super().__init__(profile, catalog)
        self.config = config or AccelGenConfig()
        self.budget = TokenBudget(profile, self.config.budget)
        self.static_budget = self.budget.for_slo(catalog.tightest_iteration_s())
        self._t_iter: dict[float | None, float] = {}
        self._t_r: dict[str, float] = {}
        self._late: set[str] = set()
        self._te_cache: dict[str, tuple[tuple, float]] = {}  # request id -> (inputs, T_e) of a prefill
        self._reserved_growth: int | None = 0  # this iteration's KV growth reserve (None: not yet computed)
        self._reserving = False  # whether the policy keeps a reserve at all
        self.margin = AdaptiveMargin(self.config.budget.safety_margin)
        self.lengths = OutputLengthEstimator(self.config.length_config) if self.config.length_estimates else None
        if self.config.admission:
            # Until it has measured one, assume the device's peak prefill rate (optimistic: it
            # refuses nothing it should accept while it learns).
            self.admission = AdmissionControl(self.budget.s_pf / self.budget.t_pf_s, self.config.admission_config)

    # -- estimates ---------------------------------------------------------------------------
    def iteration_time_s(self, slo_s: float | None) -> float:
        """Time of one iteration at the budget for ``slo_s`` (never more than the SLO itself)."""
        t = self._t_iter.get(slo_s)
        if t is None:
            if slo_s is None:
                t = self.budget.t_pf_s
            else:
                t = min(slo_s, self.budget.iteration_time_s(slo_s))
            self._t_iter[slo_s] = t
        return t

    def remaining_output_tokens(self, request: Request) -> int:
        """Output tokens still to come; unknown, so estimated (the oracle overrides this)."""
        if self.lengths is not None:
            return max(1, self.expected_output(request) - request.num_output_tokens)
        return max(1, self.config.jct_expected_output_tokens - request.num_output_tokens)

    def expected_output(self, request: Request) -> int:
        """Expected final output length (length estimates on): learned online here; the oracle
        knows it."""
        assert self.lengths is not None
        return self.lengths.expected_output(request.app_class, request.num_prompt_tokens, request.num_output_tokens)

    def on_finish(self, request: Request) -> None:
        self._late.discard(request.request_id)
        self._te_cache.pop(request.request_id, None)
        if self.lengths is not None and request.status is RequestStatus.FINISHED:
            self.lengths.observe(request.app_class, request.num_prompt_tokens, request.num_output_tokens)

    def after_iteration(self, plan: BatchPlan, result: IterationResult, now: float) -> None:
        super().after_iteration(plan, result, now)
        if self.config.adaptive_margin:
            self.margin.observe(plan.predicted_time_s * self.time_correction, result.elapsed_s)
        if not self.config.demote_late:
            return
        requests = self.bound.requests
        for c in plan.chunks:
            if not c.samples:
                continue
            r = requests.get(c.request_id)
            # Its first token just came: if late, the request can no longer attain its SLO.
            if (r is not None and r.num_known_outputs == 1 and r.status is RequestStatus.RUNNING
                    and r.first_token_s is not None and r.first_token_s > r.next_deadline_after_arrival_s()):
                self._late.add(r.request_id)

    def effective_tbt(self, request: Request) -> float | None:
        """The iteration SLO the batch must honour for this request (None: best-effort)."""
        if self.config.demote_late and request.request_id in self._late:
            return None
        return request.slo.tbt_s

    def execution_estimate_s(self, request: Request, pace_slo_s: float | None = None,
                             t_max_s: float | None = None) -> float:
        """``T_e``: time the request still needs to run before its next deadline.

        Iterations it needs (prompt chunks, or one decode) times the time of one iteration, at
        the pace of the batch it will run in: the tightest of its own SLO and ``pace_slo_s``
        (the tightest running SLO, which sets every iteration's budget). With
        ``te_batch_pace`` off: chunks of its own SLO's budget, each at most ``t_max_s`` long.
        """
        own = request.slo.tbt_s
        slo_s = own
        t_cap = None
        if self.config.te_batch_pace:
            if pace_slo_s is not None and (own is None or pace_slo_s < own):
                slo_s = pace_slo_s
        else:
            t_cap = t_max_s
        iterations = 1
        uncomputed = request.num_uncomputed_tokens
        if uncomputed > 1 or not request.output_token_ids:  # still prefilling
            iterations = -(-uncomputed // self.budget.for_slo(slo_s))
        if own is None:  # JCT: the deadline is the end of the whole job
            iterations += self.remaining_output_tokens(request) - 1
        t_iter = self._t_iter.get(slo_s)
        if t_iter is None:
            t_iter = self.iteration_time_s(slo_s)
        if t_cap is not None and t_cap < t_iter:
            t_iter = t_cap
        return iterations * t_iter

    def remaining_time_s(self, request: Request, now: float, pace_slo_s: float | None = None,
                         t_max_s: float | None = None) -> float:
        """``T_r = SLO - T_w - T_e``."""
        return request.next_token_deadline_s() - now - self.execution_estimate_s(request, pace_slo_s, t_max_s)

    def _rank(self, candidates: list[Request], now: float, pace_slo: float | None,
              t_max: float) -> tuple[list[Request], list[Request]]:
        """Compute every candidate's T_r (kept in ``self._t_r``) and return the candidates in
        order (savable before late, then least T_r) and the urgent ones (T_r <= T_max) in the same order.

        ``remaining_time_s`` with the decode case (most running requests, every iteration)
        inlined — one iteration at min(own pace, T_max) — and the sort keys built in the same
        pass: this is the part of the decision that grows with the number of running requests.
        """
        t_iter = self._t_iter
        late = self._late
        te_cache = self._te_cache
        t_r: dict[str, float] = {}
        keyed = []
        for i, r in enumerate(candidates):
            rid = r.request_id
            out_tokens = r.output_token_ids
            tbt = r.slo.tbt_s
            if (out_tokens and tbt is not None and r.last_token_s is not None
                    and r.num_prompt_tokens + len(out_tokens) - r.num_computed_tokens <= 1):
                t = t_iter.get(tbt)
                if t is None:
                    t = self.iteration_time_s(tbt)
                remaining = r.last_token_s + tbt - now - (t if t < t_max else t_max)
            elif tbt is not None:
                # A prefill's T_e changes only with its progress and the batch's pace: cached,
                # since most candidates are waiting prompts whose T_e is the same as last time.
                key = (r.num_computed_tokens, len(out_tokens), pace_slo, t_max)
                hit = te_cache.get(rid)
                if hit is None or hit[0] != key:
                    hit = te_cache[rid] = (key, self.execution_estimate_s(r, pace_slo, t_max))
                remaining = r.next_token_deadline_s() - now - hit[1]
            else:  # JCT: its estimate also follows the learned output lengths
                remaining = self.remaining_time_s(r, now, pace_slo, t_max)
            t_r[rid] = remaining
            keyed.append((rid in late, remaining, r.arrival_s, i))
        self._t_r = t_r
        keyed.sort()  # savable before late, then least T_r, then arrival
        ordered = [candidates[k[3]] for k in keyed]
        if self.config.demote_late:  # best-effort requests are never urgent
            urgent = [candidates[k[3]] for k in keyed if k[1] <= t_max and not k[0]]
        else:
            urgent = [candidates[k[3]] for k in keyed if k[1] <= t_max]
        return ordered, urgent

    def queue_key(self, request: Request, preempted: bool) -> tuple[int, float]:
        # T_r + now = deadline - T_e does not change while a request waits: a static key that
        # orders the waiting queue exactly as T_r does. Late requests (triage) go behind.
        if not self.config.prioritise:
            return (0 if preempted else 1, request.arrival_s)
        if request.request_id in self._late:
            return (1, request.arrival_s)
        return (0, request.next_token_deadline_s() - self.execution_estimate_s(request))

    def _triage(self, now: float) -> None:
        """Move waiting requests whose next-token deadline has passed behind the savable ones."""
        waiting = self.bound.waiting
        while True:
            head = waiting.head(1)
            if not head or head[0].request_id in self._late or head[0].next_token_deadline_s() >= now:
                return
            self._late.add(head[0].request_id)
            waiting.rekey(head[0], preempted=head[0].num_preemptions > 0)

    def is_late(self, request: Request) -> bool:
        return request.request_id in self._late

    def pace_slo_s(self) -> float | None:
        """The tightest iteration SLO among running requests: it sets the pace of every batch."""
        tightest = None
        late = self._late if self.config.demote_late else ()
        for r in self.bound.running:
            tbt = r.slo.tbt_s
            if tbt is not None and (tightest is None or tbt < tightest) and r.request_id not in late:
                tightest = tbt
        return tightest

    def t_max_s(self, pace_slo: float | None = None) -> float:
        """``T_max``: the longest iteration the batch can take (at the running requests' pace)."""
        if pace_slo is None:
            pace_slo = self.pace_slo_s()
        return self.iteration_time_s(pace_slo) if pace_slo is not None else self.budget.iteration_time_s(None)

    # -- the batch ---------------------------------------------------------------------------
    def fill(self, batch: BatchBuilder, now: float) -> None:
        core = self.bound
        cfg = self.config
        if cfg.prioritise and cfg.triage:
            self._triage(now)
        candidates = list(core.running) + core.waiting.head(cfg.candidate_window)
        if not candidates:
            return
        if cfg.prioritise:
            pace = self.pace_slo_s()
            candidates, urgent = self._rank(candidates, now, pace, self.t_max_s(pace))
        else:
            self._t_r = {}
            urgent = []
        slo_min = self._slo_min(urgent or candidates[:1])
        tokens = self.budget.for_slo(self._model_time(slo_min)) if cfg.dynamic_chunking else self.static_budget
        time_limit = None
        if cfg.time_guard and slo_min is not None:
            time_limit = self._model_time(slo_min) * (1.0 - self.margin.margin)
        batch.set_budget(tokens, slo_min, time_limit)

        long_prefills = 0  # started long prompts still prefilling (ERA); is_prefilling inlined
        for r in core.running:
            k = r.num_computed_tokens
            if k > 0:
                n = r.num_prompt_tokens + len(r.output_token_ids)
                if n > tokens and (not r.output_token_ids or n - k > 1):
                    long_prefills += 1
        state = FillState(long_prefills=long_prefills)
        # The reserve is computed when the first waiting request asks for admission: most
        # iterations under load admit nothing, and the sum runs over every running request.
        self._reserved_growth = 0
        self._reserving = cfg.kv_headroom_tokens > 0 or self.lengths is not None
        if self._reserving:
            self._reserved_growth = None
        # Urgent decodes before urgent prefills: one token each, they cannot starve a prefill,
        # while a late prompt placed first could take the whole budget from them. A decode
        # needs no ERA or SLO check (the budget was set for the tightest urgent request).
        urgent_prefills = []
        for request in urgent:
            if request.is_prefilling:
                urgent_prefills.append(request)
            else:
                state.tried.add(request)
                # A decode that gets its block needs nothing else; only a KV shortage takes the
                # general path with its preemption loop.
                if batch.schedule(request) == 0 and batch.last_failure == "kv":
                    self.schedule_running_or_preempt(batch, request, self._victim)
        for request in urgent_prefills:
            if batch.tokens_left <= 0:
                break
            if self._out_of_time(batch, request):
                state.tried.add(request)
                continue
            self.place(batch, request, state)
        if cfg.eager_decodes:
            self._fill_decodes(batch, candidates, state)
        scheduled, tried = batch.is_scheduled, state.tried
        rest = [r for r in candidates
                if (not r.output_token_ids or r.num_prompt_tokens + len(r.output_token_ids) - r.num_computed_tokens > 1)
                and not scheduled(r.request_id) and r not in tried]  # prefills not yet placed
        for group in self._grouped(rest, slo_min):
            if batch.tokens_left <= 0:
                break
            if cfg.multi_resource:
                euclidean_fill(self, batch, group, state)
            else:
                for request in group:
                    if batch.tokens_left <= 0:
                        break
                    self.place(batch, request, state)
        if not cfg.eager_decodes:
            self._fill_decodes(batch, candidates, state)

    def _fill_decodes(self, batch: BatchBuilder, candidates: list[Request], state: FillState) -> None:
        """Running decodes that are not urgent, in T_r order, while the batch stays within its
        time limit.

        A decode adds one token and no KV beyond the block it may open, so in the (compute,
        KV) space it is the cheapest demand there is, and running it releases its KV sooner:
        we take all that the SLO_min of the batch allows. Those left out have slack by
        definition (they are not urgent) and become urgent before they miss.
        """
        limit = batch.time_limit_s
        slo_min = batch.slo_min_s
        running = RequestStatus.RUNNING
        cost = batch.cost
        scheduled = batch.is_scheduled
        late = self._late if self.config.demote_late else ()
        tried = state.tried
        for r in candidates:
            if batch.tokens_used >= batch.token_budget:
                return
            if r.status is not running or scheduled(r.request_id):
                continue
            k = r.num_computed_tokens
            out = r.output_token_ids
            if not out or r.num_prompt_tokens + len(out) - k > 1:
                continue  # still prefilling
            if limit is not None and cost.time_if_added_s(1, k) > limit:
                continue
            tbt = r.slo.tbt_s  # == self.effective_tbt(r), inlined: the loop's hot path
            # Fast path (this loop runs for every running request, every iteration): a decode
            # no tighter than the batch needs no ERA or grouping check, only its block.
            if (slo_min is None or tbt is None or tbt >= slo_min or r.request_id in late) and batch.schedule(r) > 0:
                tried.add(r)
                continue
            self.place(batch, r, state)

    @staticmethod
    def _out_of_time(batch: BatchBuilder, request: Request) -> bool:
        """Whether ``batch.schedule`` would refuse this prefill for time (not one more token of
        it fits the time limit), decided before the ERA, SLO and admission work of ``place``:
        under load most urgent prefills are refused this way, and each refusal cost as much as
        a placement."""
        limit = batch.time_limit_s
        return (limit is not None and request.num_uncomputed_tokens > 1 and batch.tokens_left > 1
                and batch.cost.time_if_added_s(1, request.num_computed_tokens) > limit)

    def _model_time(self, slo_s: float | None) -> float | None:
        """The iteration SLO in the profile's time: less the measured per-iteration overhead,
        divided by how much slower than predicted the device has recently been; on a 0.5 ms
        grid so the budget cache stays small."""
        if slo_s is None or (self.overhead_s <= 0 and self.time_correction == 1.0):
            return slo_s
        return max(0.0005, round((slo_s - self.overhead_s) / self.time_correction * 2000) / 2000)

    def _slo_min(self, requests: list[Request]) -> float | None:
        """The tightest iteration SLO among the requests, best-effort ones left out
        (``effective_tbt`` inlined: every urgent request passes here every iteration)."""
        late = self._late if self.config.demote_late else ()
        tightest = None
        for r in requests:
            t = r.slo.tbt_s
            if t is not None and (tightest is None or t < tightest) and r.request_id not in late:
                tightest = t
        return tightest

    def _grouped(self, requests: list[Request], slo_min: float | None) -> list[list[Request]]:
        """Candidates after the urgent ones: the batch's own SLO group, then looser groups."""
        if not self.config.slo_grouping or slo_min is None:
            return [requests]
        home = slo_group_of(slo_min)
        late = self._late if self.config.demote_late else ()
        best_effort = [r for r in requests if r.request_id in late]
        requests = [r for r in requests if r.request_id not in late] if best_effort else requests
        same = [r for r in requests if r.group == home]
        looser = [r for r in requests if r.group > home] + best_effort
        tighter = sorted((r for r in requests if r.group < home), key=lambda r: -r.group)
        return [same, looser, tighter]

    @staticmethod
    def is_long(request: Request, budget_tokens: int) -> bool:
        """A long prompt (ERA): one whose whole prefill exceeds the budget, counted until the
        prefill ends, not only while the remainder does (paper: long = prompt longer than S_b)."""
        return request.is_prefilling and request.num_tokens > budget_tokens

    def place(self, batch: BatchBuilder, request: Request, state: FillState) -> int:
        """Schedule one request under ERA, admission reserve and preemption rules."""
        state.tried.add(request)
        cfg = self.config
        is_long = self.is_long(request, batch.token_budget)
        starts_long = is_long and request.num_computed_tokens == 0
        if cfg.era and starts_long and state.long_prefills >= cfg.era_cap:
            state.refusal = "era"
            return 0
        if not self._fits_slo(batch, request):
            state.refusal = "slo"
            return 0
        state.refusal = ""
        if request.status is RequestStatus.RUNNING:
            n, _ = self.schedule_running_or_preempt(batch, request, self._victim)
        else:
            n = batch.schedule(request, reserve_blocks=self.admission_reserve_blocks(request, batch))
            if n > 0 and self._reserving and self._reserved_growth is not None:  # now running: it grows too
                self._reserved_growth += self._growth_blocks(request)
        if n > 0 and starts_long:
            state.long_prefills += 1
        return n

    def _fits_slo(self, batch: BatchBuilder, request: Request) -> bool:
        """Let a request tighter than the batch's SLO_min in only if the batch so far meets its
        SLO; then tighten the budget (and time limit) to it."""
        slo_s = self.effective_tbt(request)
        current = batch.slo_min_s
        if slo_s is None or (current is not None and slo_s >= current) or not self.config.dynamic_chunking:
            return True
        tokens = self.budget.for_slo(self._model_time(slo_s))
        limit = self._model_time(slo_s) * (1.0 - self.margin.margin)
        if batch.tokens_used >= tokens or batch.cost.time_s() > limit:
            return False
        batch.set_budget(tokens, slo_s, limit if self.config.time_guard else None)
        return True

    def expected_final_tokens(self, request: Request) -> int:
        """Tokens the request is expected to hold in KV when it finishes: prompt plus the
        headroom, or plus its estimated output length when length estimates are on."""
        if self.lengths is None:
            return headroom_final_tokens(request, self.config.kv_headroom_tokens, self.profile.max_model_len)
        expected = request.num_prompt_tokens + self.expected_output(request)
        return min(expected, self.profile.max_model_len)

    def _running_growth_blocks(self) -> int:
        """Blocks the running requests are still expected to grow by."""
        if self.lengths is not None:
            return growth_blocks(self.bound.kv, self.bound.running, self.expected_final_tokens)
        return headroom_growth_blocks(self.bound.kv, self.bound.running, self.config.kv_headroom_tokens,
                                      self.profile.max_model_len)

    def _growth_blocks(self, request: Request) -> int:
        return growth_blocks(self.bound.kv, (request,), self.expected_final_tokens)

    def admission_reserve_blocks(self, request: Request, batch: BatchBuilder) -> int:
        """Blocks that must stay free beyond the first chunk for a waiting request to be admitted.

        AccelGen admits a prompt only if all of it fits, plus the expected growth of every
        running request and of itself: a half-prefilled prompt holds KV without producing
        tokens, and an admission that later forces a preemption wastes the victim's prefill.
        """
        if self._reserved_growth is None:
            self._reserved_growth = self._running_growth_blocks()
        return admission_reserve_blocks(request, batch.kv, batch.tokens_left, self.expected_final_tokens,
                                        self._reserved_growth)

    # -- preemption --------------------------------------------------------------------------
    def _victim(self, batch: BatchBuilder, needy: Request) -> Request | None:
        running = self.bound.running
        if not running:
            return None
        unscheduled = [r for r in running if r is not needy and not batch.is_scheduled(r.request_id)]
        if self.config.victim == "slo" and unscheduled:
            # Most slack first; among equals the one with least work to recompute.
            return max(unscheduled, key=lambda r: (self._t_r.get(r.request_id, math.inf), -r.num_computed_tokens))
        if self.lengths is not None and unscheduled:
            # The request expected to run longest: never one that is about to finish.
            return max(unscheduled, key=self.remaining_output_tokens)
        return unscheduled[-1] if unscheduled else running[-1]


def slo_group_of(iteration_slo_s: float) -> int:
    from accelgen.core.slo import SLO

    return slo_group(SLO(ttft_s=iteration_slo_s, tbt_s=iteration_slo_s))
