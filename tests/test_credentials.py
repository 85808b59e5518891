"""Credentials in URIs never leave the process, and URIs with ``?options`` work as OUTPUT.

pyarrow accepts ``s3://KEY:SECRET@bucket/prefix?endpoint_override=...&scheme=http`` and
``s3://bucket/prefix?access_key=...&secret_key=...``; users paste such URIs. segpipe must use
them, write under the path part only, and print or write none of the secret anywhere: stdout,
stderr, run.json, the COCO files, the logs. Credentials from the environment stay out too.
"""

from __future__ import annotations

import pyarrow.fs as pafs
import pytest

from images import write_photos
from segpipe.io.storage import join, redact
from test_cli import run_cli, small_flags
from test_s3 import ENV_SECRET, SECRET, s3_env  # noqa: F401  (s3_env: the moto server fixture)


@pytest.mark.parametrize("text,expected", [
    ("s3://AKIA:abc%2Fdef@bucket/x", "s3://***@bucket/x"),   # a "/" in a secret is %2F
    ("gs://user:pw@b/p?x=1", "gs://***@b/p?x=1"),
    ("s3://b/p?access_key=A&secret_key=S&session_token=T&region=eu",
     "s3://b/p?access_key=***&secret_key=***&session_token=***&region=eu"),
    ("error reading 's3://k:s@b/p?scheme=http': refused", "error reading 's3://***@b/p?scheme=http': refused"),
    ("/local/path/with@sign.jpg and http://host/x", "/local/path/with@sign.jpg and http://host/x"),
    # signed URLs: Azure SAS, AWS and GCS presigned, GCS v2, API keys; the rest of them stays
    ("https://a.blob.core.windows.net/c/w.pth?sv=2022-11-02&sp=r&sig=abc%2Bdef&key=K1",
     "https://a.blob.core.windows.net/c/w.pth?sv=2022-11-02&sp=r&sig=***&key=***"),
    ("https://b.s3.amazonaws.com/w.pth?X-Amz-Credential=AKIA%2F1&X-Amz-Security-Token=T&"
     "X-Amz-Signature=be", "https://b.s3.amazonaws.com/w.pth?X-Amz-Credential=***&"
     "X-Amz-Security-Token=***&X-Amz-Signature=***"),
    ("'https://storage.googleapis.com/b/w.pth?X-Goog-Credential=sa&X-Goog-Signature=be'",
     "'https://storage.googleapis.com/b/w.pth?X-Goog-Credential=***&X-Goog-Signature=***'"),
    ("https://h/w.pth?GoogleAccessId=sa&Expires=1&Signature=xyz#part",
     "https://h/w.pth?GoogleAccessId=***&Expires=1&Signature=***#part"),
    ("https://h/w.pth?api_key=K&access_token=T&apikey=A", "https://h/w.pth?api_key=***&"
     "access_token=***&apikey=***"),
    # names are not URLs: two files stay two
    ("failed: err&token=1.jpg, err&token=2.jpg", "failed: err&token=1.jpg, err&token=2.jpg"),
    ("s3://b/imgs/err&token=1.jpg?scheme=http", "s3://b/imgs/err&token=1.jpg?scheme=http"),
])
def test_redact_hides_userinfo_and_secret_options(text, expected):
    assert redact(text) == expected


@pytest.mark.parametrize("base,parts,expected", [
    ("s3://b/out?endpoint_override=h:1&scheme=http", ("predictions",),
     "s3://b/out/predictions?endpoint_override=h:1&scheme=http"),
    ("s3://b/out/?scheme=http", ("coco", "instances.json"), "s3://b/out/coco/instances.json?scheme=http"),
    ("/tmp/out", ("predictions",), "/tmp/out/predictions"),
    ("/tmp/what?x", ("predictions",), "/tmp/what?x/predictions"),
])
def test_join_adds_to_the_path_never_to_the_query(base, parts, expected):
    assert join(base, *parts) == expected


def test_mistakes_name_the_uri_without_its_secret(s3_env, tmp_path, checkpoint):  # noqa: F811
    """A path that is not there, an option pyarrow refuses (it takes credentials only as user
    info): one line, exit 2, the URI named with its secrets starred. (A run with secrets in
    its URIs: ``test_s3.py``.)"""
    endpoint = s3_env["AWS_ENDPOINT_URL"].split("://", 1)[1]
    options = f"endpoint_override={endpoint}&scheme=http"
    fs, _ = pafs.FileSystem.from_uri("s3://segpipe-test/x")
    write_photos(tmp_path / "photos", names=("chelsea",))
    with fs.open_output_stream("segpipe-test/cred-in/chelsea.png") as f:
        f.write((tmp_path / "photos" / "chelsea.png").read_bytes())
    input_uri = f"s3://testing:{SECRET}@segpipe-test/cred-in?{options}"
    env = {**s3_env, "AWS_SECRET_ACCESS_KEY": ENV_SECRET}
    refused = run_cli("segment", input_uri, f"s3://segpipe-test/o?{options}&secret_key={SECRET}",
                      "--weights", str(checkpoint), *small_flags(), env_extra=env)
    assert refused.returncode == 2 and "secret_key=***" in refused.stderr
    assert "Traceback" not in refused.stderr and SECRET not in refused.stderr
    mistake = run_cli("segment", f"s3://testing:{SECRET}@segpipe-test/nothing-here?{options}",
                      str(tmp_path / "out"), "--weights", str(checkpoint), *small_flags(),
                      env_extra=env)
    assert mistake.returncode == 2 and "nothing-here" in mistake.stderr
    assert SECRET not in mistake.stderr + mistake.stdout and ENV_SECRET not in mistake.stderr
