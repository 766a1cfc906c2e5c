"""A simulated OpenAI-compatible backend, shaped like InfiniLM's inference server.

It serves ``/health``, ``/models``, ``/v1/models``, chat and text completions
(plain and streamed), and embeddings, with ``usage`` in its answers. It is fast
(uvloop + httptools) so that it is never the bottleneck of a benchmark, and it
fails on demand so that tests can prove what the router does about failures.

Fault modes, set for one request by the ``X-Mock-Fault`` header or for all
requests at run time by ``POST /mock/fault`` with ``{"fault": MODE}`` (``none``
clears it):

==================  =========================================================
``400``/``429``/``5xx``  answer that status with a JSON error body (5xx: ``500``,
                    ``502``, ``503``, ``504``)
``hang``            accept the request and never answer
``close``           close the connection without answering
``close-mid-stream``  send half the tokens, then close the connection
``stall-mid-stream``  send half the tokens, then go silent (connection open)
``garbage``         answer bytes that are not HTTP
``truncated``       a body shorter than its Content-Length, then close
``wrong-length``    a body longer than its Content-Length
``bad-chunk``       a chunked body with a chunk size that is not hex
``endless-chunk``   a chunk that never ends (the backend stalls inside it)
``cut-mid-chunk``   a streamed answer whose connection closes inside a chunk
``chunked-extra``   a complete chunked answer, then bytes nobody asked for
``early-hints``     a ``103 Early Hints`` head, then the answer, in one write
``close-delimited``  a streamed answer with neither Content-Length nor chunks:
                    its end is the close
``two-responses``   a whole answer, then a second one in the same write
``204-then-response``  a ``204 No Content``, then a second answer in the same write
``chunked-then-response``  a whole chunked answer, then a second one
``connection-named``  an answer whose ``Connection`` header names another of its
                    headers (hop-by-hop: a proxy must drop it)
``unhealthy``       ``/health`` answers 503 (set at run time)
``model-flood``     every ``/v1/models`` lists 5,000 models never listed before
                    (set at run time)
``models-deep``     ``/v1/models`` lists its models beside a field nested 1,000
                    levels deep (set at run time)
``metrics-flood``   ``/metrics`` is 4 MiB of 200,000 lines, 70,000 of them
                    ``vllm:num_requests_running`` series (set at run time)
==================  =========================================================

``X-Mock-Raw: BASE64`` on a request makes the answer exactly those bytes (and
``X-Mock-Raw-Close: 1`` closes the connection after them): how tests try the
router against framings no fault mode names. Both headers, and the fault modes
that answer before any token (all but the mid-stream ones), work on any path and
method, not only on the completion endpoints.

Timing per request can be overridden with ``X-Mock-TTFT`` and
``X-Mock-Token-Delay`` (seconds), and for all requests at run time by
``POST /mock/settings`` with ``{"ttft": S, "token_delay": S}``.
``GET /mock/stats`` reports what the simulator saw, including streams the
client (the router) cut off: that is how tests see a hang-up reach the backend.

Run it as ``python -m lmproxy.mock --port 8100 --model Qwen3-32B`` (or
``python -m lmproxy.sim``). One job to a module: ``engine`` (timing),
``faults``, ``shapes`` (OpenAI answers), ``server`` (HTTP), ``state``
(settings and counters), ``demo`` (``lmproxy --demo``), ``cli``.
"""

from lmproxy.sim.engine import Engine
from lmproxy.sim.faults import FAULTS
from lmproxy.sim.server import MockConnection, start_mock
from lmproxy.sim.state import MockState

__all__ = ["FAULTS", "Engine", "MockConnection", "MockState", "start_mock"]
