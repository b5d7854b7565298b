"""Row 22, training input: a --seq-len beyond the model's context is refused (it trained silently past
the positions the model knows), and a run that fails its data checks leaves no empty run folder."""
import pytest

from parscale_edge.cli import main
from tiny_gguf import write_tiny_gguf


@pytest.fixture(scope="module")
def gguf(tmp_path_factory):
    root = tmp_path_factory.mktemp("train-input")
    write_tiny_gguf(root / "tiny.gguf", "qwen2")  # context 256
    return root / "tiny.gguf"


def train(gguf, data, out, *extra):
    return main(["-q", "train", str(gguf), "-P", "2", "--data", str(data), "--eval", "none", "-o", str(out),
                 "--steps", "1", "--grad-accum", "1", "--prefix-tokens", "2", *extra])


def one_line(capsys, *words):
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    assert all(w in err for w in words), err


def test_seq_len_beyond_the_context_is_refused(gguf, tmp_path, capsys):
    data = tmp_path / "d.txt"
    data.write_text("hello world " * 2000)
    capsys.readouterr()
    assert train(gguf, data, tmp_path / "run", "--seq-len", "512") == 2
    one_line(capsys, "--seq-len 512 is longer than", "context of 256 tokens", "--seq-len 256 or less")
    assert not (tmp_path / "run").exists()


def test_a_run_that_fails_its_data_checks_leaves_no_folder(gguf, tmp_path, capsys):
    data = tmp_path / "d.txt"
    data.write_text("hello")  # fewer tokens than one training block
    capsys.readouterr()
    assert train(gguf, data, tmp_path / "run", "--seq-len", "64") == 2
    one_line(capsys, "fewer than one block")
    assert not (tmp_path / "run").exists()
    existing = tmp_path / "mine"
    existing.mkdir()  # a folder the user made stays, even empty
    assert train(gguf, data, existing, "--seq-len", "64") == 2
    assert existing.is_dir()


def test_a_run_folder_under_a_file_is_refused_before_loading(gguf, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr("parscale_edge.loading.load_model", lambda *a, **k: pytest.fail("must fail before loading"))
    (tmp_path / "afile").write_text("x")
    data = tmp_path / "d.txt"
    data.write_text("hello world " * 200)
    capsys.readouterr()
    assert train(gguf, data, tmp_path / "afile" / "run", "--seq-len", "64") == 2
    one_line(capsys, "is a file, not a folder")


def test_one_step_is_said_in_the_singular(gguf, tmp_path, capsys):
    data = tmp_path / "d.txt"
    data.write_text("hello world def return " * 100)
    capsys.readouterr()
    assert train(gguf, data, tmp_path / "run", "--seq-len", "32", "--eval-every", "10") == 0
    err = capsys.readouterr().err
    assert ": 1 step x 32 tokens" in err and "1 steps" not in err, err
