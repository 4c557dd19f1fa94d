"""wandb (the default logger) as an offline user meets it, read back from the files wandb writes.

1. A run killed (SIGKILL or SIGTERM) and rerun ends up with its whole history in wandb: the resumed launch's
   offline transaction log (`<run_dir>/wandb/offline-run-*/run-<id>.wandb`) holds one history row per line of
   metrics.jsonl, same steps, same values, same run id. The killed launch's log holds only a prefix of it
   (whatever wandb-core had written before it died; with SIGKILL usually nothing but the file header).
2. Offline (the default, no $WANDB_MODE) makes no network connection: every Python process of the run reports
   each non-loopback connect and each name lookup other than localhost (a sitecustomize.py), the wandb-core
   service (Go, which Python hooks cannot see) is started with --no-observability, and, where strace works,
   no process of the tree (wandb-core included) connects or sends to a non-loopback address.

wandb 0.31 has no Python reader for .wandb files (the old `wandb.sdk.internal.datastore` is gone; wandb-core
reads them in Go), so `wandb_records` reads the format itself: wandb's 7-byte header (":W&B", magic 0xBEE1,
version 0), then LevelDB-log records in 32 KiB blocks (crc32 seeded with the record type, length, type;
full/first/middle/last), each payload a `wandb.proto.wandb_internal_pb2.Record`; every checksum is verified.
"""
from __future__ import annotations

import ipaddress
import json
import re
import shutil
import signal
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import pytest

try:
    from tests.conftest import cli_env, runner_process
except ImportError:  # tests/ is not a package: pytest puts tests/ itself on sys.path
    from conftest import cli_env, runner_process

TIMEOUT = 300  # seconds for one CLI call (a loaded 2-core machine is slow to import torch)


def ok(result: subprocess.CompletedProcess, what: str = "runner") -> None:
    if result.returncode != 0:
        raise AssertionError(f"{what} exited {result.returncode}\n--- stdout\n{result.stdout[-3000:]}\n"
                             f"--- stderr\n{result.stderr[-3000:]}")


# ---------------------------------------------------------------------------------- reading wandb's files

_BLOCK, _HEADER = 32768, 7
_FULL, _FIRST, _MIDDLE, _LAST = 1, 2, 3, 4


def wandb_records(path: Path, complete: bool = True) -> list:
    """The `Record`s of a .wandb transaction log. `complete=False` stops quietly at a torn tail (a killed
    writer); otherwise anything but a clean end is an error."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    assert data[:4] == b":W&B" and struct.unpack("<HB", data[4:7]) == (0xBEE1, 0), f"{path}: header {data[:7]!r}"
    records, pending, i = [], None, _HEADER
    while True:
        if _BLOCK - i % _BLOCK < _HEADER:  # a block's tail too short for a record header is padding
            i += _BLOCK - i % _BLOCK
        if i >= len(data):
            break
        torn = i + _HEADER > len(data)
        if not torn:
            crc, length, kind = struct.unpack("<IHB", data[i:i + _HEADER])
            payload = data[i + _HEADER:i + _HEADER + length]
            torn = len(payload) < length or crc != zlib.crc32(payload, zlib.crc32(bytes([kind])))
        if torn:
            assert not complete, f"{path}: torn or corrupt record at byte {i} of {len(data)}"
            break
        i += _HEADER + length
        if kind == _FULL:
            records.append(pb.Record.FromString(payload))
        elif kind == _FIRST:
            pending = payload
        elif kind in (_MIDDLE, _LAST):
            assert pending is not None, f"{path}: continuation record without a first one at byte {i}"
            pending += payload
            if kind == _LAST:
                records.append(pb.Record.FromString(pending))
                pending = None
        else:
            raise AssertionError(f"{path}: record type {kind} at byte {i}")
    return records


def history(records: list) -> list[dict]:
    """The history rows, each as {key: value}, with `_step` (the step wandb filed the row under)."""
    rows = []
    for record in records:
        if record.WhichOneof("record_type") == "history":
            row = {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item}
            assert row["_step"] == record.history.step.num, row
            rows.append(row)
    return rows


def run_ids(records: list) -> set[str]:
    return {r.run.run_id for r in records if r.WhichOneof("record_type") == "run"}


def offline_logs(run_dir: Path) -> list[Path]:
    """One transaction log per launch, oldest first (folders are named by their start time, to the second)."""
    logs = []
    for folder in sorted(p for p in (run_dir / "wandb").glob("offline-run-*") if p.is_dir()):
        (log,) = folder.glob("run-*.wandb")
        logs.append(log)
    return logs


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]


# ----------------------------------------------------------------------- 1. whole history after a kill


@pytest.mark.slow  # ~17 s on 2 cores: two launches with wandb
@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM], ids=["SIGKILL", "SIGTERM"])
def test_a_killed_and_resumed_run_has_the_whole_history_in_wandb(tmp_path, sig):
    run_dir = tmp_path / "run"
    args = ["logger=wandb", "trainer.epochs=100", "trainer.progress=false", f"hydra.run.dir={run_dir}"]
    with open(tmp_path / "victim.out", "w") as out, open(tmp_path / "victim.err", "w") as err:
        victim = subprocess.Popen([sys.executable, "-m", "runner", *args], cwd=tmp_path, env=cli_env(tmp_path),
                                  stdout=out, stderr=err)
    try:
        deadline = time.monotonic() + TIMEOUT
        # a few records and a checkpoint first, so the resumed launch has several rows to replay
        while not ((run_dir / "checkpoints" / "last.pt").exists() and (run_dir / "metrics.jsonl").exists()
                   and (run_dir / "metrics.jsonl").read_text().count("\n") >= 3):
            assert victim.poll() is None, f"the run ended before 3 records:\n{(tmp_path / 'victim.err').read_text()}"
            assert time.monotonic() < deadline, "timed out waiting for 3 records"
            time.sleep(0.005)
        victim.send_signal(sig)
        code = victim.wait(TIMEOUT)
    finally:
        if victim.poll() is None:
            victim.kill()
            victim.wait()
    assert code != 0, "the run completed before the signal landed"
    summary = run_dir / "summary.json"
    assert not summary.exists() or json.loads(summary.read_text())["status"] != "completed"

    time.sleep(1.1)  # wandb names offline folders to the second: the rerun gets a folder of its own
    ok(runner_process(tmp_path, *args, timeout=TIMEOUT), "rerun")
    s = json.loads(summary.read_text())
    assert s["status"] == "completed" and s["resumed_from_epoch"], s
    records = metrics(run_dir)
    steps = [r["step"] for r in records]
    assert [r["epoch"] for r in records] == list(range(1, 101))

    killed_log, resumed_log = offline_logs(run_dir)  # exactly two launches
    resumed = wandb_records(resumed_log)
    rows = history(resumed)
    assert [row["_step"] for row in rows] == steps  # one row per record, under the record's step
    for row, record in zip(rows, records):
        assert {k: row[k] for k in record} == record  # the same numbers as metrics.jsonl
    assert any(r.WhichOneof("record_type") == "exit" for r in resumed)

    killed = wandb_records(killed_log, complete=False)  # what was written before the kill, maybe nothing
    killed_steps = [row["_step"] for row in history(killed)]
    assert killed_steps == steps[:len(killed_steps)], killed_steps
    assert run_ids(resumed) == {resumed_log.stem.removeprefix("run-")}  # the same wandb run id ...
    assert run_ids(killed) <= run_ids(resumed)  # ... as the killed launch's (when its run record was written)
    assert killed_log.name == resumed_log.name


# ------------------------------------------------------------------------------ 2. offline: no network

SITECUSTOMIZE = r'''
"""Test instrument: every non-loopback connect and every name lookup other than localhost, from any Python
process, goes to $NETWATCH_LOG; the command line of wandb-core (started by Python) goes to $NETWATCH_SERVICE."""
import ipaddress, json, os, socket, subprocess, traceback

_LOG, _SERVICE = os.environ["NETWATCH_LOG"], os.environ["NETWATCH_SERVICE"]


def _loopback(host):
    if isinstance(host, bytes):
        host = host.decode()
    if host in (None, "", "localhost"):
        return True
    try:
        return ipaddress.ip_address(str(host).split("%")[0]).is_loopback
    except ValueError:
        return False  # a name other than localhost: a lookup


def _report(call, target):
    with open(_LOG, "a") as f:
        f.write(json.dumps({"pid": os.getpid(), "call": call, "target": repr(target),
                            "stack": traceback.format_stack(limit=30)[:-2]}) + "\n")


def _watch_address(call, original):
    def wrapper(self, address, *args, **kwargs):
        if self.family in (socket.AF_INET, socket.AF_INET6) and not _loopback(address[0]):
            _report(call, address)
        return original(self, address, *args, **kwargs)
    return wrapper


def _watch_host(call, original):
    def wrapper(host, *args, **kwargs):
        if not _loopback(host):
            _report(call, host)
        return original(host, *args, **kwargs)
    return wrapper


def _watch_create_connection(original):
    def wrapper(address, *args, **kwargs):
        if not _loopback(address[0]):
            _report("create_connection", address)
        return original(address, *args, **kwargs)
    return wrapper


socket.socket.connect = _watch_address("connect", socket.socket.connect)
socket.socket.connect_ex = _watch_address("connect_ex", socket.socket.connect_ex)
for _name in ("getaddrinfo", "gethostbyname", "gethostbyname_ex", "gethostbyaddr"):
    setattr(socket, _name, _watch_host(_name, getattr(socket, _name)))
socket.create_connection = _watch_create_connection(socket.create_connection)

_Popen_init = subprocess.Popen.__init__


def _popen_init(self, args, *rest, **kwargs):
    argv = [str(a) for a in (args if isinstance(args, (list, tuple)) else [args])]
    if argv and os.path.basename(argv[0]) == "wandb-core":
        env = kwargs.get("env") or os.environ
        with open(_SERVICE, "a") as f:
            f.write(json.dumps({"argv": argv, "WANDB_ERROR_REPORTING": env.get("WANDB_ERROR_REPORTING")}) + "\n")
    _Popen_init(self, args, *rest, **kwargs)


subprocess.Popen.__init__ = _popen_init
'''

_SYSCALL = re.compile(r"^\d+ (connect|sendto|sendmsg|sendmmsg)\(")
_ADDRESS = re.compile(r'sin_addr=inet_addr\("([^"]+)"\)|inet_pton\(AF_INET6, "([^"]+)", &sin6_addr\)')


def strace_prefix(trace: Path) -> list[str] | None:
    """`strace -f` on the network system calls of the whole process tree, where strace exists and may trace."""
    strace = shutil.which("strace")
    if strace is None:
        return None
    cmd = [strace, "-f", "-qq", "--seccomp-bpf", "-e", "trace=execve,connect,sendto,sendmsg,sendmmsg", "-o", str(trace)]
    probe = subprocess.run([*cmd[:-2], "-o", "/dev/null", "true"], capture_output=True)
    return cmd if probe.returncode == 0 else None


def non_loopback_syscalls(trace: Path) -> list[str]:
    """strace lines whose socket address (connect, sendto, ...) is neither loopback nor a Unix socket."""
    bad = []
    for line in trace.read_text().splitlines():
        if not _SYSCALL.match(line):
            continue
        for v4, v6 in _ADDRESS.findall(line):
            address = ipaddress.ip_address(v4 or v6)
            address = getattr(address, "ipv4_mapped", None) or address
            if not address.is_loopback:
                bad.append(line[:300])
                break
    return bad


@pytest.mark.slow  # ~7 s on 2 cores: one launch with wandb (under strace where available)
def test_an_offline_run_makes_no_network_connection(tmp_path):
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(SITECUSTOMIZE)
    net_log, service_log, trace = tmp_path / "net.jsonl", tmp_path / "service.jsonl", tmp_path / "strace.txt"
    env = cli_env(tmp_path, NETWATCH_LOG=str(net_log), NETWATCH_SERVICE=str(service_log))
    del env["WANDB_MODE"]  # the default: logger=wandb with no mode anywhere is offline
    env["PYTHONPATH"] = f"{site}:{env['PYTHONPATH']}"
    run_dir = tmp_path / "run"
    prefix = strace_prefix(trace) or []
    result = subprocess.run([*prefix, sys.executable, "-m", "runner", "trainer.epochs=1", "model.hidden=[8]",
                             "logger=wandb", "trainer.progress=false", f"hydra.run.dir={run_dir}"],
                            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=TIMEOUT)
    ok(result)
    assert json.loads((run_dir / "summary.json").read_text())["status"] == "completed"
    (log,) = offline_logs(run_dir)  # it ran offline, and wandb got the run
    assert [row["_step"] for row in history(wandb_records(log))] == [r["step"] for r in metrics(run_dir)]

    reports = [json.loads(line) for line in net_log.read_text().splitlines()] if net_log.exists() else []
    if reports:
        pytest.fail("network use by an offline run:" + "".join(
            f"\n{r['call']}({r['target']}) in pid {r['pid']}, from\n{''.join(r['stack'])}" for r in reports))
    # wandb-core is Go: the sitecustomize cannot see it; it must have been told to keep its analytics to itself
    services = [json.loads(line) for line in service_log.read_text().splitlines()]
    assert services, "the sitecustomize saw no wandb-core start"
    for service in services:
        assert "--no-observability" in service["argv"], service
        assert service["WANDB_ERROR_REPORTING"] == "false", service
    if prefix:  # every process of the tree, wandb-core included, at the system-call level
        assert any("execve(" in line and "wandb-core" in line for line in trace.read_text().splitlines())
        assert non_loopback_syscalls(trace) == []
