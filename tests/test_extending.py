"""README's "Extending suformer": the trick it shows, added as its one module, reaches the config and the loop.

The example is read from README.md itself, so the documented recipe cannot drift from what works. It runs in a
fresh interpreter: the module is loaded as `suformer.finetune.tricks.flooding` (what its import line in
`suformer/finetune/tricks/__init__.py` would do) before the config is first imported, which builds the `tricks`
section."""
import json
import re
import subprocess
import sys
import textwrap
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def readme_example(first_line: str) -> str:
    blocks = re.findall(r"```python\n(.*?)```", (REPO / "README.md").read_text(encoding="utf-8"), re.S)
    matching = [block for block in blocks if block.startswith(first_line)]
    assert len(matching) == 1, f"README has {len(matching)} python blocks starting with {first_line!r}"
    return matching[0]


def test_the_readme_trick_is_one_module_its_settings_reach_the_config_and_its_loss_hook_trains(tmp_path):
    (tmp_path / "flooding.py").write_text(readme_example("# suformer/finetune/tricks/flooding.py"), encoding="utf-8")
    script = textwrap.dedent(f"""
        import importlib.util, json, sys
        import suformer.finetune.tricks
        spec = importlib.util.spec_from_file_location("suformer.finetune.tricks.flooding",
                                                      {str(tmp_path / "flooding.py")!r})
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module
        spec.loader.exec_module(module)

        from suformer.config import ConfigError, FinetuneConfig, load_config
        from suformer.finetune.loop import finetune

        try:
            load_config(None, ["tricks.flooding_level=-1"], schema=FinetuneConfig)
            refused = ""
        except ConfigError as e:
            refused = str(e)

        def train_loss(level):
            cfg = load_config(None, [
                "model.dropout=0.0", "data.max_train_examples=64", "data.max_eval_examples=16", "data.max_len=32",
                "train.epochs=1", "train.batch_size=16", "train.lr=1e-3", "train.threads=2",
                f"tricks.flooding_level={{level}}", "run.root={tmp_path}"], schema=FinetuneConfig)
            return finetune(cfg)["metrics"]["train/loss"]

        print(json.dumps({{"refused": refused, "plain": train_loss(0), "flooded": train_loss(3.0)}}))
    """)
    done = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert "tricks.flooding_level: Input should be greater than or equal to 0" in result["refused"]
    # Two-class cross-entropy starts near ln 2 and only falls; flooded at b = 3, every step's loss is
    # |loss - 3| + 3 = 6 - loss, so the epoch's mean lies above 3 only if the trick's loss hook replaced the model's.
    assert result["plain"] < 1.0
    assert result["flooded"] > 3.0
