"""``cnnviz explain`` / ``explain_dataset`` end to end: models of every kind, data of every kind,
the result store (resume after SIGKILL, config hash, open_results) and bad input."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import cnnviz_fast as cf
from cnnviz_fast.cli import main
from cnnviz_fast.data import shapes
from cnnviz_fast.models import shapes_cnn
from cnnviz_fast.viz import save_image
from tests._explain_models import tiny

ROOT = Path(__file__).resolve().parent.parent
TINY = "tests._explain_models:tiny"


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """12 shapes images (64 px PNG) in class subfolders, plus one corrupt file."""
    root = tmp_path_factory.mktemp("data")
    data = shapes(12, seed=5)
    for i, (x, label) in enumerate(zip(data.images, data.labels)):
        save_image(x, root / data.class_names[label] / f"img{i:02d}.png")
    (root / "circle" / "zz_broken.png").write_bytes(b"\x89PNG not really")
    return root


def _cli(*argv):
    return main(["explain", "--quiet", "--workers", "0", *map(str, argv)])


def _images(paths, size=64):
    from PIL import Image
    return torch.stack([torch.from_numpy(np.asarray(Image.open(p).convert("RGB").resize((size, size)),
                                                    dtype=np.float32) / 255).permute(2, 0, 1) for p in paths])


def test_embedded_model_folder_end_to_end(folder, tmp_path, capsys):
    out = tmp_path / "store"
    assert main(["explain", "--quiet", "--data", str(folder), "--method", "grad_cam", "--method",
                 "saliency", "--out", str(out), "--batch-size", "4", "--overlays"]) == 0
    summary = capsys.readouterr().out
    assert "explained 12 images (1 skipped)" in summary and str(out) in summary
    res = cf.open_results(out)
    index = res.index.to_pandas()
    assert len(index) == 24 and set(index["method"]) == {"grad_cam", "saliency"}
    assert (index["height"] == 64).all() and (index["width"] == 64).all()
    # folder names are the default model's classes, so labels are its class indices
    model = shapes_cnn()
    names = model.class_names
    assert all(names[lab] == Path(p).parent.name for p, lab in zip(index["path"], index["label"]))
    skipped = res.manifest["skipped"]
    assert len(skipped) == 1 and skipped[0][0].endswith("zz_broken.png") and "cannot identify" in skipped[0][1]
    # the stored maps are the package's own maps of the same pixels for the predicted class
    rows = index.index[index["method"] == "grad_cam"].tolist()
    x = _images(index.loc[rows, "path"])
    pred = model(x).argmax(1)
    assert pred.tolist() == index.loc[rows, "prediction"].tolist() == index.loc[rows, "target"].tolist()
    torch.testing.assert_close(res.maps("grad_cam", rows), cf.grad_cam(model, x, pred, "features"),
                               atol=1e-5, rtol=1e-4)
    sal_rows = index.index[index["method"] == "saliency"].tolist()
    torch.testing.assert_close(res.maps("saliency", sal_rows), cf.to_map(cf.saliency(model, x, pred)),
                               atol=1e-5, rtol=1e-4)
    assert len(list((out / "overlays" / "grad_cam").glob("*.png"))) == 12
    html = (out / "report.html").read_text()
    assert "zz_broken.png" in html and "Time per method" in html and html.count("data:image/png") == 12 * 3
    assert "explain 13 images" in (out / "explain.log").read_text()
    # batches cover every row of the method once, in index order
    seen = [t["offset"].to_pylist() for t, maps in res.batches("saliency", 5)]
    assert sum(map(len, seen)) == 12
    # cnnviz show writes the same report again
    (out / "report.html").unlink()
    assert main(["show", str(out)]) == 0 and (out / "report.html").read_text() == html


def test_factory_model_weights_torchscript_and_export_agree(folder, tmp_path, capsys):
    model = tiny()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1)  # not the factory's init: the weights file must be what is used
    from safetensors.torch import save_file
    save_file(model.state_dict(), str(tmp_path / "w.safetensors"))
    torch.save(model.state_dict(), tmp_path / "w.pt")
    x = torch.rand(1, 3, 32, 32)
    torch.jit.trace(model, x).save(str(tmp_path / "m.ts"))
    torch.export.save(torch.export.export(model, (x,)), str(tmp_path / "fixed.pt2"))
    torch.export.save(torch.export.export(model, (x.expand(2, -1, -1, -1),), dynamic_shapes={"x": {0: torch.export.Dim("batch")}}),
                      str(tmp_path / "m.pt2"))
    common = ["--data", folder, "--method", "saliency", "--method", "occlusion:window=8,stride=8",
              "--size", 32, "--crop", 32, "--batch-size", 8]
    stores = {}
    for name, model_args in [("safetensors", ["--model", TINY, "--weights", tmp_path / "w.safetensors"]),
                             ("pt", ["--model", TINY, "--weights", tmp_path / "w.pt"]),
                             ("torchscript", ["--model", tmp_path / "m.ts"]),
                             ("export", ["--model", tmp_path / "m.pt2"])]:
        assert _cli(*model_args, *common, "--out", tmp_path / name) == 0
        stores[name] = cf.open_results(tmp_path / name)
    assert _cli("--model", tmp_path / "fixed.pt2", *common, "--out", tmp_path / "fixed") == 2
    assert "export it with a dynamic batch dimension" in capsys.readouterr().err
    assert stores["torchscript"].manifest["config"]["model_kind"] == "torchscript"
    assert stores["export"].manifest["config"]["model_kind"] == "export"
    ref = stores["pt"]
    assert ref.manifest["config"]["mean"] == [0.485, 0.456, 0.406]  # ImageNet defaults for external models
    for name, res in stores.items():
        assert res.index["prediction"].to_pylist() == ref.index["prediction"].to_pylist(), name
        for method in ("saliency", "occlusion"):
            rows = [i for i, m in enumerate(ref.index["method"].to_pylist()) if m == method]
            torch.testing.assert_close(res.maps(method, rows), ref.maps(method, rows), atol=1e-5, rtol=1e-4)


def test_weights_that_do_not_fit_list_the_keys(folder, tmp_path, capsys):
    state = tiny().state_dict()
    state["extra.weight"] = state.pop("fc.weight")
    torch.save(state, tmp_path / "bad.pt")
    assert _cli("--model", TINY, "--weights", tmp_path / "bad.pt", "--data", folder, "--method", "saliency",
                "--out", tmp_path / "o") == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("cnnviz explain: error: --weights:") and "\n" not in err
    assert "missing 1: fc.weight" in err and "unexpected 1: extra.weight" in err


@pytest.mark.parametrize("argv, message", [
    (["--model", "no_such_pkg.mod:f"], "--model: cannot import 'no_such_pkg.mod'"),
    (["--model", "tests._explain_models:nothing"], "has no function 'nothing'"),
    (["--model", "tests._explain_models:broken"], "broken() failed: RuntimeError: no weights here"),
    (["--model", "missing.pt2"], "--model: no file missing.pt2"),
    (["--method", "nope"], "--method: unknown method 'nope'"),
    (["--method", "grad_cam:layer=nolayer"], "--method grad_cam: layer: no module named 'nolayer'"),
    (["--method", "grad_cam:colour=3"], "--method grad_cam: unknown parameter 'colour'"),
    (["--method", "occlusion:mode=fast"], "--method occlusion: ValueError"),
    (["--target", "17"], "--target: class 17 is out of range for a model with 6 outputs"),
    (["--target", "banana"], "--target: expected pred, label, a class index or name"),
    (["--top-k", "9"], "--top-k: 9 is more than the model's 6 classes"),
    (["--batch-size", "4", "--shard-size", "6"], "--shard-size: expected a multiple of --batch-size 4"),
    (["--device", "tpu9"], "--device: 'tpu9' is not usable"),
    (["--metrics", "deletion"], "--metrics: cnnviz_fast.metrics is not available"),
    (["--crop", "300"], "--crop: expected 1 <= crop <= size"),
    (["--weights", "x.pt"], "--weights: needs --model"),
])
def test_bad_input_is_one_line_before_any_image(folder, tmp_path, capsys, monkeypatch, argv, message):
    monkeypatch.setitem(sys.modules, "cnnviz_fast.metrics", None)  # as where the metrics have not landed
    base = {"--data": str(folder), "--method": "grad_cam"}
    for flag in ("--data", "--method"):
        if flag in argv:
            base.pop(flag)
    args = [v for kv in base.items() for v in kv] + argv
    assert _cli(*args, "--out", tmp_path / "o") == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("cnnviz explain: error: ") and "\n" not in err and message in err, err
    assert not (tmp_path / "o" / "shards").exists()


@pytest.mark.parametrize("make, message", [
    (lambda p: p, "no images under"),
    (lambda p: p / "absent", "does not exist"),
    (lambda p: (p / "empty.csv").write_text("path,label\n") and p / "empty.csv", "lists no images"),
])
def test_empty_or_missing_data(tmp_path, capsys, make, message):
    assert _cli("--data", make(tmp_path), "--method", "saliency", "--out", tmp_path / "o") == 2
    assert message in capsys.readouterr().err


def test_label_target_is_refused_without_labels(tmp_path, capsys):
    data = shapes(3, seed=1)
    torch.save(data.images, tmp_path / "x.pt")
    assert _cli("--data", tmp_path / "x.pt", "--method", "saliency", "--target", "label", "--out", tmp_path / "o") == 2
    assert "--target label: 3 images" in capsys.readouterr().err


def test_tensor_files_lists_labels_top_k_and_float16(folder, tmp_path):
    data = shapes(6, seed=2)
    torch.save({"images": data.images, "labels": data.labels}, tmp_path / "x.pt")
    np.savez(tmp_path / "x.npz", images=(data.images.numpy() * 255).round().astype(np.uint8), labels=data.labels.numpy())
    res = cf.explain_dataset(tmp_path / "x.pt", tmp_path / "a", ["grad_cam"], target="label", workers=0,
                             progress=False, report=False)
    assert res.index["target"].to_pylist() == data.labels.tolist()
    assert res.index["path"].to_pylist()[0] == "x.pt#0"
    res = cf.explain_dataset(tmp_path / "x.npz", tmp_path / "b", ["grad_cam"], top_k=2, dtype="float16",
                             workers=0, progress=False, report=False)
    index = res.index.to_pandas()
    assert len(index) == 12 and index["rank"].tolist() == [0, 1] * 6
    assert (index["target_score"][::2].values >= index["target_score"][1::2].values).all()
    assert res.maps("grad_cam", range(12)).dtype == torch.float16
    # a CSV list: relative paths, a label column by class name
    files = sorted(folder.rglob("img0*.png"))[:4]
    (tmp_path / "list.csv").write_text("path,label\n" + "".join(f"{f},{f.parent.name}\n" for f in files))
    res = cf.explain_dataset(tmp_path / "list.csv", tmp_path / "c", ["saliency"], workers=2, progress=False,
                             report=False)
    assert res.index["path"].to_pylist() == [str(f) for f in files]
    assert len(set(res.index["label"].to_pylist())) == len({f.parent.name for f in files})


def test_metrics_are_computed_when_the_module_is_there(folder, tmp_path, monkeypatch):
    import types
    calls = []

    def deletion(model, x, target, saliency, steps=16):
        calls.append((x.shape, target.shape, saliency.shape, steps))
        return torch.zeros(x.shape[0], steps), saliency.flatten(1).mean(1)
    monkeypatch.setitem(sys.modules, "cnnviz_fast.metrics", types.SimpleNamespace(deletion=deletion))
    res = cf.explain_dataset(folder, tmp_path / "m", ["grad_cam"], metrics=["deletion"], metric_steps=5,
                             batch_size=6, workers=0, progress=False)
    assert calls and all(c[3] == 5 and c[1] == (c[0][0],) and c[2] == (c[0][0], 64, 64) for c in calls)
    aucs = torch.tensor(res.index["deletion_auc"].to_pylist(), dtype=torch.float32)
    torch.testing.assert_close(aucs, res.maps("grad_cam", range(12)).flatten(1).mean(1))
    assert "Metrics (mean AUC)" in (tmp_path / "m" / "report.html").read_text()


def test_other_configuration_refused_unless_overwrite_and_stray_temps_removed(folder, tmp_path, capsys):
    out = tmp_path / "s"
    assert _cli("--data", folder, "--method", "saliency", "--out", out) == 0
    (out / "shards" / ".00001.safetensors.abc.tmp").write_bytes(b"half")
    assert _cli("--data", folder, "--method", "saliency", "--out", out, "--batch-size", 4) == 2
    assert "different configuration (changed: batch_size, shard_size)" in capsys.readouterr().err
    assert _cli("--data", folder, "--method", "saliency", "--out", out) == 0  # same config: nothing to redo
    assert not list(out.rglob("*.tmp"))
    assert _cli("--data", folder, "--method", "saliency", "--out", out, "--batch-size", 4, "--overwrite") == 0
    assert cf.open_results(out).manifest["config"]["batch_size"] == 4


def _run(out, env, *extra):
    cmd = [sys.executable, "-m", "cnnviz_fast.cli", "explain", "--quiet", "--model", "tests._explain_models:slow",
           "--data", str(extra[0]), "--method", "grad_cam:layer=features", "--method", "saliency", "--size", "32",
           "--crop", "32", "--batch-size", "2", "--shard-size", "2", "--workers", "1", "--out", str(out)]
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def test_sigkill_then_resume_is_bit_identical_to_a_straight_run(folder, tmp_path):
    env = dict(os.environ, PYTHONPATH=str(ROOT), CNNVIZ_TEST_SLEEP="0.15")
    straight = tmp_path / "straight"
    assert _run(straight, env, folder).wait(timeout=120) == 0
    killed = tmp_path / "killed"
    child = _run(killed, env, folder)
    deadline = time.time() + 60
    while not (killed / "shards" / "00002.safetensors").exists():
        assert child.poll() is None and time.time() < deadline, "the run ended before it could be killed"
        time.sleep(0.02)
    child.send_signal(signal.SIGKILL)
    child.wait()
    done = sorted(p.name for p in (killed / "shards").glob("*.safetensors"))
    assert 3 <= len(done) < 7 and not (killed / "index.parquet").exists()
    with pytest.raises(FileNotFoundError, match="did not finish"):
        cf.open_results(killed)
    first_bytes = {n: (killed / "shards" / n).read_bytes() for n in done}
    assert _run(killed, env, folder).wait(timeout=120) == 0
    # complete shards were kept as they were, not redone
    assert all((killed / "shards" / n).read_bytes() == b for n, b in first_bytes.items())
    a, b = sorted((straight / "shards").glob("*.safetensors")), sorted((killed / "shards").glob("*.safetensors"))
    assert [p.name for p in a] == [p.name for p in b] and len(a) == 7
    assert all(x.read_bytes() == y.read_bytes() for x, y in zip(a, b))
    ia, ib = cf.open_results(straight).index, cf.open_results(killed).index
    assert ia.drop(["seconds"]).equals(ib.drop(["seconds"]))
    ma, mb = (json.loads((d / "manifest.json").read_text()) for d in (straight, killed))
    assert ma["config_hash"] == mb["config_hash"] and ma["skipped"] == mb["skipped"]


@pytest.mark.parametrize("positive", [True, False])
def test_scouter_model_explained_as_a_method(folder, tmp_path, positive):
    """A model with a ScouterHead: ``--method scouter`` stores scouter_explain's maps of the predicted class."""
    out = tmp_path / "store"
    factory = "cnnviz_fast.models:shapes_scouter" if positive else "tests._explain_models:scouter_negative"
    assert _cli("--model", factory, "--data", folder, "--method", "scouter", "--size", 64, "--crop", 64,
                "--mean", 0, 0, 0, "--std", 1, 1, 1, "--out", out) == 0
    res = cf.open_results(out)
    index = res.index.to_pandas()
    rows = index.index.tolist()
    model = cf.models.shapes_scouter(positive=positive)
    x = _images(index.loc[rows, "path"])
    pred = model(x).argmax(1)
    assert pred.tolist() == index.loc[rows, "target"].tolist()
    torch.testing.assert_close(res.maps("scouter", rows), cf.scouter_explain(model, x, pred), atol=1e-5, rtol=1e-4)
