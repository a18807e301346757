"""search/data.py (the packed cache, splits, batches) and search/layout.py (the HW4 JSON, feature files)."""

from __future__ import annotations

import fcntl
import json
import os
import pickle
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from search.data import (
    PAD_VALUE,
    CropSampler,
    FeatureStore,
    PackedData,
    eval_batches,
    make_split,
    pack,
)
from search.errors import UserError
from search.layout import load_feature, read_layout
from tests.hw4fake import make_hw4


@pytest.fixture
def hw4(tmp_path: Path) -> Path:
    return make_hw4(tmp_path / "Dataset")


def _edit_json(path: Path, edit: Callable[[Any], Any]) -> None:
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))


def test_reads_layout_with_unsorted_ids(hw4: Path) -> None:
    layout = read_layout(hw4)
    mapping = json.loads((hw4 / "mapping.json").read_text())
    assert layout.n_mels == 40
    assert len(layout.speakers) == 4 and len(layout.train) == 24 and len(layout.test) == 5
    for sid, name in enumerate(layout.speakers):
        assert mapping["speaker2id"][name] == sid
    assert all(u.label == -1 for u in layout.test)


def _first_train_file(root: Path) -> str:
    meta = json.loads((root / "metadata.json").read_text())
    return next(iter(meta["speakers"].values()))[0]["feature_path"]


@pytest.mark.parametrize(
    ("mutate", "expected"),
    [
        (lambda r: (r / "metadata.json").unlink(), "metadata.json: file not found"),
        (lambda r: (r / "mapping.json").write_text("{not json"), "mapping.json: not valid JSON"),
        (lambda r: _edit_json(r / "metadata.json", lambda d: d.pop("n_mels")), "missing key 'n_mels'"),
        (lambda r: _edit_json(r / "mapping.json", lambda d: d.pop("id2speaker")), "missing key 'id2speaker'"),
        (
            lambda r: _edit_json(r / "metadata.json", lambda d: d["speakers"].update({"id99999": []})),
            "speaker 'id99999' is absent from mapping.json",
        ),
        (
            lambda r: _edit_json(r / "testdata.json", lambda d: d.update({"n_mels": 80})),
            "testdata.json: n_mels 80 does not match",
        ),
        (
            lambda r: _edit_json(r / "testdata.json", lambda d: d["utterances"][0].pop("mel_len")),
            "missing key 'utterances[0].mel_len'",
        ),
        (lambda r: _edit_json(r / "metadata.json", lambda d: d.update({"n_mels": True})), "got True"),
        (
            lambda r: _edit_json(
                r / "testdata.json", lambda d: d["utterances"].__setitem__(1, d["utterances"][0])
            ),
            "is listed twice (testdata.json utterances[0] and testdata.json utterances[1])",
        ),
    ],
)
def test_layout_errors_name_file_and_problem(hw4: Path, mutate: Callable[[Path], Any], expected: str) -> None:
    mutate(hw4)
    with pytest.raises(UserError) as info:
        pack(hw4, hw4.parent / "cache", progress=False)
    assert expected in str(info.value)
    assert "\n" not in str(info.value)


def test_pack_gives_the_index_digest_a_study_records(hw4: Path) -> None:
    from search.data import index_digest

    data = pack(hw4, hw4.parent / "cache", progress=False)
    assert data.index_digest == index_digest(hw4) and len(data.index_digest) == 16


def test_missing_feature_file(hw4: Path) -> None:
    name = _first_train_file(hw4)
    (hw4 / name).unlink()
    with pytest.raises(UserError, match=f"{name}: feature file not found; metadata.json .* delete its entry"):
        pack(hw4, hw4.parent / "cache", progress=False)


@pytest.mark.parametrize(
    ("payload", "expected"),
    [
        (torch.zeros(10), "expected (mel_len, 40)"),
        (torch.zeros(3, 40, dtype=torch.long), "tensor of int64 values, expected floating point"),
        (torch.zeros(3, 40).to_sparse(), "holds a sparse_coo tensor, expected a dense (mel_len, 40)"),
        (torch.empty(3, 40, device="meta"), "holds a meta (value-less) tensor, expected a dense"),
        (torch.zeros(10, 80), "n_mels mismatch"),
        (torch.zeros(3, 40), "but the metadata says mel_len"),
        ({"a": 1}, "holds a dict"),
        (b"garbage", "unreadable tensor file"),
    ],
)
def test_bad_tensor_files(hw4: Path, payload: object, expected: str) -> None:
    name = _first_train_file(hw4)
    if isinstance(payload, bytes):
        (hw4 / name).write_bytes(payload)
    else:
        torch.save(payload, hw4 / name)
    with pytest.raises(UserError) as info:
        pack(hw4, hw4.parent / "cache", progress=False)
    assert name in str(info.value) and expected in str(info.value)


class _Evil:
    def __reduce__(self) -> tuple[Any, ...]:
        return (os.system, ("touch pwned",))


def test_pickle_payload_is_refused_not_run(tmp_path: Path) -> None:
    path = tmp_path / "evil.pt"
    with path.open("wb") as fh:
        pickle.dump(_Evil(), fh)
    with pytest.raises(UserError, match="unreadable tensor file"):
        load_feature(path, 40)
    assert not (tmp_path / "pwned").exists()


def test_pack_matches_files_and_is_reused(hw4: Path) -> None:
    cache = hw4.parent / "cache"
    data = pack(hw4, cache, progress=False)
    layout = read_layout(hw4)
    assert data.features.dtype == np.float16
    for i, utt in enumerate([*layout.train, *layout.test]):
        assert data.ids[i] == utt.feature_path
        expected = torch.load(hw4 / utt.feature_path, weights_only=True).numpy()
        np.testing.assert_allclose(data.utterance(i), expected, atol=0.02)
    assert (data.labels >= 0).sum() == 24 and (data.labels == -1).sum() == 5
    stamp = (data.cache_dir / "features.npy").stat().st_mtime_ns
    again = pack(hw4, cache, progress=False)
    assert again.cache_dir == data.cache_dir
    assert (again.cache_dir / "features.npy").stat().st_mtime_ns == stamp  # reused, not re-packed


def test_changed_set_is_repacked(hw4: Path) -> None:
    cache = hw4.parent / "cache"
    first = pack(hw4, cache, progress=False)
    name = _first_train_file(hw4)
    tensor = torch.load(hw4 / name, weights_only=True)
    torch.save(tensor + 1.0, hw4 / name)
    second = pack(hw4, cache, progress=False)
    assert second.fingerprint != first.fingerprint
    index = second.ids.index(name)
    np.testing.assert_allclose(second.utterance(index), first.utterance(index) + 1.0, atol=0.05)


def test_features_saved_in_any_float_form_pack_to_the_same_set(hw4: Path) -> None:
    """A feature file is torch.save of whatever tensor the extractor made: float64, a transposed view
    (dvector's ``.squeeze(0).T``), or one that still requires grad. Each packs like plain float32 (the
    last one ended packing in a traceback)."""
    cache = hw4.parent / "cache"
    plain = pack(hw4, cache, progress=False)
    meta = json.loads((hw4 / "metadata.json").read_text())
    names = [u["feature_path"] for u in next(iter(meta["speakers"].values()))[:3]]
    forms = (
        lambda t: t.double(),
        lambda t: t.T.contiguous().T,
        lambda t: t.clone().requires_grad_(),
    )
    for name, form in zip(names, forms, strict=True):
        torch.save(form(torch.load(hw4 / name, weights_only=True)), hw4 / name)
    again = pack(hw4, cache, progress=False)
    assert again.fingerprint == plain.fingerprint  # the same values, so the same set
    np.testing.assert_array_equal(np.asarray(again.features), np.asarray(plain.features))


def test_values_beyond_float16_are_refused_and_bfloat16_packs(hw4: Path) -> None:
    """The cache holds float16: a value past 65504 (linear power, not log-mel) became inf there, and the
    model's NaN logits predicted the first speaker without a word. bfloat16 (no numpy dtype) raised."""
    first, second = [
        u["feature_path"]
        for u in next(iter(json.loads((hw4 / "metadata.json").read_text())["speakers"].values()))[:2]
    ]
    tensor = torch.load(hw4 / first, weights_only=True)
    torch.save(tensor.bfloat16(), hw4 / first)
    packed = pack(hw4, hw4.parent / "cache", progress=False)
    expected = tensor.bfloat16().float().numpy()
    np.testing.assert_allclose(packed.utterance(packed.ids.index(first)), expected, rtol=1e-3, atol=1e-3)
    loud = torch.load(hw4 / second, weights_only=True)
    loud[0, 0] = 65519.0  # float16 rounds it to 65504: packed as such
    torch.save(loud, hw4 / second)
    pack(hw4, hw4.parent / "cache", progress=False)
    loud[0, 0] = 70000.0
    torch.save(loud, hw4 / second)
    with pytest.raises(UserError, match=f"{second}: holds 70000, beyond float16's range .* log-mel"):
        pack(hw4, hw4.parent / "cache", progress=False)
    for bad in (float("nan"), float("-inf")):
        loud[0, 0] = bad
        torch.save(loud, hw4 / second)
        with pytest.raises(UserError, match=f"{second}: tensor holds NaN or infinite values"):
            pack(hw4, hw4.parent / "cache", progress=False)


def test_a_cache_packed_with_inf_before_the_range_check_is_packed_again(hw4: Path) -> None:
    """A cache is reused while its set's files are unchanged: one that an earlier version packed with
    inf (a value past float16's range) went on predicting the first speaker."""
    packed = pack(hw4, hw4.parent / "cache", progress=False)
    meta_path = packed.cache_dir / "meta.json"
    meta = json.loads(meta_path.read_text())
    assert meta.pop("finite") is True  # checked as it was packed
    meta_path.write_text(json.dumps(meta))  # as earlier versions wrote it
    assert pack(hw4, hw4.parent / "cache", progress=False).cache_dir == packed.cache_dir
    assert json.loads(meta_path.read_text())["finite"] is True  # checked once, then recorded
    meta_path.write_text(json.dumps(meta))
    features = np.load(packed.cache_dir / "features.npy", mmap_mode="r+")
    features[3, 5] = np.inf
    features.flush()
    del features
    again = pack(hw4, hw4.parent / "cache", progress=False)
    assert again.cache_dir == packed.cache_dir and np.isfinite(np.asarray(again.features)).all()
    assert again.fingerprint == packed.fingerprint  # packed again from the same files


def _copy_with_new_times(src: Path, dst: Path) -> Path:
    """A copy as scp, cp -r or a cloud download makes it: same bytes, every file with another mtime."""
    shutil.copytree(src, dst, copy_function=shutil.copyfile)
    for path in dst.iterdir():
        os.utime(path, ns=(1_000_000_000, 1_000_000_000))
    return dst


def test_a_copy_with_new_file_times_is_the_same_set(hw4: Path) -> None:
    """The set's identity was a hash of its files' sizes and mtimes: a copy that did not keep the times
    was "another data set" to every study, checkpoint and export made on the original. The copy is
    packed into a cache of its own (the key still reads the times) but has the same fingerprint and
    split."""
    cache = hw4.parent / "cache"
    first = pack(hw4, cache, progress=False)
    copy = pack(_copy_with_new_times(hw4, hw4.parent / "copy"), cache, progress=False)
    assert copy.cache_dir != first.cache_dir
    assert copy.fingerprint == first.fingerprint
    assert make_split(copy, 0.25, 0).split_id == make_split(first, 0.25, 0).split_id
    name = _first_train_file(hw4)  # and a changed frame in the copy is another set
    tensor = torch.load(hw4 / name, weights_only=True)
    tensor[0, 0] += 1.0
    torch.save(tensor, hw4.parent / "copy" / name)
    assert pack(hw4.parent / "copy", cache, progress=False).fingerprint != first.fingerprint


def test_failed_pack_leaves_no_cache(hw4: Path) -> None:
    cache = hw4.parent / "cache"
    torch.save(torch.zeros(5), hw4 / _first_train_file(hw4))
    with pytest.raises(UserError):
        pack(hw4, cache, progress=False)
    assert not cache.exists() or not any(cache.iterdir())  # the temp folder was removed too


def test_split_is_deterministic_and_stratified(fake_data: PackedData) -> None:
    a = make_split(fake_data, 0.2, seed=3)
    b = make_split(fake_data, 0.2, seed=3)
    c = make_split(fake_data, 0.2, seed=4)
    assert np.array_equal(a.valid, b.valid) and a.split_id == b.split_id
    assert a.split_id != c.split_id
    assert set(a.train).isdisjoint(a.valid)
    assert set(a.train) | set(a.valid) == set(fake_data.labelled)
    valid_speakers = set(fake_data.labels[a.valid])
    assert valid_speakers == set(range(fake_data.n_speakers))  # every speaker validates
    per_speaker = np.bincount(fake_data.labels[a.valid])
    assert (per_speaker == 1).all()  # round(0.2 * 6) = 1


def test_a_set_with_nothing_to_validate_on_is_refused(tmp_path: Path) -> None:
    """One labelled utterance per speaker leaves no validation set: refused, not scored 0.0."""
    data = pack(make_hw4(tmp_path / "Dataset", per_speaker=1), tmp_path / "cache", progress=False)
    with pytest.raises(UserError, match="no speaker has 2 or more labelled utterances"):
        make_split(data)


def test_crop_batches_pad_and_mask(fake_data: PackedData) -> None:
    store = FeatureStore(fake_data)
    split = make_split(fake_data)
    sampler = CropSampler(store, split.train, batch_size=64, segment_len=128, seed=0)
    x, lengths, labels = sampler.next()
    assert x.shape == (64, 128, 40) and x.dtype == torch.float32
    assert (lengths <= 128).all() and (lengths >= 60).all()
    train_set = set(split.train.tolist())
    for b in range(64):
        n = int(lengths[b])
        assert (x[b, n:] == PAD_VALUE).all()
        # the crop is a contiguous slice of one training utterance of the right speaker
        found = False
        for i in np.flatnonzero(fake_data.labels == int(labels[b])):
            if i not in train_set:
                continue
            full = torch.from_numpy(fake_data.utterance(int(i)))
            if len(full) < n:
                continue
            windows = full.unfold(0, n, 1).permute(0, 2, 1)
            if (windows == x[b, :n]).all(dim=(1, 2)).any():
                found = True
                break
        assert found
    short = [b for b in range(64) if lengths[b] < 128]
    assert short, "the fake set has utterances shorter than the crop; some must be kept whole"


def test_crop_sampler_is_seeded(fake_data: PackedData) -> None:
    store = FeatureStore(fake_data)
    split = make_split(fake_data)
    a = CropSampler(store, split.train, 8, 50, seed=1).next()
    b = CropSampler(store, split.train, 8, 50, seed=1).next()
    assert all(torch.equal(p, q) for p, q in zip(a, b, strict=True))
    # and by that seed: trials (each seeded by its number) must not all train on the same crops
    c = CropSampler(store, split.train, 8, 50, seed=2).next()
    assert not all(torch.equal(p, q) for p, q in zip(a, c, strict=True))


def test_eval_batches_cover_everything_under_budget(fake_data: PackedData) -> None:
    store = FeatureStore(fake_data)
    indices = fake_data.labelled
    seen: list[int] = []
    for batch, x, lengths in eval_batches(store, indices, frame_budget=1000):
        assert x.shape[0] * x.shape[1] <= 1000 or x.shape[0] == 1
        assert int(lengths.max()) == x.shape[1]
        for row, i in enumerate(batch):
            n = int(fake_data.lengths[i])
            np.testing.assert_array_equal(x[row, :n].numpy(), fake_data.utterance(int(i)))
            assert (x[row, n:] == PAD_VALUE).all()
        seen.extend(int(i) for i in batch)
    assert sorted(seen) == sorted(indices.tolist())


def test_missing_data_dir(tmp_path: Path) -> None:
    afile = tmp_path / "afile"
    afile.write_text("x")
    with pytest.raises(UserError, match="afile: is a file, not a folder; pass --data DIR"):
        read_layout(afile)
    with pytest.raises(UserError, match="data directory not found"):
        pack(tmp_path / "nope", progress=False)


def test_damaged_cache_is_reported(hw4: Path) -> None:
    cache = hw4.parent / "cache"
    data = pack(hw4, cache, progress=False)
    (data.cache_dir / "features.npy").write_bytes(b"junk")
    with pytest.raises(UserError, match="packed cache is damaged"):
        pack(hw4, cache, progress=False)
    shutil.rmtree(data.cache_dir)
    data = pack(hw4, cache, progress=False)
    # A meta.json without one of its keys was a KeyError traceback.
    meta = json.loads((data.cache_dir / "meta.json").read_text())
    del meta["speakers"]
    (data.cache_dir / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(
        UserError, match=r"packed cache is damaged \(missing 'speakers'\); delete that folder"
    ):
        pack(hw4, cache, progress=False)
    shutil.rmtree(data.cache_dir)
    assert pack(hw4, cache, progress=False).fingerprint == data.fingerprint


def test_host_resident_store_gives_the_same_batches(fake_data: PackedData) -> None:
    """The pinned, double-buffered path (features too big for the GPU) yields exactly the same crops."""
    split = make_split(fake_data)
    on_device = CropSampler(FeatureStore(fake_data), split.train, 16, 64, seed=5)
    host = FeatureStore(fake_data, resident=False)
    assert not host.resident
    from_host = CropSampler(host, split.train, 16, 64, seed=5)
    for _ in range(3):
        a, b = on_device.next(), from_host.next()
        assert all(torch.equal(p, q) for p, q in zip(a, b, strict=True))
    resumed = CropSampler(host, split.train, 16, 64, seed=0)
    resumed.set_state(from_host.state(), step=3)
    assert all(torch.equal(p, q) for p, q in zip(resumed.next(), on_device.next(), strict=True))
    whole = [x for _, x, _ in eval_batches(host, fake_data.labelled, 2000)]
    again = [x for _, x, _ in eval_batches(FeatureStore(fake_data), fake_data.labelled, 2000)]
    assert all(torch.equal(p, q) for p, q in zip(whole, again, strict=True))


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs /proc: no one can write there, root too")
def test_a_cache_folder_that_cannot_be_written_is_one_line(hw4: Path) -> None:
    """A read-only studies/ gave an OSError traceback from deep inside the packing."""
    with pytest.raises(UserError, match="^/proc/nope: cannot write the packed feature cache there"):
        pack(hw4, Path("/proc/nope"), progress=False)


def test_a_speaker_given_twice_in_metadata_is_refused(hw4: Path) -> None:
    """JSON keeps a repeated key's last copy: one speaker's utterances vanished, another's were relabelled."""
    meta = hw4 / "metadata.json"
    first, second = list(json.loads(meta.read_text())["speakers"])[:2]
    meta.write_text(meta.read_text().replace(f'"{second}"', f'"{first}"'))
    with pytest.raises(UserError, match=f"metadata.json: key '{first}' appears twice in one object"):
        pack(hw4, hw4.parent / "cache", progress=False)


def test_a_feature_path_in_both_lists_names_it_and_its_places(hw4: Path) -> None:
    name = _first_train_file(hw4)
    _edit_json(hw4 / "testdata.json", lambda d: d["utterances"][2].update({"feature_path": name}))
    speaker = next(iter(json.loads((hw4 / "metadata.json").read_text())["speakers"]))
    with pytest.raises(UserError) as info:
        read_layout(hw4)
    assert str(info.value) == (
        f"{hw4}: feature_path {name} is listed twice (metadata.json speakers.{speaker}[0] and "
        "testdata.json utterances[2]); each utterance needs its own file: delete one entry"
    )


def test_a_mel_len_its_file_cannot_hold_is_refused_before_packing(hw4: Path) -> None:
    """A length in samples (x160) sized the cache before any file was read: terabytes, or a traceback."""
    _edit_json(
        hw4 / "metadata.json", lambda d: next(iter(d["speakers"].values()))[0].update({"mel_len": 10**14})
    )
    cache = hw4.parent / "cache"
    with pytest.raises(
        UserError, match=r"tensor has \d+ frames but the metadata says mel_len 100000000000000"
    ):
        pack(hw4, cache, progress=False)
    assert not cache.exists() or not any(cache.iterdir())


def test_a_feature_path_that_is_a_link_loop_or_a_folder_is_one_line(hw4: Path) -> None:
    name = _first_train_file(hw4)
    (hw4 / name).unlink()
    (hw4 / name).symlink_to(hw4 / name)
    with pytest.raises(UserError, match=f"{name}: cannot read \\(Too many levels of symbolic links\\)"):
        pack(hw4, hw4.parent / "cache", progress=False)
    (hw4 / name).unlink()
    (hw4 / name).mkdir()
    with pytest.raises(UserError, match=f"{name}: not a file"):
        pack(hw4, hw4.parent / "cache", progress=False)


def test_the_cache_is_readable_by_other_users(hw4: Path) -> None:
    """mkdtemp made each cache folder 0700: another user of a shared studies/ (the Docker set-up's
    worker) could not open the set."""
    from search.files import umask

    data = pack(hw4, hw4.parent / "cache", progress=False)
    assert data.cache_dir.stat().st_mode & 0o777 == 0o777 & ~umask()


def test_an_unreadable_cache_is_one_line(hw4: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """What a user meets in a cache another user packed private (as every one was before)."""
    data = pack(hw4, hw4.parent / "cache", progress=False)
    real_stat = Path.stat

    def stat(self: Path, **kwargs: Any) -> os.stat_result:  # what the kernel answers another user
        if self.parent == data.cache_dir:
            raise PermissionError(13, "Permission denied", str(self))
        return real_stat(self, **kwargs)

    monkeypatch.setattr(Path, "stat", stat)
    monkeypatch.setattr(Path, "exists", lambda self, **kw: False)  # as from Python 3.14: EACCES is "absent"
    with pytest.raises(
        UserError, match=f"^{data.cache_dir}: cannot read this packed cache .*chmod -R a\\+rX"
    ):
        pack(hw4, hw4.parent / "cache", progress=False)


_KILLED_WHILE_PACKING = """
import sys, time
from pathlib import Path
import search.data as d
real, calls = d.load_feature, []
def slow(*args, **kwargs):
    calls.append(1)
    if len(calls) == 3:
        Path(sys.argv[2]).write_text("packing")
        time.sleep(120)
    return real(*args, **kwargs)
d.load_feature = slow
d.pack(Path(sys.argv[1]), Path(sys.argv[3]), progress=False)
"""


_PACK_IN_A_PROCESS = """
import sys
from pathlib import Path
import search.data as d
built = []
real = d._build_cache
d._build_cache = lambda *args: built.append(1) or real(*args)
data = d.pack(Path(sys.argv[1]), Path(sys.argv[2]), progress=True)
print("built" if built else "reused", data.cache_dir)
"""


def test_a_second_command_packing_the_same_set_waits_and_uses_the_first_ones(
    hw4: Path, tmp_path: Path
) -> None:
    """Workers started together (Docker's, two runs) each packed the set in full at once: for HW4, twice
    the 6.85 GB read and twice 3.4 GB of temp files, and one packing thrown away."""
    from search.data import _build_cache, _hash_of_json, cache_key
    from search.files import one_at_a_time

    cache = tmp_path / "cache"
    cache.mkdir()
    layout = read_layout(hw4)
    sizes: list[int] = []
    key = cache_key(layout, _hash_of_json(layout), sizes)
    said = tmp_path / "stderr.txt"
    with one_at_a_time(cache / f".{key}.packing-turn"), said.open("w") as err_file:  # a first one packs
        proc = subprocess.Popen(
            [sys.executable, "-c", _PACK_IN_A_PROCESS, str(hw4), str(cache)],
            stdout=subprocess.PIPE,
            stderr=err_file,
            text=True,
        )
        deadline = time.monotonic() + 120
        while "waiting for another command that is packing" not in said.read_text():
            assert proc.poll() is None and time.monotonic() < deadline, said.read_text()
            time.sleep(0.1)
        _build_cache(layout, key, cache / key, False, sizes)  # the first command's packing
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, said.read_text()
    assert out.split() == ["reused", str(cache / key)]  # the first one's packing, not a second one
    assert sorted(p.name for p in cache.iterdir()) == [key]  # no lock file or temp folder left


def test_a_packing_killed_outright_is_swept_by_the_next(hw4: Path, tmp_path: Path) -> None:
    """SIGKILL (the OOM killer) left a hidden partial copy of the set (3.4 GB for HW4) for good."""
    from search.data import PACKING_LOCK, sweep_abandoned_packings

    cache, ready = tmp_path / "cache", tmp_path / "ready"
    proc = subprocess.Popen([sys.executable, "-c", _KILLED_WHILE_PACKING, str(hw4), str(ready), str(cache)])
    try:
        deadline = time.monotonic() + 120
        while not ready.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert ready.exists(), "the packing never started"
        (live,) = [p for p in cache.iterdir() if p.name.startswith(".") and p.is_dir()]
        assert (live / PACKING_LOCK).exists() and (live / "features.npy").exists()
        assert sweep_abandoned_packings(cache) == [] and live.exists()  # alive: its lock is held
    finally:
        proc.kill()
        proc.wait()
    data = pack(hw4, cache, progress=False)
    assert sorted(p.name for p in cache.iterdir()) == [data.cache_dir.name]  # the dead one's folder is gone
    assert sorted(p.name for p in data.cache_dir.iterdir()) == ["features.npy", "index.npz", "meta.json"]


@pytest.mark.parametrize(
    ("fs", "shared"), [("ext4", False), ("nfs4", True), ("fuse.rclone", True), (None, True)]
)
def test_dead_packings_are_swept_by_their_lock_and_on_shared_file_systems_by_host_and_pid_too(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fs: str | None, shared: bool
) -> None:
    """On a local disk flock decides (a container made anew has another host name, or the dead one's
    pid). On a network file system flock may be local to each machine (NFS with local_lock, FUSE): a
    folder is removed only when it also names this host and a process that is gone."""
    import search.data
    from search.data import PACKING_LOCK, _host, sweep_abandoned_packings

    monkeypatch.setattr(search.data, "filesystem_type", lambda path: fs)  # None: no /proc/mounts
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    gone = int(dead.stdout)  # a pid that has just exited

    def packing(pid: int, host: str, lock: bool, tag: str) -> Path:
        folder = tmp_path / f".0123456789abcdef-{pid}@{host}-{tag:_<8}"
        folder.mkdir()
        (folder / "features.npy").write_bytes(b"partial")
        if lock:
            (folder / PACKING_LOCK).touch()
        return folder

    abandoned = packing(gone, _host(), True, "dead")
    elsewhere = packing(gone, "another-host", True, "remote")  # its lock may be another kernel's to see
    mine = packing(os.getpid(), _host(), True, "mypid")  # a restarted container's pid
    lockless = packing(gone, _host(), False, "nolock")  # killed before its lock file, or no flock here
    held = packing(gone, _host(), True, "held")  # the process is gone but the lock is held (a fork of it)
    fd = os.open(held / PACKING_LOCK, os.O_RDWR)
    fcntl.flock(fd, fcntl.LOCK_EX)
    other = tmp_path / ".not-a-packing"
    other.mkdir()
    try:
        removed = sweep_abandoned_packings(tmp_path)
    finally:
        os.close(fd)
    assert sorted(removed) == sorted([abandoned] if shared else [abandoned, elsewhere, mine])
    assert all(f.exists() for f in (lockless, held, other)) and not abandoned.exists()
    assert elsewhere.exists() == mine.exists() == shared


def test_a_note_names_speakers_that_are_never_validated(tmp_path: Path, fake_data: PackedData) -> None:
    from search.data import unvalidated_note

    assert unvalidated_note(fake_data) is None
    root = make_hw4(tmp_path / "Dataset")
    speakers = json.loads((root / "metadata.json").read_text())["speakers"]
    lone = list(speakers)[:3]
    _edit_json(
        root / "metadata.json", lambda d: [d["speakers"].update({s: d["speakers"][s][:1]}) for s in lone]
    )
    data = pack(root, tmp_path / "cache", progress=False)
    assert unvalidated_note(data) == (
        f"3 of the 4 speakers in {root} have one labelled utterance: they are trained on but never "
        "validated, so validation accuracy leaves them out"
    )
    assert set(data.labels[make_split(data).valid]) == {
        data.speakers.index(s) for s in speakers if s not in lone
    }
