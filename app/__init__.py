"""chatwatch: watch a live AI conversation over Server-Sent Events."""

# Layers. A module imports only from layers below it:
#
#   cli                                    argparse
#   workers                                one process or N (SO_REUSEPORT), trio.run
#   service, demo, embedded, termwatch     composition root, child processes, clients
#   http, watch, metrics, listen           Quart-Trio routes; the per-watcher response
#                                          body; Prometheus; the listening socket
#   bus, store                             the NATS border (only importer of nats and
#                                          trio_asyncio); sessions and ownership
#   hub                                    fan-out: one subscription per conversation
#   sse, events, ids, auth, openapi        pure: framing, parsing, validation, docs
#   errors, config                         leaves
#
# `bus` is the only module that imports nats or trio_asyncio; `http` and `watch` are the
# only importers of quart; `service` is the only importer of hypercorn.

__version__ = "0.1.0"
