"""chatwatch: watch a live AI conversation over Server-Sent Events."""

# Layers. A module imports only from layers below it:
#
#   cli, publish                           argparse; the one-shot `chatwatch publish`
#   workers                                one process or N (SO_REUSEPORT), trio.run
#   service, demo, embedded, termwatch     composition root, child processes, clients
#   http, watch, metrics, listen           Quart-Trio routes; the per-watcher response
#                                          body; Prometheus; the listening socket
#   bus, store                             the NATS connection; sessions and ownership
#   subscriptions                          SUB batches, one PING each; UNSUBs at once
#   natsborder                             every use of nats-py's private API
#   hub                                    fan-out: one subscription per conversation
#   sse, events, ids, auth, openapi        pure: framing, parsing, validation, docs
#   errors, config                         leaves
#
# `bus`, `subscriptions`, `natsborder` and `publish` are the only modules that import
# nats or trio_asyncio; `http` and `watch` are the only importers of quart; `service`
# is the only importer of hypercorn.

__version__ = "0.1.0"
