"""Training on several workers (tf.distribute.MultiWorkerMirroredStrategy, TF_CONFIG) and several
local devices (MirroredStrategy), against one worker; a worker killed mid-epoch and resumed.

Two real worker processes on 127.0.0.1 (free ports, CPU) train a tiny model on real clips. The
recipe turns dropout and SpecAugment off, so that the only randomness left is the data's, which
is derived from (seed, epoch, position) and so the same however many workers share an epoch:
then N workers with the same global batch must reproduce one worker's run, up to the order of
floating-point additions. Stated tolerances, per epoch: training and validation loss within 1e-4
(the runs differ by ~1e-7 here; clipping each replica's share of the gradient instead of the
batch's gives 3e-4), validation accuracy within 0.02 (one borderline clip in ~150 may flip on a
rounding difference), and the same learning rate.
"""

from __future__ import annotations

import csv
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import run_cli

RECIPE = {"model": {"dropout": 0.0, "time_masks": 0, "freq_masks": 0}}
LOSS_TOLERANCE = 1e-4
ACCURACY_TOLERANCE = 0.02


def history(run: Path) -> list[dict]:
    path = run / "history.csv"
    return list(csv.DictReader(path.open())) if path.exists() else []


def free_ports(n: int) -> list[int]:
    sockets = [socket.socket() for _ in range(n)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def tf_config(ports: list[int], index: int) -> str:
    return json.dumps({"cluster": {"worker": [f"127.0.0.1:{p}" for p in ports]},
                       "task": {"type": "worker", "index": index}})


def start_workers(outs: list[Path], args: list[str], env: dict) -> list[subprocess.Popen]:
    """One `speechrnn train --strategy multiworker` process per out folder, worker i writing to outs[i]."""
    ports = free_ports(len(outs))
    return [subprocess.Popen(
        [sys.executable, "-c", "from speechrnn.cli import main; main()", "train", "--strategy", "multiworker",
         "--out", str(out), *args],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, **env, "TF_CONFIG": tf_config(ports, i)}) for i, out in enumerate(outs)]


def finish(procs: list[subprocess.Popen], timeout: float = 600) -> list[tuple[int, str]]:
    results = []
    for proc in procs:
        try:
            _, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            for p in procs:
                p.kill()
            pytest.fail("a worker did not finish")
        results.append((proc.returncode, err))
    return results


def close(a: list[dict], b: list[dict]) -> None:
    """Two runs' histories agree epoch by epoch within the stated tolerances."""
    assert [r["epoch"] for r in a] == [r["epoch"] for r in b]
    for x, y in zip(a, b, strict=True):
        assert abs(float(x["loss"]) - float(y["loss"])) < LOSS_TOLERANCE, (x, y)
        assert abs(float(x["val_loss"]) - float(y["val_loss"])) < LOSS_TOLERANCE, (x, y)
        assert abs(float(x["val_accuracy"]) - float(y["val_accuracy"])) <= ACCURACY_TOLERANCE, (x, y)
        assert float(x["learning_rate"]) == pytest.approx(float(y["learning_rate"]), rel=1e-6)


@pytest.fixture(scope="module")
def setup(tmp_path_factory, shared_data):
    base = tmp_path_factory.mktemp("distributed")
    recipe = base / "recipe.json"
    recipe.write_text(json.dumps(RECIPE))
    # --clipnorm 0.05 clips nearly every step: the norm clipped must be the global batch's, not a replica's
    args = ["--config", str(recipe), "--data", str(shared_data), "--words", "yes,no", "--units", "16",
            "--layers", "1", "--batch-size", "16", "--seed", "3", "--clipnorm", "0.05"]
    return base, args


@pytest.fixture(scope="module")
def pair(setup):
    """One worker alone, and two workers, on the same recipe, seed and global batch."""
    base, args = setup
    args = [*args, "--max-per-label", "60", "--epochs", "2"]
    single = run_cli("train", "--out", str(base / "single"), *args, env={"SPEECHRNN_CACHE": str(base / "cache")})
    assert single.returncode == 0, single.stderr[-2000:]
    # Each worker its own cache (as on two machines) and its own --out: only the chief may write.
    procs = start_workers([base / "pair", base / "pair-worker1"], args, {"SPEECHRNN_CACHE": str(base / "cache-w")})
    return {"base": base, "single": base / "single", "run": base / "pair", "results": finish(procs)}


def test_two_workers_finish_and_reproduce_one_worker(pair):
    for code, err in pair["results"]:
        assert code == 0, err[-3000:]
        assert "2 replica(s): connected" in err
    chief, worker = pair["results"][0][1], pair["results"][1][1]
    assert "best validation accuracy" in chief and "[worker 1] epoch   2/2" in worker
    assert not (pair["base"] / "pair-worker1").exists()  # the non-chief wrote nothing
    assert not list(pair["run"].rglob(".*tmp*"))
    rows, single = history(pair["run"]), history(pair["single"])
    assert [int(r["epoch"]) for r in rows] == [1, 2]
    assert all(float(r["clipped_fraction"]) > 0.5 for r in rows)
    close(rows, single)
    summary = json.loads((pair["run"] / "summary.json").read_text())
    assert summary["workers"] == 2 and summary["replicas"] == 2 and summary["strategy"] == "multiworker"
    assert abs(summary["best_val_accuracy"] - json.loads((pair["single"] / "summary.json").read_text())
               ["best_val_accuracy"]) <= ACCURACY_TOLERANCE


def test_the_chiefs_checkpoint_loads_and_exports(pair, tmp_path, shared_data):
    out = tmp_path / "model"
    done = run_cli("export", str(pair["run"]), str(out))
    assert done.returncode == 0, done.stderr[-2000:]
    clip = next((shared_data / "yes").glob("*.flac"))
    classified = run_cli("classify", str(out), str(clip), "--json")
    assert classified.returncode == 0, classified.stderr[-2000:]
    answer = json.loads(classified.stdout.strip().splitlines()[0])
    assert answer["label"] in ("_silence_", "_unknown_", "yes", "no") and 0 < answer["score"] <= 1
    # the exported probabilities are the checkpoint's, rebuilt from the run folder
    check = subprocess.run([sys.executable, "-c", textwrap.dedent(f"""
        import numpy as np, tensorflow as tf
        from speechrnn.train import model_from_run
        _, model = model_from_run({str(pair["run"])!r}, "best")
        x = np.random.default_rng(0).normal(size=(3, 98, 40)).astype(np.float32) * 20
        exported = tf.saved_model.load({str(out)!r}).signatures["mfcc"](tf.constant(x))["probabilities"].numpy()
        print(float(np.abs(exported - model(x, training=False).numpy()).max()))
    """)], capture_output=True, text=True)
    assert check.returncode == 0, check.stderr[-2000:]
    assert float(check.stdout.strip().splitlines()[-1]) < 1e-5


def test_a_chief_that_cannot_start_stops_every_worker_with_its_reason(pair, setup):
    """The run folder already holds a run and --resume is missing: the chief refuses, and the
    other worker, instead of waiting for it forever, reports the chief's reason."""
    _, args = setup
    results = finish(start_workers([pair["run"], pair["run"]], [*args, "--max-per-label", "60", "--epochs", "2"],
                                   {"SPEECHRNN_CACHE": str(pair["base"] / "cache-w")}))
    (chief_code, chief), (worker_code, worker) = results
    assert chief_code == worker_code == 1
    assert [line for line in chief.splitlines() if line.startswith("error:")] == [
        f"error: {pair['run']}: already holds a run: pass --resume to continue it, or choose another --out"]
    assert [line for line in worker.splitlines() if line.startswith("error:")] == [
        f"error: the chief stopped: {pair['run']}: already holds a run: pass --resume to continue it, "
        "or choose another --out"]
    assert "Traceback" not in chief + worker


@pytest.fixture(scope="module")
def single_three_epochs(setup):
    base, args = setup
    out = base / "single3"
    done = run_cli("train", "--out", str(out), *args, "--max-per-label", "150", "--epochs", "3",
                   env={"SPEECHRNN_CACHE": str(base / "cache")})
    assert done.returncode == 0, done.stderr[-2000:]
    return out


@pytest.mark.parametrize("victim", [1, 0], ids=["worker-1-killed", "chief-killed"])
def test_a_worker_killed_mid_epoch_resumes(setup, single_three_epochs, victim):
    """SIGKILL one worker during epoch 2: the other stops with one clear error line, the chief's
    epoch-1 checkpoint is intact, and both workers restarted with --resume finish the run as one
    unbroken worker does (at most the killed epoch is redone)."""
    base, args = setup
    args = [*args, "--max-per-label", "150", "--epochs", "3"]
    run = base / f"killed-{victim}"
    env = {"SPEECHRNN_CACHE": str(base / "cache-w")}
    procs = start_workers([run, run], args, env)
    deadline = time.time() + 600
    while len(history(run)) < 1:
        if any(p.poll() is not None for p in procs) or time.time() > deadline:
            for p in procs:
                p.kill()
            pytest.fail(f"workers ended early: {[p.stderr.read()[-2000:] for p in procs]}")
        time.sleep(0.05)
    time.sleep(0.5)  # into epoch 2
    procs[victim].send_signal(signal.SIGKILL)
    code, err = finish([procs[1 - victim]], timeout=300)[0]
    procs[victim].wait()
    assert code == 1, err[-3000:]
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "lost contact with another worker" in errors[0] and "--resume" in errors[0], err[-3000:]
    assert "Traceback" not in err
    before = history(run)
    assert [int(r["epoch"]) for r in before] == [1]  # killed mid-epoch 2: one epoch saved
    with np.load(run / "checkpoints" / "last.npz") as ck:
        assert json.loads(str(ck["state"]))["epoch"] == 1

    results = finish(start_workers([run, run], ["--resume"], env))
    for code, err in results:
        assert code == 0, err[-3000:]
    assert "resuming" in results[0][1] and "after epoch 1" in results[0][1]
    rows = history(run)
    assert rows[:1] == before
    close(rows, history(single_three_epochs))


def test_mirrored_strategy_on_two_local_devices_reproduces_one_device(pair, tmp_path, shared_data):
    """MirroredStrategy over two logical CPU devices in one process: the replica slicing within a worker."""
    out = tmp_path / "mirrored"
    args = ["--config", str(pair["base"] / "recipe.json"), "--data", str(shared_data), "--words", "yes,no",
            "--units", "16", "--layers", "1", "--batch-size", "16", "--seed", "3", "--max-per-label", "60",
            "--epochs", "2"]
    args += ["--clipnorm", "0.05"]
    code = textwrap.dedent(f"""
        import sys
        from speechrnn.tfutil import import_tf
        tf = import_tf()
        cpu = tf.config.list_physical_devices("CPU")[0]
        tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
        from speechrnn.cli import main
        sys.argv = ["speechrnn", "train", "--strategy", "mirrored", "--out", {str(out)!r}, *{args!r}]
        main()
    """)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env={**os.environ, "SPEECHRNN_CACHE": str(pair["base"] / "cache")})
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["strategy"] == "mirrored" and summary["replicas"] == 2 and summary["workers"] == 1
    close(history(out), history(pair["single"]))


@pytest.mark.parametrize("value, expected", [
    ("{not json", "is not valid JSON"),
    ('{"cluster": {"worker": ["127.0.0.1:1"]}}', 'needs a "cluster" object and a "task" object'),
    ('{"cluster": {"worker": ["localhost"]}, "task": {"type": "worker", "index": 0}}', "is not host:port"),
    ('{"cluster": {"worker": ["a:1", "b:2"]}, "task": {"type": "worker", "index": 2}}', "task index 2"),
    ('{"cluster": {"worker": ["a:1"], "ps": ["b:2"]}, "task": {"type": "worker", "index": 0}}', "names task types ps"),
    ('{"cluster": {"worker": ["a:1", "a:1"]}, "task": {"type": "worker", "index": 0}}', "the same address twice"),
    ("", "is not set"),
])
def test_a_malformed_tf_config_is_one_clear_line(value, expected, tmp_path, shared_data):
    from data_prep.errors import SpeechRNNError
    from speechrnn.distribute import parse_tf_config

    with pytest.raises(SpeechRNNError, match=expected):
        parse_tf_config(value)
    if value.startswith("{not"):  # and through the CLI: one line, exit 1, nothing written
        done = run_cli("train", "--strategy", "multiworker", "--data", str(shared_data), "--out",
                       str(tmp_path / "run"), env={"TF_CONFIG": value})
        assert done.returncode == 1
        assert done.stderr.strip().count("\n") == 0 and done.stderr.startswith("error: TF_CONFIG is not valid JSON")
        assert '{"cluster": {"worker": [' in done.stderr  # shows how it should look
        assert not (tmp_path / "run").exists()


def test_the_chief_and_worker_indices_follow_tf_distribute():
    from speechrnn.distribute import parse_tf_config

    with_chief = {"cluster": {"chief": ["c:1"], "worker": ["w:1", "w:2"]}}
    chief = parse_tf_config(json.dumps({**with_chief, "task": {"type": "chief", "index": 0}}))
    second = parse_tf_config(json.dumps({**with_chief, "task": {"type": "worker", "index": 1}}))
    assert chief.is_chief and chief.workers == ("c:1", "w:1", "w:2")
    assert (second.index, second.is_chief, second.address) == (2, False, "w:2")
    plain = parse_tf_config(json.dumps({"cluster": {"worker": ["w:1", "w:2"]}, "task": {"type": "worker", "index": 0}}))
    assert plain.is_chief and plain.task == "worker 0"


def test_a_taken_port_is_reported_before_tensorflow_grabs_it():
    from data_prep.errors import SpeechRNNError
    from speechrnn.distribute import check_port_free

    with socket.socket() as holder:
        holder.bind(("", 0))
        holder.listen()
        port = holder.getsockname()[1]
        with pytest.raises(SpeechRNNError, match=f"port {port} .* is in use"):
            check_port_free(f"127.0.0.1:{port}")
    check_port_free(f"127.0.0.1:{port}")  # free again
