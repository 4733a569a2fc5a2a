"""A virtual microphone for tests: a private PulseAudio server whose null sink `vmic` is the
default input (its monitor), so whatever `paplay` plays into the sink arrives, in real time,
at any PortAudio/ALSA input opened with the server's environment.

The recipe and the reasons for its steps are in /work/shared/notes/virtual-mic.md. Nothing
here touches the user's own PulseAudio: the server, its socket, state and log all live in a
private temp folder, and clients find it only through the three PULSE_* variables in ``env``.
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
INSTALL = ("apt-get install -y --no-install-recommends pulseaudio pulseaudio-utils "
           "libportaudio2 libasound2-plugins")
# Until a low-latency client is connected the null sink advances in 2 s blocks, so the first
# capture callback of a new recorder can come up to 2 s late; a keep-alive recorder plus this
# settling time make it come after ~0.1 s.
SETTLE_SECONDS = 2.1
START_TIMEOUT = 30.0


def require_tools() -> None:
    """Fail (never skip) when the PulseAudio programs are missing, naming the fix."""
    missing = [tool for tool in TOOLS if shutil.which(tool) is None]
    if missing:
        pytest.fail(f"the virtual microphone needs {', '.join(missing)}; install with: sudo {INSTALL}",
                    pytrace=False)


class VirtualMic:
    """One private PulseAudio server with a 16 kHz mono null sink `vmic` (input: `vmic.monitor`)."""

    def __init__(self, base: str | os.PathLike | None = None):
        self.dir = Path(tempfile.mkdtemp(prefix="vmic-", dir=base))
        self.socket = self.dir / "pulse.sock"
        self.log = self.dir / "pulse.log"
        self.env = {
            "PULSE_RUNTIME_PATH": str(self.dir / "run"),
            "PULSE_STATE_PATH": str(self.dir / "state"),
            "PULSE_SERVER": f"unix:{self.socket}",
        }
        self._keepalive: subprocess.Popen | None = None
        self.server_pid: int | None = None

    # -- running the PulseAudio tools against this server ------------------------------------
    def full_env(self) -> dict[str, str]:
        return {**os.environ, **self.env}

    def _run(self, *args: str, timeout: float = 10.0) -> subprocess.CompletedProcess:
        return subprocess.run(list(args), capture_output=True, text=True, env=self.full_env(), timeout=timeout)

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

    # -- life cycle ---------------------------------------------------------------------------
    def start(self) -> VirtualMic:
        require_tools()
        (self.dir / "run").mkdir()
        (self.dir / "state").mkdir()
        script = self.dir / "vmic.pa"
        script.write_text(
            f"load-module module-native-protocol-unix auth-anonymous=1 socket={self.socket}\n"
            f"load-module module-null-sink sink_name={SINK} rate={RATE} channels=1\n"
            f"set-default-sink {SINK}\n"
            f"set-default-source {SINK}.monitor\n"
        )
        started = self._run("pulseaudio", "--daemonize=yes", "--system=false", "-n", "-F", str(script),
                            "--exit-idle-time=-1", "--disallow-exit", "--use-pid-file=yes",
                            f"--log-target=file:{self.log}", timeout=START_TIMEOUT)
        if started.returncode != 0:
            self.stop()
            pytest.fail(f"pulseaudio did not start (exit {started.returncode}): {started.stderr.strip()}\n"
                        f"{self.log_tail()}", pytrace=False)
        deadline = time.monotonic() + START_TIMEOUT
        while not self.server_answers():
            if time.monotonic() > deadline:
                log = self.log_tail()
                self.stop()
                pytest.fail(f"the virtual microphone's PulseAudio server never answered `pactl info`:\n{log}",
                            pytrace=False)
            time.sleep(0.1)
        with contextlib.suppress(OSError, ValueError):
            self.server_pid = int((self.dir / "run" / "pid").read_text().split()[0])
        self._keepalive = subprocess.Popen(["parec", "--latency-msec=10", "--raw"], stdout=subprocess.DEVNULL,
                                           stderr=subprocess.DEVNULL, env=self.full_env())
        time.sleep(SETTLE_SECONDS)
        if self._keepalive.poll() is not None:
            self.stop()
            pytest.fail(f"the keep-alive recorder (parec) exited with {self._keepalive.returncode}",
                        pytrace=False)
        return self

    def kill_server(self) -> None:
        """Make the input device vanish abruptly, as an unplugged device or crashed server does."""
        if self.server_pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.server_pid, signal.SIGKILL)
        else:
            self._run("pulseaudio", "-k")

    def stop(self) -> None:
        if self._keepalive is not None:
            if self._keepalive.poll() is None:
                self._keepalive.terminate()
                try:
                    self._keepalive.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    self._keepalive.kill()
                    self._keepalive.wait(timeout=5)
            self._keepalive = None
        if self.socket.exists():
            with contextlib.suppress(subprocess.TimeoutExpired):
                self._run("pulseaudio", "-k", timeout=10)
        # A server that ignored -k (or is still exiting) must not outlive the test session.
        if self.server_pid is not None:
            deadline = time.monotonic() + 5
            while _alive(self.server_pid) and time.monotonic() < deadline:
                time.sleep(0.05)
            if _alive(self.server_pid):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(self.server_pid, signal.SIGKILL)
        shutil.rmtree(self.dir, ignore_errors=True)

    # -- playing into the microphone -------------------------------------------------------------
    def play(self, path: str | os.PathLike, wait: bool = True, timeout: float = 120.0):
        """Play a sound file into the sink (the microphone hears it). Blocks unless ``wait=False``,
        then returns the running `paplay` process."""
        args = ["paplay", f"--device={SINK}", str(path)]
        if not wait:
            return subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                    env=self.full_env())
        done = self._run(*args, timeout=timeout)
        if done.returncode != 0:
            raise RuntimeError(f"paplay failed (exit {done.returncode}): {done.stderr.strip()}")
        return done

    @contextlib.contextmanager
    def exported(self):
        """Set the PULSE_* variables in os.environ while inside; restore the old values after."""
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
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie child of ours would look alive; pulseaudio daemonizes, so it is not our child.
    return True


@contextlib.contextmanager
def virtual_mic(base: str | os.PathLike | None = None, export_env: bool = False):
    """A started VirtualMic, stopped and removed on exit; ``export_env`` also sets os.environ."""
    mic = VirtualMic(base).start()
    try:
        if export_env:
            with mic.exported():
                yield mic
        else:
            yield mic
    finally:
        mic.stop()
