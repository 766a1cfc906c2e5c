"""Where strategy plugins written before lmproxy's modules moved into folders import
``RouteRequest`` from (docs/strategies.md named ``lmproxy.request.RouteRequest``): the
class lives in :mod:`lmproxy.client.request`."""

from lmproxy.client.request import RouteRequest

__all__ = ["RouteRequest"]
