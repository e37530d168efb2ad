"""End to end on the real default backbone (SmolLM2-135M-Instruct), training-free."""
import json
import subprocess
import sys

import pytest
import torch

from memformer.eval import passkey

pytestmark = pytest.mark.integration


def test_passkey_from_memory_beyond_the_window(default_model):
    """Needle far outside the last window: memory finds it, truncation cannot."""
    model = default_model
    for depth, key in [(0.2, 48213), (0.5, 60494)]:
        ids, at = passkey.make_prompt(model.tokenizer, 2304, depth, key)
        assert at < len(ids) - model.memory_config.window                  # not in the local window
        answer, ok = passkey.run_trial(model, ids, key, "memory")
        assert ok, f"memory mode answered {answer!r} for key {key}"
        answer, ok = passkey.run_trial(model, ids, key, "truncate")
        assert not ok


def test_memory_round_trip_answers_identically(default_model, tmp_path):
    model = default_model
    ids, _ = passkey.make_prompt(model.tokenizer, 2560, 0.3, 31337)
    prefix, tail = torch.tensor([ids[:-1000]]), torch.tensor([ids[-1000:]])
    model.reset_memory()
    model.memorize(prefix, show_progress=False)
    want = model.generate(tail, max_new_tokens=6, do_sample=False)
    model.save_memory(tmp_path / "mem")
    model.reset_memory()
    model.load_memory(tmp_path / "mem")
    got = model.generate(tail, max_new_tokens=6, do_sample=False)
    model.reset_memory()
    assert torch.equal(got, want)
    assert "31337" in model.tokenizer.decode(got[0, 1000:])


def test_ask_uses_chat_template_and_memory(default_model):
    model = default_model
    model.reset_memory()
    filler = " ".join([passkey.FILLER] * 60)
    model.memorize(f"{filler} The secret code of the blue vault is 73914. {filler}", show_progress=False)
    answer = model.ask("What is the secret code of the blue vault?", max_new_tokens=24)
    model.reset_memory()
    assert "73914" in answer


def _cli(*args, timeout=600):
    return subprocess.run([sys.executable, "-m", "memformer.cli", *args], capture_output=True, text=True,
                          timeout=timeout)


def test_cli_qa_end_to_end_and_bad_documents(tmp_path, capsys):
    doc = tmp_path / "doc.txt"
    filler = " ".join([passkey.FILLER] * 40)
    doc.write_text(f"{filler} The name of the lighthouse keeper's cat is Marmalade. {filler}")
    r = _cli("qa", "--doc", str(doc), "-q", "What is the name of the lighthouse keeper's cat?",
             "--window", "256", "--cache-dir", str(tmp_path / "cache"), "--json", "--compare")
    assert r.returncode == 0, r.stderr[-2000:]
    out = json.loads(r.stdout[r.stdout.index("["):])
    assert {"question", "memory", "truncate", "rag", "evidence"} <= set(out[0]) and out[0]["memory"]
    # the rest in-process (`main(argv)` is what the console script calls): a second interpreter
    # start and model load per call would only re-test Python's import machinery
    from memformer.cli.main import main
    assert main(["qa", "--doc", str(doc), "-q", "What is the name of the lighthouse keeper's cat?",
                 "--window", "256", "--cache-dir", str(tmp_path / "cache")]) == 0
    out = capsys.readouterr().out
    assert "loaded from cache" in out and "truncate:" not in out
    empty, binary = tmp_path / "empty.txt", tmp_path / "blob.bin"
    empty.write_text("  \n")
    binary.write_bytes(b"\x00\x01\x02" * 100)
    for bad, msg in [(empty, "empty"), (binary, "binary"), (tmp_path / "missing.txt", "no such file")]:
        assert main(["qa", "--doc", str(bad), "-q", "x"]) == 2
        assert msg in capsys.readouterr().err
