"""``safe-llm push`` and ``prune --push-to-hub`` against a local Hub stand-in that records
every request (``HF_ENDPOINT`` on 127.0.0.1): the test checks what was uploaded."""

from __future__ import annotations

import base64
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from safe_llm import cli

TOKEN = "hf_test_SECRET_token_0123456789"


class _Hub(BaseHTTPRequestHandler):
    """The endpoints ``huggingface_hub`` uses to create a repo, a branch and a commit; every
    file is declared "regular" so its bytes travel inside the commit payload."""

    def log_message(self, *args):
        pass

    def _reply(self, status: int, body: dict) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _handle(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        self.server.requests.append((self.command, self.path, dict(self.headers), body))
        base = f"http://127.0.0.1:{self.server.server_port}"
        if self.server.fail:
            self._reply(500, {"error": f"server on fire; your token was {TOKEN}"})
        elif self.path == "/api/repos/create":
            request = json.loads(body)
            self._reply(200, {"url": f"{base}/{request['organization']}/{request['name']}"})
        elif "/preupload/" in self.path:
            files = json.loads(body)["files"]
            modes = [
                {"path": f["path"], "uploadMode": "regular", "shouldIgnore": False} for f in files
            ]
            self._reply(200, {"files": modes})
        elif "/commit/" in self.path:
            repo = self.path.split("/api/models/")[1].split("/commit/")[0]
            self._reply(
                200, {"commitUrl": f"{base}/{repo}/commit/{'a' * 40}", "commitOid": "a" * 40}
            )
        else:
            self._reply(200, {})

    do_GET = do_POST = do_PUT = _handle


@pytest.fixture
def hub(monkeypatch, tmp_path):
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Hub)
    server.requests, server.fail = [], False
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{server.server_port}")
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    yield server
    server.shutdown()
    server.server_close()


def _commit(server) -> tuple[str, dict, dict]:
    """``(path, header, {file path: bytes})`` of the one commit the server received."""
    commits = [r for r in server.requests if r[0] == "POST" and "/commit/" in r[1]]
    assert len(commits) == 1, [r[1] for r in server.requests]
    _, path, _, body = commits[0]
    lines = [json.loads(line) for line in body.decode().splitlines() if line.strip()]
    header = next(line["value"] for line in lines if line["key"] == "header")
    files = {
        line["value"]["path"]: base64.b64decode(line["value"]["content"])
        for line in lines
        if line["key"] == "file"
    }
    return path, header, files


@pytest.fixture
def checkpoint(save_tiny_model, calibration_file, tmp_path):
    out = tmp_path / "pruned"
    argv = ["prune", "--model", str(save_tiny_model()), "--dataset", str(calibration_file)]
    argv += ["--nsamples", "2", "--seqlen", "16", "--method", "magnitude", "--quiet"]
    assert cli.main([*argv, "--output", str(out)]) == 0
    return out


def test_push_uploads_every_checkpoint_file_byte_for_byte_in_one_commit(hub, checkpoint, capsys):
    (checkpoint / ".safe_llm_work").mkdir()  # never uploaded
    (checkpoint / ".safe_llm_work" / "progress.json").write_text("{}")
    argv = ["push", str(checkpoint), "--repo-id", "alice/tiny-sparse", "--private"]
    assert cli.main([*argv, "--revision", "v1"]) == 0
    out = capsys.readouterr().out
    assert "alice/tiny-sparse/commit/" in out

    create = next(r for r in hub.requests if r[1] == "/api/repos/create")
    request = json.loads(create[3])
    assert request["name"] == "tiny-sparse" and request["organization"] == "alice"
    assert request.get("private") is True or request.get("visibility") == "private"
    assert any(r[1] == "/api/models/alice/tiny-sparse/branch/v1" for r in hub.requests)

    path, header, files = _commit(hub)
    assert path == "/api/models/alice/tiny-sparse/commit/v1"
    assert "magnitude" in header["summary"]
    expected = {p.name: p.read_bytes() for p in checkpoint.iterdir() if p.is_file()}
    assert files == expected
    assert {"model.safetensors", "config.json", "README.md", "tokenizer.json"} <= set(files)


def test_push_sends_the_token_only_in_the_authorization_header(hub, checkpoint, capsys):
    assert cli.main(["push", str(checkpoint), "--repo-id", "alice/tiny"]) == 0
    captured = capsys.readouterr()
    authorised = [r for r in hub.requests if r[1].startswith("/api/")]
    assert authorised and all(
        r[2].get("authorization") == f"Bearer {TOKEN}"
        for r in authorised
        if r[1] != "/api/agent-harnesses"  # an anonymous client probe, if the client sends it
    )
    assert all(TOKEN.encode() not in body for *_, body in hub.requests)
    assert TOKEN not in captured.out + captured.err
    _, _, files = _commit(hub)
    assert all(TOKEN.encode() not in content for content in files.values())


def test_failed_upload_is_one_line_without_the_token_and_says_how_to_retry(hub, checkpoint, capsys):
    hub.fail = True
    assert cli.main(["push", str(checkpoint), "--repo-id", "alice/tiny"]) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("safe-llm: error: upload of")
    assert TOKEN not in err and "<token>" in err
    assert f"safe-llm push {checkpoint} --repo-id alice/tiny" in err


def test_prune_with_push_to_hub_writes_then_uploads_the_checkpoint(
    hub, save_tiny_model, calibration_file, tmp_path, capsys
):
    out = tmp_path / "pruned"
    argv = ["prune", "--model", str(save_tiny_model()), "--dataset", str(calibration_file)]
    argv += ["--nsamples", "2", "--seqlen", "16", "--quiet", "--output", str(out)]
    assert cli.main([*argv, "--push-to-hub", "--hub-repo-id", "bob/pruned"]) == 0
    _, _, files = _commit(hub)
    assert files == {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    for name in ("README.md", "recipe.yaml", "report.json"):
        assert TOKEN.encode() not in files[name]
    assert "pushed to" in capsys.readouterr().out


@pytest.mark.parametrize(
    "extra, needle",
    [
        (["--push-to-hub"], "--hub-repo-id"),
        (["--push-to-hub", "--hub-repo-id", "bob/x", "--output", ""], "--output"),
    ],
    ids=["no repo id", "no output"],
)
def test_push_to_hub_without_repo_or_output_is_refused_before_loading(
    extra, needle, save_tiny_model, calibration_file, tmp_path, capsys
):
    argv = ["prune", "--model", str(save_tiny_model()), "--dataset", str(calibration_file)]
    if "--output" not in extra:
        argv += ["--output", str(tmp_path / "out")]
    assert cli.main([*argv, *extra]) == 2
    assert needle in capsys.readouterr().err


def test_push_of_a_directory_that_is_not_a_checkpoint_fails_before_any_request(
    hub, tmp_path, capsys
):
    (tmp_path / "empty").mkdir()
    assert cli.main(["push", str(tmp_path / "empty"), "--repo-id", "alice/x"]) == 2
    assert "not a checkpoint" in capsys.readouterr().err
    assert not [r for r in hub.requests if r[1] != "/api/agent-harnesses"]


def test_push_without_a_token_asks_to_log_in(hub, checkpoint, monkeypatch, capsys):
    monkeypatch.delenv("HF_TOKEN")
    hub.requests.clear()
    rc = cli.main(["push", str(checkpoint), "--repo-id", "alice/tiny"])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("safe-llm: error: no Hugging Face token")
    assert "HF_TOKEN" in err and f"safe-llm push {checkpoint}" in err
    assert not [r for r in hub.requests if r[1] != "/api/agent-harnesses"]


def test_python_prune_with_push_to_hub_writes_then_uploads_the_checkpoint(
    hub, save_tiny_model, calibration_file, tmp_path
):
    import safe_llm

    out = tmp_path / "pruned"
    safe_llm.prune(
        str(save_tiny_model()),
        dataset=str(calibration_file),
        nsamples=2,
        seqlen=16,
        output=str(out),
        push_to_hub=True,
        hub_repo_id="bob/pruned",
    )
    _, _, files = _commit(hub)
    assert files == {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}


def test_python_prune_on_a_rank_that_does_not_write_leaves_output_and_hub_alone(
    hub, save_tiny_model, calibration_file, tmp_path, monkeypatch
):
    import safe_llm
    from safe_llm.core import distributed

    monkeypatch.setattr(distributed, "is_writer", lambda: False)
    out = tmp_path / "pruned"
    safe_llm.prune(
        str(save_tiny_model()),
        dataset=str(calibration_file),
        nsamples=2,
        seqlen=16,
        output=str(out),
        push_to_hub=True,
        hub_repo_id="bob/pruned",
    )
    assert not out.exists()
    assert not [r for r in hub.requests if "/commit/" in r[1]]
