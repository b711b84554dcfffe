"""URI inputs (file://, s3://): listed and read through pyarrow.fs, decoded like local files,
same predictions row for row. The S3 test talks to a real S3 API (moto's server) on localhost."""

from __future__ import annotations

import csv
import os
import shutil

import pytest

pytest.importorskip("pyarrow.fs", reason='URI inputs need pyarrow: pip install "transfer[distributed]"')

from transfer.runtime.infer import infer  # noqa: E402
from transfer.data.remote import is_uri, iter_uri_inputs  # noqa: E402


def _rows(path):
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def _folder_with_bad_files(rt_data, d):
    shutil.copytree(rt_data / "c0", d / "c0")
    shutil.copytree(rt_data / "c1", d / "c1")
    good = (d / "c0" / "000.png").read_bytes()
    (d / "c1" / "truncated.png").write_bytes(good[: len(good) // 2])
    (d / "c1" / "empty.jpg").write_bytes(b"")
    (d / "c1" / "notes.txt").write_text("not an image, not listed")
    shutil.copy(d / "c0" / "000.png", d / "c0" / "my shot é'1.png")  # a key with a space, a quote, non-ASCII
    return d


def _same_rows(local, remote, prefix_local, prefix_remote):
    assert len(local) == len(remote) > 0
    for a, b in zip(local, remote):
        assert b["path"].startswith(prefix_remote)
        assert a["path"][len(prefix_local):] == b["path"][len(prefix_remote):]
        assert (a["status"], a["class1"], a["prob1"]) == (b["status"], b["class1"], b["prob1"])
        assert (a["error"] == "") == (b["error"] == "")


def test_is_uri():
    assert is_uri("s3://bucket/x.jpg") and is_uri("file:///tmp/x") and is_uri("gs://b/p/")
    assert not is_uri("images/x.jpg") and not is_uri("/abs/x.png") and not is_uri("C:\\x.png")


def test_file_uri_folder_predicts_like_the_local_path(rt_bundle, rt_data, tmp_path):
    _, bundle = rt_bundle
    d = _folder_with_bad_files(rt_data, tmp_path / "imgs")
    uri = "file://" + str(d)
    listed = list(iter_uri_inputs(uri, recursive=True))
    assert [p for p, _ in listed] == sorted(p for p, _ in listed) and not any(p.endswith(".txt") for p, _ in listed)
    assert list(iter_uri_inputs(uri)) == []  # not recursive: the images are one level down
    s_local = infer(bundle, [d], out=tmp_path / "local.csv", recursive=True)
    s_uri = infer(bundle, [uri + "/", uri + "/c0/nope.png"], out=tmp_path / "uri.csv", recursive=True)
    local, remote = _rows(tmp_path / "local.csv"), _rows(tmp_path / "uri.csv")
    assert remote[-1]["status"] == "error" and "no such file" in remote[-1]["error"]
    _same_rows(local, remote[:-1], str(d), uri)
    errs = {os.path.basename(r["path"]): r["error"] for r in remote if r["status"] == "error"}
    assert "empty" in errs["empty.jpg"] and "truncated" in errs["truncated.png"]
    assert s_uri.ok == s_local.ok and s_uri.errors == s_local.errors + 1
    assert any(r["path"].endswith("/c0/my shot é'1.png") and r["status"] == "ok" for r in remote)


def test_unknown_scheme_is_a_clear_error(rt_bundle, tmp_path):
    from transfer.errors import ConfigError

    _, bundle = rt_bundle
    with pytest.raises(ConfigError, match="(?s)cannot open nosuch://bucket/x/.*supported: s3://"):
        infer(bundle, ["nosuch://bucket/x/"], out=tmp_path / "p.csv", recursive=True)
    assert not (tmp_path / "p.csv").exists()


@pytest.fixture()
def s3_server(monkeypatch):
    moto_server = pytest.importorskip("moto.server", reason="the S3 test needs moto[server] (dev extra)")
    srv = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    srv.start()
    host, port = srv.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    for k, v in {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1",
                 "AWS_ENDPOINT_URL": endpoint}.items():
        monkeypatch.setenv(k, v)
    yield endpoint
    srv.stop()


def test_s3_prefix_predicts_like_the_local_folder(s3_server, rt_bundle, rt_data, tmp_path):
    import boto3

    _, bundle = rt_bundle
    d = _folder_with_bad_files(rt_data, tmp_path / "imgs")
    s3 = boto3.client("s3", endpoint_url=s3_server)
    s3.create_bucket(Bucket="shots")
    for p in sorted(d.rglob("*")):
        if p.is_file():
            s3.upload_file(str(p), "shots", "batch1/" + p.relative_to(d).as_posix())
    infer(bundle, [d], out=tmp_path / "local.csv", recursive=True)
    s = infer(bundle, ["s3://shots/batch1/"], out=tmp_path / "s3.csv", recursive=True, topk=1)
    local, remote = _rows(tmp_path / "local.csv"), _rows(tmp_path / "s3.csv")
    _same_rows(local, remote, str(d), "s3://shots/batch1")
    assert s.errors == 2 and s.ok == len(local) - 2
    assert "s3://shots/batch1/c0/my shot é'1.png" in [r["path"] for r in remote if r["status"] == "ok"]
    # a missing bucket or prefix is an error row, like a missing local folder
    s = infer(bundle, ["s3://no-such-bucket/x/"], out=tmp_path / "x.csv", recursive=True)
    assert s.ok == 0 and s.errors == 1
    assert "no such file" in _rows(tmp_path / "x.csv")[0]["error"]
