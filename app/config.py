"""Settings: one frozen object, built from the command line and the environment."""

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Settings:
    """Everything `service.run` needs. Defaults are the documented ones (README)."""

    bind: str = "127.0.0.1:8000"
    # None: start an embedded nats-server (see embedded.py).
    nats_urls: tuple[str, ...] | None = None
    # None: a SQLite file chatwatch.db in the working directory.
    database_url: str | None = None
    keepalive: float = 15.0
    # Frames a watcher may have queued before it is cut off as a slow consumer.
    watcher_buffer: int = 8192
    # ... and bytes: whichever limit is reached first.
    watcher_buffer_bytes: int = 16 * 1024 * 1024
    # NATS payloads larger than this become an `error` event naming the size.
    max_payload: int = 1024 * 1024
    max_watchers: int = 20000
    max_watchers_per_session: int = 100
    # Seconds hypercorn waits for streams to end after the shutdown frames went out.
    shutdown_grace: float = 1.0
    workers: int = 1
    # Set for the children of `--workers N`: the port is shared with SO_REUSEPORT.
    reuse_port: bool = False
    # Seconds a written byte may stay unacknowledged before the connection is dropped
    # (TCP_USER_TIMEOUT): bounds how long a vanished or stalled client holds a writer.
    write_timeout: float = 30.0
    log_level: str = "info"
    nats_data_dir: str | None = None
    # History (resume and late join) on JetStream: "auto" (on when the NATS servers
    # have JetStream), "on" (exit when they do not), "off".
    history: str = "auto"
    history_stream: str = "CHAT"
    # Seconds an event is kept; 0 = no age limit.
    history_max_age: float = 7 * 24 * 3600.0
    # Events kept per conversation and kind (the stream's max_msgs_per_subject).
    history_max_per_conversation: int = 10000
    history_replicas: int = 1
    # The most events one resume or late join replays; beyond, the newest are sent.
    replay_cap: int = 5000

    @property
    def host_port(self) -> tuple[str, int]:
        host, _, port = self.bind.rpartition(":")
        return host.strip("[]") or "127.0.0.1", int(port)
