import json
import random

import pytest

from atelier.errors import AtelierError
from retrieval.documents import DocumentsConfig, SkipKind, Skipped, load_folder, skip_summary


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


def test_symlinks_leading_outside_the_folder_are_skipped_and_reported(tmp_path):
    """Probe #7: a symlink in the folder to a file outside it was followed, indexed and served."""
    docs, private = tmp_path / "docs", tmp_path / "private"
    (docs / "manuals").mkdir(parents=True)
    private.mkdir()
    (private / "passwd.txt").write_text("root:x:0:0:root:/root:/bin/bash\n")
    (private / "notes.md").write_text("# Private\n\nNot for the index.\n")
    (docs / "manuals" / "pump.md").write_text("# Pump\n\nPrime the casing before start.\n")
    (docs / "passwd.txt").symlink_to(private / "passwd.txt")
    (docs / "elsewhere").symlink_to(private, target_is_directory=True)
    (docs / "alias.md").symlink_to(docs / "manuals" / "pump.md")  # leads inside: loaded
    (docs / "again").symlink_to(docs / "manuals", target_is_directory=True)  # inside: not walked twice
    (docs / "dangling.txt").symlink_to(tmp_path / "gone.txt")

    report = load_folder(docs)
    assert sorted(d.doc_id for d in report.documents) == ["alias.md", "manuals/pump.md"]
    assert all("root:x" not in d.text for d in report.documents)
    skipped = {s.path: s for s in report.skipped}
    assert skipped["passwd.txt"].kind is SkipKind.outside and skipped["elsewhere"].kind is SkipKind.outside
    assert "--follow-symlinks" in skipped["passwd.txt"].reason and str(private) in skipped["passwd.txt"].reason
    assert skipped["dangling.txt"].kind is SkipKind.unreadable

    followed = load_folder(docs, DocumentsConfig(follow_symlinks=True))
    assert sorted(d.doc_id for d in followed.documents) == ["alias.md", "elsewhere/notes.md", "elsewhere/passwd.txt",
                                                             "manuals/pump.md", "passwd.txt"]


def test_binary_content_is_skipped_whatever_its_name(tmp_path):
    """Probe #8: random bytes named .txt decoded as latin-1 into mojibake chunks that outranked real text."""
    noise = random.Random(0)
    (tmp_path / "blob.txt").write_bytes(noise.randbytes(64_000))
    (tmp_path / "no-nul.md").write_bytes(bytes(noise.randrange(1, 256) for _ in range(20_000)))
    (tmp_path / "page.html").write_bytes(b"<html><body>" + noise.randbytes(5_000) + b"</body></html>")
    (tmp_path / "latin1.txt").write_bytes("Caf\xe9 au lait, na\xefve r\xe9sum\xe9.\n".encode("latin-1"))
    (tmp_path / "utf16.txt").write_text("Torque the flange bolts to 45 Nm.\n", encoding="utf-16")

    report = load_folder(tmp_path)
    docs = {d.doc_id: d.text for d in report.documents}
    assert docs == {"latin1.txt": "Café au lait, naïve résumé.", "utf16.txt": "Torque the flange bolts to 45 Nm."}
    skipped = {s.path: s for s in report.skipped}
    assert set(skipped) == {"blob.txt", "no-nul.md", "page.html"}
    assert all(s.kind is SkipKind.binary and "not text" in s.reason for s in skipped.values())
    assert "NUL bytes" in skipped["blob.txt"].reason and "control characters" in skipped["no-nul.md"].reason


def test_documents_over_the_size_cap_are_skipped_with_the_option_to_raise_it(tmp_path):
    """Probe #9 (first half): a 30 MB file stalled indexing silently; a small cap stands in for the big file."""
    (tmp_path / "small.txt").write_text("Short note about the coupling guard.\n")
    (tmp_path / "big.txt").write_text("The impeller was inspected. " * 100)  # 2.8 KB
    (tmp_path / "records.jsonl").write_text(json.dumps({"id": "ok", "text": "fits"}) + "\n"
                                            + json.dumps({"id": "huge", "text": "x " * 1500}) + "\n")
    report = load_folder(tmp_path, DocumentsConfig(max_file_mb=0.002))
    assert sorted(d.doc_id for d in report.documents) == ["ok", "small.txt"]
    skipped = {s.path: s for s in report.skipped}
    assert skipped["big.txt"].kind is SkipKind.too_large
    assert skipped["big.txt"].reason == ("2.8 KB, over the 0.002 MB cap; raise it with --max-file-mb 1 "
                                         "(documents.max_file_mb in a config file)")
    assert skipped["records.jsonl:2"].kind is SkipKind.too_large
    assert len(load_folder(tmp_path).documents) == 4  # the default cap (20 MB) takes them all


def test_skip_summary_counts_by_reason_and_names_the_first_few():
    skipped = [Skipped(f"b{i}.txt", "binary content, not text", SkipKind.binary) for i in range(5)]
    skipped.append(Skipped("link.txt", "symlink leading outside the folder", SkipKind.outside))
    assert skip_summary(skipped) == ("skipped 6: 5 binary content (b0.txt, b1.txt, b2.txt, ...); "
                                     "1 symlink leading outside the folder (link.txt)")
    path, reason = skipped[-1]  # unpacks like the (path, reason) pairs it replaced
    assert (path, reason) == ("link.txt", "symlink leading outside the folder")
