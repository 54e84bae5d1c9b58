"""Does the server under test survive clients that leave mid-caption? (--disconnect-stress N)

A client that disconnects mid-stream is the most common event a caption server sees. N captions per captioner are
abandoned by 6 clients that cancel their gRPC call at random steps (before the first token, mid-caption, at the
last token) while 1 client captions beside them, on a server no other test shares (local, container) or on the
external server under test. A crash is the finding: "the server under test crashed after N abandoned streams",
with the server's own account (Triton 2.51 does, docs/disconnects.md).
"""

from __future__ import annotations

import pytest

from blip_triton_bench.captioning.disconnects import DISCONNECT, AbandonPlan, abandon_captions
from blip_triton_bench.model.source import LoadedModel, generate_caption
from blip_triton_bench.model.workload import image_pixels
from blip_triton_bench.servers.served import ServedVariant

pytestmark = pytest.mark.disconnects

#: The staying client's caption length: long enough that abandoned captions come and go while it decodes.
STAYING_TOKENS = 12


def test_the_server_survives_clients_that_leave_mid_caption(
    captioner_on_its_own_server: ServedVariant, loaded_model: LoadedModel, bench_options, bench_session
) -> None:
    served = captioner_on_its_own_server
    description = loaded_model.description
    pixel_values = image_pixels(description, ["astronaut"])
    plan = AbandonPlan(
        abandoned_captions=bench_options.disconnect_stress,
        how=DISCONNECT,
        timeout_s=bench_options.request_timeout_s,
        headers=served.server.request_headers("grpc"),
    )
    outcome = abandon_captions(
        served.server.endpoints.grpc_url,
        served.name,
        pixel_values,
        generate_caption(loaded_model, pixel_values, STAYING_TOKENS),
        description.special_tokens.bos_token_id,
        plan,
        served.server.liveness,
    )
    bench_session.record_disconnect_stress(served.name, outcome)

    assert outcome.survived, f"{outcome.finding()}\nIts log ends with:\n{served.server.log_tail(30)}"
    assert not outcome.staying_mismatches, (
        f"{len(outcome.staying_mismatches)} of {outcome.staying_captions} captions decoded beside the abandoned ones "
        f"differ from generate(): {outcome.staying_mismatches[:3]}"
    )
    assert not outcome.client_errors, f"requests failed on a live server: {outcome.client_errors[:5]}"
