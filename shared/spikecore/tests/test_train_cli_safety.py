"""spikecore's CLI as a hostile or careless user meets it: every route by which a checkpoint arrives is read
safely (no code runs, no download), bad files and values are one line and exit 2, and no run loses or silently
reuses another run's work."""

import os
import shutil
import tempfile
import zipfile
from pathlib import Path

import pytest
import torch
from spikecore_testing import crafted_checkpoint, serve_folder, write_config

from spikecore.errors import OutputFolderError, writable_dir
from spikecore.train import SpikingClassifier, console_main, run_cli
from spikecore.train.checkpoint import SafeCheckpointIO


def cli(*args: str):
    return run_cli(SpikingClassifier, list(args))


def console(monkeypatch, capsys, *args: str) -> str:
    """Run the console script in-process; it must exit with status 2 and one line on stderr."""
    monkeypatch.setattr("sys.argv", ["spikecore-test", *args])
    with pytest.raises(SystemExit) as exit_info:
        console_main(SpikingClassifier)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, err[-2000:]
    assert "Traceback" not in err
    return lines[0]


@pytest.fixture
def http_server(tmp_path):
    with serve_folder(tmp_path) as served:
        yield served


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One real 3-epoch run (2 steps an epoch) to take checkpoints from."""
    tmp = tmp_path_factory.mktemp("trained")
    config = write_config(tmp, trainer={"max_epochs": 3})
    result = cli("fit", "--config", str(config))
    return tmp, config, result


# -- 1. nothing in a checkpoint runs, wherever it is named -------------------------------------------------
@pytest.mark.parametrize("route", ["command line", "config file"])
def test_a_crafted_checkpoint_from_disk_runs_nothing(route, tmp_path, monkeypatch, capsys):
    marker = tmp_path / "pwned"
    evil = crafted_checkpoint(tmp_path / "evil.ckpt", marker)
    config = write_config(tmp_path)
    if route == "command line":
        extra = ["--ckpt_path", str(evil)]
    else:
        extra = ["--config", str(write_config(tmp_path, "ckpt.yaml", ckpt_path=str(evil)))]
    for sub in ("validate", "test", "predict", "fit"):
        line = console(monkeypatch, capsys, sub, "--config", str(config), *extra)
        assert "cannot read checkpoint" in line and "evil.ckpt" in line
    assert not marker.exists()
    assert not (tmp_path / "runs").exists()  # nothing written


@pytest.mark.parametrize("route", ["command line", "config file"])
def test_a_checkpoint_url_is_refused_without_a_request(route, tmp_path, monkeypatch, capsys, http_server):
    base, requests = http_server
    marker = tmp_path / "pwned"
    crafted_checkpoint(tmp_path / "e.ckpt", marker)
    config = write_config(tmp_path)
    url = f"{base}/e.ckpt"
    if route == "command line":
        extra = ["--ckpt_path", url]
    else:
        extra = ["--config", str(write_config(tmp_path, "ckpt.yaml", ckpt_path=url))]
    for sub in ("validate", "fit"):
        line = console(monkeypatch, capsys, sub, "--config", str(config), *extra)
        assert "is a URL" in line
    assert requests == [] and not marker.exists()


def test_init_weights_and_analyze_read_safely(tmp_path, monkeypatch, capsys, http_server):
    base, requests = http_server
    marker = tmp_path / "pwned"
    evil = crafted_checkpoint(tmp_path / "evil.ckpt", marker)
    config = write_config(tmp_path)
    for source in (str(evil), f"{base}/evil.ckpt"):
        line = console(monkeypatch, capsys, "fit", "--config", str(config), "--model.init_weights", source)
        assert "evil.ckpt" in line
        monkeypatch.setattr("sys.argv", ["x", "analyze", "--config", str(config), "--ckpt_path", source])
        with pytest.raises(SystemExit) as exit_info:
            console_main(SpikingClassifier, {"analyze": (lambda m, d, o: {}, "test")})
        assert exit_info.value.code == 2
        assert "evil.ckpt" in capsys.readouterr().err
    assert requests == [] and not marker.exists()


def test_the_trainer_itself_restores_through_the_safe_reader(trained):
    _, _, result = trained
    io = result.trainer.strategy.checkpoint_io
    assert isinstance(io, SafeCheckpointIO)
    with pytest.raises(ValueError, match="is a URL"):
        io.load_checkpoint("http://127.0.0.1:9/x.ckpt")


# -- 2. bad files: one line each ---------------------------------------------------------------------------
def test_broken_checkpoints_are_one_line(trained, tmp_path, monkeypatch, capsys):
    run_tmp, config, result = trained
    good = run_tmp / "runs" / "exp" / "latest" / "checkpoints" / "last.ckpt"
    cases = {}
    cases["empty"] = tmp_path / "empty.ckpt"
    cases["empty"].write_bytes(b"")
    plain = tmp_path / "plain.ckpt"
    torch.save(result.model.state_dict(), plain)
    cases["plain"] = plain
    flipped = tmp_path / "flipped.ckpt"
    data = bytearray(good.read_bytes())
    with zipfile.ZipFile(good) as zf:  # flip one bit inside the first tensor's stored bytes
        info = next(i for i in zf.infolist() if "/data/" in i.filename and i.file_size >= 64)
    head = (
        info.header_offset
    )  # the local header gives the lengths of the name and extra field before the data
    name_len, extra_len = (int.from_bytes(data[head + o : head + o + 2], "little") for o in (26, 28))
    offset = head + 30 + name_len + extra_len + 16
    data[offset] ^= 0x04
    flipped.write_bytes(bytes(data))
    cases["flipped"] = flipped
    nan = tmp_path / "nan.ckpt"
    ckpt = torch.load(good, weights_only=True)
    first = next(k for k, v in ckpt["state_dict"].items() if v.is_floating_point())
    ckpt["state_dict"][first] = torch.full_like(ckpt["state_dict"][first], float("nan"))
    torch.save(ckpt, nan)
    cases["nan"] = nan
    expected = {
        "empty": "is empty",
        "plain": "init_weights",
        "flipped": "checksum",
        "nan": "NaN",
    }
    for name, path in cases.items():
        line = console(monkeypatch, capsys, "test", "--config", str(config), "--ckpt_path", str(path))
        assert expected[name] in line, (name, line)


def test_impossible_values_are_one_line(tmp_path, monkeypatch, capsys):
    config = write_config(tmp_path)
    line = console(monkeypatch, capsys, "fit", "--config", str(config), "--model.T", "-2")
    assert "model.T must be a positive integer, got -2" in line
    assert not (tmp_path / "runs").exists()


# -- 3. runs: last.ckpt is the last state; each fit its own folder; `last` means the newest run ---------
def test_last_ckpt_is_the_state_after_the_last_epoch(trained):
    run_tmp, _, result = trained
    last = run_tmp / "runs" / "exp" / "version_0" / "checkpoints" / "last.ckpt"
    ckpt = torch.load(last, weights_only=True)
    assert result.trainer.global_step == 6
    assert ckpt["global_step"] == 6 and ckpt["epoch"] == 2
    for name, value in result.model.state_dict().items():
        torch.testing.assert_close(ckpt["state_dict"][name], value, rtol=0, atol=0)


def test_every_fit_writes_a_new_run_and_latest_follows(tmp_path):
    config = write_config(tmp_path)
    first = cli("fit", "--config", str(config))
    second = cli("fit", "--config", str(config), "--seed_everything", "1")  # another model than the first
    exp = tmp_path / "runs" / "exp"
    assert (exp / "version_0" / "checkpoints" / "last.ckpt").is_file()
    assert (exp / "version_1" / "checkpoints" / "last.ckpt").is_file()
    assert not list(exp.rglob("last-v*.ckpt"))
    assert (exp / "latest").resolve() == (exp / "version_1").resolve()
    newest = torch.load(exp / "latest" / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    own = second.model.state_dict()
    assert all(torch.equal(newest[k], own[k]) for k in own)
    assert any(not torch.equal(newest[k], v) for k, v in first.model.state_dict().items())


def test_a_fixed_run_folder_is_never_silently_reused(tmp_path, monkeypatch, capsys):
    config = write_config(tmp_path, logger=False)
    cli("fit", "--config", str(config))
    folder = tmp_path / "runs" / "checkpoints"
    before = {p.name: p.stat().st_mtime_ns for p in folder.iterdir()}
    line = console(monkeypatch, capsys, "fit", "--config", str(config))
    assert "already holds checkpoints of an earlier run" in line
    assert {p.name: p.stat().st_mtime_ns for p in folder.iterdir()} == before  # nothing touched
    # resuming that run in place is allowed, and continues its last.ckpt
    resumed = cli("fit", "--config", str(config), "--trainer.max_epochs", "2", "--ckpt_path", "last")
    assert resumed.trainer.global_step == 4
    assert torch.load(folder / "last.ckpt", weights_only=True)["global_step"] == 4
    assert sorted(p.name for p in folder.glob("last*.ckpt")) == ["last.ckpt"]


def test_a_run_folder_that_is_a_file_is_refused(tmp_path, monkeypatch, capsys):
    blocker = tmp_path / "runs"
    blocker.write_text("keep me")
    for logger in (True, False):
        config = write_config(tmp_path, logger=logger)
        for sub in ("fit", "test"):
            line = console(monkeypatch, capsys, sub, "--config", str(config))
            assert ("cannot be written" in line or "is a file" in line) and "runs" in line
    assert blocker.read_text() == "keep me"


def test_ckpt_path_last_resumes_the_newest_run(trained, tmp_path):
    run_tmp, config, _ = trained
    resumed = cli("fit", "--config", str(config), "--trainer.max_epochs", "4", "--ckpt_path", "last")
    assert resumed.trainer.global_step == 8  # 6 restored + 2, not retrained from zero
    exp = run_tmp / "runs" / "exp"
    assert torch.load(exp / "latest" / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 8


def test_ckpt_path_last_without_a_run_is_an_error(tmp_path, monkeypatch, capsys):
    config = write_config(tmp_path)
    line = console(monkeypatch, capsys, "test", "--config", str(config), "--ckpt_path", "last")
    assert "no earlier run" in line


# -- 4. options that contradict the checkpoint; predict writes; analyze checks its folder first --------
def test_model_options_contradicting_the_checkpoint_are_refused(trained, monkeypatch, capsys):
    run_tmp, config, _ = trained
    last = str(run_tmp / "runs" / "exp" / "latest" / "checkpoints" / "last.ckpt")
    line = console(
        monkeypatch, capsys, "test", "--config", str(config), "--ckpt_path", last, "--model.T", "3"
    )
    assert "--model.T 3 (checkpoint: 2)" in line
    # the same difference from a config file is reported, and the checkpoint's value is used
    other = write_config(run_tmp, "t3.yaml", model={"T": 3})
    result = cli("test", "--config", str(other), "--ckpt_path", last)
    assert "model.T=3 -> 2" in capsys.readouterr().err
    assert result.model.hparams.T == 2


def test_predict_writes_its_predictions(trained, tmp_path):
    run_tmp, config, _ = trained
    last = str(run_tmp / "runs" / "exp" / "latest" / "checkpoints" / "last.ckpt")
    result = cli("predict", "--config", str(config), "--ckpt_path", last)
    folder = Path(result.trainer.log_dir)
    saved = torch.load(folder / "predictions.pt", weights_only=True)
    rows = (folder / "predictions.csv").read_text().splitlines()
    assert rows[0] == "index,pred,prob" and len(rows) == 1 + 16 == 1 + saved["pred"].numel()
    dm = result.datamodule
    x = torch.cat([b[0] for _, b in zip(range(2), dm.predict_dataloader(), strict=False)])
    model = result.model.eval()
    with torch.no_grad():
        expected = model(x).softmax(-1)
    torch.testing.assert_close(saved["probs"], expected)
    assert torch.equal(saved["pred"], expected.argmax(-1))


def test_analyze_checks_its_output_folder_before_the_work(trained, tmp_path, monkeypatch, capsys):
    _, config, _ = trained
    blocker = tmp_path / "a-file"
    blocker.write_text("keep me")
    ran = []
    monkeypatch.setattr("sys.argv", ["x", "analyze", "--config", str(config), "--out", str(blocker)])
    with pytest.raises(SystemExit) as exit_info:
        console_main(SpikingClassifier, {"analyze": (lambda m, d, o: ran.append(1) or {}, "test")})
    assert exit_info.value.code == 2 and ran == []
    assert "is a file" in capsys.readouterr().err and blocker.read_text() == "keep me"


def test_a_read_only_folder_is_refused(tmp_path):
    base = Path(tempfile.mkdtemp())  # 0o700 pytest folders would block an unprivileged child on the way in
    try:
        base.chmod(0o755)
        read_only, open_ = base / "ro", base / "rw"
        read_only.mkdir(mode=0o555)
        read_only.chmod(0o555)
        open_.mkdir()
        open_.chmod(0o777)
        if os.geteuid() != 0:
            with pytest.raises(OutputFolderError, match="cannot be written"):
                writable_dir(read_only / "out")
            assert writable_dir(open_ / "out").is_dir()
            return
        # root ignores permission bits: check as an unprivileged user in a child process
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the child
            code = 3
            try:
                os.setgid(65534)
                os.setuid(65534)
                writable_dir(open_ / "out")  # the control: an open folder works for this user
                writable_dir(read_only / "out")
            except OutputFolderError as err:
                code = 0 if "cannot be written" in str(err) and "ro/out" in str(err) else 4
            except BaseException:
                code = 5
            os._exit(code)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        assert (open_ / "out").is_dir()
    finally:
        shutil.rmtree(base, ignore_errors=True)
