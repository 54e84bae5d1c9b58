"""Agreement measures on synthetic logits and captions: exact values where they are known, and the failure message."""

from __future__ import annotations

import numpy as np
import pytest

from blip_triton_bench.judging.agreement import (
    AgreementBelowThreshold,
    caption_exact_match,
    check_agreement,
    cosine_similarity,
    measure_agreement,
    token_agreement,
    top1_agreement,
)
from blip_triton_bench.judging.correctness import AGREEMENT_THRESHOLDS, AgreementThreshold, threshold_for_artifact

pytestmark = pytest.mark.unit

STRICT = AgreementThreshold(name="strict_test", min_top1=0.9, min_cosine=0.99, why="a test threshold")


@pytest.fixture
def logits() -> np.ndarray:
    """[batch 2, sequence 5, vocab 50], one clear winner per position."""
    rng = np.random.default_rng(0)
    values = rng.normal(size=(2, 5, 50)).astype(np.float32)
    winners = rng.integers(0, 50, size=(2, 5))
    np.put_along_axis(values, winners[..., None], 10.0, axis=-1)
    return values


def test_identical_logits_agree_fully(logits: np.ndarray) -> None:
    assert top1_agreement(logits, logits) == 1.0
    cosine = cosine_similarity(logits, logits)
    assert cosine.mean == pytest.approx(1.0)
    assert cosine.minimum == pytest.approx(1.0)


def test_moving_the_argmax_at_known_positions_gives_the_known_fraction(logits: np.ndarray) -> None:
    changed = logits.copy()
    for batch, position in [(0, 1), (1, 3), (1, 4)]:
        row = changed[batch, position]
        row[(int(np.argmax(row)) + 1) % row.size] = 20.0  # a new winner, the old one still high

    assert top1_agreement(changed, logits) == pytest.approx(7 / 10)
    agreement = measure_agreement(changed, logits)
    assert agreement.positions == 10
    assert agreement.worst_position in [(0, 1), (1, 3), (1, 4)]
    assert agreement.worst_token != agreement.worst_reference_token
    assert agreement.cosine_min < agreement.cosine_mean < 1.0


def test_cosine_ignores_scale_but_not_direction(logits: np.ndarray) -> None:
    assert cosine_similarity(3.0 * logits, logits).minimum == pytest.approx(1.0)
    assert cosine_similarity(-logits, logits).mean == pytest.approx(-1.0)
    # Orthogonal rows: cosine 0 at every position.
    a = np.zeros((1, 2, 4), np.float32)
    b = np.zeros((1, 2, 4), np.float32)
    a[0, :, 0] = 1.0
    b[0, :, 1] = 1.0
    assert cosine_similarity(a, b) == pytest.approx(cosine_similarity(b, a))
    assert cosine_similarity(a, b).mean == 0.0


def test_non_finite_logits_are_the_worst_case(logits: np.ndarray) -> None:
    broken = logits.copy()
    broken[1, 2, :] = np.nan
    agreement = measure_agreement(broken, logits)
    assert agreement.top1 == pytest.approx(9 / 10)
    assert agreement.cosine_min == -1.0
    assert agreement.worst_position == (1, 2)


def test_check_agreement_passes_and_returns_the_measures(logits: np.ndarray) -> None:
    agreement = check_agreement("identical", logits, logits, STRICT)
    assert (agreement.top1, agreement.positions) == (1.0, 10)


def test_check_agreement_names_the_threshold_the_values_and_the_worst_position(logits: np.ndarray) -> None:
    changed = logits.copy()
    changed[1, 3, :] = -changed[1, 3, :]  # one position pointing the other way
    with pytest.raises(AgreementBelowThreshold) as raised:
        check_agreement("int8 logits vs FP32 teacher", changed, logits, STRICT)
    message = str(raised.value)
    assert isinstance(raised.value, AssertionError)  # pytest reports a failure, not an error
    assert message.startswith("int8 logits vs FP32 teacher: top-1 agreement 90.00% (9/10 positions)")
    assert "below threshold 'strict_test' (top-1 >= 0.9, cosine >= 0.99 at every position)" in message
    assert "min -1.00000 at position [1, 3]" in message
    assert "a test threshold" in message


def test_without_a_threshold_agreement_is_only_measured(logits: np.ndarray) -> None:
    agreement = check_agreement("student", -logits, logits, None)
    assert agreement.top1 == 0.0


def test_shape_mismatch_is_a_failure(logits: np.ndarray) -> None:
    with pytest.raises(AgreementBelowThreshold, match=r"shape \(2, 4, 50\) differ"):
        check_agreement("cut", logits[:, :4], logits, STRICT)


def test_caption_exact_match_counts_whole_captions() -> None:
    teacher = [(5, 6, 7), (8, 9), (1,)]
    assert caption_exact_match(teacher, teacher) == 1.0
    assert caption_exact_match([(5, 6, 7), (8, 9, 10), (2,)], teacher) == pytest.approx(1 / 3)
    with pytest.raises(ValueError, match="3 captions cannot be compared with 2"):
        caption_exact_match(teacher, teacher[:2])


def test_token_agreement_counts_positions_over_the_longer_caption() -> None:
    # Pair 1: 2 of 3 positions equal; pair 2: common prefix (8, 9) equal, but the longer caption has 4 tokens.
    assert token_agreement([(5, 0, 7), (8, 9)], [(5, 6, 7), (8, 9, 10, 11)]) == pytest.approx((2 + 2) / (3 + 4))
    assert token_agreement([(), (1, 2)], [(), (1, 2)]) == 1.0
    assert token_agreement([()], [()]) == 1.0
    assert token_agreement([(1, 2)], [(2, 1)]) == 0.0


def test_int8_artifacts_are_held_to_the_int8_threshold() -> None:
    assert threshold_for_artifact("int8") == "int8_vs_fp32"
    assert threshold_for_artifact("student") is None
    threshold = AGREEMENT_THRESHOLDS["int8_vs_fp32"]
    assert 0 < threshold.min_top1 <= 1 and 0 < threshold.min_cosine <= 1
    assert "measured" in threshold.why
