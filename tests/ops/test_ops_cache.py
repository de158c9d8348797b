"""The run cache: content keys, verified hits, corrupted entries removed, plain files only."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

from qlorax import __version__
from qlorax.artifacts import check_run_dir, load_manifest
from qlorax.errors import OutputError
from qlorax.ops.cache import CacheCorruptionWarning, CacheManager, default_cache_dir


def _key(cache: CacheManager, seed: int = 0) -> str:
    return cache.key_for(f"{seed:064x}", {"train.jsonl": "a" * 64}, "b" * 64, __version__, "strict")


def test_key_covers_every_input(tmp_path: Path) -> None:
    cache = CacheManager(tmp_path / "cache")
    base = dict(
        config_hash="1" * 64,
        data_digests={"train.jsonl": "a" * 64},
        model_digest="b" * 64,
        version="0.1.0",
        profile="strict",
    )
    key = cache.key_for(**base)
    assert len(key) == 64 and key == cache.key_for(**base)
    for field, other in [
        ("config_hash", "2" * 64),
        ("data_digests", {"train.jsonl": "c" * 64}),
        ("model_digest", "d" * 64),
        ("version", "0.2.0"),
        ("profile", "portable"),
    ]:
        assert cache.key_for(**{**base, field: other}) != key, field


def test_key_material_travels_with_the_key_to_another_manager(tmp_path: Path, synthetic_run) -> None:
    """`qlorax train` computes the key and stores the run through different CacheManagers."""
    key = CacheManager(tmp_path / "cache").key_for("1" * 64, {"train": "a" * 64}, "b" * 64, __version__, "portable")
    CacheManager(tmp_path / "cache").store(key, synthetic_run("run"))
    [entry] = CacheManager(tmp_path / "cache").entries()
    assert (entry["key"], entry["profile"], entry["config_hash"]) == (key, "portable", "1" * 64)
    assert json.loads((tmp_path / "cache" / "entries" / key / "entry.json").read_text())["material"] == key.material


def test_default_cache_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("QLORAX_CACHE_DIR", str(tmp_path / "elsewhere"))
    assert default_cache_dir() == tmp_path / "elsewhere"
    assert CacheManager().cache_dir == tmp_path / "elsewhere"
    monkeypatch.delenv("QLORAX_CACHE_DIR")
    monkeypatch.setenv("QLORAX_HOME", str(tmp_path / "home"))
    assert default_cache_dir() == tmp_path / "home" / "runs"  # one home: the cache follows it
    monkeypatch.delenv("QLORAX_HOME")
    assert default_cache_dir() == Path.home() / ".cache" / "qlorax" / "runs"


def test_store_lookup_restore_round_trip(tmp_path: Path, synthetic_run) -> None:
    run = synthetic_run("run")
    cache = CacheManager(tmp_path / "cache")
    key = _key(cache)
    assert cache.lookup(key) is None
    stored = cache.store(key, run)
    assert cache.lookup(key) == stored
    # only the manifest's files: no checkpoints, no lock, and nothing pickled
    names = sorted(p.relative_to(stored).as_posix() for p in stored.rglob("*") if p.is_file())
    assert names == sorted([*load_manifest(run)["files"], "artifact_summary.json"])
    assert not any(n.endswith((".pkl", ".pickle", ".pt", ".bin")) for n in names)

    output = tmp_path / "restored"
    output.mkdir()
    (output / ".qlorax.lock").write_text("42\n")  # train holds its lock while restoring
    assert cache.restore(key, output) is True
    assert check_run_dir(output).intact
    original, restored = load_manifest(run), load_manifest(output)
    assert restored == original
    assert restored["deterministic_digest"] == original["deterministic_digest"]
    with pytest.raises(OutputError, match="already holds a finished run"):
        cache.restore(key, output)


def test_corrupted_entry_is_detected_removed_and_missed(tmp_path: Path, synthetic_run) -> None:
    cache = CacheManager(tmp_path / "cache")
    key = _key(cache)
    stored = cache.store(key, synthetic_run("run"))
    adapter = stored / "adapter_model.safetensors"
    data = bytearray(adapter.read_bytes())
    data[len(data) // 2] ^= 0x01  # flip one bit
    adapter.write_bytes(bytes(data))
    with pytest.warns(CacheCorruptionWarning, match="altered: adapter_model.safetensors"):
        assert cache.lookup(key) is None
    assert not stored.parent.exists()
    assert cache.restore(key, tmp_path / "out") is False
    assert cache.entries() == []


def test_replaced_manifest_is_detected(tmp_path: Path, synthetic_run) -> None:
    cache = CacheManager(tmp_path / "cache")
    key = _key(cache)
    stored = cache.store(key, synthetic_run("run"))
    (stored / "results.json").write_text('{"final_train_loss": 0.0}\n')
    from qlorax.artifacts import write_manifest

    write_manifest(stored)  # consistent with the files again, but not what was stored
    with pytest.warns(CacheCorruptionWarning, match="manifest was replaced"):
        assert cache.lookup(key) is None


def test_unfinished_or_damaged_runs_are_not_stored(tmp_path: Path, synthetic_run) -> None:
    cache = CacheManager(tmp_path / "cache")
    with pytest.raises(OutputError, match="not a finished, intact run"):
        cache.store(_key(cache), synthetic_run("unfinished", finished=False))
    run = synthetic_run("altered")
    (run / "results.json").write_text("{}\n")
    with pytest.raises(OutputError):
        cache.store(_key(cache), run)
    with pytest.raises(ValueError, match="not a cache key"):
        cache.lookup("../../etc")


def test_storing_twice_keeps_one_entry(tmp_path: Path, synthetic_run) -> None:
    cache = CacheManager(tmp_path / "cache")
    key = _key(cache)
    first = cache.store(key, synthetic_run("run"))
    assert cache.store(key, synthetic_run("run2")) == first
    assert len(cache.entries()) == 1
    assert list((tmp_path / "cache" / "tmp").iterdir()) == []


def test_cache_ls_and_gc(tmp_path: Path, synthetic_run, cli) -> None:
    cache_dir = tmp_path / "cache"
    cache = CacheManager(cache_dir)
    keys = [
        cache.store(_key(cache, seed), synthetic_run(f"run{seed}", seed=seed)).parent.name
        for seed in range(3)
    ]
    # entry 0 was last used two days ago; entry 2 most recently
    os.utime(cache_dir / "entries" / keys[0] / "entry.json", (time.time() - 2 * 86400,) * 2)
    os.utime(cache_dir / "entries" / keys[2] / "entry.json", (time.time() + 5,) * 2)

    listing = cli("cache", "ls", "--cache-dir", cache_dir)
    assert listing.exit_code == 0, listing.stderr
    assert "3 cached run(s)" in listing.stdout and all(k[:12] in listing.stdout for k in keys)
    as_json = json.loads(cli("cache", "ls", "--cache-dir", cache_dir, "--json").stdout)
    assert [e["key"] for e in as_json] == [keys[2], keys[1], keys[0]]
    assert as_json[0]["profile"] == "strict" and as_json[0]["config_hash"] == f"{2:064x}"

    older = cli("cache", "gc", "--cache-dir", cache_dir, "--older-than", "1d")
    assert older.exit_code == 0 and f"removed {keys[0]}" in older.stdout and "2 left" in older.stdout
    surplus = cli("cache", "gc", "--cache-dir", cache_dir, "--max-entries", "1")
    assert surplus.exit_code == 0 and f"removed {keys[1]}" in surplus.stdout and "1 left" in surplus.stdout
    assert [e["key"] for e in cache.entries()] == [keys[2]]
    assert cli("cache", "gc", "--cache-dir", cache_dir, "--older-than", "soon").exit_code == 2
