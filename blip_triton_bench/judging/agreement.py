"""How much a lossy variant (INT8, a distilled student) changes what the model predicts, against the FP32 teacher.

Measured, not asserted at FP32 tolerance: top-1 agreement and logit cosine per position, checked against a named
threshold from blip_triton_bench.judging.correctness.AGREEMENT_THRESHOLDS; and, for greedy captions, exact match and token agreement.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from blip_triton_bench.judging.correctness import AgreementThreshold


class AgreementBelowThreshold(AssertionError):
    """A variant's predictions agree with the teacher's less than its threshold allows (pytest shows a failure)."""


@dataclass(frozen=True)
class CosineSummary:
    """Cosine similarity of the logit vectors over the vocabulary, one value per position, summarised."""

    mean: float
    minimum: float


@dataclass(frozen=True)
class Agreement:
    """Where a variant's logits agree with the teacher's, and the position where they agree least."""

    top1: float  # fraction of positions whose argmax over the vocabulary is the teacher's
    cosine_mean: float
    cosine_min: float
    positions: int  # batch x sequence positions compared
    worst_position: tuple[int, ...]  # (batch, sequence) index of the lowest cosine
    worst_token: int  # the variant's argmax at worst_position
    worst_reference_token: int  # the teacher's argmax there

    def describe(self) -> str:
        agreeing = round(self.top1 * self.positions)
        return (
            f"top-1 agreement {self.top1:.2%} ({agreeing}/{self.positions} positions), logit cosine mean "
            f"{self.cosine_mean:.5f}, min {self.cosine_min:.5f} at position {list(self.worst_position)} "
            f"(token {self.worst_token} vs teacher's {self.worst_reference_token})"
        )

    def meets(self, threshold: AgreementThreshold) -> bool:
        return self.top1 >= threshold.min_top1 and self.cosine_min >= threshold.min_cosine


def _positions(actual: np.ndarray, reference: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Both arrays as float64 [positions, vocab]; every axis but the last is a position (batch, sequence)."""
    if actual.shape != reference.shape:
        raise AgreementBelowThreshold(f"logits of shape {actual.shape} differ from the reference's {reference.shape}")
    if actual.ndim < 2 or actual.shape[-1] == 0:
        raise ValueError(f"logits need a vocabulary axis last, e.g. [batch, sequence, vocab]; got shape {actual.shape}")
    vocab = actual.shape[-1]
    return actual.reshape(-1, vocab).astype(np.float64), reference.reshape(-1, vocab).astype(np.float64)


def _finite_rows(*arrays: np.ndarray) -> np.ndarray:
    return np.logical_and.reduce([np.all(np.isfinite(array), axis=-1) for array in arrays])


def _top1_matches(actual: np.ndarray, reference: np.ndarray) -> np.ndarray:
    # A position with NaN or inf logits disagrees: argmax would return the first NaN's index, which could coincide.
    return (np.argmax(actual, axis=-1) == np.argmax(reference, axis=-1)) & _finite_rows(actual, reference)


def _cosines(actual: np.ndarray, reference: np.ndarray) -> np.ndarray:
    actual_norms = np.linalg.norm(actual, axis=-1)
    reference_norms = np.linalg.norm(reference, axis=-1)
    products = actual_norms * reference_norms
    dots = np.einsum("pv,pv->p", actual, reference)
    cosines = np.divide(dots, products, out=np.zeros_like(dots), where=products > 0)
    # A zero vector points nowhere: it agrees only with another zero vector. Non-finite logits are the worst case.
    cosines[(actual_norms == 0) & (reference_norms == 0)] = 1.0
    cosines[~_finite_rows(actual, reference)] = -1.0
    return np.clip(cosines, -1.0, 1.0)


def top1_agreement(actual_logits: np.ndarray, reference_logits: np.ndarray) -> float:
    """Fraction of positions whose argmax over the vocabulary (the last axis) is the reference's."""
    actual, reference = _positions(actual_logits, reference_logits)
    return float(np.mean(_top1_matches(actual, reference)))


def cosine_similarity(actual_logits: np.ndarray, reference_logits: np.ndarray) -> CosineSummary:
    """Cosine of each position's logit vector with the reference's, over the vocabulary: mean and minimum."""
    actual, reference = _positions(actual_logits, reference_logits)
    cosines = _cosines(actual, reference)
    return CosineSummary(mean=float(np.mean(cosines)), minimum=float(np.min(cosines)))


def measure_agreement(actual_logits: np.ndarray, reference_logits: np.ndarray) -> Agreement:
    actual, reference = _positions(actual_logits, reference_logits)
    cosines = _cosines(actual, reference)
    worst = int(np.argmin(cosines))
    return Agreement(
        top1=float(np.mean(_top1_matches(actual, reference))),
        cosine_mean=float(np.mean(cosines)),
        cosine_min=float(cosines[worst]),
        positions=int(cosines.size),
        worst_position=tuple(int(i) for i in np.unravel_index(worst, actual_logits.shape[:-1])),
        worst_token=int(np.argmax(actual[worst])),
        worst_reference_token=int(np.argmax(reference[worst])),
    )


def check_agreement(
    name: str, actual: np.ndarray, reference: np.ndarray, threshold: AgreementThreshold | None
) -> Agreement:
    """Measure, and raise AgreementBelowThreshold naming the threshold, both measures and the worst position when
    top-1 agreement or the lowest per-position cosine falls below it. With no threshold, only measure."""
    agreement = measure_agreement(actual, reference)
    if threshold is not None and not agreement.meets(threshold):
        raise AgreementBelowThreshold(
            f"{name}: {agreement.describe()}; below threshold '{threshold.name}' (top-1 >= {threshold.min_top1:g}, "
            f"cosine >= {threshold.min_cosine:g} at every position). {threshold.why}"
        )
    return agreement


def _check_pairs(captions_a: Sequence[Sequence[int]], captions_b: Sequence[Sequence[int]]) -> None:
    if len(captions_a) != len(captions_b):
        raise ValueError(f"{len(captions_a)} captions cannot be compared with {len(captions_b)}")
    if not captions_a:
        raise ValueError("no captions to compare")


def caption_exact_match(captions_a: Sequence[Sequence[int]], captions_b: Sequence[Sequence[int]]) -> float:
    """Fraction of caption pairs (same image, same order) whose token ids are identical, length included."""
    _check_pairs(captions_a, captions_b)
    return sum(list(a) == list(b) for a, b in zip(captions_a, captions_b, strict=True)) / len(captions_a)


def token_agreement(captions_a: Sequence[Sequence[int]], captions_b: Sequence[Sequence[int]]) -> float:
    """Fraction of caption token positions that hold the same id, pooled over all pairs.

    Each pair contributes the number of equal ids position by position over their common length (the shorter
    caption's), out of the longer caption's length: a caption that stops early or runs on loses those positions.
    Pooling (total matches / total of the longer lengths) weighs every token alike; two empty captions agree
    fully. Greedy captions that diverge once usually stay diverged, so this is a softer measure than exact match,
    not a per-token accuracy.
    """
    _check_pairs(captions_a, captions_b)
    matches = 0
    positions = 0
    for a, b in zip(captions_a, captions_b, strict=True):
        matches += sum(x == y for x, y in zip(a, b, strict=False))
        positions += max(len(a), len(b))
    return matches / positions if positions else 1.0
