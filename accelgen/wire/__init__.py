"""One converter per type between the core's objects and their wire forms (protobuf, JSON).

Every service converts through here and nowhere else: ``sampling`` (``SamplingParams``),
``slo`` (``SLO``), ``worker_info`` (``WorkerInfo``). Range rules live in the core types and in
these converters once; each front end only chooses the names its clients wrote.
"""
