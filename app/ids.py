"""Conversation id validation: the only gate between a URL and a NATS subject."""

import re

# Hyphenated 8-4-4-4-12 hex only. `fullmatch` with an explicit class, not uuid.UUID(),
# which would also accept braces, urn:uuid: and 32 bare digits (the contract says those
# are "not found"). No `$`: it would let a trailing "\n" through.
_UUID = re.compile(r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}")


def parse_conversation_id(raw: str) -> str | None:
    """Return the canonical (lowercase) id, or None when `raw` is not a hyphenated UUID.

    Whatever this returns is safe inside a NATS subject: only hex digits and hyphens.
    """
    if len(raw) != 36 or _UUID.fullmatch(raw) is None:
        return None
    return raw.lower()


def chunk_subject(conversation_id: str) -> str:
    """The subject the AI runtime publishes chunks on."""
    return f"chat.chunk.{conversation_id}"


def message_subject(conversation_id: str) -> str:
    """The subject the AI runtime publishes complete messages on."""
    return f"chat.message.{conversation_id}"


def watch_subject(conversation_id: str) -> str:
    """One wildcard subscription for both kinds: one subscription keeps publish order."""
    return f"chat.*.{conversation_id}"
