"""Checks on routing records (the routing-log format): that a run's routing is not degenerate, so that a wrong
top-k or a router stuck on one expert cannot pass a comparison."""
from __future__ import annotations


def assert_routing_varies(records: list[dict], what: str = "", switching: bool = True) -> None:
    """At least two distinct winner sets over the run's modules and steps, and (unless `switching` is False) some
    module switching winners after step 1 (step 1 of a warm-up from lr 0 is a tie everywhere). PFN routing does not
    switch, by the algorithm: a LoRA expert that loses keeps lora_B = 0, so its lora_A gets no gradient and those
    zero moments dilute its PFN score; the first split sticks."""
    sets = [{name: tuple(sorted(m["winners"])) for name, m in rec["modules"].items()} for rec in records]
    distinct = {winners for step in sets for winners in step.values()}
    assert len(distinct) >= 2, f"{what}: one winner set everywhere {distinct}: the routing tests nothing"
    if not switching:
        return
    switched = [name for name in sets[0] if len({step[name] for step in sets[1:]}) > 1]
    assert switched, f"{what}: no module ever changes its winners after step 1"
