"""A gs:// workdir through a real GCS server: gcp-storage-emulator speaks the JSON API that gcsfs
(epath, for config.json/metrics/curves) and tensorstore (orbax's arrays) use, so a training writes,
resumes and exports from a bucket exactly as on a pod, without credentials or network."""
import json


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
