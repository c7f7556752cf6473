"""The command line (eeruntime/cli.py): exit codes and messages, and calibrate / time on a user's
own model factory and data files."""

import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import eeruntime as ee
from eeruntime import cli

ROOT = Path(__file__).resolve().parent.parent


def run_cli(capsys, *argv):
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_version_and_help(capsys):
    code, out, err = run_cli(capsys, "--version")
    assert code == 0 and out.startswith(f"eeruntime {ee.__version__} (torch {torch.__version__}")
    assert "extension" in out
    code, out, _ = run_cli(capsys, "--help")
    assert code == 0
    for name in ("demo", "calibrate", "time", "bench", "serve"):
        assert re.search(rf"^  {name}\s", out, re.M), name


@pytest.mark.parametrize(
    "argv, message",
    [
        (["nonsense"], "unknown command 'nonsense'"),
        (["calibrat"], "unknown command 'calibrat' (did you mean 'calibrate'?)"),
        (["--frobnicate"], "unknown option '--frobnicate'"),
        ([], "a command is needed"),
    ],
)
def test_unknown_commands_say_so_with_exit_2(capsys, argv, message):
    code, out, err = run_cli(capsys, *argv)
    assert code == 2
    assert message in err and "commands:" in err
    assert out == ""


def test_bad_options_of_a_command_exit_2(capsys):
    code, _, err = run_cli(capsys, "time", "rt", "--bogus")
    assert code == 2 and "the following arguments are required: --model" in err
    code, _, err = run_cli(capsys, "demo", "--epochs", "many")
    assert code == 2 and "invalid int value: 'many'" in err


def test_serve_parses_its_own_arguments(capsys):
    code, out, _ = run_cli(capsys, "serve", "--help")
    assert code == 0 and "--max-batch" in out
    code, _, err = run_cli(capsys, "serve", "bundle")  # --model missing
    assert code == 2 and "--model" in err


def test_python_m_and_the_registry(capsys):
    done = subprocess.run(
        [sys.executable, "-m", "eeruntime", "nonsense"], capture_output=True, text=True, cwd=ROOT, timeout=300
    )
    assert done.returncode == 2 and "unknown command 'nonsense'" in done.stderr
    seen = []

    @cli.command("echo-test", "a command registered by a test")
    def _echo(p):
        p.add_argument("word")
        return lambda a: seen.append(a.word) or 3

    try:
        assert run_cli(capsys, "echo-test", "hi")[0] == 3 and seen == ["hi"]
        assert "echo-test" in run_cli(capsys, "--help")[1]
        with pytest.raises(ValueError, match="registered twice"):
            cli.command("echo-test", "again")(_echo)
    finally:
        del cli.COMMANDS["echo-test"]


FACTORY = """
import torch
from eeruntime.zoo import digits_cnn

def build():
    torch.manual_seed(3)
    return digits_cnn(width=4)

def data():
    g = torch.Generator().manual_seed(4)
    x = torch.rand(96, 1, 8, 8, generator=g)
    return [(x[i:i + 32], torch.randint(0, 10, (32,), generator=g)) for i in range(0, 96, 32)]
"""


@pytest.fixture
def user_project(tmp_path, monkeypatch):
    """A user's folder: a module with a model factory and a data function, and data files."""
    mod = f"user_models_{tmp_path.name.replace('-', '_')}"
    (tmp_path / f"{mod}.py").write_text(textwrap.dedent(FACTORY))
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    torch.manual_seed(5)
    x, y = torch.rand(120, 1, 8, 8), torch.randint(0, 10, (120,))
    save_file({"x": x, "y": y}, str(tmp_path / "cal.safetensors"))
    save_file({"x": x}, str(tmp_path / "nolabels.safetensors"))
    (tmp_path / "truncated.safetensors").write_bytes((tmp_path / "cal.safetensors").read_bytes()[:200])
    monkeypatch.setenv("EERUNTIME_PROGRESS", "0")
    return mod, x, y


def test_calibrate_saves_what_ee_calibrate_finds(capsys, tmp_path, user_project):
    mod, x, y = user_project
    code, out, err = run_cli(
        capsys,
        "calibrate",
        "--model",
        f"{mod}:build",
        "--data",
        "cal.safetensors",
        "--out",
        "rt",
        "--method",
        "greedy",
        "--plot",
        "f.png",
        "--threads",
        "1",
    )
    assert code == 0, err
    model = __import__(mod).build().eval()
    expected = ee.calibrate(model, (x, y), "greedy", "entropy", progress=False)
    rt = ee.load(tmp_path / "rt", model)
    assert rt.thresholds == pytest.approx(expected.thresholds)
    assert rt.calibration.accuracy == pytest.approx(expected.accuracy)
    assert "saved:" in out and (tmp_path / "f.png").is_file()
    # a function returning (x, y) batches is data too
    code, _, err = run_cli(
        capsys,
        "calibrate",
        "--model",
        f"{mod}:build",
        "--data",
        f"{mod}:data",
        "--out",
        "rt2",
        "--method",
        "accuracy",
        "--max-drop",
        "0.02",
    )
    assert code == 0, err


def test_time_prints_one_consistent_measurement(capsys, tmp_path, user_project):
    mod, x, y = user_project
    model = __import__(mod).build().eval()
    ee.EERuntime(model, thresholds=[1.5, 1.0]).save(tmp_path / "rt")
    code, out, err = run_cli(
        capsys,
        "time",
        "rt",
        "--model",
        f"{mod}:build",
        "--data",
        "cal.safetensors",
        "--batch",
        "32",
        "--rounds",
        "3",
        "--threads",
        "1",
    )
    assert code == 0, err
    rows = {
        m.group(1): m.groups()[1:] for m in re.finditer(r"^(plain|runtime)\s+([\d.]+)\s+(\S+)\s+([\d.]+)%$", out, re.M)
    }
    assert set(rows) == {"plain", "runtime"}, out
    (p_ms, _, _p_acc), (r_ms, gain, r_acc) = rows["plain"], rows["runtime"]
    # the speed-up is plain time / runtime time of the same run (up to the printed rounding)
    lo = (float(p_ms) - 5e-5) / (float(r_ms) + 5e-5)
    hi = (float(p_ms) + 5e-5) / max(float(r_ms) - 5e-5, 1e-9)
    assert lo - 0.005 <= float(gain.rstrip("x")) <= hi + 0.005
    res = ee.EERuntime(model, thresholds=[1.5, 1.0]).infer(x)
    assert float(r_acc) == pytest.approx(100 * float((res.logits.argmax(1) == y).double().mean()), abs=0.006)
    fractions = torch.bincount(res.exit_index, minlength=3).double() / len(y)
    assert f"exits (%): {', '.join(f'{100 * f:.1f}' for f in fractions.tolist())}" in out
    # inputs without labels: times, no accuracy
    code, out, err = run_cli(
        capsys, "time", "rt", "--model", f"{mod}:build", "--data", "nolabels.safetensors", "--rounds", "1"
    )
    assert code == 0, err
    assert re.search(r"^runtime\s+[\d.]+\s+[\d.]+x\s+-$", out, re.M), out


@pytest.mark.parametrize(
    "args, message",
    [
        (["--model", "no_such_module_xyz:build", "--data", "cal.safetensors"], "cannot import 'no_such_module_xyz'"),
        (["--model", "{mod}:nothing", "--data", "cal.safetensors"], "has no 'nothing'"),
        (["--model", "{mod}build", "--data", "cal.safetensors"], "must be given as module:name"),
        (["--model", "{mod}:build", "--data", "missing.safetensors"], "no such file"),
        (["--model", "{mod}:build", "--data", "nolabels.safetensors"], "has no labels"),
        (["--model", "{mod}:build", "--data", "cal.safetensors", "--method", "budget"], "needs --budget"),
        # these three were tracebacks (safetensors' SafetensorError, torch's RuntimeError, and a
        # FileExistsError from rt.save after the calibration had run)
        (["--model", "{mod}:build", "--data", "truncated.safetensors"], "cannot be read as safetensors"),
        (
            ["--model", "{mod}:build", "--data", "cal.safetensors", "--device", "gpu0"],
            "--device 'gpu0' is not a device",
        ),
        (
            ["--model", "{mod}:build", "--data", "cal.safetensors", "--out", "cal.safetensors"],
            "--out cal.safetensors: is a file",
        ),
    ],
)
def test_calibrate_errors_say_what_is_wrong(capsys, user_project, args, message):
    mod = user_project[0]
    before = Path("cal.safetensors").read_bytes()
    code, out, err = run_cli(capsys, "calibrate", "--out", "rt", *[a.format(mod=mod) for a in args])
    assert code == 1
    assert err.startswith("eeruntime: calibrate: error:") and message in err, err
    assert not Path("rt").exists() and Path("cal.safetensors").read_bytes() == before


@pytest.mark.parametrize("option", ["--max-drop", "--budget"])
@pytest.mark.parametrize("value", ["nan", "inf"])
def test_calibrate_refuses_numbers_that_are_not_finite(capsys, user_project, option, value):
    """nan reached ee.calibrate, whose TypeError ended in a traceback; now a usage error."""
    mod = user_project[0]
    code, _, err = run_cli(
        capsys, "calibrate", "--model", f"{mod}:build", "--data", "cal.safetensors", "--out", "rt", option, value
    )
    assert code == 2 and f"argument {option}: must be a finite number, got '{value}'" in err, err
    assert "Traceback" not in err and not Path("rt").exists()


def test_time_runs_the_model_a_bundle_holds(capsys, tmp_path, user_project):
    """A bundle saved with weights=True, timed with its factory and no --weights: the runtime's
    exits and accuracy are the bundle model's (the factory's fresh model was timed and scored
    before, with the bundle's thresholds, silently)."""
    mod, x, y = user_project
    build = __import__(mod).build
    saved = build()
    with torch.no_grad():
        for t in saved.parameters():
            t.add_(torch.randn_like(t) * 2)
    rt = ee.EERuntime(saved, thresholds=[1.8, 1.2])
    rt.save(tmp_path / "bundle", weights=True)
    want, fresh = rt.infer(x), ee.EERuntime(build(), thresholds=[1.8, 1.2]).infer(x)

    def fractions(res):
        f = torch.bincount(res.exit_index, minlength=3).double() / len(y)
        return f"exits (%): {', '.join(f'{100 * v:.1f}' for v in f.tolist())}"

    assert fractions(want) != fractions(fresh)  # the test can tell the two models apart
    code, out, err = run_cli(
        capsys, "time", "bundle", "--model", f"{mod}:build", "--data", "cal.safetensors", "--rounds", "1"
    )
    assert code == 0, err
    assert fractions(want) in out, out
    acc = re.search(r"^runtime\s+[\d.]+\s+\S+\s+([\d.]+)%$", out, re.M).group(1)
    assert float(acc) == pytest.approx(100 * float((want.logits.argmax(1) == y).double().mean()), abs=0.006)


def test_time_on_a_runtime_for_another_model(capsys, tmp_path, user_project):
    mod = user_project[0]
    (tmp_path / "rt").mkdir()
    code, _, err = run_cli(capsys, "time", "rt", "--model", f"{mod}:build", "--data", "cal.safetensors")
    assert code == 1 and "no saved runtime" in err


def test_bench_outside_a_checkout(capsys, tmp_path):
    code, _, err = run_cli(capsys, "bench", "--suites", str(tmp_path))
    assert code == 1 and "no benchmark suites" in err


@pytest.mark.parametrize("command", ["calibrate", "time"])
def test_data_the_model_cannot_take_is_said_in_a_line(capsys, tmp_path, user_project, command):
    """x of another shape than the model takes (3 channels for a 1-channel CNN: the README's
    newcomer with the wrong file) used to end in torch's RuntimeError and a traceback from
    inside the model; now exit 1 naming --model, --data, the rows' shape and torch's reason."""
    mod = user_project[0]
    save_file({"x": torch.rand(8, 3, 8, 8), "y": torch.randint(0, 10, (8,))}, str(tmp_path / "rgb.safetensors"))
    from eeruntime.zoo import digits_cnn

    ee.EERuntime(digits_cnn(width=4), thresholds=0.5).save("saved")
    where = ["--out", "rt"] if command == "calibrate" else ["saved", "--rounds", "1"]
    code, _, err = run_cli(capsys, command, *where, "--model", f"{mod}:build", "--data", "rgb.safetensors")
    assert code == 1 and err.startswith(f"eeruntime: {command}: error: the model of --model '{mod}:build'"), err
    assert "'rgb.safetensors'" in err and "[3, 8, 8]" in err and "channels" in err, err
    assert "Traceback" not in err and not Path("rt").exists()
