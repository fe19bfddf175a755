"""Progress on stderr (marserve/progress.py): shown on a terminal, never in a redirected log, silenced by --quiet."""

from __future__ import annotations

import io
import sys

import pytest

from marserve import cli, progress


class Terminal(io.StringIO):
    """A stream that says it is a terminal, as a person's stderr is."""

    def isatty(self) -> bool:
        return True


@pytest.fixture(autouse=True)
def _not_quiet():
    progress.set_quiet(False)
    yield
    progress.set_quiet(False)  # cli.main(--quiet) sets it for the whole process


def _work(stream) -> None:
    for _ in progress.bar(range(3), desc="counting", stream=stream):
        pass
    with progress.stage("a step", stream=stream):
        pass


def test_bar_and_stage_show_on_a_terminal_only():
    tty, log = Terminal(), io.StringIO()
    _work(tty)
    _work(log)
    assert "counting" in tty.getvalue() and "marserve: a step ... done (" in tty.getvalue()
    assert log.getvalue() == ""


def test_quiet_silences_a_terminal_and_a_failing_stage_says_so():
    progress.set_quiet(True)
    tty = Terminal()
    _work(tty)
    assert tty.getvalue() == ""
    progress.set_quiet(False)
    with pytest.raises(RuntimeError), progress.stage("a step that fails", stream=tty):
        raise RuntimeError("boom")
    assert tty.getvalue() == "marserve: a step that fails ... failed\n"


@pytest.mark.parametrize("stderr, quiet, shown", [(Terminal, False, True), (io.StringIO, False, False),
                                                  (Terminal, True, False)])
def test_loading_a_model_shows_a_bar_over_its_tensors(baby_checkpoint, monkeypatch, stderr, quiet, shown):
    from marserve.loader import load_model
    path = baby_checkpoint("mixtral")
    stream = stderr()
    monkeypatch.setattr(sys, "stderr", stream)
    progress.set_quiet(quiet)
    load_model(path, dtype="float32")
    assert (f"loading {path.name}" in stream.getvalue() and "tensor" in stream.getvalue()) == shown
    if not shown:
        assert stream.getvalue() == ""


@pytest.mark.parametrize("quiet", [False, True])
def test_inspect_routing_shows_its_passes_unless_quiet(baby_checkpoint, monkeypatch, capsys, quiet):
    path = baby_checkpoint("mixtral")
    stream = Terminal()
    monkeypatch.setattr(sys, "stderr", stream)
    argv = ["inspect", str(path), "--routing", "--routing-max-tokens", "24", "--routing-seq-len", "8"]
    assert cli.main(argv + (["--quiet"] if quiet else [])) == 0
    assert "routing of" in capsys.readouterr().out  # the report itself goes to stdout either way
    if quiet:
        assert "routing:" not in stream.getvalue() and "marserve:" not in stream.getvalue()
    else:
        assert "routing: forward passes" in stream.getvalue() and "with transformers ... done (" in stream.getvalue()


@pytest.mark.parametrize("stderr", [Terminal, io.StringIO])
def test_corpus_build_reports_each_source_on_a_terminal(tmp_path, monkeypatch, stderr):
    from marserve.data import corpus
    # The real sources take ~100 s to read: small stand-ins, the same steps.
    monkeypatch.setattr(corpus, "code_and_prose_docs", lambda: (["def f():\n    pass\n" * 20], ["Some prose. " * 20]))
    monkeypatch.setattr(corpus, "manual_docs", lambda: ["NAME\n    tool - does things " * 10])
    stream = stderr()
    monkeypatch.setattr(sys, "stderr", stream)
    corpus.build(str(tmp_path), chars_per_domain=2000, heldout_chars=100)
    if stderr is Terminal:
        assert "marserve: corpus: manual pages ... done (" in stream.getvalue()
        assert "corpus: writing" in stream.getvalue()
    else:
        assert stream.getvalue() == ""


def test_every_long_running_command_takes_quiet():
    parser = cli.build_parser()
    for argv in (["generate", "--prompt", "x"], ["serve"], ["inspect"], ["train", "--out", "o"],
                 ["bench", "throughput"], ["bench", "moe"], ["bench", "linear"]):
        assert parser.parse_args(argv + ["--quiet"]).quiet is True
        assert parser.parse_args(argv).quiet is False
