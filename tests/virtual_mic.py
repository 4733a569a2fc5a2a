"""A virtual microphone for tests: a private PulseAudio server whose null sink `vmic` is the
default input (through its monitor), so whatever `paplay` plays into the sink arrives, in real
time, at any PortAudio/ALSA input opened with the server's environment.

The recipe and the reasons for its steps are in /work/shared/notes/virtual-mic.md. Nothing here
touches a PulseAudio of the user's: the server, its socket, state and log live in a private temp
folder, and clients find it only through the PULSE_* variables in ``VirtualMic.env``.

Extra sinks (``sinks=("vmic", "vmic2")``) give independent microphones on the same server: a
client started with ``mic.source_env("vmic2")`` (PULSE_SOURCE) hears only what is played into
`vmic2`, so two listeners can each be played to when each of them is ready.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

SINK = "vmic"
RATE = 16000
TOOLS = ("pulseaudio", "pactl", "paplay", "parec")
INSTALL = "apt-get install -y --no-install-recommends pulseaudio pulseaudio-utils libportaudio2 libasound2-plugins"
# Until a low-latency client is connected, a null sink advances in 2 s blocks, so the first
# capture callback of a new recorder came 1.2-2.0 s late; a keep-alive recorder per sink plus
# this settling time make it come after ~0.1 s.
SETTLE_SECONDS = 2.1
START_TIMEOUT = 30.0


def require_tools() -> None:
    """Fail (never skip) when the PulseAudio programs are missing, naming the fix."""
    missing = [tool for tool in TOOLS if shutil.which(tool) is None]
    if missing:
        pytest.fail(f"the virtual microphone needs {', '.join(missing)}; install them with: sudo {INSTALL}",
                    pytrace=False)


class VirtualMic:
    """One private PulseAudio server with 16 kHz mono null sinks; the first one's monitor is the
    default input."""

    def __init__(self, base: str | os.PathLike | None = None, sinks: tuple[str, ...] = (SINK,)):
        self.sinks = tuple(sinks)
        # A short path: the socket's must fit in sun_path (108 bytes).
        self.dir = Path(tempfile.mkdtemp(prefix="vmic-", dir=base))
        self.socket = self.dir / "pulse.sock"
        self.log = self.dir / "pulse.log"
        self.env = {
            "PULSE_RUNTIME_PATH": str(self.dir / "run"),
            "PULSE_STATE_PATH": str(self.dir / "state"),
            "PULSE_SERVER": f"unix:{self.socket}",
        }
        self.server_pid: int | None = None
        self._keepalive: list[subprocess.Popen] = []

    def full_env(self, extra: dict[str, str] | None = None) -> dict[str, str]:
        return {**os.environ, **self.env, **(extra or {})}

    def source_env(self, sink: str) -> dict[str, str]:
        """Environment for a client whose default input should be ``sink``'s monitor."""
        return {**self.env, "PULSE_SOURCE": f"{sink}.monitor"}

    def _run(self, *args: str, timeout: float = 10.0) -> subprocess.CompletedProcess:
        return subprocess.run(list(args), capture_output=True, text=True, env=self.full_env(), timeout=timeout,
                              stdin=subprocess.DEVNULL)

    def server_answers(self) -> bool:
        try:
            return self._run("pactl", "info", timeout=5).returncode == 0
        except subprocess.TimeoutExpired:
            return False

    def log_tail(self, lines: int = 15) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no server log)"

    def start(self) -> VirtualMic:
        require_tools()
        (self.dir / "run").mkdir()
        (self.dir / "state").mkdir()
        script = self.dir / "vmic.pa"
        lines = [f"load-module module-native-protocol-unix auth-anonymous=1 socket={self.socket}"]
        lines += [f"load-module module-null-sink sink_name={sink} rate={RATE} channels=1" for sink in self.sinks]
        lines += [f"set-default-sink {self.sinks[0]}", f"set-default-source {self.sinks[0]}.monitor"]
        script.write_text("\n".join(lines) + "\n")
        try:
            started = self._run("pulseaudio", "--daemonize=yes", "--system=false", "-n", "-F", str(script),
                                "--exit-idle-time=-1", "--disallow-exit", "--use-pid-file=yes",
                                f"--log-target=file:{self.log}", timeout=START_TIMEOUT)
        except subprocess.TimeoutExpired:
            self._fail("pulseaudio did not daemonize in time")
        if started.returncode != 0:
            self._fail(f"pulseaudio did not start (exit {started.returncode}): {started.stderr.strip()}")
        deadline = time.monotonic() + START_TIMEOUT
        while not self.server_answers():
            if time.monotonic() > deadline:
                self._fail("the PulseAudio server never answered `pactl info`")
            time.sleep(0.1)
        with contextlib.suppress(OSError, ValueError, IndexError):
            self.server_pid = int((self.dir / "run" / "pid").read_text().split()[0])
        for sink in self.sinks:
            self._keepalive.append(subprocess.Popen(
                ["parec", "--latency-msec=10", "--raw", f"--device={sink}.monitor"],
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=self.full_env()))
        time.sleep(SETTLE_SECONDS)
        if any(p.poll() is not None for p in self._keepalive):
            self._fail("a keep-alive recorder (parec) exited")
        return self

    def _fail(self, message: str):
        log = self.log_tail()
        self.stop()
        pytest.fail(f"virtual microphone: {message}\n--- pulse.log ---\n{log}", pytrace=False)

    def kill_server(self) -> None:
        """Make the input device vanish abruptly, as a crashed server or an unplugged device does."""
        if self.server_pid is not None and _alive(self.server_pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.server_pid, signal.SIGKILL)
        else:
            self._run("pulseaudio", "-k")

    def stop(self) -> None:
        for recorder in self._keepalive:
            if recorder.poll() is None:
                recorder.terminate()
            try:
                recorder.wait(timeout=5)
            except subprocess.TimeoutExpired:
                recorder.kill()
                recorder.wait(timeout=5)
        self._keepalive.clear()
        if self.server_pid is None or _alive(self.server_pid):
            with contextlib.suppress(subprocess.TimeoutExpired):
                self._run("pulseaudio", "-k", timeout=10)
        # A server that ignored -k must not outlive the tests.
        if self.server_pid is not None:
            deadline = time.monotonic() + 5
            while _alive(self.server_pid) and time.monotonic() < deadline:
                time.sleep(0.05)
            if _alive(self.server_pid):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(self.server_pid, signal.SIGKILL)
        shutil.rmtree(self.dir, ignore_errors=True)

    def play(self, path: str | os.PathLike, sink: str | None = None, wait: bool = True, timeout: float = 120.0):
        """Play a sound file into ``sink`` (default: the default microphone's). Blocks until it has
        been played, unless ``wait=False``: then it returns the running `paplay` process."""
        args = ["paplay", f"--device={sink or self.sinks[0]}", str(path)]
        if not wait:
            return subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, text=True, env=self.full_env())
        done = self._run(*args, timeout=timeout)
        if done.returncode != 0:
            raise RuntimeError(f"paplay failed (exit {done.returncode}): {done.stderr.strip()}")
        return done

    @contextlib.contextmanager
    def exported(self):
        """The PULSE_* variables set in os.environ while inside; the previous values restored after."""
        saved = {key: os.environ.get(key) for key in self.env}
        os.environ.update(self.env)
        try:
            yield self
        finally:
            for key, value in saved.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value


def _alive(pid: int) -> bool:
    """Running; a zombie (exited, not yet reaped by init) counts as gone."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


@contextlib.contextmanager
def running_virtual_mic(sinks: tuple[str, ...] = (SINK,), export_env: bool = False):
    """A started VirtualMic, stopped and removed on exit; ``export_env`` also sets os.environ."""
    mic = VirtualMic(sinks=sinks).start()
    try:
        if export_env:
            with mic.exported():
                yield mic
        else:
            yield mic
    finally:
        mic.stop()
