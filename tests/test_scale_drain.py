"""`llorch serve --replicas 2 --engine-process`: a second SIGTERM cuts the drain short (slow).

With `--drain-timeout 600`, a stream that would outlive the drain ends, once the second signal
comes, with the wire format's error event (`shutting_down`) and `[DONE]`, as a single process
does, and the server exits 0: the engine processes' drain ended it, not the replica's death
under Ray's force-kill (`replica_died` from the ingress, or a cut connection). The first
signal's own drain, past --drain-timeout, is checked where a deployment is shut down anyway:
in process by tests/test_scale_ray.py's SIGTERM test, with engine processes behind HAProxy by
tests/test_scale_engine_process.py's. The deployment is the session's `plain_routing`
(tests/conftest.py), which measured Ray's own router for tests/test_scale_ray.py first.
Skipped without Ray.
"""

from __future__ import annotations

import pytest

pytest.importorskip("ray", reason="Ray Serve is the optional .[ray] extra: pip install 'llorch[ray]'")

from _scale_cluster import check_ended_by_the_drain  # noqa: E402 - after the skip

pytestmark = pytest.mark.slow

DRAIN_S = 2.0  # how soon after the second signal the stream must end: check_ended_by_the_drain's base


def test_a_second_signal_ends_a_stream_with_an_error_event(plain_routing):
    """On the session's `plain_routing` deployment (--engine-process --drain-timeout 600), whose
    shutdown this is: two SIGTERMs 0.5 s apart with a 4000-token stream running."""
    check_ended_by_the_drain(*plain_routing.drain, DRAIN_S)
