"""A gs:// workdir through a real GCS server: gcp-storage-emulator speaks the JSON API that gcsfs
(epath, for config.json/metrics/curves) and tensorstore (orbax's arrays) use, so a training writes,
resumes and exports from a bucket exactly as on a pod, without credentials or network."""
import json

import pytest


def losses(events):
    return [(e["step"], e.get("loss"), e.get("eval_loss")) for e in events]


def test_a_run_in_a_bucket_trains_resumes_and_exports(bucket, tiny_dir, chat_data, tmp_path, capsys):
    """Train into gs://; damage the newest checkpoint there and re-run: it is moved aside in the bucket,
    the run resumes from the one before and ends bitwise where the local run ends; export and curves
    read the bucket."""
    from conftest import run_config
    from etils import epath

    from jaxtune.cli import main
    from jaxtune.export import export
    from jaxtune.train.loop import train
    from jaxtune.train.metrics import read_metrics

    local = train(run_config(tiny_dir, chat_data, tmp_path / "local"))
    remote_dir = f"{bucket}/runs/a"
    cfg = run_config(tiny_dir, chat_data, remote_dir)
    first = train(cfg)
    run = epath.Path(remote_dir)
    assert sorted(p.name for p in run.iterdir()) >= ["best_checkpoint", "checkpoints", "config.json", "curves.png",
                                                     "metrics.jsonl", "summary.json"]
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["3", "6"]
    assert losses(read_metrics(remote_dir)) == losses(read_metrics(tmp_path / "local"))
    assert first["final_loss"] == local["final_loss"]

    meta = run / "checkpoints" / "6" / "meta" / "metadata"
    meta.write_text("{")  # damaged in the bucket
    capsys.readouterr()
    resumed = train(cfg)
    out = capsys.readouterr().out
    assert f"resumed from {remote_dir}/checkpoints at step 3" in out and "is damaged" in out, out
    assert [p.name for p in (run / "damaged_checkpoints").iterdir()] == ["6"]
    assert resumed["final_loss"] == local["final_loss"]
    assert losses(read_metrics(remote_dir)) == losses(read_metrics(tmp_path / "local"))
    assert json.loads((run / "summary.json").read_text())["steps"] == 6

    result = export(remote_dir, tmp_path / "adapter", kind="adapter")
    assert result["step"] == 6 and result["parity_rel_err"] < 1e-4
    capsys.readouterr()
    assert main(["curves", remote_dir]) == 0
    assert capsys.readouterr().out.startswith(f"{remote_dir}/curves.png\ndiagnosis: ")


def test_a_bucket_that_cannot_be_used_is_one_line_within_seconds(bucket, tiny_dir, chat_data, tmp_path, capsys,
                                                                  monkeypatch):
    """No network, a missing bucket, a bad name, a scheme that is not gs://: train, curves and export
    each say it in one line before any data work (gcsfs alone retried for a minute, then tracebacks)."""
    import time

    from conftest import free_port, run_config

    from jaxtune.cli import main
    from jaxtune.errors import JaxtuneError
    from jaxtune.train.loop import train

    cases = {f"{bucket}-missing/run": "gs://jaxtune-test-missing: no such bucket",
             "gs://Not_A_Bucket/run": "gs://Not_A_Bucket: 'Not_A_Bucket' is not a bucket name",
             "gcs://jaxtune-test/run": "gcs://jaxtune-test/run: jaxtune reads and writes local paths and Google "
                                       "Cloud Storage, written gs://BUCKET/PATH; not gcs://"}
    for workdir, said in cases.items():
        start = time.perf_counter()
        with pytest.raises(JaxtuneError) as e:
            train(run_config(tiny_dir, chat_data, workdir))
        assert str(e.value).startswith(said) and time.perf_counter() - start < 10, str(e.value)
        assert "train data" not in capsys.readouterr().out  # before any data work
        assert main(["curves", workdir]) == 2 and said in capsys.readouterr().err
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", f"http://127.0.0.1:{free_port()}")  # nothing listens there
    assert main(["export", f"{bucket}/runs/a", "--out", str(tmp_path / "x"), "--merged"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "gs://jaxtune-test: cannot reach http://127.0.0.1:" in err, err
    assert "Connection refused" in err and not (tmp_path / "x").exists()


def test_a_bucket_without_access_says_how_to_log_in(monkeypatch):
    """GCS's 401 for a request without credentials, as its JSON API words it, from a stand-in server."""
    pytest.importorskip("gcsfs")
    import threading
    from http.server import BaseHTTPRequestHandler, HTTPServer

    from jaxtune.errors import JaxtuneError
    from jaxtune.paths import run_path

    class Unauthorized(BaseHTTPRequestHandler):
        def do_GET(self):
            body = json.dumps({"error": {"code": 401, "message": "Anonymous caller does not have "
                                         "storage.objects.list access to the Google Cloud Storage bucket."}}).encode()
            self.send_response(401)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = HTTPServer(("127.0.0.1", 0), Unauthorized)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", f"http://127.0.0.1:{server.server_port}")
    try:
        with pytest.raises(JaxtuneError, match=r"^gs://private-bucket: access denied \(401: Anonymous caller does not "
                                               r"have storage.objects.list access .*\); log in with `gcloud auth "
                                               r"application-default login`"):
            run_path("gs://private-bucket/run")
    finally:
        server.shutdown()
