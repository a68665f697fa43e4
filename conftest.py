"""pytest set-up for the whole suite: one CPU thread per test process; the fixtures and helpers
that test_patch_ae.py, test_deploy.py and test_layouts.py share (import them from conftest).

With torch's default of one OpenMP thread per core, a second busy process on a 2-core machine
(another torch program, say) leaves each of our threads waiting at every parallel region for a
sibling that has lost its core, and OpenMP's waiting threads spin: measured on this project's
2-core machine, the suite then took 8 times its quiet wall time and 4.6 times its CPU time. One
thread has no siblings to wait for (README.md gives the times, quiet and loaded).
"""
import os

os.environ.setdefault("OMP_NUM_THREADS", "1")  # read when torch is first imported, and by children

import torch  # noqa: E402  (after the variable, on purpose)

torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))

import json  # noqa: E402
import shlex  # noqa: E402
import shutil  # noqa: E402
from html.parser import HTMLParser  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
from PIL import Image  # noqa: E402

import deploy  # noqa: E402
import patch_ae as pa  # noqa: E402

ROOT = Path(__file__).parent
# resnet18 with random weights (no download), 64 px, one epoch: the paper's flags only
TINY = ["--backbone", "resnet18", "--weights", "none", "--image-size", "64", "--crop-size", "64",
        "--epochs", "1"]


@pytest.fixture(scope="session")
def synthetic_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("data")
    pa.make_synthetic_category(root)
    return root


@pytest.fixture
def data_root(synthetic_root, tmp_path) -> Path:
    """A private copy of the synthetic category, for tests that damage it."""
    shutil.copytree(synthetic_root, tmp_path / "data")
    return tmp_path / "data"


def run_main(main, args, tmp_path, data_root) -> dict:
    """main (patch_ae.main or deploy.main) on the synthetic category -> its results.json."""
    out = tmp_path / "out"
    main(["--data-root", str(data_root), "--category", "synthetic", "--out", str(out), *args])
    return json.loads((out / "results.json").read_text())


def expect_error(capsys, main, argv, *fragments) -> str:
    """main(argv) must exit 2 with one 'error:' line that contains every fragment, no traceback."""
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err, err
    for f in fragments:
        assert f in err, (f, err)
    return err



def help_text(capsys, main) -> str:
    """main(['--help']) must exit 0; -> the help it printed."""
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    return capsys.readouterr().out

class ReportParser(HTMLParser):
    """report.html -> every attribute value, the <img> sources, and each <h3> gallery's captions
    in order."""

    def __init__(self, text: str):
        super().__init__()
        self.attributes, self.images, self.galleries = [], [], {}
        self.tag, self.heading = None, None
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        self.tag, attrs = tag, dict(attrs)
        self.attributes += [v for v in attrs.values() if v]
        if tag == "img":
            self.images.append(attrs["src"])

    def handle_endtag(self, tag):
        self.tag = None

    def handle_data(self, data):
        if self.tag == "h3":
            self.heading = data
            self.galleries[data] = []
        elif self.tag == "figcaption":
            self.galleries[self.heading].append(data.split(":")[0])


def spy_on_evaluate(monkeypatch) -> dict:
    """What patch_ae.evaluate gave the run (deploy.py's runs too): its scores, labels, the names
    of the test images, the model, the data."""
    seen, evaluate = {}, pa.evaluate

    def spy(cfg, model, data, device):
        result, scored = evaluate(cfg, model, data, device)
        names = [f"{p.parent.name}/{p.name}" for p in data.test_paths]
        seen.update(scores=scored["scores"], labels=data.labels, names=names, model=model,
                    data=data)
        return result, scored
    monkeypatch.setattr(pa, "evaluate", spy)
    return seen


SCRIPTS = ("patch_ae.py", "deploy.py")


def readme_commands(section: str) -> list[tuple[str, list[str]]]:
    """The `python patch_ae.py ...` and `python deploy.py ...` lines of the README's section whose
    title starts with `section`, in order, as (script, argv)."""
    text = (ROOT / "README.md").read_text()
    body = text.split(f"\n## {section}", 1)[1].split("\n## ", 1)[0]
    found = []
    for line in body.splitlines():
        for script in SCRIPTS:
            if f"python {script}" in line:
                found.append((script, shlex.split(line.split(f"python {script}", 1)[1])))
    return found


def parse_command(script: str, argv: list[str]):
    """A patch_ae.py or deploy.py command line -> its checked Config (DeployConfig), as main()
    would make it; raises UsageError (or SystemExit for --help) where main() would stop."""
    config = {"patch_ae.py": pa.Config, "deploy.py": deploy.DeployConfig}[script]
    values, given = pa.parse_flags(config, argv, "")
    cfg = pa.make_config(values, given, config)
    if script == "deploy.py":
        deploy.check_deploy(cfg)
    return cfg


def write_nan_tif(path: Path) -> Path:
    """A float TIFF (values in [0, 3]: min-max scaled when read) with one NaN pixel."""
    pixels = np.random.default_rng(0).uniform(0, 3, (64, 64)).astype(np.float32)
    pixels[5, 7] = np.nan
    Image.fromarray(pixels).save(path)
    return path
