"""Environments: group runs by fingerprint and say why they differ.

Thread and world-size invariance are promised, so fingerprints that differ only in thread
counts, numbers of data-parallel workers or the executor that ran them count as one
environment; a difference between such runs is nondeterminism, not environment drift.
"""

from __future__ import annotations

import json
from collections import Counter
from typing import Any

from qlorax.analysis.runs import STATUS_OK, RunFacts
from qlorax.artifacts import canonical_json, sha256_bytes


def flatten(obj: Any, prefix: str = "") -> dict[str, Any]:
    """A nested dict as {"a.b.c": value} (fingerprints compared key by key)."""
    if isinstance(obj, dict):
        out: dict[str, Any] = {}
        for key, value in obj.items():
            out.update(flatten(value, f"{prefix}{key}."))
        return out
    return {prefix[:-1]: obj}


# Fingerprint keys of how a run was spread (workers, executor): the bits must not depend on them.
WORLD_KEYS = frozenset({"workers", "executor"})


def is_thread_key(key: str) -> bool:
    """Fingerprint keys that only record the thread count or the world size (invariance is promised)."""
    last = key.rsplit(".", 1)[-1].lower()
    return last == "threads" or last.endswith("num_threads") or key in WORLD_KEYS


# Fingerprint keys that name where a run happened, not what computed it: a native run and a
# container run whose pins and library versions agree are one environment. The Python patch
# release counts as major.minor for the same reason (a base image's CPython patch runs no kernel).
PLACE_KEYS = frozenset({"environment"})


def environment_class(fingerprint: dict[str, Any]) -> dict[str, Any]:
    """The fingerprint without its place keys, Python at major.minor."""
    out = {k: v for k, v in fingerprint.items() if k not in PLACE_KEYS}
    if isinstance(out.get("python"), str):
        out["python"] = ".".join(out["python"].split(".")[:2])
    return out


def env_info(run: RunFacts) -> dict[str, Any]:
    """The environment facts of a run from its env.json (None where it has none)."""
    env = run.env or {}
    fingerprint = env.get("fingerprint") if isinstance(env.get("fingerprint"), dict) else {}
    return {
        "fingerprint_sha256": env.get("fingerprint_sha256"),
        "fingerprint": fingerprint,
        "environment": env.get("environment", fingerprint.get("environment")),
        "profile": env.get("profile", fingerprint.get("profile")),
        "threads": env.get("threads", fingerprint.get("threads")),
        "workers": env.get("workers", fingerprint.get("workers", 1)),
        "torch": fingerprint.get("torch"),
    }


def _inputs_key(run: RunFacts) -> str:
    """What a run was asked to compute: its config hash and data digest (from results.json)."""
    results = run.results or {}
    data = results.get("data") if isinstance(results.get("data"), dict) else {}
    return f"{results.get('config_hash')}:{data.get('sha256')}"


def _tokenized_key(run: RunFacts) -> str | None:
    """The digest of the token ids and labels the run trained on (results.json; None before it was recorded)."""
    data = (run.results or {}).get("data")
    return data.get("tokenized_sha256") if isinstance(data, dict) else None


def _group_label(info: dict[str, Any]) -> str:
    threads = f"{info['threads']} thread{'' if info['threads'] == 1 else 's'}"
    workers = f" x {info['workers']} workers" if info.get("workers", 1) != 1 else ""
    return f"{info['environment']} / {info['profile']} / {threads}{workers} / torch {info['torch']}"


def _groups(runs: list[RunFacts], infos: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """One group per environment fingerprint, with whether its complete runs agree."""
    group_runs: dict[str, list[RunFacts]] = {}
    for run in runs:
        info = infos[run.name]
        key = sha256_bytes(canonical_json(environment_class(info["fingerprint"])).encode()) \
            if info["fingerprint_sha256"] else "unknown"
        group_runs.setdefault(key, []).append(run)
    groups = []
    labels: Counter[str] = Counter()
    for key, members in group_runs.items():
        info = infos[members[0].name]
        places = sorted({str(infos[r.name]["environment"]) for r in members})
        label = "unknown environment (no env.json)" if key == "unknown" else \
            _group_label({**info, "environment": "+".join(places)})
        labels[label] += 1
        ok_digests = sorted({r.deterministic_digest for r in members if r.status == STATUS_OK})
        groups.append({
            "label": label,
            "fingerprint_sha256": None if key == "unknown" else info["fingerprint_sha256"],
            "environments": places,
            "fingerprint": info["fingerprint"] if key != "unknown" else None,
            "runs": [r.name for r in members],
            "complete_runs": [r.name for r in members if r.status == STATUS_OK],
            "distinct_digests": len(ok_digests),
            "digests": ok_digests,
            "agreement_within": len(ok_digests) <= 1,
        })
    for group in groups:  # two fingerprints with one label: keep labels unique
        if labels[group["label"]] > 1 and group["fingerprint_sha256"]:
            group["label"] += f" [{group['fingerprint_sha256'][:8]}]"
    groups.sort(key=lambda g: (g["label"], g["runs"]))
    return groups


def _agree_within(runs: list[RunFacts], key_of: dict[str, Any]) -> bool:
    """Whether runs with the same key (inputs, token ids) all have one deterministic digest."""
    return all(len({r.deterministic_digest for r in runs if key_of[r.name] == key}) <= 1
               for key in set(key_of.values()))


def _attribution(runs: list[RunFacts], infos: dict[str, dict[str, Any]], groups: list[dict[str, Any]]) -> str:
    """none, run_integrity, input_difference, tokenization_drift, nondeterminism or environment_drift."""
    ok = [r for r in runs if r.status == STATUS_OK]
    ok_digests = {r.deterministic_digest for r in ok}
    # Classes of environments that differ at most in thread count.
    classes: dict[str, set[str | None]] = {}
    for run in ok:
        fp = infos[run.name]["fingerprint"] if infos[run.name]["fingerprint_sha256"] else None
        key = ("unknown:" + run.name) if fp is None else canonical_json(
            {k: v for k, v in flatten(environment_class(fp)).items() if not is_thread_key(k)})
        classes.setdefault(key, set()).add(run.deterministic_digest)
    inputs = {run.name: _inputs_key(run) for run in ok}
    tokenized = {run.name: _tokenized_key(run) for run in ok}
    if ok and len(ok) == len(runs) and len(ok_digests) == 1:
        return "none"
    if len(ok_digests) <= 1:
        return "run_integrity"
    if len(set(inputs.values())) > 1 and _agree_within(ok, inputs):
        # The runs were given different inputs (config or data): neither drift nor nondeterminism.
        return "input_difference"
    if len(set(tokenized.values())) > 1 and _agree_within(ok, tokenized):
        # Same config and data file, other token ids (a tokenizer or transformers change): the runs
        # trained on different inputs although they were given the same ones.
        return "tokenization_drift"
    if any(not g["agreement_within"] for g in groups) or any(len(d) > 1 for d in classes.values()):
        return "nondeterminism"
    return "environment_drift"


def cross_environment(runs: list[RunFacts]) -> dict[str, Any]:
    """The cross_environment_analysis section: groups, the keys that differ, the attribution."""
    infos = {r.name: env_info(r) for r in runs}
    groups = _groups(runs, infos)
    flats = [flatten(g["fingerprint"]) for g in groups if g["fingerprint"] is not None]
    all_keys = sorted(set().union(*flats)) if flats else []
    differing = [k for k in all_keys if len({json.dumps(f.get(k), sort_keys=True) for f in flats}) > 1]
    return {
        "groups": groups,
        "agreement_across_groups": len({r.deterministic_digest for r in runs if r.status == STATUS_OK}) <= 1,
        "differing_fingerprint_keys": differing,
        "drift_keys": [k for k in differing if not is_thread_key(k) and k not in PLACE_KEYS],
        "attribution": _attribution(runs, infos, groups),
    }
