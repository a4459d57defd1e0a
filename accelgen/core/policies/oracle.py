"""Oracle: AccelGen with perfect knowledge of every request's output length.

It is exactly ``accelgen`` with output-length estimates on, except that the estimate is the
truth: the KV reserve holds each request's real final footprint (so it never admits what it
would later have to preempt), ``T_e`` of JCT requests is exact, and the preemption victim is
the running request with the most output truly left. Ordering, budgets and every other
mechanism are AccelGen's, so the gap between ``accelgen + estimates`` and the oracle is what
better length prediction (the paper's first open question) could still add, and nothing else.

It is not a proven optimum of the (NP-hard) offline problem. Only the simulator can run it: the
service never knows output lengths.
"""

from __future__ import annotations

import dataclasses
from typing import Mapping

from accelgen.core.policies.accelgen import AccelGenConfig, AccelGenPolicy
from accelgen.core.profile import DeviceProfile
from accelgen.core.request import Request
from accelgen.core.slo import SLOCatalog


class OraclePolicy(AccelGenPolicy):
    name = "oracle"

    def __init__(
        self,
        profile: DeviceProfile,
        catalog: SLOCatalog,
        output_lengths: Mapping[str, int],
        config: AccelGenConfig | None = None,
    ) -> None:
        super().__init__(profile, catalog, dataclasses.replace(config or AccelGenConfig(), length_estimates=True))
        self.output_lengths = output_lengths

    def expected_output(self, request: Request) -> int:
        known = self.output_lengths.get(request.request_id)
        out = request.sampling.max_tokens if known is None else min(known, request.sampling.max_tokens)
        return max(out, request.num_output_tokens + 1)
