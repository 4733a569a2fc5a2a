"""The int16 waveform cache the trainer reads training clips from, and how an epoch is cut into
workers' shards: a shard is made exactly as it would be within the whole epoch."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from data_prep.audio import fix_length, load_audio
from data_prep.dataset import Example
from data_prep.features import FeatureConfig
from data_prep.waveforms import open_store

FC = FeatureConfig()


def clips(shared_data: Path, word: str, n: int) -> list[Example]:
    return [Example(p, word, "training", word) for p in sorted((shared_data / word).glob("*.flac"))[:n]]


def test_the_store_holds_each_clip_exactly_and_is_built_once(tmp_path, shared_data):
    noise = shared_data / "_background_noise_" / "running_tap.flac"
    broken = tmp_path / "no" / "broken_nohash_0.wav"
    broken.parent.mkdir()
    broken.write_bytes(b"RIFF not really a wav file")
    examples = [*clips(shared_data, "yes", 6), Example(broken, "no", "training", "no"),
                Example(noise, "_silence_", "training", offset=16000 * 3, gain=0.01),
                *clips(shared_data, "no", 5)]
    store, errors = open_store(examples, FC, tmp_path / "cache", show_progress=False)
    assert [Path(e.path) for e in errors] == [broken]
    assert store.rows == len(examples) - 1 and list(store.kept) == [0, 1, 2, 3, 4, 5, 7, 8, 9, 10, 11, 12]
    rows = np.arange(store.rows)[::-1]  # any order
    got = store.read(rows)
    for row, wave in zip(rows, got, strict=True):
        ex = examples[store.kept[row]]
        if ex.is_cut:  # stored before its gain: a -40 dB cut keeps its 16 bits
            expected = fix_length(load_audio(noise)[ex.offset : ex.offset + FC.clip_samples], FC.clip_samples) * ex.gain
            np.testing.assert_allclose(wave, expected, rtol=1e-6, atol=1e-12)
            assert len(np.unique(wave)) > 1000
        else:  # 16-bit FLAC at 16 kHz: exact
            np.testing.assert_array_equal(wave, fix_length(load_audio(ex.path), FC.clip_samples))
    audio = store.folder / "audio.npy"
    assert np.load(audio, mmap_mode="r").dtype == np.int16 and audio.stat().st_size < store.rows * 32000 + 1024
    built = audio.stat().st_mtime_ns
    again, errors_again = open_store(examples, FC, tmp_path / "cache", show_progress=False)
    assert again.folder == store.folder and audio.stat().st_mtime_ns == built  # reused, not rebuilt
    assert [Path(e.path) for e in errors_again] == [broken]  # and still says what was left out
    assert not [p for p in (tmp_path / "cache" / "waveforms").iterdir() if ".tmp-" in p.name]


def test_the_store_is_addressed_by_content(tmp_path, shared_data):
    folder = tmp_path / "copy" / "yes"
    folder.mkdir(parents=True)
    originals = clips(shared_data, "yes", 3)
    for ex in originals:
        shutil.copy(ex.path, folder / ex.path.name)
    copies = [Example(folder / ex.path.name, "yes", "training", "yes") for ex in originals]
    first, _ = open_store(originals, FC, tmp_path / "cache", show_progress=False)
    renamed, _ = open_store(copies, FC, tmp_path / "cache", show_progress=False)
    assert renamed.folder == first.folder  # same audio elsewhere: the same store
    shutil.copy(clips(shared_data, "no", 1)[0].path, copies[1].path)  # one file's content changes
    changed, _ = open_store(copies, FC, tmp_path / "cache", show_progress=False)
    assert changed.folder != first.folder
    np.testing.assert_array_equal(changed.read([1])[0], fix_length(load_audio(copies[1].path), FC.clip_samples))
    assert not np.array_equal(changed.read([1]), renamed.read([1]))


def test_replica_cuts_split_every_global_batch_whole():
    from speechrnn.train import replica_cuts

    for n in (0, 1, 5, 16, 17):
        for replicas in (1, 2, 3, 4):
            cuts = replica_cuts(n, replicas)
            assert cuts[0] == 0 and cuts[-1] == n and len(cuts) == replicas + 1
            sizes = np.diff(cuts)
            assert sizes.min() >= 0 and sizes.max() - sizes.min() <= 1


@pytest.fixture(scope="module")
def data(shared_data, tmp_path_factory):
    from data_prep.dataset import TaskConfig
    from speechrnn.runconfig import TrainConfig
    from speechrnn.train import TrainingData

    config = TrainConfig(data=[str(shared_data)], task=TaskConfig(("yes", "no")), max_per_label=20, seed=4,
                         batch_size=7, epochs=2)

    return TrainingData(config, show_progress=False, cache_dir=tmp_path_factory.mktemp("cache"))


def test_a_shard_of_an_epoch_is_made_exactly_as_within_the_whole_epoch(data):
    order = data.epoch_order(2)
    everything = np.arange(len(order))
    x_all, y_all, d_all = data.features(2, order, everything)
    shard = everything[1::3]
    x, y, d = data.features(2, order, shard)
    np.testing.assert_array_equal(x, x_all[shard])
    np.testing.assert_array_equal(y, y_all[shard])
    np.testing.assert_array_equal(d, d_all[shard])
    assert not np.array_equal(data.features(1, data.epoch_order(1), everything)[0], x_all)  # epochs differ


def test_workers_batch_streams_together_are_one_workers_batches(data):
    """Two workers' BatchStreams (one replica each) deliver, step by step, the two halves of the
    global batch one worker's stream delivers."""
    from speechrnn.distribute import Distribution
    from speechrnn.train import BatchStream

    def steps(workers: int, index: int) -> list:
        dist = Distribution("multiworker", None, workers, index, range(index, index + 1), workers)
        stream = BatchStream(data, dist, data.config.batch_size, 1, 2)
        try:
            return [list(stream.batches(epoch)) for epoch in (1, 2)]
        finally:
            stream.close()

    one, (w0, w1) = steps(1, 0), (steps(2, 0), steps(2, 1))
    for epoch in range(2):
        assert len(one[epoch]) == len(w0[epoch]) == len(w1[epoch]) == -(-data.epoch_size // 7)
        for whole, a, b in zip(one[epoch], w0[epoch], w1[epoch], strict=True):
            np.testing.assert_array_equal(np.concatenate([a.x, b.x]), whole.x)
            np.testing.assert_array_equal(np.concatenate([a.y, b.y]), whole.y)
            assert a.batch_total == b.batch_total == whole.batch_total == len(whole.y)
            assert a.domain_total == whole.domain_total == int(np.sum(whole.domain >= 0))
            assert len(a.y) - len(b.y) in (0, 1) and list(a.bounds) == [0, len(a.y)]
