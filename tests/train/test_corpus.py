"""The corpus builder's pieces: docstrings move from code to prose, groff is stripped, generated domains are seeded."""

from __future__ import annotations

import json
import random

from marserve.data.corpus import _groff_to_text, _strip_docstrings, math_docs, records_docs


def test_docstrings_move_from_code_to_prose():
    src = 'def f(x):\n    """Return x doubled, as documented."""\n    return 2 * x\n'
    code, docs = _strip_docstrings(src)
    assert docs == ["Return x doubled, as documented."]
    assert "documented" not in code and "return 2 * x" in code
    compile(code, "<test>", "exec")   # still valid Python


def test_groff_requests_are_stripped():
    text = _groff_to_text('.\\" comment\n.TH LS 1\n.SH NAME\nls \\- list \\fBdirectory\\fR contents\n.PP\nMore.')
    assert "NAME" in text and "ls - list directory contents" in text
    assert ".TH" not in text and "comment" not in text and "\\f" not in text


def test_generated_domains_are_seeded_and_well_formed():
    assert math_docs(random.Random(1), 3) == math_docs(random.Random(1), 3)
    for line in math_docs(random.Random(2), 5)[0].splitlines():
        lhs, rhs = line.split(" = ")
        assert eval(lhs.replace("/", "//")) == int(rhs)
    recs = records_docs(random.Random(3), 2)
    assert isinstance(json.loads(recs[0]), list) and recs[1].startswith("order_id,item,quantity")
