"""``normbench claims``: common claims about normalization, each tested by a small experiment with a verdict
computed from the data.

* `catalog`: the claims as data (sentence, source, preset, comparisons, published anchor);
* `judge`: a claim's verdict from its runs (Holm-corrected comparisons; nothing decided in advance);
* `suite`: plan, train (the ordinary sweep machinery: resume, ``--jobs``, launchers) and judge;
* `writing`: ``claims.md``, ``claims.csv``, ``claims_checks.csv`` and a figure per claim.
"""

from normbench.claims.catalog import BY_ID, CLAIMS, Check, Claim, select

__all__ = ["BY_ID", "CLAIMS", "Check", "Claim", "select"]
