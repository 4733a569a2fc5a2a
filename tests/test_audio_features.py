import logging
import os
import warnings

import numpy as np
import pytest
import soundfile as sf

from data_prep.audio import MAX_ABS_SAMPLE, fix_length, load_audio, stream_audio
from data_prep.augment import AugmentConfig, active_rms, augment, change_speed, reverberate, tilt, time_shift
from data_prep.dataset import SpeechCommands, TaskConfig
from data_prep.errors import SpeechRNNError
from data_prep.extract import FeatureCache, featurize
from data_prep.features import FeatureConfig, mfcc


def test_loads_any_rate_channels_and_format(tmp_path, shared_data):
    clip = next((shared_data / "yes").iterdir())
    ref = load_audio(clip)
    assert ref.dtype == np.float32 and ref.ndim == 1 and 8000 <= len(ref) <= 16000
    stereo = np.stack([ref, ref], axis=1)
    sf.write(tmp_path / "s.wav", stereo, 16000, subtype="PCM_24")
    sf.write(tmp_path / "s.ogg", ref, 16000)
    sf.write(tmp_path / "r44.wav", np.repeat(ref, 1), 16000)
    np.testing.assert_allclose(load_audio(tmp_path / "s.wav"), ref, atol=1e-4)
    assert abs(len(load_audio(tmp_path / "s.ogg")) - len(ref)) <= 1
    # 44.1 kHz in, 16 kHz out with soxr: the same length in seconds.
    import soxr

    sf.write(tmp_path / "hi.wav", soxr.resample(ref, 16000, 44100), 44100, subtype="FLOAT")
    back = load_audio(tmp_path / "hi.wav")
    assert abs(len(back) - len(ref)) <= 2
    n = min(len(back), len(ref))
    assert np.corrcoef(back[:n], ref[:n])[0, 1] > 0.99


@pytest.mark.parametrize(
    "make, problem",
    [
        (lambda p: p.write_bytes(b""), "cannot decode"),
        (lambda p: p.write_bytes(b"this is not audio at all" * 10), "cannot decode"),
        (lambda p: p.write_bytes(b"RIFF\x24\x00\x00\x00WAVEfmt "), "cannot decode"),
        (lambda p: sf.write(p, np.zeros(0, np.float32), 16000), "empty"),
        (lambda p: sf.write(p, np.array([0.1, np.nan, 0.2], np.float32), 16000, subtype="FLOAT"), "NaN"),
        (lambda p: sf.write(p, np.array([0.1, np.inf], np.float32), 16000, subtype="FLOAT"), "NaN or Inf"),
        (lambda p: p.mkdir(), "directory"),
        (lambda p: None, "no such file"),
        (lambda p: (p.symlink_to(p.with_name("other.wav")), p.with_name("other.wav").symlink_to(p)),
         "symbolic link loop"),
        (lambda p: p.symlink_to(p.with_name("gone.wav")), "broken symbolic link (to"),
    ],
)
def test_broken_audio_is_a_clear_error_naming_the_file(tmp_path, make, problem):
    path = tmp_path / "bad.wav"
    make(path)
    with pytest.raises(SpeechRNNError) as err:
        load_audio(path)
    assert str(err.value).startswith(str(path)) and problem in str(err.value)
    assert "\n" not in str(err.value)


def test_fix_length():
    assert len(fix_length(np.ones(10, np.float32), 16)) == 16
    assert fix_length(np.arange(20.0), 16)[-1] == 15
    assert fix_length(np.ones((2, 5)), 8).shape == (2, 8)


def test_mfcc_shape_and_batch_equals_single(shared_data):
    config = FeatureConfig()
    clips = [fix_length(load_audio(p), 16000) for p in sorted((shared_data / "no").iterdir())[:4]]
    batch = mfcc(np.stack(clips), config)
    assert batch.shape == (4, 98, 40) and config.shape == (98, 40)
    np.testing.assert_allclose(batch[2], mfcc(clips[2], config), rtol=0, atol=1e-4)
    # Features of a window do not depend on the rest of the clip (streaming relies on this).
    part = mfcc(clips[0][1600 : 1600 + 480 + 160 * 9], config)
    np.testing.assert_allclose(part, batch[0][10:20], atol=1e-3)
    assert FeatureConfig.from_dict(config.to_dict()) == config
    assert FeatureConfig(n_mfcc=13).digest() != config.digest()
    with pytest.raises(ValueError):
        FeatureConfig(n_mfcc=60)


def test_augmentation_is_deterministic_and_changes_audio(shared_data):
    waves = np.stack([fix_length(load_audio(p), 16000) for p in sorted((shared_data / "up").iterdir())[:6]])
    noise = [load_audio(shared_data / "_background_noise_" / "white_noise.flac")[:48000]]
    config = AugmentConfig(speed_range=0.1, gain_db=6)
    a = augment(waves, noise, config, np.random.default_rng(7))
    b = augment(waves, noise, config, np.random.default_rng(7))
    c = augment(waves, noise, config, np.random.default_rng(8))
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a, c)
    assert not np.allclose(a, waves) and a.shape == waves.shape
    np.testing.assert_array_equal(augment(waves, noise, AugmentConfig.off(), np.random.default_rng(1)), waves)
    assert np.array_equal(time_shift(np.arange(5.0), 2), [0, 0, 0, 1, 2])
    assert np.array_equal(time_shift(np.arange(5.0), -2), [2, 3, 4, 0, 0])
    assert len(change_speed(waves[0], 1.1)) == len(change_speed(waves[0], 0.9)) == 16000


def test_noise_mixed_at_a_level_in_dbfs_whatever_the_recording_level(shared_data):
    """background_dbfs: the cat recording (0.004 RMS) and white noise (0.33 RMS) come out at the same
    drawn levels; the raw-gain rule (background_volume) leaves the cat 38 dB below the white noise."""
    folder = shared_data / "_background_noise_"
    quiet = load_audio(folder / "dude_miaowing.flac")[:64000]
    loud = load_audio(folder / "white_noise.flac")[:64000]
    silent = np.zeros((200, 16000), np.float32)

    def levels(noise, config):
        mixed = augment(silent, noise, config, np.random.default_rng(11))
        return 20 * np.log10(np.sqrt(np.mean(mixed.astype(np.float64) ** 2, axis=1)) + 1e-12)

    by_level = AugmentConfig(background_probability=1.0, background_dbfs=(-50.0, -30.0), time_shift_ms=0)
    steady = levels([loud], by_level)  # white noise: every 1 s cut has the recording's RMS
    assert -51 < steady.min() < -48 and -32 < steady.max() < -29 and abs(np.median(steady) + 40) < 2
    # The cat comes and goes, so its 1 s cuts scatter around the drawn level (the same draws as the
    # white noise's: one recording, one seed); in power, on average, they are at it.
    relative = levels([quiet], by_level) - steady
    assert abs(10 * np.log10(np.mean(10 ** (relative / 10)))) < 3
    raw = AugmentConfig(background_probability=1.0, background_volume=0.15, time_shift_ms=0)
    assert np.median(levels([loud], raw)) - np.median(levels([quiet], raw)) > 30
    assert AugmentConfig.from_dict(by_level.to_dict()) == by_level
    assert AugmentConfig.from_dict({**by_level.to_dict(), "background_dbfs": [-50, -30]}) == by_level
    with pytest.raises(ValueError, match="background_dbfs"):
        AugmentConfig(background_dbfs=(-20.0, -40.0))


def test_noise_mixed_at_a_ratio_to_each_clips_speech(shared_data):
    """background_snr_db: a word recorded 20 dB quieter gets noise 20 dB quieter, so every clip ends
    up at a drawn SNR against its own speech; a level in dBFS would bury the quiet one."""
    word = fix_length(load_audio(sorted((shared_data / "yes").iterdir())[0]), 16000)
    word = word / np.abs(word).max() * 0.5
    clips = np.stack([word] * 100 + [word * 0.1] * 100)  # 0 and -20 dB
    noise = [load_audio(shared_data / "_background_noise_" / "pink_noise.flac")[:64000]]
    config = AugmentConfig(background_probability=1.0, background_snr_db=(0.0, 20.0), time_shift_ms=0)
    mixed = augment(clips, noise, config, np.random.default_rng(5))
    added = (mixed - clips).astype(np.float64)
    speech = np.array([active_rms(c) for c in clips])
    snr = 20 * np.log10(speech / np.sqrt(np.mean(added**2, axis=1)))
    # pink noise is steady: each cut is within a dB of the recording's RMS, so of the drawn ratio
    assert -1.5 < snr.min() and snr.max() < 21.5 and 8 < np.median(snr) < 12
    loud, quiet = snr[:100], snr[100:]
    assert abs(np.median(loud) - np.median(quiet)) < 3  # the same distribution, not 20 dB apart
    # active_rms is the speech's level (frames within 20 dB of the loudest), above the whole clip's RMS
    assert active_rms(word) > 1.2 * np.sqrt(np.mean(word**2))
    assert active_rms(np.zeros(16000, np.float32)) == 0.0
    silent = augment(np.zeros((3, 16000), np.float32), noise, config, np.random.default_rng(1))
    assert not silent.any()  # no speech level, no noise: digital silence stays silent
    assert AugmentConfig.from_dict({**config.to_dict(), "background_snr_db": [0, 20]}) == config
    with pytest.raises(ValueError, match="background_snr_db"):
        AugmentConfig(background_snr_db=(20.0, 0.0))


def test_room_and_microphone_colouring(shared_data):
    wave = fix_length(load_audio(sorted((shared_data / "off").iterdir())[0]), 16000)
    rng = np.random.default_rng(3)
    wet = reverberate(wave, rng, 0.6)
    assert wet.shape == wave.shape and wet.dtype == np.float32
    assert np.isclose(np.sum(wet**2), np.sum(wave**2), rtol=1e-3)  # same energy, other sound
    assert not np.allclose(wet, wave, atol=1e-3)
    # An impulse comes out first as itself (the direct path), then a decaying tail after it.
    impulse = np.zeros(16000, np.float32)
    impulse[1000] = 1.0
    response = reverberate(impulse, np.random.default_rng(4), 0.6)
    assert np.argmax(np.abs(response)) == 1000 and np.abs(response[:1000]).max() < 1e-6
    tail = np.abs(response[1200:])
    assert tail[:1000].mean() > 4 * tail[-1000:].mean()
    coloured = tilt(wave, np.random.default_rng(5))
    assert np.isclose(np.sum(coloured**2), np.sum(wave**2), rtol=1e-3) and not np.allclose(coloured, wave)
    config = AugmentConfig(background_probability=0, reverb_probability=1.0, eq_probability=1.0, time_shift_ms=0)
    np.testing.assert_array_equal(augment(wave[None], [], config, np.random.default_rng(9)),
                                  augment(wave[None], [], config, np.random.default_rng(9)))


def test_feature_cache_second_run_reads_cache(tmp_path, shared_data):
    dataset = SpeechCommands.open(shared_data)
    examples = dataset.examples(TaskConfig(), "validation")[::20]
    first = featurize(examples, cache_dir=tmp_path, show_progress=False)
    assert first.from_cache == 0 and first.features.shape == (len(examples), 98, 40)
    second = featurize(examples, cache_dir=tmp_path, show_progress=False)
    assert second.from_cache == len(examples)
    np.testing.assert_array_equal(first.features, second.features)
    # Another config is another cache; a partial hit computes only the rest.
    assert featurize(examples[:3], FeatureConfig(n_mfcc=13), cache_dir=tmp_path, show_progress=False).from_cache == 0
    more = dataset.examples(TaskConfig(), "validation")[::19]
    third = featurize(more, cache_dir=tmp_path, show_progress=False)
    assert 0 < third.from_cache < len(more)
    assert len(list(FeatureCache(tmp_path, FeatureConfig()).dir.glob("shard-*.npz"))) == 2


def test_featurize_skips_broken_files_and_reports_them(tmp_path, shared_data):
    from data_prep.dataset import Example

    good = next((shared_data / "go").iterdir())
    bad = tmp_path / "go" / "x_nohash_0.wav"
    bad.parent.mkdir()
    bad.write_bytes(b"garbage")
    out = featurize([Example(good, "go", "validation"), Example(bad, "go", "validation")], cache_dir=tmp_path,
                    show_progress=False)
    assert len(out.examples) == 1 and out.examples[0].path == good
    assert len(out.errors) == 1 and str(bad) in str(out.errors[0])


def librosa_reference_mfcc(waves: np.ndarray, config: FeatureConfig) -> np.ndarray:
    import librosa

    power = librosa.feature.melspectrogram(
        y=waves, sr=config.sample_rate, n_fft=config.window_samples, hop_length=config.hop_samples,
        window="hann", center=False, power=2.0, n_mels=config.n_mels, fmin=config.fmin, fmax=config.fmax,
    )
    coeffs = librosa.feature.mfcc(S=10 * np.log10(np.maximum(power, 1e-10)), n_mfcc=config.n_mfcc, norm="ortho")
    return np.swapaxes(coeffs, -1, -2)


@pytest.mark.parametrize("config", [FeatureConfig(), FeatureConfig(window_ms=25, hop_ms=20, n_mels=64, n_mfcc=20)])
def test_mfcc_equals_librosa_feature_mfcc(shared_data, config):
    """Our numpy MFCC is librosa's MFCC: within 5e-3 absolute on coefficients spanning hundreds."""
    files = [sorted((shared_data / w).iterdir())[1] for w in ("on", "right", "cat")]
    waves = np.stack([fix_length(load_audio(f), 16000) for f in files] + [np.zeros(16000, np.float32)])
    ours = mfcc(waves, config)
    assert ours.shape == (4, config.num_frames, config.n_mfcc)
    np.testing.assert_allclose(ours, librosa_reference_mfcc(waves, config), rtol=0, atol=5e-3)


@pytest.mark.parametrize("args", [(16000, 480, 40, 20.0, 7600.0), (16000, 400, 64, 0.0, 8000.0), (22050, 1024, 80, 30.0, 11025.0)])
def test_the_numpy_mel_filterbank_is_librosas(args):
    """Inference builds the filterbank without librosa (a 1-3 s import): it must be librosa's, bit for bit."""
    import librosa
    import scipy.signal

    from data_prep.features import mel_filterbank, mfcc_constants

    sr, n_fft, n_mels, fmin, fmax = args
    ours = mel_filterbank(sr, n_fft, n_mels, fmin, fmax)
    assert ours.dtype == np.float32 and ours.shape == (n_mels, n_fft // 2 + 1)
    np.testing.assert_array_equal(ours, librosa.filters.mel(sr=sr, n_fft=n_fft, n_mels=n_mels, fmin=fmin, fmax=fmax))
    config = FeatureConfig(sample_rate=sr, window_ms=1000 * n_fft / sr, n_mels=n_mels, n_mfcc=n_mels, fmin=fmin,
                           fmax=fmax)
    np.testing.assert_array_equal(mfcc_constants(config)["window"],
                                  scipy.signal.get_window("hann", n_fft, fftbins=True).astype(np.float32))


def test_stream_context_windows_follow_the_energy(shared_data):
    """Words cut as a sliding detector sees them: beside a neighbour, at a random offset. The label
    follows where the energy falls: the command, the neighbour command, or unknown for fragments."""
    from data_prep.augment import stream_context

    # labels: 0 _silence_, 1 _unknown_, 2 yes, 3 no
    is_command = np.array([False, False, True, True])
    clip = {w: fix_length(load_audio(sorted((shared_data / w).glob("*.flac"))[0]), 16000) for w in ("yes", "no", "bed")}
    pairs = {"yes beside bed": (clip["yes"], clip["bed"], 2, 1), "yes beside no": (clip["yes"], clip["no"], 2, 3),
             "bed beside no": (clip["bed"], clip["no"], 1, 3)}
    seen = {}
    for name, (a, b, la, lb) in pairs.items():
        for seed in range(60):
            window, label = stream_context(a, b, la, lb, np.random.default_rng(seed), is_command, 1)
            assert window.shape == (16000,) and np.all(np.abs(window) <= 1.0)
            assert np.abs(window).max() > 0.01  # speech inside (at least 100 ms of the word's)
            seen.setdefault(name, set()).add(label)
    again = stream_context(*pairs["yes beside no"][:4], np.random.default_rng(7), is_command, 1)
    first = stream_context(*pairs["yes beside no"][:4], np.random.default_rng(7), is_command, 1)
    np.testing.assert_array_equal(again[0], first[0])
    # a command keeps its label when most of it is inside, and becomes unknown when only a fragment is;
    # a neighbouring command can take the window; a window always holds speech, so never silence
    assert seen["yes beside bed"] == {1, 2}
    assert {2, 3} <= seen["yes beside no"] <= {1, 2, 3}
    assert {1, 3} <= seen["bed beside no"] <= {1, 3}
    assert clip["yes"].shape == (16000,)  # inputs untouched
    # words at a clip's very edge (speech in its last or first 50 ms, as a time shift leaves some
    # real clips): still a whole window, with speech in it
    late, early = np.zeros(16000, np.float32), np.zeros(16000, np.float32)
    late[-800:], early[:800] = clip["yes"][6000:6800], clip["yes"][6000:6800]
    for a, b in ((late, clip["no"]), (early, clip["no"]), (late, late), (early, early), (late, early)):
        for seed in range(40):
            window, _ = stream_context(a, b, 2, 3, np.random.default_rng(seed), is_command, 1)
            assert window.shape == (16000,) and np.abs(window).max() > 0


def test_negative_windows_are_cut_from_the_recordings():
    from speechrnn.train import cut_window

    rng = np.random.default_rng(0)
    recordings = [rng.standard_normal(40000).astype(np.float32), rng.standard_normal(9000).astype(np.float32)]

    def cut_windows(seed):
        gen = np.random.default_rng(seed)
        cuts = [cut_window(recordings, [True, False], 16000, gen) for _ in range(50)]
        return np.stack([w for w, _ in cuts]), [r for _, r in cuts]

    windows, real = cut_windows(3)
    assert windows.shape == (50, 16000) and set(real) == {True, False}
    for w, is_real in zip(windows, real, strict=True):
        if is_real:  # a slice of the long recording
            starts = np.flatnonzero(recordings[0][:24001] == w[0])
            assert any(np.array_equal(w, recordings[0][s : s + 16000]) for s in starts)
        else:  # the short one, zero-padded
            np.testing.assert_array_equal(w[:9000], recordings[1])
            assert not w[9000:].any()
    np.testing.assert_array_equal(cut_windows(3)[0], windows)
    int16 = [np.round(r.clip(-1, 1) * 32767).astype(np.int16) for r in recordings]  # as training keeps them
    window, _ = cut_window(int16, [True, False], 16000, np.random.default_rng(5))
    assert window.dtype == np.float32 and np.abs(window).max() <= 1.0


def yes_clip(shared_data) -> np.ndarray:
    return fix_length(load_audio(sorted((shared_data / "yes").iterdir())[0]), 16000)


@pytest.mark.parametrize("scale", [32767, 1e15, 1e20, 1e30])
def test_samples_far_outside_full_scale_are_refused(tmp_path, shared_data, scale):
    """A float WAV of a real "yes" scaled as int16 values (or far more) is refused, whole or streamed,
    with one line that names the file, the level and the likely cause; a little over 1 is read."""
    clip = yes_clip(shared_data)
    path = tmp_path / "loud.wav"
    sf.write(path, (clip.astype(np.float64) * scale).astype(np.float32), 16000, subtype="FLOAT")
    for read in (lambda: load_audio(path), lambda: list(stream_audio(path, block_seconds=0.05)[1])):
        with pytest.raises(SpeechRNNError) as err:
            read()
        message = str(err.value)
        assert message.startswith(f"{path}: samples reach ") and "far outside [-1, 1]" in message
        assert "integer sample values stored as float" in message and "\n" not in message
    sf.write(path, clip / np.abs(clip).max() * 0.99 * MAX_ABS_SAMPLE, 16000, subtype="FLOAT")
    assert np.abs(load_audio(path)).max() > 1.0  # over full scale, within the tolerance: read as it is


def test_mfcc_is_finite_for_any_finite_input(shared_data):
    """float32 power spectra overflow from about 1e17 in amplitude; the features must not, and a louder
    copy of a clip must give the same features with the level (c0) raised by exactly its gain."""
    config = FeatureConfig()
    clip = yes_clip(shared_data)
    reference = mfcc(clip, config)
    for scale in (32767, 1e15, 1e20, 1e30, float(np.finfo(np.float32).max) / float(np.abs(clip).max())):
        loud = (clip.astype(np.float64) * scale).astype(np.float32)
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # no overflow or invalid-value warnings either
            feats = mfcc(loud, config)
            batch = mfcc(np.stack([clip, loud, np.zeros_like(clip)]), config)
        assert np.all(np.isfinite(feats)) and np.all(np.isfinite(batch)), scale
        np.testing.assert_allclose(feats[:, 1:], reference[:, 1:], atol=1e-3)
        # c0 of the orthonormal DCT is the sum of the log-mel bands / sqrt(n_mels)
        gain_db = 20 * np.log10(np.float64(loud[np.argmax(np.abs(clip))]) / clip[np.argmax(np.abs(clip))])
        np.testing.assert_allclose(feats[:, 0] - reference[:, 0], gain_db * np.sqrt(config.n_mels), rtol=1e-5)
        np.testing.assert_allclose(batch[0], reference, atol=1e-3)  # the quiet rows are untouched by the loud one
        np.testing.assert_allclose(batch[2], mfcc(np.zeros_like(clip), config), atol=1e-3)


def test_names_that_are_not_utf8_are_read(tmp_path, shared_data):
    """A good WAV whose name is raw bytes (Latin-1, as on old disks) is read like any other; a bad one
    fails for what is wrong with its content, not with its name."""
    clip = yes_clip(shared_data)
    good = os.fsdecode(bytes(tmp_path) + b"/caf\xe9_yes.wav")  # surrogate escapes, as argv gives it
    sf.write(os.fsencode(good), clip, 16000)
    np.testing.assert_allclose(load_audio(good), clip, atol=1e-4)
    seconds, blocks = stream_audio(good)
    assert seconds == 1.0 and sum(len(b) for b in blocks) == 16000
    bad = os.fsdecode(bytes(tmp_path) + b"/\xff\xfe_notes.wav")
    with open(os.fsencode(bad), "wb") as fh:
        fh.write(b"not audio " * 50)
    with pytest.raises(SpeechRNNError) as err:
        load_audio(bad)
    assert err.value.reason == "cannot decode audio (Format not recognised)"


def test_truncated_wav_is_read_with_a_warning(tmp_path, shared_data, caplog):
    """A WAV cut to half its length (its header still announces all of it): what is there, and a
    warning that says so; an intact file: no warning."""
    clip = yes_clip(shared_data)
    full, cut = tmp_path / "full.wav", tmp_path / "cut.wav"
    sf.write(full, clip, 16000, subtype="PCM_16")
    data = full.read_bytes()
    cut.write_bytes(data[: 44 + (len(data) - 44) // 2])
    with caplog.at_level(logging.WARNING):
        assert len(load_audio(full)) == 16000
        assert not caplog.records
        assert len(load_audio(cut)) == 8000
    assert [r.getMessage() for r in caplog.records] == [
        f"{cut}: the file ends early: its header announces 1.00 s of audio, it holds 0.50 s (truncated?); "
        "using what is there"]
