"""The README's first command learns: its exact training flags, shortened, clear a Dice floor."""

from __future__ import annotations

import json
import re
import shlex

from click.testing import CliRunner
from conftest import REPO_ROOT

from semiseg.cli import cli


def readme_train_args() -> list[str]:
    """The `semiseg train ...` arguments of the README's first command (the quick start)."""
    text = (REPO_ROOT / "README.md").read_text()
    first = re.search(r"```bash\n(.*?)\n```", text, re.S).group(1)
    words = shlex.split(first.replace("\\\n", " "))
    return words[words.index("train", words.index(next(w for w in words if w.endswith("semiseg")))):]


def test_the_quick_start_is_semi_supervised_and_learns_in_a_shortened_run(tmp_path):
    args = readme_train_args()
    algo = args[args.index("--algo") + 1]
    assert algo != "supervised"
    # the same settings with a quarter of the iterations (the poly schedule then decays over them)
    args[args.index("--iterations") + 1] = "80"
    args[args.index("--val-every") + 1] = "80"
    args[args.index("--out") + 1] = str(tmp_path / "qs")
    r = CliRunner().invoke(cli, [*args, "--quiet"])
    assert r.exit_code == 0, r.output
    summary = json.loads((tmp_path / "qs" / "summary.json").read_text())
    # 80 steps reach about 0.82 on 2 CPU cores; an untrained network scores below 0.2. The floor leaves room for
    # floating-point differences between machines and still fails a run that learned nothing.
    assert summary["last"]["dice"] > 0.6
