"""End to end on the real default backbone (SmolLM2-135M-Instruct): the shipped trained sparse
memory, and training-free memory in every layer."""
import json
import subprocess
import sys

import pytest
import torch

from memformer.eval import passkey

pytestmark = pytest.mark.integration


@pytest.mark.parametrize("which", ["default_model", "training_free_model"])
def test_passkey_from_memory_beyond_the_window(request, which):
    """Needle far outside the last window: memory finds it, truncation cannot."""
    model = request.getfixturevalue(which)
    for depth, key in [(0.2, 48213), (0.5, 60494)]:
        ids, at = passkey.make_prompt(model.tokenizer, 2304, depth, key)
        assert at < len(ids) - model.memory_config.window                  # not in the local window
        answer, ok = passkey.run_trial(model, ids, key, "memory")
        assert ok, f"memory mode answered {answer!r} for key {key}"
        answer, ok = passkey.run_trial(model, ids, key, "truncate")
        assert not ok


def _bytes_per_token(model) -> float:
    """Bytes of the stored memory tensors (keys, values, flags, positions) per memorized token."""
    total = sum(t.numel() * t.element_size() for mem in model.memories.values() for t in mem.state_dict().values())
    return total / model.memory_size()


def test_shipped_default_is_the_trained_sparse_adapter(default_model, training_free_model):
    """from_pretrained() loads the packaged adapter found by the backbone's fingerprint: memory in
    the 6 induction-head layers with the trained LoRA and gates, 1/5 of all-layer memory's bytes
    per token; the same weights from a folder get it too; adapter=None stays training-free."""
    from safetensors.torch import load_file
    from memformer import MemformerForCausalLM
    from memformer.loading import default_model_dir
    from memformer.weights import DEFAULT_ADAPTER
    model = default_model
    assert model.memory_layer_ids == [17, 18, 20, 21, 22, 23] and model.adapter_config.lora_rank == 8
    assert model.memory_trained and not training_free_model.memory_trained    # generate's prompt_reads="auto"
    assert model.memory_config.window == 1024
    shipped = load_file(str(DEFAULT_ADAPTER / "adapter.safetensors"))
    mine = model.trainable_state_dict()
    assert shipped.keys() == mine.keys() and all(torch.equal(shipped[k], mine[k]) for k in shipped)
    assert any(v.abs().max() > 0 for k, v in shipped.items() if k.endswith("memory_gate"))   # trained
    text = " ".join([passkey.FILLER] * 30)
    for m in (model, training_free_model):
        m.reset_memory()
        m.memorize(text, show_progress=False)
    ratio = _bytes_per_token(model) / _bytes_per_token(training_free_model)
    for m in (model, training_free_model):
        m.reset_memory()
    assert ratio <= 1 / 5 + 1e-9, ratio
    assert len(training_free_model.memory_layer_ids) == 30 and training_free_model.adapter_config is None
    folder = str(default_model_dir())                            # the same weights as an HF folder
    again = MemformerForCausalLM.from_pretrained(folder)
    assert again.memory_layer_ids == model.memory_layer_ids
    plain = MemformerForCausalLM.from_pretrained(folder, adapter=None)
    assert len(plain.memory_layer_ids) == 30 and plain.adapter_config is None


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


def test_ask_uses_chat_template_and_memory(default_model, training_free_model):
    """A free-form question (chat template) is answered from memory by training-free memory; the
    shipped trained memory answers the same fact as a cue (it was trained on completions, and
    free-form questions are its known weak spot: benchmarks/results/question_forms_default)."""
    filler = " ".join([passkey.FILLER] * 60)
    question = "What is the secret code of the blue vault?"
    for model in (training_free_model, default_model):
        model.reset_memory()
        model.memorize(f"{filler} The secret code of the blue vault is 73914. {filler}", show_progress=False)
    free_form = training_free_model.ask(question, max_new_tokens=24)
    completed = default_model.ask(question, cue="The secret code of the blue vault is", max_new_tokens=12)
    for model in (training_free_model, default_model):
        model.reset_memory()
    assert "73914" in free_form and "73914" in completed


def test_an_answer_absent_from_memory_is_short_and_not_a_loop(default_model):
    """Asked for a fact the memory does not hold, the shipped default completes the cue with a
    short plain answer: the sentence loop greedy decoding falls into ("a secret code. The secret
    code of the red vault is a secret code. ...") is stopped and cut, and the digit loop of an
    unanswerable number ("1111...") too."""
    from memformer.decoding import looping
    from memformer.qa.demo import python_docs_text
    model = default_model
    model.reset_memory()
    model.memorize(python_docs_text()[:12000], show_progress=False)
    try:
        for cue in ("The secret code of the red vault is", "The special magic number for tidy-violin is"):
            out = model.ask(cue=cue, max_new_tokens=64, return_dict=True)
            assert not looping(out.text), (cue, out.text)
            assert len(model.tokenizer(out.text)["input_ids"]) <= 24, (cue, out.text)
    finally:
        model.reset_memory()


def test_a_number_ending_in_a_doubled_digit_is_copied_whole(default_model):
    """The shipped default copies a needle's 7-digit number that ends in a doubled digit whole;
    without the copy pointer the same read stops one digit short ("599866." for 5998666): after
    the first "6" the rows of the second "6" and of the "." both follow a "6", and the trained
    layers jump to the later one."""
    from memformer.eval import ruler
    from memformer.qa import longdoc as qa
    model = default_model
    sample = ruler.make_sample(model.tokenizer, "niah_single_2", 4096, ruler.trial_rng(5001, "niah_single_2", 4096, 0),
                               ruler.essay_words(ruler.haystack_text(None)[1]))
    value = sample.expected[0]
    assert value[-1] == value[-2]
    ctx = qa.prepare(model, [sample.document], "memory", show_progress=False)
    answers = {}
    try:
        for beta in (model.memory_config.copy_pointer, 0.0):
            model.memory_config.copy_pointer, kept = beta, model.memory_config.copy_pointer
            try:
                answers[beta] = qa.answer(model, ctx, cue=sample.cue, max_new_tokens=12, evidence=0).text
            finally:
                model.memory_config.copy_pointer = kept
    finally:
        model.reset_memory()
    default, off = answers.values()
    assert default.startswith(value), answers
    assert off.startswith(value[:-1]) and not off.startswith(value), answers


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
