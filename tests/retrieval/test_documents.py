import json

import pytest

from atelier.errors import AtelierError
from retrieval.documents import load_folder


def _pdf_bytes(text: str) -> bytes:
    """A minimal one-page PDF with `text`, written with pypdf's own writer objects."""
    from io import BytesIO

    from pypdf import PdfWriter
    from pypdf.generic import DecodedStreamObject, DictionaryObject, NameObject

    writer = PdfWriter()
    page = writer.add_blank_page(width=300, height=200)
    font = DictionaryObject({NameObject("/Type"): NameObject("/Font"), NameObject("/Subtype"): NameObject("/Type1"),
                             NameObject("/BaseFont"): NameObject("/Helvetica")})
    page[NameObject("/Resources")] = DictionaryObject({NameObject("/Font"): DictionaryObject({NameObject("/F1"): writer._add_object(font)})})
    stream = DecodedStreamObject()
    stream.set_data(f"BT /F1 12 Tf 20 100 Td ({text}) Tj ET".encode("latin-1"))
    page[NameObject("/Contents")] = writer._add_object(stream)
    out = BytesIO()
    writer.write(out)
    return out.getvalue()


def test_loads_every_format_and_reports_bad_files(tmp_path):
    (tmp_path / "guide.md").write_text("# Pump guide\n\nPrime the casing before start.\n")
    (tmp_path / "notes.txt").write_text("Check the coupling guard.\r\n")
    (tmp_path / "page.html").write_text(
        "<html><head><title>Fault codes</title><style>p{color:red}</style><script>var x='hidden';</script></head>"
        "<body><h1>Codes</h1><p>E14 means overtemperature.</p><table><tr><td>E01</td><td>Undervoltage</td></tr></table></body></html>")
    (tmp_path / "spec.pdf").write_bytes(_pdf_bytes("Rated speed 2900 rpm"))
    (tmp_path / "bulletins.jsonl").write_text(
        json.dumps({"id": "SB-1", "title": "Seal update", "text": "Use the new seal kit."}) + "\n"
        "{not json\n" + json.dumps({"id": "SB-2", "text": ""}) + "\n")
    (tmp_path / "empty.txt").write_text("  \n")
    (tmp_path / "broken.pdf").write_bytes(b"%PDF-1.4 this is not a pdf")
    (tmp_path / "image.png").write_bytes(b"\x89PNG")
    (tmp_path / ".hidden").mkdir()
    (tmp_path / ".hidden" / "secret.txt").write_text("do not index")

    report = load_folder(tmp_path)
    docs = {d.doc_id: d for d in report.documents}
    assert set(docs) == {"guide.md", "notes.txt", "page.html", "spec.pdf", "SB-1"}
    assert docs["guide.md"].title == "Pump guide"
    assert docs["notes.txt"].text == "Check the coupling guard."
    assert docs["page.html"].title == "Fault codes"
    assert "E14 means overtemperature." in docs["page.html"].text
    assert "E01 | Undervoltage" in docs["page.html"].text
    assert "hidden" not in docs["page.html"].text and "color" not in docs["page.html"].text
    assert "2900 rpm" in docs["spec.pdf"].text
    assert docs["SB-1"].title == "Seal update" and docs["SB-1"].source == "bulletins.jsonl:1"
    skipped = dict(report.skipped)
    assert skipped["empty.txt"] == "no text"
    assert skipped["broken.pdf"].startswith("unreadable")
    assert "not valid JSON" in skipped["bulletins.jsonl:2"]
    assert "non-empty" in skipped["bulletins.jsonl:3"]


def test_content_hash_tracks_content(tmp_path):
    (tmp_path / "a.txt").write_text("one")
    first = load_folder(tmp_path).documents[0].content_hash
    (tmp_path / "a.txt").write_text("two")
    assert load_folder(tmp_path).documents[0].content_hash != first


def test_missing_folder_is_a_clear_error(tmp_path):
    with pytest.raises(AtelierError, match="not a folder"):
        load_folder(tmp_path / "nope")
