"""Downloads: a local HTTP server on 127.0.0.1 serving files made here."""
import functools
import hashlib
import http.server
import os
import socket
import threading

import pytest

import reproduce
from experiments import common, data
from experiments.conftest import cli_flags, leftovers, write_text_task



@pytest.fixture()
def server(tmp_path):
    root = tmp_path / "served"
    (root / "citation_intent").mkdir(parents=True)
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(root))
    handler.log_message = lambda *a: None
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield root, f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


def closed_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_download_checks_sha256_and_leaves_nothing_behind_on_failure(server, tmp_path):
    root, url = server
    payload = b'{"text": "w1 w2", "label": "c0"}\n' * 1000
    (root / "citation_intent" / "train.jsonl").write_bytes(payload)
    good = hashlib.sha256(payload).hexdigest()
    dest_dir = tmp_path / "data"

    # good file: downloaded, checked, renamed into place
    path = data.ensure_file(str(dest_dir), "citation_intent/train.jsonl", url, {"citation_intent/train.jsonl": good})
    assert open(path, "rb").read() == payload and not leftovers(str(dest_dir))
    # a file already there is used as it is (the server copy is not fetched again)
    (root / "citation_intent" / "train.jsonl").write_bytes(b"changed")
    assert open(data.ensure_file(str(dest_dir), "citation_intent/train.jsonl", url,
                                      {"citation_intent/train.jsonl": good}), "rb").read() == payload

    # wrong checksum: a clear error naming the URL and how to place the file by hand; nothing left
    dest = str(tmp_path / "bad" / "train.jsonl")
    with pytest.raises(common.ReproduceError) as e:
        data.download(f"{url}/citation_intent/train.jsonl", dest, sha256="0" * 64)
    msg = str(e.value)
    assert f"{url}/citation_intent/train.jsonl" in msg and "checksum mismatch" in msg and "by hand" in msg
    assert msg.count(url) == 1 and f"Place it by hand as {dest} (" in msg  # the URL once: a message of two lines
    assert os.listdir(tmp_path / "bad") == []

    # unreachable URL and a missing file (404): the same, nothing left
    for bad_url in (f"http://127.0.0.1:{closed_port()}/x/train.jsonl", f"{url}/citation_intent/nope.jsonl"):
        with pytest.raises(common.ReproduceError, match="could not download " + bad_url.replace(".", r"\.")):
            data.download(bad_url, dest, sha256=good, timeout=5)
        assert os.listdir(tmp_path / "bad") == []


def test_cli_download_with_wrong_checksum_exits_cleanly(server, model_dir, tmp_path, capsys):
    """The pinned SHA-256 of the authors' files cannot match test-made files: the run must stop before training."""
    root, url = server
    write_text_task(str(root))
    data, out = str(tmp_path / "data"), str(tmp_path / "out")
    code = reproduce.main(["--task", "aclarc", "--mode", "finetune", "--seeds", "0", "--data-url", url,
                           *cli_flags(model_dir, data, out)])
    err = capsys.readouterr().err
    assert code == 1 and "error: " in err and "checksum mismatch" in err and f"{url}/citation_intent/" in err
    assert not os.path.exists(out) and not leftovers(data)
    assert not any(f.endswith(".jsonl") for _, _, fs in os.walk(data) for f in fs)
