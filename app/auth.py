"""Session tokens: making them, hashing them, finding them in a request."""

import hashlib
import secrets

COOKIE_NAME = "chatwatch_session"


def new_token() -> str:
    """32 random bytes, URL-safe base64 (43 characters), never starting with ``-``.

    A token is pasted into command lines (``chatwatch sessions revoke TOKEN``), where
    one starting with ``-`` (1 in 64 of them) would be read as an option.
    """
    while True:
        token = secrets.token_urlsafe(32)
        if not token.startswith("-"):
            return token


def hash_token(token: str) -> str:
    """Only this is stored: a leaked database does not leak usable tokens."""
    return hashlib.sha256(token.encode("utf-8", "surrogateescape")).hexdigest()


def token_from_headers(authorization: str | None, cookie_token: str | None) -> str | None:
    """The request's session token: ``Authorization: Bearer`` first, then the cookie.

    A malformed Authorization header (another scheme, no token) counts as no token
    from that header; a present but empty value is no token at all.
    """
    if authorization:
        scheme, _, rest = authorization.strip().partition(" ")
        token = rest.strip()
        if scheme.lower() == "bearer" and token and " " not in token:
            return token
    if cookie_token:
        return cookie_token
    return None
