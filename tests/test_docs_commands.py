"""Every `python -m` command and stage script the README names answers --help, and knows every flag and setting the
README gives it."""
import re
import subprocess
import sys

import pytest

from docs_text import REPO, code_blocks

README = (REPO / "README.md").read_text(encoding="utf-8")


def _commands() -> dict[str, set[str]]:
    """command -> the flags (--x) and settings (key=) the README's code blocks pass it."""
    found: dict[str, set[str]] = {}
    for line in [line for block in code_blocks(README) for line in block] + re.findall(r"`(python -m [^`]+)`", README):
        match = re.search(r"python -m ([\w.]+)|(\w+_main\.py)", line)
        if not match:
            continue
        command = match.group(1) or match.group(2)
        rest = line[match.end():]
        found.setdefault(command, set()).update(re.findall(r"(?<![\w-])(--[\w-]+)", rest))
        found[command].update(f"{k}" for k in re.findall(r"(?<![\w/-])(\w+)=", rest))
    return found


COMMANDS = _commands()


def test_the_readme_names_the_commands():
    assert {"llama.convert", "tools.expand_vocab", "tools.prepare_corpus", "tools.inspect_corpus", "tools.chat",
            "tools.eval_ppl", "training.optimizer", "pretrain_main.py", "alignment_sft_main.py"} <= set(COMMANDS)


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_help_knows_every_flag_the_readme_uses(command):
    argv = [command] if command.endswith(".py") else ["-m", command]
    if command == "llama.convert":  # subcommands: each has its own flags
        texts = [subprocess.run([sys.executable, "-m", command, sub, "--help"], cwd=REPO, capture_output=True,
                                text=True, timeout=120) for sub in ("from_hf", "from_meta", "from_gguf", "to_hf")]
    else:
        texts = [subprocess.run([sys.executable, *argv, "--help"], cwd=REPO, capture_output=True, text=True,
                                timeout=120)]
    assert all(t.returncode == 0 for t in texts), [t.stderr[-500:] for t in texts]
    text = "\n".join(t.stdout for t in texts)
    for flag in COMMANDS[command]:
        assert flag in text, f"{command} --help does not know {flag}"
