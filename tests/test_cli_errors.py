"""User mistakes end in one line on stderr and a non-zero status, never a traceback: paths that
cannot be written, sizes beyond memory, bad flag values; and a refused run leaves the folder it was
pointed at as it was."""
import pytest

from dslm.cli import main


def _run(capsys, *argv):
    code = main(list(argv))
    err = capsys.readouterr().err
    return code, err


def test_an_output_path_that_cannot_be_made_is_one_line(tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    code, err = _run(capsys, "approximations", "--out", str(blocker))
    assert code == 1 and "Traceback" not in err
    assert err.strip().splitlines() == [f"dslm approximations: error: File exists: {blocker} "
                                        "(DSLM_DEBUG=1 shows the traceback)"]
    code, err = _run(capsys, "prepare-data", "--source", "embedded", "--out", str(blocker / "sub"))
    assert code == 1 and f"Not a directory: {blocker / 'sub'}" in err and len(err.strip().splitlines()) == 1


def test_debug_shows_the_traceback(tmp_path, monkeypatch):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    monkeypatch.setenv("DSLM_DEBUG", "1")
    with pytest.raises(FileExistsError):
        main(["approximations", "--out", str(blocker)])


def test_out_of_memory_is_one_line(monkeypatch, capsys):
    import dslm.figures

    def too_big(args):
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:127] DefaultCPUAllocator: can't allocate memory: "
                           "you tried to allocate 51539607552 bytes.")

    monkeypatch.setattr(dslm.figures, "run", too_big)
    code, err = _run(capsys, "figures")
    assert code == 1 and err.startswith("dslm figures: error: out of memory ([enforce fail")
    assert "choose smaller sizes" in err and len(err.strip().splitlines()) == 1


def test_other_runtime_errors_keep_their_traceback(monkeypatch):
    import dslm.figures

    def bug(args):
        raise RuntimeError("shape mismatch")

    monkeypatch.setattr(dslm.figures, "run", bug)
    with pytest.raises(RuntimeError, match="shape mismatch"):
        main(["figures"])


@pytest.mark.parametrize("value", ["-2", "two"])
def test_prepare_data_workers_must_be_a_count(tmp_path, capsys, value):
    code, err = _run(capsys, "prepare-data", "--source", "embedded", "--out", str(tmp_path / "d"), "--workers", value)
    assert code == 2 and "argument --workers: expected a number of processes (0 or more)" in err
    assert not (tmp_path / "d").exists()


def test_a_refused_pretrain_leaves_the_other_runs_vocabulary(tmp_path, capsys):
    """The vocabulary is copied only once the run owns its folder: a fresh run refused there (another
    run's checkpoints) does not overwrite that run's vocab.txt; a fresh folder gets the dataset's."""
    from dslm.data import ensure_embedded_dataset

    data = ensure_embedded_dataset(tmp_path / "data")
    run = tmp_path / "run"
    (run / "checkpoints" / "step_00000010").mkdir(parents=True)
    (run / "vocab.txt").write_text("[PAD]\nother\n")
    tiny = ["pretrain", "--preset", "tiny", "--data", str(data), "--device", "cpu", "--layers", "1", "--hidden",
            "32", "--heads", "2", "--seq-len", "32", "--global-batch", "4", "--steps", "1", "--no-progress",
            "--num-workers", "0"]
    code, err = _run(capsys, *tiny, "--out-dir", str(run))
    assert code == 2 and "already holds a run" in err
    assert (run / "vocab.txt").read_text() == "[PAD]\nother\n"
    code, err = _run(capsys, *tiny, "--out-dir", str(tmp_path / "fresh"))
    assert code == 0, err
    assert (tmp_path / "fresh" / "vocab.txt").read_bytes() == (data / "vocab.txt").read_bytes()


def test_config_errors_name_flags_on_the_command_line(tmp_path, capsys):
    """The engine raises ConfigError with field names; the CLI prints the flags the user typed."""
    code, err = _run(capsys, "pretrain", "--preset", "tiny", "--device", "cpu", "--steps", "2", "--keep-last", "0",
                     "--out-dir", str(tmp_path / "run"))
    assert code == 2 and err.strip() == "dslm pretrain: error: --keep-last 0: must be >= 1"
    code, err = _run(capsys, "pretrain", "--preset", "tiny", "--device", "cpu", "--steps", "2",
                     "--load", str(tmp_path / "nothing"), "--out-dir", str(tmp_path / "run"))
    assert code == 2 and f"--load {tmp_path / 'nothing'}: no such checkpoint or directory" in err


def test_config_error_renders_fields_and_flags():
    from dslm.errors import ConfigError

    e = ConfigError("{global_batch} 6 is not a multiple of {micro_batch} 4 (saved {'a': 1})")
    assert str(e) == "global_batch 6 is not a multiple of micro_batch 4 (saved {'a': 1})"
    assert e.for_cli() == "--global-batch 6 is not a multiple of --micro-batch 4 (saved {'a': 1})"


@pytest.mark.parametrize("flags, message", [
    (["--eval-iters", "0"], "argument --eval-iters: expected a positive integer or 'all', got 0"),
    (["--peak-tflops", "-1"], "--peak-tflops -1.0: must be a positive number"),
])
def test_pretrain_flag_values_without_meaning_are_refused(tmp_path, capsys, flags, message):
    code, err = _run(capsys, "pretrain", "--preset", "tiny", "--device", "cpu", "--steps", "2",
                     "--out-dir", str(tmp_path / "run"), *flags)
    assert code == 2 and message in err and not (tmp_path / "run").exists()



def test_a_model_beyond_memory_is_refused_before_it_is_built(tmp_path, capsys):
    """16 bytes per parameter (weights, gradients, AdamW moments) against the device's memory, counted
    on the meta device: refused in one line, nothing allocated, no run folder."""
    data = tmp_path / "data"
    assert main(["prepare-data", "--source", "embedded", "--out", str(data), "--no-progress"]) == 0
    capsys.readouterr()
    code, err = _run(capsys, "pretrain", "--preset", "tiny", "--data", str(data), "--device", "cpu", "--steps", "2",
                     "--layers", "2", "--hidden", "65536", "--heads", "1", "--out-dir", str(tmp_path / "run"))
    assert code == 2 and "alone need" in err and "GiB of cpu; choose smaller sizes" in err
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "run").exists()


def test_parameter_count_is_the_built_models():
    from dslm.model import BertConfig, BertForPreTraining
    from dslm.pretrain.bert import PretrainTask

    config = BertConfig(vocab_size=300, hidden_size=32, num_layers=2, num_heads=2)
    task = PretrainTask.__new__(PretrainTask)
    task.config = config
    assert task.parameter_count() == sum(p.numel() for p in BertForPreTraining(config).parameters())
