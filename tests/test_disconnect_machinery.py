"""The disconnect stress's machinery without a server: where clients leave, what the finding says, how a server's
end is named, and what the captioner's metrics are read as."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from blip_triton_bench.captioning.disconnects import (
    AT_LAST_TOKEN,
    BEFORE_FIRST_TOKEN,
    CANCEL_REQUEST,
    DISCONNECT,
    MID_CAPTION,
    AbandonOutcome,
    AbandonPlan,
    DisconnectStressError,
    captioner_slots,
    captions_cancelled,
    step_name,
)
from blip_triton_bench.servers.base import describe_exit
from blip_triton_bench.servers.local import fatal_signal_in_log
from blip_triton_bench.servers.supervised import ServerDeath

pytestmark = pytest.mark.unit

#: Triton 2.51's metrics endpoint as it serves the captioner's own families (format checked on a live server).
METRICS = """\
# HELP blip_caption_cancelled Captions stopped before their end, by reason
# TYPE blip_caption_cancelled counter
blip_caption_cancelled{model="blip_caption",reason="cancel_request"} 1582
blip_caption_cancelled{model="blip_caption",reason="disconnect"} 3
blip_caption_cancelled{model="other_captioner",reason="disconnect"} 99
# HELP blip_caption_active Captions decoding in the shared decoder step
# TYPE blip_caption_active gauge
blip_caption_active{model="blip_caption"} 2
# HELP blip_caption_waiting Captions accepted and waiting for a decoder slot
# TYPE blip_caption_waiting gauge
blip_caption_waiting{model="blip_caption"} 1
# HELP nv_inference_count Number of inferences performed
# TYPE nv_inference_count counter
nv_inference_count{model="blip_caption",version="1"} 10
"""


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"abandoned_captions": 0}, "at least 1 caption"),
        ({"abandoned_captions": 10, "leaving_clients": 0}, "at least 1 caption and 1 leaving client"),
        ({"abandoned_captions": 10, "tokens": 1}, "no mid-caption step"),
        ({"abandoned_captions": 10, "how": "vanish"}, "use one of disconnect, cancel_request"),
    ],
)
def test_a_plan_that_cannot_run_is_refused_naming_what_to_change(settings: dict, message: str) -> None:
    with pytest.raises(DisconnectStressError, match=message):
        AbandonPlan(**settings)


def test_clients_leave_before_the_first_token_mid_caption_and_at_the_last_token_in_set_shares() -> None:
    plan = AbandonPlan(abandoned_captions=1, tokens=8)
    rng = random.Random(0)
    steps = Counter(step_name(plan.leaving_step(rng), plan.tokens) for _ in range(4000))
    assert set(steps) == {BEFORE_FIRST_TOKEN, MID_CAPTION, AT_LAST_TOKEN}
    assert 900 < steps[BEFORE_FIRST_TOKEN] < 1100
    assert 1900 < steps[MID_CAPTION] < 2100
    assert 900 < steps[AT_LAST_TOKEN] < 1100
    assert all(0 <= plan.leaving_step(rng) <= plan.tokens for _ in range(1000))


def outcome(death: str | None, how: str = DISCONNECT) -> AbandonOutcome:
    return AbandonOutcome(
        plan=AbandonPlan(abandoned_captions=200, how=how),
        abandoned=118,
        abandoned_by_step={BEFORE_FIRST_TOKEN: 29, MID_CAPTION: 46, AT_LAST_TOKEN: 43},
        staying_captions=12,
        staying_mismatches=(),
        client_errors=(),
        server_death=death,
        elapsed_s=27.4,
    )


def test_a_crash_is_the_finding_with_the_count_the_steps_and_the_servers_own_account() -> None:
    crashed = outcome("tritonserver killed by signal 11 (SIGSEGV)")
    assert not crashed.survived
    assert crashed.finding() == (
        "the server under test crashed after 118 abandoned streams (disconnected; 43 at its last token, 29 before its "
        "first token, 46 mid-caption): tritonserver killed by signal 11 (SIGSEGV)"
    )
    assert crashed.to_dict()["survived"] is False


def test_a_server_that_lived_is_said_to_have_survived_with_what_it_served_beside() -> None:
    lived = outcome(None, how=CANCEL_REQUEST)
    assert lived.survived
    assert lived.finding().startswith("the server survived 118 abandoned captions (cancelled on the stream by 6 ")
    assert "1 client(s) finished 12 captions, 0 of them wrong" in lived.finding()


@pytest.mark.parametrize(
    ("returncode", "words"),
    [
        (-11, "killed by signal 11 (SIGSEGV)"),
        (-9, "killed by signal 9 (SIGKILL)"),
        (-6, "killed by signal 6 (SIGABRT)"),
        (1, "exited with code 1"),
        (0, "exited with code 0"),
    ],
)
def test_an_exit_is_named_by_its_signal_or_code(returncode: int, words: str) -> None:
    assert describe_exit(returncode) == words


def test_a_fatal_signal_in_the_log_is_found_and_named_and_other_lines_are_not() -> None:
    log = 'I1204 model.py:457] "caption cancelled"\ndouble free or corruption (out)\nSignal (6) received.\n 0# 0x55'
    assert fatal_signal_in_log(log) == "signal 6 (SIGABRT)"
    assert fatal_signal_in_log('I1204 "the model says: Signal (11) received" inside a line') is None
    assert fatal_signal_in_log("") is None


def test_the_captioners_slots_and_cancellations_are_read_for_its_own_model_only() -> None:
    assert captioner_slots(METRICS, "blip_caption") == (2, 1)
    assert captions_cancelled(METRICS, "blip_caption") == {"cancel_request": 1582, "disconnect": 3}
    assert captions_cancelled(METRICS, "other_captioner") == {"disconnect": 99}
    assert captioner_slots(METRICS, "other_captioner") is None  # it exports no gauges: not the suite's captioner


def test_a_death_says_how_during_what_and_whether_the_run_goes_on() -> None:
    replaced = ServerDeath("tritonserver killed by signal 11 (SIGSEGV)", "suite/test_perf.py::x", "last\nlines", True)
    assert replaced.message().startswith(
        "tritonserver died during suite/test_perf.py::x: tritonserver killed by signal 11 (SIGSEGV). A fresh server "
        "took its place for the tests after this one.\nIts log ends with:\nlast\nlines"
    )
    gone = ServerDeath("tritonserver at h:1 does not answer", "suite/test_perf.py::x", "", False)
    assert "It was not replaced: the tests after this one are skipped." in gone.message()
