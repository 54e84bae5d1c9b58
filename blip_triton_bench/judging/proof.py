"""What a run proved: per variant, what was judged and how, and everything that was not, with its reason.

A green run is worth what it checked. Each test of the suite leaves findings here: a level judged against its
baseline or its 'before' side (within tolerance, improved, inconclusive, regression), a gate passed or failed, or something
not judged (skipped, no baseline, too few requests for a p99, an unstable level, a gate with nothing to hold the
result to). A gate that could not have failed is never counted as a pass. No pytest in here: the plugin turns test
reports into findings, the session prints and writes them.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from enum import StrEnum


class Outcome(StrEnum):
    PASSED = "passed"  # a gate that could have failed held
    FAILED = "failed"  # a gate or a level failed (a regression included)
    # A level judged within the tolerance of its baseline or its 'before' (the verdict "pass"): named apart from a
    # gate that passed, so a summary never reads "14 passed, 1 pass".
    WITHIN_TOLERANCE = "within tolerance"
    IMPROVED = "improved"
    INCONCLUSIVE = "inconclusive"
    REGRESSION = "regression"  # judged worse, and recorded over all the same (--update-baselines)
    NOT_JUDGED = "not judged"
    MEASURED = "measured"  # a reference for the report or for other checks (in-process speed): judges nothing


def verdict_outcome(status: str) -> Outcome:
    """A level's verdict status (pass, improved, inconclusive, regression) as the finding it is."""
    return Outcome.WITHIN_TOLERANCE if status == "pass" else Outcome(status)


#: Outcomes that are a judgement.
JUDGED = frozenset(Outcome) - {Outcome.NOT_JUDGED, Outcome.MEASURED}
#: A variant-less test's key (export vs PyTorch, the in-process reference).
NO_VARIANT = ""


@dataclass(frozen=True)
class Finding:
    """One thing a test judged, or did not. `check` names it: the test, and the part of it (`c4 p99`) where a
    test judges several."""

    variant: str
    check: str
    outcome: Outcome
    reason: str = ""  # why it was not judged, why it failed, or what it was judged against

    def line(self) -> str:
        return f"{self.check}: {self.outcome}" + (f" ({self.reason})" if self.reason else "")


@dataclass
class RunProof:
    """The findings of a session, in the order its tests ran."""

    findings: list[Finding] = field(default_factory=list)

    def add(self, finding: Finding) -> None:
        self.findings.append(finding)

    def not_judged(self) -> list[Finding]:
        return [finding for finding in self.findings if finding.outcome is Outcome.NOT_JUDGED]

    def by_variant(self) -> dict[str, list[Finding]]:
        grouped: dict[str, list[Finding]] = {}
        for finding in self.findings:
            grouped.setdefault(finding.variant, []).append(finding)
        return grouped

    def headline(self) -> str:
        counts = Counter(finding.outcome for finding in self.findings)
        judged = sum(count for outcome, count in counts.items() if outcome in JUDGED)
        checks = len(self.findings) - counts[Outcome.MEASURED]
        parts = ", ".join(f"{counts[outcome]} {outcome}" for outcome in Outcome if counts[outcome])
        return f"what this run proved: {judged} of {checks} checks judged ({parts})"

    def lines(self) -> list[str]:
        """Per variant: its judgements counted, then each failure and each thing not judged with its reason."""
        if not self.findings:
            return []
        lines = [self.headline()]
        for variant, findings in self.by_variant().items():
            counts = Counter(finding.outcome for finding in findings)
            tally = ", ".join(f"{counts[outcome]} {outcome}" for outcome in Outcome if counts[outcome])
            lines.append(f"  {variant or '(no variant)'}: {tally}")
            lines.extend(f"    {line}" for line in _told(findings))
        return lines

    def markdown(self) -> str:
        rows = ["| variant | check | outcome | why |", "| --- | --- | --- | --- |"]
        rows += [
            f"| {f.variant or '-'} | {f.check} | {f.outcome} | {f.reason.replace('|', '/')} |" for f in self.findings
        ]
        return "\n\n".join([self.headline(), "\n".join(rows)])

    def to_dicts(self) -> list[dict[str, str]]:
        return [
            {"variant": f.variant, "check": f.check, "outcome": str(f.outcome), "reason": f.reason}
            for f in self.findings
        ]

    def unproven(self) -> list[str]:
        """What --require-judged fails the run for: each check not judged, named with its reason."""
        return [f"{finding.variant or '(no variant)'} {finding.line()}" for finding in self.not_judged()]


@dataclass
class Judgement:
    """What one test says it judged, where a pass alone would say too little: a level's verdict per metric, a p99
    over too few requests, a gate with no threshold to hold its result to. A test that says nothing and passes is
    one gate passed."""

    parts: list[tuple[str, Outcome, str]] = field(default_factory=list)

    def judged(self, part: str, outcome: Outcome, reason: str = "") -> None:
        self.parts.append((part, outcome, reason))

    def not_judged(self, part: str, reason: str) -> None:
        self.parts.append((part, Outcome.NOT_JUDGED, reason))

    def measured(self, part: str, what: str) -> None:
        """A reference measured for other checks or the report: it judges nothing, and is not counted as a check."""
        self.parts.append((part, Outcome.MEASURED, what))

    def findings(self, variant: str, check: str) -> list[Finding]:
        if not self.parts:
            return [Finding(variant, check, Outcome.PASSED)]
        return [Finding(variant, _part_of(check, part), outcome, reason) for part, outcome, reason in self.parts]


def _part_of(check: str, part: str) -> str:
    """`throughput_and_latency[concurrency=4]` and part `concurrency=4 latency_p99_ms` ->
    `throughput_and_latency[concurrency=4] latency_p99_ms`: what the test's name says already is said once."""
    words = [word for word in part.split() if word not in check]
    return " ".join([check, *words])


#: What the summary spells out, one finding at a time or grouped by reason; the rest it only counts.
TOLD = (Outcome.FAILED, Outcome.REGRESSION, Outcome.INCONCLUSIVE, Outcome.NOT_JUDGED)


def _told(findings: list[Finding]) -> list[str]:
    """Each failure, regression, inconclusive and unjudged check of one variant; checks that share a reason (a
    skipped variant's every test) on one line."""
    by_reason: dict[tuple[Outcome, str], list[str]] = {}
    for finding in findings:
        if finding.outcome in TOLD:
            # a failure's message is pytest's to print, once (report.md and results.json keep it beside the check)
            reason = "" if finding.outcome is Outcome.FAILED else finding.reason
            by_reason.setdefault((finding.outcome, reason), []).append(finding.check)
    lines = []
    for (outcome, reason), checks in by_reason.items():
        because = f" ({reason})" if reason else ""
        if len(checks) == 1:
            lines.append(f"{checks[0]}: {outcome}{because}")
        else:
            lines.append(f"{len(checks)} checks {outcome}{because}: {', '.join(checks)}")
    return lines
