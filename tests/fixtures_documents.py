"""Documents for the knowledge-base tests: real PDFs written byte by byte (no PDF-writing library needed).

`make_pdf([[line, ...], ...])` gives a valid PDF 1.4 file, one page per list, each line a Helvetica text line in
the page's content stream, with a correct cross-reference table: what a word processor's "export as PDF" holds,
minus the fonts' glyph programs, so pypdf extracts the text exactly as written.
"""

from __future__ import annotations


def _pdf_string(text: str) -> str:
    return "(" + text.replace("\\", "\\\\").replace("(", "\\(").replace(")", "\\)") + ")"


def make_pdf(pages: list[list[str]]) -> bytes:
    objects: list[bytes | str | None] = ["<< /Type /Catalog /Pages 2 0 R >>", None,
                                         "<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>"]
    kids = []
    for lines in pages:
        ops = ["BT", "/F1 12 Tf", "14 TL", "72 720 Td"] + [f"{_pdf_string(line)} Tj T*" for line in lines] + ["ET"]
        stream = "\n".join(ops).encode("latin-1")
        objects.append(f"<< /Length {len(stream)} >>\nstream\n".encode() + stream + b"\nendstream")
        content = len(objects)
        objects.append(f"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Contents {content} 0 R "
                       "/Resources << /Font << /F1 3 0 R >> >> >>")
        kids.append(len(objects))
    objects[1] = f"<< /Type /Pages /Kids [{' '.join(f'{k} 0 R' for k in kids)}] /Count {len(kids)} >>"
    out = bytearray(b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n")
    offsets = []
    for number, body in enumerate(objects, 1):
        offsets.append(len(out))
        out += f"{number} 0 obj\n".encode() + (body if isinstance(body, bytes) else body.encode()) + b"\nendobj\n"
    xref = len(out)
    out += f"xref\n0 {len(objects) + 1}\n0000000000 65535 f \n".encode()
    out += b"".join(f"{offset:010d} 00000 n \n".encode() for offset in offsets)
    out += f"trailer\n<< /Size {len(objects) + 1} /Root 1 0 R >>\nstartxref\n{xref}\n%%EOF\n".encode()
    return bytes(out)


def encrypted_pdf(pages: list[list[str]], password: str) -> bytes:
    """The same PDF, encrypted with a user password by pypdf's writer (RC4-128: needs no crypto library)."""
    import io

    from pypdf import PdfReader, PdfWriter

    writer = PdfWriter(clone_from=PdfReader(io.BytesIO(make_pdf(pages))))
    writer.encrypt(user_password=password, owner_password=password + "-owner", algorithm="RC4-128")
    out = io.BytesIO()
    writer.write(out)
    return out.getvalue()


# pyinfra on this machine (@local), in a subprocess (pyinfra's API patches gevent into the process): the real
# roles.chat.ensure_knowledge_base, as deploy.py runs it on a chat node. Prints {"changed", "failed"}.
_CONVERGE = r"""
import json, sys
from pyinfra.api import Config, Inventory, State
from pyinfra.api.connect import connect_all
from pyinfra.api.deploy import add_deploy
from pyinfra.api.operations import run_ops
from roles.chat import ensure_knowledge_base
directory, documents, user = sys.argv[1], json.loads(open(sys.argv[2]).read()), sys.argv[3]
state = State(inventory=Inventory((["@local"], {})), config=Config())
connect_all(state)
add_deploy(state, ensure_knowledge_base, directory, documents, user)
run_ops(state)
host = next(iter(state.inventory.iter_activated_hosts()))
metas = [op.operation_meta for op in state.ops[host].values()]
print(json.dumps({"changed": sum(m.did_change() for m in metas),
                  "failed": sum(not m.did_succeed(_raise_if_not_complete=False) for m in metas)}))
"""


def converge_knowledge_base(directory, documents: dict, user: str, workdir) -> dict:
    """Run the chat role's knowledge-base deploy against this machine; {"changed": N, "failed": N}."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    spec = Path(workdir) / "starter-documents.json"
    spec.write_text(json.dumps(documents))
    done = subprocess.run([sys.executable, "-c", _CONVERGE, str(directory), str(spec), user], cwd=repo,
                          capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stdout + done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])
