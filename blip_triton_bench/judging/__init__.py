"""Judging: statistics over windows, verdicts against baselines, the baseline store, correctness and
agreement tolerances, SLOs, serving efficiency, and what a run proved."""
