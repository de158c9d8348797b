"""Data from a git repository: a ref resolves to a commit, the config hash names that commit,
a branch is refused unless allowed, a missing commit or file is exit 2 naming it. None of
these needs training; the one real training run on a git source (results.json's commit, the
pinned recorded config, a dirty checkout refused) is test_inference.py's shared run."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from conftest import TINY_CONFIG, assert_no_traceback, run_cli
from qlorax.artifacts import sha256_bytes
from qlorax.config import DataSection, parse_config
from qlorax.data import bundled_path, read_data_file
from qlorax.datasource import data_source_record, parse_git_source
from qlorax.errors import DataError
from qlorax.inputs import config_hash, portable_form
from qlorax.usecases.prelaunch import pin_data_source

DATA_IN_REPO = "data/train.jsonl"


def git(repo: Path, *args: str) -> str:
    done = subprocess.run(["git", "-c", "user.name=qlorax-test", "-c", "user.email=test@example.invalid", *args],
                          cwd=repo, capture_output=True, text=True, check=True)
    return done.stdout.strip()


def make_data_repo(root: Path, text_a: str, text_b: str) -> dict[str, str]:
    """A repository with two commits of DATA_IN_REPO: A (tagged v1) and B (the tip of main)."""
    git(root, "init", "--quiet", "--initial-branch=main")
    (root / "data").mkdir()
    (root / DATA_IN_REPO).write_text(text_a, encoding="utf-8")
    git(root, "add", DATA_IN_REPO)
    git(root, "commit", "--quiet", "-m", "A")
    git(root, "tag", "v1")
    commit_a = git(root, "rev-parse", "HEAD")
    (root / DATA_IN_REPO).write_text(text_b, encoding="utf-8")
    git(root, "commit", "--quiet", "-am", "B")
    return {"url": f"file://{root}", "root": str(root), "a": commit_a, "b": git(root, "rev-parse", "HEAD")}


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    lines = bundled_path("reproducible_ml_alpaca.jsonl").read_text(encoding="utf-8").splitlines()
    return make_data_repo(tmp_path_factory.mktemp("data-repo"), "\n".join(lines[:48]) + "\n",
                          "\n".join(lines[40:88]) + "\n")


def source(repo: dict[str, str], ref: str, path: str = DATA_IN_REPO) -> str:
    return f"git+{repo['url']}@{ref}#{path}"


def identity_and_hash(spec: str, **data: object) -> tuple[str, str]:
    config = parse_config({"data": {"path": spec, **data}})
    return portable_form(config)["data"]["path"], config_hash(config)


def test_a_commit_and_its_tag_are_one_identity_and_another_commit_is_not(repo: dict[str, str]) -> None:
    by_sha, hash_a = identity_and_hash(source(repo, repo["a"]))
    assert by_sha == f"git:{repo['a']}#{DATA_IN_REPO}"  # the commit, not the repository's or checkout's path
    assert identity_and_hash(source(repo, "v1")) == (by_sha, hash_a)
    assert identity_and_hash(source(repo, repo["a"][:10])) == (by_sha, hash_a)
    by_b, hash_b = identity_and_hash(source(repo, repo["b"]))
    assert by_b == f"git:{repo['b']}#{DATA_IN_REPO}" and hash_b != hash_a
    data_a = read_data_file(DataSection(path=source(repo, "v1")))
    data_b = read_data_file(DataSection(path=source(repo, repo["b"])))
    assert (data_a.commit, data_b.commit) == (repo["a"], repo["b"])
    assert data_a.sha256 != data_b.sha256
    assert data_a.sha256 == sha256_bytes(git(Path(repo["root"]), "show", f"{repo['a']}:{DATA_IN_REPO}").encode()
                                         + b"\n")


def test_a_branch_is_refused_unless_moving_refs_are_allowed(repo: dict[str, str]) -> None:
    refused = run_cli("config", "show", "--set", f"data.path={source(repo, 'main')}")
    assert refused.returncode == 2, refused.stderr
    assert "'main' is a branch" in refused.stderr and "data.allow_moving_ref" in refused.stderr
    assert_no_traceback(refused)
    allowed = identity_and_hash(source(repo, "main"), allow_moving_ref=True)[0]
    assert allowed == f"git:{repo['b']}#{DATA_IN_REPO}"


@pytest.mark.parametrize(("ref", "path", "named"), [
    ("deadbeef", DATA_IN_REPO, "commit deadbeef does not exist"),
    ("v1", "data/missing.jsonl", "data/missing.jsonl does not exist"),
    ("no-such-ref", DATA_IN_REPO, "neither a commit, a tag nor a branch"),
])
def test_a_missing_commit_ref_or_file_is_a_data_error_naming_it(repo: dict[str, str], ref: str, path: str,
                                                                named: str) -> None:
    with pytest.raises(DataError, match=named) as raised:
        pin_data_source(parse_config({"data": {"path": source(repo, ref, path)}}))
    assert raised.value.exit_code == 2


def test_train_on_a_missing_commit_is_exit_2_naming_it_and_writes_nothing(repo: dict[str, str],
                                                                          tmp_path: Path) -> None:
    missing = "0123456789abcdef0123456789abcdef01234567"
    result = run_cli("train", "-c", str(TINY_CONFIG), "-o", str(tmp_path / "run"), "--set",
                     f"data.path={source(repo, missing)}")
    assert result.returncode == 2, result.stderr
    assert f"commit {missing} does not exist" in result.stderr
    assert_no_traceback(result)
    assert not (tmp_path / "run").exists()


def test_malformed_sources_name_what_is_missing() -> None:
    for spec, words in (("git+file:///srv/repo#data.jsonl", "no commit or tag"),
                        ("git+file:///srv/repo@v1", "no file named"),
                        ("git+ftp://host/repo@v1#a.jsonl", "unsupported URL scheme"),
                        ("git+file:///srv/repo@v1#../etc/passwd", "relative path inside")):
        with pytest.raises(DataError, match=words):
            parse_git_source(spec)


def test_a_local_file_in_a_work_tree_records_commit_and_modified(repo: dict[str, str]) -> None:
    local = Path(repo["root"]) / DATA_IN_REPO
    clean = data_source_record(str(local))
    assert clean == {"kind": "file", "git": {"repository": repo["root"], "commit": repo["b"], "tracked": True,
                                             "modified": False}}
    local.write_text(local.read_text() + "\n", encoding="utf-8")
    try:
        assert data_source_record(str(local))["git"]["modified"] is True
    finally:
        git(Path(repo["root"]), "checkout", "--", DATA_IN_REPO)
    assert data_source_record("builtin:reproducible_ml_alpaca") is None
