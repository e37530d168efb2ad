"""Passkey prompt generation/scoring and document reading, without a model."""
import pytest

from memformer.eval import passkey, plots as evalplots
from memformer.qa.demo import DEMO_FACTS
from memformer.qa.longdoc import DocumentError, read_document


class CharTokenizer:
    """One token per character: enough to check lengths and positions."""
    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [ord(c) % 1000 for c in text]}

    def decode(self, ids, **kw):
        return "".join(chr(i) for i in ids)


@pytest.mark.parametrize("depth", [0.0, 0.3, 1.0])
def test_prompt_length_and_needle_depth(depth):
    tok = CharTokenizer()
    ids, at = passkey.make_prompt(tok, 5000, depth, 12345)
    text = tok.decode(ids)
    assert 4500 < len(ids) <= 5000
    assert text.startswith(passkey.TASK) and text.endswith(passkey.QUESTION)
    assert text[at:].startswith(" " + passkey.NEEDLE.format(key=12345))
    assert abs(at / len(ids) - depth) < 0.1


def test_scoring_and_lengths():
    assert passkey.first_number(" 58213. Remember it") == 58213
    assert passkey.first_number("the pass key is") is None
    assert passkey.parse_length("16k") == 16384 and passkey.parse_length("1000") == 1000
    with pytest.raises(ValueError):
        passkey.parse_length("lots")


def test_summary_table_and_heatmap(tmp_path):
    rs = [dict(id=f"passkey/4096/{d}/{m}", task="passkey", length=4096, depth=d, mode=m, status="ok",
               score=float(ok)) for d, ok in [(0.1, True), (0.9, False)] for m in ("truncate", "memory")]
    table = evalplots.accuracy_table(rs)
    assert "| passkey | 4k | 50% (1/2) | 50% (1/2) |" in table
    assert table.splitlines()[0] == "| task | length | memory | truncate |"
    assert evalplots.plot_depth_heatmaps(rs, tmp_path / "h.png").stat().st_size > 1000


def test_read_document_errors(tmp_path):
    (tmp_path / "ok.md").write_text("# Title\nsome text")
    assert read_document(tmp_path / "ok.md").startswith("# Title")
    (tmp_path / "e.txt").write_text("")
    (tmp_path / "b.txt").write_bytes(b"\x00abc")
    (tmp_path / "l1.txt").write_bytes("caf\xe9".encode("latin-1"))
    for name, msg in [("e.txt", "empty"), ("b.txt", "binary"), ("l1.txt", "UTF-8"), ("nope.txt", "no such file")]:
        with pytest.raises(DocumentError, match=msg):
            read_document(tmp_path / name)
    with pytest.raises(DocumentError, match="not a regular file"):
        read_document(tmp_path)


def test_demo_facts_are_answerable():
    for f in DEMO_FACTS:
        assert f.answer in f.sentence and 0 < f.depth < 1
