"""What a new user meets first: the base install (no triton: CPU torch does not bring it, only the
`dev` extra does), instant --help, and every `subspec` command the README shows."""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from subspec_tui import cli

ROOT = Path(__file__).resolve().parent.parent
# Runs before anything else in a child process: `import triton` fails as on a CPU-only base install.
NO_TRITON = "import sys; sys.modules['triton'] = None; sys.modules['triton.language'] = None\n"


def python(code: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def test_every_method_runs_on_a_cpu_without_triton(tmp_path, bundled_folder):
    from tests.random_models import save_random_model

    folder = save_random_model(tmp_path / "llama", "llama", bundled_folder)
    result = python(NO_TRITON + f"""
from engine import EngineConfig, SamplingConfig, load_engine
for method in ("vanilla", "subspec_sd"):
    engine = load_engine(EngineConfig(method=method, llm_path={str(folder)!r}))
    generation = engine.generate([1, 5, 9, 13], SamplingConfig(max_new_tokens=6))
    print(method, len(generation.token_ids))
import subspec_tui.app, subspec_tui.cli, subspec_tui.server, profiles.choose
assert "triton" not in [m for m in sys.modules if sys.modules[m] is not None]
""")
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split() == ["vanilla", "6", "subspec_sd", "6"]


def test_the_control_without_triton_is_real():
    # The stand-in above really makes triton unimportable (else the test could not fail).
    result = python(NO_TRITON + "import triton")
    assert result.returncode != 0 and "ModuleNotFoundError" in result.stderr


@pytest.mark.parametrize("module", ["subspec_tui.cli", "subspec_tui.start"])
def test_help_answers_before_torch_is_imported(module):
    result = python(f"import sys\nimport {module}\n"
                    f"{module}.build_parser()\n"
                    "print('torch' in sys.modules, 'textual' in sys.modules)")
    assert result.returncode == 0, result.stderr
    assert result.stdout.split()[0] == "False"  # torch takes seconds to import on a CPU


DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def readme_subspec_commands() -> list[str]:
    """Every `subspec ...` command line in the code blocks of the README and docs/, placeholders expanded."""
    text = "\n".join(doc.read_text() for doc in DOCS)
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        for line in block.splitlines():
            line = line.split("  #")[0].strip()
            if line.startswith("subspec ") and "|" not in line:
                commands.append(re.sub(r"\[([^\]]*)\]", r"\1", line))  # optional parts: included
    return commands


def test_the_readme_shows_subspec_commands():
    assert len(readme_subspec_commands()) >= 8


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_every_relative_link_in_the_docs_exists(doc):
    for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", doc.read_text()):
        if not target.startswith(("http://", "https://", "mailto:")):
            assert (doc.parent / target).exists(), f"{doc.name} links to {target}, which does not exist"


def test_ci_installs_exactly_what_the_readme_s_first_command_installs():
    first = next(line for line in (ROOT / "README.md").read_text().splitlines() if line.endswith("&& subspec-chat"))
    install = first.removesuffix(" && subspec-chat")
    ci = (ROOT / ".ci/first-run").read_text().replace(".venv-first", ".venv")
    assert install in ci


@pytest.mark.parametrize("command", readme_subspec_commands())
def test_every_readme_command_parses(command):
    argv = shlex.split(command)[1:]
    args = cli.build_parser().parse_args(argv)  # a usage error exits 2 and fails the test
    assert args.handler is not None


def test_options_go_before_or_after_the_command():
    before = cli.build_parser().parse_args(["--method", "vanilla", "--max-new-tokens", "64", "run-test"])
    after = cli.build_parser().parse_args(["run-test", "--method", "vanilla", "--max-new-tokens", "64"])
    for args in (before, after):
        assert cli.settings_from_args(args).sampling.max_new_tokens == 64
        assert cli.settings_from_args(args).engine.method == "vanilla"
    both = cli.build_parser().parse_args(["--max-length", "100", "run-test", "--max-length", "200"])
    assert cli.settings_from_args(both).engine.max_length == 200  # after the command wins
    kept = cli.build_parser().parse_args(["--max-length", "100", "run-test", "--json"])
    assert cli.settings_from_args(kept).engine.max_length == 100  # not reset by the command's parser
