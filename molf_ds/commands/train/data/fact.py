"""`fact`: CounterFact (Meng et al.): train on the rewrite prompt -> target_new; efficacy, paraphrase and
neighborhood scores compare P(target_new) with P(target_true) (mean log-likelihood per token)."""
from __future__ import annotations

from .base import Choice, Example, Row, Task



def _rewrite(row: Row) -> tuple[str, str, str]:
    """(prompt with the subject filled in, target_new, target_true)."""
    rewrite = row.mapping("requested_rewrite")
    template = rewrite.text("prompt")
    if "{}" not in template:
        raise rewrite.fail("prompt", f"has no '{{}}' for the subject: {template!r}")
    new = rewrite.mapping("target_new").text("str")
    true = rewrite.mapping("target_true").text("str")
    return template.replace("{}", rewrite.text("subject")), new, true


def example(row: Row) -> Example:
    prompt, new, _ = _rewrite(row)
    return Example(prompt, f" {new.strip()}")


def evals(row: Row) -> list[Choice]:
    prompt, new, true = _rewrite(row)
    options = (f" {new.strip()}", f" {true.strip()}")
    items = [Choice("efficacy", prompt, options, 0)]
    items += [Choice("paraphrase", p, options, 0) for p in row.texts("paraphrase_prompts")]
    items += [Choice("neighborhood", p, options, 1) for p in row.texts("neighborhood_prompts")]
    return items


TASK = Task("fact", ("efficacy", "paraphrase", "neighborhood"), example, evals)
