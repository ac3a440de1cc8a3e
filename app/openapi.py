"""The OpenAPI 3.1 document served at /openapi.json, written by hand.

Hand-written because the watch route's response is text/event-stream, which schema
generators cannot declare; a test checks the routes here match the app's.
"""

import json
from typing import Any

_ERROR = {
    "type": "object",
    "required": ["error"],
    "properties": {"error": {"type": "string"}},
}


def _json_response(description: str, headers: dict[str, Any] | None = None) -> dict[str, Any]:
    response: dict[str, Any] = {
        "description": description,
        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}},
    }
    if headers:
        response["headers"] = headers
    return response


_RETRY_AFTER = {"Retry-After": {"schema": {"type": "string"}}}

SPEC: dict[str, Any] = {
    "openapi": "3.1.0",
    "info": {
        "title": "chatwatch",
        "version": "0.1.0",
        "description": "Watch a live AI conversation over Server-Sent Events.",
    },
    "components": {
        "schemas": {"Error": _ERROR},
        "securitySchemes": {
            "bearer": {"type": "http", "scheme": "bearer"},
            "cookie": {"type": "apiKey", "in": "cookie", "name": "chatwatch_session"},
        },
    },
    "paths": {
        "/api/ai/conversations/{conversation_id}/watch": {
            "get": {
                "summary": "Stream one conversation as Server-Sent Events",
                "security": [{"bearer": []}, {"cookie": []}],
                "parameters": [
                    {
                        "name": "conversation_id",
                        "in": "path",
                        "required": True,
                        "schema": {"type": "string"},
                        "description": "Hyphenated UUID; anything else is 404.",
                    },
                    {
                        "name": "Last-Event-ID",
                        "in": "header",
                        "required": False,
                        "schema": {"type": "string"},
                        "description": "Resume after this event id (history on); an id "
                        "that cannot be resumed gets an error event and a late join.",
                    },
                    {
                        "name": "last_event_id",
                        "in": "query",
                        "required": False,
                        "schema": {"type": "string"},
                        "description": "As the Last-Event-ID header, for clients that "
                        "cannot set headers; the header wins.",
                    },
                    {
                        "name": "live_only",
                        "in": "query",
                        "required": False,
                        "schema": {"type": "string", "enum": ["1", "true", "yes", "0", "false"]},
                        "description": "Live events only: no late-join replay.",
                    },
                ],
                "responses": {
                    "200": {
                        "description": "The stream: `:ok`, then one `data:` line per event "
                        "(after one `id:` line when history is on).",
                        "content": {"text/event-stream": {"schema": {"type": "string"}}},
                    },
                    "401": _json_response("No, unknown, expired or revoked session."),
                    "404": _json_response("Not a UUID, no such conversation, or not yours."),
                    "429": _json_response("Too many open streams.", _RETRY_AFTER),
                    "503": _json_response("Session store unreachable.", _RETRY_AFTER),
                },
            }
        },
        "/healthz": {
            "get": {
                "summary": "The process is alive",
                "responses": {
                    "200": {
                        "description": "alive",
                        "content": {"application/json": {"schema": {"type": "object"}}},
                    }
                },
            }
        },
        "/readyz": {
            "get": {
                "summary": "NATS and the store answer",
                "responses": {
                    "200": {
                        "description": "ready",
                        "content": {"application/json": {"schema": {"type": "object"}}},
                    },
                    "503": {
                        "description": "not ready",
                        "content": {"application/json": {"schema": {"type": "object"}}},
                    },
                },
            }
        },
        "/metrics": {
            "get": {
                "summary": "Prometheus metrics",
                "responses": {
                    "200": {
                        "description": "metrics",
                        "content": {"text/plain": {"schema": {"type": "string"}}},
                    }
                },
            }
        },
        "/openapi.json": {
            "get": {
                "summary": "This document",
                "responses": {
                    "200": {
                        "description": "OpenAPI 3.1",
                        "content": {"application/json": {"schema": {"type": "object"}}},
                    }
                },
            }
        },
    },
}

DOCUMENT = json.dumps(SPEC, indent=1).encode()
