"""The README's generated parts stay true."""

from pathlib import Path

from onnxshap.support import support_table

README = Path(__file__).resolve().parent.parent / "README.md"


def test_support_table_matches_the_op_table():
    text = README.read_text()
    start = text.index("<!-- support-table:start -->") + len("<!-- support-table:start -->")
    end = text.index("<!-- support-table:end -->")
    assert text[start:end].strip() == support_table().strip(), "regenerate with: python -m onnxshap.support"
